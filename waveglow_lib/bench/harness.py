"""The harness: the guide's table (utterances/s at batch 1/4/8/16), reproduced on this machine.

`python -m waveglow_lib bench` or `run_bench(...) -> dict`, `report.render_markdown(result) -> str`.

Rows (`ROWS`): every path a user could pick, measured in the same run, interleaved repeat by repeat so
that a change in machine load hits all rows alike:
- `reference`: NVIDIA's glow.py algorithm (our `WaveGlow.infer`), PyTorch fp32 eager; the quality truth;
- `torch-bf16`: the same model cast to bf16; `onnxruntime-fp32`, `openvino-fp32`, `openvino-bf16`: the
  exported graph (stages.export) in those runtimes; `openvino-folded-bf16`: OpenVINO on our folded graph;
- `openvino-int8`: the exported graph quantised by NNCF (post-training, calibrated on the run's mels with
  their noise; backends/openvino_int8.py), the quantised graph cached beside the exported ONNX;
- `fast-fp32`, `fast-bf16`, `fast-int8`: our fast path (backends/fast/: folded model on blocked GEMMs; int8 = oneDNN u8·s8 GEMMs with per-channel weight scales, each activation quantised once where it is made).
bf16 rows are skipped on CPUs without native bf16 (AVX512-BF16 / AMX), where they would only emulate it;
int8 rows likewise without int8 dot products (VNNI / AMX-INT8).

Workload: the guide's 10 mel lengths (832, 164, ... frames = 66.8 s of audio), or those lengths divided by
N (`--lengths guide/N`), or any list. Mels come from the run's preprocessed `mel/` when present, else from
the corpus wavs (each cut or repeated to its length), else synthetic. Noise per utterance from
`batching.utterance_noise` (identical for every row), sigma 0.6; batches as the infer stage forms them
(`plan_batches`, `vocode(..., exact=False)`: padded with log(1e-5), trimmed back — like the guide's
batches; the infer stage's default `exact=True` also recomputes padded tails, extra work not timed here).
The fast rows take a batch without padding (`run_utterances`: each utterance at its own length, exact), so
they compute no padded frames; the graph runtimes compute the padded batch.

Per row and batch size: utterances/s (the guide's unit), audio-seconds/s (× real time), median and p10/p90
over `repeats` timed passes after a warm-up batch, peak memory (resident-set growth sampled every 5 ms
during the row's passes: native runtimes allocate outside Python, so tracemalloc would miss them), effective
GFLOP/s (the *reference* model's FLOPs, counted analytically, divided by the time, so algebraic savings
show), the measured matmul peak for the row's precision and the % of it, speed-up over the reference row,
and quality against what the row is meant to equal, with the same noise: SNR and log-mel distance
(metrics.log_mel_distance: mean |Δ ln mel|). A row that pads a batch is compared with the reference row's
padded batch at the same batch size; a row that pads nothing (fast, `run_utterances`) with the reference on each
utterance alone (`quality_reference` says which).

Quality gate (`metrics.quality_ok`, the same one `precision: auto` applies): a row passes when its output
is finite, its log-mel distance to fp32 is ≤ 0.05 (mean |Δ ln mel| — a 5 % mean deviation of the mel
magnitude, ≈ 0.43 dB, below the ~1 dB level difference a listener notices) and its SNR is ≥ 20 dB.
`auto` = the fastest passing row; `default_path` = the row the workflow's defaults run (fast at the
first of int8, bf16, fp32 that was measured and passes), with its ratios to the reference and to OpenVINO.

Budget: the official model runs well below real time on a small CPU, so the default is `--lengths guide/16`
(4.2 s of audio per pass), batch sizes 1/4/8/16, 3 repeats, the default rows; the README gives the
measured duration. `--lengths guide` is the full table (hours on 2 cores). `--quick` (tests, smoke runs): the
demo model unless one is given, three short lengths, batch 1 and 2, one repeat.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..backends import ModelSpec, get_backend, runs_utterances
from ..backends.openvino_int8 import import_nncf
from ..batching import Utterance, plan_batches, utterance_noise, vocode
from ..config import GUIDE_THROUGHPUT, ModelConfig, STFTConfig, WorkflowConfig
from ..errors import ConfigError, MissingDependency, WaveGlowError
from ..backends.fast.auto import precision_order
from ..hardware import cpu_flags, cpu_signature, machine_busy, machine_info, usable_cpus
from ..io import atomic_write_json, atomic_write_text, read_bin, read_json
from ..jobs import backend_name, open_backend, resolve_model_config
from ..layout import BENCH, BENCH_MODELS_DIR, inside, load_manifest, measurement_files, mel_bin
from ..provenance import read_timings
from ..records import ThroughputKey, read_record
from ..metrics import MAX_LOG_MEL_DISTANCE, MIN_SNR_DB, quality_check, quality_ok
from .load import CpuLoad
from .profile import profile_paths
from .report import render_markdown
from .workload import (DEFAULT_LENGTHS, GUIDE_MEAN_SECONDS, QUICK_LENGTHS, build_model, exported_graph,
                       parse_lengths, workload)

REFERENCE = "reference"


@dataclass(frozen=True)
class Row:
    """One path of the table: a backend at a precision (`graph`: which ONNX export it reads, if any)."""

    id: str
    backend: str
    precision: str
    label: str
    graph: str | None = None  # "model" | "folded" | None (no export needed)
    #: a custom backend factory (tests: a path that breaks the audio); gets (model, threads)
    factory: Callable[..., Any] | None = None


ROWS = {r.id: r for r in (
    Row(REFERENCE, "torch", "fp32", "NVIDIA glow.py algorithm, PyTorch fp32 eager (reference)"),
    Row("torch-bf16", "torch", "bf16", "PyTorch bf16 (model cast to bf16)"),
    Row("onnxruntime-fp32", "onnxruntime", "fp32", "ONNX Runtime fp32 (CPU EP)", graph="model"),
    Row("openvino-fp32", "openvino", "fp32", "OpenVINO f32", graph="model"),
    Row("openvino-bf16", "openvino", "bf16", "OpenVINO bf16 (INFERENCE_PRECISION_HINT)", graph="model"),
    Row("openvino-int8", "openvino", "int8", "OpenVINO int8 (NNCF post-training quantisation)", graph="model"),
    Row("openvino-folded-bf16", "openvino", "bf16", "OpenVINO bf16 on our folded graph", graph="folded"),
    Row("fast-fp32", "fast", "fp32", "ours: folded model, blocked GEMMs, fp32"),
    Row("fast-bf16", "fast", "bf16", "ours: folded model, blocked GEMMs, bf16"),
    Row("fast-int8", "fast", "int8", "ours: folded model, int8 GEMMs (oneDNN, per-channel weights)"),
)}
DEFAULT_ROWS = (REFERENCE, "torch-bf16", "onnxruntime-fp32", "openvino-fp32", "openvino-bf16", "fast-bf16",
                "fast-int8")


# --- FLOPs, peaks, memory ---------------------------------------------------------------------------
def reference_macs_per_step(c: ModelConfig) -> int:
    """Multiply-adds of NVIDIA's reverse pass per step of the folded time axis (n_group samples)."""
    macs = c.n_group * c.n_mel_channels * c.n_mel_channels * c.upsample_taps  # upsampler, per n_group samples
    for n_remaining in c.flow_channels():
        n_half, ch, layers = n_remaining // 2, c.n_channels, c.n_layers
        macs += n_half * ch + layers * 2 * ch * ch * c.kernel_size  # start, dilated in_layers
        macs += (layers - 1) * 2 * ch * ch + ch * ch  # res_skip (the last layer: skip only)
        macs += c.n_mel_channels * c.n_group * 2 * ch * layers  # cond_layer
        macs += ch * 2 * n_half + n_remaining * n_remaining  # end, inverse 1x1
    return macs


def folded_macs_per_step(c: ModelConfig) -> int:
    """Multiply-adds of the folded network (backends/fast/fold.py) per step (frame-rate conditioning, skip
    folded into end)."""
    macs = 0
    for n_remaining in c.flow_channels():
        n_half, ch, layers = n_remaining // 2, c.n_channels, c.n_layers
        macs += n_half * ch + layers * 2 * ch * ch * c.kernel_size
        macs += layers * c.upsample_taps * c.n_mel_channels * 2 * ch  # conditioning from 4 frames × n_mel
        macs += (layers - 1) * ch * (ch + 2 * n_half) + ch * 2 * n_half + n_remaining * n_remaining
    return macs


def reference_flops_per_audio_second(c: ModelConfig, sample_rate: int = STFTConfig().sampling_rate) -> float:
    return 2.0 * reference_macs_per_step(c) * sample_rate / c.n_group


#: the matmul peak is the best of at least this many seconds of calls: a 512² matmul is short, and a few calls
#: on a loaded machine gave a peak far below the idle one (docs/benchmarks.md, "Figures behind constants")
PEAK_MIN_SECONDS = 0.25


def matmul_peaks(size: int = 2048, repeats: int = 3, bf16: bool = True, int8: bool = False) -> dict[str, float]:
    """GFLOP/s of a square matmul per precision (int8: `torch._int_mm`, int32 accumulation; GOP/s), with the
    current torch thread count (the best call of at least `repeats` and PEAK_MIN_SECONDS)."""
    peaks = {}
    for name, dtype, wanted in (("fp32", torch.float32, True), ("bf16", torch.bfloat16, bf16),
                                ("int8", torch.int8, int8)):
        if not wanted:
            continue
        a, b = (torch.randint(-100, 100, (size, size)).to(dtype) for _ in range(2))
        multiply = torch._int_mm if dtype == torch.int8 else torch.matmul
        multiply(a, b)
        multiply(a, b)  # the second call too: oneDNN may pick its kernel on the first
        best, spent, done = math.inf, 0.0, 0
        while done < repeats or spent < PEAK_MIN_SECONDS:  # best of enough calls that a stall cannot decide it
            t0 = time.perf_counter()
            multiply(a, b)
            elapsed = time.perf_counter() - t0
            best, spent, done = min(best, elapsed), spent + elapsed, done + 1
        peaks[name] = round(2.0 * size ** 3 / best / 1e9, 1)
    return peaks


class RssSampler:
    """Peak resident set size (bytes) of this process while a `with` block runs, sampled every 5 ms."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> "RssSampler":
        self.start = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):  # pragma: no cover - not Linux: the high-water mark
        import resource  # noqa: PLC0415  (POSIX only)

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- building the rows ----------------------------------------------------------------------------------
def open_row(row: Row, model, threads: int | None, cache_dir: Path, engine_cache: str | Path | None = None,
             calibration=None):
    """The row's backend; `engine_cache`: the fast backend's engine cache folder (None: none); `calibration`:
    [(mel, z), ...] an int8 graph row is quantised on (its quantised graph cached in `cache_dir`)."""
    if row.factory is not None:
        return row.factory(model, threads)
    opts = {"threads": threads} if threads else {}
    if row.backend == "fast":
        opts["cache_dir"] = engine_cache if engine_cache is not None else "off"
    elif row.precision == "int8":
        opts.update(calibration=calibration, cache_dir=cache_dir)
    if row.graph is None:
        return get_backend(row.backend, model=model, precision=row.precision, **opts)
    return get_backend(row.backend, onnx_path=exported_graph(model, row.graph, cache_dir), precision=row.precision,
                       spec=ModelSpec.from_model_config(model.config), **opts)


# --- measuring ------------------------------------------------------------------------------------------
def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def time_auto_loads(net, threads: int, out_dir: Path) -> dict:
    """What a run loads, `precision: auto` (every native precision built and probed against the fp32 model,
    stored), timed on a fresh engine cache, then again from that cache (the verdict and the engine read
    back): {precision, first: {seconds, cache, phases}, cached: {...}}."""
    loads = []
    with tempfile.TemporaryDirectory(prefix="engine_cache_auto_", dir=_writable(out_dir)) as fresh:
        for _ in range(2):
            t0 = time.perf_counter()
            auto = get_backend("fast", model=net, precision="auto", threads=threads, cache_dir=fresh)
            loads.append({"seconds": round(time.perf_counter() - t0, 4), "cache": auto.cache_events,
                          "phases": auto.load_times})
            precision = auto.precision
            auto.close()
    return {"precision": precision, "first": loads[0], "cached": loads[1]}


def run_bench(cfg: WorkflowConfig | None = None, *, model: Any = "official", lengths: Any = None,
              batch_sizes: Sequence[int] | None = None, repeats: int | None = None,
              rows: Sequence[str | Row] | None = None, quick: bool | None = None, threads: int | None = None,
              out_dir: str | Path | None = None, write: bool = True, profile: bool = False,
              progress: bool = True, load: int = 0) -> dict:
    """Measure the table; returns the result dict (also written as bench.json + bench.md when `write`).

    `cfg` gives seed, sigma, corpus/run folder and the bench_* defaults (batch sizes, repeats, quick).
    `rows`: row ids from ROWS (or "all"), or Row objects (e.g. a test's custom path); the reference row is
    always measured (it is the quality truth). `threads`: cores for every row (default: torch's setting).
    `out_dir`: default `cfg.run_dir`. `profile`: also record the profilers' top operations (see `profile_paths`).
    `load`: cores kept busy by a competitor (`load.CpuLoad`) from the warm-ups to the last timed pass, so a
    shared machine is reproducible; the rows are loaded before it starts.
    fast rows are loaded twice through a fresh engine cache: the first load builds (and stores) the engine,
    the second reads it back (`engine_build`: first and cached seconds, and each one's phases: fold,
    arrays, pack, store; read, verify, parse); the second is the one measured. `auto_load`: what a run
    loads, `precision: auto` (`time_auto_loads`).
    """
    cfg = cfg or WorkflowConfig()
    quick = cfg.bench_quick if quick is None else quick
    if quick and model == "official":
        model = "demo"
    lengths = parse_lengths(lengths if lengths is not None else (QUICK_LENGTHS if quick else DEFAULT_LENGTHS))
    batch_sizes = [int(b) for b in (batch_sizes or ([1, 2] if quick else cfg.bench_batch_sizes))]
    repeats = int(repeats or (1 if quick else cfg.bench_repeats))
    if repeats < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ConfigError(f"bench: need repeats >= 1 and batch sizes >= 1, got {repeats} and {batch_sizes}")
    if threads:
        torch.set_num_threads(int(threads))
    threads = torch.get_num_threads()
    out_dir = Path(out_dir) if out_dir is not None else cfg.run_dir
    # its exported graphs: never through a link leading out of the folder the record goes to
    models_dir = inside(out_dir, out_dir / BENCH_MODELS_DIR, "the bench models folder")
    machine = machine_info()
    busy = machine_busy()  # before the rows: while they run, the load average counts the bench's own threads
    row_list = _select_rows(rows, machine["native_bf16"])
    not_native = {"bf16": ("native_bf16", "no native bf16 on this CPU (AVX512-BF16/AMX): it would only emulate it"),
                  "int8": ("native_int8", "no int8 dot products on this CPU (VNNI/AMX-INT8): no faster than bf16")}
    skipped = {r.id: not_native[r.precision][1] for r in row_list
               if r.factory is None and r.precision in not_native and not machine[not_native[r.precision][0]]}
    skipped.update(missing_packages(row_list))
    row_list = [r for r in row_list if r.id not in skipped]

    net, model_name = build_model(model, cfg.seed)
    c = net.config
    ids, mels, source = workload(lengths, cfg, c.n_mel_channels)
    noises = [utterance_noise(c, m.shape[1], cfg.seed, i) for i, m in zip(ids, mels)]
    utts = [Utterance(i, m.shape[1], None) for i, m in zip(ids, mels)]
    index = {u.id: n for n, u in enumerate(utts)}
    audio_seconds = sum(m.shape[1] for m in mels) * c.hop_length / STFTConfig().sampling_rate
    useful_flops = reference_flops_per_audio_second(c) * audio_seconds
    pad_value = STFTConfig().pad_value
    peak_size, want_int8 = 512 if quick else 2048, any(r.precision == "int8" for r in row_list)
    peaks_before = matmul_peaks(peak_size, bf16=machine["native_bf16"], int8=want_int8)

    backends, load_info, engine_build = {}, {}, {}
    calibration = [(m[None], (cfg.sigma * n)[None]) for m, n in zip(mels, noises)]  # int8 graph rows' (batch 1)
    with tempfile.TemporaryDirectory(prefix="engine_cache_", dir=_writable(out_dir)) as engine_cache:
        for row in tqdm(row_list, desc="bench: load", disable=not progress):
            cached = row.backend == "fast" and row.factory is None
            if cached:  # first load: build and store the engine, then the timed row reads it back
                t0 = time.perf_counter()
                first_backend = open_row(row, net, threads, models_dir, engine_cache)
                first = time.perf_counter() - t0
                first_phases = first_backend.load_times
                first_backend.close()
            before, t0 = rss_bytes(), time.perf_counter()
            backends[row.id] = open_row(row, net, threads, models_dir, engine_cache if cached else None, calibration)
            load_info[row.id] = {"load_seconds": round(time.perf_counter() - t0, 4),
                                 "load_mib": round((rss_bytes() - before) / 2 ** 20, 1),
                                 "description": getattr(backends[row.id], "description", row.id)}
            if cached:  # and where their seconds went (`fast.engine.LoadTimes`)
                engine_build[row.id] = {"first_seconds": round(first, 4), "cached_seconds": load_info[row.id]["load_seconds"],
                                        "cache": getattr(backends[row.id], "cache_events", []),
                                        "first_phases": first_phases, "cached_phases": backends[row.id].load_times}
    auto_load = time_auto_loads(net, threads, out_dir) if engine_build else None  # on a cache of its own
    # the int8 graph rows' quantisation: {"cache": hit | built | rebuilt, "seconds", "entry", "samples"}
    quantised = {k: b.cache for k, b in backends.items() if getattr(b, "cache", None)}

    def one_pass(backend, bs, threads_used: list | None = None):
        outputs = [None] * len(utts)
        for batch in plan_batches(utts, bs):
            audio, _ = vocode(backend, [mels[index[u.id]] for u in batch], [noises[index[u.id]] for u in batch],
                              cfg.sigma, c, exact=False, pad_value=pad_value)
            chosen = getattr(getattr(backend, "engine", None), "last_threads", None)  # rows that choose per run
            if threads_used is not None and chosen is not None:
                threads_used.append(chosen)
            for u, a in zip(batch, audio):
                outputs[index[u.id]] = a
        return outputs

    # A row is judged against what it is meant to equal: a row that pads a batch (the graph runtimes) against
    # the reference's padded batch; a row that pads nothing (`run_utterances`: fast) against the reference on each
    # utterance alone, same noise. The padded reference's tails differ from that: on the quick bench's short
    # utterances enough to fail the gate (docs/benchmarks.md, "Figures behind constants").
    alone: dict[str, list] = {}

    def reference_alone():
        if "audio" not in alone:  # untimed; reused from batch 1 when that was measured
            alone["audio"] = [vocode(backends[REFERENCE], [m], [n], cfg.sigma, c, exact=True,
                                     pad_value=pad_value)[0][0] for m, n in zip(mels, noises)]
        return alone["audio"]

    results = []
    competitor = CpuLoad(load)
    try:
        competitor.__enter__()
        for bs in batch_sizes:
            times = {r.id: [] for r in row_list}
            threads_used = {r.id: [] for r in row_list}
            peak_mib = {r.id: 0.0 for r in row_list}
            outputs = {}
            warm = [np.ascontiguousarray(m[:, : min(lengths)]) for m in mels[:bs]]
            for row in row_list:  # warm-up: first-call allocations and compilation stay out of the timings
                vocode(backends[row.id], warm, [n[:, : min(lengths) * c.hop_length // c.n_group] for n in noises[:bs]],
                       cfg.sigma, c, exact=False, pad_value=pad_value)
            with tqdm(total=repeats * len(row_list), desc=f"bench: batch {bs}", disable=not progress) as bar:
                for rep in range(repeats):
                    for row in row_list:  # interleaved: load changes hit every row alike
                        with RssSampler() as rss:
                            t0 = time.perf_counter()
                            out = one_pass(backends[row.id], bs, threads_used[row.id])
                            times[row.id].append(time.perf_counter() - t0)
                        peak_mib[row.id] = max(peak_mib[row.id], (rss.peak - rss.start) / 2 ** 20)
                        if rep == 0:
                            outputs[row.id] = out
                        bar.update(1)
            if bs == 1 and all(backends[REFERENCE].pad_length(n) == n for n in lengths):
                alone.setdefault("audio", outputs[REFERENCE])  # batch 1 pads nothing: already each alone
            for row in row_list:
                unpadded = runs_utterances(backends[row.id])
                reference = reference_alone() if unpadded else outputs[REFERENCE]
                results.append(_row_result(row, bs, times[row.id], peak_mib[row.id], outputs[row.id], reference,
                                           "each utterance alone" if unpadded else "padded batch", len(utts),
                                           audio_seconds, useful_flops, load_info[row.id], threads_used[row.id]))
        # measured again after the rows (the competitor still running): one stall cannot make the peak low
        peaks_after = matmul_peaks(peak_size, bf16=machine["native_bf16"], int8=want_int8)
    finally:
        competitor.__exit__(None, None, None)
        for backend in backends.values():
            backend.close()
    peaks = {k: max(v, peaks_after.get(k, 0.0)) for k, v in peaks_before.items()}
    _add_peak_shares(results, peaks, folded_macs_per_step(c) / reference_macs_per_step(c))
    _add_ratios(results)
    flags = cpu_flags()
    result = {
        "machine": machine, "peaks_gflops": peaks,
        "peaks_gflops_measured": {"before_rows": peaks_before, "after_rows": peaks_after},
        "settings": {"model": model_name, "model_config": c.to_dict(), "lengths": lengths,
                     "audio_seconds_per_pass": round(audio_seconds, 3), "utterances": len(utts),
                     "mel_source": source, "batch_sizes": batch_sizes, "repeats": repeats, "threads": threads,
                     "sigma": cfg.sigma, "seed": cfg.seed, "quick": bool(quick),
                     "reference_gflop_per_audio_second": round(reference_flops_per_audio_second(c) / 1e9, 3),
                     "reference_macs_per_step": reference_macs_per_step(c),
                     "folded_macs_per_step": folded_macs_per_step(c),
                     "quality_gate": {"max_log_mel_distance": MAX_LOG_MEL_DISTANCE, "min_snr_db": MIN_SNR_DB},
                     "load": competitor.summary()},
        "rows": results, "skipped_rows": skipped, "engine_build": engine_build, "auto_load": auto_load,
        "quantised_graphs": quantised,
        "auto": pick_auto(results),
        "default_path": default_path_summary(results, precision_order(flags)),
        "busy": busy,
        "guide": {name: {str(b): v for b, v in table.items()} for name, table in GUIDE_THROUGHPUT.items()},
        "guide_mean_audio_seconds": round(GUIDE_MEAN_SECONDS, 3),
    }
    if profile:
        result["profile"] = profile_paths(net, frames=min(max(lengths), 172), threads=threads, cache_dir=models_dir)
    if write:
        record, table = measurement_files(out_dir, BENCH)
        atomic_write_json(record, result)
        atomic_write_text(table, render_markdown(result))
        result["files"] = {"json": str(record), "markdown": str(table)}
    return result


def _writable(folder: Path) -> Path | None:
    """`folder` (created) for the bench's temporary engine cache, or None (the system's temp folder)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    except OSError:
        return None


def _select_rows(rows, native_bf16: bool) -> list[Row]:
    if rows is None or rows == "default":
        rows = list(DEFAULT_ROWS)
    elif rows == "all" or (isinstance(rows, (list, tuple)) and list(rows) == ["all"]):
        rows = list(ROWS)
    chosen = []
    for r in rows:
        if isinstance(r, Row):
            chosen.append(r)
        elif r in ROWS:
            chosen.append(ROWS[r])
        else:
            raise ConfigError(f"bench: unknown row {r!r}; choose from {', '.join(ROWS)} (or all)")
    if REFERENCE not in [r.id for r in chosen]:
        chosen.insert(0, ROWS[REFERENCE])  # the quality truth and the speed-up base
    ids = [r.id for r in chosen]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"bench: a row is listed twice: {ids}")
    return chosen


def _row_result(row: Row, bs: int, times: list[float], peak_mib: float, output: list, reference: list,
                reference_kind: str, n_utts: int, audio_seconds: float, useful_flops: float, load: dict,
                threads_used: list[int] | None = None) -> dict:
    median = statistics.median(times)
    quality = quality_check(reference, output)
    gflops = useful_flops / median / 1e9
    return {
        "row": row.id, "label": row.label, "backend": row.backend, "precision": row.precision, "batch_size": bs,
        "description": load["description"], "repeats": len(times), "seconds": [round(t, 4) for t in times],
        "seconds_median": round(median, 4),
        "utterances_per_second": round(n_utts / median, 4),
        "utterances_per_second_p10": round(n_utts / _percentile(times, 90), 4),
        "utterances_per_second_p90": round(n_utts / _percentile(times, 10), 4),
        "audio_seconds_per_second": round(audio_seconds / median, 4),
        "audio_seconds_per_second_p10": round(audio_seconds / _percentile(times, 90), 4),
        "audio_seconds_per_second_p90": round(audio_seconds / _percentile(times, 10), 4),
        "effective_gflops": round(gflops, 2), "folded_model": executes_folded_model(row),
        "peak_memory_mib": round(peak_mib, 1), "load_memory_mib": load["load_mib"],
        "load_seconds": load["load_seconds"], **quality, "quality_ok": quality_ok(quality),
        "quality_reference": reference_kind,
        # rows that choose their threads per run (fast: the cores free then): what each timed run chose
        "threads_per_run": threads_used or None,
    }


def missing_packages(rows: Sequence[Row]) -> dict[str, str]:
    """Rows whose optional package is not installed → what to install (int8 graph rows: nncf); skipped, so
    that `--rows all` runs without it."""
    needing = [r.id for r in rows if r.factory is None and r.backend != "fast" and r.precision == "int8"]
    try:
        if needing:
            import_nncf()
    except MissingDependency as exc:
        return {row: str(exc) for row in needing}
    return {}


def executes_folded_model(row: Row) -> bool:
    """Rows that run the folded network (fewer multiply-adds than the reference's for the same audio)."""
    return row.backend == "fast" or row.graph == "folded"


def _add_peak_shares(results: list[dict], peaks: Mapping[str, float], folded_share: float) -> None:
    """Each row's share of its precision's matmul peak, counting the reference model's FLOPs (what the audio
    costs NVIDIA's algorithm) and, for rows running the folded model, also the FLOPs they execute."""
    for r in results:
        peak = peaks.get(r["precision"])
        executed = r["effective_gflops"] * (folded_share if r["folded_model"] else 1.0)
        r.update({"peak_gflops": peak, "executed_gflops": round(executed, 2),
                  "percent_of_peak": round(100 * r["effective_gflops"] / peak, 1) if peak else None,
                  "percent_of_peak_executed": round(100 * executed / peak, 1) if peak else None})


def _add_ratios(results: list[dict]) -> None:
    by_key = {(r["row"], r["batch_size"]): r for r in results}
    for r in results:
        ref = by_key.get((REFERENCE, r["batch_size"]))
        ov = by_key.get(("openvino-bf16", r["batch_size"]))
        r["speedup_vs_reference"] = round(r["audio_seconds_per_second"] / ref["audio_seconds_per_second"], 3)
        r["ratio_vs_openvino_bf16"] = (round(r["audio_seconds_per_second"] / ov["audio_seconds_per_second"], 3)
                                       if ov else None)


def by_row(results: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """Each row's results (one per batch size), in the order the rows first appear."""
    rows: dict[str, list] = {}
    for r in results:
        rows.setdefault(r["row"], []).append(r)
    return rows


def overall_speed(row_results: Sequence[Mapping[str, Any]]) -> float:
    """A row's audio-seconds/s over its batch sizes: their geometric mean."""
    return math.exp(statistics.mean(math.log(r["audio_seconds_per_second"]) for r in row_results))


def pick_auto(results: Sequence[Mapping[str, Any]]) -> dict:
    """The fastest row whose quality passes: per batch size, and overall (geometric mean over batch sizes
    of audio-seconds/s, among rows that pass at every batch size)."""
    per_batch = {}
    for bs in sorted({r["batch_size"] for r in results}):
        passing = [r for r in results if r["batch_size"] == bs and r["quality_ok"]]
        if passing:
            best = max(passing, key=lambda r: r["audio_seconds_per_second"])
            per_batch[str(bs)] = best["row"]
    overall = [(overall_speed(rs), row) for row, rs in by_row(results).items() if all(x["quality_ok"] for x in rs)]
    return {"overall": max(overall)[1] if overall else None, "per_batch_size": per_batch,
            "rejected": sorted({r["row"] for r in results if not r["quality_ok"]})}


def default_path(results: Sequence[Mapping[str, Any]], order: Sequence[str] = ("int8", "bf16")) -> str | None:
    """The row the workflow's defaults run (`backend: auto`, `precision: auto` → fast): the first of the fast
    rows in auto's order (`order`: the reduced precisions, `fast.auto.precision_order`; then fp32) that was
    measured (native on this CPU) and passes the gate at every batch size; without fast rows, the bench's
    own auto pick."""
    rows = by_row(results)
    passing = [row for row in [f"fast-{p}" for p in order] + ["fast-fp32"]
               if rows.get(row) and all(r["quality_ok"] for r in rows[row])]
    return passing[0] if passing else pick_auto(results)["overall"]


def default_path_summary(results: Sequence[Mapping[str, Any]], order: Sequence[str] = ("int8", "bf16")) -> dict:
    """The default path's row and, per batch size, its speed-up over the reference, its ratio to OpenVINO
    bf16 (when measured), × real time and its quality verdict: ratios, no thresholds."""
    chosen = default_path(results, order)
    per_batch = {str(r["batch_size"]): {"speedup_vs_reference": r["speedup_vs_reference"],
                                        "ratio_vs_openvino_bf16": r["ratio_vs_openvino_bf16"],
                                        "real_time_factor": r["audio_seconds_per_second"],
                                        "quality_ok": r["quality_ok"]}
                 for r in results if r["row"] == chosen}
    return {"row": chosen, "per_batch_size": per_batch}


# --- the notebooks' look at a run ---------------------------------------------------------------------
def throughput_table(cfg: WorkflowConfig, batch_sizes: Sequence[int] | None = None, *, backend: str | None = None,
                     model: Any = None, repeats: int | None = None) -> list[dict[str, Any]]:
    """Utterances/s (the guide's unit), audio-seconds/s and real-time factor by batch size, on this run's
    utterances and backend, batched exactly as the infer stage batches them.

    Real-time factor = processing seconds / audio seconds (below 1 is faster than real time). Each batch
    size (default `cfg.bench_batch_sizes`) is timed `repeats` times (default `cfg.bench_repeats`) after one
    warm-up batch: median, p10 and p90 of utterances/s, and whether the machine was busy. The rows are saved
    to runs/<name>/throughput.json. For the full harness (peers, precisions, the guide's workload) see
    `run_bench` / `python -m waveglow_lib bench`.
    """
    layout = cfg.layout
    manifest = load_manifest(layout.mel_dir)
    items = manifest["items"]
    stft = STFTConfig(**manifest["settings"]["stft"]) if manifest.get("settings", {}).get("stft") else STFTConfig()
    config = resolve_model_config(cfg, model)
    name = backend or backend_name(cfg)
    hop, rate, pad = config.hop_length, stft.sampling_rate, stft.pad_value
    utterances = [Utterance(item["id"], int(item["mel_frames"]), mel_bin(layout.mel_dir, item)) for item in items]
    mels = {u.id: read_bin(u.bin_path, (config.n_mel_channels, u.frames)) for u in utterances}
    noises = {u.id: utterance_noise(config, u.frames, cfg.seed, u.id) for u in utterances}
    audio_seconds = sum(u.frames * hop for u in utterances) / rate
    repeats = int(repeats or cfg.bench_repeats)
    rows = []
    runner = open_backend(cfg, model=model, model_config=config, name=name)
    try:
        shortest = min(utterances, key=lambda u: u.frames)
        vocode(runner, [mels[shortest.id]], [noises[shortest.id]], cfg.sigma, config, pad_value=pad)   # warm-up
        for batch_size in batch_sizes or cfg.bench_batch_sizes:
            batches = plan_batches(utterances, int(batch_size))
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                for batch in batches:
                    vocode(runner, [mels[u.id] for u in batch], [noises[u.id] for u in batch], cfg.sigma, config,
                           exact=cfg.exact_batching, pad_value=pad)
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            used = getattr(runner, "precision", cfg.precision)  # what `auto` became
            rows.append({"backend": name, "precision": used, "batch_size": int(batch_size),
                         "utterances": len(utterances), "repeats": repeats, "seconds": seconds,
                         "utterances_per_second": len(utterances) / seconds,
                         "utterances_per_second_p10": len(utterances) / _percentile(times, 90),
                         "utterances_per_second_p90": len(utterances) / _percentile(times, 10),
                         "audio_seconds_per_second": audio_seconds / seconds,
                         "real_time_factor": seconds / audio_seconds, "busy": machine_busy()})
    finally:
        runner.close()
    atomic_write_json(layout.throughput, rows)
    return rows


#: what each `throughput` mode times (WorkflowConfig.throughput): passes per batch size (None: bench_repeats)
THROUGHPUT_PASSES = {"quick": 1, "full": None}


def throughput_key(cfg: WorkflowConfig, mode: str) -> dict[str, Any] | None:
    """What the throughput table measured: the infer stage's model and output settings (out/timings.json),
    the mels' contents, the batch sizes and passes, the batching, and this CPU; None before infer ran."""
    path = cfg.layout.timings
    if not path.is_file():
        return None
    timings = read_timings(path)
    settings = {k: timings["settings"].get(k) for k in ("checkpoint", "model", "sigma", "seed", "backend",
                                                         "precision", "precision_used", "device")}
    passes = THROUGHPUT_PASSES[mode] or cfg.bench_repeats
    return {"infer": settings, "mels": {i: item.get("source_sha256") for i, item in timings["items"].items()},
            "batch_sizes": list(cfg.bench_batch_sizes), "passes": passes, "exact_batching": cfg.exact_batching,
            "cpu": cpu_signature(), "usable_cpus": usable_cpus()}


def run_throughput(cfg: WorkflowConfig, mode: str | None = None) -> dict[str, Any]:
    """04_infer's throughput table on the run's `throughput` mode: {"mode", "rows", "measured_at" (UTC),
    "reused"}. The rows of an earlier run are shown again (reused) when nothing they measured changed
    (`throughput_key`); `off` measures nothing (rows: [])."""
    mode = mode or cfg.throughput
    if mode not in ("quick", "full", "off"):
        raise ConfigError(f"parameter 'throughput' must be one of quick, full, off, got {mode!r}")
    if mode == "off":
        return {"mode": mode, "rows": [], "measured_at": None, "reused": False}
    layout = cfg.layout
    key_file = layout.throughput.with_name("throughput_key.json")
    key = throughput_key(cfg, mode)
    if key is not None and key_file.is_file() and layout.throughput.is_file():
        try:
            stored = read_record(key_file, ThroughputKey, "the throughput table's key", damaged="refuse")
            rows = read_json(layout.throughput, "the notebooks' throughput rows", kind=list)
        except WaveGlowError:
            stored, rows = {}, []
        if stored.get("key") == json.loads(json.dumps(key)) and rows:
            return {"mode": mode, "rows": rows, "measured_at": stored.get("measured_at"), "reused": True}
    rows = throughput_table(cfg, repeats=THROUGHPUT_PASSES[mode])
    measured_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if key is not None:
        atomic_write_json(key_file, {"key": key, "measured_at": measured_at})
    return {"mode": mode, "rows": rows, "measured_at": measured_at, "reused": False}
