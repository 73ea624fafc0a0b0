"""A third-party module kind and a third-party classifier network, defined here and registered through
the public hooks, run the whole pipeline (audit, factory, classifier) with no file in src/ edited; the
entry point groups find them in an installed package."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from fedfactory.cli import main
from fedfactory.config import load_config
from fedfactory.errors import FedFactoryError
from fedfactory.modules import GenerativeModule, load_module, module_kinds, register_kind, unregister_kind
from fedfactory.classify import registry as classifier_registry
from fedfactory.classify.model import load_classifier_file
from fedfactory.classify.registry import register_classifier, unregister_classifier
from fedfactory.modules import registry


class ClassMeans(nn.Module):
    def __init__(self, num_classes: int, shape: tuple[int, int, int]):
        super().__init__()
        self.means = nn.Parameter(torch.zeros(num_classes, *shape))


class GaussianModule(GenerativeModule):
    """A per-class Gaussian: it fits each class's mean image and samples noise around it."""

    kind = "toy-gaussian"
    presets = {"cpu": {"arch": {"spread": 0.3},
                       "train": {"budget_images": 1024, "batch_size": 32, "lr": 0.05, "ema_halflife_images": 200,
                                 "warmup_images": 0, "hflip": False, "shrink": 1.0}}}
    key_rules = {**GenerativeModule.key_rules, "spread": "non-negative", "shrink": "positive"}
    per_example_loss_info = {"toy_loss": "squared distance to the class mean"}

    @classmethod
    def arch_rules(cls, limits):
        return {"spread": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 2}

    def build_network(self):
        h, w, c = self.image_shape
        return ClassMeans(self.num_local_classes, (c, h, w))

    def loss(self, net, x, labels, gen):
        return ((x.float() - net.means[labels] * self.train_cfg["shrink"]) ** 2).mean()

    def noise_shape(self):
        h, w, c = self.image_shape
        return (c, h, w)

    def generate(self, labels, noise):
        return (self.net.means[labels] + float(self.arch["spread"]) * noise).clamp(-1, 1)

    @torch.no_grad()
    def per_example_loss(self, images, labels, seed):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        local = torch.as_tensor(np.searchsorted(self.classes, labels))
        return ((x - self.net.means[local].float()) ** 2).flatten(1).mean(1).double().numpy()


@pytest.fixture
def gaussian_kind():
    register_kind(GaussianModule)
    yield GaussianModule
    unregister_kind(GaussianModule.kind)


def toy_mlp(in_channels: int, num_classes: int, width: int = 0) -> nn.Module:
    """A classifier network for classifier.preset = "toy-mlp": two linear layers on 8 x 8 pixels."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(in_channels * 64, width or 32), nn.ReLU(),
                         nn.Linear(width or 32, num_classes))


@pytest.fixture
def mlp_classifier():
    register_classifier("toy-mlp", toy_mlp)
    yield toy_mlp
    unregister_classifier("toy-mlp")


@pytest.fixture
def digits(tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = (d.images * 255 / 16).astype(np.uint8)[..., None], d.target
    keep = y < 4
    path = tmp_path / "digits.npz"
    np.savez(path, x_train=x[keep][::2], y_train=y[keep][::2], x_test=x[keep][1::2], y_test=y[keep][1::2])
    return path


def test_a_registered_kind_and_classifier_run_the_whole_pipeline(gaussian_kind, mlp_classifier, digits, tmp_path,
                                                                   capsys):
    config = tmp_path / "toy.toml"
    config.write_text(textwrap.dedent(f"""\
        [data]
        name = "npz:{digits}"
        [partition]
        clients = 4
        [module]
        kind = "toy-gaussian"
        spread = 0.2
        shrink = 1.0
        [factory]
        per_class = 30
        [classifier]
        preset = "toy-mlp"
        budget_images = 2048
        batch_size = 64
        [privacy]
        audit_samples = 50
        [quality]
        reference_budget = 0
        [runtime]
        progress = false
        parallel_clients = 1
        """))
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["synthetic"]["per_class"] == [30, 30, 30, 30]
    assert res["metrics"]["accuracy"] > 0.4  # above chance (4 classes): class means of digits are far apart
    for m in res["modules"]:
        module = load_module(out / "modules" / m["client"])
        assert isinstance(module, GaussianModule) and module.arch == {"spread": 0.2}
        audit = module.saved_manifest["privacy"]["audit"]
        # the audit called the kind's own per-example loss, without knowing the kind
        assert 0 <= audit["mia_auc"] <= 1 and audit["toy_loss"] == "squared distance to the class mean"
    # the classifier file names its network; the registered one rebuilds it, and predicts as the run evaluated
    model = load_classifier_file(out / "model.safetensors")
    assert model.preset == "toy-mlp" and isinstance(model.nets["server"], nn.Sequential)
    test = np.load(digits)
    accuracy = float((model.predict(test["x_test"]) == test["y_test"]).mean())
    assert accuracy == pytest.approx(res["metrics"]["accuracy"], abs=1e-9)
    unregister_classifier("toy-mlp")  # a loader without the network refuses the file in one line
    capsys.readouterr()
    assert main(["predict", str(out / "model.safetensors"), "--images", str(digits), "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert "'toy-mlp'" in err and "registered here" in err and "\n" not in err and not (tmp_path / "p.csv").exists()


def test_a_registered_kind_is_checked_like_the_built_in_ones(gaussian_kind):
    cfg = load_config(None, ["module.kind='toy-gaussian'", "module.spread=0.5"])
    assert cfg.module.overrides["spread"] == 0.5
    with pytest.raises(FedFactoryError, match="'module.shrink' must be > 0"):
        load_config(None, ["module.kind='toy-gaussian'", "module.shrink=0.0"])
    with pytest.raises(FedFactoryError, match="already registered"):
        register_kind(type("Other", (GaussianModule,), {}))


def test_an_unregistered_kinds_keys_leave_the_config():
    register_kind(GaussianModule)
    assert load_config(None, ["module.kind='toy-gaussian'", "module.shrink=0.5"]).module.overrides["shrink"] == 0.5
    unregister_kind(GaussianModule.kind)
    with pytest.raises(FedFactoryError, match="unknown config key 'module.shrink'"):
        load_config(None, ["module.shrink=0.5"])
    with pytest.raises(FedFactoryError, match="'module.kind' must be one of diffusion, cvae"):
        load_config(None, ["module.kind='toy-gaussian'"])


def test_a_kind_that_is_not_one_is_refused():
    with pytest.raises(FedFactoryError, match="GenerativeModule subclass"):
        register_kind(dict)
    with pytest.raises(FedFactoryError, match="kind must match"):
        register_kind(type("Bad", (GaussianModule,), {"kind": "Bad Name"}))


def test_the_entry_point_group_finds_an_installed_kind(tmp_path, monkeypatch):
    (tmp_path / "toyplugin.py").write_text(textwrap.dedent("""\
        from test_plugins import GaussianModule

        class EntryPointKind(GaussianModule):
            kind = "toy-entry-point"
        """))
    info = tmp_path / "toyplugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fedfactory.modules]\ntoy-entry-point = toyplugin:EntryPointKind\n"
                                           "[fedfactory.classifiers]\ntoy-net = test_plugins:toy_mlp\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(classifier_registry, "_entry_points_loaded", False)
    try:
        registry.load_entry_points(again=True)
        assert module_kinds()["toy-entry-point"].__name__ == "EntryPointKind"
        assert classifier_registry.classifier_networks()["toy-net"][0] is toy_mlp
        assert load_config(None, ["classifier.preset='toy-net'"]).classifier.preset == "toy-net"
    finally:
        unregister_kind("toy-entry-point")
        unregister_classifier("toy-net")
    with pytest.raises(FedFactoryError, match="'classifier.preset' must be one of cpu, gpu; got 'toy-net'"):
        load_config(None, ["classifier.preset='toy-net'"])
