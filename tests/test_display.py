"""waveglow_lib.notebook.display: what the notebooks show renders in Jupyter (HTML / PNG) and as text."""
from __future__ import annotations

import numpy as np
import pytest

from waveglow_lib.notebook import display as d

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_format_value():
    assert d.format_value(None) == "—"
    assert d.format_value(True) == "yes"
    assert d.format_value(0.123456) == "0.1235"
    assert d.format_value(12345.6) == "1.235e+04"
    assert d.format_value(3e-7) == "3.000e-07"
    assert d.format_value(float("inf")) == "inf"
    assert d.format_value(832) == "832"


def test_table_html_escapes_and_text_aligns():
    table = d.Table([{"id": "<a>", "snr": 60.123456}, {"id": "b", "extra": 1}], caption="c & d")
    html = table._repr_html_()
    assert "<th>id</th><th>snr</th><th>extra</th>" in html
    assert "&lt;a&gt;" in html and "<caption>c &amp; d</caption>" in html
    assert "<td>60.12</td>" in html and "<td>—</td>" in html
    lines = repr(table).splitlines()
    assert lines[0] == "c & d" and lines[1].split() == ["id", "snr", "extra"]
    assert len({len(line) for line in lines[1:]}) == 1   # aligned columns
    chosen = d.Table([{"a": 1, "b": 2}], columns=["b"], headers={"b": "B"})._repr_html_()
    assert "<th>B</th>" in chosen and "<td>2</td>" in chosen and "<td>1</td>" not in chosen


@pytest.mark.parametrize("make", [
    lambda: d.waveform_and_mel(np.zeros(2560, np.float32), np.full((80, 11), -11.5), title="x"),
    lambda: d.mels_side_by_side({"a": np.zeros((80, 5)), "b": np.ones((80, 7))}),
    lambda: d.overlay({"torch": np.sin(np.arange(2000) / 9), "ort": np.sin(np.arange(2000) / 9) + 1e-4}),
    lambda: d.bar_chart([{"bs": 1, "ups": 2.0, "who": "a"}, {"bs": 4, "ups": 5.0, "who": "b"}], "bs", "ups", "who"),
])
def test_figures_render_as_png(make):
    figure = make()
    assert figure._repr_png_().startswith(PNG_MAGIC)


def test_players_embed_each_signal_at_its_level():
    quiet = d.audio_player(0.1 * np.ones(100, np.float32), 22050)
    assert quiet.embed and 'controls="controls"' in quiet._repr_html_()
    html = d.players({"original": np.zeros(300), "synthesised": 2.0 * np.ones(300)}, 22050).data
    assert html.count("<audio") == 2 and "original" in html and "synthesised" in html


def test_utterance_picker_shows_the_chosen_utterance():
    shown = []
    box = d.utterance_picker(["LJ001-0001", "LJ001-0002"], shown.append)
    dropdown, output = box.children
    assert dropdown.value is None and shown == []
    dropdown.value = "LJ001-0002"
    assert shown == ["LJ001-0002"]
    assert type(output).__name__ == "Output"
