"""EDM diffusion (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"): preconditioning, log-normal training noise, deterministic Heun sampler."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..tensors import to_float
from ..utils import derive_seed
from .base import GenerativeModule
from .limits import ints, is_int, is_number
from .registry import register_kind
from .unet import UNet

SIGMA_DATA = 0.5
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0  # sampling schedule (sigma_min is per preset, below)
MIA_SIGMAS = (0.05, 0.2, 0.5, 1.0)   # the noise levels of the audit's per-example loss (data in [-1, 1])


def denoise(net, x, sigma, labels):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)   (EDM eq. 7, Table 1)."""
    sigma = sigma.reshape(-1, 1, 1, 1).float()
    c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
    c_out = sigma * SIGMA_DATA / (sigma**2 + SIGMA_DATA**2).sqrt()
    c_in = 1 / (SIGMA_DATA**2 + sigma**2).sqrt()
    c_noise = sigma.log().flatten() / 4
    return c_skip * x + c_out * net(c_in * x, c_noise, labels).float()


def edm_loss(net, y, labels, gen, p_mean=-1.2, p_std=1.2):
    """lambda(sigma) ||D(y + n; sigma) - y||^2 with ln(sigma) ~ N(P_mean, P_std^2)   (EDM eq. 8, Table 1)."""
    sigma = (torch.randn(len(y), generator=gen, device=y.device) * p_std + p_mean).exp()
    weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    noise = torch.randn(y.shape, generator=gen, device=y.device) * sigma.reshape(-1, 1, 1, 1)
    d = denoise(net, y + noise, sigma, labels)
    return (weight.reshape(-1, 1, 1, 1) * (d - y) ** 2).mean()


def edm_schedule(steps: int, sigma_min: float) -> list[float]:
    """EDM's noise levels (eq. 5) from SIGMA_MAX to sigma_min, then 0: plain floats, so that stepping
    through them never waits on a GPU."""
    i = torch.arange(steps, dtype=torch.float64)
    t = (SIGMA_MAX ** (1 / RHO) + i / max(steps - 1, 1) * (sigma_min ** (1 / RHO) - SIGMA_MAX ** (1 / RHO))) ** RHO
    return t.tolist() + [0.0]


def heun_sampler(D, latents, steps, sigma_min=SIGMA_MIN):
    """Deterministic 2nd-order Heun sampler (EDM Algorithm 1, S_churn = 0): 2 * steps - 1 calls.
    The last step, from sigma_min to 0, is Euler: it returns D(x; sigma_min)."""
    t = edm_schedule(steps, sigma_min)
    x = latents.double() * t[0]
    for t_cur, t_next in zip(t[:-1], t[1:]):
        d = (x - D(x, t_cur)) / t_cur
        x_next = x + (t_next - t_cur) * d
        if t_next > 0:  # 2nd-order correction
            x_next = x + (t_next - t_cur) * 0.5 * (d + (x_next - D(x_next, t_next)) / t_next)
        x = x_next
    return x.float()


def dpm_solver_2m(D, latents, steps, sigma_min=SIGMA_MIN):
    """DPM-Solver++(2M) (Lu et al. 2022) on the same ODE and schedule: one network call per step,
    `steps` in all, second order from the denoiser's last two outputs. In lambda = -ln(sigma):
    x' = (s'/s) x + (1 - s'/s) D~, with D~ = (1 + 1/2r) D_i - (1/2r) D_{i-1}, r = h_{i-1} / h_i.
    The last step, to 0, returns D~ at sigma_min, as the Heun sampler returns D(x; sigma_min)."""
    t = edm_schedule(steps, sigma_min)
    x, d_prev, h_prev = latents.double() * t[0], None, None
    for t_cur, t_next in zip(t[:-1], t[1:]):
        d = D(x, t_cur)
        h = math.log(t_cur / t_next) if t_next > 0 else None
        d_mix = d
        if d_prev is not None and h is not None:  # 2nd order from the previous denoised output
            r = h_prev / h
            d_mix = (1 + 1 / (2 * r)) * d - 1 / (2 * r) * d_prev
        x = (t_next / t_cur) * x + (1 - t_next / t_cur) * d_mix
        d_prev, h_prev = d, h
    return x.float()


SAMPLERS = {"heun": heun_sampler, "dpm2m": dpm_solver_2m}


class DiffusionModule(GenerativeModule):
    kind = "diffusion"
    sampling_keys = ("sample_steps", "sampler", "sigma_min", "guidance")
    samplers = tuple(SAMPLERS)
    key_rules = {**GenerativeModule.key_rules, "channels": "positive", "num_blocks": "positive", "patch": "positive",
                 "sample_steps": "positive", "guidance": "positive", "p_std": "positive",
                 "sigma_min": "non-negative", "dropout": "non-negative", "label_dropout": "non-negative"}
    per_example_loss_info = {"mia_sigmas": list(MIA_SIGMAS)}
    presets = {
        # ~0.9M parameters at 28 px; 2 CPU cores train two modules at 126-304 img/s each, by processor.
        # 32 base channels train 2.6x slower for no accuracy (Br35H, benchmarks/README.md).
        "cpu": {"arch": {"channels": 16, "channel_mult": [1, 2, 4], "num_blocks": 2, "attn_resolutions": [],
                         "dropout": 0.0, "patch": 1},
                "train": {"budget_images": 36_000, "batch_size": 64, "lr": 2e-3, "ema_halflife_images": 10_000,
                          "warmup_images": 5_000, "label_dropout": 0.0, "hflip": False, "p_mean": -1.2, "p_std": 1.2,
                          # Stopping at sigma 0.2 (the last step returns D(x; 0.2)) drops the spurious fine
                          # texture a small 10-step model paints below it (benchmarks/README.md).
                          "sample_steps": 10, "sigma_min": 0.2, "guidance": 1.0, "sampler": "heun"},
                # DP-SGD: twice the batch halves the steps, and the noise on each averaged gradient
                # (sigma / batch) falls 1.8x at the same epsilon and images; a longer EMA averages more of
                # it out. Fashion-MNIST at epsilon 10: 0.5799 -> 0.6337 (benchmarks/README.md).
                "dp_train": {"batch_size": 128, "lr": 3e-3, "ema_halflife_images": 20_000}},
        # Minutes on one GPU: ~9M parameters, 2.5 GFLOP per 32 px image forward. Sized from FLOP counts
        # for about 30 s per module on one H100 (10 modules, synthesis and a ResNet-18 in ~10 minutes);
        # benchmarks/gpu_check.py measures it (docs/PROTOCOL.md).
        "gpu": {"arch": {"channels": 64, "channel_mult": [1, 2, 2, 2], "num_blocks": 2, "attn_resolutions": [8],
                         "dropout": 0.0, "patch": 1},
                "train": {"budget_images": 400_000, "batch_size": 256, "lr": 2e-3, "ema_halflife_images": 50_000,
                          "warmup_images": 20_000, "label_dropout": 0.0, "hflip": False, "p_mean": -1.2, "p_std": 1.2,
                          "sample_steps": 18, "sigma_min": SIGMA_MIN, "guidance": 1.0, "sampler": "heun"}},
        # The paper's scale (~37M parameters at 32 px): 128 channels, 4 levels, attention at 16 and 8 px,
        # 25M images per module, 50 Heun steps (99 network calls per image). Hours per data set.
        "paper": {"arch": {"channels": 128, "channel_mult": [1, 2, 2, 2], "num_blocks": 2, "attn_resolutions": [16, 8],
                           "dropout": 0.1, "patch": 1},
                  "train": {"budget_images": 25_000_000, "batch_size": 512, "lr": 1e-3, "ema_halflife_images": 500_000,
                            "warmup_images": 1_000_000, "label_dropout": 0.0, "hflip": False, "p_mean": -1.2, "p_std": 1.2,
                            "sample_steps": 50, "sigma_min": SIGMA_MIN, "guidance": 1.0, "sampler": "heun"}},
    }

    @classmethod
    def arch_rules(cls, lim):
        return {"channels": lambda v: is_int(v) and 1 <= v <= lim.max_channels,
                "num_blocks": lambda v: is_int(v) and 1 <= v <= lim.max_blocks,
                "channel_mult": lambda v: ints(v, 1, 16, lim.max_levels, 1),
                "attn_resolutions": lambda v: ints(v, 1, lim.max_resolution, 8),
                "dropout": lambda v: is_number(v) and 0 <= v < 1,
                "patch": lambda v: is_int(v) and 1 <= v <= 8}

    @classmethod
    def training_rules(cls, lim):
        return {**super().training_rules(lim),
                "sample_steps": lambda v: is_int(v) and 1 <= v <= 1000,
                "sigma_min": lambda v: is_number(v) and 0 < v < 80,
                "guidance": lambda v: is_number(v) and 0 <= v <= 100}

    def build_network(self):
        h, w, c = self.image_shape
        return UNet(max(h, w), c, self.num_local_classes, **self.arch)

    def loss(self, net, x, labels, gen):
        p = self.train_cfg["label_dropout"]
        if p > 0:  # the null label (index = number of classes) trains the unconditional branch
            drop = torch.rand(len(labels), generator=gen, device=labels.device) < p
            labels = torch.where(drop, torch.full_like(labels, self.num_local_classes), labels)
        return edm_loss(net, x, labels, gen, self.train_cfg["p_mean"], self.train_cfg["p_std"])

    def noise_shape(self):
        h, w, c = self.image_shape
        return (c, h, w)

    def generate(self, labels, latents):
        g = float(self.train_cfg["guidance"])
        null = torch.full_like(labels, self.num_local_classes)

        def D(x, sigma: float):
            s = torch.full((len(x),), sigma, dtype=torch.float32, device=x.device)
            x = x.float()
            if g == 1.0:
                return denoise(self.net, x, s, labels).double()
            # classifier-free guidance: D_uncond + g (D_cond - D_uncond)
            both = denoise(self.net, torch.cat([x, x]), torch.cat([s, s]), torch.cat([labels, null]))
            cond, uncond = both.chunk(2)
            return (uncond + g * (cond - uncond)).double()

        steps, sigma_min = int(self.train_cfg["sample_steps"]), float(self.train_cfg["sigma_min"])
        sampler = SAMPLERS[self.train_cfg.get("sampler", "heun")]  # an older manifest names none: Heun
        return sampler(D, latents, steps, sigma_min).clamp(-1, 1)

    @torch.no_grad()
    def per_example_loss(self, images: np.ndarray, labels: np.ndarray, seed: int, batch: int = 256) -> np.ndarray:
        """Per image: the mean over MIA_SIGMAS of ||D(x + sigma n; sigma) - x||^2 with noise fixed per image."""
        local = torch.as_tensor(np.searchsorted(self.classes, labels))
        gen = torch.Generator().manual_seed(derive_seed(seed, "audit", "mia-noise"))
        out = []
        for i in range(0, len(images), batch):
            x = to_float(images[i : i + batch]).to(self.device)
            y = local[i : i + batch].to(self.device)
            total = torch.zeros(len(x), dtype=torch.float64)
            for s in MIA_SIGMAS:
                n = torch.randn(x.shape, generator=gen).to(self.device)
                sigma = torch.full((len(x),), s, device=self.device)
                # the module's own precision, as in sampling: fp32 would double the audit's time on bf16 units
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    d = denoise(self.net, x + s * n, sigma, y).float()
                total += ((d - x) ** 2).flatten(1).mean(1).double().cpu()
            out.append(total / len(MIA_SIGMAS))
        return torch.cat(out).numpy()


register_kind(DiffusionModule)
