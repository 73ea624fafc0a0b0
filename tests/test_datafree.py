"""DENSE and Co-Boosting (baselines/datafree.py): each mechanism does what its paper says, at toy size."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedfactory.baselines import datafree, run_baseline
from fedfactory.classify import train_classifier
from fedfactory.config import load_config
from fedfactory.errors import FedFactoryError
from fedfactory.runners.common import prepare_data
from helpers import TINY_CLASSIFIER, toy_overrides


@pytest.fixture(scope="module")
def toy(digits_npz):
    """The toy federation (four sites of one digit each, 8 x 8 px), its student budget cut to 256 images."""
    cfg = load_config(None, [*toy_overrides(digits_npz), "classifier.budget_images=256", "runtime.bf16='off'",
                             "runtime.device='cpu'", "runtime.threads=1"])
    ds, part = prepare_data(cfg)
    return cfg, ds, part


def fresh_bn_loss(server, n=64):
    """The ensemble's BatchNorm-statistics loss on a fresh batch of the generator's images."""
    z, _ = server.sample(n)
    with torch.no_grad(), datafree.bn_statistics(server.nets) as terms:
        server.site_logits(server.generator(z))
    return float(torch.stack(terms).sum())


def test_dense_generator_matches_the_site_models_batchnorm_statistics(toy):
    """30 generator steps bring the fresh samples' BatchNorm loss under half its start (without the
    term, CE and the adversarial term alone leave it above 0.8 of it)."""
    cfg, ds, part = toy
    # two sites trained 50 steps: after 12, running statistics lag the weights and leave a floor no input reaches
    recipe = dataclasses.replace(TINY_CLASSIFIER, budget_images=16 * 50)
    nets = [train_classifier(ds.x_train[idx], ds.y_train[idx], ds.num_classes, recipe, cfg.seed, f"local-{cid}",
                             progress=False)[0] for cid, idx in list(part.indices.items())[:2]]
    server = datafree.make_server("dense", nets, ds, cfg, "cpu", False, dataclasses.replace(datafree.DENSE, batch=32))
    before = fresh_bn_loss(server)
    _, _, log = server.synthesize(30)
    after = fresh_bn_loss(server)
    assert after < 0.5 * before, (before, after)
    assert float(log[-1]["bn"]) < 0.5 * float(log[0]["bn"])


def test_coboosting_weighs_up_the_samples_the_ensemble_gets_wrong_or_is_unsure_of():
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    logits = torch.tensor([[6.0, 0, 0], [0, 6.0, 0], [0, 0, 6.0],      # right and sure
                           [1.0, 0.8, 0], [0.5, 0.6, 0.4],             # right, unsure
                           [6.0, 0, 0], [0, 0, 6.0], [6.0, 0, 0]])     # wrong
    w = datafree.hard_weights(logits, y, datafree.COBOOSTING.hard)
    sure, unsure, wrong = w[:3], w[3:5], w[5:]
    assert wrong.min() > unsure.max() and unsure.min() > 2 * sure.max(), w
    assert torch.equal(datafree.hard_weights(logits, y, datafree.DENSE.hard), torch.ones(8))  # DENSE: plain CE


def test_coboosting_ensemble_weights_move_to_the_site_models_right_on_the_synthetic_data():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (64,), generator=gen)
    right, wrong = 4.0 * F.one_hot(y, 4).float(), 4.0 * F.one_hot((y + 1) % 4, 4).float()
    logits = torch.stack([right, wrong, torch.randn(64, 4, generator=gen)])  # K x N x C: right, wrong, guessing
    w = torch.full((3,), 1 / 3)
    for e in range(5):
        w = datafree.reweight(w, logits, y, datafree.COBOOSTING.mu * datafree.COBOOSTING.mu_decay**e)
    assert w[0] > 1 / 3 > w[1], w


@pytest.mark.parametrize("method", ["dense", "coboosting"])
def test_end_to_end_on_the_toy_federation_with_the_same_bits_twice(toy, method):
    cfg, ds, part = toy
    runs = [run_baseline(method, cfg, ds, part) for _ in range(2)]
    (lp, info), (lp2, info2) = runs
    assert lp.shape == (len(ds.y_test), ds.num_classes) and lp.dtype == np.float64
    assert np.allclose(np.exp(lp).sum(1), 1.0)
    assert np.array_equal(lp, lp2) and info["curves"] == info2["curves"]
    assert info["ensemble_weights"] == info2["ensemble_weights"]
    # the second run reuses the sites' classifiers (as local-only, dense and coboosting do in one compare),
    # copies that the first run's distillation left untouched: the same bits
    assert info2["reused_site_training_seconds"] > 0
    assert info["rounds"] == 1 and info["downloaded_bytes"] == 0
    assert info["uploaded_bytes"] > 0 and info["uploaded_bytes"] % len(part.indices) == 0  # one classifier each
    series = {row["series"] for row in info["curves"]}
    assert {"generator", "generator/bn", "student", *(f"site/{cid}" for cid in part.indices)} <= series
    assert all(np.isfinite(row["loss"]) for row in info["curves"])
    assert info["student_images"] <= cfg.classifier.budget_images
    json.dumps(info)  # the run folder's results.json takes it as it is
    weights = np.array(list(info["ensemble_weights"].values()))
    assert np.allclose(weights, 1 / len(weights)) == (method == "dense")  # only Co-Boosting learns them


def test_refuses_a_method_it_does_not_run_and_an_empty_federation(toy):
    cfg, ds, part = toy
    kw = dict(augment_policy="natural", device="cpu", bf16=False, progress=False)
    with pytest.raises(FedFactoryError, match="not 'fedavg'"):
        datafree.run("fedavg", cfg, ds, part, **kw)
    with pytest.raises(FedFactoryError, match="no sites"):
        datafree.run("dense", cfg, ds, type(part)(part.scheme, part.num_classes, {}, {}), **kw)
