"""The house's floors, checked from the code's own imports (docs/architecture.md).

Every ``import trajlab.X`` or ``from trajlab.X import`` anywhere in a module (lazy imports inside
functions included) is an edge from the module's package to ``X``'s package. Each package sits on
a floor; an edge may only go down to a lower floor. That rules out import circles between
packages and upward imports (e.g. a low package reaching for ``trajlab.__init__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "trajlab"

# Lowest floor first. A package may import from any package on a lower floor, never from its own
# floor's other packages or from above. "trajlab" is the package's own ``__init__``.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("_version", "dims", "errors", "priority"),
    ("spectral",),
    ("sketches",),
    ("sde", "store"),
    ("record", "analysis"),
    ("integrations", "cost", "export", "plot", "data", "models"),
    ("recipes",),
    ("studies",),
    ("trajlab",),
    ("cli",),
)
FLOOR = {name: i for i, names in enumerate(FLOORS) for name in names}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "trajlab"


def _edges() -> set[tuple[str, str, str]]:
    """(source package, target package, source file) for every trajlab import."""
    edges = set()
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        src = _package(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module]
                if node.module == "trajlab":  # from trajlab import record -> the subpackage
                    targets = [f"trajlab.{a.name}" for a in node.names
                               if (ROOT / a.name).is_dir() or (ROOT / f"{a.name}.py").is_file()]
                    targets = targets or ["trajlab"]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                if target == "trajlab" or target.startswith("trajlab."):
                    dst = _package(target)
                    if dst != src:
                        edges.add((src, dst, str(path.relative_to(ROOT.parent))))
    return edges


def test_every_package_has_a_floor():
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    packages |= {p.stem for p in ROOT.glob("*.py") if p.stem != "__init__"}
    missing = sorted(packages - set(FLOOR))
    assert not missing, f"packages without a floor in FLOORS (and docs/architecture.md): {missing}"


def test_imports_only_go_down():
    bad = sorted(f"{file}: {src} (floor {FLOOR[src]}) imports {dst} (floor {FLOOR[dst]})"
                 for src, dst, file in _edges() if FLOOR[dst] >= FLOOR[src])
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_no_sketch_name_literal_outside_sketches():
    """Callers ask a sketch kind its capabilities (``kind.needs_basis``, ...) or use the class's
    ``name``; only ``trajlab/sketches/`` spells a kind's name (docstrings aside)."""
    from trajlab.sketches import sketch_kinds

    names = set(sketch_kinds())
    bad = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent)
        if rel.parts[1] == "sketches":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                text = " ".join(ast.unparse(o) for o in operands)
                if ("sketch" in text or "kind" in text) and any(
                        isinstance(o, ast.Constant) and o.value in names for o in operands):
                    bad.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.Call):
                fn = ast.unparse(node.func)
                if fn.split(".")[-1] in ("sketch_kind", "Description") and any(
                        isinstance(a, ast.Constant) and a.value in names for a in node.args):
                    bad.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, "sketch-name literals outside trajlab/sketches/:\n" + "\n".join(bad)


#: The longest a module of ``trajlab/record/`` may be (issue 25: one job per module, so that a
#: change reads one file). The longest is recorder.py (the Recorder's public API, lifecycle and
#: thin hook methods, ~390 lines); split a module by job rather than raise this.
RECORD_MAX_LINES = 400


def test_record_modules_stay_small():
    long = {}
    for path in sorted((ROOT / "record").rglob("*.py")):
        n = len(path.read_text().splitlines())
        if n > RECORD_MAX_LINES:
            long[str(path.relative_to(ROOT.parent))] = n
    assert not long, (f"modules of trajlab/record/ over {RECORD_MAX_LINES} lines (split them by "
                      f"job, see docs/architecture.md): {long}")
