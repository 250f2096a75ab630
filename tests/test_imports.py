"""The package's import graph, read from the source with ``ast`` (imports inside functions
included): no module imports a command module, and no two modules import each other, directly or
through others."""

import ast
import functools
from pathlib import Path

import lub_fast

PACKAGE = Path(lub_fast.__file__).parent
COMMANDS = {f"lub_fast.{name}" for name in ("prepare", "pretrain", "distill", "finetune", "convert", "info")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """The package modules that ``module`` (the file ``path``) imports anywhere in its body.
    ``from lub_fast import x`` is the module ``lub_fast.x`` when that is a module, else the package."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # lub_fast.models.hf.from_pretrained -> lub_fast.models.hf
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


@functools.cache
def _graph() -> dict[str, set[str]]:
    """Parsed once for the three tests: the source does not change during a run."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {m: _imports(p, m, modules) for m, p in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None. Package ``__init__`` edges to their
    own submodules are kept: ``lub_fast.models -> lub_fast.models.hf -> lub_fast.models`` is a cycle."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_imports_graph_reads_imports_inside_functions():
    graph = _graph()
    # convert imports lub_fast.runs at the top, pretrain imports lub_fast.demo inside run()
    assert "lub_fast.runs" in graph["lub_fast.convert"], sorted(graph["lub_fast.convert"])
    assert "lub_fast.demo" in graph["lub_fast.pretrain"], sorted(graph["lub_fast.pretrain"])
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_imports_no_module_imports_a_command():
    graph = _graph()
    edges = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets if t in COMMANDS)
    assert not edges, f"library modules importing command modules: {edges}"


def test_imports_no_cycles():
    cycle = _cycle(_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"
