"""DENSE and Co-Boosting: one-shot, data-free federated learning by distilling the sites' classifiers
through a generator that the server trains without any data.

DENSE: Zhang et al., "DENSE: Data-Free One-Shot Federated Learning", NeurIPS 2022
(code: github.com/zj-jayzhang/DENSE). Co-Boosting: Dai et al., "Enhancing One-Shot Federated Learning
Through Data and Ensemble Co-Boosting", ICLR 2024 (code: github.com/rong-dai/Co-Boosting).

Each site trains its classifier f_k on its own data (as local-only does) and uploads it once. The
server holds no data; it trains a generator G: z -> x and a student f_S, one epoch e = 1..E at a time:

  1. synthesis, `g_steps` generator steps (Adam), each on fresh z ~ N(0, I) and labels y ~ U{0..C-1}:
       f_w(x)  = sum_k w_k f_k(x) / sum_k w_k                       the ensemble (DENSE: w_k = 1)
       L_G     = ce * E[h(x, y) CE(f_w(x), y)]                      look like class y to the ensemble
               + bn * sum_k sum_l ||mu_l(x) - mu_kl||_2 + ||var_l(x) - var_kl||_2
                                                                    each BatchNorm layer l of each site
                                                                    model: the batch's statistics against
                                                                    the layer's running ones (DeepInversion)
               - adv * E[m(x) KL_T(f_w(x) || f_S(x))]              where the student disagrees: G seeks it
       DENSE: h = 1, m = [argmax f_S(x) != argmax f_w(x)], T = 1.
       Co-Boosting: h = (1 - p_w(y | x))^gamma, hard samples (those the ensemble is wrong or unsure on)
       weigh more; m = 1, T = 3.
     The epoch's lowest-loss batch joins the synthetic memory bank, with its labels and each site
     model's logits on it.
  2. Co-Boosting only, from the second epoch: the ensemble weights, one pass over the bank (before the
     new batch joins it), by signed gradient descent on the ensemble's cross-entropy:
       w <- clip(w - mu * decay^e * sign(grad_w CE(f_w(x), y)), 0, 1)
  3. distillation: one pass of the student over the whole bank, min KL_T(f_w(x) || f_S(x)) (SGD).
     Co-Boosting first moves each image one step along a random direction of the ensemble's output
     (output-diversified sampling, Tashiro et al. 2020), x <- x + eps * sign(grad_x r . softmax(f_w(x) / 4)),
     r ~ U[-1, 1]^C, and the ensemble labels the moved image.

Where ours differs from the papers (their code's values beside ours in `Recipe`):
  * networks: the sites' classifiers and the student are the run's classifier (classify/networks.py,
    BatchNorm ResNets) on the run's images, not the papers' CNNs / ResNet-18 on 32 px inputs; the
    generator is the papers' (linear, two upsample-conv-BN-LeakyReLU stages, a conv) at half the width,
    with tanh onto [-1, 1] and a crop to the data's size.
  * budget: the papers run E = 200 epochs of 30 generator steps, each adding 256 (DENSE) or 128
    (Co-Boosting) images to the bank, and the student passes over the whole bank every epoch (millions of
    student images). Here the student sees `classifier.budget_images` images: E is the largest with
    batch * E (E + 1) / 2 within it (E = 78 at 200,000 images), with `g_steps` = 6 per epoch.
  * the generator persists across epochs and sees fresh z every step. Both papers' code re-initialises it
    with a learnable z every epoch and runs its 30 steps from scratch; at 6 steps a batch would barely
    move, so ours keeps training one generator, in turn with the student, as the papers' loop reads.
  * the bank keeps each site model's logits on its images, computed once: the student's teacher is
    their w-weighted mean (bit for bit what the sites would answer), so a student step costs no site
    model pass. DENSE's code flips the bank's Fashion-MNIST images when distilling; ours does not.
  * Co-Boosting's diversifying step is applied to `ods_share` (1/8) of each student batch, where the
    code moves every image: a step costs a forward and a backward pass of every site model.
  * Co-Boosting keeps DENSE's BatchNorm term (its public script runs it off, bn = 0, and averages it
    over the models): on label-skewed sites the running statistics are what each site knows of its images.
    Beside its three additions (hard-sample weights, learned ensemble weights, the diversifying step) it
    differs from DENSE where the two codes do: temperatures, no disagreement mask, no crop-and-flip
    view, and the student's optimiser.
  * cost at the full config (Fashion-MNIST, 10 sites, 200,000 images), measured in CPU time against a
    site's classifier step: a generator step 7-7.6 site steps (64 images through 10 site models forward
    and backward, with the BatchNorm hooks), a student step 0.6 (DENSE) or 1.4 (Co-Boosting, with its
    diversifying step); the server ~3.6 (DENSE) and ~5.1 (Co-Boosting) site classifiers' worth of work,
    on top of the sites' own 10 classifiers (local-only's, bit for bit).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..classify import build_classifier, predict_log_proba
from ..classify.augment import augment
from ..config import Config
from ..data import Dataset, Partition
from ..errors import FedFactoryError
from ..tensors import to_float
from ..utils import derive_seed
from . import site_classifiers
from .averaging import state_bytes


@dataclass(frozen=True)
class Recipe:
    """The server's recipe: ours, and the papers' code's values (DENSE's README command; Co-Boosting's
    co_boosting.sh and datafree_kd.py defaults)."""

    batch: int = 64             # synthesis = student batch: DENSE 256, Co-Boosting 128
    g_steps: int = 6            # generator steps per epoch: 30 in both
    lr_g: float = 1e-3          # Adam(0.5, 0.999): both
    nz: int = 256               # both
    ngf: int = 32               # generator width: 64 in both
    ce: float = 1.0             # "oh": 1 in both
    bn: float = 1.0             # DENSE 1; Co-Boosting's script 0 (ours keeps DENSE's)
    adv: float = 1.0            # 1 in both
    adv_t: float = 1.0          # temperature of the adversarial KL: DENSE 1, Co-Boosting 3
    adv_mask: bool = True       # DENSE: only where student and ensemble disagree; Co-Boosting: everywhere
    view: bool = True           # DENSE's ensemble sees a random crop and flip of G(z); Co-Boosting's G(z)
    kd_t: float = 20.0          # distillation temperature: DENSE 20, Co-Boosting 4
    kd_lr: float = 0.005        # student SGD (momentum 0.9): DENSE 0.005, Co-Boosting 0.01
    kd_wd: float = 0.0          # weight decay: DENSE 0, Co-Boosting 1e-4
    cosine: bool = False        # Co-Boosting: cosine decay of the student's lr over the epochs
    clip: float = 0.0           # gradient-norm clip of generator and student: Co-Boosting 10
    hard: float = 0.0           # Co-Boosting's gamma ("hs"): 1
    ods_eps: float = 0.0        # Co-Boosting: 8/255, on images in [-1, 1] as the code's normalised ones
    ods_t: float = 4.0          # Co-Boosting: 4
    ods_share: float = 0.0      # share of each student batch moved: Co-Boosting 1 (ours 1/8)
    mu: float = 0.0             # Co-Boosting's ensemble-weight step: 0.01
    mu_decay: float = 0.99      # its decay per epoch ("wdc"): 0.99


DENSE = Recipe()
COBOOSTING = Recipe(adv_t=3.0, adv_mask=False, view=False, kd_t=4.0, kd_lr=0.01, kd_wd=1e-4, cosine=True,
                    clip=10.0, hard=1.0, ods_eps=8 / 255, ods_share=1 / 8, mu=0.01)
RECIPES = {"dense": DENSE, "coboosting": COBOOSTING}


class Generator(nn.Module):
    """The papers' generator: z -> linear -> (upsample, conv, BN, LeakyReLU) x 2 -> conv -> tanh."""

    def __init__(self, nz: int, ngf: int, shape: tuple[int, int, int]):
        super().__init__()
        h, w, c = shape
        self.size, self.start = (h, w), (-(-h // 4), -(-w // 4))
        self.fc = nn.Linear(nz, 2 * ngf * self.start[0] * self.start[1])
        self.net = nn.Sequential(
            nn.BatchNorm2d(2 * ngf), nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, 2 * ngf, 3, 1, 1, bias=False), nn.BatchNorm2d(2 * ngf), nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, ngf, 3, 1, 1, bias=False), nn.BatchNorm2d(ngf), nn.LeakyReLU(0.2),
            nn.Conv2d(ngf, c, 3, 1, 1), nn.Tanh())
        for m in self.modules():  # DCGAN's initialisation, as both codes reset it
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, z):
        x = self.net(self.fc(z).view(len(z), -1, *self.start))
        return x[:, :, : self.size[0], : self.size[1]]


# -- the losses ------------------------------------------------------------------------------------------

def kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """Per sample, T^2 KL(softmax(teacher / T) || softmax(student / T))."""
    log_s, log_t = F.log_softmax(student.float() / t, 1), F.log_softmax(teacher.float() / t, 1)
    return (log_t.exp() * (log_t - log_s)).sum(1) * t * t


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per sample, through gather (deterministic on a GPU, as classify.train's)."""
    return -F.log_softmax(logits.float(), 1).gather(1, y[:, None])[:, 0]


def hard_weights(logits: torch.Tensor, y: torch.Tensor, gamma: float) -> torch.Tensor:
    """Co-Boosting's sample weights (1 - p(y | x))^gamma: 1 for all at gamma = 0 (DENSE)."""
    return (1 - F.softmax(logits.detach().float(), 1).gather(1, y[:, None])[:, 0]).pow(gamma)


def combine(logits: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The ensemble's logits sum_k w_k f_k / sum_k w_k from the K x N x C site logits."""
    return torch.einsum("k,knc->nc", w, logits) / w.sum()


@contextmanager
def bn_statistics(nets: list[nn.Module]):
    """While open, each forward pass through a BatchNorm layer of `nets` appends DeepInversion's term
    ||mean(x) - running_mean||_2 + ||var(x) - running_var||_2 of its input to the yielded list."""
    terms = []

    def hook(module, inputs, _):
        x = inputs[0].float()
        mean = x.mean((0, 2, 3))
        var = x.square().mean((0, 2, 3)) - mean.square()  # twice as fast as torch.var here, exact enough in float
        terms.append(torch.linalg.vector_norm(mean - module.running_mean)
                     + torch.linalg.vector_norm(var - module.running_var))

    handles = [m.register_forward_hook(hook) for net in nets for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        yield terms
    finally:
        for h in handles:
            h.remove()


def reweight(w: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
    """Co-Boosting's ensemble-weight step on a batch (K x N x C site logits, labels): signed gradient
    descent on the weighted ensemble's cross-entropy, kept in [0, 1]."""
    w = w.detach().requires_grad_(True)
    grad, = torch.autograd.grad(cross_entropy(combine(logits, w), y).mean(), w)
    return (w - lr * grad.sign()).clamp(0.0, 1.0).detach()


# -- the server -----------------------------------------------------------------------------------------

@dataclass
class Bank:
    """The synthetic memory bank: images, their sampled labels, and each site model's logits (K x N x C)."""

    x: list = field(default_factory=list)
    y: list = field(default_factory=list)
    logits: list = field(default_factory=list)

    def __len__(self):
        return sum(len(y) for y in self.y)

    def add(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> None:
        self.x.append(x)
        self.y.append(y)
        self.logits.append(logits)

    def tensors(self):
        return torch.cat(self.x), torch.cat(self.y), torch.cat(self.logits, 1)


@dataclass
class Server:
    """The server's state: the sites' classifiers and their ensemble weights, the student, the generator
    and its optimiser, one seeded random stream; its methods are the three stages of an epoch."""

    recipe: Recipe
    nets: list[nn.Module]      # the sites' classifiers, frozen, in eval mode
    student: nn.Module
    generator: Generator
    num_classes: int
    rng: torch.Generator       # z, labels, views, student batches' diversifying directions
    bf16: bool = False
    w: torch.Tensor = None     # the ensemble weights (DENSE: uniform, fixed)

    def __post_init__(self):
        self.device = next(self.student.parameters()).device
        if self.w is None:
            self.w = torch.full((len(self.nets),), 1.0 / len(self.nets), device=self.device)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), self.recipe.lr_g, betas=(0.5, 0.999))

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def site_logits(self, x: torch.Tensor) -> torch.Tensor:
        """K x N x C, in float."""
        with self.autocast():
            return torch.stack([net(x).float() for net in self.nets])

    def sample(self, n: int):
        z = torch.randn(n, self.recipe.nz, generator=self.rng, device=self.device)
        return z, torch.randint(0, self.num_classes, (n,), generator=self.rng, device=self.device)

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """DENSE's "global view" of G(z): a random crop and flip (classify.augment's, differentiable)."""
        return augment(x, "natural", self.rng) if self.recipe.view else x

    def generator_loss(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """L_G and its terms on generated images x (before the view) with sampled labels y."""
        r, v = self.recipe, self.view(x)
        with bn_statistics(self.nets) as terms:
            t = combine(self.site_logits(v), self.w)
        bn = torch.stack(terms).sum()
        ce = (hard_weights(t, y, r.hard) * cross_entropy(t, y)).mean()
        with self.autocast():
            s = self.student(v).float()
        gap = kl(s, t, r.adv_t)
        if r.adv_mask:  # DENSE: only where the student's class is not the ensemble's
            gap = gap * (s.argmax(1) != t.argmax(1)).float()
        adv = -gap.mean()
        return {"loss": r.ce * ce + r.bn * bn + r.adv * adv, "ce": ce, "bn": bn, "adv": adv}

    def synthesize(self, steps: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        """`steps` generator steps; the lowest-loss batch (chosen on the device: no host read) and the losses."""
        r, g = self.recipe, self.generator
        self.student.eval().requires_grad_(False)
        best, best_x, best_y, log = torch.tensor(math.inf, device=self.device), None, None, []
        for _ in range(steps):
            z, y = self.sample(r.batch)
            with self.autocast():
                x = g(z).float()
            losses = self.generator_loss(x, y)
            self.opt_g.zero_grad(set_to_none=True)
            losses["loss"].backward()
            if r.clip:
                nn.utils.clip_grad_norm_(g.parameters(), r.clip)
            self.opt_g.step()
            loss, x = losses["loss"].detach(), x.detach()
            if best_x is None:
                best_x, best_y = x, y
            better = loss < best
            best, best_x, best_y = torch.where(better, loss, best), torch.where(better, x, best_x), torch.where(better, y, best_y)
            log.append({k: v.detach() for k, v in losses.items()})
        return best_x, best_y, log

    def diversify(self, x: torch.Tensor) -> torch.Tensor:
        """Co-Boosting's on-the-fly step: x + eps * sign(grad_x r . softmax(f_w(x) / T)), r ~ U[-1, 1]^C."""
        r = self.recipe
        x = x.detach().requires_grad_(True)
        p = F.softmax(combine(self.site_logits(x), self.w) / r.ods_t, 1)
        direction = torch.rand(p.shape, generator=self.rng, device=self.device) * 2 - 1
        grad, = torch.autograd.grad((direction * p).sum(), x)
        return (x + r.ods_eps * grad.sign()).detach()

    def distill(self, bank: Bank, opt: torch.optim.Optimizer, order: np.ndarray) -> list[torch.Tensor]:
        """One pass of the student over the bank in `order`; the step losses."""
        r, (xs, _, logits) = self.recipe, bank.tensors()
        self.student.train().requires_grad_(True)
        log = []
        for i in range(0, len(order), r.batch):
            idx = torch.from_numpy(order[i : i + r.batch]).to(self.device)
            x, t = xs[idx], combine(logits[:, idx], self.w)
            moved = round(r.ods_share * len(idx)) if r.ods_eps else 0
            if moved:  # the moved images are labelled afresh by the ensemble
                xm = self.diversify(x[:moved])
                with torch.no_grad():
                    x, t = torch.cat([xm, x[moved:]]), torch.cat([combine(self.site_logits(xm), self.w), t[moved:]])
            with self.autocast():
                loss = kl(self.student(x), t, r.kd_t).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if r.clip:
                nn.utils.clip_grad_norm_(self.student.parameters(), r.clip)
            opt.step()
            log.append(loss.detach())
        return log

    def reweight_on(self, bank: Bank, lr: float, order: np.ndarray) -> None:
        """Co-Boosting's ensemble-weight pass over the bank (the site logits are the bank's: no network pass)."""
        _, ys, logits = bank.tensors()
        for i in range(0, len(order), self.recipe.batch):
            idx = torch.from_numpy(order[i : i + self.recipe.batch]).to(self.device)
            self.w = reweight(self.w, logits[:, idx], ys[idx], lr)


def epochs_for(budget: int, batch: int) -> int:
    """The most epochs E whose growing bank keeps the student within budget: batch * E (E + 1) / 2 images."""
    return max(1, (math.isqrt(1 + 8 * (budget // batch)) - 1) // 2)


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def make_server(method: str, nets: list[nn.Module], ds: Dataset, cfg: Config, device, bf16: bool,
                recipe: Recipe | None = None) -> Server:
    """The server of `method` over the sites' classifiers `nets`: a seeded student and generator, and the
    method's recipe (or `recipe`)."""
    if method not in RECIPES:
        raise FedFactoryError(f"datafree runs {' or '.join(RECIPES)}, not {method!r}")
    r, c, seed = recipe or RECIPES[method], cfg.classifier, cfg.seed
    for net in nets:
        net.eval().requires_grad_(False)
    student = _seeded(derive_seed(seed, method, "student"),
                      lambda: build_classifier(ds.image_shape[-1], ds.num_classes, c.preset, c.width)).to(device)
    generator = _seeded(derive_seed(seed, method, "generator"), lambda: Generator(r.nz, r.ngf, ds.image_shape)).to(device)
    rng = torch.Generator(device).manual_seed(derive_seed(seed, method, "server"))
    return Server(r, nets, student, generator, ds.num_classes, rng, bf16)


def train_server(server: Server, budget: int, order_seed: int, name: str, progress: bool) -> dict:
    """The epochs: synthesis, (Co-Boosting) ensemble weights, distillation. Returns stats and curves."""
    r = server.recipe
    epochs = epochs_for(budget, r.batch)
    opt = torch.optim.SGD(server.student.parameters(), lr=r.kd_lr, momentum=0.9, weight_decay=r.kd_wd)
    order_rng = np.random.default_rng(order_seed)
    bank, g_log, s_log = Bank(), [], []
    for e in tqdm(range(epochs), desc=f"{name} server", unit="epoch", disable=None if progress else True,
                  leave=False):
        x, y, log = server.synthesize(r.g_steps)
        g_log += log
        if r.mu and e > 0:  # the code's order: the weights learn on the bank before this batch joins it
            server.reweight_on(bank, r.mu * r.mu_decay**e, order_rng.permutation(len(bank)))
        with torch.no_grad():
            bank.add(x, y, server.site_logits(x))
        for group in opt.param_groups:
            group["lr"] = r.kd_lr * (0.5 * (1 + math.cos(math.pi * e / epochs)) if r.cosine else 1.0)
        s_log += server.distill(bank, opt, order_rng.permutation(len(bank)))
    curves = [row for key in ("loss", "ce", "bn", "adv")
              for row in _curve("generator" if key == "loss" else f"generator/{key}", [d[key] for d in g_log])]
    return {"epochs": epochs, "generator_steps": len(g_log), "student_steps": len(s_log),
            "student_images": r.batch * epochs * (epochs + 1) // 2, "synthetic_images": r.batch * epochs,
            "curves": curves + _curve("student", s_log)}


def _curve(series: str, losses: list[torch.Tensor], points: int = 100) -> list[dict]:
    """The mean loss over windows of steps, about `points` rows; one read from the device."""
    if not losses:
        return []
    v, every = torch.stack(losses).double().tolist(), max(1, len(losses) // points)
    return [{"series": series, "step": min(i + every, len(v)), "loss": float(np.mean(v[i : i + every]))}
            for i in range(0, len(v), every)]


@torch.no_grad()
def _test_accuracy(server: Server, ds: Dataset, cids: list[str], batch: int = 500) -> dict:
    """The teacher on the test set: each site model alone and the (weighted) ensemble."""
    logits = torch.cat([server.site_logits(to_float(ds.x_test[i : i + batch]).to(server.device))
                        for i in range(0, len(ds.x_test), batch)], 1)
    y = torch.from_numpy(np.asarray(ds.y_test)).to(server.device)
    alone = (logits.argmax(2) == y).double().mean(1).tolist()
    return {"ensemble_accuracy": float((combine(logits, server.w).argmax(1) == y).double().mean()),
            "accuracy_alone": dict(zip(cids, alone)), "accuracy_alone_mean": float(np.mean(alone))}


# many parameters because the one-shot peers' contract (baselines/__init__.py) passes the runtime's
# settings as keywords beside the method, config, data and partition
def run(method: str, cfg: Config, ds: Dataset, part: Partition, *, augment_policy: str, device, bf16: bool,
        progress: bool) -> tuple[np.ndarray, dict]:
    """Sites train and upload their classifiers once; the server distills them without data."""
    if method not in RECIPES:
        raise FedFactoryError(f"datafree runs {' or '.join(RECIPES)}, not {method!r}")
    if not part.indices:
        raise FedFactoryError(f"{method}: the partition has no sites")
    device = torch.device(device)
    sites, curves, site_seconds = site_classifiers(cfg, ds, part, augment_policy=augment_policy, device=device,
                                                   bf16=bf16, progress=progress)  # local-only's, shared in a compare
    nets, size = list(sites.values()), sum(map(state_bytes, sites.values()))
    t1 = time.perf_counter()
    server = make_server(method, nets, ds, cfg, device, bf16)
    stats = train_server(server, cfg.classifier.budget_images, derive_seed(cfg.seed, method, "order"), method, progress)
    t2 = time.perf_counter()
    info = {"rounds": 1, "uploaded_bytes": size, "downloaded_bytes": 0, "curves": curves + stats.pop("curves"),
            **stats, **_test_accuracy(server, ds, list(part.indices)),
            "ensemble_weights": dict(zip(part.indices, server.w.tolist())),
            "reused_site_training_seconds": round(site_seconds, 2), "seconds": {"server": round(t2 - t1, 1)}, "hyperparameters": asdict(server.recipe)}
    return predict_log_proba(server.student, ds.x_test, device, bf16), info
