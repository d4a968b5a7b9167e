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
    assert d.format_value(12345.6) == "12346"          # counts in full, not 1.235e+04
    assert d.format_value(32768.0) == "32768"
    assert d.format_value(3e-7) == "3.000e-07"
    assert d.format_value(float("inf")) == "inf"
    assert d.format_value(832) == "832"


def test_table_html_escapes_and_text_aligns():
    table = d.Table([{"id": "<a>", "snr": 60.123456}, {"id": "b", "extra": 1}], caption="c & d")
    html = table._repr_html_()
    left, right = 'style="text-align:left"', 'style="text-align:right"'
    assert f"<th {left}>id</th><th {right}>snr</th><th {right}>extra</th>" in html   # text left, numbers right
    assert "&lt;a&gt;" in html and '<caption style="text-align:left">c &amp; d</caption>' in html
    assert f"<td {right}>60.12</td>" in html and f"<td {right}>—</td>" in html
    lines = repr(table).splitlines()
    assert lines[0] == "c & d" and lines[1].split() == ["id", "snr", "extra"]
    assert len({len(line) for line in lines[1:]}) == 1   # aligned columns
    chosen = d.Table([{"a": 1, "b": 2}], columns=["b"], headers={"b": "B"})._repr_html_()
    assert ">B</th>" in chosen and ">2</td>" in chosen and ">1</td>" not in chosen


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


def test_utterance_picker_preselects_the_first_and_shows_the_chosen_utterance():
    shown = []
    box = d.utterance_picker(["LJ001-0001", "LJ001-0002"], shown.append)
    dropdown, output = box.children
    assert dropdown.value == "LJ001-0001" and shown == []      # the notebook shows the first itself
    dropdown.value = "LJ001-0002"
    assert shown == ["LJ001-0002"]
    assert type(output).__name__ == "Output"


def test_stage_note_says_skipped_with_the_stored_date(tmp_path):
    stored = tmp_path / "timings.json"
    stored.write_text("{}")
    skipped = d.StageNote("infer", [], ["a", "b"], stored)
    assert skipped.skipped and "infer skipped: all 2 utterances were already done (stored 20" in repr(skipped)
    assert "stored result" in skipped._repr_html_()
    partial = d.StageNote("infer", ["a"], ["b"], stored)
    assert not partial.skipped and "1 utterance done now, 1 kept from an earlier run (stored 20" in repr(partial)
    assert repr(d.StageNote("preprocess", 3, 0, unit="wav")) == "preprocess: 3 wavs done now."
    assert d.stored_at(tmp_path / "missing") is None and d.stored_at(None) is None


def test_parity_view_leaves_out_the_reference_against_itself():
    rows = [{"backend": "torch", "reference": "torch", "utterances": 1, "snr_db_min": float("inf")},
            {"backend": "onnxruntime", "reference": "torch", "utterances": 1, "snr_db_min": 71.0}]
    html = d.parity_view(rows)._repr_html_()
    assert ">onnxruntime</td>" in html and ">torch</td><td" in html     # torch only as the reference
    assert html.count("<tr>") == 2 and "inf" not in html


def test_metrics_with_reference_labels_the_reference_as_approximate():
    table = d.metrics_with_reference({"stoi": 0.37, "pesq": 1.02, "mcd_db": 64.8, "log_mel_distance": 3.1},
                                     demo_model=True)
    html = table._repr_html_()
    assert "0.37" in html and "≈ 0.9 or more" in html and "approximate" in html and "briefly trained" in html


def test_html_text_is_the_one_escape_and_html_built_here_passes():
    """Every string from a parameter, a path, a file name or a record reaches HTML through `html_text`:
    quotes too (it may sit in an attribute); `Html` (markup built from escaped parts) is left as it is, and
    plain text added to it is escaped."""
    payload = "\"'><img src=x onerror=alert(1)>&"
    assert d.html_text(payload) == "&quot;&#x27;&gt;&lt;img src=x onerror=alert(1)&gt;&amp;"
    built = d.Html("<b>") + payload + d.Html("</b>")
    assert isinstance(built, d.Html) and built == f"<b>{d.html_text(payload)}</b>"
    assert d.html_text(built) is built and payload + d.Html("<i>") == str(d.html_text(payload)) + "<i>"
    assert "&lt;i&gt;" in d.Table([{"a": d.Html("<i>")}])._repr_html_()   # a table cell is always text
    label = d.players({payload: np.zeros(100, np.float32)}).data
    assert "<img" not in label and d.html_text(payload) in label
    assert "<img" not in d.StageNote(payload, 1, 0)._repr_html_()
