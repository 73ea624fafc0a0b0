"""FedOV: one-shot federated learning by voting of open-set site classifiers.

Diao, Li and He, "Towards Addressing Label Skews in One-Shot Federated Learning", ICLR 2023
(code: github.com/Xtra-Computing/FedOV). Under label skew a site's classifier maps every image to one
of the classes it has seen, so a plain vote of the sites' classifiers is drowned by confident votes
from sites that never saw the image's class. FedOV gives each site's classifier K + 1 outputs, the
last one "unknown", and trains it on outliers the site makes from its own images:

  site i, each step on a batch (x, y) of its images, U = K the unknown index:
    x_dd  = DD(x)                                data destruction: each image, one of
                                                 zoom (a crop of 10-33% of the area, resized to full size),
                                                 strong blur (a box of 3-9 x 1-5 px: the code's Gaussian at
                                                 sigma 10-100, flat over its taps), erase (33-50% of the area
                                                 set to 0), cut (a half-width strip copied over another, or the
                                                 halves swapped, along either axis), rotate (two squares of a
                                                 half-height band turned by 90, 180 or 270 degrees); picked
                                                 1:1:1:2:2 as the code's list holds cut and rotate twice
    x_adv = x_dd + sum_t alpha sign(grad_x CE(f(x_t), U))   AOE: adversarial outlier enhancement,
                                                 t = 1..5, L-inf within epsilon of x_dd: the outliers pushed
                                                 towards the known classes, which the unknown must still claim
    L = CE(f(x), y) + CE(f(x_dd), U) + CE(f(x_adv), U) + CE(f(x) with class y masked out, U)
  the last term (the code's, after PROSER's classifier placeholder) makes "unknown" the runner-up on
  the site's own images, so the unknown logit sits on the boundary of the known classes.

The server keeps the sites' classifiers and votes with their softmax over K + 1 outputs:
    p(c | x) ∝ sum_i p_i(c | x),  c < K
each site's vote on the known classes has mass 1 - p_i(U | x): a site that calls x unknown abstains
(the code's `compute_accuracy_vote_soft` with every site voting, the setting its distillation uses).

Where ours differs from the paper:
  * network and budget: the run's classifier (`classifier.preset`, `width`) with K + 1 outputs, trained
    from scratch with the run's recipe (optimizer, lr, schedule, weight decay, batch size, augmentation,
    blur, EMA) for `classifier.budget_images` real images per site, drawn class-balanced, as local-only
    trains its experts. Each step also sees as many DD and AOE outliers (one forward pass on the three
    parts concatenated, as the code's ResNet variant does for BatchNorm) and runs the attack's 5
    forward-backward passes, so a FedOV site costs several times a local-only site. The code's run.sh
    trains its small CNN with Adam (lr 1e-3, batch 64) for 200 local epochs, 10 parties.
  * label smoothing and mixup of the recipe are not applied: smoothing would put mass on the unknown
    class for real images, and a blend of images is the unknown's business (PROSER's data placeholder).
  * left out: the code's data placeholder (manifold mixup of two images' embeddings labelled unknown,
    weight 0.01), which needs the network split in two; CutPaste outliers (commented out in the code);
    and the optional server-side distillation, which the code runs on half of the test set.
  * the DD operations are batched tensor ops with the run's seeded generator (same bits on the CPU);
    the blur pads by replicating the border, torchvision's by reflection; images are in [-1, 1], so the
    attack's step and bound are twice the code's on [0, 1], and an erased patch (0) is mid-grey.
  * seeds: derive_seed(cfg.seed, "fedov", site, "init" | "batches" | "augment"); the outliers draw from
    the augmentation's generator.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..classify import build_classifier, predict_log_proba
from ..classify.augment import augment
from ..classify.train import _balanced_batches, _ema_copy, _optimizer, cross_entropy
from ..config import ClassifierConfig, Config
from ..data import Dataset, Partition
from ..errors import FedFactoryError
from ..tensors import to_model
from ..utils import LossCurve, derive_seed, ema_step
from .averaging import state_bytes


@dataclass(frozen=True)
class FedOVParams:
    """The paper's code's settings (experiments.py, attack.py), on images in [-1, 1]."""

    adv_steps: int = 5          # AOE: iterations of the untargeted sign-gradient attack (0 = no AOE)
    adv_alpha: float = 0.004    # step per iteration (the code's 0.002 on [0, 1] pixels)
    adv_epsilon: float = 1.0    # L-inf bound around the DD outlier (the code's 0.5 on [0, 1])
    placeholder: float = 1.0    # weight of the classifier placeholder term (unknown as runner-up)


FEDOV = FedOVParams()
ZOOM_AREA, ERASE_AREA, ERASE_RATIO = (0.1, 0.33), (0.33, 0.5), (0.3, 3.3)
OP_OF_DRAW = (0, 1, 2, 3, 4, 3, 4)  # zoom, blur, erase, cut, rotate: the code's list, cut and rotate twice


# -- data destruction (DD): outliers from the site's own images -----------------------------------------

def _uniform(gen, n, low, high, device):
    return low + (high - low) * torch.rand(n, generator=gen, device=device)


def _remap(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """out[b, :, i, j] = x[b, :, rows[b, i, j], cols[b, i, j]]: moves pixels, never blends them."""
    b, c, h, w = x.shape
    src = (rows * w + cols).reshape(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, h * w).gather(2, src).reshape(b, c, h, w)


def _zoom(x, gen):
    """RandomResizedCrop(scale=(0.1, 0.33)): a small region blown up to the whole image."""
    b, dev = len(x), x.device
    area = _uniform(gen, b, *ZOOM_AREA, dev)
    ratio = torch.exp(_uniform(gen, b, math.log(3 / 4), math.log(4 / 3), dev))
    sw, sh = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    cx, cy = (_uniform(gen, b, -1, 1, dev) * (1 - sw)), (_uniform(gen, b, -1, 1, dev) * (1 - sh))
    zero = torch.zeros_like(sw)
    theta = torch.stack([torch.stack([sw, zero, cx], 1), torch.stack([zero, sh, cy], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _box_blur(x, gen):
    """A long thin blur: a box of 3-9 taps along one axis and 1-5 along the other, per image."""
    b, c, h, w = x.shape
    long = 3 + 2 * torch.randint(0, 4, (b,), generator=gen, device=x.device)
    short = 1 + 2 * torch.randint(0, 3, (b,), generator=gen, device=x.device)
    across = torch.rand(b, generator=gen, device=x.device) < 0.5
    taps = torch.arange(-4, 5, device=x.device)

    def kernel(n):  # n taps, centred, out of 9, one row per (image, channel)
        k = (taps.abs()[None] <= n[:, None] // 2).to(x.dtype)
        return (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)
    kw, kh = kernel(torch.where(across, long, short)), kernel(torch.where(across, short, long))
    y = F.pad(x, (4, 4, 4, 4), mode="replicate").reshape(1, b * c, h + 8, w + 8)
    y = F.conv2d(F.conv2d(y, kw[:, None, None, :], groups=b * c), kh[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def _erase(x, gen):
    """RandomErasing(p=1, scale=(0.33, 0.5), ratio=(0.3, 3.3), value=0): a large rectangle set to 0."""
    b, _, h, w = x.shape
    area = _uniform(gen, b, *ERASE_AREA, x.device) * h * w
    ratio = torch.exp(_uniform(gen, b, math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]), x.device))
    eh = (area * ratio).sqrt().round().clamp(1, h).long()
    ew = (area / ratio).sqrt().round().clamp(1, w).long()
    top = (torch.rand(b, generator=gen, device=x.device) * (h - eh + 1)).long()
    left = (torch.rand(b, generator=gen, device=x.device) * (w - ew + 1)).long()
    r, cc = torch.arange(h, device=x.device)[None, :, None], torch.arange(w, device=x.device)[None, None, :]
    inside = ((r >= top[:, None, None]) & (r < (top + eh)[:, None, None])
              & (cc >= left[:, None, None]) & (cc < (left + ew)[:, None, None]))
    return x.masked_fill(inside[:, None], 0.0)


def _strip_source(n: int, b: int, gen, device) -> torch.Tensor:
    """Per image, the source index along an axis of n pixels: a half-length strip at pl copied from pl2
    (|pl - pl2| >= half // 2: the code's half / 2, which no pl2 meets for some pl when half is odd), or,
    one time in three, the two halves swapped."""
    half, i = n // 2, torch.arange(n, device=device)
    pl = torch.randint(0, half, (b,), generator=gen, device=device)
    far = (torch.arange(half, device=device)[None] - pl[:, None]).abs() >= half // 2
    pl2 = torch.multinomial(far.float(), 1, generator=gen)[:, 0]
    strip = (i[None] >= pl[:, None]) & (i[None] < (pl + half)[:, None])
    copied = torch.where(strip, i[None] - pl[:, None] + pl2[:, None], i[None])
    swap = torch.rand(b, generator=gen, device=device) < 1 / 3
    return torch.where(swap[:, None], ((i + half) % n)[None], copied)


def _cut(x, gen):
    """The code's `cut`: strips copied or halves swapped, along the width or, half the time, the height."""
    b, _, h, w = x.shape
    rows, cols = _strip_source(h, b, gen, x.device), _strip_source(w, b, gen, x.device)
    along_w = (torch.rand(b, generator=gen, device=x.device) < 0.5)[:, None]
    ident_h, ident_w = torch.arange(h, device=x.device)[None], torch.arange(w, device=x.device)[None]
    rows, cols = torch.where(along_w, ident_h, rows), torch.where(along_w, cols, ident_w)
    return _remap(x, rows[:, :, None].expand(b, h, w), cols[:, None, :].expand(b, h, w))


def _rotate(x, gen):
    """The code's `rot`: in a band of s = side/2 rows, the two s x s squares side by side each turned
    by k x 90 degrees (k in 1..3, np.rot90's direction)."""
    b, _, h, w = x.shape
    s, dev = min(h, w) // 2, x.device
    top = torch.randint(0, s, (b,), generator=gen, device=dev)[:, None, None]
    k = torch.randint(1, 4, (b,), generator=gen, device=dev)[:, None, None]
    r = torch.arange(h, device=dev)[None, :, None].expand(b, h, w)
    c = torch.arange(w, device=dev)[None, None, :].expand(b, h, w)
    li, lj, off = r - top, c % s, c - c % s
    # rot90 once: out[i, j] = in[j, s-1-i]; twice: in[s-1-i, s-1-j]; three times: in[s-1-j, i]
    si = torch.where(k == 1, lj, torch.where(k == 2, s - 1 - li, s - 1 - lj))
    sj = torch.where(k == 1, s - 1 - li, torch.where(k == 2, s - 1 - lj, li))
    inside = (li >= 0) & (li < s) & (c < 2 * s)
    return _remap(x, torch.where(inside, top + si, r), torch.where(inside, off + sj, c))


def destroy(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """DD outliers: each image of the batch (N x C x H x W in [-1, 1]) through one destroying operation."""
    if min(x.shape[-2:]) < 4:
        raise FedFactoryError(f"fedov: images of {tuple(x.shape[-2:])} px are too small to cut in halves (need 4 px)")
    with torch.no_grad():
        ops = torch.stack([_zoom(x, gen), _box_blur(x, gen), _erase(x, gen), _cut(x, gen), _rotate(x, gen)])
        draw = torch.randint(0, len(OP_OF_DRAW), (len(x),), generator=gen, device=x.device)
        pick = torch.tensor(OP_OF_DRAW, device=x.device)[draw]
        return ops[pick, torch.arange(len(x), device=x.device)]


def make_outliers(x: torch.Tensor, num_classes: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """DD outliers of a batch and their label, the unknown class (index num_classes)."""
    return destroy(x, gen), torch.full((len(x),), num_classes, dtype=torch.long, device=x.device)


def enhance(net: torch.nn.Module, x: torch.Tensor, unknown: torch.Tensor, p: FedOVParams, bf16: bool) -> torch.Tensor:
    """AOE: sign-gradient ascent on the outliers' unknown loss, within p.adv_epsilon (L-inf) of them.
    The network attacked in eval mode, as the code does: no dropout, and no BatchNorm statistics moved."""
    was_training, x0 = net.training, x
    net.eval()
    for _ in range(p.adv_steps):
        x = x.detach().requires_grad_(True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = cross_entropy(net(x), unknown)
        grad, = torch.autograd.grad(loss, x)
        x = torch.minimum(torch.maximum(x + p.adv_alpha * grad.sign(), x0 - p.adv_epsilon), x0 + p.adv_epsilon)
    net.train(was_training)
    return x.detach()


def open_set_loss(net, x, y, num_classes: int, gen, p: FedOVParams, bf16: bool) -> torch.Tensor:
    """FedOV's local objective on one batch (module docstring): known, DD, AOE and placeholder terms."""
    x_dd, unknown = make_outliers(x, num_classes, gen)
    parts = [x, x_dd] + ([enhance(net, x_dd, unknown, p, bf16)] if p.adv_steps > 0 else [])
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = net(torch.cat(parts)).float()  # one pass: BatchNorm sees real images and outliers together
    real, *outliers = logits.split(len(x))
    loss = cross_entropy(real, y) + sum(cross_entropy(o, unknown) for o in outliers)
    if p.placeholder > 0:  # the true class masked out: "unknown" should come next
        loss = loss + p.placeholder * cross_entropy(real.scatter(1, y[:, None], -1e4), unknown)
    return loss


# many parameters because the runtime's settings (augment policy, device, bf16, progress) come as keywords
# beside the data, the recipe and FedOV's own settings, as train_classifier takes them
def train_open_set(images: np.ndarray, labels: np.ndarray, num_classes: int, cfg: ClassifierConfig, seed: int,
                   cid: str, p: FedOVParams = FEDOV, *, augment_policy: str = "natural", device="cpu",
                   bf16: bool = False, progress: bool = True) -> tuple[torch.nn.Module, dict, list[tuple[int, float]]]:
    """A site's open-set classifier (num_classes + 1 outputs), trained from scratch for cfg.budget_images
    real images drawn class-balanced, each batch with fresh outliers. Returns the network (eval mode),
    its stats and its loss curve (utils.LossCurve's points)."""
    if len(images) == 0:
        raise FedFactoryError(f"fedov: site {cid} holds no training images")
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "fedov", cid, "init"))
        net = build_classifier(images.shape[-1], num_classes + 1, cfg.preset, cfg.width).to(device)
    batch, steps = int(cfg.batch_size), max(1, math.ceil(cfg.budget_images / cfg.batch_size))
    opt, sched = _optimizer(net, cfg, steps, device)
    rng = np.random.default_rng(derive_seed(seed, "fedov", cid, "batches"))
    gen = torch.Generator(device).manual_seed(derive_seed(seed, "fedov", cid, "augment"))
    ema, ema_tensors, net_tensors = _ema_copy(net, float(cfg.ema_halflife_images))
    pixels = torch.from_numpy(np.require(images, requirements=["C", "W"])).to(device)
    y_all = torch.from_numpy(np.asarray(labels, np.int64)).to(device)
    net.train()
    t0, curve = time.perf_counter(), LossCurve(steps, batch)
    bar = tqdm(range(steps), desc=f"fedov {cid}", unit="step", disable=None if progress else True, leave=False)
    for step, idx in zip(bar, _balanced_batches(labels, num_classes, rng, steps, batch, device)):
        x = augment(to_model(pixels[idx]), augment_policy, gen, cfg.blur)
        loss = open_set_loss(net, x, y_all[idx], num_classes, gen, p, bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            ema_step(ema_tensors, net_tensors, batch, (step + 1) * batch, float(cfg.ema_halflife_images))
        loss = loss.detach().double()
        curve.add(step, loss)
    bar.close()
    final_loss, points = curve.read(loss)  # waits for the device's queued work: the wall time is true
    stats = {"train_seconds": round(time.perf_counter() - t0, 2), "images_seen": steps * batch,
             "final_loss": round(final_loss, 4)}
    return (ema if ema is not None else net).eval(), stats, points


def vote(log_probas: list[np.ndarray], num_classes: int) -> np.ndarray:
    """The server's vote: log of sum_i p_i(c | x) over the known classes c < K, renormalised; each
    p_i is a site's softmax over K + 1 outputs, so a site that calls x unknown barely votes."""
    known = np.logaddexp.reduce(np.stack(log_probas)[:, :, :num_classes], axis=0)
    return known - np.logaddexp.reduce(known, axis=1, keepdims=True)


def _site_stats(lp: np.ndarray, ds: Dataset, classes: np.ndarray) -> dict:
    """A site alone on the test set, and its mean unknown probability on its own and on others' classes."""
    k, own = ds.num_classes, np.isin(ds.y_test, classes)
    p_unknown = np.exp(lp[:, k])
    mean = lambda m: round(float(p_unknown[m].mean()), 4) if m.any() else None  # noqa: E731
    return {"classes": [int(c) for c in classes], "accuracy_alone": float((lp[:, :k].argmax(1) == ds.y_test).mean()),
            "unknown_prob_own": mean(own), "unknown_prob_others": mean(~own)}


# many parameters because the one-shot peers' contract (baselines/__init__.py) passes the runtime's
# settings as keywords beside the method, config, data and partition
def run(method: str, cfg: Config, ds: Dataset, part: Partition, *, augment_policy: str, device, bf16: bool,
        progress: bool) -> tuple[np.ndarray, dict]:
    """Train every site's open-set classifier, upload each once, vote on the test set."""
    if method != "fedov":
        raise FedFactoryError(f"fedov.run runs the method fedov, not {method!r}")
    if not part.indices:
        raise FedFactoryError("fedov: the partition has no sites")
    k, votes, sites, curves, size = ds.num_classes, [], {}, [], 0
    for cid, idx in part.indices.items():
        net, stats, curve = train_open_set(ds.x_train[idx], ds.y_train[idx], k, cfg.classifier, cfg.seed, cid, FEDOV,
                                           augment_policy=augment_policy, device=device, bf16=bf16, progress=progress)
        votes.append(predict_log_proba(net, ds.x_test, device, bf16))
        sites[cid] = {**stats, **_site_stats(votes[-1], ds, np.unique(ds.y_train[idx]))}
        curves += [{"series": f"fedov/{cid}", **point} for point in curve]
        size += state_bytes(net)
    return vote(votes, k), {"rounds": 1, "uploaded_bytes": size, "downloaded_bytes": 0, "sites": sites,
                            "accuracy_alone_mean": float(np.mean([s["accuracy_alone"] for s in sites.values()])),
                            "curves": curves, "hyperparameters": asdict(FEDOV)}
