"""The package's shape: no import circle between its modules, no function too long to read at once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "monai_patchplug"
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from package import submodule`` imports the submodule
            targets = [
                f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module for alias in node.names
            ]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a list of modules, or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_imports_resolve_relative_and_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from .x import y\ndef f():\n    from ..z import w\n")
    found = _imports("pkg.sub.m", module, {"pkg.sub.x", "pkg.z", "pkg.sub.m"})
    assert found == {"pkg.sub.x", "pkg.z"}


def test_no_import_circle_inside_the_package():
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(name, path, known) for name, path in modules.items()}
    assert sum(len(v) for v in graph.values()) > 20  # the reader sees the package's imports
    assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph) or [])}"


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef, source: list[str]) -> int:
    """Non-blank, non-comment lines of a function's body, its docstring excluded (the signature is a declaration:
    a MONAI-compatible class takes thirty keyword arguments, one per line)."""
    body = node.body
    if (
        isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        body = body[1:]
    if not body:
        return 0
    lines = source[body[0].lineno - 1 : node.end_lineno]
    return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))


def test_code_lines_count_the_body_without_docstring_or_comments():
    source = 'def f(\n    a,\n):\n    """Doc.\n\n    More.\n    """\n    # note\n    x = a\n\n    return x\n'
    node = ast.parse(source).body[0]
    assert _code_lines(node, source.splitlines()) == 2


@pytest.mark.parametrize("name", sorted(_modules()))
def test_no_function_is_longer_than_sixty_lines(name):
    path = _modules()[name]
    source = path.read_text().splitlines()
    long = [
        f"{node.name} ({_code_lines(node, source)} lines, line {node.lineno})"
        for node in ast.walk(ast.parse("\n".join(source)))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _code_lines(node, source) > MAX_FUNCTION_LINES
    ]
    assert not long, f"{name}: functions over {MAX_FUNCTION_LINES} lines of code: {long}"
