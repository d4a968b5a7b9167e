"""The notebooks: numbered in the order the runner and the README list them, committed clean, one
`parameters` cell each, and the whole chain run headless on params/ci.yaml through the real CLI
(`python -m waveglow_lib run`, papermill, the venv's ipykernel)."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from support import start_jupyterlab
from waveglow_lib.notebook import runner as nr

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


# --- the committed notebooks ----------------------------------------------------------------------
def _git(*args: str, cwd: Path = ROOT, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60, **kwargs)


def _committed(name: str):
    """The notebook as git holds it (the index: what the next commit contains), else the file.

    A notebook saved with outputs in JupyterLab is cleaned by the nbstripout filter on `git add`, so the
    working copy may hold outputs while the committed content must not."""
    try:
        proc = _git("show", f":notebooks/{name}")
    except (OSError, subprocess.SubprocessError):
        proc = None
    if proc is not None and proc.returncode == 0:
        return nbformat.reads(proc.stdout, as_version=4)
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def test_the_notebooks_are_numbered_in_the_order_the_runner_and_the_readme_list_them():
    """notebooks/ holds the runner's chain (00 … 05) then the on-demand ones (06, 07): each file and title
    carries its place in that order, and the README's step table names them in the same order."""
    order = nr.NOTEBOOKS + nr.ON_DEMAND_NOTEBOOKS
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(order)
    assert [name[:3] for name in order] == [f"{i:02d}_" for i in range(len(order))]
    for i, name in enumerate(order):
        assert _committed(name).cells[0].source.startswith(f"# {i} ·"), f"{name}: its title is not numbered {i}"
    stems = [Path(name).stem for name in order]
    table = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("|")]
    named = list(dict.fromkeys(stem for line in table for stem in re.findall(r"`(\d\d_\w+)`", line)))
    assert len(named) >= len(nr.NOTEBOOKS) and set(named) <= set(stems), named
    assert named == sorted(named, key=stems.index), f"README's step table: {named}"


@pytest.mark.parametrize("name", nr.NOTEBOOKS + nr.ON_DEMAND_NOTEBOOKS)
def test_committed_without_outputs_and_with_one_parameters_cell(name):
    nb = _committed(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), f"{name} has outputs: clear them"
    assert all("execution" not in c.metadata for c in code), f"{name} keeps execution timings"
    assert "widgets" not in nb.metadata, f"{name} keeps widget state"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    namespace: dict = {}
    exec(tagged[0].source, namespace)  # plain assignments only
    # the training notebook reads training parameters (TrainConfig), every other one the run's: each the
    # copy a person makes once (git ignores it), the shipped file until then (runner.own_params)
    expected = nr.MY_TRAIN_PARAMS if name == "07_train.ipynb" else nr.MY_PARAMS
    assert namespace["params_file"] == expected and namespace["overrides"] == {}
    assert f"/{expected}" in (ROOT / ".gitignore").read_text().splitlines()
    assert nb.metadata.kernelspec.name == nr.KERNEL_NAME
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    # all logic lives in waveglow_lib: the notebooks import nothing else that computes
    sources = "\n".join(c.source for c in code)
    reader = "notebook_train_config(params_file, overrides" if name == "07_train.ipynb" else \
        "notebook_config(params_file, overrides"
    assert reader in sources
    assert "def " not in sources.replace("def show", "")


def test_set_up_installs_nbstripout_as_a_git_filter_that_strips_outputs_on_add(tmp_path):
    """What `make setup` does (Makefile), in a scratch repository: the committed .gitattributes plus
    `nbstripout --install`; a notebook saved with outputs is then staged without them, cell ids kept."""
    pytest.importorskip("nbstripout")
    attributes = (ROOT / ".gitattributes").read_text()
    assert "*.ipynb filter=nbstripout" in attributes
    makefile = (ROOT / "Makefile").read_text()
    assert "nbstripout --install --attributes .gitattributes" in makefile and "--keep-id" in makefile
    repo = tmp_path / "repo"
    repo.mkdir()
    assert _git("init", "-q", cwd=repo).returncode == 0
    (repo / ".gitattributes").write_text(attributes)
    subprocess.run([sys.executable, "-m", "nbstripout", "--install", "--attributes", ".gitattributes"], cwd=repo,
                   check=True, capture_output=True)
    _git("config", "filter.nbstripout.clean", f'"{sys.executable}" -m nbstripout --keep-id', cwd=repo)
    nb = nbformat.read(NOTEBOOKS / "01_preprocess.ipynb", as_version=4)
    ids = [c.id for c in nb.cells]
    for cell in nb.cells:                  # as JupyterLab saves it after a run
        if cell.cell_type == "code":
            cell.execution_count = 7
            cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="printed\n")]
    nb.metadata["widgets"] = {WIDGET_STATE: {"state": {}, "version_major": 2, "version_minor": 0}}
    nbformat.write(nb, repo / "nb.ipynb")
    added = _git("add", "nb.ipynb", cwd=repo)
    assert added.returncode == 0, added.stderr
    staged = nbformat.reads(_git("show", ":nb.ipynb", cwd=repo).stdout, as_version=4)
    code = [c for c in staged.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    assert "widgets" not in staged.metadata and [c.id for c in staged.cells] == ids


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


@pytest.mark.e2e
def test_a_failing_notebook_stops_the_run_and_names_the_cell(tmp_path, monkeypatch):
    src = tmp_path / "nbs"
    src.mkdir()
    _notebook(src / "a.ipynb", "import sys\nprint(sys.executable)",
              "from waveglow_lib.notebook import notebook_config\n"
              "print(notebook_config(params_file, overrides).limit)",
              "from waveglow_lib.provenance import git_commit\nprint('commit', git_commit())")
    # the runner works the commit out once and its kernels record that one (they do not ask git again)
    monkeypatch.delenv(nr.COMMIT_ENV, raising=False)
    monkeypatch.setattr(nr, "git_commit", lambda: "c0ffee+from-the-runner")
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
    assert "commit c0ffee+from-the-runner" in printed and nr.COMMIT_ENV not in os.environ
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


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_ci_run_metrics_are_complete_and_finite(ci_run):
    run, _ = ci_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["name"] == "ci"
    # the commit that ran, though the kernels' working directory and git's filters could hide it
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty\??)?", metrics["commit"]), metrics["commit"]
    head = _git("rev-parse", "HEAD").stdout.strip()   # (an ancestor of it if a commit landed mid-run)
    assert _git("merge-base", "--is-ancestor", metrics["commit"].split("+")[0], head).returncode == 0
    assert len(metrics["utterances"]) == 2
    for key in ("log_mel_distance", "mcd_db", "stoi", "pesq"):
        assert math.isfinite(metrics["summary"][key]), key
        assert all(math.isfinite(u[key]) for u in metrics["utterances"]), key
    parity = {row["backend"]: row for row in metrics["parity"]}
    assert {"torch", "onnxruntime", "openvino"} <= set(parity)
    assert parity["onnxruntime"]["snr_db_min"] >= 50 and parity["openvino"]["snr_db_min"] >= 50
    assert metrics["round_trip"]["snr_db"] >= 60                 # the flow inverts itself (fp32)
    assert metrics["backend_used"].startswith("onnxruntime") and metrics["precision_used"] == "fp32"  # ci.yaml
    throughput = metrics["throughput"]
    assert [row["batch_size"] for row in throughput] == [1, 2]
    assert {row["precision"] for row in throughput} == {"fp32"}
    for row in throughput:
        assert row["utterances_per_second"] > 0 and math.isfinite(row["real_time_factor"])


@pytest.mark.e2e
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
    # the summary on top, and nothing fetched from a network (tests/test_browser.py opens it offline)
    assert report.index('id="summary"') < report.index("Notebook <code>00_setup.ipynb</code>")
    assert "far from converged" in report and not re.findall(r"<script[^>]+src=", report)


@pytest.mark.e2e
def test_ci_run_keeps_the_widgets(ci_run):
    run, _ = ci_run
    for name in ("01_preprocess.ipynb", "05_listen_evaluate.ipynb"):
        nb = nbformat.read(run / "notebooks" / name, as_version=4)
        views = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                 if WIDGET_VIEW in o.get("data", {})]
        assert views, f"{name}: no widget displayed"
        models = nb.metadata["widgets"][WIDGET_STATE]["state"].values()
        assert any(m["model_name"] == "DropdownModel" for m in models)


# --- a real JupyterLab server (headless), the way a person runs the notebooks ---------------------
class JupyterLab:
    """`jupyter lab --no-browser` on 127.0.0.1 with a token, driven through its REST and kernel websocket
    API like the browser does: a session per notebook (kernel started in notebooks/, as JupyterLab does),
    cells sent as execute_requests, widget comm messages answered as the widget manager would."""

    def __init__(self, root: Path, workdir: Path):
        env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(workdir / "runtime"), "PYTHONPATH": str(root)}
        server = start_jupyterlab(root, env, workdir / "jupyterlab.log")
        self.proc, self.port, self.base, self.token = server.proc, server.port, server.base, server.token
        self.log = server.log

    def api(self, method: str, path: str, body: dict | None = None) -> dict:
        import urllib.request

        request = urllib.request.Request(f"{self.base}{path}?token={self.token}", method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
        return json.loads(text) if text else {}

    def open(self, notebook: str) -> "KernelChannel":
        session = self.api("POST", "/api/sessions", {"path": f"notebooks/{notebook}", "type": "notebook",
                                                     "name": notebook, "kernel": {"name": "python3"}})
        return KernelChannel(self, session["kernel"]["id"], session["id"])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class KernelChannel:
    def __init__(self, server: JupyterLab, kernel_id: str, session_id: str):
        import uuid

        import websocket

        self.server, self.kernel_id, self.session = server, kernel_id, uuid.uuid4().hex
        self.ws = websocket.create_connection(
            f"ws://127.0.0.1:{server.port}/api/kernels/{kernel_id}/channels?session_id={self.session}"
            f"&token={server.token}", timeout=300)
        self.comms: dict[str, dict] = {}      # comm_id -> the widget state the kernel opened it with

    def send(self, msg_type: str, content: dict, channel: str = "shell") -> str:
        import datetime
        import uuid

        msg_id = uuid.uuid4().hex
        self.ws.send(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": msg_type, "session": self.session, "username": "test",
                       "version": "5.3", "date": datetime.datetime.now(datetime.timezone.utc).isoformat()},
            "parent_header": {}, "metadata": {}, "content": content, "channel": channel, "buffers": []}))
        return msg_id

    def collect(self, msg_id: str) -> list[dict]:
        """iopub messages of one request, until the kernel is idle again."""
        messages = []
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id or msg["channel"] != "iopub":
                continue
            kind = msg["header"]["msg_type"]
            if kind == "status" and msg["content"]["execution_state"] == "idle":
                return messages
            if kind == "comm_open":
                self.comms[msg["content"]["comm_id"]] = msg["content"]["data"].get("state", {})
            messages.append(msg)

    def execute(self, code: str) -> list[dict]:
        return self.collect(self.send("execute_request", {"code": code, "silent": False, "store_history": True,
                                                          "user_expressions": {}, "allow_stdin": False,
                                                          "stop_on_error": True}))

    def close(self) -> None:
        self.ws.close()
        self.server.api("DELETE", f"/api/kernels/{self.kernel_id}")


def _errors(messages: list[dict]) -> list[str]:
    return [f"{m['content']['ename']}: {m['content']['evalue']}" for m in messages if m["header"]["msg_type"] == "error"]


def _mimetypes(messages: list[dict]) -> set[str]:
    return {mime for m in messages if m["header"]["msg_type"] in ("display_data", "execute_result")
            for mime in m["content"]["data"]}


@pytest.mark.e2e
def test_jupyterlab_runs_a_notebook_top_to_bottom_and_its_dropdown_works(ci_run, tmp_path):
    """01_preprocess in a real `jupyter lab` kernel (started in notebooks/, like a person's): every cell runs,
    the Dropdown widget opens its comm, and picking another utterance shows its plot and player."""
    run, _ = ci_run
    nb = nbformat.read(NOTEBOOKS / "01_preprocess.ipynb", as_version=4)
    server = JupyterLab(ROOT, tmp_path)
    try:
        kernel = server.open("01_preprocess.ipynb")
        try:
            where = kernel.execute("import os, sys; print(os.getcwd()); print(sys.prefix)")
            printed = "".join(m["content"].get("text", "") for m in where)
            assert printed.splitlines() == [str(NOTEBOOKS), sys.prefix], printed     # this venv's kernel
            outputs = []
            for cell in nb.cells:
                if cell.cell_type != "code":
                    continue
                source = cell.source
                if "parameters" in cell.metadata.get("tags", []):   # a person edits the parameters cell
                    source += f"\nparams_file = {str(run / 'params.yaml')!r}"
                messages = kernel.execute(source)
                assert not _errors(messages), f"{source.splitlines()[0]}: {_errors(messages)}"
                outputs.append(messages)
            assert {"image/png", "text/html"} <= _mimetypes([m for ms in outputs for m in ms])
            dropdowns = [cid for cid, state in kernel.comms.items() if state.get("_model_name") == "DropdownModel"]
            assert len(dropdowns) == 1
            assert kernel.comms[dropdowns[0]]["_options_labels"] == ["LJ001-0001", "LJ001-0002"]
            # the browser's widget manager, on a pick: update the model's synced `index`
            picked = kernel.collect(kernel.send("comm_msg", {"comm_id": dropdowns[0], "data": {
                "method": "update", "state": {"index": 1}, "buffer_paths": []}}))
            assert not _errors(picked)
            assert {"image/png", "text/html"} <= _mimetypes(picked)     # the figure and the audio player
            first = [m["content"]["data"]["image/png"] for ms in outputs for m in ms if "image/png" in m["content"].get("data", {})]
            again = [m["content"]["data"]["image/png"] for m in picked if "image/png" in m["content"].get("data", {})]
            assert again[0] != first[0]                                     # another utterance's figure
        finally:
            kernel.close()
    finally:
        server.close()


# --- papermill's parameters: names are code, and only the notebook's own are taken --------------------
def test_injected_parameter_names_are_checked_against_what_the_notebook_reads():
    from waveglow_lib.errors import ConfigError
    from waveglow_lib.notebook.parameters import check_names, injected_names

    assert injected_names('# Parameters\nparams_file = "x.yaml"\noverrides = {"limit": 2}\n') == \
        ["params_file", "overrides"]
    with pytest.raises(ConfigError, match=r"'param_file' is not one this notebook reads \(did you mean 'params_file'\?\)"):
        check_names(["param_file"], ["params_file", "overrides"])
    check_names(["params_file", "mels"], ["params_file", "overrides", "mels"])
    # papermill writes a name as given: `-p 'x=__import__("os");y' 1` is code, refused as such
    with pytest.raises(ConfigError, match="hold code"):
        injected_names('# Parameters\nx = __import__("os")\nprint(1)\n')


@pytest.mark.parametrize("params_file, overrides, says", [
    ("params/demo.yaml", "limit=3", "parameter 'overrides' must be a mapping"),
    (7, {}, "parameter 'params_file' must be a path"),
    ("params/demo.yaml", {1: 2}, "must have parameter names as keys"),
])
def test_wrong_parameter_types_get_one_line(params_file, overrides, says):
    from waveglow_lib.errors import ConfigTypeError

    with pytest.raises(ConfigTypeError, match=re.escape(says)) as info:
        nr.notebook_config(params_file, overrides)
    assert "\n" not in str(info.value)


def test_my_params_falls_back_to_the_shipped_file_until_a_person_makes_it(tmp_path):
    (tmp_path / "params").mkdir()
    assert nr.own_params(nr.MY_PARAMS, tmp_path) == tmp_path / nr.DEMO_PARAMS
    assert nr.own_params(nr.MY_TRAIN_PARAMS, tmp_path) == tmp_path / nr.TRAIN_DEMO_PARAMS
    (tmp_path / nr.MY_PARAMS).write_text("limit: 2\n")
    assert nr.own_params(nr.MY_PARAMS, tmp_path) == tmp_path / nr.MY_PARAMS
    assert nr.own_params("params/other.yaml", tmp_path) == tmp_path / "params" / "other.yaml"


@pytest.mark.e2e
@pytest.mark.parametrize("parameters, says", [
    ({"param_file": "params/ci.yaml"}, "ConfigError: papermill parameter 'param_file' is not one this notebook "
                                       "reads (did you mean 'params_file'?)"),
    ({"overrides": "limit=3"}, "ConfigTypeError: parameter 'overrides' must be a mapping"),
    ({"params_file": 3}, "ConfigTypeError: parameter 'params_file' must be a path"),
])
def test_papermill_with_a_wrong_parameter_stops_at_the_first_cell_with_one_line(tmp_path, parameters, says):
    """papermill called directly (not through `run`): a typo'd name or a wrong type stops the notebook in its
    first code cell after the parameters, with the one-line message and no traceback through the library."""
    import papermill as pm

    output = tmp_path / "out.ipynb"
    with pytest.raises(pm.PapermillExecutionError):
        pm.execute_notebook(str(NOTEBOOKS / "00_setup.ipynb"), str(output), parameters=parameters,
                            kernel_name=nr.KERNEL_NAME, kernel_manager_class=nr._kernel_manager_class(),
                            cwd=str(ROOT), progress_bar=False)
    nb = nbformat.read(output, as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert len(errors) == 1
    shown = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(errors[0].traceback))
    assert shown.startswith(says) and "\n" not in shown and "Traceback" not in shown, shown


@pytest.mark.e2e
def test_training_notebook_runs_headless_on_tiny_settings(tmp_path):
    """07_train end to end under papermill (as `run` executes notebooks), on a tiny model for 2 steps."""
    import papermill as pm

    from support import TINY

    overrides = {"out_dir": str(tmp_path / "train"), "model": dict(TINY), "segment_length": 1024, "batch_size": 1,
                 "max_steps": 2, "log_every": 1, "checkpoint_every": 2, "validate_every": 0, "num_threads": 1}
    output = tmp_path / "07_train.ipynb"
    pm.execute_notebook(str(nr.NOTEBOOKS_DIR / "07_train.ipynb"), str(output),
                        parameters={"params_file": "params/train_demo.yaml", "overrides": overrides, "show_every": 1},
                        kernel_name=nr.KERNEL_NAME, kernel_manager_class=nr._kernel_manager_class(),
                        cwd=str(nr.project_dir()), progress_bar=False)
    executed = nbformat.read(output, as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert (tmp_path / "train" / "train_state.safetensors").is_file()


def test_run_hands_the_training_notebook_no_workflow_params_file(tmp_path, monkeypatch):
    """Contract test (papermill's execute_notebook replaced by a recorder, nothing executed): `run` injects
    the run's params.yaml, a workflow params file, into every notebook but 07_train, which reads training
    parameters (its own params/my_train.yaml, else params/train_demo.yaml); before, 07 was handed the
    workflow file and failed on its keys. 07's real run under papermill is the e2e test above."""
    import papermill as pm

    given = {}

    def record(source, output, parameters=None, **_):
        given[Path(source).name] = parameters
        Path(output).write_text("{}")

    monkeypatch.setattr(pm, "execute_notebook", record)
    nr.run_notebooks(ROOT / "params" / "ci.yaml", {"runs_dir": str(tmp_path / "runs")},
                     notebooks=["00_setup.ipynb", "07_train.ipynb"], report=False, progress=False)
    assert given["07_train.ipynb"] == {"overrides": {}}
    assert Path(given["00_setup.ipynb"]["params_file"]).name == "params.yaml"
