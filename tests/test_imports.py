"""The module graph: no import cycles, and the launch side never reaches back into the chat entrypoint."""
import ast
from pathlib import Path

from helpers import REPO


def _module_imports(path: Path, package: str) -> set[str]:
    """Every qwen15_exp module a file imports, at top level or inside functions."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith(package))
    return out


def test_no_import_cycles():
    root = REPO / "qwen15_exp"
    modules = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {m: {d for d in _module_imports(p, "qwen15_exp") if d in modules and d != m} for m, p in modules.items()}
    # packages re-export nothing, so an edge to a package is an edge to its __init__ only
    state: dict[str, int] = {}

    def visit(m, trail):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, trail + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])
    assert "qwen15_exp.chat" not in {d for m, ds in graph.items() if m.startswith("qwen15_exp.launch") for d in ds}
