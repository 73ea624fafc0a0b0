"""The registry of module kinds: what kinds exist and what each can do, in one place.

A kind is a `GenerativeModule` subclass; its class declares its capabilities, and the config, the
file format (`load_module`), the limits and the privacy audit ask the registry instead of naming kinds:

- `presets`: its arch and training values per preset; every key in them is a config key
  (`module.<key>`, `config_keys()`), typed by its value;
- `key_rules`: checks of those keys when a config sets them ("positive", "non-negative");
- `samplers`: the names `module.sampler` may take (none: the kind has no such choice);
- `arch_rules(limits)` and `training_rules(limits)`: what a peer's manifest may declare;
- `per_example_loss(images, labels, seed)` (optional): a loss per image, lower on images the module
  trained on; the audit's membership attack calls it without knowing the kind.

Built-in kinds register themselves (modules/__init__.py imports them). A third-party kind registers
with `register_kind(cls)`, or is found through the entry point group `fedfactory.modules` of an
installed package (`[project.entry-points."fedfactory.modules"] mykind = "mypkg.mod:MyModule"`),
loaded the first time the kinds are asked for.
"""

from __future__ import annotations

import re

from ..errors import FedFactoryError
from ..utils import entry_point_objects
from .base import GenerativeModule

ENTRY_POINT_GROUP = "fedfactory.modules"
KIND_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_KINDS: dict[str, type[GenerativeModule]] = {}
_entry_points_loaded = False


def register_kind(cls: type[GenerativeModule], replace: bool = False) -> type[GenerativeModule]:
    """Register a module kind under `cls.kind` (usable as a class decorator); returns `cls`."""
    if not (isinstance(cls, type) and issubclass(cls, GenerativeModule)):
        raise FedFactoryError(f"a module kind must be a GenerativeModule subclass, got {cls!r:.80}")
    name = cls.kind
    if not isinstance(name, str) or not KIND_NAME.fullmatch(name):
        raise FedFactoryError(f"{cls.__name__}.kind must match {KIND_NAME.pattern}, got {name!r:.40}")
    presets = cls.presets
    if "cpu" not in presets or not all(isinstance(p.get("arch"), dict) and isinstance(p.get("train"), dict)
                                       for p in presets.values()):
        raise FedFactoryError(f"module kind {name!r}: presets must include 'cpu', each with 'arch' and 'train' dicts")
    if name in _KINDS and _KINDS[name] is not cls and not replace:
        raise FedFactoryError(f"module kind {name!r} is already registered ({_KINDS[name].__module__}); "
                              "pass replace=True to replace it")
    _KINDS[name] = cls
    return cls


def unregister_kind(name: str) -> None:
    """Forget a kind (tests, or a plugin that withdraws one)."""
    _KINDS.pop(name, None)


def load_entry_points(again: bool = False) -> None:
    """Register the kinds of the entry point group (once, or `again`: a package installed since)."""
    global _entry_points_loaded
    if _entry_points_loaded and not again:
        return
    _entry_points_loaded = True
    for _, cls in entry_point_objects(ENTRY_POINT_GROUP):
        if _KINDS.get(getattr(cls, "kind", None)) is not cls:
            register_kind(cls)


def module_kinds() -> dict[str, type[GenerativeModule]]:
    """Every registered kind, by name: the built-in ones first, then the plugins."""
    load_entry_points()
    return dict(_KINDS)


def get_kind(name) -> type[GenerativeModule]:
    kinds = module_kinds()
    if not isinstance(name, str) or name not in kinds:
        raise FedFactoryError(f"unknown module kind {str(name)[:40]!r}; use one of {', '.join(kinds)}")
    return kinds[name]


def config_keys() -> dict[str, object]:
    """Every `module.<key>` some kind reads, with an example value (its type: the first kind's that has it)."""
    keys: dict[str, object] = {}
    for cls in module_kinds().values():
        for key, value in cls.config_keys().items():
            keys.setdefault(key, value)
    return keys


def key_rules() -> dict[str, str]:
    """`module.<key>` -> the check a set value must pass, over every kind."""
    rules: dict[str, str] = {}
    for cls in module_kinds().values():
        rules.update({k: v for k, v in cls.key_rules.items() if k not in rules})
    return rules


def samplers(kind: str | None = None) -> tuple[str, ...]:
    """The sampler names of one kind, or of every kind."""
    kinds = [get_kind(kind)] if kind else module_kinds().values()
    return tuple(dict.fromkeys(s for cls in kinds for s in cls.samplers))
