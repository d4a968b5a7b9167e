"""report.html: a summary of the run on top, then the executed notebooks, readable offline.

`summary_html(run_dir)` reads only the run folder (params.yaml, metrics.json, out/timings.json,
bench.json, mel/manifest.json, wav/) and says what was run, on which checkpoint, with which backend and
precision and why, what came out (players, metrics beside what a trained model scores, parity, round
trip, throughput) and links to the notebooks below. `export_html(notebook, summary)` renders the merged
notebooks with nbconvert's lab template minus everything it would fetch from the network (require.js,
MathJax, mermaid, the widget renderer), with code cells folded and no `Out[n]:` prompts; widgets, which
need that JavaScript, become their static content.
"""
from __future__ import annotations

import base64
import copy
import html
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..checkpoint import load_waveglow
from ..config import DEMO_MODEL_CARD, MAX_PARAMS_BYTES, STFTConfig, WorkflowConfig
from .display import METRIC_NAMES, REFERENCE, REFERENCE_NOTE
from ..errors import WaveGlowError
from ..io import MAX_RECORD_BYTES, read_bounded
from ..layout import RunLayout, syn_wav
from ..safe_yaml import load_yaml
from ..provenance import checkpoint_info, git_commit, machine as this_machine

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
DEMO_BANNER = ("Demo model: a small WaveGlow trained briefly on ten utterances on a CPU, far from converged — its "
               "audio is noisy, not yet clear speech (the metrics say how far); the round trip shows the pipeline "
               "is exact. Point <code>checkpoint:</code> at NVIDIA's <code>waveglow_256channels_universal_v5.pt</code> "
               "for speech.")

_CSS = """
.wg-summary { font-family: var(--jp-ui-font-family, sans-serif); max-width: 1100px; margin: 0 0 2em 0;
  padding: 1em 1.5em; border: 1px solid #ccc; border-radius: 6px; background: #fafafa; }
.wg-summary h1 { margin-top: 0.2em; }
.wg-summary table { border-collapse: collapse; margin: 0.4em 0 1em 0; }
.wg-summary th, .wg-summary td { border-bottom: 1px solid #ddd; padding: 3px 10px; text-align: left;
  vertical-align: middle; }
.wg-summary td.num { text-align: right; font-variant-numeric: tabular-nums; }
.wg-summary audio { height: 32px; width: 230px; }
.wg-banner { background: #fff3cd; border: 1px solid #e0c36a; padding: 0.6em 1em; border-radius: 4px;
  margin: 0.6em 0; }
.wg-note { color: #555; font-size: 90%; }
.wg-summary a { color: #0b57d0; text-decoration: underline; }
details.wg-code > summary { cursor: pointer; color: #666; font-size: 85%; margin: 2px 0; }
.jp-RenderedHTMLCommon td, .jp-RenderedHTMLCommon th { text-align: left; }
/* no In/Out prompts: text, code and outputs share one left edge */
.jp-Notebook .jp-InputPrompt, .jp-Notebook .jp-OutputPrompt { display: none !important; }
.wg-widget-note { color: #666; font-style: italic; margin: 4px 0; }
"""

#: nbconvert's lab template without what it loads from a network, code folded, no output prompts
_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{% block extra_css %}<style type="text/css">""" + _CSS + """</style>{% endblock extra_css %}
{%- block body_header -%}{{ super() }}
{{ resources.get('report_summary', '') }}
{%- endblock body_header -%}
{% block input_group -%}
<details class="wg-code"><summary>code</summary>
{{ super() }}
</details>
{%- endblock input_group %}
{% block output_area_prompt %}{% endblock output_area_prompt %}
{%- block data_widget_view scoped %}
<div class="wg-widget-note jp-OutputArea-output">(interactive widget: open the notebook in JupyterLab)</div>
{%- endblock data_widget_view -%}
"""


# --- reading the run folder -------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(read_bounded(path, "a run record (JSON)", MAX_RECORD_BYTES))
    except (OSError, ValueError, RecursionError):
        return None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        # the bounded reader and loader of params files: the run folder's copy is read like any other
        data = load_yaml(read_bounded(path, "a params file (YAML)", MAX_PARAMS_BYTES).decode("utf-8"), str(path)) \
            if path.is_file() else None
    except (OSError, ValueError):
        data = None
    return data if isinstance(data, dict) else {}


def _modified(path: Path) -> str | None:
    if not path.exists():
        return None
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _data_uri(path: Path, mime: str = "audio/wav") -> str | None:
    if not path.is_file():
        return None
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _count_parameters(checkpoint: str | None) -> int | None:
    """Parameters of the run's checkpoint (loaded through the allow-listed loader), None if unreadable."""
    try:
        model = load_waveglow(None if checkpoint in (None, "demo") else checkpoint)
    except (WaveGlowError, OSError, ValueError):
        return None
    return sum(p.numel() for p in model.parameters())


# --- formatting -------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:.0f}"
        return f"{value:.{digits}g}" if abs(value) >= 10 ** -(digits - 1) or value == 0 else f"{value:.2e}"
    return str(value)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None, numeric: Sequence[int] = ()) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(
        f'<td class="num">{cell}</td>' if i in numeric else f"<td>{cell}</td>" for i, cell in enumerate(row)) + "</tr>"
        for row in rows)
    return f"<table>{head}{body}</table>"


def _size(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 2 ** 20:.1f} MiB" if n >= 2 ** 20 else f"{n / 1024:.0f} KiB"


# --- the sections -----------------------------------------------------------------------------------
def _run_section(run_dir: Path, params: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    machine = metrics.get("machine") or {}
    if not machine:
        machine = this_machine()
    commit = metrics.get("commit")
    if not commit:
        commit = git_commit()
    layout = RunLayout(run_dir)
    date = _modified(layout.metrics) or _modified(layout.params) or "unknown"
    cores = machine.get("usable_cpus") or machine.get("logical_cpus")
    rows = [("run", f"<b>{_e(params.get('name', run_dir.name))}</b> (<code>{_e(run_dir)}</code>)"),
            ("date", _e(date)),
            ("commit", f"<code>{_e(commit)}</code>"),
            ("machine", _e(f"{machine.get('cpu', 'unknown CPU')}, {cores} core(s)"
                           + (f", {machine['hostname']}" if machine.get("hostname") else ""))),
            ("corpus", _e(f"{params.get('corpus', '?')}, {params.get('limit', '?')} utterance(s) "
                          "(limit; 0 = all)"))]
    return "<h2>The run</h2>" + _table(rows)


def _checkpoint_section(params: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    info = dict(metrics.get("checkpoint") or {})
    if not info:   # metrics.json missing (05 did not run): work it out from the parameters
        try:
            info = checkpoint_info(WorkflowConfig.from_dict(params))
        except (ValueError, TypeError, OSError):
            info = {"path": params.get("checkpoint"), "is_demo_model": params.get("checkpoint") == "demo"}
    n_params = info.get("parameters") or _count_parameters(params.get("checkpoint"))
    rows = [("file", f"<code>{_e(info.get('file') or info.get('path'))}</code>"),
            ("path", f"<code>{_e(info.get('path'))}</code>"),
            ("size", _size(info.get("size_bytes"))),
            ("parameters", f"{n_params / 1e6:.2f} M" if n_params else "—"),
            ("sha256", f"<code>{_e((info.get('sha256') or '—')[:16])}</code>"),
            ("bundled demo model", "yes" if info.get("is_demo_model") else "no")]
    banner = (f'<div class="wg-banner wg-demo">{DEMO_BANNER}{_e(demo_model_card_line())}</div>'
              if info.get("is_demo_model") else "")
    return "<h2>Checkpoint</h2>" + banner + _table(rows)


def demo_model_card_line() -> str:
    """How the bundled demo model was trained and what it scores, from its card (empty without one)."""
    try:
        card = json.loads(read_bounded(DEMO_MODEL_CARD, "the demo model's card", 64 * 1024))
        scores = card["scores"]
        return (f" How it was made: {card['recipe']}. On the demo utterances (sigma {card['eval']['sigma']}): "
                f"STOI {scores['stoi']:.3f}, PESQ {scores['pesq']:.2f}.")
    except (WaveGlowError, KeyError, TypeError, ValueError):
        return ""


def _backend_section(params: Mapping[str, Any], timings: Mapping[str, Any] | None) -> str:
    settings = (timings or {}).get("settings", {})
    used, precision = settings.get("backend_used"), settings.get("precision_used")
    probe = settings.get("precision_probe") or {}
    rows = [("requested", _e(f"backend {params.get('backend', '?')}, precision {params.get('precision', '?')}, "
                             f"device {params.get('device', '?')}, batch size {params.get('batch_size', '?')}")),
            ("used", _e(f"{used or 'not recorded (infer did not run)'}"
                        + (f", precision {precision}" if precision else "")))]
    if probe:
        why = probe.get("reason", "")
        numbers = [f"SNR {_num(probe['snr_db'])} dB" if probe.get("snr_db") is not None else "",
                   f"log-mel distance {_num(probe['log_mel_distance'])}" if probe.get("log_mel_distance") is not None else ""]
        rows.append(("why (auto's verdict)", _e(why) + (f" — probe: {', '.join(n for n in numbers if n)}"
                                                        if any(numbers) else "")))
    elif used:
        reason = ("chosen explicitly in the parameters" if params.get("precision") != "auto"
                  else "no quality probe: this backend runs fp32")
        rows.append(("why", _e(reason)))
    return "<h2>Backend and precision</h2>" + _table(rows)


def _listen_section(run_dir: Path, manifest: Mapping[str, Any] | None, metrics: Mapping[str, Any]) -> str:
    if not manifest:
        return "<h2>Listen</h2><p class='wg-note'>No mel/manifest.json: preprocess did not run.</p>"
    per_utt = {u.get("id"): u for u in metrics.get("utterances", [])}
    rate = manifest.get("sampling_rate", STFTConfig().sampling_rate)
    rows = []
    for item in manifest.get("items", []):
        original = _data_uri(Path(item["wav"]))
        synthesised = _data_uri(syn_wav(RunLayout(run_dir).wav_dir, item["id"]))

        def player(uri: str | None, kind: str) -> str:
            if uri is None:
                return '<span class="wg-note">not written</span>'
            return (f'<audio controls preload="metadata" data-kind="{kind}" data-utterance="{_e(item["id"])}">'
                    f'<source src="{uri}" type="audio/wav"></audio>')

        u = per_utt.get(item["id"], {})
        rows.append((f"<code>{_e(item['id'])}</code>", _num(item["samples"] / rate),
                     player(original, "original"), player(synthesised, "synthesised"),
                     *(_num(u.get(k)) for k in METRIC_NAMES)))
    header = ["utterance", "seconds", "original", "synthesised", *METRIC_NAMES.values()]
    return "<h2>Listen: original and synthesised</h2>" + _table(rows, header, numeric=(1, 4, 5, 6, 7))


def _metrics_section(metrics: Mapping[str, Any]) -> str:
    if not metrics:
        return "<h2>Metrics</h2><p class='wg-note'>No metrics.json: 05_listen_evaluate did not finish.</p>"
    summary = metrics.get("summary", {})
    rows = [(METRIC_NAMES[k], _num(summary.get(k)), _e(REFERENCE[k][1] or "—"), _e(REFERENCE[k][0]))
            for k in METRIC_NAMES]
    demo = (metrics.get("checkpoint") or {}).get("is_demo_model")
    note = REFERENCE_NOTE + (" The demo model is small and briefly trained, so its scores sit near the floor of each scale."
                             if demo else "")
    text = "<h2>Metrics (mean over utterances)</h2>" + _table(
        rows, ["metric", "this run", "a trained WaveGlow (approx.)", "how to read it"], numeric=(1,))
    text += f'<p class="wg-note">{_e(note)}</p>'
    snr_rows = [(f"{_e(r.get('backend'))} vs {_e(r.get('reference', 'torch'))}", _num(r.get("snr_db_min")),
                 _e(r.get("utterances", "")))
                for r in metrics.get("parity", []) if r.get("backend") != r.get("reference", "torch")]
    trip = metrics.get("round_trip") or {}
    if trip.get("snr_db") is not None:
        snr_rows.append(("round trip: audio → noise_from_audio → infer", _num(trip["snr_db"]), "1"))
    if snr_rows:
        text += "<h3>Exactness (SNR, dB)</h3>" + _table(snr_rows, ["comparison", "min SNR (dB)", "utterances"],
                                                        numeric=(1, 2))
        text += ('<p class="wg-note">Backends fed the same mel and noise should agree to ≥ 50 dB (float '
                 "rounding only); the round trip gives back the recording whatever the weights.</p>")
    return text


_SPREAD_KEYS = ("_p10", "_p90", "_min", "_max", "_spread", "_iqr", "_std")


def _throughput_section(metrics: Mapping[str, Any], bench: Mapping[str, Any] | None) -> str:
    rows = metrics.get("throughput") or []
    text = "<h2>Throughput</h2>"
    if rows:
        spread = sorted({k for r in rows for k in r if k.startswith("utterances_per_second")
                         and k.endswith(_SPREAD_KEYS)})
        extra = [k for k in ("repeats",) if any(k in r for r in rows)]
        columns = ["batch_size", "backend", "precision", "utterances_per_second", *spread, *extra,
                   "audio_seconds_per_second", "real_time_factor"]
        columns = [c for c in columns if any(c in r for r in rows)]
        table = [[_e(r.get(c)) if c in ("backend", "precision") else _num(r.get(c)) for c in columns] for r in rows]
        text += _table(table, [c.replace("_", " ") for c in columns],
                       numeric=[i for i, c in enumerate(columns) if c not in ("backend", "precision")])
        if not spread:
            text += ('<p class="wg-note">No spread was recorded for these figures (see 04_infer); treat a '
                     "single timed pass as indicative only.</p>")
    else:
        text += "<p class='wg-note'>No throughput recorded (04_infer did not reach it).</p>"
    if bench:
        settings = bench.get("settings", {})
        kind = ("a smoke run (quick): too small for verdicts" if settings.get("quick")
                else f"{settings.get('utterances', '?')} utterance(s), {settings.get('repeats', '?')} repeat(s)")
        text += (f'<p class="wg-note">bench.json: the benchmark harness, model {_e(settings.get("model", "?"))}, '
                 f"{_e(kind)}; its table is in 04_infer and bench.md.</p>")
    return text


def _contents(notebooks: Sequence[str]) -> str:
    if not notebooks:
        return ""
    links = "".join(f'<li><a href="#{_e(Path(n).stem)}">{_e(Path(n).stem)}</a></li>' for n in notebooks)
    return f"<h2>The notebooks below</h2><ol start='0'>{links}</ol>"


def summary_html(run_dir: str | Path, notebooks: Sequence[str | Path] = ()) -> str:
    """The summary block at the top of report.html, from the run folder's files only."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    params = _read_yaml(layout.params)
    metrics = _read_json(layout.metrics) or {}
    timings = _read_json(layout.timings)
    bench = _read_json(layout.bench_json)
    manifest = _read_json(layout.manifest)
    name = params.get("name", run_dir.name)
    parts = [f"<h1>WaveGlow run “{_e(name)}”</h1>",
             _run_section(run_dir, params, metrics),
             _checkpoint_section(params, metrics),
             _backend_section(params, timings),
             _listen_section(run_dir, manifest, metrics),
             _metrics_section(metrics),
             _throughput_section(metrics, bench),
             _contents([str(n) for n in notebooks])]
    return f'<section class="wg-summary" id="summary">{"".join(parts)}</section>'


# --- the page ---------------------------------------------------------------------------------------
def _model(state: Mapping[str, Any], ref: str) -> Mapping[str, Any]:
    return state.get(ref.replace("IPY_MODEL_", ""), {})


def unfold_widgets(nb: Any) -> None:
    """Widgets need JavaScript the offline report does not load: an utterance picker (a VBox of a Dropdown
    and an Output) becomes the pick it showed, as text, followed by what its Output holds."""
    from nbformat import from_dict

    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    for cell in nb.cells:
        outputs = []
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get(WIDGET_VIEW) if output.get("output_type") != "stream" else None
            box = _model(state, view["model_id"]) if view else {}
            children = [_model(state, ref) for ref in box.get("state", {}).get("children", [])]
            names = [c.get("model_name") for c in children]
            if names != ["DropdownModel", "OutputModel"]:
                outputs.append(output)
                continue
            dropdown, shown = children[0].get("state", {}), children[1].get("state", {})
            labels, index = dropdown.get("_options_labels", []), dropdown.get("index")
            picked = labels[index] if isinstance(index, int) and 0 <= index < len(labels) else None
            outputs.append(from_dict({"output_type": "display_data", "metadata": {}, "data": {
                "text/html": f'<p class="wg-widget-note">{_e(dropdown.get("description", "pick"))}: '
                             f"<b>{_e(picked)}</b> (the other {len(labels) - 1} can be picked in JupyterLab)</p>",
                "text/plain": f"picked: {picked}"}}))
            outputs.extend(from_dict(o) for o in shown.get("outputs", []))
        cell["outputs"] = outputs if cell.get("cell_type") == "code" else cell.get("outputs", [])


def export_html(nb: Any, summary: str = "") -> str:
    """nbconvert HTML of `nb` that loads nothing from a network, code folded, the summary on top."""
    import jinja2
    from nbconvert import HTMLExporter

    nb = copy.deepcopy(nb)
    unfold_widgets(nb)
    nb.metadata.pop("widgets", None)   # the widget state is for the JavaScript renderer, not loaded here
    exporter = HTMLExporter(template_name="lab", extra_loaders=[jinja2.DictLoader({"wg_report.html.j2": _TEMPLATE})],
                            template_file="wg_report.html.j2")
    page, _ = exporter.from_notebook_node(nb, resources={"report_summary": summary})
    return page
