"""`precision: auto`: the fastest precision this CPU runs natively that also passes the quality gate.

int8 (VNNI or AMX-INT8; only for WN layers of at least INT8_MIN_CHANNELS, where it beats bf16), then bf16
(AVX512-BF16 or AMX), each checked against the fp32 model with the same noise on a probe of real speech —
the bundled demo corpus's first wav — with `metrics.quality_ok`; else fp32. On a CPU with AMX-BF16, bf16
comes first (`precision_order`): its tiles make the GEMMs so short that int8's fp32 passes between them
(sigmoid, gate, quantisation) cost more than int8 saves, and bf16 quantises nothing (measured on every
length and with a core kept busy: docs/benchmarks.md, "Figures behind constants"). The verdict and the
probe's numbers are kept with the engine.
"""
from __future__ import annotations

import numpy as np
import torch

from ...hardware import cpu_flags, native_bf16, native_int8
from ...metrics import MAX_LOG_MEL_DISTANCE, MIN_SNR_DB, quality_check, quality_ok
from .cache import EngineCache
from .engine import FastEngine, LoadTimes
from .probe import PROBE_FRAMES, PROBE_SIGMA, probe_mel
#: `auto` tries int8 only for WN layers this wide: the demo model's ran faster in int8 than in bf16
#: (docs/benchmarks.md, "Figures behind constants"); narrower layers, not measured, may lose int8's gain to
#: the quantisation of their activations
INT8_MIN_CHANNELS = 48


@torch.inference_mode()
def probe_reference(model, frames: int = PROBE_FRAMES) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(mel, noise, audio): the probe mel, its noise, and the fp32 model's audio for them (`model.forward`,
    NVIDIA's algorithm): computed once, then every engine tried is compared with it (`probe_quality`)."""
    mel = probe_mel(model.config.n_mel_channels, frames)
    generator = torch.Generator().manual_seed(0)
    z = PROBE_SIGMA * torch.randn(model.noise_shape(1, mel.shape[2]), generator=generator)
    dtype = next(model.parameters()).dtype
    return mel, z, model.forward(mel.to(dtype), z.to(dtype)).float().reshape(-1).numpy()


def probe_quality(engine: "FastEngine", probe: tuple[torch.Tensor, torch.Tensor, np.ndarray]) -> dict:
    """`engine` against the fp32 audio of `probe_reference`, same mel and noise: `metrics.quality_check`'s
    SNR / log-mel distance / finite."""
    mel, z, reference = probe
    return quality_check([reference], [engine.run(mel, z).reshape(-1)])


def precision_order(flags: set[str]) -> tuple[str, ...]:
    """The reduced precisions `auto` tries, fastest first: int8's GEMMs have twice bf16's peak with VNNI and
    AVX512-BF16; on a CPU with AMX-BF16, bf16 first (see the module doc)."""
    return ("bf16", "int8") if "amx_bf16" in flags else ("int8", "bf16")


def probe_settings(flags: set[str]) -> dict:
    """What a stored verdict depends on besides the model and the machine (the cache's key); `flags`: the
    CPU's (`hardware.cpu_flags`)."""
    return {"frames": PROBE_FRAMES, "sigma": PROBE_SIGMA, "int8_min_channels": INT8_MIN_CHANNELS,
            "order": list(precision_order(flags)),
            "gate": {"max_log_mel_distance": MAX_LOG_MEL_DISTANCE, "min_snr_db": MIN_SNR_DB}}


def auto_engine(model, cache: EngineCache | None = None, **options) -> tuple["FastEngine", dict]:
    """`precision: auto`: the fastest of int8 (for models of ≥ INT8_MIN_CHANNELS WN channels), bf16 that
    this CPU runs natively and that passes the quality gate on the probe, else fp32. Returns (engine,
    record): the precision chosen, why, and the probe numbers of every precision tried (`tried`).
    `cache`: an `EngineCache`: a verdict stored for this model on this machine is reused (no probe;
    `record["cached"]` is True) and engines come from / go to it. `options`: FastEngine's block_frames /
    threads. `engine.load_times`: the seconds of every engine built or read here, and of the probe."""
    times = LoadTimes()

    def build(precision: str) -> FastEngine:
        engine = cache.engine(model, precision, **options) if cache is not None else FastEngine(model, precision, **options)
        for phase, seconds in engine.load_times.items():
            times[phase] = times.get(phase, 0.0) + seconds
        engine.load_times = times
        return engine

    flags = cpu_flags()
    settings = probe_settings(flags)
    if cache is not None:
        with times.phase("fingerprint"):  # computed once, here: the verdict's key and the engines' need it
            cache.fingerprint(model)
        record = cache.verdict(model, settings)
        if record is not None:
            return build(record["precision"]), {**record, "cached": True}
    tried, skipped, probe = {}, [], None
    record = None
    candidates = {"int8": (native_int8, "int8 dot products (VNNI / AMX-INT8)"),
                  "bf16": (native_bf16, "native bf16 (AVX512-BF16 / AMX)")}
    for precision in precision_order(flags):
        native, hardware = candidates[precision]
        if not native():
            skipped.append(f"no {hardware} on this CPU")
            continue
        if precision == "int8" and model.config.n_channels < INT8_MIN_CHANNELS:
            skipped.append(f"int8 not faster for {model.config.n_channels} WN channels (< {INT8_MIN_CHANNELS})")
            continue
        engine = build(precision)
        if probe is None:
            with times.phase("probe_reference"):
                probe = probe_reference(model)
        with times.phase("probe_run"):
            tried[precision] = quality = probe_quality(engine, probe)
        if quality_ok(quality):
            why = "native, quality gate passed on the probe"
            if precision == "bf16" and "amx_bf16" in flags:
                why += " (AMX-BF16: bf16 before int8)"
            record = {"precision": precision, "reason": "; ".join(
                skipped + [f"{p} failed the quality gate" for p in tried if not quality_ok(tried[p])]
                + [f"{precision}: {why}"]), **quality, "tried": tried}
            break
        engine = None  # a failed engine's packed weights go before the next ones are built
    if record is None:
        reasons = skipped + [f"{p} failed the quality gate on the probe" for p in tried]
        engine = build("fp32")
        record = {"precision": "fp32", "reason": "; ".join(reasons), "tried": tried}
    if cache is not None:
        cache.store_verdict(model, settings, record)
    return engine, {**record, "cached": False}
