"""mvmm's layers import downward only, and no modules import each other in a cycle.

    core → spatial → data → mixture → solvers (and nets) → application

A module may import its own layer and the layers below it, at module level or inside a function.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mvmm"

LAYERS = ["core", "spatial", "data", "mixture", "solvers", "application"]
# modules by layer, as prefixes of dotted names; the first match wins
LAYER_OF = [
    ("mvmm.core", "core"),
    ("mvmm.spatial", "spatial"),
    ("mvmm.data", "data"),
    ("mvmm.mixture", "mixture"),
    ("mvmm.joint", "solvers"), ("mvmm.register", "solvers"), ("mvmm.atlas_build", "solvers"),
    ("mvmm.metrics", "solvers"), ("mvmm.postprocess", "solvers"), ("mvmm.nets", "solvers"),
    ("mvmm.multi_atlas", "solvers"), ("mvmm.joint_fusion", "solvers"), ("mvmm.pathology", "solvers"),
    ("mvmm.slice_alignment", "solvers"),
    ("mvmm.segment", "application"), ("mvmm.amortized", "application"), ("mvmm.training", "application"), ("mvmm.cli", "application"), ("mvmm.report", "application"),
    ("mvmm.evaluate", "application"), ("mvmm.demo", "application"), ("mvmm.experiments", "application"),
    ("mvmm.__main__", "application"),
]


def layer(module: str) -> str:
    if module == "mvmm":
        return "core"  # the package root holds only __version__
    for prefix, name in LAYER_OF:
        if module == prefix or module.startswith(prefix + "."):
            return name
    raise KeyError(module)


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def mvmm_imports(path: Path, package: Path):
    """(line, imported module) for every import of an mvmm module in ``path``, wherever it stands."""
    this = module_name(path, package)
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = this.split(".")[: len(this.split(".")) - node.level + (path.name == "__init__.py")]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
            # "from mvmm.data import io" imports the module mvmm.data.io
            names += [f"{names[0]}.{alias.name}" for alias in node.names
                      if (package.parent / Path(*f"{names[0]}.{alias.name}".split("."))).with_suffix(".py").exists()
                      or (package.parent / Path(*f"{names[0]}.{alias.name}".split("."))).is_dir()]
        else:
            continue
        for name in names:
            if name == "mvmm" or name.startswith("mvmm."):
                yield node.lineno, name


def import_graph(package: Path):
    graph, where = {}, {}
    for path in sorted(package.rglob("*.py")):
        this = module_name(path, package)
        graph.setdefault(this, set())
        for line, name in mvmm_imports(path, package):
            graph[this].add(name)
            where[this, name] = f"{path.relative_to(package.parent)}:{line}"
    return graph, where


def upward_imports(package: Path):
    graph, where = import_graph(package)
    bad = []
    for module, targets in graph.items():
        for target in targets:
            if LAYERS.index(layer(target)) > LAYERS.index(layer(module)):
                bad.append(f"{where[module, target]}: {module} ({layer(module)}) imports {target} ({layer(target)})")
    return sorted(bad)


def cycles(package: Path):
    """Strongly connected components of more than one module (Tarjan), each a cycle of imports."""
    graph, _ = import_graph(package)
    modules = set(graph)
    # a package's __init__ re-exports its modules: that edge is not a dependency of the modules on it
    edges = {m: {t for t in graph[m] if t in modules and not (t.startswith(m + "."))} for m in graph}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    graph, _ = import_graph(PACKAGE)
    for module in graph:
        layer(module)  # raises KeyError for a module the map does not place


def test_layers_import_downward_only():
    assert upward_imports(PACKAGE) == []


def test_no_import_cycles():
    assert cycles(PACKAGE) == []


def test_the_check_catches_an_upward_import_and_a_cycle(tmp_path):
    package = tmp_path / "mvmm"
    for sub in ("core", "spatial", "mixture"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "core" / "grid.py").write_text("from mvmm.mixture.model import X\n")  # upward
    (package / "mixture" / "model.py").write_text("X = 1\n")
    (package / "spatial" / "a.py").write_text("from mvmm.spatial import b\n")
    (package / "spatial" / "b.py").write_text("def f():\n    from mvmm.spatial.a import g\n")  # a cycle
    assert upward_imports(package) == ["mvmm/core/grid.py:1: mvmm.core.grid (core) imports mvmm.mixture.model "
                                       "(mixture)"]
    assert cycles(package) == [["mvmm.spatial.a", "mvmm.spatial.b"]]


@pytest.mark.parametrize("module", ["mvmm.segment", "mvmm.report", "mvmm.cli"])
def test_importing_changes_no_global_state(module):
    """No matplotlib backend switch (a notebook's inline backend must survive importing mvmm)."""
    import subprocess
    import sys
    code = ("import matplotlib; before = matplotlib.get_backend(); "
            f"import {module}; after = matplotlib.rcParams._get_backend_or_none(); "
            "assert after in (None, before), (before, after)")
    env = {"MPLBACKEND": "svg", "PATH": ""}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
