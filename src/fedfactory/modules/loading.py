"""Loading a module folder: every declared number checked before any tensor is built."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import FedFactoryError
from .base import GenerativeModule
from .fileformat import ModuleFileError, read_manifest, read_weights
from .limits import Limits, check_declared, check_parameters
from .privacy_block import check_privacy_block
from .registry import module_kinds


def load_module(path: str | Path, device: str = "auto", bf16: str = "auto", limits=None) -> GenerativeModule:
    """Load and verify a module folder; a bad one raises ModuleFileError naming the file and why.

    Everything the manifest declares is checked against `limits` (modules/limits.py) and its kind's
    declared rules (modules/registry.py) before any tensor is built or the weights are read.
    """
    limits = limits or Limits()
    where = str(Path(path) / "manifest.json")
    manifest = read_manifest(path)
    kinds = module_kinds()
    if not isinstance(manifest["kind"], str) or manifest["kind"] not in kinds:
        raise ModuleFileError(f"{where}: unknown module kind {str(manifest['kind'])[:40]!r}")
    cls = kinds[manifest["kind"]]
    check_declared(manifest, cls, limits, where)
    check_privacy_block(manifest, where)
    try:
        module = cls.from_manifest(manifest, device=device, bf16=bf16)
        check_parameters(module, limits, where)
        with torch.random.fork_rng(devices=[]):
            net = module.build_network()
    except (KeyError, TypeError, ValueError, RuntimeError, FedFactoryError) as e:
        if isinstance(e, ModuleFileError):
            raise
        raise ModuleFileError(f"{where}: cannot build the declared architecture: {str(e)[:200]}") from None
    state = read_weights(path, manifest, net.state_dict(), max_bytes=limits.max_module_bytes)
    net.load_state_dict(state)
    module.net = net.to(module.device).eval().requires_grad_(False)
    module.saved_manifest = manifest
    return module
