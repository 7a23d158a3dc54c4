"""The notebooks: each `.ipynb` matches its jupytext source, and each runs end to end in
quick mode (``LORAJAX_QUICK=1``) and writes its figures."""

from __future__ import annotations

import os
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
# The figures each notebook must write (PNG names in its results directory).
FIGURES = {
    "01_quickstart": ["01_quickstart_losses"],
    "02_lr_ratio": ["02_lr_ratio"],
    "03_lora_pro_alignment": ["03_lora_pro_alignment"],
    "04_learns_less_forgets_less": ["04_learns_less_forgets_less"],
    "05_subspaces": [
        "05_subspaces_overlap",
        "05_subspaces_refresh_cost",
        "05_subspaces_on_refresh",
        "05_subspaces_memory",
    ],
}
SOURCES = sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.py"))


def cells(notebook):
    return [(c.cell_type, c.source.strip()) for c in notebook.cells]


def test_every_notebook_is_listed_and_paired():
    assert sorted(FIGURES) == SOURCES
    for name in SOURCES:
        assert (NOTEBOOKS / f"{name}.ipynb").is_file(), f"{name}.ipynb is missing"


@pytest.mark.parametrize("name", SOURCES)
def test_ipynb_is_in_sync_with_its_source(name):
    source = jupytext.read(NOTEBOOKS / f"{name}.py")
    stored = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert cells(stored) == cells(source), (
        f"notebooks/{name}.ipynb is out of date: run `jupytext --to ipynb notebooks/{name}.py`"
    )


@pytest.mark.parametrize("name", SOURCES)
def test_notebook_runs_in_quick_mode_and_writes_its_figures(name, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAJAX_QUICK", "1")
    monkeypatch.setenv("LORAJAX_RESULTS", str(tmp_path))
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, as in a notebook
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = jupytext.read(NOTEBOOKS / f"{name}.py")
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute(env=dict(os.environ))  # raises CellExecutionError on any failing cell
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    for figure in FIGURES[name]:
        png = tmp_path / f"{figure}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
