"""Streaming and any-length measurements (`python -m waveglow_lib bench --stream`, `stream_bench(...)`).

- Latency, per backend, on the guide's mel lengths: each mel is fed frame by frame to
  `batching.vocode_stream` (a TTS front-end producing frames); time to first audio (from the first frame
  handed over to the first chunk out, frames arriving instantly), per-chunk latency p50/p95 (the time
  from asking for a chunk to getting it), and the real-time factor (total time / audio seconds).
- Memory by length (10 s … 1 h of audio): peak resident-set growth while the vocode stage turns one mel
  file into a wav (`stages.vocode`: the mel read by blocks, noise drawn per chunk, the wav written as
  chunks finish) — flat in the length when memory is bounded by a chunk. By default on a 2-flow WaveGlow
  with random weights (MEMORY_MODEL: an hour takes minutes on 2 cores; the memory a chunk takes is the
  model's, its flatness in the length is the code's). Measured here; the tests compare two lengths.
- Chunk overhead: frames computed per frame of audio (the context each chunk carries).
"""
from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..backends import ModelSpec, get_backend
from ..batching import chunk_plan, vocode_stream
from ..config import GUIDE_MEL_LENGTHS, ModelConfig, STFTConfig, WorkflowConfig
from ..errors import ConfigError
from ..hardware import machine_busy, machine_info
from ..io import atomic_write_json, atomic_write_text
from ..layout import BENCH_CACHE_DIR, BENCH_STREAM, inside, measurement_files
from ..model import WaveGlow
from ..stages import vocode
from .harness import RssSampler, _percentile
from .report import markdown_text
from .workload import build_model, exported_graph

STREAM_BACKENDS = ("torch", "fast", "onnxruntime", "openvino")
MEMORY_SECONDS = (10, 60, 600, 3600)
#: the memory rows' model (`memory_model="tiny"`): 2 flows, random weights
MEMORY_MODEL = ModelConfig(n_flows=2, n_group=8, n_early_every=4, n_early_size=2, n_layers=1, n_channels=8,
                           kernel_size=3)


def _open(name: str, model, threads: int | None, cache_dir: Path):
    opts = {"threads": threads} if threads else {}
    if name in ("torch", "fast"):
        return get_backend(name, model=model, precision="fp32", **opts)
    return get_backend(name, onnx_path=exported_graph(model, "model", cache_dir), precision="fp32",
                       spec=ModelSpec.from_model_config(model.config), **opts)


def _mel(frames: int, n_mel: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)  # speed and memory do not depend on the values
    return (rng.standard_normal((n_mel, frames)) - 5.0).astype(np.float32)


def _timed_stream(backend, mel, config, cfg, chunk_frames, utt_id) -> dict:
    latencies, sizes = [], 0
    start = last = time.perf_counter()
    first = None
    for audio in vocode_stream(iter(mel.T), backend, config, sigma=cfg.sigma, seed=cfg.seed, utt_id=utt_id,
                               chunk_frames=chunk_frames, pad_value=STFTConfig().pad_value):
        now = time.perf_counter()
        first = now - start if first is None else first
        latencies.append(now - last)
        sizes += audio.size
        last = now
    return {"first": first, "latencies": latencies, "seconds": last - start, "samples": sizes}


def stream_bench(cfg: WorkflowConfig | None = None, *, model: Any = "demo", backends: Sequence[str] | None = None,
                 lengths: Sequence[int] = GUIDE_MEL_LENGTHS, chunk_frames: int | None = None,
                 memory_seconds: Sequence[int] = MEMORY_SECONDS, memory_backend: str = "fast",
                 memory_model: Any = "tiny", threads: int | None = None, out_dir: str | Path | None = None) -> dict:
    """Time to first audio, per-chunk latency and real-time factor per backend; peak memory of the vocode
    stage by length (`memory_model`: "tiny" = MEMORY_MODEL, or what `model` takes)."""
    cfg = cfg or WorkflowConfig()
    chunk_frames = cfg.chunk_frames if chunk_frames is None else chunk_frames
    if chunk_frames < 1:
        raise ConfigError("stream_bench needs chunk_frames >= 1")
    out_dir = Path(out_dir) if out_dir else cfg.run_dir
    cache = inside(out_dir, out_dir / BENCH_CACHE_DIR, "the bench engine cache")  # not through a link out
    net, model_name = build_model(model)
    config = net.config
    rate = STFTConfig().sampling_rate
    mels = [_mel(n, config.n_mel_channels, i) for i, n in enumerate(lengths)]
    rows = []
    for name in STREAM_BACKENDS if backends is None else backends:
        try:
            backend = _open(name, net, threads, cache)
        except Exception as error:  # an optional runtime not installed: say so in the table
            rows.append({"backend": name, "skipped": str(error).splitlines()[0][:120]})
            continue
        try:
            _timed_stream(backend, mels[int(np.argmin(lengths))], config, cfg, chunk_frames, "warm")  # warm-up
            runs = [_timed_stream(backend, mel, config, cfg, chunk_frames, f"u{i}") for i, mel in enumerate(mels)]
        finally:
            backend.close()
        latencies = [t for r in runs for t in r["latencies"]]
        audio_seconds = sum(r["samples"] for r in runs) / rate
        seconds = sum(r["seconds"] for r in runs)
        rows.append({"backend": name, "utterances": len(runs), "chunks": len(latencies),
                     "first_audio_ms_median": 1e3 * statistics.median(r["first"] for r in runs),
                     "chunk_ms_p50": 1e3 * _percentile(latencies, 50), "chunk_ms_p95": 1e3 * _percentile(latencies, 95),
                     "real_time_factor": seconds / audio_seconds, "audio_seconds": audio_seconds,
                     "busy": machine_busy()})
    memory_net, memory_name = (tiny_waveglow(MEMORY_MODEL), "2-flow WaveGlow, random weights") \
        if memory_model == "tiny" else build_model(memory_model)
    memory = _memory_rows(cfg, memory_net, memory_backend, memory_seconds, chunk_frames, threads, cache) \
        if memory_seconds else []
    plan = chunk_plan(max(lengths), chunk_frames, config)
    left, right = config.chunk_context()
    result = {"model": model_name, "machine": machine_info(), "chunk_frames": chunk_frames,
              "context_frames": [left, right],
              "computed_per_output_frame": sum(b - a for a, b, _, _ in plan) / plan[-1][3],
              "lengths": list(lengths), "rows": rows, "memory_backend": memory_backend, "memory_model": memory_name,
              "memory": memory}
    out_dir.mkdir(parents=True, exist_ok=True)
    record, table = measurement_files(out_dir, BENCH_STREAM)
    atomic_write_json(record, result)
    atomic_write_text(table, render_stream_markdown(result))
    result["files"] = [str(record), str(table)]
    return result


def tiny_waveglow(config: ModelConfig, seed: int = 0) -> WaveGlow:
    torch.manual_seed(seed)  # speed and memory do not depend on the values
    return WaveGlow(config).eval()


def _memory_rows(cfg: WorkflowConfig, net, backend_name: str, memory_seconds: Sequence[int], chunk_frames: int,
                 threads: int | None, cache: Path) -> list[dict]:
    """Peak RSS while `stages.vocode` turns one mel file of each length into a wav (in `cache`, removed after)."""
    rate, config = STFTConfig().sampling_rate, net.config
    work = cache / "memory"
    run_cfg = cfg.with_overrides(runs_dir=str(work), name="memory", chunk_frames=chunk_frames, denoiser_strength=0.0)
    backend = _open(backend_name, net, threads, cache)
    rows = []
    try:
        for seconds in memory_seconds:
            frames = int(round(seconds * rate / config.hop_length))
            mel_path = work / f"m{frames}.npy"
            _write_mel(mel_path, frames, config.n_mel_channels)
            t0 = time.perf_counter()
            with RssSampler() as rss:
                done = vocode(run_cfg, mel_path, model=net, backend=backend, out_dir=work / "vocode", force=True)
            elapsed = time.perf_counter() - t0
            mel_path.unlink()
            shutil.rmtree(work / "vocode", ignore_errors=True)
            rows.append({"audio_seconds": round(done["audio_seconds"], 1), "frames": frames,
                         "peak_rss_growth_mib": (rss.peak - rss.start) / 2 ** 20, "peak_rss_mib": rss.peak / 2 ** 20,
                         "real_time_factor": elapsed / done["audio_seconds"]})
    finally:
        backend.close()
    return rows


def _write_mel(path: Path, frames: int, n_mel: int, block: int = 4096) -> None:
    """A natural-log-like random `[n_mel, frames]` .npy, written a block at a time (not held whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": True, "shape": (n_mel, frames)})
        for start in range(0, frames, block):  # Fortran order: frame after frame
            handle.write(_mel(min(block, frames - start), n_mel, start).T.astype("<f4").tobytes())


def render_stream_markdown(result: dict) -> str:
    lines = [f"# Streaming: {markdown_text(result['model'])}, chunks of {result['chunk_frames']} frames "
             f"(context {result['context_frames'][0]} + {result['context_frames'][1]} frames; "
             f"{result['computed_per_output_frame']:.3f} frames computed per output frame on the longest mel)", "",
             "| backend | chunks | first audio ms (median) | chunk ms p50 | chunk ms p95 | RTF | busy |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        if "skipped" in row:
            lines.append(f"| {markdown_text(row['backend'])} | skipped: {markdown_text(row['skipped'])} | | | | | |")
            continue
        lines.append(f"| {markdown_text(row['backend'])} | {row['chunks']} | {row['first_audio_ms_median']:.0f} | "
                     f"{row['chunk_ms_p50']:.0f} | {row['chunk_ms_p95']:.0f} | {row['real_time_factor']:.3f} | "
                     f"{'yes' if row['busy'] else 'no'} |")
    if result["memory"]:
        lines += ["", f"Peak memory of the vocode stage by length ({markdown_text(result['memory_backend'])}, "
                  f"{markdown_text(result.get('memory_model', ''))}, a mel file to a wav):", "",
                  "| audio s | frames | peak RSS growth MiB | peak RSS MiB | RTF |", "|---|---|---|---|---|"]
        lines += [f"| {m['audio_seconds']} | {m['frames']} | {m['peak_rss_growth_mib']:.1f} | {m['peak_rss_mib']:.0f} | "
                  f"{m['real_time_factor']:.3f} |" for m in result["memory"]]
    return "\n".join(lines) + "\n"
