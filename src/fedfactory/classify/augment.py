"""Batch augmentation on tensors: random crops (reflect-padded) and flips, or the dihedral
group (flips and 90-degree rotations) for microscopy and dermoscopy; optionally a random
Gaussian blur, which keeps a classifier from keying on a generator's high-frequency artifacts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]
    return xp[torch.arange(b, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


def random_blur(x: torch.Tensor, max_sigma: float, gen: torch.Generator) -> torch.Tensor:
    """Separable Gaussian blur, sigma ~ U(0, max_sigma) pixels per image."""
    b, c, h, w = x.shape
    r = max(1, math.ceil(2 * max_sigma))
    sigma = torch.rand(b, generator=gen, device=x.device) * max_sigma + 1e-3
    taps = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-taps[None] ** 2 / (2 * sigma[:, None].to(x.dtype) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # one kernel per (image, channel)
    y = F.pad(x, (r, r, r, r), mode="reflect").reshape(1, b * c, h + 2 * r, w + 2 * r)
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    return F.conv2d(y, k[:, None, :, None], groups=b * c).reshape(b, c, h, w)


def augment(x: torch.Tensor, policy: str, gen: torch.Generator, blur: float = 0.0) -> torch.Tensor:
    if blur > 0:
        x = random_blur(x, blur, gen)
    if policy == "none":
        return x
    b = len(x)
    x = random_crop(x, max(1, x.shape[-1] // 14), gen)
    flip = torch.rand(b, generator=gen, device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if policy == "dihedral" and x.shape[-1] == x.shape[-2]:
        vflip = torch.rand(b, generator=gen, device=x.device) < 0.5
        x = torch.where(vflip[:, None, None, None], x.flip(2), x)
        rot = torch.rand(b, generator=gen, device=x.device) < 0.5
        x = torch.where(rot[:, None, None, None], x.transpose(2, 3), x)
    return x
