"""FedCVAE-Ens and FedCVAE-KD (baselines/fedcvae.py) at toy size: KD's distilled decoder reproduces each
site's decoder on that site's classes, Ens samples in the sites' label proportions, and both methods
run end to end through run_baseline, the same bits twice."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedfactory import baselines
from fedfactory.baselines import fedcvae
from fedfactory.config import load_config
from fedfactory.errors import FedFactoryError
from fedfactory.runners.common import prepare_data
from helpers import toy_overrides

# the paper's recipe, smaller: 10 epochs a site (paper: 25), 800 synthetic images, 4 epochs of 1,000 to distil
SMALL = fedcvae.Budgets(site_epochs=10, synthetic_images=800, distill_samples=1000, distill_epochs=4)


@pytest.fixture(scope="module")
def toy(digits_npz):
    cfg = load_config(None, [*toy_overrides(digits_npz), "runtime.device='cpu'"])
    return (cfg, *prepare_data(cfg))


def context(ds, budgets=SMALL):
    return fedcvae.Context("fedcvae-kd", 0, budgets, torch.device("cpu"), False, False, ds.num_classes,
                           ds.image_shape)


def test_kd_server_decoder_reproduces_each_site_decoder_on_its_own_classes(toy):
    _, ds, _ = toy
    ctx = context(ds)
    server = fedcvae.new_decoder(ctx, "server")
    initial, init = copy.deepcopy(server), fedcvae.decoder_state(server)
    halves = {"a": np.isin(ds.y_train, [0, 1]), "b": np.isin(ds.y_train, [2, 3])}
    sites = [fedcvae.fit_site(ctx, cid, ds.x_train[m], ds.y_train[m], init)[0] for cid, m in halves.items()]
    rows = fedcvae.distill(ctx, server, sites)
    assert rows and rows[-1]["loss"] < rows[0]["loss"]
    for site, other in zip(sites, sites[::-1]):
        labels, z = fedcvae.draw(ctx, site.pmf, 400, ctx.budgets.z_width_kd, "probe", site.cid)
        with torch.no_grad():
            target = fedcvae.decode(ctx, site.net, z, labels)
            mse = {name: F.mse_loss(fedcvae.decode(ctx, net, z, labels), target).item()
                   for name, net in (("distilled", server), ("initial", initial), ("other site", other.net))}
        assert mse["distilled"] < 0.2 * min(mse["initial"], mse["other site"]), (site.cid, mse)


def test_ens_samples_each_site_in_its_label_proportions(toy):
    _, ds, _ = toy
    ctx = context(ds, fedcvae.Budgets(synthetic_images=4000))
    # site a: 40 images of classes 0 and 1 in 3:1; site b: 20 of class 2. Untrained decoders: labels only.
    sites = [fedcvae.Site("a", fedcvae.new_decoder(ctx, "a"), np.array([30, 10, 0, 0])),
             fedcvae.Site("b", fedcvae.new_decoder(ctx, "b"), np.array([0, 0, 20, 0]))]
    x, y = fedcvae.synthesize_ens(ctx, sites)
    counts = np.bincount(y, minlength=4)
    assert x.shape == (4000, *ds.image_shape) and x.dtype == np.uint8
    assert counts[2] == 1333 and counts[3] == 0  # shares by data size: 2667 and 1333
    assert counts[0] + counts[1] == 2667 and 2.6 < counts[0] / counts[1] < 3.4
    assert fedcvae.split(10, [1, 1, 1]).tolist() == [4, 3, 3]


@pytest.mark.parametrize("method", fedcvae.METHODS)
def test_run_end_to_end_is_repeatable(toy, method, monkeypatch):
    cfg, ds, part = toy
    monkeypatch.setattr(fedcvae, "BUDGETS", SMALL)
    log_proba, info = baselines.run_baseline(method, cfg, ds, part)
    assert log_proba.shape == (len(ds.y_test), ds.num_classes) and log_proba.dtype == np.float64
    assert np.allclose(np.exp(log_proba).sum(1), 1)
    assert (log_proba.argmax(1) == ds.y_test).mean() > 2 / ds.num_classes  # chance: 1/4
    size, sites = info["decoder_bytes"], len(part.indices)
    assert info["rounds"] == 1 and info["uploaded_bytes"] == sites * (size + 8 * ds.num_classes)
    assert info["downloaded_bytes"] == (sites * size if method == "fedcvae-kd" else 0)
    series = {r["series"] for r in info["curves"]}
    assert series >= {f"module/{c}" for c in part.indices} | {f"classifier/{method}"}
    assert ("distill" in series) == (method == "fedcvae-kd")
    json.dumps(info)
    again, _ = baselines.run_baseline(method, cfg, ds, part)
    assert np.array_equal(log_proba, again)


def test_bad_input_is_refused(toy):
    cfg, ds, part = toy
    kw = dict(augment_policy="none", device=torch.device("cpu"), bf16=False, progress=False)
    with pytest.raises(FedFactoryError, match="not 'fedcvae'"):
        fedcvae.run("fedcvae", cfg, ds, part, **kw)
    empty = copy.deepcopy(part)
    empty.indices["client-0"] = empty.indices["client-0"][:0]
    with pytest.raises(FedFactoryError, match="needs training images"):
        fedcvae.run("fedcvae-ens", cfg, ds, empty, **kw)
    with pytest.raises(FedFactoryError, match="budgets"):
        fedcvae.run("fedcvae-ens", cfg, ds, part, **kw, budgets=fedcvae.Budgets(latent=0))
