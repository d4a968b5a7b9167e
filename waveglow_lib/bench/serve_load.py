"""A bounded load test of the vocoding service (`service.py`): 1, 4 and 16 concurrent clients on
127.0.0.1, each level stopped at `max_requests` or `max_seconds`, whichever comes first.

Per level: latency p50/p95/p99 (seconds, request sent → whole WAV received), throughput (requests/s and
audio-seconds/s), errors, how many requests shared a batch (the service's `X-Batch-Requests` header), and
whether every response equals the offline output for the same mel, seed and id (float32 samples compared
byte for byte). Clients are threads with `urllib` (no extra dependency).
"""
from __future__ import annotations

import io
import itertools
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Sequence
from urllib.parse import quote, urlparse

import numpy as np
import soundfile

from ..config import WorkflowConfig
from ..errors import ConfigError
from ..io import read_bin
from ..layout import load_manifest, mel_bin, out_bin
from ..stages import infer, preprocess

LEVELS = (1, 4, 16)
LOOPBACK = ("127.0.0.1", "localhost")


def npy_bytes(mel: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(mel, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def post_mel(url: str, body: bytes, utt_id: str | None = None, content_type: str = "application/octet-stream",
             timeout: float = 120.0, headers: Mapping[str, str] | None = None) -> tuple[int, bytes, dict]:
    """POST one body (with more `headers` if given); returns (status, response body, headers). HTTP errors come
    back as their status."""
    target = f"{url}?id={quote(utt_id)}" if utt_id else url
    request = urllib.request.Request(target, data=body, method="POST",
                                     headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers or {})


def wav_samples(data: bytes) -> tuple[np.ndarray, int]:
    audio, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    return audio, rate


def offline_outputs(cfg: WorkflowConfig) -> tuple[list[tuple[str, np.ndarray]], dict[str, np.ndarray]]:
    """The run's mels and what the infer stage made of them (preprocess and infer run if not done yet)."""
    preprocess(cfg)
    infer(cfg)
    items = load_manifest(cfg.layout.mel_dir)["items"]
    mels = [(item["id"], read_bin(mel_bin(cfg.layout.mel_dir, item), tuple(item["shape"]))) for item in items]
    expected = {item["id"]: np.fromfile(out_bin(cfg.layout.out_dir, item["id"]), dtype="<f4") for item in items}
    return mels, expected


def _percentile(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


def load_level(url: str, mels: Sequence[tuple[str, np.ndarray]], clients: int, *, max_requests: int,
               max_seconds: float, expected: Mapping[str, np.ndarray] | None = None) -> dict:
    """`clients` threads send the mels round-robin until `max_requests` are done or `max_seconds` pass."""
    bodies = [(utt_id, npy_bytes(mel)) for utt_id, mel in mels]
    order = itertools.cycle(bodies)
    lock = threading.Lock()
    issued = 0
    latencies, audio_seconds, shared, errors, mismatched = [], [], [], [], []
    started = time.perf_counter()
    deadline = started + max_seconds

    def client() -> None:
        nonlocal issued
        while True:
            with lock:
                if issued >= max_requests or time.perf_counter() > deadline:
                    return
                issued += 1
                utt_id, body = next(order)
            t0 = time.perf_counter()
            status, data, headers = post_mel(url, body, utt_id)
            seconds = time.perf_counter() - t0
            with lock:
                if status != 200:
                    errors.append(f"{utt_id}: HTTP {status}: {data[:200]!r}")
                    continue
                audio, rate = wav_samples(data)
                latencies.append(seconds)
                audio_seconds.append(audio.size / rate)
                shared.append(int(headers.get("X-Batch-Requests", headers.get("x-batch-requests", 1))))
                if expected is not None and audio.astype("<f4").tobytes() != expected[utt_id].astype("<f4").tobytes():
                    mismatched.append(utt_id)

    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    elapsed = time.perf_counter() - started
    done = len(latencies)
    return {"clients": clients, "requests": done, "errors": len(errors), "error_examples": errors[:3],
            "seconds": round(elapsed, 3),
            "p50_s": _percentile(latencies, 50), "p95_s": _percentile(latencies, 95),
            "p99_s": _percentile(latencies, 99),
            "requests_per_s": round(done / elapsed, 4) if elapsed else None,
            "audio_seconds_per_s": round(sum(audio_seconds) / elapsed, 4) if elapsed else None,
            "mean_requests_per_batch": round(float(np.mean(shared)), 3) if shared else None,
            "compared": done if expected is not None else 0, "mismatched": sorted(set(mismatched))}


def load_test(url: str, mels: Sequence[tuple[str, np.ndarray]], *, levels: Sequence[int] = LEVELS,
              max_requests: int = 48, max_seconds: float = 120.0,
              expected: Mapping[str, np.ndarray] | None = None) -> dict:
    """Every concurrency level in turn against a service on this host; see the module doc."""
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ConfigError(f"load test: {url} is not on 127.0.0.1; it only loads a service on this machine")
    results = [load_level(url, mels, clients, max_requests=max_requests, max_seconds=max_seconds,
                          expected=expected) for clients in levels]
    return {"url": url, "max_requests": max_requests, "max_seconds": max_seconds, "utterances": len(mels),
            "levels": results}


def render_load_markdown(result: Mapping) -> str:
    lines = ["| clients | requests | errors | p50 s | p95 s | p99 s | req/s | audio s/s | req per batch | equal to offline |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["levels"]:
        equal = f"{r['compared'] - len(r['mismatched'])}/{r['compared']}" if r["compared"] else "-"
        lines.append(f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['p50_s']} | {r['p95_s']} | "
                     f"{r['p99_s']} | {r['requests_per_s']} | {r['audio_seconds_per_s']} | "
                     f"{r['mean_requests_per_batch']} | {equal} |")
    return "\n".join(lines)
