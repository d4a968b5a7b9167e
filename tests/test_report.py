"""waveglow_lib.notebook.report and waveglow_lib.provenance: the summary on top of report.html, the offline page, and
what metrics.json records about where its numbers come from."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import nbformat
import pytest

from waveglow_lib.notebook import report
from waveglow_lib.config import DEMO_CORPUS_DIR, DEMO_MODEL_CARD, DEMO_MODEL_PATH, WorkflowConfig
from waveglow_lib import provenance
from waveglow_lib.provenance import checkpoint_info, git_commit, run_provenance

pytest.importorskip("nbconvert")


def _run_folder(tmp_path, demo=True):
    """A run folder as the notebooks leave it: params, manifest, one synthesised wav, timings, metrics."""
    run = tmp_path / "runs" / "t"
    cfg = WorkflowConfig(name="t", runs_dir=str(tmp_path / "runs"), limit=2,
                         checkpoint="demo" if demo else str(tmp_path / "copy.safetensors.gz"))
    if not demo:
        shutil.copy(DEMO_MODEL_PATH, tmp_path / "copy.safetensors.gz")
        (tmp_path / "copy.safetensors.gz").write_bytes(b"not the demo model")
    cfg.to_yaml(run / "params.yaml")
    wavs = sorted((DEMO_CORPUS_DIR / "wavs").glob("*.wav"))[:2]
    items = [{"id": w.stem, "wav": str(w), "samples": 22050, "mel_frames": 87, "shape": [80, 87]} for w in wavs]
    (run / "mel").mkdir(parents=True)
    (run / "mel" / "manifest.json").write_text(json.dumps({"sampling_rate": 22050, "items": items}))
    (run / "wav").mkdir()
    shutil.copy(wavs[0], run / "wav" / f"{wavs[0].stem}_syn.wav")        # the second one "not written"
    (run / "out").mkdir()
    (run / "out" / "timings.json").write_text(json.dumps({"settings": {
        "backend_used": "fast (bf16)", "precision_used": "bf16",
        "precision_probe": {"reason": "bf16: native, quality gate passed on the probe", "snr_db": 46.6,
                            "log_mel_distance": 0.002}}}))
    metrics = {"summary": {"log_mel_distance": 1.5, "mcd_db": 64.8, "stoi": 0.37, "pesq": 1.02},
               "utterances": [{"id": wavs[0].stem, "stoi": 0.37, "pesq": 1.02}],
               "parity": [{"backend": "torch", "reference": "torch", "snr_db_min": None, "utterances": 1},
                          {"backend": "onnxruntime", "reference": "torch", "snr_db_min": 71.2, "utterances": 1}],
               "round_trip": {"snr_db": 88.5},
               "throughput": [{"batch_size": 1, "backend": "fast", "precision": "bf16",
                               "utterances_per_second": 3.5, "utterances_per_second_p10": 3.1,
                               "utterances_per_second_p90": 3.8, "real_time_factor": 0.2}],
               **run_provenance(cfg)}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run, cfg, wavs


def test_provenance_recognises_the_demo_model_by_content(tmp_path):
    demo = checkpoint_info(WorkflowConfig())
    assert demo["is_demo_model"] and len(demo["sha256"]) == 64 and demo["size_bytes"] == DEMO_MODEL_PATH.stat().st_size
    copy = tmp_path / "renamed.safetensors.gz"
    shutil.copy(DEMO_MODEL_PATH, copy)
    assert checkpoint_info(WorkflowConfig(checkpoint=str(copy)))["is_demo_model"]   # a copy is still the demo
    copy.write_bytes(b"something else")
    other = checkpoint_info(WorkflowConfig(checkpoint=str(copy)))
    assert not other["is_demo_model"] and other["size_bytes"] == len(b"something else")
    missing = checkpoint_info(WorkflowConfig(checkpoint=str(tmp_path / "nope.pt")))
    assert missing["sha256"] is None and "not found" in missing["note"]


def test_run_provenance_fields(tmp_path):
    run, cfg, _ = _run_folder(tmp_path)
    record = run_provenance(cfg)
    assert record["backend_used"] == "fast (bf16)" and record["precision_used"] == "bf16"
    assert record["precision_probe"]["snr_db"] == 46.6
    assert record["machine"]["cpu"] and record["machine"]["logical_cpus"] >= 1
    assert record["commit"] == git_commit() and record["commit"]
    json.dumps(record)   # plain JSON


def test_commit_survives_a_slow_dirty_check_and_any_working_directory(tmp_path, monkeypatch):
    """`make demo` recorded commit "unknown": with the nbstripout filter configured, `git status` runs it (a
    Python start) for every notebook whose file stat changed, 18 s on a loaded 2-core machine, past the
    dirty check's bound, and that timeout threw away the HEAD already read."""
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                              capture_output=True, text=True, timeout=60).stdout.strip()

    git("init", "-q")
    (repo / ".gitattributes").write_text("*.ipynb filter=slow\n")
    (repo / "a.ipynb").write_text("{}\n")
    git("add", ".")
    git("commit", "-qm", "one")
    git("config", "filter.slow.clean", "sleep 12; cat")   # longer than the old 10 s bound
    later = time.time() + 100
    os.utime(repo / "a.ipynb", (later, later))            # same content, new stat: status must run the filter
    monkeypatch.setattr(provenance, "DIRTY_CHECK_SECONDS", 1, raising=False)
    monkeypatch.delenv(provenance.COMMIT_ENV, raising=False)
    start = time.perf_counter()
    assert git_commit(repo) == git("rev-parse", "HEAD") + "+dirty?"   # the hash kept, the check said unfinished
    assert time.perf_counter() - start < 8

    monkeypatch.chdir(tmp_path)   # a kernel's working directory is no guide to the code's repository
    root = Path(provenance.__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    assert git_commit().split("+")[0] == head
    monkeypatch.setenv(provenance.COMMIT_ENV, "0123abc")   # what the runner hands its kernels
    assert git_commit() == "0123abc" and run_provenance(WorkflowConfig(name="t"))["commit"] == "0123abc"
    assert git_commit(repo).startswith(git("rev-parse", "HEAD"))   # an explicit repository is still asked


def test_summary_names_the_run_checkpoint_backend_and_embeds_the_players(tmp_path):
    run, cfg, wavs = _run_folder(tmp_path)
    page = report.summary_html(run, ["00_setup.ipynb", "05_listen_evaluate.ipynb"])
    assert "WaveGlow run “t”" in page
    assert report.DEMO_BANNER.split(":")[0] in page and "far from converged" in page
    card = json.loads(DEMO_MODEL_CARD.read_text())   # how the bundled model was made, and its scores
    assert "How it was made: " + card["recipe"][:40] in page and f"STOI {card['scores']['stoi']:.3f}" in page
    assert "demo_waveglow.safetensors.gz" in page and " M</td>" in page          # file and parameter count
    assert "fast (bf16)" in page and "quality gate passed" in page and "46.6" in page   # auto's verdict
    assert page.count('data-kind="original"') == 2 and page.count('data-kind="synthesised"') == 1
    assert page.count("data:audio/wav;base64,") == 3 and "not written" in page
    assert "≈ 0.9 or more" in page and "approximate" in page                     # reference ranges, labelled
    assert "onnxruntime vs torch" in page and "torch vs torch" not in page and "88.5" in page
    assert "3.1" in page and "3.8" in page                                       # throughput spread
    assert 'href="#00_setup"' in page and 'href="#05_listen_evaluate"' in page
    assert re.search(r"<td>commit</td><td><code>[0-9a-f]{40}|<td>commit</td><td><code>unknown", page)


def test_summary_of_a_trained_checkpoint_has_no_banner_and_survives_missing_files(tmp_path):
    run, cfg, _ = _run_folder(tmp_path, demo=False)
    (run / "metrics.json").write_text(json.dumps(run_provenance(cfg)))
    assert "far from converged" not in report.summary_html(run)
    for name in ("metrics.json", "out/timings.json", "mel/manifest.json"):
        (run / name).unlink()
    page = report.summary_html(run)      # a run that stopped early still gets a summary
    assert "preprocess did not run" in page and "did not finish" in page and "infer did not run" in page


def _executed_notebook():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# A notebook"),
                nbformat.v4.new_code_cell("x = 41 + 1\nx", execution_count=1, outputs=[
                    nbformat.v4.new_output("execute_result", {"text/plain": "42"}, execution_count=1)]),
                nbformat.v4.new_code_cell("picker", execution_count=2, outputs=[nbformat.v4.new_output(
                    "display_data", {"application/vnd.jupyter.widget-view+json": {"model_id": "box", "version_major": 2,
                                                                                  "version_minor": 0},
                                     "text/plain": "VBox(...)"})])]
    shown = [{"output_type": "display_data", "metadata": {}, "data": {"text/html": "<p>first utterance shown</p>"}}]
    nb.metadata["widgets"] = {report.WIDGET_STATE: {"version_major": 2, "version_minor": 0, "state": {
        "box": {"model_name": "VBoxModel", "state": {"children": ["IPY_MODEL_dd", "IPY_MODEL_out"]}},
        "dd": {"model_name": "DropdownModel", "state": {"_options_labels": ["LJ001-0001", "LJ001-0002"],
                                                        "index": 0, "description": "utterance"}},
        "out": {"model_name": "OutputModel", "state": {"outputs": shown}}}}}
    return nb


def test_export_loads_nothing_from_the_network_and_folds_code():
    page = report.export_html(_executed_notebook(), "<section id='summary'>SUMMARY</section>")
    assert "SUMMARY" in page and page.index("SUMMARY") < page.index("A notebook")
    assert not re.findall(r"<script[^>]+src=", page), "external scripts"
    assert "require.js" not in page and "mathjax" not in page.lower() and "cdn" not in page.lower()
    assert not re.search(r"Out(\[|&nbsp;\[)[0-9 ]", page) and 'class="jp-OutputPrompt' not in page
    assert page.count('<details class="wg-code">') == 2
    # the picker became its static content: the pick, then what its Output showed
    assert "<b>LJ001-0001</b>" in page and "first utterance shown" in page
    assert "widget-state+json" not in page

