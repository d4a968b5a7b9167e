"""The notebooks: committed clean, one `parameters` cell each, and the whole chain run headless on
params/ci.yaml through the real CLI (`python -m waveglow_lib run`, papermill, the venv's ipykernel)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from waveglow_lib import notebook_runner as nr

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


# --- the committed notebooks ----------------------------------------------------------------------
def test_the_notebooks_are_the_six_steps_in_order():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == list(nr.NOTEBOOKS)


@pytest.mark.parametrize("name", nr.NOTEBOOKS)
def test_committed_without_outputs_and_with_one_parameters_cell(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), f"{name} has outputs: clear them"
    assert all("execution" not in c.metadata for c in code), f"{name} keeps execution timings"
    assert "widgets" not in nb.metadata, f"{name} keeps widget state"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    namespace: dict = {}
    exec(tagged[0].source, namespace)  # plain assignments only
    assert namespace["params_file"] == "params/demo.yaml" and namespace["overrides"] == {}
    assert nb.metadata.kernelspec.name == nr.KERNEL_NAME
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    # all logic lives in waveglow_lib: the notebooks import nothing else that computes
    sources = "\n".join(c.source for c in code)
    assert "notebook_config(params_file, overrides)" in sources
    assert "def " not in sources.replace("def show", "")


# --- the kernel -----------------------------------------------------------------------------------
def test_python3_kernel_is_this_interpreter_even_if_jupyter_says_otherwise(tmp_path, monkeypatch):
    spec_dir = tmp_path / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps(
        {"argv": ["/nonexistent/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
         "display_name": "foreign", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    from jupyter_client.kernelspec import KernelSpecManager

    assert KernelSpecManager().get_kernel_spec("python3").argv[0] == "/nonexistent/python"
    manager = nr._kernel_manager_class()(kernel_name="python3")
    assert manager.kernel_spec.argv[:3] == [sys.executable, "-m", "ipykernel_launcher"]


# --- a failing notebook ---------------------------------------------------------------------------
def _notebook(path: Path, *sources: str) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('params_file = "params/demo.yaml"\noverrides = {}')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_a_failing_notebook_stops_the_run_and_names_the_cell(tmp_path):
    src = tmp_path / "nbs"
    src.mkdir()
    _notebook(src / "a.ipynb", "import sys\nprint(sys.executable)",
              "from waveglow_lib.notebook_runner import notebook_config\n"
              "print(notebook_config(params_file, overrides).limit)")
    _notebook(src / "b.ipynb", "x = 1", "raise RuntimeError('no corpus here')", "print('never')")
    _notebook(src / "c.ipynb", "print('not reached')")
    with pytest.raises(nr.NotebookRunError) as info:
        nr.run_notebooks(ROOT / "params" / "ci.yaml", {"runs_dir": str(tmp_path / "runs"), "limit": 3},
                         notebooks=["a.ipynb", "b.ipynb", "c.ipynb"], notebooks_dir=src, progress=False)
    message = str(info.value)
    assert "b.ipynb" in message and "raise RuntimeError" in message and "no corpus here" in message
    assert info.value.notebook == "b.ipynb" and info.value.cell == 4   # parameters, injected, x = 1, raise
    run = tmp_path / "runs" / "ci"
    done = nbformat.read(run / "notebooks" / "a.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in done.cells for o in c.get("outputs", []))
    assert sys.executable in printed and "\n3\n" in printed        # this interpreter; the run's parameters
    failed = nbformat.read(run / "notebooks" / "b.ipynb", as_version=4)
    assert any(o.output_type == "error" for c in failed.cells if c.cell_type == "code" for o in c.outputs)
    assert not (run / "notebooks" / "c.ipynb").exists()
    report = (run / "report.html").read_text()
    assert "a.ipynb" in report and "b.ipynb" in report and "no corpus here" in report


# --- the whole chain on params/ci.yaml ------------------------------------------------------------
@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "waveglow_lib", "run", "--params", "params/ci.yaml",
                           "--set", f"runs_dir={runs}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return runs / "ci", proc


def test_ci_run_executes_every_notebook_without_errors(ci_run):
    run, proc = ci_run
    for name in nr.NOTEBOOKS:
        nb = nbformat.read(run / "notebooks" / name, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        errors = [o for c in code for o in c.outputs if o.output_type == "error"]
        assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
        assert all(c.execution_count is not None for c in code), f"{name}: cells left unexecuted"
        injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1 and str(run / "params.yaml") in injected[0].source
        assert name in proc.stdout


def test_ci_run_metrics_are_complete_and_finite(ci_run):
    run, _ = ci_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["name"] == "ci"
    assert len(metrics["utterances"]) == 2
    for key in ("log_mel_distance", "mcd_db", "stoi", "pesq"):
        assert math.isfinite(metrics["summary"][key]), key
        assert all(math.isfinite(u[key]) for u in metrics["utterances"]), key
    parity = {row["backend"]: row for row in metrics["parity"]}
    assert {"torch", "onnxruntime", "openvino"} <= set(parity)
    assert parity["onnxruntime"]["snr_db_min"] >= 50 and parity["openvino"]["snr_db_min"] >= 50
    assert metrics["round_trip"]["snr_db"] >= 60                 # the flow inverts itself (fp32)
    throughput = metrics["throughput"]
    assert [row["batch_size"] for row in throughput] == [1, 2]
    for row in throughput:
        assert row["utterances_per_second"] > 0 and math.isfinite(row["real_time_factor"])


def test_ci_run_folder_and_report(ci_run):
    run, _ = ci_run
    for part in ("params.yaml", "mel", "onnx", "out", "wav", "notebooks", "metrics.json", "report.html"):
        assert (run / part).exists(), part
    from waveglow_lib.config import WorkflowConfig

    saved = WorkflowConfig.from_yaml(run / "params.yaml")
    assert saved.limit == 2 and Path(saved.runs_dir) == run.parent
    assert len(list((run / "wav").glob("*_syn.wav"))) == 2
    report = (run / "report.html").read_text()
    for name in nr.NOTEBOOKS:
        assert f"Notebook <code>{name}</code>" in report
    assert report.count("<audio") >= 5 and "data:image/png;base64" in report


def test_ci_run_keeps_the_widgets(ci_run):
    run, _ = ci_run
    for name in ("01_preprocess.ipynb", "05_listen_evaluate.ipynb"):
        nb = nbformat.read(run / "notebooks" / name, as_version=4)
        views = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                 if WIDGET_VIEW in o.get("data", {})]
        assert views, f"{name}: no widget displayed"
        models = nb.metadata["widgets"][WIDGET_STATE]["state"].values()
        assert any(m["model_name"] == "DropdownModel" for m in models)
