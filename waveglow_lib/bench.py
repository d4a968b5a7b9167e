"""Throughput harness: the guide's table (utterances/s at batch 1/4/8/16), reproduced on this machine.

`python -m waveglow_lib bench` or `run_bench(...) -> dict`, `render_markdown(result) -> str`.

Rows (`ROWS`): every path a user could pick, measured in the same run, interleaved repeat by repeat so
that a change in machine load hits all rows alike:
- `reference`: NVIDIA's glow.py algorithm (our `WaveGlow.infer`), PyTorch fp32 eager; the quality truth;
- `torch-bf16`: the same model cast to bf16; `onnxruntime-fp32`, `openvino-fp32`, `openvino-bf16`: the
  exported graph (stages.export) in those runtimes; `openvino-folded-bf16`: OpenVINO on our folded graph;
- `fast-fp32`, `fast-bf16`, `fast-int8`: our fast path (fast.py: folded model on blocked GEMMs; backend
  `fast`; int8 = oneDNN int8 GEMMs with per-channel weight scales and per-call activation quantisation).
bf16 rows are skipped on CPUs without native bf16 (AVX512-BF16 / AMX), where they would only emulate it;
int8 rows likewise without int8 dot products (VNNI / AMX-INT8).

Workload: the guide's 10 mel lengths (832, 164, ... frames = 66.8 s of audio), or those lengths divided by
N (`--lengths guide/N`), or any list. Mels come from the run's preprocessed `mel/` when present, else from
the corpus wavs (each cut or repeated to its length), else synthetic. Noise per utterance from
`stages.infer.utterance_noise` (identical for every row), sigma 0.6; batches as the infer stage forms them
(`plan_batches`, `vocode(..., exact=False)`: padded with log(1e-5), trimmed back — like the guide's
batches; the infer stage's default `exact=True` also recomputes padded tails, extra work not timed here).

Per row and batch size: utterances/s (the guide's unit), audio-seconds/s (× real time), median and p10/p90
over `repeats` timed passes after a warm-up batch, peak memory (resident-set growth sampled every 5 ms
during the row's passes: native runtimes allocate outside Python, so tracemalloc would miss them), effective
GFLOP/s (the *reference* model's FLOPs, counted analytically, divided by the time, so algebraic savings
show), the measured matmul peak for the row's precision and the % of it, speed-up over the reference row,
and quality against the reference row at the same batch size with the same noise: SNR and log-mel distance
(evaluate.log_mel_distance: mean |Δ ln mel|).

Quality gate (`evaluate.quality_ok`, the same one `precision: auto` applies): a row passes when its output
is finite, its log-mel distance to fp32 is ≤ 0.05 (mean |Δ ln mel| — a 5 % mean deviation of the mel
magnitude, ≈ 0.43 dB, below the ~1 dB level difference a listener notices) and its SNR is ≥ 20 dB.
`auto` = the fastest passing row. The targets are judged on the workflow's default path (`default_path`:
fast at the first of int8, bf16, fp32 that was measured and passes).

Budget: one full pass of the official model over the guide's 66.8 s of audio takes minutes per row on
2 cores (the reference runs at ~0.3× real time). The default run is therefore `--lengths guide/16`
(4.2 s of audio per pass), batch sizes 1/4/8/16, 3 repeats, the seven default rows: about 16 minutes on
2 EPYC cores (25 minutes with `--backends all --profile` while other jobs shared the machine). Short
utterances favour the graph runtimes a little (fixed per-call costs); `--lengths guide/4 --batch-sizes 1,16`
is a closer look at real lengths in about 10 minutes for four rows. `--lengths guide --repeats 3` is the full table (hours on 2 cores). `--quick` (tests,
smoke runs): the demo model unless one is given, three short lengths, batch 1 and 2, one repeat.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .config import GUIDE_MEL_LENGTHS, GUIDE_THROUGHPUT, ModelConfig, STFTConfig, WorkflowConfig
from .evaluate import MAX_LOG_MEL_DISTANCE, MIN_SNR_DB, quality_check, quality_ok

#: the guide's utterances, mean audio length in seconds (their utterances/s → audio-s/s)
GUIDE_MEAN_SECONDS = sum(GUIDE_MEL_LENGTHS) * 256 / 22050 / len(GUIDE_MEL_LENGTHS)
DEFAULT_LENGTHS = "guide/16"
QUICK_LENGTHS = (12, 7, 9)
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
    Row("openvino-folded-bf16", "openvino", "bf16", "OpenVINO bf16 on our folded graph", graph="folded"),
    Row("fast-fp32", "fast", "fp32", "ours: folded model, blocked GEMMs, fp32"),
    Row("fast-bf16", "fast", "bf16", "ours: folded model, blocked GEMMs, bf16"),
    Row("fast-int8", "fast", "int8", "ours: folded model, int8 GEMMs (oneDNN, per-channel weights)"),
)}
DEFAULT_ROWS = (REFERENCE, "torch-bf16", "onnxruntime-fp32", "openvino-fp32", "openvino-bf16", "fast-bf16",
                "fast-int8")


# --- machine, FLOPs, peaks -----------------------------------------------------------------------------
def machine_info() -> dict:
    """CPU model, cores, the ISA features that decide bf16/int8 speed, library versions."""
    import torch

    from .fast import cpu_flags, native_bf16, native_int8

    flags = cpu_flags()
    model_name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    isa = {"AVX2": "avx2" in flags, "AVX-512": "avx512f" in flags, "AVX-512 BF16": "avx512_bf16" in flags,
           "AVX-512 VNNI": "avx512_vnni" in flags, "AVX-VNNI": "avx_vnni" in flags,
           "AMX-BF16": "amx_bf16" in flags, "AMX-INT8": "amx_int8" in flags}
    versions = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__}
    for name in ("onnxruntime", "openvino"):
        try:
            module = __import__(name)
            versions[name] = module.__version__.split("-")[0]
        except ImportError:
            versions[name] = None
    return {"cpu": model_name, "logical_cpus": os.cpu_count(), "usable_cpus": usable,
            "torch_threads": torch.get_num_threads(), "isa": isa, "native_bf16": native_bf16(),
            "native_int8": native_int8(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "versions": versions,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def reference_macs_per_step(c: ModelConfig) -> int:
    """Multiply-adds of NVIDIA's reverse pass per step of the folded time axis (n_group samples)."""
    taps = c.upsample_kernel // c.upsample_stride  # frames reaching each audio sample
    macs = c.n_group * c.n_mel_channels * c.n_mel_channels * taps  # upsampler, per n_group samples
    n_remaining = c.n_group
    for k in range(c.n_flows):
        if k > 0 and k % c.n_early_every == 0:
            n_remaining -= c.n_early_size
        n_half, ch, layers = n_remaining // 2, c.n_channels, c.n_layers
        macs += n_half * ch + layers * 2 * ch * ch * c.kernel_size  # start, dilated in_layers
        macs += (layers - 1) * 2 * ch * ch + ch * ch  # res_skip (the last layer: skip only)
        macs += c.n_mel_channels * c.n_group * 2 * ch * layers  # cond_layer
        macs += ch * 2 * n_half + n_remaining * n_remaining  # end, inverse 1x1
    return macs


def folded_macs_per_step(c: ModelConfig) -> int:
    """Multiply-adds of fast.py's folded network per step (frame-rate conditioning, skip folded in end)."""
    taps = c.upsample_kernel // c.upsample_stride
    macs = 0
    n_remaining = c.n_group
    for k in range(c.n_flows):
        if k > 0 and k % c.n_early_every == 0:
            n_remaining -= c.n_early_size
        n_half, ch, layers = n_remaining // 2, c.n_channels, c.n_layers
        macs += n_half * ch + layers * 2 * ch * ch * c.kernel_size
        macs += layers * taps * c.n_mel_channels * 2 * ch  # conditioning from 4 frames × n_mel
        macs += (layers - 1) * ch * (ch + 2 * n_half) + ch * 2 * n_half + n_remaining * n_remaining
    return macs


def reference_flops_per_audio_second(c: ModelConfig, sample_rate: int = 22050) -> float:
    return 2.0 * reference_macs_per_step(c) * sample_rate / c.n_group


def matmul_peaks(size: int = 2048, repeats: int = 3, bf16: bool = True, int8: bool = False) -> dict[str, float]:
    """GFLOP/s of a square matmul per precision (int8: `torch._int_mm`, int32 accumulation; GOP/s), with the
    current torch thread count (best of N)."""
    import torch

    peaks = {}
    for name, dtype, wanted in (("fp32", torch.float32, True), ("bf16", torch.bfloat16, bf16),
                                ("int8", torch.int8, int8)):
        if not wanted:
            continue
        a, b = (torch.randint(-100, 100, (size, size)).to(dtype) for _ in range(2))
        multiply = torch._int_mm if dtype == torch.int8 else torch.matmul
        multiply(a, b)
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            multiply(a, b)
            best = min(best, time.perf_counter() - t0)
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
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- workload ------------------------------------------------------------------------------------------
def parse_lengths(text: str | Sequence[int]) -> list[int]:
    """'guide' | 'guide/N' (each guide length divided by N, at least 2 frames) | '832,164' | a list."""
    if not isinstance(text, str):
        lengths = [int(v) for v in text]
    else:
        spec = text.strip().lower()
        if spec == "guide":
            lengths = list(GUIDE_MEL_LENGTHS)
        elif spec.startswith("guide/"):
            try:
                divisor = float(spec.split("/", 1)[1])
            except ValueError:
                raise ValueError(f"--lengths: cannot read the divisor in {text!r} (e.g. guide/16)") from None
            if divisor <= 0:
                raise ValueError(f"--lengths: divisor must be positive in {text!r}")
            lengths = [max(2, round(v / divisor)) for v in GUIDE_MEL_LENGTHS]
        else:
            try:
                lengths = [int(v) for v in spec.replace(" ", "").split(",") if v]
            except ValueError:
                raise ValueError(f"--lengths: expected guide, guide/N or frame counts like 832,164; got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise ValueError(f"--lengths: need at least one length of >= 1 frame, got {lengths}")
    return lengths


def workload(lengths: Sequence[int], cfg: WorkflowConfig, n_mel: int = 80) -> tuple[list[str], list[np.ndarray], str]:
    """(ids, mels [n_mel, L], source): the run's preprocessed mels, else the corpus wavs, else synthetic.

    Mel i is cut to (or repeated up to) lengths[i]; ids name the source utterance (noise is per id).
    """
    sources = _preprocessed_mels(cfg, n_mel) or _corpus_mels(cfg, len(lengths), n_mel)
    if sources:
        origin, items = sources
        ids, mels = [], []
        for i, frames in enumerate(lengths):
            utt_id, mel = items[i % len(items)]
            reps = -(-frames // mel.shape[1])
            ids.append(f"{utt_id}" if i < len(items) else f"{utt_id}#{i}")
            mels.append(np.ascontiguousarray(np.tile(mel, (1, reps))[:, :frames], dtype=np.float32))
        return ids, mels, origin
    rng = np.random.default_rng(cfg.seed)
    ids, mels = [], []
    for i, frames in enumerate(lengths):
        # a smooth spectral envelope with slow changes over time: log-mel values of speech-like level
        base = np.linspace(-4.0, -9.0, n_mel)[:, None]
        wobble = np.cumsum(rng.standard_normal((n_mel, frames)) * 0.15, axis=1)
        mels.append(np.clip(base + wobble - wobble.mean(), np.log(STFTConfig().clip_val), 1.0).astype(np.float32))
        ids.append(f"synthetic-{i:02d}")
    return ids, mels, "synthetic"


def _preprocessed_mels(cfg: WorkflowConfig, n_mel: int):
    from .io import read_bin

    manifest_path = cfg.run_dir / "mel" / "manifest.json"
    if not manifest_path.is_file():
        return None
    try:
        items = json.loads(manifest_path.read_text())["items"]
        mels = [(it["id"], read_bin(cfg.run_dir / "mel" / it.get("bin", f"{it['id']}.bin"), tuple(it["shape"])))
                for it in items]
    except (OSError, KeyError, ValueError):
        return None
    mels = [(i, m) for i, m in mels if m.shape[0] == n_mel and m.shape[1] > 0]
    return (f"preprocessed mels ({manifest_path.parent})", mels) if mels else None


def _corpus_mels(cfg: WorkflowConfig, count: int, n_mel: int):
    from .audio import AudioError, load_wav, mel_spectrogram

    wav_dir = cfg.corpus_dir / "wavs"
    if not wav_dir.is_dir() or n_mel != STFTConfig().n_mel_channels:
        return None
    items = []
    for path in sorted(wav_dir.glob("*.wav"))[:count]:
        try:
            audio, _ = load_wav(path)
        except AudioError:
            continue
        items.append((path.stem, mel_spectrogram(audio)))
    return (f"corpus wavs ({cfg.corpus_dir})", items) if items else None


# --- building the rows ----------------------------------------------------------------------------------
def build_model(spec: Any = "official", seed: int = 0):
    """'official' (the 87.7 M-parameter architecture, random weights: no download; speed does not depend on
    the values), 'demo' (the bundled model), a checkpoint path, or a WaveGlow instance. Returns (model, name)."""
    import torch

    from .checkpoint import load_waveglow
    from .model import WaveGlow

    if isinstance(spec, torch.nn.Module):
        return spec.float().eval(), f"given model ({spec.config.n_channels} channels)"
    if spec == "official":
        torch.manual_seed(seed)
        return WaveGlow(ModelConfig()).eval(), f"official architecture, random weights (seed {seed})"
    if spec == "demo":
        return load_waveglow(None), "bundled demo model"
    return load_waveglow(spec), str(spec)


def model_fingerprint(model) -> str:
    import hashlib

    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def exported_graph(model, kind: str, cache_dir: Path) -> Path:
    """The model's ONNX export (`kind` "model" or "folded"), cached by weight fingerprint."""
    from .fast import fold_waveglow
    from .stages.export import export_onnx

    path = Path(cache_dir) / f"waveglow_{model_fingerprint(model)}{'_folded' if kind == 'folded' else ''}.onnx"
    if not path.is_file():
        export_onnx(fold_waveglow(model) if kind == "folded" else model, path, opset=17)
    return path


def open_row(row: Row, model, threads: int | None, cache_dir: Path):
    from .backends import ModelSpec, get_backend

    if row.factory is not None:
        return row.factory(model, threads)
    opts = {"threads": threads} if threads else {}
    if row.graph is None:
        return get_backend(row.backend, model=model, precision=row.precision, **opts)
    return get_backend(row.backend, onnx_path=exported_graph(model, row.graph, cache_dir), precision=row.precision,
                       spec=ModelSpec.from_model_config(model.config), **opts)


# --- measuring ------------------------------------------------------------------------------------------
def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def run_bench(cfg: WorkflowConfig | None = None, *, model: Any = "official", lengths: Any = None,
              batch_sizes: Sequence[int] | None = None, repeats: int | None = None,
              rows: Sequence[str | Row] | None = None, quick: bool | None = None, threads: int | None = None,
              out_dir: str | Path | None = None, write: bool = True, profile: bool = False,
              progress: bool = True) -> dict:
    """Measure the table; returns the result dict (also written as bench.json + bench.md when `write`).

    `cfg` gives seed, sigma, corpus/run folder and the bench_* defaults (batch sizes, repeats, quick).
    `rows`: row ids from ROWS (or "all"), or Row objects (e.g. a test's custom path); the reference row is
    always measured (it is the quality truth). `threads`: cores for every row (default: torch's setting).
    `out_dir`: default `cfg.run_dir`. `profile`: also record the profilers' top operations (see `profile_paths`).
    """
    import torch
    from tqdm.auto import tqdm

    from .stages.infer import Utterance, plan_batches, utterance_noise, vocode

    cfg = cfg or WorkflowConfig()
    quick = cfg.bench_quick if quick is None else quick
    if quick and model == "official":
        model = "demo"
    lengths = parse_lengths(lengths if lengths is not None else (QUICK_LENGTHS if quick else DEFAULT_LENGTHS))
    batch_sizes = [int(b) for b in (batch_sizes or ([1, 2] if quick else cfg.bench_batch_sizes))]
    repeats = int(repeats or (1 if quick else cfg.bench_repeats))
    if repeats < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"bench: need repeats >= 1 and batch sizes >= 1, got {repeats} and {batch_sizes}")
    if threads:
        torch.set_num_threads(int(threads))
    threads = torch.get_num_threads()
    out_dir = Path(out_dir) if out_dir is not None else cfg.run_dir
    machine = machine_info()
    row_list = _select_rows(rows, machine["native_bf16"])
    not_native = {"bf16": ("native_bf16", "no native bf16 on this CPU (AVX512-BF16/AMX): it would only emulate it"),
                  "int8": ("native_int8", "no int8 dot products on this CPU (VNNI/AMX-INT8): no faster than bf16")}
    skipped = {r.id: not_native[r.precision][1] for r in row_list
               if r.factory is None and r.precision in not_native and not machine[not_native[r.precision][0]]}
    row_list = [r for r in row_list if r.id not in skipped]

    net, model_name = build_model(model, cfg.seed)
    c = net.config
    ids, mels, source = workload(lengths, cfg, c.n_mel_channels)
    noises = [utterance_noise(c, m.shape[1], cfg.seed, i) for i, m in zip(ids, mels)]
    utts = [Utterance(i, m.shape[1], None) for i, m in zip(ids, mels)]
    index = {u.id: n for n, u in enumerate(utts)}
    audio_seconds = sum(m.shape[1] for m in mels) * c.hop_length / STFTConfig().sampling_rate
    useful_flops = reference_flops_per_audio_second(c) * audio_seconds
    pad_value = float(np.log(STFTConfig().clip_val))
    peaks = matmul_peaks(512 if quick else 2048, bf16=machine["native_bf16"],
                         int8=any(r.precision == "int8" for r in row_list))

    backends, load_info = {}, {}
    for row in tqdm(row_list, desc="bench: load", disable=not progress):
        before, t0 = rss_bytes(), time.perf_counter()
        backends[row.id] = open_row(row, net, threads, out_dir / "bench_models")
        load_info[row.id] = {"load_seconds": round(time.perf_counter() - t0, 2),
                             "load_mib": round((rss_bytes() - before) / 2 ** 20, 1),
                             "description": getattr(backends[row.id], "description", row.id)}

    def one_pass(backend, bs):
        outputs = [None] * len(utts)
        for batch in plan_batches(utts, bs):
            audio, _ = vocode(backend, [mels[index[u.id]] for u in batch], [noises[index[u.id]] for u in batch],
                              cfg.sigma, c, exact=False, pad_value=pad_value)
            for u, a in zip(batch, audio):
                outputs[index[u.id]] = a
        return outputs

    results = []
    try:
        for bs in batch_sizes:
            times = {r.id: [] for r in row_list}
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
                            out = one_pass(backends[row.id], bs)
                            times[row.id].append(time.perf_counter() - t0)
                        peak_mib[row.id] = max(peak_mib[row.id], (rss.peak - rss.start) / 2 ** 20)
                        if rep == 0:
                            outputs[row.id] = out
                        bar.update(1)
            for row in row_list:
                results.append(_row_result(row, bs, times[row.id], peak_mib[row.id], outputs, len(utts),
                                           audio_seconds, useful_flops, peaks, load_info[row.id]))
    finally:
        for backend in backends.values():
            backend.close()
    _add_ratios(results)
    result = {
        "machine": machine, "peaks_gflops": peaks,
        "settings": {"model": model_name, "model_config": c.to_dict(), "lengths": lengths,
                     "audio_seconds_per_pass": round(audio_seconds, 3), "utterances": len(utts),
                     "mel_source": source, "batch_sizes": batch_sizes, "repeats": repeats, "threads": threads,
                     "sigma": cfg.sigma, "seed": cfg.seed, "quick": bool(quick),
                     "reference_gflop_per_audio_second": round(reference_flops_per_audio_second(c) / 1e9, 3),
                     "reference_macs_per_step": reference_macs_per_step(c),
                     "folded_macs_per_step": folded_macs_per_step(c),
                     "quality_gate": {"max_log_mel_distance": MAX_LOG_MEL_DISTANCE, "min_snr_db": MIN_SNR_DB}},
        "rows": results, "skipped_rows": skipped,
        "auto": pick_auto(results), "targets": targets(results, machine),
        "guide": {name: {str(b): v for b, v in table.items()} for name, table in GUIDE_THROUGHPUT.items()},
        "guide_mean_audio_seconds": round(GUIDE_MEAN_SECONDS, 3),
    }
    if profile:
        result["profile"] = profile_paths(net, frames=min(max(lengths), 172), threads=threads, cache_dir=out_dir / "bench_models")
    if write:
        from .io import atomic_write_json, atomic_write_text

        atomic_write_json(out_dir / "bench.json", result)
        atomic_write_text(out_dir / "bench.md", render_markdown(result))
        result["files"] = {"json": str(out_dir / "bench.json"), "markdown": str(out_dir / "bench.md")}
    return result


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
            raise ValueError(f"bench: unknown row {r!r}; choose from {', '.join(ROWS)} (or all)")
    if REFERENCE not in [r.id for r in chosen]:
        chosen.insert(0, ROWS[REFERENCE])  # the quality truth and the speed-up base
    ids = [r.id for r in chosen]
    if len(set(ids)) != len(ids):
        raise ValueError(f"bench: a row is listed twice: {ids}")
    return chosen


def _row_result(row: Row, bs: int, times: list[float], peak_mib: float, outputs: dict, n_utts: int,
                audio_seconds: float, useful_flops: float, peaks: dict, load: dict) -> dict:
    median = statistics.median(times)
    quality = quality_check(outputs[REFERENCE], outputs[row.id])
    gflops = useful_flops / median / 1e9
    peak = peaks.get(row.precision)
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
        "effective_gflops": round(gflops, 2), "peak_gflops": peak,
        "percent_of_peak": round(100 * gflops / peak, 1) if peak else None,
        "peak_memory_mib": round(peak_mib, 1), "load_memory_mib": load["load_mib"],
        "load_seconds": load["load_seconds"], **quality, "quality_ok": quality_ok(quality),
    }


def _add_ratios(results: list[dict]) -> None:
    by_key = {(r["row"], r["batch_size"]): r for r in results}
    for r in results:
        ref = by_key.get((REFERENCE, r["batch_size"]))
        ov = by_key.get(("openvino-bf16", r["batch_size"]))
        r["speedup_vs_reference"] = round(r["audio_seconds_per_second"] / ref["audio_seconds_per_second"], 3)
        r["ratio_vs_openvino_bf16"] = (round(r["audio_seconds_per_second"] / ov["audio_seconds_per_second"], 3)
                                       if ov else None)


def pick_auto(results: Sequence[Mapping[str, Any]]) -> dict:
    """The fastest row whose quality passes: per batch size, and overall (geometric mean over batch sizes
    of audio-seconds/s, among rows that pass at every batch size)."""
    per_batch = {}
    for bs in sorted({r["batch_size"] for r in results}):
        passing = [r for r in results if r["batch_size"] == bs and r["quality_ok"]]
        if passing:
            best = max(passing, key=lambda r: r["audio_seconds_per_second"])
            per_batch[str(bs)] = best["row"]
    rows = {}
    for r in results:
        rows.setdefault(r["row"], []).append(r)
    overall = [(math.exp(statistics.mean(math.log(x["audio_seconds_per_second"]) for x in rs)), row)
               for row, rs in rows.items() if all(x["quality_ok"] for x in rs)]
    return {"overall": max(overall)[1] if overall else None, "per_batch_size": per_batch,
            "rejected": sorted({r["row"] for r in results if not r["quality_ok"]})}


def default_path(results: Sequence[Mapping[str, Any]]) -> str | None:
    """The row the workflow's defaults run (`backend: auto`, `precision: auto` → fast): the first of
    fast-int8, fast-bf16, fast-fp32 that was measured (native on this CPU) and passes the gate at every batch
    size; without fast rows, the bench's own auto pick."""
    rows: dict[str, list] = {}
    for r in results:
        rows.setdefault(r["row"], []).append(r["quality_ok"])
    for row in ("fast-int8", "fast-bf16", "fast-fp32"):
        if rows.get(row) and all(rows[row]):
            return row
    return pick_auto(results)["overall"]


def targets(results: Sequence[Mapping[str, Any]], machine: Mapping[str, Any]) -> dict:
    """The issue's targets, per batch size, for the default path (`default_path`): ≥ 1.2× OpenVINO bf16,
    ≥ 2.5× reference, and (on a CPU with AMX) ≥ 1.0× real time at batch 1."""
    chosen = default_path(results)
    out = {"row": chosen, "per_batch_size": {}}
    for r in results:
        if r["row"] != chosen:
            continue
        entry = {"speedup_vs_reference": r["speedup_vs_reference"], "meets_2_5x_reference": r["speedup_vs_reference"] >= 2.5,
                 "ratio_vs_openvino_bf16": r["ratio_vs_openvino_bf16"],
                 "meets_1_2x_openvino_bf16": (r["ratio_vs_openvino_bf16"] >= 1.2) if r["ratio_vs_openvino_bf16"] else None,
                 "real_time_factor": r["audio_seconds_per_second"], "quality_ok": r["quality_ok"]}
        if r["batch_size"] == 1 and machine["isa"].get("AMX-BF16"):
            entry["meets_1x_real_time_amx"] = r["audio_seconds_per_second"] >= 1.0
        out["per_batch_size"][str(r["batch_size"])] = entry
    return out


# --- profiling ------------------------------------------------------------------------------------------
def profile_paths(model, frames: int = 172, threads: int | None = None, cache_dir: str | Path = "runs/bench_models",
                  top: int = 8) -> dict:
    """Where the time goes, batch 1, one `frames`-frame mel: torch.profiler on the reference and on the
    fast path (self CPU time per op), OpenVINO's per-node perf counters (bf16) grouped by node type."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from .fast import FastEngine

    rng = np.random.default_rng(0)
    mel = (rng.standard_normal((1, model.config.n_mel_channels, frames)) - 5.0).astype(np.float32)
    z = (0.6 * rng.standard_normal(model.noise_shape(1, frames))).astype(np.float32)
    out = {"frames": frames}

    def torch_table(fn):
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events) or 1
        return {"wall_seconds": round(wall, 3),
                "top": [{"op": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 1),
                         "percent": round(100 * e.self_cpu_time_total / total, 1)} for e in events[:top]]}

    with torch.inference_mode():
        out["reference_torch_fp32"] = torch_table(lambda: model.infer(torch.from_numpy(mel), 1.0, torch.from_numpy(z)))
    from .fast import native_bf16

    engine = FastEngine(model, "bf16" if native_bf16() else "fp32", threads=threads)
    out[f"fast_{engine.precision}"] = torch_table(lambda: engine.run(mel, z))
    try:
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(exported_graph(model, "model", Path(cache_dir)))), "CPU",
                                      {"INFERENCE_PRECISION_HINT": "bf16" if native_bf16() else "f32",
                                       "PERF_COUNT": True})
        request = compiled.create_infer_request()
        request.infer({"mel": mel, "z": z})
        t0 = time.perf_counter()
        request.infer({"mel": mel, "z": z})
        wall = time.perf_counter() - t0
        groups: dict[tuple, list] = {}
        for info in request.get_profiling_info():
            groups.setdefault((info.node_type, info.exec_type), []).append(info.real_time.total_seconds())
        total = sum(sum(v) for v in groups.values()) or 1
        ranked = sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:top]
        out["openvino"] = {"wall_seconds": round(wall, 3), "top": [
            {"op": f"{k[0]} ({k[1]})", "calls": len(v), "self_ms": round(1e3 * sum(v), 1),
             "percent": round(100 * sum(v) / total, 1)} for k, v in ranked]}
    except ImportError:
        out["openvino"] = None
    return out


# --- report ---------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(result: Mapping[str, Any]) -> str:
    """bench.md: machine, settings, one table per batch size, auto pick, targets, the guide's rows."""
    m, s = result["machine"], result["settings"]
    isa = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in m["isa"].items())
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    lines = [
        "# WaveGlow throughput", "",
        f"**Machine**: {m['cpu']}, {m['usable_cpus']} usable CPUs ({m['torch_threads']} torch threads); {isa}; "
        f"torch CPU capability {m['torch_cpu_capability']}; load average at start {m.get('load_average')}.",
        f"**Libraries**: {versions}.",
        f"**Measured matmul peak** (square torch.matmul): " +
        ", ".join(f"{k} {v} GFLOP/s" for k, v in result["peaks_gflops"].items()) + ".", "",
        f"**Workload**: {s['model']}; {s['utterances']} utterances of {s['lengths']} mel frames "
        f"({s['audio_seconds_per_pass']} s of audio per pass), mels from {s['mel_source']}; sigma {s['sigma']}, "
        f"seed {s['seed']}; {s['repeats']} timed passes per row after a warm-up batch, rows interleaved; "
        f"{s['threads']} threads. The reference model needs {s['reference_gflop_per_audio_second']} GFLOP per "
        f"second of audio ({s['reference_macs_per_step']:,} multiply-adds per {s['model_config']['n_group']}-sample "
        f"step; our folded model {s['folded_macs_per_step']:,}).",
        f"**Quality gate**: against the reference row at the same batch size with the same noise: log-mel "
        f"distance ≤ {s['quality_gate']['max_log_mel_distance']} (mean |Δ ln mel|) and SNR ≥ "
        f"{s['quality_gate']['min_snr_db']} dB.", "",
    ]
    header = ("| row | utt/s | × real time (p10–p90) | vs reference | vs OpenVINO bf16 | eff. GFLOP/s | % of peak "
              "| peak MiB (+load) | SNR dB | log-mel dist | quality |")
    for bs in s["batch_sizes"]:
        lines += [f"## Batch {bs}", "", header, "|" + "---|" * 11]
        for r in (r for r in result["rows"] if r["batch_size"] == bs):
            lines.append(
                f"| {r['label']} | {_fmt(r['utterances_per_second'], 3)} | {_fmt(r['audio_seconds_per_second'], 3)} "
                f"({_fmt(r['audio_seconds_per_second_p10'], 3)}–{_fmt(r['audio_seconds_per_second_p90'], 3)}) "
                f"| {_fmt(r['speedup_vs_reference'])}× | {_fmt(r['ratio_vs_openvino_bf16'])}"
                f"{'×' if r['ratio_vs_openvino_bf16'] else ''} | {_fmt(r['effective_gflops'], 0)} "
                f"| {_fmt(r['percent_of_peak'], 0)} ({r['precision']}) | {_fmt(r['peak_memory_mib'], 0)} "
                f"(+{_fmt(r['load_memory_mib'], 0)}) | {_fmt(r['snr_db'], 1)} | {_fmt(r['log_mel_distance'], 4)} "
                f"| {_fmt(r['quality_ok'])} |")
        lines.append("")
    auto = result["auto"]
    lines += ["## auto", "",
              f"Fastest row that passes the quality gate: **{auto['overall']}** overall; per batch size: "
              + ", ".join(f"{b}: {r}" for b, r in auto["per_batch_size"].items())
              + (f". Rejected by the gate: {', '.join(auto['rejected'])}." if auto["rejected"] else "."), ""]
    t = result["targets"]
    if t["row"]:
        lines += [f"## Targets: the default path ({t['row']}; `backend: auto`, `precision: auto`)", "", "| batch | vs OpenVINO bf16 (≥ 1.2×) | vs reference (≥ 2.5×) | × real time |",
                  "|---|---|---|---|"]
        for b, e in t["per_batch_size"].items():
            lines.append(f"| {b} | {_fmt(e['ratio_vs_openvino_bf16'])} ({_fmt(e['meets_1_2x_openvino_bf16'])}) "
                         f"| {_fmt(e['speedup_vs_reference'])} ({_fmt(e['meets_2_5x_reference'])}) "
                         f"| {_fmt(e['real_time_factor'], 3)} |")
        lines.append("")
    if result.get("skipped_rows"):
        lines += ["Skipped: " + "; ".join(f"{k} ({v})" for k, v in result["skipped_rows"].items()), ""]
    lines += ["## The guide's published rows (theirs, not measured here)", "",
              "Utterances per second for LJ001-0001…0010 at full length (mean "
              f"{result['guide_mean_audio_seconds']:.2f} s of audio each); × real time = utt/s × that mean.", "",
              "| device | " + " | ".join(f"bs {b}" for b in (1, 4, 8, 16)) + " |", "|---|---|---|---|---|"]
    for name, table in result["guide"].items():
        lines.append(f"| {name} | " + " | ".join(
            f"{table[str(b)]} utt/s ({table[str(b)] * result['guide_mean_audio_seconds']:.2f}×)" for b in (1, 4, 8, 16)) + " |")
    if s["lengths"] != list(GUIDE_MEL_LENGTHS):
        lines += ["", "Our utterances are shorter than the guide's (see Workload), so compare × real time, "
                  "not utterances/s, with their rows."]
    if result.get("profile"):
        lines += ["", f"## Profile (batch 1, {result['profile']['frames']} frames)", ""]
        for name, table in result["profile"].items():
            if isinstance(table, dict) and table.get("top"):
                lines.append(f"- **{name}** ({table['wall_seconds']} s): " + "; ".join(
                    f"{e['op']} {e['percent']} %" for e in table["top"]))
    return "\n".join(lines) + "\n"


# --- command line ---------------------------------------------------------------------------------------
def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bench` on the CLI's sub-command parser (called by __main__)."""
    parser = subparsers.add_parser(
        "bench", help="throughput table: backends × precision × batch size, with quality beside speed",
        description=__doc__.split("\n\n")[0] + " Default: about 15 minutes on 2 cores (see --lengths).")
    parser.add_argument("--model", default=None,
                        help="official (87.7 M parameters, random weights; default) | demo | a checkpoint path")
    parser.add_argument("--lengths", default=None,
                        help=f"guide | guide/N | frame counts like 832,164 (default {DEFAULT_LENGTHS}: the guide's "
                             "lengths / 16, 4.2 s of audio per pass; guide = 66.8 s, minutes per row per pass)")
    parser.add_argument("--batch-sizes", default=None, help="e.g. 1,4,8,16 (default: params bench_batch_sizes)")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes per row (default: params bench_repeats)")
    parser.add_argument("--backends", default=None,
                        help=f"rows, comma separated, or all (default: {','.join(DEFAULT_ROWS)}); "
                             f"known: {', '.join(ROWS)}")
    parser.add_argument("--threads", type=int, default=None, help="cores for every row (default: torch's)")
    parser.add_argument("--quick", action="store_true", default=None, help="smoke run: demo model, 3 short lengths, batch 1 and 2, 1 repeat")
    parser.add_argument("--profile", action="store_true", help="also record the profilers' top operations")
    parser.add_argument("--out-dir", type=Path, default=None, help="where bench.json/bench.md go (default runs/<name>)")
    parser.add_argument("--params", default=None, metavar="FILE", help="params YAML (name, runs_dir, seed, sigma, bench_*)")
    parser.add_argument("--name", default=None, help="run name (default from params: demo)")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    parser.set_defaults(func=_bench_command)
    return parser


def _bench_command(args: argparse.Namespace) -> int:
    overrides = {"name": args.name} if args.name else {}
    cfg = (WorkflowConfig.from_yaml(args.params, overrides) if args.params
           else WorkflowConfig.from_dict(overrides, source="command line"))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else None
    rows = args.backends.split(",") if args.backends else None
    quick = args.quick if args.quick is not None else cfg.bench_quick
    result = run_bench(cfg, model=args.model or ("demo" if quick else "official"), lengths=args.lengths,
                       batch_sizes=batch_sizes, repeats=args.repeats, rows=rows, quick=quick,
                       threads=args.threads, out_dir=args.out_dir, profile=args.profile)
    print(render_markdown(result))
    print(json.dumps({"files": result.get("files"), "auto": result["auto"]}, indent=2))
    return 0
