"""Generative modules: the unit of federation (fit / sample / save / load), and the registry of kinds.

The built-in kinds (diffusion, cvae) register themselves when imported here; a third-party kind
registers with `register_kind` or through the entry point group `fedfactory.modules` (registry.py).
"""

from .base import GenerativeModule
from .fileformat import ModuleFileError
from .registry import get_kind, module_kinds, register_kind, unregister_kind
from . import diffusion, cvae  # noqa: F401,E402 (the built-in kinds register themselves, diffusion first)
from .loading import load_module
from .training import Trainer

__all__ = ["GenerativeModule", "ModuleFileError", "Trainer", "get_kind", "load_module", "module_kinds",
           "register_kind", "unregister_kind"]
