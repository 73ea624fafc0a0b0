import numpy as np
import pytest
import torch

from fedfactory.classify import build_classifier, predict_log_proba
from fedfactory.quality import compare, features, frechet_distance, module_quality, prdc

KEYS = {"fid", "precision", "recall", "density", "coverage", "synthetic", "real"}


def test_frechet_identical_is_zero_and_mean_shift_is_its_square():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5000, 4))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    for shift in (0.5, 1.0, 3.0):
        mu = np.full(4, shift)
        assert frechet_distance(a, a + mu) == pytest.approx(mu @ mu, rel=1e-6, abs=1e-6)
        # Independent samples of N(0, I) and N(mu, I): the closed form ||mu1 - mu2||^2, up to sampling noise.
        b = rng.normal(size=(20000, 4)) + mu
        m = a.mean(0) - b.mean(0)
        assert frechet_distance(a, b) == pytest.approx(m @ m, abs=0.01)
        # The sample means' error moves it by 2 mu.e, sd about 0.06 |mu| here: 4 sd.
        assert frechet_distance(a, b) == pytest.approx(mu @ mu, abs=0.25 * np.sqrt(mu @ mu))
    d = [frechet_distance(a, a + s) for s in (0.1, 0.5, 1, 2)]
    assert d == sorted(d)


def test_frechet_scaled_covariance_closed_form():
    # S vs 4 S, equal means: tr(S + 4 S - 2 * 2 S) = tr(S), about D for N(0, I).
    rng = np.random.default_rng(1)
    a = rng.normal(size=(50000, 3))
    a -= a.mean(0)
    assert frechet_distance(a, 2 * a) == pytest.approx(np.trace(np.cov(a, rowvar=False)), rel=1e-6)


def test_frechet_singular_covariance_is_finite():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(4, 16)), rng.normal(size=(5, 16))  # fewer points than dimensions
    a[:, 3] = 0  # a dead feature too
    d = frechet_distance(a, b)
    assert np.isfinite(d) and d > 0


def test_prdc_identical_disjoint_and_by_hand():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 8))
    same = prdc(a, a, k=5)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    far = prdc(a, a + 1000.0, k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    # Real points 0..9 on a line, k = 1: every ball has radius 1 (open), so each real point's ball holds
    # only itself. Fakes at 0, 0.5, 20: 0 is in ball 0; 0.5 in balls 0 and 1; 20 in none.
    real = np.arange(10.0)[:, None]
    fake = np.array([[0.0], [0.5], [20.0]])
    r = prdc(real, fake, k=1)
    assert r["precision"] == pytest.approx(2 / 3)
    assert r["density"] == pytest.approx((1 + 2 + 0) / 3)
    assert r["coverage"] == pytest.approx(2 / 10)  # reals 0 and 1 have a fake within radius 1
    # Fake radii (k = 1): 0 -> 0.5, 0.5 -> 0.5, 20 -> 19.5; the ball of 20 holds reals 1..9 (|r - 20| < 19.5).
    assert r["recall"] == pytest.approx(10 / 10)


@pytest.mark.parametrize("n", [5, 6])
def test_compare_too_few_images_gives_none_with_reason(n):
    # 6 = k + 1 images crashed prdc (its radii need k + 1 neighbours besides the image itself): a
    # dirichlet:0.1 run lost its results to it after the classifier had trained
    rng = np.random.default_rng(0)
    r = compare(rng.normal(size=(30, 4)), rng.normal(size=(n, 4)), k=5)
    assert all(r[m] is None for m in ("fid", "precision", "recall", "density", "coverage"))
    assert r["synthetic"] == n and r["real"] == 30 and "k + 2" in r["reason"]
    r = compare(rng.normal(size=(n, 4)), rng.normal(size=(30, 4)), k=5)
    assert r["fid"] is None and "reason" in r


def test_compare_measures_from_k_plus_2_images():
    rng = np.random.default_rng(0)
    r = compare(rng.normal(size=(7, 4)), rng.normal(size=(7, 4)), k=5)
    assert "reason" not in r and all(r[m] is not None for m in ("fid", "precision", "recall", "density", "coverage"))


def _real(rng, c, n, size=12):
    """Class 0: a bright horizontal bar, class 1: a vertical one, at random places on a dark ground."""
    x = rng.integers(0, 30, (n, size, size, 1)).astype(np.uint8)
    for i in range(n):
        p, b = rng.integers(1, size - 3), rng.integers(180, 255)
        if c == 0:
            x[i, p : p + 2, 1:-1] = b
        else:
            x[i, 1:-1, p : p + 2] = b
    return x


def _net():
    torch.manual_seed(0)
    return build_classifier(1, 2, "cpu", width=8).eval()


def test_features_are_the_head_input():
    net, x = _net(), _real(np.random.default_rng(0), 0, 7)
    f = features(net, x, batch=3)
    assert f.dtype == np.float64 and f.shape == (7, net.head.in_features)
    logits = net.head(torch.from_numpy(f).float()).double()
    np.testing.assert_allclose(torch.log_softmax(logits, 1).detach().numpy(), predict_log_proba(net, x), atol=1e-5)
    assert features(net, x[:0]).shape == (0, net.head.in_features)


def test_module_quality_flags_the_worse_module():
    rng = np.random.default_rng(0)
    test_x = np.concatenate([_real(rng, 0, 60), _real(rng, 1, 50)])
    test_y = np.repeat([0, 1], [60, 50])
    blocks, sources = [], []
    for c in (0, 1):
        for client, n in (("good", 40), ("noise", 30), ("tiny", 3)):
            blocks.append(rng.integers(0, 256, (n, 12, 12, 1), dtype=np.uint8) if client == "noise"
                          else _real(rng, c, n))
            sources.append({"client": client, "class": c, "n": n, "seed": 0})
    synth_x = np.concatenate(blocks)
    synth_y = np.repeat([s["class"] for s in sources], [s["n"] for s in sources])
    net = _net()
    kw = dict(k=5, max_images=35, seed=3)
    rep = module_quality(net, synth_x, synth_y, sources, test_x, test_y, **kw)
    assert set(rep) == {"good", "noise", "tiny"}
    for client in rep:
        assert set(rep[client]) == {"0", "1"}
    for c in ("0", "1"):
        good, noise, tiny = rep["good"][c], rep["noise"][c], rep["tiny"][c]
        assert set(good) == set(noise) == KEYS
        assert good["synthetic"] == 35 and noise["synthetic"] == 30 and good["real"] == 35  # capped at max_images
        assert good["fid"] < noise["fid"] and good["precision"] > noise["precision"]
        assert good["precision"] - noise["precision"] > 0.5
        assert good["density"] > noise["density"] and good["coverage"] > noise["coverage"]
        assert tiny["fid"] is None and tiny["synthetic"] == 3 and "reason" in tiny
        assert all(isinstance(good[m], float) and float(f"{good[m]:.4g}") == good[m] for m in ("fid", "precision"))
    assert module_quality(net, synth_x, synth_y, sources, test_x, test_y, **kw) == rep  # deterministic
    # A class with no real test images: None metrics, no crash.
    none = module_quality(net, synth_x, synth_y, sources, test_x[:60], test_y[:60], **kw)
    assert none["good"]["1"]["fid"] is None and none["good"]["1"]["real"] == 0
    with pytest.raises(ValueError):
        module_quality(net, synth_x[:-1], synth_y[:-1], sources, test_x, test_y)
