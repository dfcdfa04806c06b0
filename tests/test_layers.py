"""The layering of docs/architecture.md, checked on the source: passes import nothing from the
fxprune core, the core imports no application or view, nothing imports the CLI, and no
two modules import each other in a cycle."""

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
APPS = ("digits", "benchmarks", "report", "testing")
#: integrations with other frameworks: above the core, imported lazily (the framework only inside them)
INTEGRATIONS = ("hf", "integrations")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = list(rel.with_suffix("").parts)
    if parts[0] == "passes":
        parts = ["fxprune", "passes", *parts[1:]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _runtime_nodes(tree: ast.AST, type_only: bool = False):
    """Every node except those under ``if TYPE_CHECKING:`` (imports for type hints only),
    unless ``type_only``."""
    for node in ast.iter_child_nodes(tree):
        if not type_only and isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        yield node
        yield from _runtime_nodes(node, type_only)


def imports(path: Path, type_only: bool = False) -> set[str]:
    """Every fxprune module ``path`` imports at run time (at top level or inside functions),
    and with ``type_only`` those it imports for type hints too."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in _runtime_nodes(ast.parse(path.read_text()), type_only):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("fxprune")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("fxprune"):
                out.add(target)
                out |= {f"{target}.{a.name}" for a in node.names}  # `from . import x` imports module x
    return out


def modules(type_only: bool = False) -> dict[str, set[str]]:
    files = [*ROOT.glob("fxprune/**/*.py"), *ROOT.glob("passes/**/*.py")]
    found = {module_name(p): p for p in files}
    return {name: {i for i in imports(p, type_only) if i in found} for name, p in found.items()}


def layer(name: str) -> int:
    """0 passes, 1 core, 2 applications and views, 3 the CLI (the package facade is 2)."""
    parts = name.split(".")
    if parts[:2] == ["fxprune", "passes"]:
        return 0
    if name in ("fxprune.cli", "fxprune.__main__"):
        return 3
    if name == "fxprune" or (len(parts) > 1 and parts[1] in APPS + INTEGRATIONS):
        return 2
    return 1


GRAPH = modules()


def test_every_module_is_seen():
    assert {"fxprune.passes.trace", "fxprune.api", "fxprune.digits.demo", "fxprune.cli"} <= set(GRAPH)


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_no_module_imports_a_layer_above_its_own(name):
    up = sorted(i for i in GRAPH[name] if layer(i) > layer(name) and i != "fxprune")
    assert not up, f"{name} (layer {layer(name)}) imports {up}"


def test_the_cli_is_a_leaf():
    assert [n for n, deps in GRAPH.items() if "fxprune.cli" in deps] == ["fxprune.__main__"]


@pytest.mark.parametrize("type_only", [False, True], ids=["run-time", "type-hints-too"])
def test_no_import_cycles(type_only):
    graph = modules(type_only) if type_only else GRAPH
    g = nx.DiGraph([(a, b) for a, deps in graph.items() for b in deps if a != b])
    # a package importing its own submodules (``__init__`` re-exports) is not a cycle
    cycles = [c for c in nx.simple_cycles(g) if not any(x.startswith(y + ".") or y.startswith(x + ".")
                                                         for x in c for y in c if x != y)]
    assert not cycles, cycles[:3]


def test_importing_fxprune_imports_no_framework():
    """transformers is an optional extra: only fxprune.hf (and what asks for it) imports it."""
    import subprocess
    import sys

    code = "import sys, fxprune; print(sorted(m for m in ('transformers', 'lightning', 'accelerate') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.strip() == "[]"
