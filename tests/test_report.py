"""waveglow_lib.notebook.report and waveglow_lib.provenance: the summary on top of report.html, the offline page, and
what metrics.json records about where its numbers come from."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import numpy as np
import pytest

from waveglow_lib.notebook import report
from waveglow_lib.config import DEMO_CORPUS_DIR, DEMO_MODEL_CARD, DEMO_MODEL_PATH, WorkflowConfig
from waveglow_lib.errors import DataError, RunFolderError, WaveGlowError
from waveglow_lib import provenance
from waveglow_lib.provenance import checkpoint_info, git_commit, run_provenance

pytest.importorskip("nbconvert")
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


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
    # the hash kept, the check said unfinished: the filter's 12 s were not waited for (no clock asserted)
    assert git_commit(repo) == git("rev-parse", "HEAD") + "+dirty?"

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



# --- trust: strings are text, records are data --------------------------------------------------------
#: markup that would run or add an element or attribute if any field let it through as HTML or Markdown
PAYLOAD = ("\"'><img src=x onerror=alert(1)><script>alert(2)</script><svg onload=alert(3)><b id=pwned>"
           "[link](javascript:alert(4))<a href='javascript:alert(5)'>a</a>`code` *em* | cell &amp;")
#: the same where a folder name is wanted (no '/')
PAYLOAD_NAME = "\"'><img src=x onerror=alert(1)><b id=pwned onmouseover='alert(6)'>"


class _Elements(HTMLParser):
    """Every element and attribute of a page, and its text, as a real HTML parser sees them."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    handle_startendtag = handle_starttag

    def handle_data(self, data):
        self.text.append(data)


def assert_no_markup_from_the_payload(page: str) -> _Elements:
    parsed = _Elements(page)
    for tag, attrs in parsed.elements:
        assert tag not in ("script", "svg", "iframe", "object", "embed"), (tag, attrs)
        assert tag != "img" or (attrs.get("src") or "").startswith("data:image/"), (tag, attrs)
        assert not [a for a in attrs if a.startswith("on")], (tag, attrs)
        assert attrs.get("id") != "pwned", (tag, attrs)
        assert not (attrs.get("href") or "").lower().startswith("javascript:"), (tag, attrs)
    return parsed


def hostile_bench_result(payload: str = PAYLOAD) -> dict:
    """What `run_bench` returns (the keys render_markdown reads), with `payload` in every string a run's
    parameters, paths or machine can put there."""
    row = {"batch_size": 1, "label": payload, "utterances_per_second": 1.0, "audio_seconds_per_second": 2.0,
           "audio_seconds_per_second_p10": 1.9, "audio_seconds_per_second_p90": 2.1, "speedup_vs_reference": 1.0,
           "ratio_vs_openvino_bf16": None, "effective_gflops": 3.0, "percent_of_peak": 4.0, "precision": payload,
           "peak_memory_mib": 5.0, "load_memory_mib": 0.0, "snr_db": 60.0, "log_mel_distance": 0.001,
           "quality_ok": True}
    return {
        "machine": {"cpu": payload, "usable_cpus": 2, "torch_threads": 2, "isa": {payload: True},
                    "torch_cpu_capability": payload, "load_average": [0.5], "versions": {payload: payload}},
        "peaks_gflops": {payload: 1.0},
        "settings": {"model": payload, "utterances": 1, "lengths": [payload], "audio_seconds_per_pass": 1.0,
                     "mel_source": payload, "sigma": 0.6, "seed": 0, "repeats": 1, "threads": 2,
                     "reference_gflop_per_audio_second": 1.0, "reference_macs_per_step": 10,
                     "model_config": {"n_group": 8}, "folded_macs_per_step": 9,
                     "quality_gate": {"max_log_mel_distance": 0.05, "min_snr_db": 30},
                     "load": {"cores": 1, "pinned_to_cpus": [payload], "seconds": 1, "competitor_core_share": [0.5]},
                     "batch_sizes": [1], "quick": False},
        "engine_build": {payload: {"first_seconds": 1, "cached_seconds": 0.1}},
        "rows": [row],
        "auto": {"overall": payload, "per_batch_size": {"1": payload}, "rejected": [payload]},
        "default_path": {"row": payload, "per_batch_size": {"1": {"ratio_vs_openvino_bf16": 1.0,
                                                                 "speedup_vs_reference": 1.0,
                                                                 "real_time_factor": 0.5, "quality_ok": True}}},
        "busy": payload, "skipped_rows": {payload: payload},
        "guide_mean_audio_seconds": 6.6, "guide": {payload: {"1": 1.0, "4": 1.0, "8": 1.0, "16": 1.0}},
        "profile": {"frames": 10, payload: {"wall_seconds": 1, "top": [{"op": payload, "percent": 50}]}},
    }


def _hostile_run(tmp_path):
    """A run whose runs_dir, name and corpus path hold markup, and whose records hold it in every string field
    (the shapes are right: these are the values a hostile collaborator or a careless path would give)."""
    runs_dir = tmp_path / PAYLOAD / "runs"
    corpus = tmp_path / PAYLOAD_NAME / "corpus"
    (corpus / "wavs").mkdir(parents=True)
    wavs = sorted((DEMO_CORPUS_DIR / "wavs").glob("*.wav"))[:2]
    for w in wavs:
        shutil.copy(w, corpus / "wavs")
    cfg = WorkflowConfig(name=PAYLOAD_NAME, runs_dir=str(runs_dir), corpus=str(corpus), limit=2)
    run = cfg.layout.root
    cfg.to_yaml(run / "params.yaml")
    items = [{"id": w.stem, "wav": str(corpus / "wavs" / w.name), "samples": 22050, "mel_frames": 87,
              "shape": [80, 87]} for w in wavs]
    (run / "mel").mkdir(parents=True)
    (run / "mel" / "manifest.json").write_text(json.dumps({"sampling_rate": 22050, "items": items}))
    (run / "wav").mkdir()
    shutil.copy(wavs[0], run / "wav" / f"{wavs[0].stem}_syn.wav")
    (run / "out").mkdir()
    (run / "out" / "timings.json").write_text(json.dumps({"settings": {
        "backend_used": PAYLOAD, "precision_used": PAYLOAD, "precision_probe": {"reason": PAYLOAD, "snr_db": 40.0}}}))
    (run / "bench.json").write_text(json.dumps({"settings": {"model": PAYLOAD, "quick": False, "utterances": 1,
                                                             "repeats": 1}}))
    metrics = {"name": PAYLOAD, "backend": PAYLOAD, "precision": PAYLOAD,
               "summary": {"log_mel_distance": 1.5, "mcd_db": 64.8, "stoi": 0.37, "pesq": 1.02},
               "utterances": [{"id": wavs[0].stem, "stoi": 0.37, "notes": [PAYLOAD]}],
               "parity": [{"backend": PAYLOAD, "reference": "torch", "snr_db_min": 71.2, "utterances": 1}],
               "throughput": [{"batch_size": 1, "backend": PAYLOAD, "precision": PAYLOAD,
                               "utterances_per_second": 3.5}],
               "checkpoint": {"path": PAYLOAD, "file": PAYLOAD, "sha256": PAYLOAD, "size_bytes": 10,
                              "is_demo_model": True, "note": PAYLOAD},
               "machine": {"cpu": PAYLOAD, "hostname": PAYLOAD, "usable_cpus": 2},
               "commit": PAYLOAD, "written_at": PAYLOAD, "backend_used": PAYLOAD}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run, cfg


def _hostile_notebook(folder: Path) -> Path:
    """An executed notebook, saved under a file name with markup, whose outputs are what the notebooks display
    with markup in their values: 04_infer's bench Markdown, tables, players, the picker, text, an error."""
    from waveglow_lib.bench import render_markdown
    from waveglow_lib.notebook import display

    nb = _executed_notebook()
    nb.metadata["widgets"][report.WIDGET_STATE]["state"]["dd"]["state"]["_options_labels"] = [PAYLOAD, "b"]
    shown = [("text/markdown", render_markdown(hostile_bench_result())),
             ("text/html", display.Table([{"path": PAYLOAD, PAYLOAD: 1.0}], caption=PAYLOAD)._repr_html_()),
             ("text/html", display.key_value_table({PAYLOAD: PAYLOAD})._repr_html_()),
             ("text/html", display.StageNote(PAYLOAD, 1, 0)._repr_html_()),
             ("text/html", display.players({PAYLOAD: np.zeros(2205, np.float32)}).data)]
    nb.cells += [nbformat.v4.new_code_cell("shown", execution_count=3, outputs=[
        nbformat.v4.new_output("display_data", {mime: data, "text/plain": PAYLOAD}) for mime, data in shown] + [
        nbformat.v4.new_output("stream", name="stdout", text=PAYLOAD),
        nbformat.v4.new_output("execute_result", {"text/plain": PAYLOAD}, execution_count=3),
        nbformat.v4.new_output("error", ename=PAYLOAD, evalue=PAYLOAD, traceback=[PAYLOAD])])]
    path = folder / f"{PAYLOAD_NAME}.ipynb"
    nbformat.write(nb, path)
    return path


def test_every_string_a_user_controls_is_text_in_the_report(tmp_path):
    """Markup in runs_dir, name, the corpus path, every string field of metrics.json / timings.json /
    bench.json, the notebook's file name and what the notebooks display (04_infer's bench Markdown included):
    parsed by a real HTML parser, not one element or attribute of the page came from it, and it shows as text."""
    from waveglow_lib.notebook.runner import render_report

    run, cfg = _hostile_run(tmp_path)
    notebook = _hostile_notebook(tmp_path)
    for given in (None, cfg):     # the run folder's params.yaml, or the runner's parameters
        page = render_report([notebook], run / "report.html", title=f"WaveGlow run {cfg.name!r}",
                             **({"cfg": given} if given else {})).read_text()
        parsed = assert_no_markup_from_the_payload(page)
        text = "".join(parsed.text)
        assert "<img src=x onerror=alert(1)>" in text and "<b id=pwned" in text      # shown, as text
        assert text.count("<script>alert(2)</script>") >= 10
        assert page.count('data-kind="original"') == 2                       # the corpus wavs are still played


def test_bench_markdown_is_text_wherever_it_is_rendered():
    """bench.md and 04_infer's Markdown output: a value never becomes an element, a link or another table cell
    (nbconvert's Markdown renderer passes raw HTML through); ordinary values read as they are."""
    from nbconvert.filters.markdown import markdown2html
    from waveglow_lib.bench import render_markdown
    from waveglow_lib.bench.report import markdown_text

    markdown = render_markdown(hostile_bench_result())
    rendered = markdown2html(markdown)
    parsed = assert_no_markup_from_the_payload(rendered)
    assert not [attrs for tag, attrs in parsed.elements        # no link made of a value (headings' anchors only)
                if tag == "a" and not attrs.get("href", "").startswith("#")]
    assert "<img src=x onerror=alert(1)>" in "".join(parsed.text)
    header, row = [line for line in markdown.splitlines() if line.startswith("| ")][:2]   # Batch 1's table
    assert len(re.findall(r"(?<!\\)\|", row)) == len(re.findall(r"(?<!\\)\|", header))   # no extra cell
    assert markdown_text("Intel(R) Xeon(R) 8480+, runs/demo/mel") == "Intel(R) Xeon(R) 8480+, runs/demo/mel"
    assert markdown_text("a\n\n<b>") == "a  &lt;b&gt;"                             # no paragraph break either


def test_report_runs_no_script_and_says_so_in_its_policy(tmp_path):
    """A Content-Security-Policy as the second wall behind escaping: the report has no script of its own, so
    it allows none, loads nothing, and shows only what it embeds."""
    page = report.export_html(_executed_notebook(), report.summary_html(_run_folder(tmp_path)[0]))
    parsed = _Elements(page)
    assert not [attrs for tag, attrs in parsed.elements if tag == "script"]
    tags = [tag for tag, _ in parsed.elements]
    policy = [attrs["content"] for tag, attrs in parsed.elements
              if tag == "meta" and attrs.get("http-equiv") == "Content-Security-Policy"]
    assert policy == [report.CONTENT_SECURITY_POLICY] and tags.index("meta") < tags.index("title")
    assert "script-src 'none'" in policy[0] and "default-src 'none'" in policy[0]


def test_a_record_may_only_point_inside_the_folders_the_parameters_name(tmp_path):
    """A forged mel/manifest.json naming a file outside the corpus put that file, base64, in the report."""
    run, cfg, wavs = _run_folder(tmp_path)
    secret = tmp_path / "secret.wav"
    shutil.copy(wavs[0], secret)
    manifest = json.loads((run / "mel" / "manifest.json").read_text())
    for pointed in (str(secret), "/etc/passwd", str(DEMO_CORPUS_DIR / "wavs" / ".." / ".." / "demo_waveglow.card.json")):
        manifest["items"][1]["wav"] = pointed
        (run / "mel" / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(RunFolderError, match=r"manifest\.json: field items\['.*'\]\.wav names .*outside the corpus"):
            report.summary_html(run)
    # inside the corpus, but not a wav: not embedded whatever its name says
    corpus = tmp_path / "corpus"
    (corpus / "wavs").mkdir(parents=True)
    (corpus / "wavs" / "fake.wav").write_text("not audio, a secret")
    (run / "params.yaml").write_text((run / "params.yaml").read_text().replace("corpus: demo", f"corpus: {corpus}"))
    manifest["items"] = manifest["items"][:1]
    manifest["items"][0]["wav"] = str(corpus / "wavs" / "fake.wav")
    (run / "mel" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"fake\.wav: not a WAV file"):
        report.summary_html(run)
    # a synthesised wav reached through a link out of the run folder
    (run / "wav").rename(tmp_path / "elsewhere")
    (run / "wav").symlink_to(tmp_path / "elsewhere")
    manifest["items"][0]["wav"] = str(corpus / "wavs" / "fake.wav")
    shutil.copy(wavs[0], corpus / "wavs" / "fake.wav")
    (run / "mel" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunFolderError, match="outside"):
        report.summary_html(run)


@pytest.mark.parametrize("name, content, field", [
    ("metrics.json", [], "a JSON array"),
    ("metrics.json", {"summary": []}, "field summary holds a JSON array"),
    ("metrics.json", {"summary": {"stoi": PAYLOAD}}, "field summary.stoi holds a JSON string"),
    ("metrics.json", {"utterances": [1]}, r"field utterances\[0\] holds a JSON number"),
    ("metrics.json", {"parity": [{"backend": ["x"]}]}, r"field parity\[0\]\.backend holds a JSON array"),
    ("metrics.json", {"checkpoint": {"size_bytes": "10"}}, "field checkpoint.size_bytes holds a JSON string"),
    ("metrics.json", {"machine": "x"}, "field machine holds a JSON string"),
    ("out/timings.json", {"settings": []}, "field settings holds a JSON array"),
    ("out/timings.json", {"settings": {"precision_probe": {"snr_db": "1"}}}, "settings.precision_probe.snr_db"),
    ("bench.json", {"settings": {"quick": "yes"}}, "field settings.quick holds a JSON string"),
    ("metrics.json", "{not json", "not valid JSON"),
    ("mel/manifest.json", {"items": [1]}, "an item is int"),
    ("mel/manifest.json", {"sampling_rate": "22050", "items": []}, "field sampling_rate must be a positive integer"),
    ("mel/manifest.json", {"items": [{"id": "a", "wav": 3, "shape": [80, 2], "mel_frames": 2, "samples": 9}]},
     "field wav must be a path"),
    ("mel/manifest.json", {"items": [{"id": "a", "shape": "80x2", "mel_frames": 2, "samples": 9}]},
     "field shape must be"),
])
def test_a_record_of_the_wrong_shape_is_an_error_naming_the_file(tmp_path, name, content, field):
    """metrics.json a list was a raw AttributeError; a field of another type crashed or reached the page."""
    run, _, _ = _run_folder(tmp_path)
    (run / name).write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(WaveGlowError, match=field) as error:
        report.summary_html(run)
    assert str(run / name) in str(error.value) and "\n" not in str(error.value)


def test_the_readers_of_metrics_timings_and_the_manifest_settings_check_them(tmp_path):
    """The same records read by evaluate and provenance: an error naming the file, not an AttributeError or
    STFT settings of the wrong type taken in silence."""
    from waveglow_lib.evaluate import _run_stft, read_metrics

    run, cfg, _ = _run_folder(tmp_path)
    (run / "metrics.json").write_text("[]")
    with pytest.raises(DataError, match="metrics.json: holds a JSON array"):
        read_metrics(run / "metrics.json")
    (run / "out" / "timings.json").write_text(json.dumps({"settings": ["fast"]}))
    with pytest.raises(DataError, match="timings.json: field settings holds a JSON array"):
        provenance.backend_used(cfg)
    manifest = run / "mel" / "manifest.json"
    with pytest.raises(WaveGlowError, match="manifest.json: settings.stft.*hop_length"):
        _run_stft({"settings": {"stft": {"hop_length": "256"}}}, manifest)
    with pytest.raises(WaveGlowError, match="manifest.json: field settings holds list"):
        _run_stft({"settings": ["stft"]}, manifest)
    assert _run_stft({"settings": {"stft": {"hop_length": 200}}}, manifest).hop_length == 200


def test_the_notebooks_open_a_manifest_wav_only_through_the_corpus_check():
    """01 and 05 played whatever file the manifest named: every wav they take from a manifest item goes
    through layout.corpus_wav (inside the corpus the parameters name)."""
    for name in ("01_preprocess.ipynb", "05_listen_evaluate.ipynb"):
        source = "\n".join(c.source for c in nbformat.read(NOTEBOOKS / name, as_version=4).cells
                           if c.cell_type == "code")
        opened = re.findall(r"load_wav\(([^,]*\[\"wav\"\])", source)
        assert not opened, (name, opened)
        assert "corpus_wav(cfg.corpus_dir" in source, name


def test_a_folder_or_fifo_in_place_of_a_record_is_named_not_taken_for_a_missing_one(tmp_path):
    """A FIFO or a folder named metrics.json made the report say "05_listen_evaluate did not finish"."""
    run, _, _ = _run_folder(tmp_path)
    (run / "metrics.json").unlink()
    os.mkfifo(run / "metrics.json")
    with pytest.raises(DataError, match=r"metrics\.json: not a regular file \(a FIFO\)"):
        report.summary_html(run)
    (run / "metrics.json").unlink()
    (run / "metrics.json").mkdir()
    with pytest.raises(DataError, match=r"metrics\.json: not a regular file \(a folder\)"):
        report.summary_html(run)


def test_a_damaged_record_does_not_hide_the_notebook_that_failed(tmp_path, monkeypatch, capsys):
    """A contract test of the runner against papermill's API (`execute_notebook` mocked: it writes the executed
    notebook, then raises PapermillExecutionError as papermill does): the run's error stays the notebook's,
    and the report's own error (here a metrics.json of the wrong shape) is said on stderr beside it."""
    import papermill
    from waveglow_lib.errors import NotebookRunError
    from waveglow_lib.notebook import runner

    def fail(source, output, **_):
        shutil.copy(source, output)
        raise papermill.PapermillExecutionError(1, 1, "raise RuntimeError('no corpus')", "RuntimeError",
                                                "no corpus", [])

    monkeypatch.setattr(papermill, "execute_notebook", fail)
    notebooks = tmp_path / "nbs"
    notebooks.mkdir()
    nbformat.write(_executed_notebook(), notebooks / "a.ipynb")
    cfg = WorkflowConfig(name="t", runs_dir=str(tmp_path / "runs"))
    (tmp_path / "runs" / "t").mkdir(parents=True)
    (tmp_path / "runs" / "t" / "metrics.json").write_text("[1]")
    with pytest.raises(NotebookRunError, match="a.ipynb failed at cell"):
        runner.run_notebooks(cfg, notebooks=["a.ipynb"], notebooks_dir=notebooks, progress=False)
    err = capsys.readouterr().err
    assert "report.html not rendered: " in err and "metrics.json: holds a JSON array" in err
