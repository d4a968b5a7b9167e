"""What the notebooks show: HTML tables, waveform / mel figures, audio players, an utterance picker.

Display only, no computation: the numbers come from the stages and `evaluate`. Figures are built with
`matplotlib.figure.Figure` (not pyplot), so a figure is shown exactly once, where it is displayed, and
nothing is left open between cells.
"""
from __future__ import annotations

import html
import io
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..audio import load_wav
from ..bench import render_markdown
from ..config import STFTConfig
from ..io import read_bin
from ..layout import corpus_wav, load_manifest, out_bin

#: NVIDIA's STFT settings: the time axis of the plots and players below unless told otherwise
_NVIDIA = STFTConfig()

# --- text as HTML ---------------------------------------------------------------------------------
class Html(str):
    """Markup this module (or the report) built, every outside value in it passed through `html_text`:
    `html_text` leaves it as it is; added to plain text, the text is escaped."""

    def __add__(self, other: Any) -> "Html":
        return Html(str.__add__(self, html_text(other)))

    def __radd__(self, other: Any) -> "Html":
        return Html(str.__add__(html_text(other), self))


def html_text(value: Any) -> Html:
    """`value` as text in HTML, in an element or a quoted attribute: whatever it holds (a parameter, a path, a
    file name, a record's field) becomes characters, never an element or an attribute. `Html` passes."""
    if isinstance(value, Html):
        return value
    return Html(html.escape(str(value), quote=True))


# --- tables ---------------------------------------------------------------------------------------
_HEX_DIGEST = __import__("re").compile(r"\b[0-9a-f]{32,}\b")


def short_hash(text: str, keep: int = 12) -> str:
    """Hex digests (sha256 and the like) in `text` cut to their first `keep` digits and an ellipsis."""
    return _HEX_DIGEST.sub(lambda m: m.group(0)[:keep] + "…", text)


def human_size(size: int | float) -> str:
    """A size in bytes as people read it: 512 B, 578.0 KiB, 6.9 MiB, 1.2 GiB."""
    size = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def format_value(value: Any, digits: int = 4) -> str:
    """A cell's text: numbers rounded, yes/no, mappings and lists as plain `key value` text (never a
    Python repr), hex digests shortened."""
    if value is None:
        return "—"
    if isinstance(value, Mapping):
        return "; ".join(f"{k} {format_value(v, digits)}" for k, v in value.items()) or "—"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v, digits) for v in value) or "—"
    if isinstance(value, str):
        return short_hash(value)
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and abs(value) < 10 ** -(digits - 1):
            return f"{value:.{digits - 1}e}"
        if abs(value) >= 1e15:
            return f"{value:.{digits - 1}e}"
        # large numbers in full (32768, not 3.277e+04): people read them as counts
        return f"{value:.{digits}g}" if abs(value) < 10 ** (digits - 1) else f"{value:.0f}"
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


class Table:
    """An HTML table (Jupyter shows it, nbconvert keeps it) that prints as aligned text elsewhere."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                 headers: Mapping[str, str] | None = None, caption: str | None = None, digits: int = 4):
        self.columns = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
        self.headers = [(headers or {}).get(c, c) for c in self.columns]
        self.cells = [[format_value(r.get(c), digits) for c in self.columns] for r in rows]
        self.caption = caption
        # numbers right-aligned (digits line up), text left-aligned (Jupyter's CSS right-aligns everything)
        self.numeric = [bool(rows) and all(_is_number(r.get(c)) or r.get(c) is None for r in rows)
                        and any(_is_number(r.get(c)) for r in rows) for c in self.columns]

    def _repr_html_(self) -> str:
        align = ['style="text-align:right"' if numeric else 'style="text-align:left"' for numeric in self.numeric]
        head = "".join(f"<th {a}>{html_text(h)}</th>" for h, a in zip(self.headers, align))
        body = "".join("<tr>" + "".join(f"<td {a}>{html_text(c)}</td>" for c, a in zip(row, align)) + "</tr>"
                       for row in self.cells)
        caption = f'<caption style="text-align:left">{html_text(self.caption)}</caption>' if self.caption else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def __repr__(self) -> str:
        widths = [max(len(h), *(len(row[i]) for row in self.cells)) if self.cells else len(h)
                  for i, h in enumerate(self.headers)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(self.headers, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in self.cells]
        return "\n".join(([self.caption] if self.caption else []) + lines)


def stored_at(path: str | Path | None) -> str | None:
    """When a stored result was written (its file's modification time, UTC), None if it is not there."""
    if path is None:
        return None
    path = Path(path)
    if not path.exists():
        return None
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


_CODE = __import__("re").compile(r"`([^`<>]+)`")


class Note:
    """A one-paragraph note in the notebooks' style (blue: what happened; yellow: kept from before)."""

    def __init__(self, text: str, reused: bool = False):
        self.text, self.reused = text, reused

    def _repr_html_(self) -> str:
        colour = "#fff3cd" if self.reused else "#eef5ff"
        text = _CODE.sub(r"<code>\1</code>", html_text(self.text))   # `name: value` as code, as in the prose
        return (f'<div class="wg-stage-note" style="background:{colour};padding:4px 8px;border-radius:4px;'
                f'text-align:left">{text}</div>')

    def __repr__(self) -> str:
        return self.text


class StageNote(Note):
    """One line saying what a stage did this time: done now, kept from an earlier run (with the date of the
    stored result), or skipped altogether, so results shown below are never mistaken for fresh ones."""

    def __init__(self, stage: str, done: int | Sequence[Any], kept: int | Sequence[Any],
                 stored: str | Path | None = None, unit: str = "utterance"):
        self.done = done if isinstance(done, int) else len(done)
        self.kept = kept if isinstance(kept, int) else len(kept)
        when = stored_at(stored) if stored is not None else None
        since = f" (stored {when})" if when else ""
        plural = lambda n: f"{n} {unit}{'' if n == 1 else 's'}"  # noqa: E731
        if self.done == 0 and self.kept:
            self.skipped = True
            self.text = (f"{stage} skipped: all {plural(self.kept)} were already done{since}; "
                         "what follows is the stored result. Delete the outputs (or use another run name) to redo them.")
        elif self.kept:
            self.skipped = False
            self.text = f"{stage}: {plural(self.done)} done now, {self.kept} kept from an earlier run{since}."
        else:
            self.skipped = False
            self.text = f"{stage}: {plural(self.done)} done now."
        self.reused = self.skipped


def key_value_table(mapping: Mapping[str, Any], caption: str | None = None) -> Table:
    return Table([{"name": k, "value": v} for k, v in mapping.items()], caption=caption)


#: what a trained WaveGlow scores on LJSpeech, approximately (not measured here; see `REFERENCE_NOTE`)
REFERENCE = {
    "log_mel_distance": ("lower is better; 0 = identical mels", None),
    "mcd_db": ("lower is better; 0 dB = identical mel cepstra", None),
    "stoi": ("0…1, higher is more intelligible", "≈ 0.9 or more"),
    "pesq": ("about 1…4.6, higher is better", "≈ 3 or more"),
}
REFERENCE_NOTE = ("Reference column: trained WaveGlow on LJSpeech, STOI ≈ 0.9+, PESQ ≈ 3+ — approximate "
                  "orders of magnitude for orientation, not published figures and not measured here.")
METRIC_NAMES = {"log_mel_distance": "log-mel distance", "mcd_db": "MCD (dB)", "stoi": "STOI", "pesq": "PESQ"}


def metrics_with_reference(summary: Mapping[str, Any], demo_model: bool = False) -> Table:
    """The mean metrics beside what they mean and what a trained model scores (see `REFERENCE_NOTE`)."""
    rows = [{"metric": METRIC_NAMES[k], "this run": summary.get(k), "a trained WaveGlow (approx.)": REFERENCE[k][1],
             "how to read it": REFERENCE[k][0]} for k in METRIC_NAMES]
    note = REFERENCE_NOTE + (" The small, briefly trained demo model scores near the floor of each scale."
                             if demo_model else "")
    return Table(rows, caption=note)


def parity_view(rows: Sequence[Mapping[str, Any]], caption: str | None = None) -> Table:
    """`evaluate.parity_table`'s rows without the reference against itself (always identical)."""
    shown = [r for r in rows if r.get("backend") != r.get("reference")]
    return Table(shown, ["backend", "reference", "utterances", "snr_db_min", "snr_db_mean", "max_abs_diff"],
                 headers={"snr_db_min": "min SNR (dB)", "snr_db_mean": "mean SNR (dB)",
                          "max_abs_diff": "max |difference|"}, caption=caption)


# --- figures --------------------------------------------------------------------------------------
def _figure(rows: int, cols: int, width: float = 11.0, height: float = 2.6):
    from matplotlib.figure import Figure

    class ShownFigure(Figure):
        """A Figure that Jupyter (and nbconvert) shows as a PNG without pyplot's inline backend."""

        def _repr_png_(self) -> bytes:
            buffer = io.BytesIO()
            self.savefig(buffer, format="png", dpi=80)
            return buffer.getvalue()

    return ShownFigure(figsize=(width, height * rows), layout="constrained"), rows, cols


def _draw_mel(ax, mel: np.ndarray, title: str, hop_seconds: float, vmin: float | None = None,
              vmax: float | None = None):
    mel = np.asarray(mel)
    image = ax.imshow(mel, origin="lower", aspect="auto", interpolation="nearest", cmap="magma",
                      extent=(0, mel.shape[1] * hop_seconds, 0, mel.shape[0]), vmin=vmin, vmax=vmax)
    ax.set(title=title, xlabel="time (s)", ylabel="mel band")
    return image


def waveform_and_mel(audio: np.ndarray, mel: np.ndarray, sample_rate: int = _NVIDIA.sampling_rate,
                     hop_length: int = _NVIDIA.hop_length, title: str = ""):
    """Waveform above its log mel, on one time axis."""
    fig, _, _ = _figure(2, 1)
    ax_wave, ax_mel = fig.subplots(2, 1, sharex=True)
    audio = np.asarray(audio, dtype=np.float32)
    ax_wave.plot(np.arange(audio.size) / sample_rate, audio, linewidth=0.4)
    ax_wave.set(title=f"{title} waveform".strip(), ylabel="amplitude")
    image = _draw_mel(ax_mel, mel, "log mel", hop_length / sample_rate)
    fig.colorbar(image, ax=ax_mel, label="ln magnitude")
    return fig


def mels_side_by_side(mels: Mapping[str, np.ndarray], sample_rate: int = _NVIDIA.sampling_rate,
                      hop_length: int = _NVIDIA.hop_length):
    """Several log mels on a shared colour scale (e.g. original vs synthesised)."""
    fig, _, _ = _figure(1, len(mels), height=3.0)
    axes = np.atleast_1d(fig.subplots(1, len(mels), sharey=True))
    values = np.concatenate([np.asarray(m).ravel() for m in mels.values()])
    vmin, vmax = float(np.min(values)), float(np.max(values))
    for ax, (label, mel) in zip(axes, mels.items()):
        image = _draw_mel(ax, mel, label, hop_length / sample_rate, vmin, vmax)
    fig.colorbar(image, ax=list(axes), label="ln magnitude")
    return fig


def overlay(signals: Mapping[str, np.ndarray], sample_rate: int = _NVIDIA.sampling_rate,
            seconds: float | None = 0.05, title: str = ""):
    """Signals on top of each other plus each one's difference to the first (parity at a glance)."""
    fig, _, _ = _figure(2, 1)
    ax_sig, ax_diff = fig.subplots(2, 1, sharex=True)
    items = list(signals.items())
    n = min(np.asarray(s).size for _, s in items)
    if seconds is not None:
        n = min(n, int(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    first_label, first = items[0]
    first = np.asarray(first, dtype=np.float64)[:n]
    for label, signal in items:
        ax_sig.plot(t, np.asarray(signal, dtype=np.float64)[:n], linewidth=0.8, label=label)
    for label, signal in items[1:]:
        ax_diff.plot(t, np.asarray(signal, dtype=np.float64)[:n] - first, linewidth=0.8, label=f"{label} − {first_label}")
    ax_sig.set(title=title, ylabel="amplitude")
    ax_sig.legend(loc="upper right")
    ax_diff.set(xlabel="time (s)", ylabel="difference")
    if len(items) > 1:
        ax_diff.legend(loc="upper right")
    return fig


def bar_chart(rows: Sequence[Mapping[str, Any]], x: str, y: str, group: str | None = None, title: str = "",
              ylabel: str | None = None, log: bool = False):
    """Grouped bars, e.g. utterances/s by batch size for each backend (and the guide's rows)."""
    fig, _, _ = _figure(1, 1, width=9.0, height=3.2)
    ax = fig.subplots()
    groups = list(dict.fromkeys(r[group] for r in rows)) if group else [None]
    xs = list(dict.fromkeys(r[x] for r in rows))
    width = 0.8 / len(groups)
    for i, g in enumerate(groups):
        values = {r[x]: r[y] for r in rows if group is None or r[group] == g}
        ax.bar([j + i * width for j in range(len(xs))], [values.get(v) or 0 for v in xs], width, label=g)
    ax.set_xticks([j + width * (len(groups) - 1) / 2 for j in range(len(xs))], [str(v) for v in xs])
    ax.set(title=title, xlabel=x, ylabel=ylabel or y)
    if log:
        ax.set_yscale("log")
    if group:
        ax.legend()
    return fig


# --- audio and widgets ----------------------------------------------------------------------------
def audio_player(audio: np.ndarray, sample_rate: int = _NVIDIA.sampling_rate):
    """An inline player at the audio's true level (normalised only if it would clip)."""
    from IPython.display import Audio

    audio = np.asarray(audio, dtype=np.float32)
    return Audio(audio, rate=sample_rate, normalize=bool(np.max(np.abs(audio), initial=0.0) > 1.0))


def players(audios: Mapping[str, np.ndarray], sample_rate: int = _NVIDIA.sampling_rate):
    """Labelled players side by side, as one HTML block (works in JupyterLab and in the HTML report)."""
    from IPython.display import HTML

    cells = "".join(f"<td><b>{html_text(label)}</b><br>{audio_player(a, sample_rate)._repr_html_()}</td>"
                    for label, a in audios.items())
    return HTML(f"<table><tr>{cells}</tr></table>")


def utterance_picker(ids: Sequence[str], show: Callable[[str], None], description: str = "utterance"):
    """A Dropdown of utterance ids with the first pre-selected; choosing another runs `show(id)` into the
    Output below it.

    The notebook shows the first utterance itself, above the picker: rendered into the Output instead, it
    would travel as widget state, which papermill's Output capture re-sends to the kernel on every display
    (slow with embedded audio, and the offline report cannot show widget content without JavaScript).
    """
    import ipywidgets as widgets

    ids = list(ids)
    dropdown = widgets.Dropdown(options=ids, value=ids[0] if ids else None, description=description)
    output = widgets.Output()

    def on_change(change):
        if change["new"] is None:
            return
        output.clear_output(wait=True)
        with output:
            show(change["new"])

    dropdown.observe(on_change, names="value")
    return widgets.VBox([dropdown, output])


# --- 04_infer: the first sound, the timings, the throughput ------------------------------------------
def first_sound(cfg, count: int = 3):
    """The first `count` utterances as infer wrote them (`out/<id>_out.bin`, trimmed to the recording's
    length as postprocess trims it) beside their recordings: one labelled row of players each."""
    from IPython.display import HTML

    manifest = load_manifest(cfg.layout.mel_dir)
    rate, hop = manifest["sampling_rate"], manifest["hop_length"]
    rows = []
    for item in manifest["items"][:count]:
        path = out_bin(cfg.layout.out_dir, item["id"])
        if not path.is_file():
            continue
        synthesised = read_bin(path, (int(item["mel_frames"]) * hop,))[: int(item["samples"])]
        original, _ = load_wav(corpus_wav(cfg.corpus_dir, item["wav"]), expected_rate=rate, resample=cfg.resample,
                               downmix=cfg.downmix)
        rows.append(f"<tr><td><b>{html_text(item['id'])}</b><br>{item['samples'] / rate:.1f} s</td>"
                    f"<td>{audio_player(original, rate)._repr_html_()}</td>"
                    f"<td>{audio_player(synthesised, rate)._repr_html_()}</td></tr>")
    head = "<tr><th></th><th style='text-align:left'>original</th><th style='text-align:left'>synthesised</th></tr>"
    return HTML(f"<table class='wg-first-sound'>{head}{''.join(rows)}</table>")


def timings_view(timings: Mapping[str, Any]) -> Table:
    """out/timings.json per utterance, as a learner reads it: length, batch, seconds, × real time, size."""
    rows = []
    for utt_id, item in timings["items"].items():
        audio = item.get("audio_seconds")
        seconds = item.get("seconds")
        rows.append({"id": utt_id, "audio (s)": audio, "mel frames": item.get("frames"),
                     "batch": item.get("batch"), "seconds": seconds,
                     "× real time": audio / seconds if audio and seconds else None,
                     "output": human_size(item["output"]["size"]) if isinstance(item.get("output"), Mapping)
                     and "size" in item["output"] else None})
    return Table(rows, digits=3)


def throughput_note(result: Mapping[str, Any]) -> Note:
    """What 04's throughput cell did: measured now, shown again from an earlier run (nothing it measured
    changed), or off; the machine-busy warning once, not per row."""
    mode, rows = result["mode"], result["rows"]
    if mode == "off":
        return Note("Throughput: off (`throughput: off` in the parameters); set it to quick or full to measure.")
    passes = rows[0]["repeats"] if rows else 1
    what = "one timed pass per batch size" if passes == 1 else f"the median of {passes} passes per batch size"
    busy = next((r["busy"] for r in rows if r.get("busy")), None)
    tail = f" Note: {busy}." if busy else ""
    if result["reused"]:
        return Note(f"Throughput kept from {result['measured_at']}: nothing it measured has changed (model, "
                    f"settings, mels, this CPU); {what}.{tail} Set `throughput: full` for more passes.", reused=True)
    return Note(f"Throughput measured now ({result['measured_at']}): {what}.{tail}")


def throughput_view(rows: Sequence[Mapping[str, Any]]) -> Table:
    """The throughput rows in a few columns: batch size, utterances/s, × real time, real-time factor."""
    shown = [{"batch size": r["batch_size"], "utterances/s": r["utterances_per_second"],
              "× real time": r["audio_seconds_per_second"], "real-time factor": r["real_time_factor"],
              "seconds per pass": r["seconds"]} for r in rows]
    caption = (f"{rows[0]['backend']} {rows[0]['precision']}, {rows[0]['utterances']} utterances"
               if rows else None)
    return Table(shown, caption=caption, digits=3)


def seam_verdict(snr_db: float, precision: str | None = None) -> Note:
    """What a stream-vs-one-shot SNR means, in words taken from the measured value (so the notebook's text
    stays true whichever precision ran and however exact its chunks are)."""
    ran = f" ({precision})" if precision else ""
    if snr_db >= 100:
        text = (f"Measured {snr_db:.1f} dB{ran}: the stream equals one-shot synthesis to float32 rounding — "
                "no clicks at the seams, no cross-fade.")
    elif snr_db >= 60:
        text = (f"Measured {snr_db:.1f} dB{ran}: not bit-exact, but the joined stream differs from one-shot "
                "synthesis by less than 0.1 % of its level: nothing you can hear at the seams.")
    elif snr_db >= 30:
        text = (f"Measured {snr_db:.1f} dB{ran}: close, not exact. This precision rounds each chunk a little "
                "differently from the whole utterance (differences around "
                f"{100 * 10 ** (-snr_db / 20):.1f} % of the level); precision fp32 gives equality to rounding.")
    else:
        text = (f"Measured {snr_db:.1f} dB{ran}: the stream and one-shot synthesis differ clearly; "
                "try precision fp32, and report it if fp32 differs too.")
    return Note(text, reused=snr_db < 60)


def bench_summary(result: Mapping[str, Any], markdown_file: str | Path | None = None):
    """The benchmark harness's result as a learner reads it: one table (path, batch, × real time, agreement
    with the reference), the full detail (machine, workload, every column) folded below it, in bench.md."""
    from IPython.display import HTML

    rows = [{"path": r["label"], "batch size": r["batch_size"], "× real time": r["audio_seconds_per_second"],
             "SNR vs reference (dB)": r.get("snr_db"), "agrees with the reference": r.get("quality_ok")}
            for r in result["rows"]]
    table = Table(rows, digits=3)._repr_html_()
    where = f" (all of it in <code>{html_text(markdown_file)}</code>)" if markdown_file else ""
    smoke = (" A smoke run: a few one-second slices, one pass — it shows that every path runs and agrees; "
             "speed verdicts need the full benchmark." if result.get("settings", {}).get("quick") else "")
    skipped = result.get("skipped_rows") or {}
    missing = (f"<p>Not run here: {html_text(', '.join(skipped))}.</p>" if skipped else "")
    return HTML(f"<p>{html_text(smoke.strip())}</p>{table}{missing}<details><summary>Machine, workload and every "
                f"column{where}</summary><pre style='white-space:pre-wrap'>{html_text(_bench_text(result))}</pre>"
                "</details>")


def _bench_text(result: Mapping[str, Any]) -> str:
    return render_markdown(result)
