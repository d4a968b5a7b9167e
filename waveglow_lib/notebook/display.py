"""What the notebooks show: HTML tables, waveform / mel figures, audio players, an utterance picker.

Display only, no computation: the numbers come from the stages and `evaluate`. Figures are built with
`matplotlib.figure.Figure` (not pyplot), so a figure is shown exactly once, where it is displayed, and
nothing is left open between cells.
"""
from __future__ import annotations

import html
import io
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np


# --- tables ---------------------------------------------------------------------------------------
def format_value(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 10 ** digits or abs(value) < 10 ** -(digits - 1)):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}" if abs(value) < 10 ** (digits - 1) else f"{value:.0f}"
    return str(value)


class Table:
    """An HTML table (Jupyter shows it, nbconvert keeps it) that prints as aligned text elsewhere."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                 headers: Mapping[str, str] | None = None, caption: str | None = None, digits: int = 4):
        self.columns = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
        self.headers = [(headers or {}).get(c, c) for c in self.columns]
        self.cells = [[format_value(r.get(c), digits) for c in self.columns] for r in rows]
        self.caption = caption

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.cells)
        caption = f"<caption>{html.escape(self.caption)}</caption>" if self.caption else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def __repr__(self) -> str:
        widths = [max(len(h), *(len(row[i]) for row in self.cells)) if self.cells else len(h)
                  for i, h in enumerate(self.headers)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(self.headers, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in self.cells]
        return "\n".join(([self.caption] if self.caption else []) + lines)


def key_value_table(mapping: Mapping[str, Any], caption: str | None = None) -> Table:
    return Table([{"name": k, "value": v} for k, v in mapping.items()], caption=caption)


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


def waveform_and_mel(audio: np.ndarray, mel: np.ndarray, sample_rate: int = 22050, hop_length: int = 256,
                     title: str = ""):
    """Waveform above its log mel, on one time axis."""
    fig, _, _ = _figure(2, 1)
    ax_wave, ax_mel = fig.subplots(2, 1, sharex=True)
    audio = np.asarray(audio, dtype=np.float32)
    ax_wave.plot(np.arange(audio.size) / sample_rate, audio, linewidth=0.4)
    ax_wave.set(title=f"{title} waveform".strip(), ylabel="amplitude")
    image = _draw_mel(ax_mel, mel, "log mel", hop_length / sample_rate)
    fig.colorbar(image, ax=ax_mel, label="ln magnitude")
    return fig


def mels_side_by_side(mels: Mapping[str, np.ndarray], sample_rate: int = 22050, hop_length: int = 256):
    """Several log mels on a shared colour scale (e.g. original vs synthesised)."""
    fig, _, _ = _figure(1, len(mels), height=3.0)
    axes = np.atleast_1d(fig.subplots(1, len(mels), sharey=True))
    values = np.concatenate([np.asarray(m).ravel() for m in mels.values()])
    vmin, vmax = float(np.min(values)), float(np.max(values))
    for ax, (label, mel) in zip(axes, mels.items()):
        image = _draw_mel(ax, mel, label, hop_length / sample_rate, vmin, vmax)
    fig.colorbar(image, ax=list(axes), label="ln magnitude")
    return fig


def overlay(signals: Mapping[str, np.ndarray], sample_rate: int = 22050, seconds: float | None = 0.05,
            title: str = ""):
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
def audio_player(audio: np.ndarray, sample_rate: int = 22050):
    """An inline player at the audio's true level (normalised only if it would clip)."""
    from IPython.display import Audio

    audio = np.asarray(audio, dtype=np.float32)
    return Audio(audio, rate=sample_rate, normalize=bool(np.max(np.abs(audio), initial=0.0) > 1.0))


def players(audios: Mapping[str, np.ndarray], sample_rate: int = 22050):
    """Labelled players side by side, as one HTML block (works in JupyterLab and in the HTML report)."""
    from IPython.display import HTML

    cells = "".join(f"<td><b>{html.escape(label)}</b><br>{audio_player(a, sample_rate)._repr_html_()}</td>"
                    for label, a in audios.items())
    return HTML(f"<table><tr>{cells}</tr></table>")


def utterance_picker(ids: Sequence[str], show: Callable[[str], None], description: str = "utterance"):
    """A Dropdown of utterance ids; choosing one runs `show(id)` into the Output below it.

    Headless runs (papermill) keep the widget in the notebook; the static view of the first utterance is
    displayed by the notebook itself so the HTML report has it too.
    """
    import ipywidgets as widgets

    dropdown = widgets.Dropdown(options=list(ids), value=None, description=description)
    output = widgets.Output()

    def on_change(change):
        if change["new"] is None:
            return
        output.clear_output(wait=True)
        with output:
            show(change["new"])

    dropdown.observe(on_change, names="value")
    return widgets.VBox([dropdown, output])
