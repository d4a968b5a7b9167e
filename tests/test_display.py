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


# --- what a learner reads ----------------------------------------------------------------------------
def test_cells_never_show_a_python_repr_and_sizes_and_hashes_are_short():
    cell = d.format_value({"size": 591872, "sha256": "8535" * 16})
    assert cell == "size 591872; sha256 853585358535…" and "{" not in cell and "'" not in cell
    assert d.format_value([1, 2.5]) == "1, 2.5" and d.format_value({}) == "—"
    assert (d.human_size(591872), d.human_size(7e6), d.human_size(12)) == ("578.0 KiB", "6.7 MiB", "12 B")


def test_the_seam_verdict_follows_the_measured_value():
    exact, close, off = d.seam_verdict(131.2, "fp32"), d.seam_verdict(38.1, "int8"), d.seam_verdict(12.0)
    assert "float32 rounding" in exact.text and not exact.reused
    assert "38.1 dB (int8)" in close.text and "not exact" in close.text and "float32 rounding" not in close.text
    assert "differ clearly" in off.text
    assert "<code>" not in d.Note("plain").__repr__() and "<code>a: b</code>" in d.Note("set `a: b`")._repr_html_()


def test_throughput_note_says_once_whether_it_was_measured_now_or_kept():
    rows = [{"repeats": 1, "busy": "machine busy: load average 9.0 on 2 usable cores"}] * 3
    now = d.throughput_note({"mode": "quick", "rows": rows, "measured_at": "2026-12-07 21:00 UTC", "reused": False})
    kept = d.throughput_note({"mode": "quick", "rows": rows, "measured_at": "2026-12-07 21:00 UTC", "reused": True})
    assert now.text.startswith("Throughput measured now") and now.text.count("machine busy") == 1
    assert kept.text.startswith("Throughput kept from 2026-12-07 21:00 UTC") and kept.reused
    assert "off" in d.throughput_note({"mode": "off", "rows": [], "measured_at": None, "reused": False}).text


def test_the_guide_comparison_is_in_real_time_multiples():
    from waveglow_lib.bench import GUIDE_MEAN_SECONDS, guide_throughput_rows

    rows = guide_throughput_rows([{"batch_size": 1, "utterances_per_second": 2.0, "audio_seconds_per_second": 8.6}])
    first = rows[0]
    assert first["batch size"] == 1 and first["this machine (× real time)"] == 8.6
    assert first["Ascend 310P3 (guide) (× real time)"] == pytest.approx(0.59 * GUIDE_MEAN_SECONDS)
    assert not any("utt" in key for key in first)


def test_throughput_is_kept_until_something_it_measured_changes(tmp_path, preprocessed_run, monkeypatch):
    from waveglow_lib.bench import harness, run_throughput
    from waveglow_lib.stages.infer import infer

    cfg = preprocessed_run(tmp_path, bench_batch_sizes=[1, 2])
    assert run_throughput(cfg, "off") == {"mode": "off", "rows": [], "measured_at": None, "reused": False}
    infer(cfg)
    first = run_throughput(cfg)
    assert not first["reused"] and [r["batch_size"] for r in first["rows"]] == [1, 2]
    assert {r["repeats"] for r in first["rows"]} == {1}                     # quick: one pass each
    timed = []
    monkeypatch.setattr(harness, "throughput_table", lambda *a, **k: timed.append(k) or first["rows"])
    again = run_throughput(cfg)
    assert again["reused"] and again["rows"] == first["rows"] and again["measured_at"] == first["measured_at"]
    assert not timed
    run_throughput(cfg.with_overrides(bench_batch_sizes=[1]))                # another table: measured
    run_throughput(cfg, "full")                                              # more passes: measured
    assert timed == [{"repeats": 1}, {"repeats": None}]
