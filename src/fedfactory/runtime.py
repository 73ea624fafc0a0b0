"""Runtime settings shared by sites and the server: threads, device, bf16, GPU determinism."""

from __future__ import annotations

import os

import torch

from .modules.base import resolve_device, use_bf16


# torch's own choice (the physical cores), kept so that runtime.threads = 0 restores it: float results
# depend on the thread count, and an earlier run in the same process may have changed it.
DEFAULT_THREADS = torch.get_num_threads()


def setup_runtime(cfg: dict) -> None:
    rt = cfg["runtime"]
    torch.set_num_threads(rt["threads"] or DEFAULT_THREADS)
    if resolve_device(rt["device"]).type == "cuda":
        cuda_determinism(rt["deterministic"])


def cuda_determinism(on: bool) -> None:
    """Deterministic GPU kernels (cuDNN, cuBLAS, scatter/index ops) or the fastest ones.

    An op with no deterministic CUDA kernel warns, naming itself, rather than stopping a run;
    benchmarks/gpu_check.py compares two identical fits by hash to show what holds.
    """
    if on:  # cuBLAS reads this when its first handle is made: before any GPU matrix product
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on
    torch.use_deterministic_algorithms(on, warn_only=True)


def classifier_kw(cfg: dict, augment: str = "natural") -> dict:
    """Device, bf16, progress and augmentation policy for train_classifier (augment: the data's own policy,
    used when classifier.augment is "auto")."""
    device = resolve_device(cfg["runtime"]["device"])
    policy = augment if cfg["classifier"]["augment"] == "auto" else cfg["classifier"]["augment"]
    return dict(augment_policy=policy, device=device, bf16=use_bf16(device, cfg["runtime"]["bf16"]),
                progress=cfg["runtime"]["progress"])
