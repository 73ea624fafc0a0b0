"""The registry of classifier networks: `classifier.preset` names one.

A network is registered by name with a builder `build(in_channels, num_classes, width) -> nn.Module`
that returns logits for N x C x H x W images in [-1, 1] (`width` 0: the network's own default). The
built-in `cpu` and `gpu` are ResNets (networks.py). A classifier file records the name; loading it
looks the name up here, so a file never brings code, and a network the loader has not registered is
refused in one line.

A third-party network registers with `register_classifier(name, build)`, or through the entry point
group `fedfactory.classifiers` of an installed package
(`[project.entry-points."fedfactory.classifiers"] mynet = "mypkg.nets:build_mynet"`; the entry point's
name is the preset's name), loaded the first time the networks are asked for.
"""

from __future__ import annotations

import re
from typing import Callable

from ..errors import FedFactoryError
from ..utils import entry_point_objects
from .networks import PRESETS, ResNet

ENTRY_POINT_GROUP = "fedfactory.classifiers"
NAME = r"[a-z][a-z0-9_-]{0,31}"
_NETWORKS: dict[str, tuple[Callable, str]] = {}
_entry_points_loaded = False


def register_classifier(name: str, build: Callable, architecture: str = "", replace: bool = False) -> Callable:
    """Register `build(in_channels, num_classes, width) -> nn.Module` as `classifier.preset = name`."""
    if not isinstance(name, str) or not re.fullmatch(NAME, name) or not callable(build):
        raise FedFactoryError(f"a classifier network needs a name matching {NAME} and a callable builder; "
                              f"got {name!r:.40}, {build!r:.60}")
    if name in _NETWORKS and _NETWORKS[name][0] is not build and not replace:
        raise FedFactoryError(f"classifier network {name!r} is already registered; pass replace=True to replace it")
    _NETWORKS[name] = (build, architecture or name)
    return build


def unregister_classifier(name: str) -> None:
    _NETWORKS.pop(name, None)


def classifier_networks() -> dict[str, tuple[Callable, str]]:
    """Every registered network, name -> (builder, architecture): the built-in ones first, then plugins'."""
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        for name, build in entry_point_objects(ENTRY_POINT_GROUP):
            if _NETWORKS.get(name, (None,))[0] is not build:
                register_classifier(name, build)
    return dict(_NETWORKS)


def build_network(name: str, in_channels: int, num_classes: int, width: int = 0):
    networks = classifier_networks()
    if name not in networks:
        raise FedFactoryError(f"classifier network {str(name)[:40]!r} is not registered here; use one of "
                              f"{', '.join(networks)} (or install the package that provides it)")
    return networks[name][0](in_channels, num_classes, width)


def _resnet(preset: str) -> Callable:
    def build(in_channels: int, num_classes: int, width: int = 0) -> ResNet:
        p = PRESETS[preset]
        return ResNet(in_channels, num_classes, width=width or p["width"], blocks=p["blocks"])
    return build


for _preset in PRESETS:
    register_classifier(_preset, _resnet(_preset), architecture="resnet")
