"""`fast` backend (CPU): our folded WaveGlow (`fold.py`) on blocked GEMMs (`engine.py`), with the
`precision: auto` policy (`auto.py`).

No export needed: it is built from the PyTorch model at load time. Same inputs and outputs as every
backend, so its audio is compared sample by sample.
"""
from __future__ import annotations

import numpy as np

from ..base import Backend, BackendError, ModelSpec
from .auto import INT8_MIN_CHANNELS, auto_engine, probe_quality, probe_reference
from .cache import CACHE_ENV, EngineCache, default_cache_dir, resolve_cache_dir
from .engine import PRECISIONS as ENGINE_PRECISIONS
from .engine import FastEngine, choose_threads
from .fold import FastWaveGlow, FastWN, fold_waveglow, fold_wn

__all__ = ["FastBackend", "FastEngine", "FastWaveGlow", "FastWN", "fold_waveglow", "fold_wn", "auto_engine",
           "probe_quality", "probe_reference", "INT8_MIN_CHANNELS", "ENGINE_PRECISIONS", "EngineCache", "CACHE_ENV",
           "default_cache_dir", "resolve_cache_dir", "choose_threads"]

PRECISIONS = ("fp32", "bf16", "int8", "auto")


class FastBackend(Backend):
    """`FastEngine(model, precision, threads=, block_frames=)`; int8 needs VNNI or AMX-INT8 (else bf16), bf16
    needs AVX512-BF16 or AMX (else fp32); a fallback is said in `description` (and `precision`).
    `precision="auto"`: the fastest native precision (int8, bf16) that passes the quality gate on a probe of
    speech (`fast.auto_engine`), else fp32; `self.probe` holds the verdict.
    `cache_dir`: the engine cache (`fast.cache`): None or "" = the default folder ($WAVEGLOW_CACHE_DIR or
    ~/.cache/waveglow-workflow), "off" = build every time; `self.cache_events` says whether it hit, and
    `self.load_times` where the load's seconds went (fold, arrays, pack, store, probe; read, verify, parse)."""

    name = "fast"

    def __init__(self, model, device: str = "cpu", precision: str = "bf16", threads: int | None = None,
                 block_frames: int | None = None, cache_dir=None) -> None:
        if model is None:
            raise BackendError("fast backend needs the model: get_backend('fast', model=load_waveglow(...))")
        if str(device or "cpu") != "cpu":
            raise BackendError(f"fast backend: device {device!r} not supported (cpu only; on CUDA use torch)")
        if precision not in PRECISIONS:
            raise BackendError(f"fast backend: precision {precision!r} not supported (one of {', '.join(PRECISIONS)})")
        super().__init__(ModelSpec.from_model_config(model.config), precision, device)
        self.probe: dict | None = None
        root = resolve_cache_dir(cache_dir)
        cache = EngineCache(root) if root is not None else None
        options = {"block_frames": block_frames, "threads": threads}
        if precision == "auto":
            self.engine, self.probe = auto_engine(model, cache=cache, **options)
            note = f" (auto: {self.probe['reason']}" + (
                f", probe SNR {self.probe['snr_db']} dB, log-mel distance {self.probe['log_mel_distance']}"
                if "log_mel_distance" in self.probe else "") + ("; verdict cached" if self.probe["cached"] else "") + ")"
        else:
            self.engine = (cache.engine(model, precision, **options) if cache is not None
                           else FastEngine(model, precision=precision, **options))
            note = "" if self.engine.precision == precision else f" (asked {precision}: not native on this CPU)"
        self.cache_events = cache.events if cache is not None else []
        self.load_times = self.engine.load_times.rounded()  # seconds per phase (`engine.LoadTimes`)
        self.precision = self.engine.precision
        cached = " (engine from cache)" if self.cache_events[-1:] == ["hit"] else ""
        self.description = (f"fast: folded WaveGlow, blocked GEMMs, {self.engine.precision}{note}{cached}, "
                            f"up to {self.engine.threads} threads (as many as are free per run)")

    def _run(self, mel: np.ndarray, z: np.ndarray) -> np.ndarray:
        return self.engine.run(mel, z)

    def run_utterances(self, mels: list[np.ndarray], zs: list[np.ndarray]) -> list[np.ndarray]:
        """A batch without padding: mels [n_mel, T_i], zs [n_group, T_i·hop/n_group] (complete, sigma-scaled)
        → audio [T_i·hop] each, equal to running each utterance alone within `engine.PACKED_MIN_SNR_DB`
        (`batching.vocode` uses it: no padded frames are computed and no tails need recomputing)."""
        for mel, z in zip(mels, zs, strict=True):
            self.check_inputs(mel[None], z[None])
        return [np.asarray(a, dtype=np.float32) for a in self.engine.run_utterances(mels, zs)]

    def close(self) -> None:
        self.engine = None
