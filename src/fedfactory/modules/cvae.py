"""A conditional VAE (Kingma & Welling 2014; Sohn et al. 2015): the cheap generative module.
Faster to train than diffusion, blurrier samples."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import GenerativeModule
from .limits import is_int
from .registry import register_kind


class CVAE(nn.Module):
    def __init__(self, resolution: int, in_channels: int, num_classes: int, channels: int = 32, latent: int = 32):
        super().__init__()
        self.res = -(-resolution // 4) * 4  # padded to the encoder's stride
        self.latent, ch, r = latent, channels, self.res // 4
        self.embed = nn.Embedding(num_classes, 2 * ch * r * r)
        self.enc = nn.Sequential(nn.Conv2d(in_channels, ch, 4, 2, 1), nn.SiLU(), nn.Conv2d(ch, 2 * ch, 4, 2, 1), nn.SiLU())
        self.to_stats = nn.Linear(2 * 2 * ch * r * r, 2 * latent)
        self.from_z = nn.Linear(latent, 2 * ch * r * r)
        self.dec = nn.Sequential(nn.SiLU(), nn.ConvTranspose2d(2 * ch, ch, 4, 2, 1), nn.SiLU(),
                                 nn.ConvTranspose2d(ch, in_channels, 4, 2, 1))
        self.shape = (2 * ch, r, r)

    def encode(self, x, labels):
        h = self.enc(F.pad(x, (0, self.res - x.shape[-1], 0, self.res - x.shape[-2]), value=-1.0)).flatten(1)
        return self.to_stats(torch.cat([h, self.embed(labels)], 1)).chunk(2, dim=1)

    def decode(self, z, labels, hw):
        h = (self.from_z(z) + self.embed(labels)).view(-1, *self.shape)
        return torch.tanh(self.dec(h))[..., : hw[0], : hw[1]]


class CVAEModule(GenerativeModule):
    kind = "cvae"
    presets = {
        "cpu": {"arch": {"channels": 32, "latent": 32},
                "train": {"budget_images": 200_000, "batch_size": 128, "lr": 1e-3, "ema_halflife_images": 10_000,
                          "warmup_images": 0, "hflip": False, "beta": 1.0}},
        "gpu": {"arch": {"channels": 128, "latent": 128},
                "train": {"budget_images": 2_000_000, "batch_size": 256, "lr": 1e-3, "ema_halflife_images": 100_000,
                          "warmup_images": 0, "hflip": False, "beta": 1.0}},
    }
    presets["paper"] = presets["gpu"]  # the paper has no cVAE: its scale is the GPU preset
    # beta weighs the KL term (beta-VAE, Higgins et al. 2017): a config key like any preset value (module.beta)
    key_rules = {**GenerativeModule.key_rules, "channels": "positive", "latent": "positive", "beta": "non-negative"}

    @classmethod
    def arch_rules(cls, lim):
        return {"channels": lambda v: is_int(v) and 1 <= v <= lim.max_channels,
                "latent": lambda v: is_int(v) and 1 <= v <= lim.max_channels}

    def build_network(self):
        h, w, c = self.image_shape
        return CVAE(max(h, w), c, self.num_local_classes, **self.arch)

    def loss(self, net, x, labels, gen):
        mu, logvar = net.encode(x, labels)
        z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=gen, device=mu.device)
        recon = net.decode(z, labels, x.shape[-2:]).float()
        rec = ((recon - x.float()) ** 2).sum(dim=(1, 2, 3))
        kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).float().sum(dim=1)
        return (rec + self.train_cfg["beta"] * kl).mean() / x[0].numel()

    def noise_shape(self):
        return (int(self.arch["latent"]),)

    def generate(self, labels, noise):
        h, w, _ = self.image_shape
        return self.net.decode(noise, labels, (h, w)).float()


register_kind(CVAEModule)
