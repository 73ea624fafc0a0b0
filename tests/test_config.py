import pytest

from fedfactory.config import ClassifierConfig, load_config
from fedfactory.errors import FedFactoryError


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('seed = 3\n[partition]\nscheme = "dirichlet:0.1"\n')
    cfg = load_config(path, ["module.lr=0.001", "partition.clients=4", "data.name=br35h", "partition.exclude=['client-1']"])
    assert cfg.seed == 3 and cfg.partition.scheme == "dirichlet:0.1"
    assert cfg.module.overrides["lr"] == 0.001 and cfg.partition.clients == 4
    assert cfg.data.name == "br35h" and cfg.partition.exclude == ["client-1"]
    assert cfg.classifier == ClassifierConfig()


@pytest.mark.parametrize("override, words", [
    ("module.budget_image=5", ["module.budget_image", "module.budget_images"]),
    ("partition.clinets=3", ["partition.clinets", "partition.clients"]),
    ("partition.clients=three", ["integer"]),
    ("classifier.mode=global", ["server", "local"]),
    ("factory.per_class=0", ["> 0"]),
    ("module.sigma_min=-0.1", ["module.sigma_min", ">= 0"]),
    ("nokey", ["key=value"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(FedFactoryError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("privacy", ["privacy.epsilon=10", "privacy.noise_multiplier=1.0"])
def test_dp_refuses_local_mode_whose_experts_are_not_private(privacy):
    # the experts of local mode leave the sites untouched by DP: an epsilon would misstate the run's privacy
    with pytest.raises(FedFactoryError, match="classifier.mode = \"server\""):
        load_config(None, ["classifier.mode=local", privacy])
    assert load_config(None, ["classifier.mode=server", privacy]).classifier.mode == "server"


def test_unknown_key_in_file_suggests_nearest(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[classifier]\nbatchsize = 3\n")
    with pytest.raises(FedFactoryError, match="classifier.batchsize.*classifier.batch_size"):
        load_config(path)


def test_configs_shipped_are_valid():
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))
    assert len(files) >= 2
    for f in files:
        load_config(f)


@pytest.mark.parametrize("kind", ["diffusion", "cvae"])
def test_module_keys_left_out_take_the_presets_values(kind):
    from fedfactory.modules import module_kinds
    from fedfactory.site import new_module

    for preset in ("cpu", "gpu", "paper"):
        module = new_module(load_config(None, [f"module.kind={kind}", f"module.preset={preset}"]), "c")
        assert module.train_cfg == module_kinds()[kind].presets[preset]["train"]
    module = new_module(load_config(None, [f"module.kind={kind}", "module.preset=gpu", "module.lr=0.01"]), "c")
    assert module.train_cfg["lr"] == 0.01


def test_module_keys_are_absent_unless_set_and_checked_when_set():
    from fedfactory.config import dumps, load_config_text
    from fedfactory.errors import FedFactoryError
    from fedfactory.site import new_module

    cfg = load_config(None)
    assert set(cfg.to_dict()["module"]) == {"kind", "preset"}
    assert load_config_text(dumps(cfg)) == cfg  # a resolved config round-trips without the unset keys
    assert load_config(None, ["module.budget_images=500"]).module.overrides == {"budget_images": 500}
    with pytest.raises(FedFactoryError, match="module.budget_images.*> 0"):
        load_config(None, ["module.budget_images=0"])
    with pytest.raises(FedFactoryError, match="does not apply to module kind 'cvae'"):
        new_module(load_config(None, ["module.kind=cvae", "module.sigma_min=0.5"]), "c")
    with pytest.raises(FedFactoryError, match="data.classes"):
        load_config(None, ["data.classes=['a', 'a']"])


def _another(value, kind_cls):
    """A valid value of a module key other than its cpu preset's (so that taking it is seen)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 if value else 0.5
    if isinstance(value, list):
        return value[:-1] if len(value) > 1 else value
    if isinstance(value, str) and value in kind_cls.samplers:
        return next((s for s in kind_cls.samplers if s != value), value)
    return value


def _module_keys_of_every_kind():
    from fedfactory.modules import module_kinds

    return [(name, key, value) for name, cls in module_kinds().items() for key, value in cls.config_keys().items()]


@pytest.mark.parametrize("kind, key, value", _module_keys_of_every_kind())
def test_every_key_a_kind_reads_can_be_set(kind, key, value):
    """Enumerated from the registry: `--set module.<key>=...` is accepted and reaches the module."""
    import tomli_w

    from fedfactory.modules import get_kind
    from fedfactory.site import new_module

    cls = get_kind(kind)
    new = _another(value, cls)
    text = tomli_w.dumps({"v": new})[len("v = "):].strip()
    cfg = load_config(None, [f"module.kind='{kind}'", f"module.{key}={text}"])
    assert cfg.module.overrides[key] == new
    module = new_module(cfg, "client-0")
    assert {**module.arch, **module.train_cfg}[key] == new


def test_the_cvae_beta_is_a_config_key():
    from fedfactory.site import new_module

    module = new_module(load_config(None, ["module.kind='cvae'", "module.beta=0.25"]), "client-0")
    assert module.train_cfg["beta"] == 0.25
    with pytest.raises(FedFactoryError, match="'module.beta' must be >= 0"):
        load_config(None, ["module.kind='cvae'", "module.beta=-1.0"])


def test_an_unknown_module_key_is_refused_in_one_line(capsys, tmp_path):
    from fedfactory.cli import main

    with pytest.raises(FedFactoryError, match=r"unknown config key 'module.betta'; did you mean 'module.beta'\?") as e:
        load_config(None, ["module.betta=0.5"])
    assert "\n" not in str(e.value)
    assert main(["run", "configs/fashion-silos.toml", "--out", str(tmp_path / "run"), "--set", "module.no_such_key=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown config key 'module.no_such_key'" in err and "\n" not in err


def test_the_readme_key_table_is_the_dataclasses():
    """The README's config table is generated from the section dataclasses and the registered kinds."""
    import dataclasses
    import re
    from pathlib import Path

    from fedfactory.config import SECTIONS, Config, key_table

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"<!-- config-keys[^>]*-->\n(.*?)\n<!-- /config-keys -->", readme, re.S)
    assert block and block.group(1) == key_table(), "README's config table is stale: paste fedfactory.config.key_table()"
    documented = set(re.findall(r"^\| `([a-z0-9_.]+)`", block.group(1), re.M))
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name != "overrides":
                assert f"{section}.{f.name}" in documented and f.metadata["doc"]
    assert "seed" in documented and len(dataclasses.fields(Config)) == len(SECTIONS) + 1


def test_a_config_is_frozen_and_replace_validates():
    import dataclasses

    cfg = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.classifier.lr = 1.0
    assert cfg.replace({"classifier.lr": 0.1, "seed": 4}).classifier.lr == 0.1 and cfg.classifier.lr == 0.05
    with pytest.raises(FedFactoryError, match="'factory.max_share' must be in"):
        cfg.replace({"factory.max_share": 2.0})
    for wrong, named in (("classifier.lrr", "classifier.lrr"), ("clasifier.lr", "clasifier"), ("seed.x", "seed.x")):
        with pytest.raises(FedFactoryError, match=f"unknown config key '{named}'"):
            cfg.replace({wrong: 0.1})
