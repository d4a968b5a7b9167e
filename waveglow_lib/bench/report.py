"""bench.md: machine, settings, one table per batch size, the auto pick, the default path, the guide's rows.

Every value a table or sentence takes from the result (a path, a CPU name, a row label, a message) goes
through `markdown_text`: bench.md is shown as HTML (04_infer's `Markdown` output, nbconvert's report, a
code host's viewer), and Markdown passes raw HTML through, so a value must never become markup.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from ..config import GUIDE_MEL_LENGTHS, GUIDE_THROUGHPUT
from .workload import GUIDE_MEAN_SECONDS

#: what makes markup in a line of Markdown: HTML's &, <, >, quotes (as entities); emphasis, code, links,
#: table cells, math (backslash escapes). Line breaks and control characters would end a table row or
#: a paragraph (and with it an escape): they become spaces.
_MARKDOWN_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#x27;"}
_MARKDOWN_PUNCTUATION = set("\\`*_[]|~$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def markdown_text(value: Any) -> str:
    """`value` as literal text inside a line of Markdown: nothing in it can become an element, an
    attribute, a link, emphasis or another table cell, wherever the Markdown is rendered."""
    text = _CONTROL.sub(" ", str(value))
    return "".join(_MARKDOWN_ENTITIES.get(c) or ("\\" + c if c in _MARKDOWN_PUNCTUATION else c) for c in text)


def _phases(phases: Mapping[str, Any] | None) -> str:
    """Where an engine load's seconds went (`fast.engine.LoadTimes`), largest first."""
    if not phases:
        return "—"
    ordered = sorted(phases.items(), key=lambda item: -float(item[1]))
    return ", ".join(f"{markdown_text(name)} {_fmt(seconds, 2)} s" for name, seconds in ordered)


def _frames(lengths: Any) -> str:
    """Mel lengths as a plain list of numbers in the text."""
    return markdown_text(", ".join(map(str, lengths)) if isinstance(lengths, list) else lengths)


def _peak_share(row: Mapping[str, Any]) -> str:
    """% of peak by the reference's FLOPs, and by the executed ones where the row runs the folded model."""
    share = _fmt(row.get("percent_of_peak"), 0)
    if row.get("folded_model") and row.get("percent_of_peak_executed") is not None:
        share += f" / {_fmt(row['percent_of_peak_executed'], 0)}"
    return share


def _fmt(value: Any, digits: int = 2) -> str:
    """A number formatted, anything else as literal Markdown text (`markdown_text`)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return str(value)
    return markdown_text(value)


def _list(values: Any) -> str:
    return ", ".join(markdown_text(v) for v in values)


def _verdicts(auto: Mapping[str, Any], path: Mapping[str, Any]) -> list[str]:
    lines = ["## auto", "",
              f"Fastest row that passes the quality gate: **{markdown_text(auto['overall'])}** overall; per batch size: "
              + ", ".join(f"{markdown_text(b)}: {markdown_text(r)}" for b, r in auto["per_batch_size"].items())
              + (f". Rejected by the gate: {_list(auto['rejected'])}." if auto["rejected"] else "."), ""]
    if path["row"]:
        lines += [f"## The default path ({markdown_text(path['row'])}; `backend: auto`, `precision: auto`)", "",
                  "| batch | vs OpenVINO bf16 | vs reference | × real time | quality |", "|---|---|---|---|---|"]
        for b, e in path["per_batch_size"].items():
            lines.append(f"| {markdown_text(b)} | {_fmt(e['ratio_vs_openvino_bf16'])} | {_fmt(e['speedup_vs_reference'])} "
                         f"| {_fmt(e['real_time_factor'], 3)} | {_fmt(e['quality_ok'])} |")
        lines.append("")
    return lines


def _amx_note(machine: Mapping[str, Any]) -> str:
    isa = machine["isa"]
    if isa.get("AMX-BF16") or isa.get("AMX-INT8"):
        return (f"**AMX**: this CPU has AMX (BF16 {_fmt(bool(isa.get('AMX-BF16')))}, INT8 {_fmt(bool(isa.get('AMX-INT8')))}): "
                "oneDNN's bf16 and int8 GEMMs (ours, OpenVINO's) may use its tiles.")
    return "**AMX**: none on this CPU: the bf16 and int8 rows run on AVX-512 / AVX-VNNI where present."


def _thread_counts(chosen: list[int]) -> str:
    """[2, 2, 1, 2] → "2 threads ×3, 1 thread ×1" (most used first)."""
    counts = sorted(((chosen.count(t), t) for t in set(chosen)), reverse=True)
    return ", ".join(f"{t} thread{'s' if t != 1 else ''} ×{n}" for n, t in counts)


def _load_note(load: Mapping[str, Any] | None) -> str:
    if not load or not load.get("cores"):
        return "**Load**: no competitor (`--load 0`); see the load average above."
    share = ", ".join("?" if v is None else f"{v:.2f}" for v in load["competitor_core_share"])
    return (f"**Load**: {markdown_text(load['cores'])} busy-loop competitor(s) pinned to CPU(s) {markdown_text(load['pinned_to_cpus'])} for "
            f"the whole measurement ({markdown_text(load['seconds'])} s; each got {share} of a core): every row ran beside them.")


def render_markdown(result: Mapping[str, Any]) -> str:
    """bench.md: machine, settings, one table per batch size, auto pick, default path, the guide's rows."""
    m, s = result["machine"], result["settings"]
    isa = ", ".join(f"{markdown_text(k)} {'yes' if v else 'no'}" for k, v in m["isa"].items())
    versions = ", ".join(f"{markdown_text(k)} {markdown_text(v)}" for k, v in m["versions"].items() if v)
    lines = [
        "# WaveGlow throughput", "",
        f"**Machine**: {markdown_text(m['cpu'])}, {markdown_text(m['usable_cpus'])} usable CPUs ({markdown_text(m['torch_threads'])} torch "
        f"threads); {isa}; torch CPU capability {markdown_text(m['torch_cpu_capability'])}; load average at start "
        f"{', '.join(f'{v:.2f}' for v in m.get('load_average') or [])}.",
        f"**Libraries**: {versions}.",
        "**Measured matmul peak** (square torch.matmul, the best of before and after the rows): " +
        ", ".join(f"{markdown_text(k)} {markdown_text(v)} GFLOP/s" for k, v in result["peaks_gflops"].items()) + ". "
        "**% of peak** counts the reference model's FLOPs for the audio made; for rows that run the folded model "
        "(ours, OpenVINO on the folded graph) the figure after the slash counts the FLOPs they execute.", "",
        f"**Workload**: {markdown_text(s['model'])}; {markdown_text(s['utterances'])} utterances of {_frames(s['lengths'])} mel frames "
        f"({markdown_text(s['audio_seconds_per_pass'])} s of audio per pass), mels from {markdown_text(s['mel_source'])}; sigma "
        f"{markdown_text(s['sigma'])}, seed {markdown_text(s['seed'])}; {markdown_text(s['repeats'])} timed passes per row after a warm-up "
        f"batch, rows interleaved; {markdown_text(s['threads'])} threads. The reference model needs "
        f"{markdown_text(s['reference_gflop_per_audio_second'])} GFLOP per second of audio ({s['reference_macs_per_step']:,} "
        f"multiply-adds per {markdown_text(s['model_config']['n_group'])}-sample step; our folded model "
        f"{s['folded_macs_per_step']:,}).",
        f"**Quality gate**: against the reference with the same noise (rows that pad a batch: its padded batch "
        f"at the same batch size; rows that pad nothing, like fast: each utterance alone): log-mel "
        f"distance ≤ {markdown_text(s['quality_gate']['max_log_mel_distance'])} (mean |Δ ln mel|) and SNR ≥ "
        f"{markdown_text(s['quality_gate']['min_snr_db'])} dB.",
        _amx_note(m), _load_note(s.get("load")), "",
    ]
    if result.get("engine_build"):
        lines += ["**Engine build** (fast rows, through a fresh engine cache): " + "; ".join(
            f"{markdown_text(row)} first {markdown_text(e['first_seconds'])} s, cached {markdown_text(e['cached_seconds'])} s"
            for row, e in result["engine_build"].items()) + ".", ""]
        lines += [f"- {markdown_text(row)}: first load {_phases(e.get('first_phases'))}; cached {_phases(e.get('cached_phases'))}"
                  for row, e in result["engine_build"].items() if e.get("first_phases")]
        auto = result.get("auto_load")
        if auto:
            lines += [f"- precision auto, what a run loads ({markdown_text(auto['precision'])}), on a fresh engine cache: first "
                      f"{markdown_text(auto['first']['seconds'])} s ({_phases(auto['first']['phases'])}); cached "
                      f"{markdown_text(auto['cached']['seconds'])} s ({_phases(auto['cached']['phases'])})"]
        lines += [""] if lines[-1] else []
    if result.get("quantised_graphs"):
        lines += ["**Quantised graphs** (NNCF post-training int8, calibrated on this run's mels, cached beside the "
                  "exported ONNX): " + "; ".join(
                      f"{markdown_text(row)} {markdown_text(q['cache'])} ({markdown_text(q['samples'])} calibration "
                      f"windows{', quantised in ' + markdown_text(q['seconds']) + ' s' if q['seconds'] else ''})"
                      for row, q in result["quantised_graphs"].items()) + ".", ""]
    header = ("| row | utt/s | × real time (p10–p90) | vs reference | vs OpenVINO bf16 | eff. GFLOP/s | % of peak "
              "| peak MiB (+load) | SNR dB | log-mel dist | quality |")
    for bs in s["batch_sizes"]:
        lines += [f"## Batch {markdown_text(bs)}", "", header, "|" + "---|" * 11]
        for r in (r for r in result["rows"] if r["batch_size"] == bs):
            lines.append(
                f"| {markdown_text(r['label'])} | {_fmt(r['utterances_per_second'], 3)} | {_fmt(r['audio_seconds_per_second'], 3)} "
                f"({_fmt(r['audio_seconds_per_second_p10'], 3)}–{_fmt(r['audio_seconds_per_second_p90'], 3)}) "
                f"| {_fmt(r['speedup_vs_reference'])}× | {_fmt(r['ratio_vs_openvino_bf16'])}"
                f"{'×' if r['ratio_vs_openvino_bf16'] else ''} | {_fmt(r['effective_gflops'], 0)} "
                f"| {_peak_share(r)} ({markdown_text(r['precision'])}) | {_fmt(r['peak_memory_mib'], 0)} "
                f"(+{_fmt(r['load_memory_mib'], 0)}) | {_fmt(r['snr_db'], 1)} | {_fmt(r['log_mel_distance'], 4)} "
                f"| {_fmt(r['quality_ok'])} |")
        lines.append("")
        chose = [r for r in result["rows"] if r["batch_size"] == bs and r.get("threads_per_run")]
        if chose:  # a shared machine shows here: the default path runs on the cores free at each run
            lines += ["Threads chosen per timed run (the cores free at that moment, up to "
                      f"{markdown_text(s['threads'])}): " + "; ".join(
                          f"{markdown_text(r['row'])} {_thread_counts(r['threads_per_run'])}" for r in chose) + ".", ""]
    auto = result["auto"]
    if s["quick"]:  # a smoke run times a few tiny utterances once: no verdicts from it
        lines += [f"*Smoke run (`--quick`): what was timed is {s['utterances']} slices of {_frames(s['lengths'])} mel "
                  f"frames ({s['audio_seconds_per_pass']} s of audio) from {markdown_text(s['mel_source'])}, one pass per "
                  "row: long enough that each engine's own speed shows, not its per-call overhead. It shows that every "
                  "row runs and agrees with the reference; one short pass is not a verdict — run the full benchmark "
                  "for that.*", ""]
        if auto["rejected"]:  # quality is a verdict even on a smoke run
            lines += [f"Rejected by the gate: {_list(auto['rejected'])}.", ""]
    else:
        lines += _verdicts(auto, result["default_path"])
    if result.get("busy"):
        lines += [f"**Warning**: {markdown_text(result['busy'])}.", ""]
    # a row cannot execute FLOPs faster than the hardware (a folded row's share of the reference's FLOPs may
    # pass 100 %: it does fewer): the peak was measured while something else had the cores
    over = [r for r in result["rows"] if (r.get("percent_of_peak_executed") or 0) > 100]
    if over:
        lines += [f"**Warning**: {len(over)} row(s) exceed the measured matmul peak, which was therefore measured "
                  "low (the machine was busy while it was timed): the % of peak column means nothing in this run.", ""]

    if result.get("skipped_rows"):
        lines += ["Skipped: " + "; ".join(f"{markdown_text(k)} ({markdown_text(v)})" for k, v in result["skipped_rows"].items()), ""]
    lines += ["## The guide's published rows (theirs, not measured here)", "",
              "Utterances per second for LJ001-0001…0010 at full length (mean "
              f"{result['guide_mean_audio_seconds']:.2f} s of audio each); × real time = utt/s × that mean.", "",
              "| device | " + " | ".join(f"bs {b}" for b in (1, 4, 8, 16)) + " |", "|---|---|---|---|---|"]
    for name, table in result["guide"].items():
        lines.append(f"| {markdown_text(name)} | " + " | ".join(
            f"{table[str(b)]} utt/s ({table[str(b)] * result['guide_mean_audio_seconds']:.2f}×)" for b in (1, 4, 8, 16)) + " |")
    if s["lengths"] != list(GUIDE_MEL_LENGTHS):
        lines += ["", "Our utterances are shorter than the guide's (see Workload), so compare × real time, "
                  "not utterances/s, with their rows."]
    if result.get("profile"):
        lines += ["", f"## Profile (batch 1, {markdown_text(result['profile']['frames'])} frames)", ""]
        for name, table in result["profile"].items():
            if isinstance(table, dict) and table.get("top"):
                lines.append(f"- **{markdown_text(name)}** ({markdown_text(table['wall_seconds'])} s): " + "; ".join(
                    f"{markdown_text(e['op'])} {markdown_text(e['percent'])} %" for e in table["top"]))
    return "\n".join(lines) + "\n"


def guide_throughput_rows(measured: Sequence[Mapping[str, Any]], guide_mean_seconds: float = GUIDE_MEAN_SECONDS
                          ) -> list[dict[str, Any]]:
    """The guide's table layout, like with like: one row per batch size, × real time (seconds of audio made
    per second) here beside the guide's devices. Their utterances/s are for utterances of
    `guide_mean_seconds` (6.67 s) on average, ours are shorter: utterances/s would flatter the shorter ones."""
    sizes = sorted({int(r["batch_size"]) for r in measured} | {b for t in GUIDE_THROUGHPUT.values() for b in t})
    by_size = {int(r["batch_size"]): r for r in measured}
    rows = []
    for size in sizes:
        here = by_size.get(size, {})
        row = {"batch size": size, "this machine (× real time)": here.get("audio_seconds_per_second")}
        row.update({f"{device} (× real time)": (table[size] * guide_mean_seconds if size in table else None)
                    for device, table in GUIDE_THROUGHPUT.items()})
        rows.append(row)
    return rows
