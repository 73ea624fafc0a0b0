"""Every function in src/fedfactory is at most MAX_LINES long (from `def` to the end of its body) and
takes at most MAX_PARAMS parameters (self and cls not counted, keyword-only ones counted), unless a
comment on its def line or the line above says why: "long because ..." or "many parameters because ...".
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fedfactory"
MAX_LINES, MAX_PARAMS = 60, 7
WHY = {"lines": "long because", "params": "many parameters because"}



def functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function, methods and nested functions included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from functions(node, f"{prefix}{node.name}.")
        else:
            yield from functions(node, prefix)


def parameters(node) -> int:
    a = node.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    return len([n for n in names if n not in ("self", "cls")])


def justified(lines: list[str], node, what: str) -> bool:
    """A comment with the reason on the def line, or in the comment lines right above it (or above its
    decorators)."""
    first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1  # 0-based
    comments = [lines[node.lineno - 1].split("#", 1)[1] if "#" in lines[node.lineno - 1] else ""]
    i = first - 1
    while i >= 0 and lines[i].lstrip().startswith("#"):
        comments.append(lines[i])
        i -= 1
    return any(WHY[what] in c for c in comments)


def offenders() -> list[str]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        lines, rel = text.splitlines(), path.relative_to(SRC).as_posix()
        for name, node in functions(ast.parse(text)):
            over = {"lines": node.end_lineno - node.lineno + 1 > MAX_LINES, "params": parameters(node) > MAX_PARAMS}
            for what in (w for w, bad in over.items() if bad):
                if not justified(lines, node, what):
                    out.append(f"{rel}:{node.lineno} {name}: {node.end_lineno - node.lineno + 1} lines, "
                               f"{parameters(node)} parameters")
    return out


def test_functions_are_short_and_take_few_parameters():
    bad = offenders()
    assert not bad, (f"over {MAX_LINES} lines or {MAX_PARAMS} parameters, with no '# long because ...' or "
                     "'# many parameters because ...' comment on the def line or the line above:\n" + "\n".join(bad))


def test_the_check_sees_a_long_function_and_its_reason():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    for above, expected in (("", False), ("# long because it says so\n", True), ("# long, because\n", False),
                            ("# long because it says so,\n# over two lines\n", True),
                            ("# long because a blank line parts it\n\n", False)):
        text = f"{above}def f(a, b, c, d, e, f, g, h):\n{body}\n"
        (name, node), = functions(ast.parse(text))
        assert name == "f" and node.end_lineno - node.lineno + 1 > MAX_LINES and parameters(node) == 8
        assert justified(text.splitlines(), node, "lines") is expected
        assert not justified(text.splitlines(), node, "params")
