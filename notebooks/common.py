"""Settings shared by the notebooks: quick or full mode, and where results go.

- ``LORAJAX_QUICK=1`` runs a notebook in quick mode (what CI executes): fewer steps, fewer
  settings, a smaller model where the claim allows it. Figures then go to
  ``LORAJAX_RESULTS`` (default: a temporary directory), so quick runs never overwrite
  the committed full-mode results.
- Full mode (the default) writes figures and tables to ``notebooks/results/``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

QUICK = os.environ.get("LORAJAX_QUICK", "0") == "1"
HERE = Path(__file__).resolve().parent


def results_dir() -> Path:
    """Where this run writes its figures and tables (created if needed)."""
    default = Path(tempfile.gettempdir()) / "lorajax-quick" if QUICK else HERE / "results"
    path = Path(os.environ.get("LORAJAX_RESULTS", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_figure(fig: Any, name: str) -> Path:
    """Saves a matplotlib figure as ``<results>/<name>.png`` and returns the path."""
    path = results_dir() / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def save_table(rows: Any, name: str) -> Path:
    """Saves JSON-serialisable results as ``<results>/<name>.json``."""
    path = results_dir() / f"{name}.json"
    path.write_text(json.dumps(rows, indent=2) + "\n")
    return path
