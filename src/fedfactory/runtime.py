"""Runtime settings shared by sites and the server: threads, device, bf16."""

from __future__ import annotations

import torch

from .modules.base import resolve_device, use_bf16


# torch's own choice (the physical cores), kept so that runtime.threads = 0 restores it: float results
# depend on the thread count, and an earlier run in the same process may have changed it.
DEFAULT_THREADS = torch.get_num_threads()


def setup_runtime(cfg: dict) -> None:
    torch.set_num_threads(cfg["runtime"]["threads"] or DEFAULT_THREADS)


def classifier_kw(cfg: dict, augment: str = "natural") -> dict:
    """Device, bf16, progress and augmentation policy for train_classifier (augment: the data's own policy,
    used when classifier.augment is "auto")."""
    device = resolve_device(cfg["runtime"]["device"])
    policy = augment if cfg["classifier"]["augment"] == "auto" else cfg["classifier"]["augment"]
    return dict(augment_policy=policy, device=device, bf16=use_bf16(device, cfg["runtime"]["bf16"]),
                progress=cfg["runtime"]["progress"])
