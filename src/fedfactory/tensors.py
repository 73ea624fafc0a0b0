"""Pixels, tensors and devices: the helpers every layer shares (layer "base": imports nothing of fedfactory
but errors).

Images cross the package as uint8 N x H x W x C arrays; networks see float N x C x H x W in [-1, 1].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import FedFactoryError

# Batch indices are drawn on the host this many steps at a time and copied once per block.
INDEX_BLOCK = 512


def to_model(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 N x H x W x C (on any device) -> float N x C x H x W in [-1, 1]."""
    return pixels.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x C array -> float N x C x H x W tensor in [-1, 1]."""
    return to_model(torch.from_numpy(np.require(images, requirements=["C", "W"])))


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float N x C x H x W in [-1, 1] -> uint8 N x H x W x C array (rounded, clamped)."""
    return x.float().add(1.0).mul(127.5).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def index_blocks(rng: np.random.Generator, high: int, batch: int, steps: int, device: torch.device):
    """Per-step batch indices (uniform with replacement), copied to the device a block at a time:
    the same numbers as one `rng.integers(0, high, batch)` per step, without a copy per step."""
    for first in range(0, steps, INDEX_BLOCK):
        yield from torch.from_numpy(rng.integers(0, high, (min(INDEX_BLOCK, steps - first), batch))).to(device)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise FedFactoryError("runtime.device is cuda but no CUDA GPU is available")
    return torch.device(name)


def use_bf16(device: torch.device, setting: str = "auto") -> bool:
    """bf16 autocast: on GPUs and on CPUs with AMX/AVX512-BF16, where it pays (benchmarks/README.md)."""
    if setting != "auto":
        return setting == "on"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:  # native bf16 units only: elsewhere bf16 is emulated and slower than fp32
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags
