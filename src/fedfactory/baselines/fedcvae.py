"""FedCVAE-Ens and FedCVAE-KD: one-shot peers built on per-site conditional VAEs.

Heinbaugh, Luz-Ricca & Shao, "Data-Free One-Shot Federated Learning Under Very High Statistical
Heterogeneity", ICLR 2023 (openreview _hb4vM3jspB; code github.com/ceh-2000/fed_cvae, read for the
settings below, not copied).

Mechanism. Each site trains a conditional VAE on its own images, the decoder conditioned on the
GLOBAL label (one-hot), and uploads once: its decoder and its label distribution (counts).
  fedcvae-ens  the server decodes every site's decoder: z from the prior, labels drawn from that
               site's label distribution, the site's share of the synthetic set in proportion to its
               data; the pooled set trains the classifier.
  fedcvae-kd   the server first distils the sites' decoders into one server decoder: a fixed transfer
               set of (z, y) pairs, y from each site's label distribution and the site's share in
               proportion to its data, targets the site decoder's outputs; the server decoder is
               trained to reproduce them. Only the server decoder is then sampled, labels uniform over
               the classes the sites cover, to train the classifier. As in the paper's code, the
               server's initial decoder is sent down first and every site starts from it (the
               download counted in downloaded_bytes).

Where ours differs from the paper (settings of its FashionMNIST / MNIST runs):
  - network: our `CVAE` (modules/cvae.py): 2 stride-2 convolutions and 2 transposed ones, SiLU,
    no BatchNorm, tanh output, at the data's own size (28 px); its encoder also sees the label. The
    paper: 4 convolutions + BatchNorm + ReLU each way, a 500-unit layer in the encoder, an
    unconditioned encoder, logits + sigmoid, images resized to 32 px. The decoder's first layer is
    the same map: ours adds a learnt vector per global class to the projection of z, the paper
    projects [z, one-hot y].
  - latent 10 (the paper's Ens setting for both data sets, and KD on MNIST; KD on FashionMNIST: 100).
  - likelihood / beta: ours a squared error on [-1, 1] pixels + beta KL (a fixed-variance Gaussian);
    the paper a Bernoulli likelihood (BCE on [0, 1]) + beta KL; beta 1 in both.
  - prior draws: z ~ N(0, I) truncated at +-3 (Ens) and +-2 (KD), as the paper's code does
    (FashionMNIST's uniform_range); Budgets.z_width_* = 0 gives the plain N(0, I).
  - KD loss: squared error to the site decoder's output (our likelihood); the paper's code, BCE to
    the sigmoid of it. Neither the paper's code nor our version adds a classifier-consistency term,
    weight averaging of the decoders (its should_avg, off by default) or the paper's shifted prior
    (its security variant).
  - the classifier: the one every method here shares (fedfactory.classify, the config's preset,
    recipe and budget, class-balanced batches, augmentation), on uint8 images. The paper: a small
    2-conv CNN, Adam 1e-3, 5 (FashionMNIST) or 10 (MNIST) epochs of its 5,000 synthetic images,
    batch 32, plain shuffling, so Ens's label proportions set its class frequencies; ours draws
    class-balanced batches from the set, so they only set how many distinct images each class has.
  - budgets: Budgets below, each with the paper's value. Sites train 25 epochs of their data, as
    the paper's FashionMNIST runs, capped at 75,000 images (the paper's sites held half the training
    set, about 3,000 images for 10 sites: 25 epochs is about 75,000).
  - optimizer: CVAEModule's Adam (betas 0.9, 0.99; the paper: torch's 0.9, 0.999), lr 1e-3, bf16
    autocast where the runtime turns it on.
  - the data: the run's partition as given (the paper: Dirichlet alpha over half of the training set).
Where ours differs from `module.kind = "cvae"` (CVAEModule, whose training loop and loss this reuses):
  - conditioned on global labels (an embedding row per class of the data set), where a module
    conditions on its local class indices;
  - no EMA (the paper has none; the cpu preset: a 10,000-image half-life), latent 10 (preset 32),
    batch 32 (preset 128), budget from Budgets (preset: 200,000 images), the data set's full share
    (no privacy holdout, no audit);
  - synthesis follows the sites' label proportions (Ens) or is uniform (KD) where the factory draws
    factory.per_class images per class split over the modules by factory.aggregation, and z is
    drawn from a truncated normal.
Curves (utils.LossCurve's points, {"step", "images_seen", "loss"}): series module/<site> (each site's
CVAE loss), distill (KD's distillation loss) and classifier/<method>.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..classify import predict_log_proba, train_classifier
from ..config import Config
from ..data import Dataset, Partition
from ..errors import FedFactoryError
from ..modules.cvae import CVAE, CVAEModule
from ..tensors import to_uint8
from ..utils import LossCurve, derive_seed

METHODS = ("fedcvae-ens", "fedcvae-kd")
DECODER = ("embed", "from_z", "dec")  # the CVAE's decoder: what a site uploads (the encoder stays home)
GENERATE_CHUNK = 500  # images decoded per network call


@dataclass(frozen=True)
class Budgets:
    """CPU-sized settings; the paper's FashionMNIST values (MNIST where it differs) beside each."""
    latent: int = 10                  # paper: z_dim 10 (Ens; KD on MNIST), 100 (KD on FashionMNIST)
    channels: int = 32                # paper: 32-64 channels, 4 layers each way
    beta: float = 1.0                 # paper: 1.0
    site_epochs: int = 25             # paper: 25 local epochs (MNIST 15)
    site_max_images: int = 75_000     # ours, for the CPU; paper: 25 epochs x ~3,000 images a site
    batch_size: int = 32              # paper: 32 (sites, distillation and classifier alike)
    lr: float = 1e-3                  # paper: Adam 1e-3
    synthetic_images: int = 5000      # paper: classifier_num_train_samples 5,000
    distill_samples: int = 5000       # paper: decoder_num_train_samples 5,000
    distill_epochs: int = 10          # paper: 10 (MNIST 7)
    distill_lr: float = 0.01          # paper: decoder_LR 0.01 (Adam)
    z_width_ens: float = 3.0          # paper's code: truncated normal, uniform_range (-3, 3)
    z_width_kd: float = 2.0           # paper's code: (-2, 2) (MNIST (-1, 1))


BUDGETS = Budgets()


@dataclass(frozen=True)
class Context:
    """What every step of one run reads."""
    method: str
    seed: int
    budgets: Budgets
    device: torch.device
    bf16: bool
    progress: bool
    num_classes: int
    image_shape: tuple


@dataclass
class Site:
    """What a site uploads: its decoder (inside our CVAE network) and its label counts."""
    cid: str
    net: CVAE
    counts: np.ndarray  # real images per global class

    @property
    def pmf(self) -> np.ndarray:
        return self.counts / self.counts.sum()


class _GlobalLabelCVAE(CVAEModule):
    """CVAEModule's seeded training loop and loss, conditioned on the global label (the paper's
    one-hot y) rather than the local class index, starting from `init` (KD's shared decoder)."""

    def __init__(self, num_classes: int, init: dict | None, **kw):
        super().__init__(**kw)
        self.num_global, self.init = num_classes, init

    def build_network(self):
        h, w, c = self.image_shape
        net = CVAE(max(h, w), c, self.num_global, **self.arch)
        if self.init is not None:
            net.load_state_dict(self.init, strict=False)  # the decoder's keys; the encoder keeps its own
        return net

    def _take_data(self, images, labels):
        super()._take_data(images, labels)  # checks, classes, counts, image shape
        return np.asarray(labels, np.int64)


def decoder_state(net: CVAE) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items() if k.split(".")[0] in DECODER}


def decoder_bytes(net: CVAE) -> int:
    return sum(t.numel() * t.element_size() for t in decoder_state(net).values())


def new_decoder(ctx: Context, name: str) -> CVAE:
    h, w, c = ctx.image_shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(ctx.seed, ctx.method, name, "init"))
        return CVAE(max(h, w), c, ctx.num_classes, ctx.budgets.channels, ctx.budgets.latent).to(ctx.device)


def fit_site(ctx: Context, cid: str, images: np.ndarray, labels: np.ndarray, init: dict | None = None):
    """Train one site's CVAE on its images; (Site, curve rows, stats)."""
    b = ctx.budgets
    if np.any((labels < 0) | (labels >= ctx.num_classes)):
        raise FedFactoryError(f"{ctx.method}: site {cid} has labels outside 0..{ctx.num_classes - 1}")
    train = {"budget_images": max(1, min(b.site_epochs * len(images), b.site_max_images)), "batch_size": b.batch_size,
             "lr": b.lr, "ema_halflife_images": 0, "warmup_images": 0, "hflip": False, "beta": b.beta}
    m = _GlobalLabelCVAE(ctx.num_classes, init, arch={"channels": b.channels, "latent": b.latent}, train=train,
                         client_id=cid, seed=derive_seed(ctx.seed, ctx.method, cid), device=str(ctx.device),
                         bf16="on" if ctx.bf16 else "off", progress=ctx.progress)
    m.fit(images, labels)
    counts = np.bincount(np.asarray(labels, np.int64), minlength=ctx.num_classes)
    return Site(cid, m.net, counts), [{"series": f"module/{cid}", **p} for p in m.curve], m.stats


def split(total: int, weights) -> np.ndarray:
    """`total` split in proportion to `weights`, in integers that sum to it (largest remainders)."""
    w = np.asarray(weights, np.float64)
    exact = total * w / w.sum()
    out = np.floor(exact).astype(np.int64)
    out[np.argsort(-(exact - out), kind="stable")[: total - out.sum()]] += 1
    return out


def prior(ctx: Context, n: int, width: float, *names) -> torch.Tensor:
    """n latent vectors from N(0, I), truncated at +-width (width <= 0: untruncated), by inverse CDF."""
    gen = torch.Generator().manual_seed(derive_seed(ctx.seed, ctx.method, *names, "z"))
    u = torch.rand((n, ctx.budgets.latent), generator=gen, dtype=torch.float64)
    if width > 0:
        lo = torch.special.ndtr(torch.tensor(-float(width), dtype=torch.float64))
        u = lo + (1 - 2 * lo) * u
    return torch.special.ndtri(u.clamp(1e-12, 1 - 1e-12)).float().to(ctx.device)


def draw(ctx: Context, pmf: np.ndarray, n: int, width: float, *names) -> tuple[np.ndarray, torch.Tensor]:
    """n (label, z) pairs: labels i.i.d. from `pmf`, as the paper's np.random.choice(p=pmf)."""
    rng = np.random.default_rng(derive_seed(ctx.seed, ctx.method, *names, "labels"))
    return rng.choice(ctx.num_classes, size=n, p=pmf), prior(ctx, n, width, *names)


def decode(ctx: Context, net: CVAE, z: torch.Tensor, labels) -> torch.Tensor:
    """The decoder's images in [-1, 1] (float, N x C x H x W), as one graph: the caller chooses no_grad."""
    y = torch.as_tensor(labels, dtype=torch.long, device=ctx.device)
    with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.bf16):
        return net.decode(z, y, ctx.image_shape[:2]).float()


@torch.no_grad()
def generate(ctx: Context, net: CVAE, z: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    out = [to_uint8(decode(ctx, net, z[i : i + GENERATE_CHUNK], labels[i : i + GENERATE_CHUNK]))
           for i in range(0, len(z), GENERATE_CHUNK)]
    return np.concatenate(out) if out else np.zeros((0, *ctx.image_shape), np.uint8)


def synthesize_ens(ctx: Context, sites: list[Site]) -> tuple[np.ndarray, np.ndarray]:
    """FedCVAE-Ens's set: each site's decoder, its share by data size, its labels from its distribution."""
    xs, ys = [], []
    for s, n in zip(sites, split(ctx.budgets.synthetic_images, [s.counts.sum() for s in sites])):
        labels, z = draw(ctx, s.pmf, int(n), ctx.budgets.z_width_ens, s.cid, "synthesis")
        xs.append(generate(ctx, s.net, z, labels))
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


def synthesize_kd(ctx: Context, server: CVAE, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FedCVAE-KD's set: the server decoder alone, labels uniform over the covered classes (the paper:
    over all classes; the same when the sites cover them all, and a class no site holds has no decoder)."""
    pmf = np.isin(np.arange(ctx.num_classes), classes) / len(classes)
    labels, z = draw(ctx, pmf, ctx.budgets.synthetic_images, ctx.budgets.z_width_kd, "server", "synthesis")
    return generate(ctx, server, z, labels), labels


def transfer_set(ctx: Context, sites: list[Site]):
    """KD's fixed transfer set, as the paper's code: (z, y, the site decoder's output), each site's share
    of distill_samples in proportion to its data and its labels from its own distribution."""
    zs, ys, ts = [], [], []
    for s, n in zip(sites, split(ctx.budgets.distill_samples, [s.counts.sum() for s in sites])):
        labels, z = draw(ctx, s.pmf, int(n), ctx.budgets.z_width_kd, s.cid, "distill")
        with torch.no_grad():
            ts.append(decode(ctx, s.net, z, labels))
        zs.append(z)
        ys.append(torch.from_numpy(labels).to(ctx.device))
    return torch.cat(zs), torch.cat(ys), torch.cat(ts)


def distill(ctx: Context, server: CVAE, sites: list[Site]) -> list[dict]:
    """Train the server decoder to reproduce each site decoder on that site's (z, y); its curve rows."""
    b = ctx.budgets
    z, y, target = transfer_set(ctx, sites)
    params = [p for k, p in server.named_parameters() if k.split(".")[0] in DECODER]
    opt = torch.optim.Adam(params, lr=b.distill_lr)
    rng = np.random.default_rng(derive_seed(ctx.seed, ctx.method, "distill", "batches"))
    steps = b.distill_epochs * math.ceil(len(z) / b.batch_size)
    curve, step, loss = LossCurve(steps, b.batch_size), 0, None
    server.train()
    for _ in range(b.distill_epochs):  # epochs over the shuffled transfer set, as the paper's DataLoader
        order = torch.from_numpy(rng.permutation(len(z))).to(ctx.device)
        for i in range(0, len(order), b.batch_size):
            idx = order[i : i + b.batch_size]
            loss = F.mse_loss(decode(ctx, server, z[idx], y[idx]), target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss = loss.detach().double()
            curve.add(step, loss)
            step += 1
    server.eval()
    return [{"series": "distill", **p} for p in curve.read(loss)[1]] if steps else []


def _check(method: str, ds: Dataset, part: Partition, b: Budgets) -> None:
    if method not in METHODS:
        raise FedFactoryError(f"fedcvae runs {' and '.join(METHODS)}, not {method!r}")
    if not part.indices or any(len(idx) == 0 for idx in part.indices.values()):
        raise FedFactoryError(f"{method}: every site needs training images; got sizes "
                              f"{ {c: len(i) for c, i in part.indices.items()} }")
    if ds.x_train.ndim != 4 or ds.x_train.dtype != np.uint8:
        raise FedFactoryError(f"{method}: needs uint8 N x H x W x C images, got {ds.x_train.shape} {ds.x_train.dtype}")
    bad = [f.name for f in dataclasses.fields(b) if getattr(b, f.name) < 0
           or (getattr(b, f.name) == 0 and f.name not in ("distill_epochs", "z_width_ens", "z_width_kd"))]
    if bad:
        raise FedFactoryError(f"{method}: budgets {bad} must be > 0 (distill_epochs and z widths >= 0)")


# many parameters because the baselines' contract passes the run's settings as keywords, and tests shrink budgets
def run(method: str, cfg: Config, ds: Dataset, part: Partition, *, augment_policy: str, device: torch.device,
        bf16: bool, progress: bool, budgets: Budgets | None = None) -> tuple[np.ndarray, dict]:
    """Train the sites' CVAEs, build the synthetic set (Ens: the sites' decoders; KD: the distilled
    server decoder), train the classifier on it; (log-probabilities on ds.x_test, info).
    `budgets`: BUDGETS unless given (read at call time)."""
    budgets = budgets or BUDGETS
    _check(method, ds, part, budgets)
    ctx = Context(method, cfg.seed, budgets, torch.device(device), bf16, progress, ds.num_classes,
                  tuple(int(s) for s in ds.image_shape))
    kd, t0 = method == "fedcvae-kd", time.perf_counter()
    server = new_decoder(ctx, "server") if kd else None
    init = decoder_state(server) if kd else None  # sent down: every site starts from the server's decoder
    sites, curves, site_stats = [], [], {}
    for cid, idx in tqdm(part.indices.items(), desc=method, unit="site", disable=None if progress else True, leave=False):
        site, rows, site_stats[cid] = fit_site(ctx, cid, ds.x_train[idx], ds.y_train[idx], init)
        sites.append(site)
        curves += rows
    t_sites = time.perf_counter()
    if kd:
        curves += distill(ctx, server, sites)
        covered = np.flatnonzero(sum(s.counts for s in sites))
        x_syn, y_syn = synthesize_kd(ctx, server, covered)
    else:
        x_syn, y_syn = synthesize_ens(ctx, sites)
    t_server = time.perf_counter()
    net, stats = train_classifier(x_syn, y_syn, ds.num_classes, cfg.classifier, cfg.seed, method,
                                  augment_policy=augment_policy, device=ctx.device, bf16=bf16, progress=progress)
    curves += [{"series": f"classifier/{method}", **p} for p in stats.pop("curve", [])]
    size = decoder_bytes(sites[0].net)
    info = {"rounds": 1, "uploaded_bytes": len(sites) * (size + 8 * ds.num_classes),  # decoder + int64 counts
            "downloaded_bytes": len(sites) * size if kd else 0, "curves": curves,
            "decoder_bytes": size, "sites": site_stats, "classifier": stats,
            "synthetic_per_class": np.bincount(y_syn, minlength=ds.num_classes).tolist(),
            "seconds": {"sites": round(t_sites - t0, 2), "server": round(t_server - t_sites, 2),
                        "classifier": stats["train_seconds"]},
            "budgets": dataclasses.asdict(budgets)}
    return predict_log_proba(net, ds.x_test, ctx.device, bf16), info
