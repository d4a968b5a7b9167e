"""report.html: a summary of the run on top, then the executed notebooks, readable offline.

`summary_html(run_dir)` reads only the run folder (params.yaml, metrics.json, out/timings.json,
bench.json, mel/manifest.json, wav/) and the corpus wavs the manifest names, and says what was run, on which checkpoint, with which backend and
precision and why, what came out (players, metrics beside what a trained model scores, parity, round
trip, throughput) and links to the notebooks below. `export_html(notebook, summary)` renders the merged
notebooks with nbconvert's lab template minus everything it would fetch from the network (require.js,
MathJax, mermaid, the widget renderer), with code cells folded and no `Out[n]:` prompts; widgets, which
need that JavaScript, become their static content.

The run's records are data, never markup or directions: every string from a parameter, a path, a file name
or a record reaches the page through `display.html_text` (the summary's tables escape every cell that is not
`Html` built here), each record's shape is checked before use (an error naming the file and the field), and
a record may only point inside the folders the parameters name (a manifest's wav: the corpus; a synthesised
wav: the run folder). The page's Content-Security-Policy (`CONTENT_SECURITY_POLICY`) is the second wall: no
script runs, nothing loads, only what is embedded shows.
"""
from __future__ import annotations

import base64
import copy
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..checkpoint import load_waveglow
from ..config import DEMO_MODEL_CARD, STFTConfig, WorkflowConfig
from .display import METRIC_NAMES, REFERENCE, REFERENCE_NOTE, Html, html_text
from ..errors import DataError, WaveGlowError
from ..evaluate import read_metrics
from ..io import read_bounded
from ..layout import RunLayout, corpus_wav, load_manifest, syn_wav
from ..provenance import checkpoint_info, git_commit, machine as this_machine, read_timings
from ..records import BenchRecord, read_record

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
DEMO_BANNER = ("Demo model: a small WaveGlow trained briefly on ten utterances on a CPU, far from converged — its "
               "audio is noisy, not yet clear speech (the metrics say how far); the round trip shows the pipeline "
               "is exact. Point <code>checkpoint:</code> at NVIDIA's <code>waveglow_256channels_universal_v5.pt</code> "
               "for speech.")
#: the report runs no script (it has none of its own; nbconvert's are left out by `_TEMPLATE`), loads nothing,
#: and shows only what it embeds (data: URIs) and its inline styles: markup that slipped past escaping stays inert
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'none'; object-src 'none'; base-uri 'none'; "
                           "form-action 'none'; style-src 'unsafe-inline'; img-src data:; media-src data:; "
                           "font-src data:")
#: a corpus wav larger than this is not embedded in the report (LJSpeech's longest is about 450 KiB)
MAX_EMBEDDED_WAV_BYTES = 64 * 2**20

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
{%- block html_head -%}
<meta http-equiv="Content-Security-Policy" content="CSP">
{{ super() }}
{%- endblock html_head -%}
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
_TEMPLATE = _TEMPLATE.replace('content="CSP"', f'content="{CONTENT_SECURITY_POLICY}"')


# --- reading the run folder -------------------------------------------------------------------------
def _record(path: Path, read: Any) -> dict[str, Any] | None:
    """A record of the run folder read by `read` (its checked reader), None when the stage that writes it
    did not run; a damaged record, one of the wrong shape, or a folder or FIFO in its place is an error naming
    the file (and the field)."""
    return read(path) if os.path.lexists(path) else None


def _params(run_dir: Path, cfg: WorkflowConfig | None) -> dict[str, Any]:
    """The run's parameters: `cfg` when the caller has them (the runner), else the run folder's params.yaml
    (validated as any params file), else none."""
    if cfg is None and RunLayout(run_dir).params.is_file():
        cfg = WorkflowConfig.from_yaml(RunLayout(run_dir).params)
    return cfg.to_dict() if cfg is not None else {}


def _modified(path: Path) -> str | None:
    if not path.exists():
        return None
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _wav_uri(path: Path) -> str:
    """A wav as a data: URI: a regular file of at most MAX_EMBEDDED_WAV_BYTES that is a RIFF/WAVE file
    (DataError otherwise, whatever its name says)."""
    data = read_bounded(path, "a wav to embed in the report", MAX_EMBEDDED_WAV_BYTES)
    if not (data[:4] in (b"RIFF", b"RF64") and data[8:12] == b"WAVE"):
        raise DataError(f"{path}: not a WAV file (no RIFF/WAVE header); not embedded in the report", path=path)
    return f"data:audio/wav;base64,{base64.b64encode(data).decode('ascii')}"


def _count_parameters(checkpoint: str | None) -> int | None:
    """Parameters of the run's checkpoint (loaded through the allow-listed loader), None if unreadable."""
    try:
        model = load_waveglow(None if checkpoint in (None, "demo") else checkpoint)
    except (WaveGlowError, OSError, ValueError):
        return None
    return sum(p.numel() for p in model.parameters())


# --- formatting -------------------------------------------------------------------------------------
def _num(value: Any, digits: int = 3) -> str:
    """A number formatted; anything else as escaped text (a record's field is never markup)."""
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
    return html_text(value)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None, numeric: Sequence[int] = ()) -> Html:
    """An HTML table; a cell is escaped (`html_text`) unless it is `Html` built here."""
    head = "<tr>" + "".join(f"<th>{html_text(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(
        f'<td class="num">{html_text(cell)}</td>' if i in numeric else f"<td>{html_text(cell)}</td>"
        for i, cell in enumerate(row)) + "</tr>" for row in rows)
    return Html(f"<table>{head}{body}</table>")


def _code(value: Any) -> Html:
    return Html(f"<code>{html_text(value)}</code>")


def _size(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 2 ** 20:.1f} MiB" if n >= 2 ** 20 else f"{n / 1024:.0f} KiB"


# --- the sections -----------------------------------------------------------------------------------
def _run_section(run_dir: Path, params: Mapping[str, Any], metrics: Mapping[str, Any]) -> Html:
    machine = metrics.get("machine") or {}
    if not machine:
        machine = this_machine()
    commit = metrics.get("commit")
    if not commit:
        commit = git_commit()
    layout = RunLayout(run_dir)
    date = _modified(layout.metrics) or _modified(layout.params) or "unknown"
    cores = machine.get("usable_cpus") or machine.get("logical_cpus")
    rows = [("run", Html(f"<b>{html_text(params.get('name', run_dir.name))}</b> ") + "(" + _code(run_dir) + ")"),
            ("date", date),
            ("commit", _code(commit)),
            ("machine", f"{machine.get('cpu', 'unknown CPU')}, {cores} core(s)"
                        + (f", {machine['hostname']}" if machine.get("hostname") else "")),
            ("corpus", f"{params.get('corpus', '?')}, {params.get('limit', '?')} utterance(s) (limit; 0 = all)")]
    return Html("<h2>The run</h2>") + _table(rows)


def _checkpoint_section(params: Mapping[str, Any], metrics: Mapping[str, Any]) -> Html:
    info = dict(metrics.get("checkpoint") or {})
    if not info:   # metrics.json missing (05 did not run): work it out from the parameters
        try:
            info = checkpoint_info(WorkflowConfig.from_dict(params))
        except (ValueError, TypeError, OSError):
            info = {"path": params.get("checkpoint"), "is_demo_model": params.get("checkpoint") == "demo"}
    n_params = info.get("parameters") or _count_parameters(params.get("checkpoint"))
    rows = [("file", _code(info.get("file") or info.get("path"))),
            ("path", _code(info.get("path"))),
            ("size", _size(info.get("size_bytes"))),
            ("parameters", f"{n_params / 1e6:.2f} M" if n_params else "—"),
            ("sha256", _code((info.get("sha256") or "—")[:16])),
            ("bundled demo model", "yes" if info.get("is_demo_model") else "no")]
    banner = (Html(f'<div class="wg-banner wg-demo">{DEMO_BANNER}{html_text(demo_model_card_line())}</div>')
              if info.get("is_demo_model") else "")
    return Html("<h2>Checkpoint</h2>") + Html(banner) + _table(rows)


def demo_model_card_line() -> str:
    """How the bundled demo model was trained and what it scores, from its card (empty without one)."""
    try:
        card = json.loads(read_bounded(DEMO_MODEL_CARD, "the demo model's card", 64 * 1024))
        scores = card["scores"]
        return (f" How it was made: {card['recipe']}. On the demo utterances (sigma {card['eval']['sigma']}): "
                f"STOI {scores['stoi']:.3f}, PESQ {scores['pesq']:.2f}.")
    except (WaveGlowError, KeyError, TypeError, ValueError):
        return ""


def _backend_section(params: Mapping[str, Any], timings: Mapping[str, Any] | None) -> Html:
    settings = (timings or {}).get("settings") or {}
    used, precision = settings.get("backend_used"), settings.get("precision_used")
    probe = settings.get("precision_probe") or {}
    rows = [("requested", f"backend {params.get('backend', '?')}, precision {params.get('precision', '?')}, "
                          f"device {params.get('device', '?')}, batch size {params.get('batch_size', '?')}"),
            ("used", f"{used or 'not recorded (infer did not run)'}" + (f", precision {precision}" if precision else ""))]
    if probe:
        numbers = [f"SNR {_num(probe['snr_db'])} dB" if probe.get("snr_db") is not None else "",
                   f"log-mel distance {_num(probe['log_mel_distance'])}" if probe.get("log_mel_distance") is not None else ""]
        rows.append(("why (auto's verdict)", probe.get("reason", "") + (f" — probe: {', '.join(n for n in numbers if n)}"
                                                                         if any(numbers) else "")))
    elif used:
        reason = ("chosen explicitly in the parameters" if params.get("precision") != "auto"
                  else "no quality probe: this backend runs fp32")
        rows.append(("why", reason))
    return Html("<h2>Backend and precision</h2>") + _table(rows)


def _player(layout: RunLayout, corpus: Path | None, item: Mapping[str, Any], kind: str) -> Html:
    """An utterance's player: the corpus wav the manifest names (only inside the corpus the parameters
    name), or the run's synthesised wav (only inside the run folder); a note saying why when there is none."""
    if kind == "original":
        if corpus is None or item.get("wav") is None:
            why = "no parameters name the corpus" if corpus is None else "the manifest names no wav"
            return Html(f'<span class="wg-note">not embedded: {why}</span>')
        path = corpus_wav(corpus, item["wav"], layout.manifest, f"items[{item['id']!r}].wav")
    else:
        path = layout.check(syn_wav(layout.wav_dir, item["id"]), "a synthesised wav")
    if not os.path.lexists(path):   # anything there is embedded or refused (a FIFO, a folder: `_wav_uri` says)
        return Html('<span class="wg-note">not written</span>' if kind == "synthesised"
                    else '<span class="wg-note">not found in the corpus</span>')
    return Html(f'<audio controls preload="metadata" data-kind="{html_text(kind)}" '
                f'data-utterance="{html_text(item["id"])}"><source src="{_wav_uri(path)}" type="audio/wav"></audio>')


def _listen_section(run_dir: Path, params: Mapping[str, Any], manifest: Mapping[str, Any] | None,
                    metrics: Mapping[str, Any]) -> Html:
    if not manifest:
        return Html("<h2>Listen</h2><p class='wg-note'>No mel/manifest.json: preprocess did not run.</p>")
    per_utt = {u.get("id"): u for u in metrics.get("utterances") or []}
    rate = manifest.get("sampling_rate") or STFTConfig().sampling_rate
    layout = RunLayout(run_dir)
    corpus = WorkflowConfig.from_dict(params).corpus_dir if params.get("corpus") else None
    rows = []
    for item in manifest["items"]:
        u = per_utt.get(item["id"], {})
        rows.append((_code(item["id"]), _num(item["samples"] / rate),
                     _player(layout, corpus, item, "original"), _player(layout, corpus, item, "synthesised"),
                     *(_num(u.get(k)) for k in METRIC_NAMES)))
    header = ["utterance", "seconds", "original", "synthesised", *METRIC_NAMES.values()]
    return Html("<h2>Listen: original and synthesised</h2>") + _table(rows, header, numeric=(1, 4, 5, 6, 7))


def _metrics_section(metrics: Mapping[str, Any]) -> Html:
    if not metrics:
        return Html("<h2>Metrics</h2><p class='wg-note'>No metrics.json: 05_listen_evaluate did not finish.</p>")
    summary = metrics.get("summary") or {}
    rows = [(METRIC_NAMES[k], _num(summary.get(k)), REFERENCE[k][1] or "—", REFERENCE[k][0]) for k in METRIC_NAMES]
    demo = (metrics.get("checkpoint") or {}).get("is_demo_model")
    note = REFERENCE_NOTE + (" The demo model is small and briefly trained, so its scores sit near the floor of each scale."
                             if demo else "")
    text = Html("<h2>Metrics (mean over utterances)</h2>") + _table(
        rows, ["metric", "this run", "a trained WaveGlow (approx.)", "how to read it"], numeric=(1,))
    text += Html(f'<p class="wg-note">{html_text(note)}</p>')
    snr_rows = [(f"{r.get('backend')} vs {r.get('reference', 'torch')}", _num(r.get("snr_db_min")),
                 _num(r.get("utterances", "")))
                for r in metrics.get("parity") or [] if r.get("backend") != r.get("reference", "torch")]
    trip = metrics.get("round_trip") or {}
    if trip.get("snr_db") is not None:
        snr_rows.append(("round trip: audio → noise_from_audio → infer", _num(trip["snr_db"]), "1"))
    if snr_rows:
        text += Html("<h3>Exactness (SNR, dB)</h3>") + _table(snr_rows, ["comparison", "min SNR (dB)", "utterances"],
                                                              numeric=(1, 2))
        text += Html('<p class="wg-note">Backends fed the same mel and noise should agree to ≥ 50 dB (float '
                     "rounding only); the round trip gives back the recording whatever the weights.</p>")
    return text


_SPREAD_KEYS = ("_p10", "_p90", "_min", "_max", "_spread", "_iqr", "_std")


def _throughput_section(metrics: Mapping[str, Any], bench: Mapping[str, Any] | None) -> Html:
    rows = metrics.get("throughput") or []
    text = Html("<h2>Throughput</h2>")
    if rows:
        spread = sorted({k for r in rows for k in r if k.startswith("utterances_per_second")
                         and k.endswith(_SPREAD_KEYS)})
        extra = [k for k in ("repeats",) if any(k in r for r in rows)]
        columns = ["batch_size", "backend", "precision", "utterances_per_second", *spread, *extra,
                   "audio_seconds_per_second", "real_time_factor"]
        columns = [c for c in columns if any(c in r for r in rows)]
        table = [[r.get(c) if c in ("backend", "precision") else _num(r.get(c)) for c in columns] for r in rows]
        text += _table(table, [c.replace("_", " ") for c in columns],
                       numeric=[i for i, c in enumerate(columns) if c not in ("backend", "precision")])
        if not spread:
            text += Html('<p class="wg-note">No spread was recorded for these figures (see 04_infer); treat a '
                         "single timed pass as indicative only.</p>")
    else:
        text += Html("<p class='wg-note'>No throughput recorded (04_infer did not reach it).</p>")
    if bench:
        settings = bench.get("settings") or {}
        kind = ("a smoke run (quick): too small for verdicts" if settings.get("quick")
                else f"{settings.get('utterances', '?')} utterance(s), {settings.get('repeats', '?')} repeat(s)")
        text += Html(f'<p class="wg-note">bench.json: the benchmark harness, model {html_text(settings.get("model", "?"))}, '
                     f"{html_text(kind)}; its table is in 04_infer and bench.md.</p>")
    return text


def _contents(notebooks: Sequence[str]) -> Html:
    if not notebooks:
        return Html("")
    links = "".join(f'<li><a href="#{html_text(Path(n).stem)}">{html_text(Path(n).stem)}</a></li>' for n in notebooks)
    return Html(f"<h2>The notebooks below</h2><ol start='0'>{links}</ol>")


def summary_html(run_dir: str | Path, notebooks: Sequence[str | Path] = (), cfg: WorkflowConfig | None = None) -> Html:
    """The summary block at the top of report.html, from the run's parameters (`cfg`, else the run folder's
    params.yaml) and the run folder's records, each read by its checked reader."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    params = _params(run_dir, cfg)
    metrics = _record(layout.metrics, read_metrics) or {}
    timings = _record(layout.timings, read_timings)
    bench = _record(layout.bench_json, lambda path: read_record(path, BenchRecord, "the benchmark's record",
                                                              damaged="refuse", required=True))
    manifest = _record(layout.manifest, lambda path: load_manifest(path.parent))
    name = params.get("name", run_dir.name)
    parts = [Html(f"<h1>WaveGlow run “{html_text(name)}”</h1>"),
             _run_section(run_dir, params, metrics),
             _checkpoint_section(params, metrics),
             _backend_section(params, timings),
             _listen_section(run_dir, params, manifest, metrics),
             _metrics_section(metrics),
             _throughput_section(metrics, bench),
             _contents([str(n) for n in notebooks])]
    return Html(f'<section class="wg-summary" id="summary">{"".join(parts)}</section>')


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
                "text/html": f'<p class="wg-widget-note">{html_text(dropdown.get("description", "pick"))}: '
                             f"<b>{html_text(picked)}</b> (the other {len(labels) - 1} can be picked in JupyterLab)</p>",
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
