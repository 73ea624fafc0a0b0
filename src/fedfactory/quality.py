"""A quality report for every generative module, measured against the real test images of its class.

All numbers are computed in the feature space of a classifier trained on the run's real training
data (the mean-pooled output of the ResNet's `layers`, the input of its `head`): no Inception
network, nothing to download. Per (module, class):

- fid: the Fréchet distance between Gaussians fitted to the synthetic and the real features
  (Heusel et al. 2017, in our feature space, so not comparable with published FIDs). 0 for
  identical statistics; lower is closer.
- precision / recall (Kynkäänniemi et al. 2019), with k nearest neighbours: precision is the
  share of synthetic images inside the real manifold (fidelity), recall the share of real
  images inside the synthetic manifold (diversity). Both in [0, 1], higher is better.
- density / coverage (Naeem et al. 2020): versions robust to outliers. Density counts how many
  real neighbourhoods hold each synthetic image, divided by k (about 1 when the two match; can
  exceed 1); coverage is the share of real images whose neighbourhood holds a synthetic image.

The test images only measure: they never select, filter or train anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import warnings

import numpy as np
import scipy.linalg
import torch

from .config import Config
from .classify import predict_log_proba, train_classifier
from .tensors import to_float
from .utils import derive_seed

METRICS = ("fid", "precision", "recall", "density", "coverage")


@torch.no_grad()
def features(net: torch.nn.Module, images: np.ndarray, device="cpu", bf16: bool = False,
             batch: int = 512) -> np.ndarray:
    """Penultimate features (the input of `net.head`) of uint8 N x H x W x C images, float64 N x D.

    The input conversion and batching are predict_log_proba's; a hook on the head reads its input,
    so whatever the forward pass does before the head (e.g. downsampling large inputs) is kept.
    """
    net.eval()
    out: list[np.ndarray] = []
    hook = net.head.register_forward_pre_hook(lambda _m, args: out.append(args[0].double().cpu().numpy()))
    try:
        for i in range(0, len(images), batch):
            x = to_float(images[i : i + batch]).to(device)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                net(x)
    finally:
        hook.remove()
    if not out:
        return np.zeros((0, net.head.in_features))
    return np.concatenate(out)


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N x D) and b (M x D):
    ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), as the standard FID code computes it."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # a singular product warns: it is handled here
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all() or (np.iscomplexobj(covmean)
                                              and not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)):
            # A singular product (fewer images than dimensions, dead features): regularise.
            offset = np.eye(len(s1)) * eps
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)  # numerical error leaves tiny imaginary parts
    diff = mu1 - mu2
    return float(max(0.0, diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)))


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage with k nearest neighbours (the `prdc` package)."""
    from prdc import compute_prdc

    with contextlib.redirect_stdout(io.StringIO()):  # compute_prdc prints the set sizes
        r = compute_prdc(real_features=real, fake_features=fake, nearest_k=k)
    return {m: float(r[m]) for m in ("precision", "recall", "density", "coverage")}


def compare(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict:
    """All metrics of one synthetic feature set against one real one, to 4 significant digits;
    None metrics and a reason when either set has fewer than k + 2 images: each image's k-th
    neighbour radius is taken among the others, so prdc needs k + 1 others (a module that holds a
    handful of images of a class, under a Dirichlet partition, draws only a few of it)."""
    out = {"synthetic": int(len(fake)), "real": int(len(real))}
    if min(len(real), len(fake)) < k + 2:
        return {**dict.fromkeys(METRICS), **out,
                "reason": f"needs at least k + 2 = {k + 2} real and synthetic images"}
    vals = {"fid": frechet_distance(fake, real), **prdc(real, fake, k)}
    return {**{m: float(f"{vals[m]:.4g}") for m in METRICS}, **out}  # significant digits: a FD may be small


# many parameters because it takes the synthetic and the real images as plain arrays (a SyntheticSet's
# fields, a test set's), and the measure's settings (k, max_images, seed) as keywords with defaults
def module_quality(net: torch.nn.Module, synth_images: np.ndarray, synth_labels: np.ndarray, sources: list[dict],
                   test_images: np.ndarray, test_labels: np.ndarray, device="cpu", bf16: bool = False, k: int = 5,
                   max_images: int = 1000, seed: int = 0) -> dict:
    """{client: {str(class): metrics}} for every draw in `sources` (a SyntheticSet's, in draw order).

    Each draw's first `max_images` synthetic images (no selection) are compared with the real test
    images of its class, at most `max_images` of them: a seeded random subset when there are more,
    the same for every module of that class. Each class's real features are computed once.
    """
    if sum(int(s["n"]) for s in sources) != len(synth_images) or len(synth_labels) != len(synth_images):
        raise ValueError("sources do not describe the synthetic images: their counts differ")
    test_labels = np.asarray(test_labels)
    real_feats: dict[int, np.ndarray] = {}

    def real_features(c: int) -> np.ndarray:
        if c not in real_feats:
            idx = np.flatnonzero(test_labels == c)
            if len(idx) > max_images:
                rng = np.random.default_rng(derive_seed(seed, "quality", c))
                idx = np.sort(rng.choice(idx, max_images, replace=False))
            real_feats[c] = features(net, test_images[idx], device, bf16)
        return real_feats[c]

    report: dict[str, dict[str, dict]] = {}
    start = 0
    for s in sources:
        c, n = int(s["class"]), int(s["n"])
        if not np.all(synth_labels[start : start + n] == c):
            raise ValueError(f"draw of client {s['client']}, class {c}: its images carry other labels")
        fake = features(net, synth_images[start : start + min(n, max_images)], device, bf16)
        start += n
        report.setdefault(str(s["client"]), {})[str(c)] = compare(real_features(c), fake, k)
    return report


NOTE = ("Each module's synthetic images against the real test images of its class, in the features of a "
        "reference classifier trained on the run's real training data. The test images only measure: they "
        "select, filter or train nothing.")


def train_reference(cfg: Config, images: np.ndarray, labels: np.ndarray, num_classes: int, kw: dict):
    """The feature network: the run's classifier recipe on the real training data, for
    quality.reference_budget images (a simulated federation has them; a real server does not)."""
    recipe = dataclasses.replace(cfg.classifier, budget_images=cfg.quality.reference_budget)
    return train_classifier(images, labels, num_classes, recipe, cfg.seed, "reference", **kw)


def quality_report(cfg: Config, reference, synth, test, kw: dict) -> dict:
    """results.json's `quality` block: the reference's own test accuracy (how good its features
    are) and every module's metrics."""
    q = cfg.quality
    accuracy = float((predict_log_proba(reference, test.images, kw["device"], kw["bf16"]).argmax(1)
                      == test.labels).mean())
    modules = module_quality(reference, synth.images, synth.labels, synth.sources, test.images, test.labels,
                             kw["device"], kw["bf16"], q.k, q.max_images, cfg.seed)
    # With the classifier's own budget the reference is centralized training of the same classifier
    # in the same run: the bound that server mode is measured against.
    centralized = q.reference_budget == cfg.classifier.budget_images
    return {"note": NOTE, "reference": {"budget_images": q.reference_budget, "test_accuracy": round(accuracy, 4),
                                        "centralized": centralized},
            "k": q.k, "modules": modules}
