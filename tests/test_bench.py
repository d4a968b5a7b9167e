"""bench.py: the harness's behaviour on a tiny model with --quick (never a timing assertion)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from waveglow_lib import bench
from waveglow_lib.hardware import native_bf16
from waveglow_lib.metrics import MAX_LOG_MEL_DISTANCE, quality_ok
from waveglow_lib.backends.base import Backend, ModelSpec
from waveglow_lib.config import GUIDE_MEL_LENGTHS, ModelConfig, WorkflowConfig

from support import TINY, tiny_waveglow


class NoiseBackend(Backend):
    """A path that is very fast and breaks the audio: it returns noise (or NaN)."""

    name = "broken"

    def __init__(self, model, nan: bool = False):
        super().__init__(ModelSpec.from_model_config(model.config))
        self.nan = nan

    def _run(self, mel, z):
        audio = np.random.default_rng(0).standard_normal((mel.shape[0], mel.shape[2] * 256)).astype(np.float32)
        if self.nan:
            audio[:, 5] = np.nan
        return audio


class RaggedNoiseBackend(NoiseBackend):
    """A broken path that, like fast, takes a batch unpadded (`run_utterances`): judged against each utterance
    alone."""

    def run_utterances(self, mels, zs):
        return [self.run(m[None], z[None])[0] for m, z in zip(mels, zs)]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    model = tiny_waveglow(TINY)
    cfg = WorkflowConfig(name="t", runs_dir=str(out / "runs"))
    rows = [bench.ROWS["fast-fp32"], bench.ROWS["fast-int8"], bench.ROWS["onnxruntime-fp32"],
            bench.Row("broken", "broken", "fp32", "breaks the audio", factory=lambda m, t: NoiseBackend(m)),
            bench.Row("nan", "broken", "fp32", "NaN audio", factory=lambda m, t: NoiseBackend(m, nan=True)),
            bench.Row("ragged-broken", "broken", "fp32", "unpadded noise", factory=lambda m, t: RaggedNoiseBackend(m))]
    return bench.run_bench(cfg, model=model, quick=True, rows=rows, out_dir=out, progress=False), out


def test_rows_have_every_field_with_finite_numbers(result):
    res, _ = result
    rows = res["rows"]
    int8 = {"fast-int8"} if res["machine"]["native_int8"] else set()  # else skipped, with the reason
    assert {r["row"] for r in rows} == {"reference", "fast-fp32", "onnxruntime-fp32", "broken", "nan",
                                        "ragged-broken"} | int8
    assert ("fast-int8" in res["skipped_rows"]) == (not int8)
    if int8:
        assert res["peaks_gflops"]["int8"] > 0
    assert sorted({r["batch_size"] for r in rows}) == [1, 2]  # --quick
    numeric = ("utterances_per_second", "utterances_per_second_p10", "utterances_per_second_p90",
               "audio_seconds_per_second", "audio_seconds_per_second_p10", "audio_seconds_per_second_p90",
               "effective_gflops", "percent_of_peak", "peak_memory_mib", "speedup_vs_reference", "seconds_median")
    for r in rows:
        for key in numeric:
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] >= 0, (r["row"], key, r[key])
        assert r["utterances_per_second_p10"] <= r["utterances_per_second"] <= r["utterances_per_second_p90"]
        assert len(r["seconds"]) == r["repeats"] == 1
        # ratios are computed from the same run's numbers
        ref = next(x for x in rows if x["row"] == "reference" and x["batch_size"] == r["batch_size"])
        assert r["speedup_vs_reference"] == pytest.approx(r["audio_seconds_per_second"] / ref["audio_seconds_per_second"], rel=1e-2)
        assert r["effective_gflops"] == pytest.approx(
            res["settings"]["reference_gflop_per_audio_second"] * r["audio_seconds_per_second"], rel=2e-2, abs=0.02)
        assert r["ratio_vs_openvino_bf16"] is None  # that row was not asked for
    audio = res["settings"]["audio_seconds_per_pass"]
    assert audio == pytest.approx(sum(bench.QUICK_LENGTHS) * 256 / 22050, rel=1e-3)
    assert set(res["peaks_gflops"]) >= {"fp32"} and all(v > 0 for v in res["peaks_gflops"].values())
    # the peak is the best of two measurements around the rows, so one stall cannot make it low
    measured = res["peaks_gflops_measured"]
    assert res["peaks_gflops"] == {k: max(measured["before_rows"][k], measured["after_rows"][k]) for k in measured["before_rows"]}
    # % of peak by the reference's FLOPs, and for the fast rows also by the folded model's (fewer) FLOPs they run
    share = res["settings"]["folded_macs_per_step"] / res["settings"]["reference_macs_per_step"]
    for r in rows:
        folded = r["row"].startswith("fast-")
        assert r["folded_model"] is folded
        assert r["percent_of_peak"] == pytest.approx(100 * r["effective_gflops"] / res["peaks_gflops"][r["precision"]], abs=0.1)
        assert r["percent_of_peak_executed"] == pytest.approx(r["percent_of_peak"] * (share if folded else 1.0), abs=0.2)
    assert res["machine"]["isa"].keys() >= {"AMX-BF16", "AVX-512 BF16", "AVX-512 VNNI"}
    assert res["machine"]["versions"]["torch"] == torch.__version__
    # the rows that choose their threads per run (fast) record each timed run's choice; the others nothing
    for r in rows:
        chosen = r["threads_per_run"]
        assert (chosen is not None) == r["row"].startswith("fast-"), r["row"]
        if chosen is not None:  # one per vocode call: a batch of the run's 3 slices at a time, one pass
            assert len(chosen) == -(-len(bench.QUICK_LENGTHS) // r["batch_size"])
            assert all(1 <= t <= res["settings"]["threads"] for t in chosen)


def test_quality_gate_rejects_paths_that_break_the_audio(result):
    res, _ = result
    by_row = {(r["row"], r["batch_size"]): r for r in res["rows"]}
    for bs in (1, 2):
        assert by_row[("reference", bs)]["quality_ok"] and by_row[("reference", bs)]["snr_db"] == 200.0
        # fast pads nothing: compared with each utterance alone (not the padded reference batch), it is
        # the same fp32 computation at every batch size
        fast = by_row[("fast-fp32", bs)]
        assert fast["quality_ok"] and fast["snr_db"] > 100 and fast["quality_reference"] == "each utterance alone"
        assert by_row[("onnxruntime-fp32", bs)]["quality_ok"]
        assert by_row[("onnxruntime-fp32", bs)]["quality_reference"] == "padded batch"
        for name in ("broken", "ragged-broken"):  # the unpadded comparison still rejects a wrong row
            broken = by_row[(name, bs)]
            assert not broken["quality_ok"] and broken["log_mel_distance"] > MAX_LOG_MEL_DISTANCE
        nan = by_row[("nan", bs)]
        assert not nan["quality_ok"] and nan["finite"] is False
    # the broken paths are the fastest rows, yet auto never picks them
    assert res["auto"]["overall"] not in ("broken", "nan") and res["auto"]["overall"] is not None
    assert set(res["auto"]["per_batch_size"]) == {"1", "2"}
    assert not {"broken", "nan", "ragged-broken"} & set(res["auto"]["per_batch_size"].values())
    assert res["auto"]["rejected"] == ["broken", "nan", "ragged-broken"]
    # the targets are judged on the workflow's default path (fast: int8 where native, here no bf16 row)
    expected = "fast-int8" if res["machine"]["native_int8"] else "fast-fp32"  # the first fast row measured
    flags = bench.harness.cpu_flags()
    assert res["default_path"]["row"] == expected == bench.default_path(res["rows"], bench.harness.precision_order(flags))
    assert set(res["default_path"]["per_batch_size"]) == {"1", "2"}
    assert all(e["quality_ok"] for e in res["default_path"]["per_batch_size"].values())


def test_quality_ok_thresholds():
    assert quality_ok({"finite": True, "log_mel_distance": 0.01, "snr_db": 40.0})
    assert not quality_ok({"finite": True, "log_mel_distance": 0.2, "snr_db": 40.0})
    assert not quality_ok({"finite": True, "log_mel_distance": 0.01, "snr_db": 10.0})
    assert not quality_ok({"finite": False, "log_mel_distance": None, "snr_db": None})


def test_files_written_with_guide_rows_labelled_theirs(result):
    res, out = result
    on_disk = json.loads((out / "bench.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(res["rows"]))
    md = (out / "bench.md").read_text()
    assert md == bench.render_markdown(res)
    assert "(theirs, not measured here)" in md and "Ascend 310P3 (guide)" in md and "0.59 utt/s" in md
    assert "NVIDIA glow.py algorithm" in md and "## Batch 2" in md
    assert "Rejected by the gate: broken, nan, ragged-broken" in md


def test_bench_md_says_which_flops_its_peak_share_counts_and_when_the_peak_was_measured_low(result):
    """A row beyond 100 % of the peak means the peak was measured on a busy machine (a loaded quick bench
    once showed 457 %): bench.md says so instead of printing it as a utilisation."""
    import copy

    res, _ = result
    md = bench.render_markdown(res)
    fast = next(r for r in res["rows"] if r["row"] == "fast-fp32" and r["batch_size"] == 1)
    assert f"{fast['percent_of_peak']:.0f} / {fast['percent_of_peak_executed']:.0f} (fp32)" in md
    assert "FLOPs they execute" in md
    busy = copy.deepcopy(res)
    busy["rows"][0]["percent_of_peak"] = busy["rows"][0]["percent_of_peak_executed"] = 457.0
    assert "exceed the measured matmul peak" in bench.render_markdown(busy)
    # the executed FLOPs decide: a folded row above 100 % of the reference's FLOPs only does less work
    folded = copy.deepcopy(res)
    for r in folded["rows"]:
        r["percent_of_peak_executed"] = 50.0
        r["percent_of_peak"] = 120.0 if r["folded_model"] else 50.0
    assert "exceed the measured matmul peak" not in bench.render_markdown(folded)
    assert ("exceed the measured matmul peak" in md) == any(r["percent_of_peak_executed"] > 100 for r in res["rows"])


def test_quick_bench_times_second_long_slices_of_the_runs_utterances(result):
    """--quick must represent the run: a few frames per utterance timed per-call overhead, and the graph
    runtimes beat the engine `auto` picks there (issue 30, item 4)."""
    res, out = result
    s = res["settings"]
    assert len(s["lengths"]) == 3 and all(n * 256 / 22050 >= 1.0 for n in s["lengths"])
    assert s["mel_source"].startswith("corpus wavs")  # the run's own utterances, not synthetic mels
    md = (out / "bench.md").read_text()
    assert f"3 slices of {', '.join(map(str, s['lengths']))} mel frames" in md and "per-call overhead" in md


def test_flop_counts_match_the_official_architecture():
    official = ModelConfig()
    # per flow: dilated in_layers 8·512·256·3, res_skip 7·512·256 + 256·256, cond_layer 640·4096; start/end
    # 768·n_half with n_half 4/3/2 over 4 flows each; inverse 1x1 8²/6²/4²; upsampler 8·80·80·4 per step
    per_flow = 8 * 512 * 256 * 3 + 7 * 512 * 256 + 256 * 256 + 640 * 4096
    expected = 12 * per_flow + 4 * 768 * (4 + 3 + 2) + 4 * (64 + 36 + 16) + 8 * 80 * 80 * 4
    assert bench.reference_macs_per_step(official) == expected == 81_235_408  # 81.2 M, as the issue says
    assert round(bench.reference_flops_per_audio_second(official) / 1e9) == 448
    # the folded network: conditioning at frame rate and skip folded into end, about 27 % less work
    assert 0.70 < bench.folded_macs_per_step(official) / bench.reference_macs_per_step(official) < 0.75


def test_lengths_and_rows_parsing():
    assert bench.parse_lengths("guide") == list(GUIDE_MEL_LENGTHS)
    assert bench.parse_lengths("guide/16")[:3] == [52, 10, 52]
    assert bench.parse_lengths("12, 7") == [12, 7]
    for bad in ("guide/x", "guide/0", "a,b", "0"):
        with pytest.raises(ValueError, match="--lengths"):
            bench.parse_lengths(bad)
    chosen = bench.harness._select_rows(["fast-bf16"], True)
    assert [r.id for r in chosen] == ["reference", "fast-bf16"]  # the reference is always measured
    assert len(bench.harness._select_rows("all", True)) == len(bench.ROWS)
    with pytest.raises(ValueError, match="unknown row"):
        bench.harness._select_rows(["nope"], True)


def test_cli_bench_quick(tmp_path, capsys):
    from waveglow_lib.cli import main

    code = main(["bench", "--quick", "--backends", "reference,fast-fp32", "--batch-sizes", "2",
                 "--out-dir", str(tmp_path), "--name", "cli"])
    assert code == 0
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["settings"]["model"] == "bundled demo model" and saved["settings"]["batch_sizes"] == [2]
    # the demo run's default path at batch 2 (ragged lengths): fast fp32 equals each utterance alone, and
    # the gate must say so (against the padded reference batch it read SNR ~14 dB: "rejected")
    fast = next(r for r in saved["rows"] if r["row"] == "fast-fp32")
    assert fast["quality_ok"] and fast["snr_db"] > 60, fast
    out = capsys.readouterr().out
    assert "# WaveGlow throughput" in out and "Rejected by the gate" not in out
    assert main(["bench", "--quick", "--lengths", "guide/x", "--out-dir", str(tmp_path)]) == 2


def test_default_path_follows_precision_auto():
    def rows(bf16_ok):
        return [{"row": "fast-bf16", "batch_size": 1, "quality_ok": bf16_ok, "audio_seconds_per_second": 2.0},
                {"row": "fast-fp32", "batch_size": 1, "quality_ok": True, "audio_seconds_per_second": 1.0},
                {"row": "reference", "batch_size": 1, "quality_ok": True, "audio_seconds_per_second": 0.5}]
    assert bench.default_path(rows(True)) == "fast-bf16"
    assert bench.default_path(rows(False)) == "fast-fp32"  # bf16 failed the gate: auto would run fp32
    assert bench.default_path(rows(True)[2:]) == "reference"  # no fast rows: the fastest passing row
    int8 = lambda ok: [{"row": "fast-int8", "batch_size": 1, "quality_ok": ok, "audio_seconds_per_second": 3.0}]
    assert bench.default_path(int8(True) + rows(True)) == "fast-int8"
    assert bench.default_path(int8(False) + rows(True)) == "fast-bf16"
    # AMX: auto tries bf16 before int8, whichever row is faster in the table
    amx = dict(order=("bf16", "int8"))
    assert bench.default_path(int8(True) + rows(True), **amx) == "fast-bf16"
    assert bench.default_path(int8(True) + rows(False), **amx) == "fast-int8"
    assert bench.default_path(int8(False) + rows(False), **amx) == "fast-fp32"


def test_cpu_load_starts_and_stops_its_competitors():
    from waveglow_lib.bench.load import CpuLoad

    with CpuLoad(2, max_seconds=60) as load:
        assert len(load.processes) == 2 and all(load.running())
        pids = [p.pid for p in load.processes]
        time.sleep(0.3)
    assert not any(load.running()) and all(p.returncode is not None for p in load.processes)
    for pid in pids:  # gone, not left spinning
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
    summary = load.summary()
    assert summary["cores"] == 2 and summary["seconds"] >= 0.3 and len(summary["competitor_core_share"]) == 2
    if Path("/proc/self/stat").exists():
        # measured (ticks of 10 ms); on a machine busy with other jobs a competitor may get next to no CPU in 0.3 s
        assert all(share is not None and 0 <= share <= 1.1 for share in summary["competitor_core_share"])
    with CpuLoad(1, max_seconds=0.2) as bounded:  # its own deadline ends it even if never stopped
        bounded.processes[0].wait(timeout=30)
        assert not any(bounded.running())
    with CpuLoad(0) as none:
        assert none.processes == []
    with pytest.raises(ValueError):
        CpuLoad(-1)


def test_bench_load_and_engine_build_are_recorded(tmp_path, monkeypatch):
    from waveglow_lib.bench import harness

    seen = {}
    original = harness.CpuLoad

    class Spy(original):
        def __enter__(self):
            seen["entered"] = super().__enter__()
            return seen["entered"]

    monkeypatch.setattr(harness, "CpuLoad", Spy)
    seen_running = []
    original_pass = harness.vocode

    def vocode(*args, **kwargs):  # the competitor runs during every warm-up and timed pass
        seen_running.append(all(seen["entered"].running()))
        return original_pass(*args, **kwargs)

    monkeypatch.setattr(harness, "vocode", vocode)
    cfg = WorkflowConfig(name="t", runs_dir=str(tmp_path / "runs"))
    res = bench.run_bench(cfg, model=tiny_waveglow(TINY), quick=True, rows=["fast-fp32"], batch_sizes=[1],
                          out_dir=tmp_path, progress=False, load=1)
    assert res["settings"]["load"]["cores"] == 1 and seen_running and all(seen_running)
    assert not any(seen["entered"].running())  # stopped after the measurement
    build = res["engine_build"]["fast-fp32"]
    # measured, not asserted fast or slow: a cache hit of the tiny model can take well under a millisecond
    assert build["cache"] == ["hit"] and build["first_seconds"] >= 0 and build["cached_seconds"] >= 0
    # where the time went: the first load folds, casts and stores; the cached one reads (the library's load) and verifies
    assert {"fingerprint", "fold", "arrays", "pack", "store"} <= set(build["first_phases"])
    assert {"read", "verify", "pack"} <= set(build["cached_phases"]) and "fold" not in build["cached_phases"]
    auto = res["auto_load"]  # what a run loads: built and probed on a fresh cache, then read back
    assert auto["first"]["cache"][-1] == "built" and "fingerprint" in auto["first"]["phases"]
    # the tiny model is too narrow for int8: bf16 is probed where it is native, else fp32 needs no probe
    assert ({"probe_reference", "probe_run"} <= set(auto["first"]["phases"])) == native_bf16()
    assert auto["cached"]["cache"] == ["hit"] and not {"probe_reference", "fold"} & set(auto["cached"]["phases"])
    assert not list(tmp_path.glob("engine_cache_*"))  # the bench's engine cache is temporary
    md = (tmp_path / "bench.md").read_text()
    assert "busy-loop competitor" in md and "**Engine build**" in md and "**AMX**" in md
    chosen = next(r for r in res["rows"] if r["row"] == "fast-fp32")["threads_per_run"]
    assert f"Threads chosen per timed run (the cores free at that moment, up to {res['settings']['threads']}): " \
           f"fast-fp32 {chosen[0]} thread" in md
    assert "fp32: first load " in md and "precision auto, what a run loads (" in md  # the breakdown is printed
    assert ("this CPU has AMX" in md) == bool(res["machine"]["isa"]["AMX-INT8"] or res["machine"]["isa"]["AMX-BF16"])


def test_stream_bench_memory_rows_run_the_vocode_stage(tmp_path):
    """`bench --stream`'s memory by length: the vocode stage turns a mel file of each length into a wav, on
    the 2-flow memory model by default (rows and files; what it measures is not asserted)."""
    from waveglow_lib.bench.stream import MEMORY_SECONDS, render_stream_markdown, stream_bench
    from waveglow_lib.layout import BENCH_CACHE_DIR

    assert max(MEMORY_SECONDS) == 3600  # up to an hour of audio
    result = stream_bench(None, model=tiny_waveglow(), backends=[], lengths=[20], chunk_frames=16,
                          memory_seconds=(1, 4), memory_backend="torch", out_dir=tmp_path)
    assert [m["frames"] for m in result["memory"]] == [round(s * 22050 / 256) for s in (1, 4)]
    assert [m["audio_seconds"] for m in result["memory"]] == [1.0, 4.0]
    assert result["memory_model"] == "2-flow WaveGlow, random weights"
    assert "vocode stage" in render_stream_markdown(result)
    assert not list((tmp_path / BENCH_CACHE_DIR / "memory").rglob("*.npy"))  # its mels and wavs removed


def test_cli_bench_profile_records_where_the_time_goes(tmp_path):
    """`bench --profile` runs the profilers and writes their top operations into bench.json."""
    from waveglow_lib.cli import main

    assert main(["bench", "--quick", "--backends", "reference", "--batch-sizes", "1", "--repeats", "1",
                 "--out-dir", str(tmp_path), "--name", "profiled", "--profile"]) == 0
    profile = json.loads((tmp_path / "bench.json").read_text())["profile"]
    assert profile["reference_torch_fp32"]["top"] and all(
        entry["self_ms"] >= 0 and entry["calls"] >= 1 for entry in profile["reference_torch_fp32"]["top"])
    assert any(key.startswith("fast_") and profile[key]["top"] for key in profile)
