"""Lower layers never import higher ones: every import under src/fedfactory/ (top level and inside
functions, relative and absolute) against the layer order written once in docs/ARCHITECTURE.md."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "fedfactory"


def layer_table() -> list[tuple[str, list[str]]]:
    """[(layer, [fedfactory-relative names])], lowest first, from docs/ARCHITECTURE.md's ```layers block."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/ARCHITECTURE.md has no ```layers block"
    table = []
    for line in block.group(1).splitlines():
        if line.strip():
            name, _, names = line.partition(":")
            table.append((name.strip(), names.split()))
    return table


def rank_of(module: str, table) -> int | None:
    """The layer index of a dotted module under fedfactory ('' = the package itself), by the longest name."""
    parts = module.split(".") if module else ["__init__"]
    best, best_len = None, 0
    for rank, (_, names) in enumerate(table):
        for n in names:
            p = n.split(".")
            if parts[: len(p)] == p and len(p) > best_len:
                best, best_len = rank, len(p)
    return best


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, fedfactory-relative target) of every import of fedfactory in `source`, at any depth."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    package = [p for p in package if p]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "fedfactory"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join(["fedfactory", *base, *([node.module] if node.module else [])])
            elif (node.module or "").split(".")[0] == "fedfactory":
                target = node.module
            else:
                continue
            # `from . import x` / `from .pkg import sub`: the submodule when there is one
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names] or [(node.lineno, target)]
    return [(line, t.removeprefix("fedfactory").lstrip(".")) for line, t in out]


def is_module(name: str) -> bool:
    path = SRC.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def violations(source: str, module: str, is_package: bool, table) -> list[str]:
    own = rank_of(module, table)
    bad = []
    for line, target in imports_of(source, module, is_package):
        while "." in target and not is_module(target):  # `from .x import name`: name is not a module
            target = target.rsplit(".", 1)[0]
        target_rank = rank_of(target, table)
        if target_rank is not None and own is not None and target_rank > own:
            bad.append(f"{module or 'fedfactory'} (layer {table[own][0]}) line {line} imports {target} "
                       f"(layer {table[target_rank][0]})")
    return bad


def test_every_file_has_a_layer():
    table = layer_table()
    missing = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if rank_of(module_name(p), table) is None]
    assert not missing, f"files in no layer of docs/ARCHITECTURE.md: {missing}"


def test_no_lower_layer_imports_a_higher_one():
    table = layer_table()
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        bad += violations(path.read_text(), module_name(path), path.name == "__init__.py", table)
    assert not bad, "lower layers import higher ones:\n" + "\n".join(bad)


@pytest.mark.parametrize("source, module, is_package", [
    ("def fit():\n    from ..privacy import dp\n", "modules.base", False),       # inside a function
    ("from ..report import save_png\n", "privacy.audit", False),                # relative, two levels
    ("import fedfactory.server\n", "data.npz", False),                          # absolute
    ("from fedfactory.runners import embedded\n", "factory", False),
    ("from ..site import new_module\n", "modules", True),                       # a package's __init__
])
def test_the_check_catches_an_upward_import(source, module, is_package):
    assert violations(source, module, is_package, layer_table())


@pytest.mark.parametrize("source, module, is_package", [
    ("from ..tensors import to_float\n", "classify.train", False),
    ("from .base import GenerativeModule\n", "modules.diffusion", False),
    ("from .. import __version__\n", "modules.base", False),
    ("from . import diffusion\n", "modules", True),
    ("from ..modules import GenerativeModule\n", "privacy.audit", False),
])
def test_downward_and_same_layer_imports_pass(source, module, is_package):
    assert not violations(source, module, is_package, layer_table())
