"""Generative modules: the unit of federation (fit / sample / save / load)."""

from .base import GenerativeModule, load_module, module_kinds
from .fileformat import ModuleFileError

__all__ = ["GenerativeModule", "ModuleFileError", "load_module", "module_kinds"]
