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

import http.client
import io
import shutil
import statistics
import time
from urllib.parse import urlparse
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import torch

from ..backends import ModelSpec, get_backend
from ..batching import chunk_plan, vocode_stream
from ..checkpoint import model_fingerprint, save_waveglow
from ..config import GUIDE_MEL_LENGTHS, ModelConfig, STFTConfig, WorkflowConfig
from ..engines.ray import INSTALL
from ..errors import ConfigError, SynthesisError, import_optional
from ..hardware import machine_busy, machine_info
from ..io import atomic_write_json, atomic_write_text
from ..layout import BENCH_CACHE_DIR, BENCH_STREAM, inside, measurement_files
from ..model import WaveGlow
from ..stages import vocode
from .harness import RssSampler, _percentile
from .report import markdown_text
from .workload import build_model, exported_graph

STREAM_BACKENDS = ("torch", "fast", "onnxruntime", "openvino")
#: a streamed WAV's header (`audio.stream_wav_header`): the audio's bytes follow it
STREAM_HEADER_BYTES = 44
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


def _timed_stream(backend, mel, config, cfg, chunk_frames, utt_id, first_chunk_frames: int = 0) -> dict:
    latencies, sizes = [], 0
    start = last = time.perf_counter()
    first = None
    for audio in vocode_stream(iter(mel.T), backend, config, sigma=cfg.sigma, seed=cfg.seed, utt_id=utt_id,
                               chunk_frames=chunk_frames, pad_value=STFTConfig().pad_value,
                               first_chunk_frames=first_chunk_frames):
        now = time.perf_counter()
        first = now - start if first is None else first
        latencies.append(now - last)
        sizes += audio.size
        last = now
    return {"first": first, "latencies": latencies, "seconds": last - start, "samples": sizes}


def stream_bench(cfg: WorkflowConfig | None = None, *, model: Any = "demo", backends: Sequence[str] | None = None,
                 lengths: Sequence[int] = GUIDE_MEL_LENGTHS, chunk_frames: int | None = None,
                 memory_seconds: Sequence[int] = MEMORY_SECONDS, memory_backend: str = "fast",
                 memory_model: Any = "tiny", threads: int | None = None, out_dir: str | Path | None = None,
                 serve: Callable[..., ContextManager[str]] | None = None, serve_backend: str = "fast",
                 serve_precision: str = "auto", stream_chunks: tuple[int, int] = (16, 256)) -> dict:
    """Time to first audio, per-chunk latency and real-time factor per backend; peak memory of the vocode
    stage by length (`memory_model`: "tiny" = MEMORY_MODEL, or what `model` takes).

    With `serve(checkpoint=, backend=, precision=, threads=, stream_chunks=)` (a context manager that runs the
    service and gives its /vocode URL; the CLI's starts `serve` on Ray): the same mels, whole, through the
    service's streamed answers — HTTP and the WebSocket (`transport_rows`) — beside the library path with
    the same backend, precision and chunks (`stream_chunks`: the first chunk's frames, the largest's), batch 1."""
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
    transports = _transports(serve, net, config, cfg, mels, serve_backend, serve_precision, stream_chunks, threads,
                             cache) if serve is not None else None
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
              "memory": memory, **({"transports": transports} if transports else {})}
    out_dir.mkdir(parents=True, exist_ok=True)
    record, table = measurement_files(out_dir, BENCH_STREAM)
    atomic_write_json(record, result)
    atomic_write_text(table, render_stream_markdown(result))
    result["files"] = [str(record), str(table)]
    return result


def _transports(serve, net, config, cfg, mels, backend_name, precision, stream_chunks, threads, cache) -> dict:
    """The library row (in this process), then the service's HTTP and WebSocket rows, same model and chunks."""
    first, most = stream_chunks
    checkpoint = cache / f"stream_{model_fingerprint(net)}.safetensors"
    if not checkpoint.is_file():
        save_waveglow(net, checkpoint)  # what the service's replica loads
    threads = threads or torch.get_num_threads()
    backend = get_backend(backend_name, model=net, precision=precision, threads=threads,
                          **({"cache_dir": cache / "engines"} if backend_name == "fast" else {}))
    try:
        used = getattr(backend, "precision", precision)
        rows = [library_row(backend, mels, config, cfg, first, most)]
    finally:
        backend.close()
    with serve(checkpoint=str(checkpoint), backend=backend_name, precision=precision, threads=threads,
               stream_chunks=stream_chunks) as url:
        rows += transport_rows(url, mels, config, first, most)
    return {"backend": backend_name, "precision": precision, "precision_used": used, "threads": threads,
            "first_chunk_frames": first, "chunk_frames": most, "lengths": [m.shape[1] for m in mels], "rows": rows}


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
    if result.get("transports"):
        t = result["transports"]
        lines += ["", f"Streamed answers of `serve` at batch 1 ({markdown_text(t['backend'])}, precision "
                  f"{markdown_text(t['precision'])} → {markdown_text(str(t['precision_used']))}, {t['threads']} threads; "
                  f"chunks of {t['first_chunk_frames']} frames doubling to {t['chunk_frames']}; mels of "
                  f"{', '.join(map(str, t['lengths']))} frames, whole):", "",
                  "| path | chunks | first audio ms (median) | chunk ms p50 | chunk ms p95 | RTF | busy |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {markdown_text(r['backend'])} | {r['chunks']} | {r['first_audio_ms_median']:.0f} | "
                  f"{r['chunk_ms_p50']:.0f} | {r['chunk_ms_p95']:.0f} | {r['real_time_factor']:.3f} | "
                  f"{'yes' if r['busy'] else 'no'} |" for r in t["rows"]]
    if result["memory"]:
        lines += ["", f"Peak memory of the vocode stage by length ({markdown_text(result['memory_backend'])}, "
                  f"{markdown_text(result.get('memory_model', ''))}, a mel file to a wav):", "",
                  "| audio s | frames | peak RSS growth MiB | peak RSS MiB | RTF |", "|---|---|---|---|---|"]
        lines += [f"| {m['audio_seconds']} | {m['frames']} | {m['peak_rss_growth_mib']:.1f} | {m['peak_rss_mib']:.0f} | "
                  f"{m['real_time_factor']:.3f} |" for m in result["memory"]]
    return "\n".join(lines) + "\n"


# --- the streamed answers of `serve` (issue 36): HTTP `?stream=true` and the WebSocket, beside the library ----
def transport_rows(url: str, mels: Sequence[np.ndarray], model_config: ModelConfig, first_frames: int,
                   chunk_frames: int, *, piece_frames: int = 16) -> list[dict]:
    """Time to first audio, per-chunk latency p50/p95 and real-time factor of a running service's streamed
    answers (`url`: its /vocode), one utterance at a time (batch 1): HTTP (`POST ?stream=true` of the whole
    mel; first audio = the first sample's bytes after the WAV header) and the WebSocket (the mel sent in
    `piece_frames` pieces as fast as the socket takes them, then `end`). A chunk's latency is the time between
    the arrivals of its last byte and the last byte of the chunk before (the first: since the request began);
    the chunks are the service's (`batching.chunk_plan` with its first_frames / chunk_frames)."""
    rate, hop = STFTConfig().sampling_rate, model_config.hop_length
    rows = []
    for path, timed in (("http", _timed_http), ("websocket", _timed_ws)):
        timed(url, mels[int(np.argmin([m.shape[1] for m in mels]))], "warm", piece_frames)  # warm-up
        runs = []
        for i, mel in enumerate(mels):
            sizes = [stop - start for _, _, start, stop in chunk_plan(mel.shape[1], chunk_frames, model_config,
                                                                       first_frames)]
            run = timed(url, mel, f"u{i}", piece_frames)
            if run["samples"] != mel.shape[1] * hop:
                raise SynthesisError(f"{path}: {run['samples']} samples for {mel.shape[1]} frames")
            ends = np.cumsum([n * hop for n in sizes])
            done = [run["arrivals"][int(np.searchsorted(run["counts"], end))] for end in ends]
            run["latencies"] = list(np.diff([0.0, *done]))
            runs.append(run)
        rows.append(_latency_row(path, runs, rate))
    return rows


def _latency_row(name: str, runs: list[dict], rate: int) -> dict:
    latencies = [t for r in runs for t in r["latencies"]]
    audio_seconds = sum(r["samples"] for r in runs) / rate
    return {"backend": name, "utterances": len(runs), "chunks": len(latencies),
            "first_audio_ms_median": 1e3 * statistics.median(r["first"] for r in runs),
            "chunk_ms_p50": 1e3 * _percentile(latencies, 50), "chunk_ms_p95": 1e3 * _percentile(latencies, 95),
            "real_time_factor": sum(r["seconds"] for r in runs) / audio_seconds, "audio_seconds": audio_seconds,
            "seconds_by_utterance": [round(r["seconds"], 3) for r in runs],
            "first_audio_s_by_utterance": [round(r["first"], 3) for r in runs], "busy": machine_busy()}


def _npy(mel: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(mel, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def _arrival(run: dict, start: float, received: int) -> None:
    """Note that the audio's first `received` samples are in, now."""
    now = time.perf_counter() - start
    if run["first"] is None and received:
        run["first"] = now
    run["counts"].append(received)
    run["arrivals"].append(now)


def _timed_http(url: str, mel: np.ndarray, utt_id: str, piece_frames: int = 0) -> dict:
    target = urlparse(url)
    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=600)
    run: dict = {"first": None, "counts": [], "arrivals": []}
    try:
        start = time.perf_counter()
        conn.request("POST", f"{target.path}?id={utt_id}&stream=true", body=_npy(mel),
                     headers={"Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        if response.status != 200:
            raise SynthesisError(f"POST {url}?stream=true: {response.status} {response.read()[:200]!r}")
        data = 0
        while True:
            piece = response.read1(1 << 20)
            if not piece:
                break
            data += len(piece)
            _arrival(run, start, max(0, data - STREAM_HEADER_BYTES) // 4)
    finally:
        conn.close()
    run["seconds"], run["samples"] = run["arrivals"][-1], run["counts"][-1]
    return run


def _timed_ws(url: str, mel: np.ndarray, utt_id: str, piece_frames: int = 16) -> dict:
    connect = import_optional("websockets.sync.client", INSTALL, "the WebSocket bench").connect
    run: dict = {"first": None, "counts": [], "arrivals": []}
    with connect(url.replace("http", "ws", 1) + f"/ws?id={utt_id}", max_size=None, open_timeout=120) as ws:
        start = time.perf_counter()
        for a in range(0, mel.shape[1], piece_frames):
            ws.send(_npy(mel[:, a: a + piece_frames]))
        ws.send("end")
        samples = 0
        while isinstance(message := ws.recv(timeout=600), bytes):
            samples += len(message) // 4
            _arrival(run, start, samples)
    if "error" in message:
        raise SynthesisError(f"WebSocket {url}/ws: {message[:200]}")
    run["seconds"], run["samples"] = run["arrivals"][-1], samples
    return run


def library_row(backend, mels: Sequence[np.ndarray], config: ModelConfig, cfg: WorkflowConfig, first_frames: int,
                chunk_frames: int) -> dict:
    """The library path with the service's chunks (`vocode_stream`, frames handed over one by one), batch 1."""
    _timed_stream(backend, mels[int(np.argmin([m.shape[1] for m in mels]))], config, cfg, chunk_frames, "warm",
                  first_frames)
    runs = [_timed_stream(backend, mel, config, cfg, chunk_frames, f"u{i}", first_frames) for i, mel in enumerate(mels)]
    return _latency_row("library", runs, STFTConfig().sampling_rate)
