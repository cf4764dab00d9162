"""The shape of the library: packages by pipeline stage, imports that only point down the layers, no
import circle, the on-disk contracts free of the stages, small functions, and a public face that loads
neither torch nor FAISS (``docs/architecture.md``)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# Top to bottom: an import may only point down this list; units on one row never import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("cli",),
    ("serve",),
    ("train",),
    ("pipeline",),
    ("evaluate", "mine", "retrieve"),
    ("index",),
    ("bank",),
    ("encoder",),
    ("data", "models"),
    ("util",),
    ("files",),
    ("errors", "version"),
)
RANK = {unit: depth for depth, row in enumerate(LAYERS) for unit in row}
MAX_FUNCTION_LINES = 80


@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` at ``line`` (``runtime`` False: only under TYPE_CHECKING)."""

    source: str
    target: str
    line: int
    runtime: bool
    names: tuple[str, ...]


def library_modules(root: Path = REPO) -> dict[str, Path]:
    """Dotted name -> file of every module of the ``isdretrieve`` package under ``root``."""
    found = {}
    for path in sorted((root / "isdretrieve").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                lines.update(range(inner.lineno, (inner.end_lineno or inner.lineno) + 1))
    return lines


def import_edges(modules: dict[str, Path]) -> list[Edge]:
    """Every import of a library module by a library module, at any depth of the code."""
    edges = []
    for source, path in modules.items():
        tree = ast.parse(path.read_text())
        typing_only = _type_checking_lines(tree)
        for node in ast.walk(tree):
            runtime = node.lineno not in typing_only if hasattr(node, "lineno") else True
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "isdretrieve":
                        edges.append(Edge(source, alias.name, node.lineno, runtime, ()))
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.split(".")[0] != "isdretrieve":
                    continue
                for alias in node.names:  # ``from isdretrieve.data import augment`` imports a module
                    child = f"{node.module}.{alias.name}"
                    target = child if child in modules else node.module
                    edges.append(Edge(source, target, node.lineno, runtime, (alias.name,)))
    return edges


def unit(module: str) -> str:
    """The stage a module belongs to: ``isdretrieve.files.bank`` -> ``files``; the face is ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layering_violations(edges: list[Edge], modules: dict[str, Path]) -> list[str]:
    """One line per import that breaks the layering rule."""
    problems = []
    for edge in edges:
        a, b = unit(edge.source), unit(edge.target)
        where = f"{modules[edge.source].name}:{edge.line}: {edge.source} imports {edge.target}"
        if a == "":  # the public face sits above every layer
            continue
        if b == "":
            problems.append(f"{where} (the public face; import the module that defines the name)")
        elif a not in RANK or b not in RANK:
            problems.append(f"{where} (a package missing from the layers: {a if a not in RANK else b})")
        elif a != b and RANK[b] <= RANK[a]:
            why = "same row" if RANK[a] == RANK[b] else "up the layers"
            problems.append(f"{where} ({why}: {a} -> {b})")
    return problems


def import_cycles(edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), i.e. the import circles."""
    graph: dict[str, set[str]] = defaultdict(set)
    for edge in edges:
        if edge.source != edge.target:
            graph[edge.source].add(edge.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return library_modules()


@pytest.fixture(scope="module")
def edges(modules: dict[str, Path]) -> list[Edge]:
    return import_edges(modules)


def test_every_package_has_a_layer(modules: dict[str, Path]) -> None:
    assert {unit(m) for m in modules} - {""} == set(RANK)


def test_imports_only_point_down_the_layers(edges: list[Edge], modules: dict[str, Path]) -> None:
    assert layering_violations(edges, modules) == []


def test_no_import_circle(edges: list[Edge]) -> None:
    assert import_cycles(edges) == []


def test_the_checks_catch_a_planted_violation(tmp_path: Path) -> None:
    """The rule and the circle check fire on a library with an upward import and a circle in it."""
    fake = tmp_path / "isdretrieve"
    for name, text in {
        "files/bank.py": "from isdretrieve.index.search import SearchIndex\n",
        "index/search.py": "from isdretrieve.files.bank import FeatureBank\n",
        "index/plan.py": "",
    }.items():
        (fake / name).parent.mkdir(parents=True, exist_ok=True)
        (fake / name).write_text(text)
    found = library_modules(tmp_path)
    edges = import_edges(found)
    assert any("up the layers: files -> index" in p for p in layering_violations(edges, found))
    assert import_cycles(edges) == [["isdretrieve.files.bank", "isdretrieve.index.search"]]


def test_files_import_only_errors(edges: list[Edge], modules: dict[str, Path]) -> None:
    """The on-disk contracts depend on no stage, and on no third-party package but h5py and NumPy."""
    inside = {e.target for e in edges if unit(e.source) == "files"}
    assert {unit(t) for t in inside} <= {"files", "errors", "version"}
    for name, path in modules.items():
        if unit(name) == "files":
            assert third_party(path) <= {"h5py", "numpy"}, name


def third_party(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return {name for name in found if name not in sys.stdlib_module_names and name != "isdretrieve"}


def test_training_never_reaches_the_index_or_faiss(edges: list[Edge], modules: dict[str, Path]) -> None:
    """What ``train`` imports, followed through the library, never includes ``index`` or FAISS."""
    graph: dict[str, set[str]] = defaultdict(set)
    for edge in edges:
        if edge.runtime:
            graph[edge.source].add(edge.target)
    reached = {m for m in modules if unit(m) == "train"}
    todo = list(reached)
    while todo:
        for nxt in graph[todo.pop()] - reached:
            reached.add(nxt)
            todo.append(nxt)
    assert {m for m in reached if unit(m) == "index"} == set()
    assert {m for m in reached if "faiss" in third_party(modules[m])} == set()
    below = {"train", "evaluate", "encoder", "data", "models", "util", "files", "errors", "version"}
    assert {unit(m) for m in reached} <= below
    assert {m for m in reached if unit(m) == "evaluate"} <= {
        "isdretrieve.evaluate.knn",
        "isdretrieve.evaluate.protocols",
    }


def test_no_module_imports_a_private_name(edges: list[Edge]) -> None:
    def private(name: str) -> bool:
        return name.startswith("_") and not name.endswith("__")  # dunders such as __version__ are public

    found = [f"{e.source}:{e.line} imports {e.target}.{n}" for e in edges for n in e.names if private(n)]
    assert found == []


def test_subpackages_hold_no_code_in_their_init(modules: dict[str, Path]) -> None:
    """A subpackage's ``__init__`` is its docstring only: every name has one import path (the face aside)."""
    for name, path in modules.items():
        if path.name == "__init__.py" and name != "isdretrieve":
            body = ast.parse(path.read_text()).body
            assert len(body) <= 1 and all(isinstance(n, ast.Expr) for n in body), name


def test_no_library_function_is_longer_than_a_screen(modules: dict[str, Path]) -> None:
    long = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


# ------------------------------------------------------------------------------------------ the face
def run_python(code: str) -> str:
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0, child.stderr[-3000:]
    return child.stdout.strip()


def test_import_isdretrieve_loads_neither_torch_nor_faiss() -> None:
    code = "import isdretrieve, sys; print('torch' in sys.modules or 'faiss' in sys.modules)"
    assert run_python(code) == "False"


def test_every_public_name_resolves_to_its_defining_module() -> None:
    import isdretrieve

    face = isdretrieve._FACE
    assert sorted(isdretrieve.__all__) == sorted(["__version__", *face])
    for name, module in face.items():
        value = getattr(isdretrieve, name)
        assert getattr(value, "__module__", module) == module, name
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        _ = isdretrieve.nothing_here


@pytest.mark.skipif(
    any(Path(p).exists() for p in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/dxg")),
    reason="with an NVIDIA driver the search may check CUDA through torch",
)
def test_vector_search_through_the_face_never_imports_torch(tmp_path: Path) -> None:
    from isdretrieve.index.build import build_index

    rng = np.random.default_rng(0)
    build_index(rng.normal(size=(500, 16)).astype(np.float32), tmp_path / "idx", factory="Flat")
    np.save(tmp_path / "q.npy", rng.normal(size=(3, 16)).astype(np.float32))
    out = run_python(
        f"""
        import sys
        import numpy as np
        import isdretrieve
        r = isdretrieve.Retriever.open({str(tmp_path / "idx")!r})
        scores, rows = r.index.search(np.load({str(tmp_path / "q.npy")!r}), 5)
        hits = r.search(np.load({str(tmp_path / "q.npy")!r}), 5)
        assert rows.shape == (3, 5) and [h.row for h in hits[0]] == rows[0].tolist()
        print("torch" in sys.modules)
        """
    )
    assert out == "False"
