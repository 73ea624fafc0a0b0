"""A compact U-Net for EDM denoising: residual blocks with scale/shift conditioning on noise
level and class, optional self-attention, any image size (padded to the U-Net's stride), and an
optional patch stem: `patch` x `patch` pixels become one position with patch^2 times the channels."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(ch, min(32, max(1, ch // 4))), ch)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb, 2 * cout)
        self.norm2, self.conv2 = _norm(cout), _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm2(h), scale + 1))
        return (self.skip(x) + self.conv2(self.dropout(h))) * math.sqrt(0.5)


class Attention(nn.Module):
    def __init__(self, ch: int, head_dim: int = 32):
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm, self.qkv, self.proj = _norm(ch), nn.Conv2d(ch, 3 * ch, 1), _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        if x.is_cuda:  # the fused GPU kernels need a unit stride in the last dimension, or fall back to math;
            q, k, v = (t.contiguous() for t in (q, k, v))  # CPU keeps its layout (and its shipped bits)
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        return (x + self.proj(out)) * math.sqrt(0.5)


class UNet(nn.Module):
    """F(x, c_noise, class) for images of `resolution` px; `num_classes` + 1 labels (the last is null)."""

    # many parameters because the image's shape and class count come with the arch keys of a module's
    # manifest (channels ... dropout), which build it as UNet(..., **arch)
    def __init__(self, resolution: int, in_channels: int, num_classes: int, channels: int = 32,
                 channel_mult=(1, 2, 2), num_blocks: int = 2, attn_resolutions=(), dropout: float = 0.0,
                 patch: int = 1):
        super().__init__()
        # A patch stem does the same work at a quarter of the positions with twice the channels (patch 2):
        # a CPU's convolutions run nearer their peak on wider channels, and per-element work halves.
        self.patch, self.stride = patch, 2 ** (len(channel_mult) - 1)
        in_channels *= patch * patch
        emb = 4 * channels
        self.channels = channels
        self.map_noise = nn.Sequential(nn.Linear(channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.map_label = nn.Embedding(num_classes + 1, emb)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        res = math.ceil(resolution / patch / self.stride) * self.stride  # attn_resolutions count positions
        self.down, skips, ch = nn.ModuleList(), [channels], channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_blocks):
                self.down.append(self._block(ch, channels * mult, emb, dropout, res in attn_resolutions))
                ch = channels * mult
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.AvgPool2d(2))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([self._block(ch, ch, emb, dropout, True), self._block(ch, ch, emb, dropout, False)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_blocks + 1):
                self.up.append(self._block(ch + skips.pop(), channels * mult, emb, dropout, res in attn_resolutions))
                ch = channels * mult
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                res *= 2
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), _zero(nn.Conv2d(ch, in_channels, 3, padding=1)))

    @staticmethod
    def _block(cin, cout, emb, dropout, attn):
        blocks = [ResBlock(cin, cout, emb, dropout)] + ([Attention(cout)] if attn else [])
        return nn.ModuleList(blocks)

    def _run(self, block, x, emb):
        if isinstance(block, nn.ModuleList):
            x = block[0](x, emb)
            return block[1](x) if len(block) > 1 else x
        return block(x)

    def forward(self, x, c_noise, labels):
        half = self.channels // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=x.device) / half)
        angle = c_noise.float()[:, None] * 1000 * freqs[None]  # c_noise = ln(sigma)/4 is O(1): spread it
        emb = self.map_noise(torch.cat([angle.cos(), angle.sin()], dim=1)) + self.map_label(labels)
        emb = F.silu(emb)
        h, w = x.shape[-2:]
        pad = self.stride * self.patch
        x = F.pad(x, (0, (-w) % pad, 0, (-h) % pad))
        x = self.conv_in(F.pixel_unshuffle(x, self.patch) if self.patch > 1 else x)
        skips = [x]
        for block in self.down:
            x = self._run(block, x, emb)
            skips.append(x)
        for block in self.mid:
            x = self._run(block, x, emb)
        for block in self.up:
            if isinstance(block, nn.ModuleList):
                x = torch.cat([x, skips.pop()], dim=1)
            x = self._run(block, x, emb)
        x = self.out(x)
        return (F.pixel_shuffle(x, self.patch) if self.patch > 1 else x)[..., :h, :w]
