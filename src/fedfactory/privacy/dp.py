"""Differentially private module training: DP-SGD (Abadi et al. 2016) with Opacus.

Each step takes a Poisson sample of the site's N images (each one in with probability
q = batch / N, independently), computes every image's gradient, clips it to norm C
(`max_grad_norm`), sums, adds N(0, (sigma C)^2 I) and divides by the expected batch. An
accountant (PRV or RDP) turns (sigma, q, steps) into the (epsilon, delta) that the module's
manifest states. With noise multiplicity K (DPDM, Dockhorn et al. 2022) each image's loss is
averaged over K independent noise levels before its gradient is clipped: one clipped gradient
per image per step, so K costs compute and no privacy.

`GenerativeModule.fit` runs the loop (modules/base.py) with a trainer; `DPTrainer` is the DP-SGD
one, built from these pieces. Opacus is imported only when DP is used: checking a peer's DP claim
(`check_dp_block`, modules/privacy_block.py) does not need it.
"""

from __future__ import annotations

import math
import secrets
import warnings

import numpy as np
import torch

from ..errors import FedFactoryError
from ..modules.privacy_block import ACCOUNTANTS, DP_FIELDS, check_dp_block  # noqa: F401 (re-exported)
from ..modules.training import Trainer
from ..utils import derive_seed

COVERS = ("the training images (each image's influence on the weights); not the class counts in the manifest, "
          "nor the choice of hyper-parameters")

# Opacus computes per-sample gradients in full backward hooks, which warn when the network's
# inputs need no gradient (they never do here); its RDP analysis (PRV uses it to bound its domain)
# warns when the best order is the largest it tries: the bound is then looser than it could be, never
# below the true epsilon.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed", category=UserWarning)
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)


def spent_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """epsilon of `steps` Poisson-subsampled Gaussian steps at (sigma, q), for this delta."""
    from opacus.accountants import create_accountant

    acct = create_accountant(mechanism=accountant)
    acct.history = [(noise_multiplier, sample_rate, steps)]  # as Opacus's get_noise_multiplier composes
    return float(acct.get_epsilon(delta=delta))


def plan(dp: dict, n: int, batch: int, budget_images: int) -> dict:
    """The DP-SGD run for a site of n images, and the claim it makes (the manifest's `dp` block).

    The expected batch is `batch` (all n images when n is smaller), and steps are counted so
    that `budget_images` stays the expected number of images seen. Given a target epsilon and
    no noise multiplier, Opacus finds the smallest sigma (to 0.01 in epsilon) that meets it;
    given both, the noise is as set and the target is a ceiling the run must not pass."""
    from opacus.accountants.utils import get_noise_multiplier

    target, sigma, k = float(dp.get("epsilon", 0)), float(dp.get("noise_multiplier", 0)), dp.get("noise_multiplicity", 1)
    accountant, clip = dp.get("accountant", "prv"), float(dp.get("max_grad_norm", 1.0))
    if accountant not in ACCOUNTANTS:
        raise FedFactoryError(f"privacy.accountant must be one of {', '.join(ACCOUNTANTS)}; got {accountant!r}")
    if not (target >= 0 and sigma >= 0 and target + sigma > 0 and math.isfinite(target + sigma)):
        raise FedFactoryError("DP training needs privacy.epsilon > 0 or privacy.noise_multiplier > 0 (finite)")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise FedFactoryError(f"privacy.noise_multiplicity must be an integer >= 1; got {k!r}")
    if not (clip > 0 and math.isfinite(clip)):
        raise FedFactoryError(f"privacy.max_grad_norm must be > 0; got {clip!r}")
    batch = min(int(batch), n)
    q, steps = batch / n, max(1, math.ceil(budget_images / batch))
    delta = float(dp.get("delta", 0)) or 1 / (10 * n)  # below 1/n, which publishing one random image meets
    if not 0 < delta < 1:
        raise FedFactoryError(f"privacy.delta must be in (0, 1); got {delta!r}")
    if sigma == 0:
        try:
            sigma = get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps,
                                         accountant=accountant)
        except ValueError as e:
            raise FedFactoryError(f"privacy.epsilon {target:g}: {e}") from None
    eps = spent_epsilon(sigma, q, steps, delta, accountant)
    if target and eps > target:
        raise FedFactoryError(f"privacy.noise_multiplier {sigma:g} spends epsilon {eps:.3g} over {steps} steps, "
                              f"more than privacy.epsilon {target:g}: raise the noise or lower module.budget_images")
    return {"epsilon": eps, "delta": delta, "noise_multiplier": float(sigma), "max_grad_norm": clip,
            "sample_rate": q, "steps": int(steps), "accountant": accountant, "noise_multiplicity": k,
            "covers": COVERS, "noise": "secret: drawn from operating-system entropy, not recorded", "batch": batch}


def claim(p: dict) -> dict:
    """The manifest's `dp` block of a plan: what was spent, and on what."""
    return {k: v for k, v in p.items() if k != "batch"}


def poisson_batches(rng: np.random.Generator, n: int, q: float, steps: int, device: torch.device):
    """Per-step indices of a Poisson sample (each image in with probability q, independently: the
    sampling the accountant assumes). A batch may be empty; its step is noise alone."""
    for _ in range(steps):
        yield torch.from_numpy(np.flatnonzero(rng.random(n) < q)).to(device)


def conv_grad_sample(layer: torch.nn.Conv2d, activations, backprops) -> dict:
    """Per-image gradients of a Conv2d as ONE grouped convolution's weight gradient: the batch is
    folded into the channels, so image i's input only meets image i's output gradient. It gives
    Opacus's numbers (its unfold-and-einsum path) at 1.2-2.8x its speed on this CPU, and needs no
    contiguous input (Opacus's as_strided unfold got the attention's transposed view wrong)."""
    x, g = activations[0].to(backprops.dtype), backprops
    n = len(x)
    out = {}
    if layer.weight.requires_grad:
        shape = (n * layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)
        w = torch.ops.aten.convolution_backward(
            g.reshape(1, -1, *g.shape[2:]), x.reshape(1, -1, *x.shape[2:]), g.new_zeros(1, 1, 1, 1).expand(shape),
            None, layer.stride, layer.padding, layer.dilation, False, [0, 0], n * layer.groups, (False, True, False))[1]
        out[layer.weight] = w.reshape(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum((2, 3))
    return out


def make_private(net: torch.nn.Module, opt: torch.optim.Optimizer, p: dict, generator: torch.Generator):
    """Per-sample gradient hooks on `net`'s layers (the returned module holds them; call `net` itself),
    and `opt` wrapped to clip, noise and average the gradients.

    secure_mode is off: the noise comes from `generator`, seeded from the operating system's entropy
    (fit), so it is secret but not hardened against floating-point attacks on Gaussian sampling
    (Opacus's secure_mode draws it from a CSPRNG with those mitigations)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    class PerSampleGrads(GradSampleModule):
        GRAD_SAMPLERS = {**GradSampleModule.GRAD_SAMPLERS, torch.nn.Conv2d: conv_grad_sample}

    model = PerSampleGrads(net, loss_reduction="mean")  # per-sample grads = n x grads of the batch mean
    dpopt = DPOptimizer(opt, noise_multiplier=p["noise_multiplier"], max_grad_norm=p["max_grad_norm"],
                        expected_batch_size=p["batch"], loss_reduction="mean", generator=generator, secure_mode=False)
    return model, dpopt


def per_image_grads(params, images: int, k: int) -> None:
    """Turn the backward's per-row gradients into the per-image gradients that DPOptimizer clips:
    in fp32 (a bf16 autocast leaves some in bf16, whose norms would round the clip bound), the
    mean over each image's k rows (its noise levels), and zero rows for an empty batch."""
    for p in params:
        if images == 0:
            p.grad_sample = p.new_zeros((0, *p.shape))
        else:
            g = p.grad_sample.to(p.dtype)
            p.grad_sample = g.reshape(images, k, *p.shape).mean(1) if k > 1 else g


class DPTrainer(Trainer):
    """DP-SGD as `GenerativeModule.fit`'s trainer: Poisson batches, per-sample gradient hooks on the
    network's layers (so it is not compiled), clipped and noised steps; bf16 autocast stays (faster
    here), the per-image gradients are clipped in fp32. The noise and the batches must be secret for
    epsilon to hold: they are drawn from a seed that no one else knows (the operating system's), never
    from the run seed in the manifest. `finish` returns the manifest's `dp` claim."""

    def __init__(self, settings: dict):
        self.settings = dict(settings)
        self.p: dict | None = None  # the plan (plan()), once fit has told the site's size
        self.secret: int | None = None
        self.hooks = None

    def plan(self, module, n: int, batch: int, budget_images: int) -> tuple[int, int, int]:
        self.p = plan(self.settings, n, batch, budget_images)
        return self.p["batch"], self.p["steps"], self.p["noise_multiplicity"]

    def prepare(self, module, net: torch.nn.Module, opt: torch.optim.Optimizer):
        self.secret = self.settings.get("secret_seed") or secrets.randbits(63)  # secret_seed: tests only
        noise = torch.Generator(module.device).manual_seed(derive_seed(self.secret, "dp-noise"))
        self.hooks, opt = make_private(net, opt, self.p, noise)
        return net, opt  # not the wrapper: a kind's loss may call the network's own methods (cvae)

    def batches(self, module, n: int, batch: int, steps: int):
        rng = np.random.default_rng(derive_seed(self.secret, "dp-batches"))
        return poisson_batches(rng, n, self.p["sample_rate"], steps, module.device)

    def after_backward(self, params: list, images: int, rows_per_image: int) -> None:
        per_image_grads(params, images, rows_per_image)

    def finish(self) -> dict:
        self.hooks.remove_hooks()
        return claim(self.p)
