"""The main job: execute notebooks/00 … 05 in order with papermill into runs/<name>/ and render report.html.

    python -m waveglow_lib run --params params/demo.yaml [--set key=value ...]

- The params file and the --set overrides are validated (unknown keys, wrong types, by name) before any
  notebook runs. The resolved parameters, with relative paths made absolute, go to runs/<name>/params.yaml,
  and every notebook gets that file as its `params_file` parameter, so all of them see the same run.
- Kernels run the interpreter that runs this module (its ipykernel), whatever `python3` kernelspec a user's
  Jupyter config points at: the notebooks ask for `python3` and `_ThisInterpreterKernelManager` maps that
  name to `sys.executable -m ipykernel_launcher`.
- A failing notebook stops the run with `NotebookRunError` naming the notebook and the cell; the executed
  notebooks so far (the failing one included, with its traceback) stay in runs/<name>/notebooks/ and the
  report is still rendered from them.
"""
from __future__ import annotations

import html
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..config import FORCE_ENV, PACKAGE_DIR, WorkflowConfig
from ..errors import InputNotFound, NotebookRunError, WaveGlowError
from ..io import atomic_write_text
from ..provenance import COMMIT_ENV, git_commit
from ..runlock import run_folder_lock
from ..stages.train import load_train_config
from .display import html_text
from .parameters import check_parameters
from .report import export_html, summary_html


def _notebooks_dir() -> Path:
    """The notebooks: shipped inside the package (an installed wheel), else the repository's notebooks/."""
    packaged = PACKAGE_DIR / "notebooks"
    return packaged if packaged.is_dir() else PACKAGE_DIR.parent / "notebooks"


NOTEBOOKS_DIR = _notebooks_dir()
NOTEBOOKS = (
    "00_setup.ipynb",
    "01_preprocess.ipynb",
    "02_export_onnx.ipynb",
    "03_convert_atc.ipynb",
    "04_infer.ipynb",
    "05_listen_evaluate.ipynb",
)
#: notebooks outside the default chain, run by name: `run --notebooks 06_vocode_mels.ipynb`
ON_DEMAND_NOTEBOOKS = (
    "06_vocode_mels.ipynb",
    "07_train.ipynb",
)
#: notebooks that read training parameters (`TrainConfig`: MY_TRAIN_PARAMS, else TRAIN_DEMO_PARAMS), not the
#: run's workflow parameters: `run` injects no params file into them
TRAINING_NOTEBOOKS = ("07_train.ipynb",)
#: the kernel name the notebooks carry in their metadata
KERNEL_NAME = "python3"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
#: config fields holding paths; "demo" is a keyword, not a path
_PATH_FIELDS = ("corpus", "checkpoint", "runs_dir")


@dataclass
class RunResult:
    run_dir: Path
    params_file: Path
    notebooks: list[Path] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    report: Path | None = None


# --- parameters -----------------------------------------------------------------------------------
def project_dir(cwd: str | Path | None = None) -> Path:
    """The folder relative paths are resolved against: the working directory, except inside notebooks/.

    JupyterLab starts a notebook's kernel in the notebook's folder; the params files are written for the
    repository root (where `python -m waveglow_lib run` is started), so inside notebooks/ we step up.
    """
    here = Path(cwd or os.getcwd()).resolve()
    if here.name == "notebooks" and (here.parent / "params").is_dir():
        return here.parent
    return here


def resolve_paths(cfg: WorkflowConfig, base: str | Path | None = None) -> WorkflowConfig:
    """A copy of `cfg` with relative corpus / checkpoint / runs_dir made absolute against `base`."""
    base = Path(base) if base is not None else project_dir()
    changes = {}
    for key in _PATH_FIELDS:
        value = getattr(cfg, key)
        if value != "demo" and not Path(value).expanduser().is_absolute():
            changes[key] = str((base / Path(value).expanduser()).resolve())
    return cfg.with_overrides(**changes) if changes else cfg


def notebook_config(params_file: str | Path, overrides: Mapping[str, Any] | None = None, *,
                    also: Sequence[str] = ()) -> WorkflowConfig:
    """What each notebook calls after its `parameters` cell: the injected parameter names and their types
    checked (`parameters.check_parameters`; `also`: the notebook's own parameters beside params_file and
    overrides), then validated parameters, paths resolved."""
    check_parameters(params_file, overrides, also=also)
    base = project_dir()
    path = own_params(params_file, base)
    return resolve_paths(WorkflowConfig.from_yaml(path, overrides), base)


#: the params file a person copies and edits once (from DEMO_PARAMS); git ignores it
MY_PARAMS = "params/my.yaml"
DEMO_PARAMS = "params/demo.yaml"
#: the same for 07_train's training parameters
MY_TRAIN_PARAMS, TRAIN_DEMO_PARAMS = "params/my_train.yaml", "params/train_demo.yaml"


def own_params(params_file: str | Path, base: str | Path | None = None) -> Path:
    """`params_file` made absolute against `base`; the notebooks' default, `params/my.yaml` (your copy of
    params/demo.yaml, named once for every notebook), falls back to params/demo.yaml until you make it
    (`params/my_train.yaml` to params/train_demo.yaml for 07_train)."""
    base = Path(base) if base is not None else project_dir()
    path = Path(params_file)
    path = path if path.is_absolute() else base / path
    fallback = {MY_PARAMS: DEMO_PARAMS, MY_TRAIN_PARAMS: TRAIN_DEMO_PARAMS}.get(Path(params_file).as_posix())
    if fallback is not None and not path.exists():
        return base / fallback
    return path


def notebook_train_config(params_file: str | Path, overrides: Mapping[str, Any] | None = None, *,
                          also: Sequence[str] = ()):
    """07_train's `notebook_config`: injected names and types checked, then `stages.train.load_train_config`
    (every key and type validated, paths from the repository root)."""
    check_parameters(params_file, overrides, also=also)
    base = project_dir()
    return load_train_config(own_params(params_file, base), overrides, base_dir=base)


# --- the kernel -----------------------------------------------------------------------------------
def _this_interpreter_spec():
    from jupyter_client.kernelspec import KernelSpec

    return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                      display_name=f"Python {sys.version_info[0]}.{sys.version_info[1]} ({sys.executable})",
                      language="python", metadata={"debugger": True})


def _kernel_manager_class():
    """An nbclient kernel manager whose `python3` is this interpreter (built lazily: jupyter is optional)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class _ThisInterpreterSpecs(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            if kernel_name == KERNEL_NAME:
                return _this_interpreter_spec()
            return super().get_kernel_spec(kernel_name)

    class _ThisInterpreterKernelManager(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _default_specs(self):
            return _ThisInterpreterSpecs(data_dir=self.data_dir)

    return _ThisInterpreterKernelManager


# --- running --------------------------------------------------------------------------------------
def _failing_cell(exc: Exception) -> tuple[int | None, str]:
    count = getattr(exc, "exec_count", None)
    ename, evalue = getattr(exc, "ename", type(exc).__name__), getattr(exc, "evalue", str(exc))
    source = (getattr(exc, "source", "") or "").strip().splitlines()
    first = f" («{source[0][:80]}»)" if source else ""
    return count, f"cell In [{count}]{first}: {ename}: {evalue}"


def run_notebooks(params: str | Path | WorkflowConfig, overrides: Mapping[str, Any] | None = None, *,
                  notebooks: Sequence[str] | None = None, notebooks_dir: str | Path | None = None,
                  report: bool = True, timeout: float | None = None, progress: bool = True,
                  force: bool = False) -> RunResult:
    """Execute the notebooks in order into runs/<name>/notebooks/, then render runs/<name>/report.html.
    Each gets the run's params file, except TRAINING_NOTEBOOKS, which read their own training parameters.
    `force`: every stage the notebooks call redoes its finished work (`config.forced`, through FORCE_ENV)."""
    import papermill as pm

    base = project_dir()
    if isinstance(params, WorkflowConfig):
        cfg = params.with_overrides(**dict(overrides or {}))
    else:
        cfg = WorkflowConfig.from_yaml(params, overrides)  # bad keys / types fail here, before any notebook
    cfg = resolve_paths(cfg, base)
    source_dir = Path(notebooks_dir) if notebooks_dir is not None else NOTEBOOKS_DIR
    names = list(notebooks) if notebooks is not None else list(NOTEBOOKS)
    missing = [n for n in names if not (source_dir / n).is_file()]
    if missing:
        raise InputNotFound(f"{source_dir}: notebook(s) not found: {', '.join(missing)}", path=source_dir)

    layout = cfg.layout
    run_dir = layout.root
    # one writer per run folder; the kernels' stages inherit the lock (runlock.TOKEN_ENV)
    with run_folder_lock(run_dir, command=f"run {', '.join(names)}"):
        out_dir = layout.notebooks_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        params_file = layout.params
        cfg.to_yaml(params_file)
        result = RunResult(run_dir=run_dir, params_file=params_file)
        manager = _kernel_manager_class()
        # the commit, worked out once here and inherited by every kernel: each record names the same one,
        # and a slow `git status` (the nbstripout filter, see provenance) is paid once per run, not per call
        old_commit, old_force = os.environ.get(COMMIT_ENV), os.environ.get(FORCE_ENV)
        os.environ[COMMIT_ENV] = git_commit()  # (an outer run's, when one set it)
        os.environ[FORCE_ENV] = "1" if force else "0"
        try:
            for name in names:
                output = out_dir / name
                start = time.perf_counter()
                try:
                    pm.execute_notebook(
                        str(source_dir / name), str(output),
                        parameters={"overrides": {}} if name in TRAINING_NOTEBOOKS else
                        {"params_file": str(params_file), "overrides": {}},
                        kernel_name=KERNEL_NAME, kernel_manager_class=manager, cwd=str(base),
                        progress_bar=progress, execution_timeout=timeout)
                except pm.PapermillExecutionError as exc:
                    result.notebooks.append(output)
                    cell, what = _failing_cell(exc)
                    raise NotebookRunError(f"{name} failed at {what} (executed notebook kept: {output})",
                                           name, cell, output) from None
                finally:
                    result.seconds[name] = round(time.perf_counter() - start, 2)
                result.notebooks.append(output)
        finally:
            try:
                if report and result.notebooks:
                    failing = sys.exc_info()[1]   # a notebook's failure, on its way out
                    try:
                        result.report = render_report(result.notebooks, layout.report,
                                                      title=f"WaveGlow run {cfg.name!r}", cfg=cfg)
                    except WaveGlowError as exc:
                        if failing is None:
                            raise
                        # the notebook's failure is the run's error; the report's (a damaged record) is said beside it
                        print(f"report.html not rendered: {exc}", file=sys.stderr)
            finally:
                for key, old in ((COMMIT_ENV, old_commit), (FORCE_ENV, old_force)):
                    if old is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = old
        return result


# --- the report -----------------------------------------------------------------------------------
def merge_notebooks(paths: Sequence[str | Path]):
    """One notebook holding all cells, each notebook under its own heading; widget states merged."""
    import nbformat

    merged = nbformat.v4.new_notebook()
    states: dict[str, Any] = {}
    toc = ["# Contents\n"]
    for number, path in enumerate(paths):
        path = Path(path)
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:  # cell ids must stay unique in the merged notebook
            cell.id = f"n{number}-{cell.get('id', '')}"[:64]
        if not merged.metadata:
            merged.metadata = {k: v for k, v in nb.metadata.items() if k in ("kernelspec", "language_info")}
        # a notebook's file name is text: as HTML inside the Markdown, escaped (Markdown passes raw HTML through)
        anchor = html_text(path.stem)
        toc.append(f'- <a href="#{anchor}">{anchor}</a>')
        merged.cells.append(nbformat.v4.new_markdown_cell(
            f'<a id="{anchor}"></a>\n\n<h1>Notebook <code>{html_text(path.name)}</code></h1>'))
        merged.cells.extend(nb.cells)
        widgets = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {})
        states.update(widgets.get("state", {}))
        _freeze_progress_bars(nb.cells, widgets.get("state", {}))
    merged.cells.insert(0, nbformat.v4.new_markdown_cell("\n".join(toc)))
    if states:
        merged.metadata["widgets"] = {WIDGET_STATE: {
            "version_major": 2, "version_minor": 0, "state": states}}
    return merged


def _freeze_progress_bars(cells: Sequence[Any], state: Mapping[str, Any]) -> None:
    """Replace tqdm's notebook bars by their final text: the report must not need the widget JavaScript
    (fetched from a CDN) to say how far a stage got, and their text fallback was taken at 0 %."""
    def model(ref: str) -> Mapping[str, Any]:
        return state.get(ref.replace("IPY_MODEL_", ""), {})

    for cell in cells:
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get(WIDGET_VIEW)
            box = model(view["model_id"]) if view else {}
            children = [model(ref) for ref in box.get("state", {}).get("children", [])]
            if box.get("model_name") != "HBoxModel" or [c.get("model_name") for c in children] != \
                    ["HTMLModel", "FloatProgressModel", "HTMLModel"]:
                continue
            left, bar, right = (c.get("state", {}) for c in children)
            text = html.unescape(f"{left.get('value', '')} {right.get('value', '')}").replace("\u2007", " ")
            if bar.get("bar_style") == "danger":
                text += " (stopped)"
            output["data"] = {"text/plain": text}


def render_report(paths: Sequence[str | Path], output: str | Path, title: str = "WaveGlow run",
                  cfg: WorkflowConfig | None = None) -> Path:
    """The run's summary (report.summary_html: from `cfg`, else the run folder's params.yaml) over the executed
    notebooks, as one page that works offline."""
    merged = merge_notebooks(paths)
    merged.metadata["title"] = title
    summary = summary_html(Path(output).parent, [Path(p).name for p in paths], cfg)
    return atomic_write_text(output, export_html(merged, summary))
