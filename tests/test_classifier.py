"""The classifier's recipe options: label smoothing, mixup and an EMA of the weights. Off, they leave
training bit for bit as it was; on, each does what it says, and a seed still repeats."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedfactory.classify import predict_log_proba, train_classifier
from fedfactory.classify.train import cross_entropy
from fedfactory.config import load_config
from fedfactory.errors import FedFactoryError
from helpers import TINY_CLASSIFIER


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (48, 12, 12, 1), dtype=np.uint8), np.arange(48) % 3


def weights(net) -> dict:
    return {k: v.clone() for k, v in net.state_dict().items()}


def fit(data, **options) -> dict:
    net, _ = train_classifier(*data, 3, dataclasses.replace(TINY_CLASSIFIER, **options), 0, "t", progress=False)
    return weights(net)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_label_smoothing_is_torch_s_definition():
    logits, labels = torch.randn(32, 5, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 5
    assert torch.allclose(cross_entropy(logits, labels, 0.1), F.cross_entropy(logits, labels, label_smoothing=0.1))
    assert torch.equal(cross_entropy(logits, labels), cross_entropy(logits, labels, 0.0))


def test_options_off_change_nothing_and_on_repeat_with_the_seed(data):
    plain = fit(data)
    assert same(plain, fit(data, label_smoothing=0.0, mixup=0.0, ema_halflife_images=0))
    for option in ({"label_smoothing": 0.1}, {"mixup": 0.4}, {"ema_halflife_images": 64}):
        once = fit(data, **option)
        assert not same(once, plain), option
        assert same(once, fit(data, **option)), option


def test_the_ema_averages_weights_and_batchnorm_statistics_and_ramps_up(data):
    plain = fit(data)
    short = fit(data, ema_halflife_images=0.01)  # decay ~0: the EMA is the last weights
    for k, v in plain.items():
        if v.is_floating_point():
            assert torch.allclose(short[k], v, atol=1e-5), k
    # A half-life far longer than the run still averages what the run learned (the ramp); a fixed decay
    # would return the initial weights: chance on three classes that differ only in brightness.
    x = np.repeat(np.array([0, 128, 255], np.uint8), 30)[:, None, None, None] * np.ones((1, 12, 12, 1), np.uint8)
    y = np.repeat(np.arange(3), 30)
    options = dataclasses.replace(TINY_CLASSIFIER, budget_images=16 * 40, blur=0.0)
    for halflife in (0, 1e9):
        recipe = dataclasses.replace(options, ema_halflife_images=halflife)
        net, _ = train_classifier(x, y, 3, recipe, 0, "t", "none", progress=False)
        assert (predict_log_proba(net, x).argmax(1) == y).mean() == 1.0, halflife


@pytest.mark.parametrize("setting", ["classifier.label_smoothing=0.7", "classifier.mixup=-1",
                                     "classifier.ema_halflife_images=-5"])
def test_out_of_range_options_are_clear_errors(setting):
    with pytest.raises(FedFactoryError, match=setting.split("=")[0]):
        load_config("configs/fashion-silos.toml", [setting])


def test_the_loss_curve_goes_down_on_an_easy_task():
    # three classes that differ only in brightness: 40 steps, a point each, the loss falling
    x = np.repeat(np.array([0, 128, 255], np.uint8), 30)[:, None, None, None] * np.ones((1, 12, 12, 1), np.uint8)
    y = np.repeat(np.arange(3), 30)
    recipe = dataclasses.replace(TINY_CLASSIFIER, budget_images=16 * 40)
    _, stats = train_classifier(x, y, 3, recipe, 0, "t", "none", progress=False)
    curve = stats["curve"]
    assert [p["step"] for p in curve] == list(range(1, 41)) and curve[-1]["images_seen"] == 16 * 40
    losses = np.array([p["loss"] for p in curve])
    assert np.isfinite(losses).all() and losses[-5:].mean() < 0.5 * losses[:5].mean()
