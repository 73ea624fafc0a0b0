"""Batch augmentation on tensors: random crops (reflect-padded) and flips, or the dihedral
group (flips and 90-degree rotations) for microscopy and dermoscopy."""

from __future__ import annotations

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


def augment(x: torch.Tensor, policy: str, gen: torch.Generator) -> torch.Tensor:
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
