"""The privacy audit at the site: a memorizing module is flagged and never leaves the site, a
module of the shipped CPU preset passes, the tests' p-values are honest, and the privacy block a
peer sends is checked like any other manifest field."""

import json

import numpy as np
import pytest

from fedfactory.cli import main
from fedfactory.config import load_config
from fedfactory.runtime import setup_runtime
from fedfactory.errors import FedFactoryError
from fedfactory.modules import ModuleFileError, load_module
from fedfactory.privacy.audit import closer_to_train_test, holdout_split
from fedfactory.server import check_audit
from fedfactory.site import train_module
from helpers import FASHION, needs_fashion, write_image_folder

CLASSES = ["a", "b"]


def config_file(tmp_path, extra=""):
    path = tmp_path / "site.toml"
    path.write_text(f"""seed = 0
[data]
classes = {json.dumps(CLASSES)}
[module]
channels = 8
channel_mult = [1, 2]
num_blocks = 1
sample_steps = 6
{extra}
[privacy]
holdout = 0.5
audit_samples = 100
[runtime]
threads = 1
progress = false
""")
    return path


def few_images(n=20):
    """n distinct 12 x 12 images of one class: blocks at random places and brightness."""
    rng = np.random.default_rng(3)
    x = np.zeros((n, 12, 12, 1), np.uint8)
    for i in range(n):
        r, c = rng.integers(0, 8, 2)
        x[i, r : r + 4, c : c + 4, 0] = rng.integers(120, 256)
        x[i] += rng.integers(0, 40, (12, 12, 1), dtype=np.uint8)
    return x, np.zeros(n, np.int64)


def test_holdout_is_a_seeded_stratified_share_of_every_class():
    y = np.repeat([0, 1, 2], [100, 10, 3])
    train, held = holdout_split(y, 0.2, seed=0, client_id="c")
    assert not set(train) & set(held) and len(train) + len(held) == len(y)
    assert np.bincount(y[held], minlength=3).tolist() == [20, 2, 1]
    assert np.array_equal(held, holdout_split(y, 0.2, 0, "c")[1])
    assert not np.array_equal(held, holdout_split(y, 0.2, 0, "other")[1])
    assert len(holdout_split(y, 0.0, 0, "c")[1]) == 0


def test_many_images_near_one_reference_are_not_many_independent_trials():
    # 200 generated images, all nearest to the same training image among 5 training and 5 held-out
    # references: under exchangeable labels that happens half the time, so p must be about 0.5.
    counts = np.zeros(10, int)
    counts[0] = 200
    share, p = closer_to_train_test([counts], [np.r_[np.ones(5, bool), np.zeros(5, bool)]], np.random.default_rng(0))
    assert share == 1.0 and 0.4 < p < 0.6
    # spread over every training reference and none of the held-out ones: that is a real preference
    spread = np.r_[np.full(50, 4), np.zeros(50, int)]
    share, p = closer_to_train_test([spread], [np.r_[np.ones(50, bool), np.zeros(50, bool)]], np.random.default_rng(0))
    assert share == 1.0 and p < 0.001


@pytest.mark.slow
def test_a_memorizing_module_is_flagged_and_never_leaves_the_site(tmp_path, capsys):
    # 10 training images seen 3,000 times each: the module reproduces them
    x, y = few_images()
    write_image_folder(tmp_path / "site", x, y, CLASSES)
    config = config_file(tmp_path, "budget_images = 30000\nbatch_size = 32\nlr = 0.002\nsigma_min = 0.002")
    out = tmp_path / "out" / "client-0"
    rc = main(["site", "train", "--config", str(config), "--data", str(tmp_path / "site"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "failed its privacy audit and is not uploaded" in err and "what to try" in err
    manifest = json.loads((out / "manifest.json").read_text())  # nothing lost: module and report stay
    audit = manifest["privacy"]["audit"]
    assert audit["passed"] is False and audit["copy_rate"] > 0.3 and audit["mia_auc"] > 0.8
    report = tmp_path / "out" / "client-0-audit"
    assert (report / "closest_pairs.png").stat().st_size > 0 and "FAILED" in (report / "audit.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "module.safetensors"]  # no pictures inside
    # the server refuses it too, should a site send it anyway
    with pytest.raises(FedFactoryError, match="failed its site's privacy audit"):
        check_audit(load_config(config), load_module(out))
    check_audit(load_config(config, ["privacy.enforce=false"]), load_module(out))
    # and `site audit` finds the same on the same data
    rc = main(["site", "audit", str(out), "--config", str(config), "--data", str(tmp_path / "site"),
               "--out", str(tmp_path / "again")])
    assert rc == 1 and "FAILED" in capsys.readouterr().out


def test_site_audit_refuses_data_that_does_not_match_the_modules_training(tmp_path, capsys):
    x, y = few_images()
    write_image_folder(tmp_path / "site", x, y, CLASSES)
    config = config_file(tmp_path, "budget_images = 64\nbatch_size = 16")
    out = tmp_path / "client-0"
    assert main(["site", "train", "--config", str(config), "--data", str(tmp_path / "site"), "--out", str(out)]) == 0
    assert "privacy audit:" in capsys.readouterr().out
    rc = main(["site", "audit", str(out), "--config", str(config), "--data", str(tmp_path / "site"),
               "--set", "privacy.holdout=0.2"])
    assert rc == 2 and "may have been trained on" in capsys.readouterr().err


@pytest.mark.slow
@needs_fashion
def test_a_cpu_preset_module_on_thousands_of_images_passes():
    from fedfactory.data import load_dataset

    ds = load_dataset("fashion-mnist", root=str(FASHION))
    keep = ds.y_train == 8  # bags: one site, 6,000 images, the CPU preset's 36,000-image budget
    cfg = load_config("configs/fashion-silos.toml", ["runtime.parallel_clients=1", "runtime.progress=false",
                                                     "privacy.audit_samples=100"])
    setup_runtime(cfg)  # all the cores: an earlier test may have left torch at one thread (twice the time)
    module = train_module(cfg, "client-8", ds.x_train[keep], ds.y_train[keep])
    audit = module.privacy["audit"]
    assert audit["passed"], audit["reasons"]
    assert audit["copy_rate"] <= 0.01 and 0.35 < audit["closer_to_train"] < 0.65 and audit["mia_auc"] < 0.56


@pytest.mark.parametrize("block, why", [
    ("not an object", "must be an object"),
    ({"audit": {"copy_rate": 7}}, "copy_rate must be a number in"),
    ({"audit": {"mia_auc": float("nan")}}, "mia_auc must be a number in"),
    ({"audit": {"passed": "yes"}}, "passed must be true or false"),
    ({"audit": {"reasons": ["x" * 5000]}}, "short list of strings"),
    ({"dp": {"epsilon": 1.0}}, "a DP claim must state"),
    ({"secret": 1}, "must be an object with"),
])
def test_a_hostile_privacy_block_is_refused(tmp_path, block, why):
    x, y = few_images()
    cfg = load_config(config_file(tmp_path, "budget_images = 32\nbatch_size = 16"), ["privacy.holdout=0"])
    path = tmp_path / "m"
    train_module(cfg, "client-0", x, y).save(path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["privacy"] = block
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModuleFileError, match=why):
        load_module(path)


def test_the_attack_is_the_kinds_own_loss_and_a_kind_without_one_gets_none():
    """The audit calls a kind's declared per-example loss without knowing the kind (modules/registry.py)."""
    from fedfactory.modules.cvae import CVAEModule
    from fedfactory.privacy.audit import audit

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (60, 8, 8, 1), dtype=np.uint8), np.repeat([0, 1], 30)
    train, held = holdout_split(y, 0.5, 0, "c")
    module = CVAEModule({"channels": 8, "latent": 4}, {"budget_images": 32, "batch_size": 16},
                        progress=False).fit(x[train], y[train])
    result, _ = audit(module, x[train], y[train], x[held], y[held], 20, seed=0)
    assert "mia_auc" not in result and "mia_sigmas" not in result  # the cVAE declares no per-example loss
    calls = []
    module.per_example_loss = lambda images, labels, seed: calls.append(len(images)) or images.reshape(len(images), -1).mean(1)
    module.per_example_loss_info = {"attack": "a test's"}
    result, _ = audit(module, x[train], y[train], x[held], y[held], 20, seed=0)
    assert calls and 0 <= result["mia_auc"] <= 1 and 0 <= result["mia_p"] <= 1 and result["attack"] == "a test's"
