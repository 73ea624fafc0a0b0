"""What a module's manifest may declare, checked before any tensor is built.

A manifest comes from a peer. Left unchecked, one that declares a billion-parameter network, a
resolution of a million pixels or a class id of 10**12 makes the receiver allocate whatever it
says. So every declared number is checked against caps first, and the network's parameter count
is computed on PyTorch's meta device, where shapes exist but no memory is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fileformat import ModuleFileError


@dataclass(frozen=True)
class Limits:
    max_parameters: int = 100_000_000
    max_channels: int = 1024      # base channels (cVAE: and latent size)
    max_levels: int = 6           # U-Net resolution levels (len(channel_mult))
    max_blocks: int = 8           # residual blocks per level
    max_resolution: int = 512     # image height and width, pixels
    max_classes: int = 1000       # class ids a module may declare (when the federation's count is unknown)
    max_count: int = 10_000_000   # real images a module may claim per class
    max_module_bytes: int = 1 << 30
    image_shape: tuple[int, int, int] | None = None  # the federation's [H, W, C], when known
    num_classes: int | None = None                   # the federation's class count, when known

    @classmethod
    def from_config(cls, federation, image_shape=None, num_classes=None) -> "Limits":
        """The caps of a config's [federation] section (config.FederationConfig; modules never import the config)."""
        keys = ("max_parameters", "max_channels", "max_resolution", "max_count", "max_module_bytes")
        return cls(**{k: getattr(federation, k) for k in keys}, image_shape=tuple(image_shape) if image_shape else None,
                   num_classes=num_classes)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def ints(v, lo: int, hi: int, max_len: int, min_len: int = 0) -> bool:
    """Is `v` a list of min_len..max_len integers in lo..hi?"""
    return (isinstance(v, list) and min_len <= len(v) <= max_len
            and all(is_int(x) and lo <= x <= hi for x in v))


def check_declared(manifest: dict, kind, lim: Limits, where: str) -> None:
    """Refuse (ModuleFileError) a manifest whose declared shapes, classes, counts, architecture or
    sampling settings exceed `lim` or its kind's declared rules (`kind.arch_rules`, `kind.training_rules`)."""
    def refuse(why):
        raise ModuleFileError(f"{where}: {why}")

    shape = manifest["image_shape"]
    if not (ints(shape, 1, lim.max_resolution, 3, 3) and shape[2] in (1, 3)):
        refuse(f"image_shape must be [H, W, C] with H, W in 1..{lim.max_resolution} and C 1 or 3, got {shape!r:.80}")
    if lim.image_shape and tuple(shape) != tuple(lim.image_shape):
        refuse(f"image_shape {shape} is not the federation's {list(lim.image_shape)}")
    top = (lim.num_classes or lim.max_classes) - 1
    classes, counts = manifest["classes"], manifest["counts"]
    if not ints(classes, 0, top, top + 1, 1) or len(set(classes)) != len(classes) or classes != sorted(classes):
        refuse(f"classes must be distinct sorted class ids in 0..{top}, got {classes!r:.80}")
    if not ints(counts, 1, lim.max_count, len(classes), len(classes)):
        refuse(f"counts must give 1..{lim.max_count} images for each of the {len(classes)} classes, got {counts!r:.80}")
    arch, arch_keys = manifest["arch"], kind.presets["cpu"]["arch"]
    if not isinstance(arch, dict) or set(arch) - set(arch_keys):
        refuse(f"arch must hold only {sorted(arch_keys)}, got {str(arch)[:80]}")
    rules = kind.arch_rules(lim)  # key -> is the declared value within the caps?
    for k, v in arch.items():
        if not rules.get(k, lambda v: False)(v):
            refuse(f"arch.{k} = {v!r:.40} is outside what this server accepts")
    training = manifest.get("training", {})
    if not isinstance(training, dict):
        refuse("training must be an object")
    for k, ok in kind.training_rules(lim).items():  # what the receiver will run when it samples
        if k in training and not ok(training[k]):
            refuse(f"training.{k} = {training[k]!r:.40} is outside what this server accepts")


def check_parameters(module, lim: Limits, where: str) -> None:
    """Count the declared network's parameters on the meta device: shapes only, no memory."""
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        n = sum(p.numel() for p in module.build_network().parameters())
    if n > lim.max_parameters:
        raise ModuleFileError(f"{where}: the declared network has {n:,} parameters, over the cap of "
                              f"{lim.max_parameters:,} (federation.max_parameters)")
