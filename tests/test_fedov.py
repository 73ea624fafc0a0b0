"""FedOV (baselines/fedov.py): outliers labelled unknown, sites that abstain on classes they never saw,
and the one-shot vote end to end on the toy digits."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from helpers import TINY_CLASSIFIER, toy_overrides

from fedfactory.baselines import fedov
from fedfactory.errors import FedFactoryError
from fedfactory.tensors import to_float


def digits(npz, split="train"):
    d = np.load(npz)
    return d[f"x_{split}"][..., None], d[f"y_{split}"]  # the file's 8 x 8 grey images, with their channel


def test_outliers_are_labelled_unknown_and_destroy_their_source(digits_npz):
    x = to_float(digits(digits_npz)[0][:64])
    gen = torch.Generator().manual_seed(0)
    out, y = fedov.make_outliers(x, 4, gen)
    assert out.shape == x.shape and y.tolist() == [4] * len(x)  # the unknown class is index num_classes
    change = (out - x).abs().flatten(1)
    assert (change.amax(1) > 0.25).all() and change.mean() > 0.1  # every image is altered, not nudged
    assert torch.equal(out, fedov.destroy(x, torch.Generator().manual_seed(0)))  # seeded: same outliers
    with pytest.raises(FedFactoryError, match="too small"):
        fedov.destroy(torch.zeros(2, 1, 3, 3), gen)


def test_enhanced_outliers_stay_within_epsilon():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))
    x = torch.randn(8, 1, 8, 8)
    p = fedov.FedOVParams(adv_steps=5, adv_alpha=0.3, adv_epsilon=0.5)
    adv = fedov.enhance(net, x, torch.full((8,), 4), p, bf16=False)
    assert 0 < (adv - x).abs().max() <= 0.5 + 1e-6


def test_a_site_that_says_unknown_barely_votes():
    """Site b is sure of nothing it knows (98% unknown); its faint lean to class 1 must not outvote site a.
    Renormalising b's known classes (a plain product of experts) would hand the vote to class 1."""
    a, b = np.log([[0.90, 0.05, 0.05]]), np.log([[0.001, 0.019, 0.98]])
    lp = fedov.vote([a, b], num_classes=2)
    assert lp.shape == (1, 2) and np.isclose(np.exp(lp).sum(), 1) and lp.argmax() == 0
    assert np.allclose(np.exp(lp), np.array([[0.901, 0.069]]) / 0.97)


def test_a_site_abstains_on_the_classes_it_never_saw(digits_npz):
    """Trained on the digits 0 and 1 only, the site's unknown probability is higher on test 2s and 3s."""
    x, y = digits(digits_npz)
    xt, yt = digits(digits_npz, "test")
    own = y < 2
    cfg = dataclasses.replace(TINY_CLASSIFIER, budget_images=16 * 60)
    net, stats, curve = fedov.train_open_set(x[own], y[own], 4, cfg, 0, "client-0", augment_policy="none",
                                             progress=False)
    p_unknown = torch.softmax(net(to_float(xt)), 1)[:, 4].detach().numpy()
    others, own = p_unknown[yt >= 2].mean(), p_unknown[yt < 2].mean()
    assert others > own + 0.2, f"unknown probability {others:.3f} on unseen classes, {own:.3f} on its own"
    assert curve[-1]["step"] == 60 and stats["images_seen"] == 16 * 60


def test_fedov_end_to_end_votes_above_chance_and_repeats(digits_npz):
    from fedfactory.config import load_config
    from fedfactory.runners.common import prepare_data

    cfg = load_config(None, toy_overrides(digits_npz, clients=2))  # two sites of two digits each
    ds, part = prepare_data(cfg)
    kw = dict(augment_policy="natural", device=torch.device("cpu"), bf16=False, progress=False)
    lp, info = fedov.run("fedov", cfg, ds, part, **kw)
    assert lp.shape == (len(ds.y_test), ds.num_classes) and lp.dtype == np.float64
    assert np.allclose(np.exp(lp).sum(1), 1)
    assert (lp.argmax(1) == ds.y_test).mean() > 1.5 / ds.num_classes
    assert info["rounds"] == 1 and info["downloaded_bytes"] == 0
    assert info["uploaded_bytes"] > 0 and info["uploaded_bytes"] % len(part.indices) == 0
    assert {r["series"] for r in info["curves"]} == {f"fedov/{cid}" for cid in part.indices}
    assert all(np.isfinite(r["loss"]) for r in info["curves"])
    json.dumps(info)  # the run folder stores it
    lp2, _ = fedov.run("fedov", cfg, ds, part, **kw)
    assert np.array_equal(lp, lp2)  # same seed, same bits
    with pytest.raises(FedFactoryError, match="fedov"):
        fedov.run("dense", cfg, ds, part, **kw)
