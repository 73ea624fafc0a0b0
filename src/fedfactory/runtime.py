"""Runtime settings shared by sites and the server: threads, device, bf16, GPU determinism."""

from __future__ import annotations

import os

import torch

from .config import Config
from .tensors import resolve_device, use_bf16


# torch's own choice (the physical cores), kept so that runtime.threads = 0 restores it: float results
# depend on the thread count, and an earlier run in the same process may have changed it.
DEFAULT_THREADS = torch.get_num_threads()


# A training site's peak memory (a CPU-preset module under DP-SGD, the largest; benchmarks/README.md), so that
# the automatic split never starts more sites at once than the memory holds.
SITE_MEMORY = 2.5 * 2**30


def available_memory() -> int:
    """Bytes the system can give without swapping (Linux's MemAvailable, counting reclaimable cache)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def site_split(cfg: Config, sites: int) -> tuple[int, int]:
    """(processes, threads each) for training `sites` modules at once: runtime.parallel_clients, or
    with 0 a rule from measured figures. A small module uses one core well and two
    poorly (benchmarks/README.md), so the sites train side by side, one process per core up to the number of
    sites and what the memory holds, and share the cores. One GPU trains one site at a time."""
    rt = cfg.runtime
    workers = rt.parallel_clients
    if workers == 0:
        if resolve_device(rt.device).type == "cuda":
            workers = 1
        else:
            workers = max(1, min(DEFAULT_THREADS, int(available_memory() // SITE_MEMORY)))
    workers = max(1, min(workers, sites))
    # runtime.threads, when set, is each process's (so that a site can reproduce its module's bits)
    return workers, rt.threads or threads_each(workers)


def threads_each(processes: int) -> int:
    """Threads for each of `processes` sharing this machine's cores: an equal share, at least one."""
    return max(1, DEFAULT_THREADS // processes)


def setup_runtime(cfg: Config) -> None:
    rt = cfg.runtime
    torch.set_num_threads(rt.threads or DEFAULT_THREADS)
    if resolve_device(rt.device).type == "cuda":
        cuda_determinism(rt.deterministic)


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


def classifier_kw(cfg: Config, augment: str = "natural") -> dict:
    """Device, bf16, progress and augmentation policy for train_classifier (augment: the data's own policy,
    used when classifier.augment is "auto")."""
    device = resolve_device(cfg.runtime.device)
    policy = augment if cfg.classifier.augment == "auto" else cfg.classifier.augment
    return dict(augment_policy=policy, device=device, bf16=use_bf16(device, cfg.runtime.bf16),
                progress=cfg.runtime.progress)
