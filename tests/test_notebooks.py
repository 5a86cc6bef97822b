"""The notebooks under analyses/ run top to bottom and show their figures (so they never rot).

Conventions the notebooks follow (and these tests check):

* a code cell tagged ``figure`` (cell metadata ``tags``) draws a figure that displays inline:
  executing it gives at least one ``image/png`` output;
* a code cell tagged ``parameters`` (papermill's convention) holds the notebook's size; the
  default suite appends smaller values to it (:data:`QUICK`) so each notebook runs in seconds;
* the committed notebooks are saved *with* their outputs, so a reader sees the figures without
  running anything.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ANALYSES = Path(__file__).parent.parent / "analyses"
NOTEBOOKS = sorted(ANALYSES.glob("*.ipynb"))

#: Parameter overrides for the default suite, per notebook (appended to its "parameters" cell).
QUICK: dict[str, dict[str, object]] = {
    "quickstart.ipynb": {"steps": 200},
    "sweep.ipynb": {"steps": 60},
}


def tagged(nb, tag: str) -> list:
    """The code cells of ``nb`` whose metadata tags include ``tag``."""
    return [c for c in nb.cells
            if c.cell_type == "code" and tag in c.get("metadata", {}).get("tags", [])]


def with_parameters(nb, values: dict[str, object]):
    """Append ``name = value`` lines to the notebook's one cell tagged "parameters"."""
    if not values:
        return nb
    cells = tagged(nb, "parameters")
    assert len(cells) == 1, f"expected one cell tagged 'parameters', found {len(cells)}"
    lines = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    cells[0].source = f"{cells[0].source}\n# overridden by tests/test_notebooks.py\n{lines}"
    return nb


def images(cell) -> list[str]:
    return [o["data"]["image/png"] for o in cell.get("outputs", [])
            if "image/png" in o.get("data", {})]


def problems(nb) -> list[str]:
    """What keeps ``nb``'s outputs from showing its figures: errors, figure cells without an
    image, figures displayed only as text (a non-inline backend) or twice in one cell."""
    found = []
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                found.append(f"code cell {i} raised {o.get('ename')}: {o.get('evalue')}")
            text = o.get("data", {}).get("text/plain", "")
            if text.startswith("<Figure size") and "image/png" not in o.get("data", {}):
                found.append(f"code cell {i} shows a figure as text only: {text!r}")
        pngs = images(cell)
        if len(set(pngs)) < len(pngs):
            found.append(f"code cell {i} displays the same figure twice")
        if "figure" in cell.get("metadata", {}).get("tags", []) and not pngs:
            found.append(f"code cell {i} is tagged 'figure' but has no image/png output")
    return found


def test_quick_parameters_name_notebooks():
    assert set(QUICK) <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_and_shows_its_figures(path, tmp_path):
    nb = with_parameters(nbformat.read(path, as_version=4), QUICK.get(path.name, {}))
    assert tagged(nb, "figure"), f"{path.name} has no cell tagged 'figure'"
    work = tmp_path / "cwd"  # the notebook's working directory: its stores go here
    work.mkdir()
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(work)}}).execute()
        assert any(work.iterdir()), "the notebook wrote nothing into its working directory"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert not problems(nb)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_shows_its_figures(path):
    """The notebook as committed was executed top to bottom and keeps its figures."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name} is not saved executed in order (execution counts {counts}); execute it "
        "top to bottom and save it with its outputs")
    assert tagged(nb, "figure")
    assert not problems(nb)
    assert "matplotlib.use" not in "".join(c.source for c in code)
