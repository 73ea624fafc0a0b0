"""What a module reveals about its training images, measured at the site before anything leaves it.

The site holds out a seeded share of its images from training (`holdout_split`). `audit` then
generates images of every class the module covers and measures, per class and pooled:

- **copy rate**: the share of generated images whose nearest training image is much closer than
  the second nearest, d1 / d2 < 1/3 (Gu et al., "On memorization in diffusion models"); in pixel
  L2 and in a fixed random-convolution feature space (no download, tolerant to small shifts);
- **train vs held-out**: each generated image's nearest neighbour among as many training images
  as there are held-out ones, pooled with the held-out images. A module that generalizes is no
  closer to one than to the other; `closer_to_train` is the share of generated images whose
  nearest neighbour is a training image (0.5 = no preference). Its p-value comes from permuting
  the train/held-out labels of the references: many generated images can share a few nearest
  references, so they are not independent trials (in the spirit of Meehan et al. 2020);
- **membership inference**: a loss-threshold attack. The module's per-example loss, which its kind
  declares (modules/registry.py; diffusion: the denoising loss at a few fixed noise levels, fixed
  noise per image), is lower on images it trained on; the AUC of that score, training against
  held-out images, is 0.5 when nothing leaks. A kind without one gets no attack.

Everything is seeded: the same module and images give the same audit. The site's own report of it
(closest pairs, training images) is written by audit_report.py, a layer above.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import mannwhitneyu
from sklearn.metrics import roc_auc_score

from ..modules import GenerativeModule
from ..tensors import to_float
from ..utils import derive_seed

COPY_RATIO = 1 / 3
MIN_HOLDOUT = 5                       # fewer held-out images of a class: no test, no attack for it
PERMUTATIONS = 4999                   # the closer-to-train test's resolution: p >= 1 / 5000


def holdout_split(labels: np.ndarray, fraction: float, seed: int, client_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held out): `fraction` of every class, chosen by a seed keyed on the client."""
    rng = np.random.default_rng(derive_seed(seed, client_id, "holdout"))
    train, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n = min(len(idx) - 1, int(round(len(idx) * fraction))) if fraction > 0 else 0
        held.append(idx[:n])
        train.append(idx[n:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


@torch.no_grad()
def random_features(images: np.ndarray, batch: int = 512) -> torch.Tensor:
    """A fixed random two-layer convolutional embedding (seeded, untrained), L2-normalized.

    Random convolutional features capture local structure and tolerate small shifts, which pixel
    L2 does not; they need no download and no training, so the auditor cannot be gamed by them."""
    c = images.shape[-1]
    g = torch.Generator().manual_seed(20261127)
    w1 = torch.randn(32, c, 3, 3, generator=g) / (9 * c) ** 0.5
    w2 = torch.randn(64, 32, 3, 3, generator=g) / (9 * 32) ** 0.5
    out = []
    for i in range(0, len(images), batch):
        x = to_float(images[i : i + batch])
        x = F.avg_pool2d(F.relu(F.conv2d(x, w1, padding=1)), 2)
        x = F.adaptive_avg_pool2d(F.relu(F.conv2d(x, w2, padding=1)), 4).flatten(1)
        out.append(F.normalize(x, dim=1))
    return torch.cat(out)


def pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.reshape(len(images), -1)).float().div_(255.0)


def nearest_two(query: torch.Tensor, ref: torch.Tensor, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distances to the nearest and second-nearest rows of `ref`, and the nearest's index."""
    d1, d2, i1 = [], [], []
    for i in range(0, len(query), chunk):
        d = torch.cdist(query[i : i + chunk].double(), ref.double())
        top = d.topk(min(2, d.shape[1]), dim=1, largest=False)
        d1.append(top.values[:, 0])
        d2.append(top.values[:, -1])
        i1.append(top.indices[:, 0])
    return torch.cat(d1).numpy(), torch.cat(d2).numpy(), torch.cat(i1).numpy()


def audit(module: GenerativeModule, train_x: np.ndarray, train_y: np.ndarray, held_x: np.ndarray,
          held_y: np.ndarray, samples_per_class: int, seed: int) -> tuple[dict, list]:
    """The audit of a trained module against its site's training and held-out images (uint8 NHWC), and
    its closest pairs (ratio, generated image, nearest training image), closest first, for the site's report."""
    per_class, pooled = {}, {"copy": [], "copy_feat": [], "nn_counts": [], "is_train": [], "in": [], "out": []}
    worst = []  # (ratio, generated image, nearest training image), for the site's own report
    rng = np.random.default_rng(derive_seed(seed, module.client_id, "audit"))
    attack = module.per_example_loss  # a kind's own per-image loss (modules/registry.py), or None: no attack
    for c in module.classes:
        tx, hx = train_x[train_y == c], held_x[held_y == c]
        gen = module.sample(c, samples_per_class, seed=derive_seed(seed, "audit", module.client_id, c))
        row = {"generated": len(gen), "train": len(tx), "held_out": len(hx)}
        d1, d2, nn = nearest_two(pixels(gen), pixels(tx))
        ratio = d1 / np.maximum(d2, 1e-12)
        f1, f2, _ = nearest_two(random_features(gen), random_features(tx))
        row["copy_rate"] = float(np.mean(ratio < COPY_RATIO))
        row["copy_rate_features"] = float(np.mean(f1 / np.maximum(f2, 1e-12) < COPY_RATIO))
        row["median_nn_train"] = float(np.median(d1))
        pooled["copy"].append(ratio < COPY_RATIO)
        pooled["copy_feat"].append(f1 / np.maximum(f2, 1e-12) < COPY_RATIO)
        worst += [(float(r), gen[i], tx[nn[i]]) for i, r in zip(np.argsort(ratio)[:8], np.sort(ratio)[:8])]
        if len(hx) >= MIN_HOLDOUT:
            sub = rng.choice(len(tx), size=min(len(hx), len(tx)), replace=False)
            refs = np.concatenate([tx[sub], hx])
            is_train = np.r_[np.ones(len(sub), bool), np.zeros(len(hx), bool)]
            _, _, nearest = nearest_two(pixels(gen), pixels(refs))
            row["closer_to_train"] = float(np.mean(is_train[nearest]))
            pooled["nn_counts"].append(np.bincount(nearest, minlength=len(refs)))
            pooled["is_train"].append(is_train)
            if attack is not None:
                members = np.asarray(attack(tx[sub], np.full(len(sub), c), seed), np.float64)
                others = np.asarray(attack(hx, np.full(len(hx), c), seed), np.float64)
                row["mia_auc"] = auc(members, others)
                pooled["in"].append(members)
                pooled["out"].append(others)
        per_class[str(c)] = row
    result = {"samples_per_class": samples_per_class, "copy_ratio": round(COPY_RATIO, 4),
              "copy_rate": float(np.mean(np.concatenate(pooled["copy"]))),
              "copy_rate_features": float(np.mean(np.concatenate(pooled["copy_feat"])))}
    if pooled["nn_counts"]:
        result["closer_to_train"], result["train_vs_held_out_p"] = closer_to_train_test(
            pooled["nn_counts"], pooled["is_train"], rng)
    if pooled["in"]:
        members, others = np.concatenate(pooled["in"]), np.concatenate(pooled["out"])
        result["mia_auc"] = auc(members, others)
        result["mia_p"] = float(mannwhitneyu(members, others, alternative="less").pvalue)
        result.update(module.per_example_loss_info)
    result["per_class"] = per_class
    worst.sort(key=lambda t: t[0])
    return result, worst[:16]


def closer_to_train_test(nn_counts: list[np.ndarray], is_train: list[np.ndarray], rng: np.random.Generator):
    """The share of generated images whose nearest reference is a training image, and its one-sided
    p-value under the null that the train/held-out labels of each class's references are exchangeable."""
    n = sum(c.sum() for c in nn_counts)
    observed = sum(c @ t for c, t in zip(nn_counts, is_train)) / n
    null = np.zeros(PERMUTATIONS)
    for counts, labels in zip(nn_counts, is_train):
        perms = rng.permuted(np.tile(labels, (PERMUTATIONS, 1)), axis=1)
        null += perms @ counts / n
    return float(observed), float((1 + np.sum(null >= observed - 1e-12)) / (PERMUTATIONS + 1))


def auc(member_losses: np.ndarray, other_losses: np.ndarray) -> float:
    """The loss-threshold attack's AUC: members are guessed where the loss is low."""
    y = np.r_[np.ones(len(member_losses)), np.zeros(len(other_losses))]
    return float(roc_auc_score(y, -np.r_[member_losses, other_losses]))


def verdict(result: dict, policy: dict) -> list[str]:
    """Why the module must not leave the site (empty: it may), with what to try."""
    reasons = []
    if result["copy_rate"] > policy["max_copy_rate"]:
        reasons.append(f"copy rate {result['copy_rate']:.3f} > privacy.max_copy_rate {policy['max_copy_rate']}: "
                       "generated images are near-copies of training images")
    p = result.get("train_vs_held_out_p")
    if p is not None and p < policy["significance"] and result["closer_to_train"] > policy["max_closer_to_train"]:
        reasons.append(f"{result['closer_to_train']:.3f} of generated images are closer to a training than to a held-out "
                       f"image > privacy.max_closer_to_train {policy['max_closer_to_train']} (p = {p:.2g})")
    a, p = result.get("mia_auc"), result.get("mia_p")
    if a is not None and a > policy["max_mia_auc"] and p < policy["significance"]:
        reasons.append(f"membership inference AUC {a:.3f} > privacy.max_mia_auc {policy['max_mia_auc']} "
                       f"(p = {p:.2g}): the module's loss tells its training images apart")
    return reasons


ADVICE = ("what to try: a smaller module.budget_images (fewer passes over the same images), "
          "differential privacy (privacy.epsilon), or more images at this site")
