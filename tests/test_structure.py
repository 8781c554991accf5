"""Layering rules of the package, read from the source (AST), so a change that breaks them fails here:

* no module of ``facecrafter_jax`` outside ``facecrafter_jax/toy/`` imports the toy package or names it;
* no import cycle between files (every import counts, also the ones inside functions);
* no source file of the library, ``data_prep`` or the entry points over ~600 lines (the canonical mesh data
  table excepted);
* the face vocabulary is defined once.
"""

import ast
import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT = 620  # "about 600 lines" (issue 13)
DATA_TABLES = {"facecrafter_jax/toy/canonical_mesh.py"}


def _modules() -> dict[str, Path]:
    mods = {}
    for top in ("facecrafter_jax", "data_prep"):
        for path in sorted((REPO / top).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Modules of the project that ``name`` imports (``from pkg import sub`` counts as ``pkg.sub`` when that is a
    module, else as ``pkg``; a module's own parent packages, which Python imports anyway, are not edges)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):
                out.add(t)
    return out


def test_library_never_leans_on_the_toy_world():
    offenders = []
    for name, path in _modules().items():
        if name.startswith("facecrafter_jax.toy") or not name.startswith("facecrafter_jax"):
            continue
        deps = _imports(name, path, _modules())
        if any(d.startswith("facecrafter_jax.toy") for d in deps) or re.search(r"facecrafter_jax[./]toy", path.read_text()):
            offenders.append(name)
    assert offenders == []


def test_no_import_cycles_between_files():
    mods = _modules()
    graph = {name: _imports(name, path, mods) for name, path in mods.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


def test_files_stay_small():
    paths = [p for p in list((REPO / "facecrafter_jax").rglob("*.py")) + list((REPO / "data_prep").rglob("*.py"))]
    paths += [REPO / "train.py", REPO / "sample.py"]
    long = {str(p.relative_to(REPO)): n for p in paths
            if (n := len(p.read_text().splitlines())) > LIMIT and str(p.relative_to(REPO)) not in DATA_TABLES}
    assert long == {}


def test_face_vocabulary_defined_once():
    pattern = re.compile(r"^(NUM_LANDMARKS|EMOTION_CLASSES|VALENCE_AROUSAL|ID_DIM|NUM_EMOTIONS|EMOTION_DIM|CONTROL_INPUT_DIMS)\s*=", re.M)
    where = {}
    for path in list((REPO / "facecrafter_jax").rglob("*.py")) + list((REPO / "data_prep").rglob("*.py")):
        for m in pattern.finditer(path.read_text()):
            where.setdefault(m.group(1), []).append(str(path.relative_to(REPO)))
    assert where and all(v == ["facecrafter_jax/face/vocabulary.py"] for v in where.values()), where
    assert os.path.basename(where["NUM_LANDMARKS"][0]) == "vocabulary.py"
