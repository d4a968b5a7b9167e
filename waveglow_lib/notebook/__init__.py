"""The notebooks' side of the library: the papermill runner (runs/<name>/ and report.html) and the display
helpers the notebooks call (tables, players, plots, pickers). No algorithms live here."""
from __future__ import annotations

from .parameters import check_parameters
from .runner import (NOTEBOOKS, NOTEBOOKS_DIR, RunResult, notebook_config, notebook_train_config, render_report,
                     run_notebooks)

__all__ = ["NOTEBOOKS", "NOTEBOOKS_DIR", "RunResult", "check_parameters", "notebook_config", "notebook_train_config",
           "render_report", "run_notebooks"]
