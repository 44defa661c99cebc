"""Execute the example notebooks top to bottom in a fresh Jupyter kernel.

Every notebook checks its own numbers with ``assert`` (closed forms against autograd, the simulation end
points, logged effective learning rates against lr × δ'(ℓ)), so a notebook whose code or numbers break
raises ``CellExecutionError`` here. The kernel is the ``python3`` kernel spec that ipykernel installs
into the environment (``ipykernel`` is in the ``test`` extra). jupyter_client starts it with the
interpreter that runs pytest.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPOSITORY = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPOSITORY / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def _repository_entries() -> set[str]:
    """List the top-level entries of the repository and every file under notebooks/."""
    top_level = {entry.name for entry in REPOSITORY.iterdir()}
    notebook_files = {str(path.relative_to(REPOSITORY)) for path in (REPOSITORY / "notebooks").rglob("*")}
    return top_level | notebook_files


def test_notebooks_found():
    names = [path.name for path in NOTEBOOKS]

    assert names == [
        "01_deformation_families.ipynb",
        "02_flat_minima_filter.ipynb",
        "03_mixin_and_traces.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]

    assert code_cells
    assert [cell.outputs for cell in code_cells] == [[] for _ in code_cells]
    assert [cell.execution_count for cell in code_cells] == [None for _ in code_cells]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # The kernel imports this checkout's package, as pytest does through `pythonpath`, even when another
    # copy is installed in the environment.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(path, as_version=4)
    before = _repository_entries()

    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()

    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    errors = [output for cell in code_cells for output in cell.outputs if output.output_type == "error"]
    assert errors == []
    assert all(cell.execution_count is not None for cell in code_cells)
    assert _repository_entries() == before
