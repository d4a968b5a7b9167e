"""How good is the synthesised audio, and do the backends agree?

Metrics against the original recording (per utterance):
- log-mel distance: mean |log M_ref - log M_syn| over the common frames and all 80 bands, in natural-log
  units of the mel magnitude (the Tacotron2 mel the model is conditioned on). 0 = identical mels; a gain
  change by a factor g moves it by |ln g|.
- MCD (mel-cepstral distortion), computed from the same log mels:
      c_t = DCT-II_ortho(log M_t)[1 .. K]          (K = 13 coefficients, c_0 = overall level left out)
      MCD = mean_t (10 / ln 10) * sqrt(2 * sum_k (c_ref[t, k] - c_syn[t, k])^2)     [dB]
  This is Kubichek's formula applied to DCT cepstra of the mel filterbank output, not SPTK's all-pass
  warped mel-cepstra, so compare its values between runs of this workflow, not with published MCDs.
- STOI (`pystoi`, at the native rate; pystoi resamples to 10 kHz itself) and wide-band PESQ (`pesq`, after
  resampling both signals to 16 kHz): optional packages, skipped with a note when missing.
The original and the synthesised audio are aligned sample-for-sample (a vocoder keeps the timing), so no
time warping is done: both are cut to the shorter length.

Between signals that should be equal (backend parity, the round trip): `snr_db`.

The quality gate for reduced-precision paths (`quality_check` / `quality_ok`; used by the benchmark's
`auto` pick and by `precision: auto`): against fp32 with the same mel and noise, the output must be finite,
its log-mel distance ≤ MAX_LOG_MEL_DISTANCE = 0.05 (a 5 % mean deviation of the mel magnitude, ≈ 0.43 dB,
below the ~1 dB level difference a listener notices) and its SNR ≥ MIN_SNR_DB = 20 dB.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .config import STFTConfig, WorkflowConfig
from .provenance import run_provenance

#: SNR of identical signals is infinite; report this instead so metrics.json holds plain numbers
SNR_CAP_DB = 200.0
#: cepstral coefficients c_1 .. c_K used by MCD
MCD_COEFFS = 13
#: where `throughput_table` keeps its rows in the run folder (collected into metrics.json)
THROUGHPUT_FILE = "throughput.json"
#: PESQ is defined at 8 kHz (narrow band) and 16 kHz (wide band); we use wide band
PESQ_RATE = 16000
_MCD_SCALE = 10.0 / math.log(10.0) * math.sqrt(2.0)
#: the quality gate (module docstring)
MAX_LOG_MEL_DISTANCE = 0.05
MIN_SNR_DB = 20.0


# --- signal-level helpers -------------------------------------------------------------------------
def _as_1d(x: Any, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().float().numpy()
    arr = np.asarray(x, dtype=np.float64)
    arr = np.squeeze(arr)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{what}: expected a non-empty 1-D signal, got shape {np.shape(x)}")
    return arr


def _common_length(reference: Any, estimate: Any) -> tuple[np.ndarray, np.ndarray]:
    ref, est = _as_1d(reference, "reference"), _as_1d(estimate, "estimate")
    n = min(ref.size, est.size)
    return ref[:n], est[:n]


def snr_db(reference: Any, estimate: Any) -> float:
    """10·log10(Σ ref² / Σ (ref − est)²) over the common length, capped at SNR_CAP_DB."""
    ref, est = _common_length(reference, estimate)
    signal = float(np.sum(ref * ref))
    noise = float(np.sum((ref - est) ** 2))
    if signal == 0.0:
        raise ValueError("snr_db: the reference signal is all zeros")
    if noise == 0.0:
        return SNR_CAP_DB
    return min(SNR_CAP_DB, 10.0 * math.log10(signal / noise))


# --- mel-level metrics ----------------------------------------------------------------------------
def _common_frames(mel_ref: Any, mel_est: Any) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(mel_ref.detach().cpu() if hasattr(mel_ref, "detach") else mel_ref, dtype=np.float64)
    b = np.asarray(mel_est.detach().cpu() if hasattr(mel_est, "detach") else mel_est, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"expected two [n_mel, frames] log mels with the same n_mel, got {a.shape} and {b.shape}")
    t = min(a.shape[1], b.shape[1])
    if t == 0:
        raise ValueError("a log mel has no frames")
    return a[:, :t], b[:, :t]


def log_mel_distance(mel_ref: Any, mel_est: Any) -> float:
    """Mean absolute difference of two log mels [n_mel, frames] over their common frames."""
    a, b = _common_frames(mel_ref, mel_est)
    return float(np.mean(np.abs(a - b)))


def mel_cepstrum(log_mel: Any, n_coeffs: int = MCD_COEFFS) -> np.ndarray:
    """c_1 .. c_K of the orthonormal DCT-II along the mel axis: [n_coeffs, frames]."""
    from scipy.fft import dct

    mel = np.asarray(log_mel, dtype=np.float64)
    if not 1 <= n_coeffs < mel.shape[0]:
        raise ValueError(f"n_coeffs must be in 1..{mel.shape[0] - 1}, got {n_coeffs}")
    return dct(mel, type=2, norm="ortho", axis=0)[1:n_coeffs + 1]


def mel_cepstral_distortion(mel_ref: Any, mel_est: Any, n_coeffs: int = MCD_COEFFS) -> float:
    """MCD in dB from two log mels (formula in the module docstring)."""
    a, b = _common_frames(mel_ref, mel_est)
    diff = mel_cepstrum(a, n_coeffs) - mel_cepstrum(b, n_coeffs)
    return float(np.mean(_MCD_SCALE * np.sqrt(np.sum(diff * diff, axis=0))))


# --- optional perceptual metrics ------------------------------------------------------------------
def _optional(module: str, metric: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{metric} needs the '{module}' package: pip install {module} "
                          "(or the project's [metrics] extra)") from None


def stoi_score(reference: Any, estimate: Any, sample_rate: int, extended: bool = False) -> float:
    """Short-time objective intelligibility in [0, 1] (pystoi)."""
    pystoi = _optional("pystoi", "STOI")
    ref, est = _common_length(reference, estimate)
    try:
        return float(pystoi.stoi(ref, est, sample_rate, extended=extended))
    except Exception as exc:  # e.g. too short for one of its 30-frame segments once silence is removed
        raise ValueError(f"STOI could not score this pair: {type(exc).__name__}: {exc}") from None


def pesq_score(reference: Any, estimate: Any, sample_rate: int) -> float:
    """Wide-band PESQ (MOS-LQO, about 1.0 … 4.64) after resampling both signals to 16 kHz."""
    pesq = _optional("pesq", "PESQ")
    from .audio import resample

    ref, est = _common_length(reference, estimate)
    ref16, est16 = resample(ref, sample_rate, PESQ_RATE), resample(est, sample_rate, PESQ_RATE)
    try:
        return float(pesq.pesq(PESQ_RATE, ref16, est16, "wb"))
    except Exception as exc:  # pesq raises its own error types (no utterance found, buffer too short)
        raise ValueError(f"PESQ could not score this pair: {type(exc).__name__}: {exc}") from None


def quality_check(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray],
                  stft: STFTConfig = STFTConfig()) -> dict[str, Any]:
    """SNR (all utterances joined) and mean log-mel distance of `outputs` against `reference` (fp32, same
    noise), and whether every output is finite: the inputs of `quality_ok`."""
    from .audio import mel_spectrogram

    if not all(np.isfinite(o).all() for o in outputs):
        return {"snr_db": None, "log_mel_distance": None, "finite": False}
    try:
        snr = snr_db(np.concatenate(reference), np.concatenate(outputs))
    except ValueError:  # an all-zero reference
        snr = None
    lmd = float(np.mean([log_mel_distance(mel_spectrogram(r, stft), mel_spectrogram(o, stft))
                         for r, o in zip(reference, outputs)]))
    return {"snr_db": round(snr, 2) if snr is not None else None, "log_mel_distance": round(lmd, 5), "finite": True}


def quality_ok(quality: Mapping[str, Any]) -> bool:
    """The gate: finite audio, log-mel distance ≤ MAX_LOG_MEL_DISTANCE, SNR ≥ MIN_SNR_DB (vs fp32)."""
    return bool(quality.get("finite")) and quality.get("log_mel_distance") is not None \
        and quality["log_mel_distance"] <= MAX_LOG_MEL_DISTANCE \
        and (quality.get("snr_db") is None or quality["snr_db"] >= MIN_SNR_DB)


def quality_metrics(reference: Any, estimate: Any, sample_rate: int = 22050,
                    stft: STFTConfig = STFTConfig(), perceptual: bool = True) -> dict[str, Any]:
    """All per-utterance metrics of `estimate` against `reference` (both mono float audio).

    Perceptual metrics whose package is missing (or that cannot score the pair) are None, with the reason
    in `notes`, so one missing extra never stops an evaluation.
    """
    from .audio import mel_spectrogram

    ref, est = _common_length(reference, estimate)
    mel_ref = mel_spectrogram(ref.astype(np.float32), stft)
    mel_est = mel_spectrogram(est.astype(np.float32), stft)
    result: dict[str, Any] = {
        "seconds": ref.size / sample_rate,
        "log_mel_distance": log_mel_distance(mel_ref, mel_est),
        "mcd_db": mel_cepstral_distortion(mel_ref, mel_est),
        "stoi": None,
        "pesq": None,
        "notes": [],
    }
    if perceptual:
        for key, fn in (("stoi", stoi_score), ("pesq", pesq_score)):
            try:
                result[key] = fn(ref, est, sample_rate)
            except (ImportError, ValueError) as exc:
                result["notes"].append(str(exc))
    return result


# --- backend parity and the round trip ------------------------------------------------------------
def parity_table(outputs: Mapping[str, Sequence[Any]], reference: str) -> list[dict[str, Any]]:
    """One row per backend: SNR (dB) and max |difference| against `reference`, over the same utterances.

    `outputs[name]` holds that backend's audio for each utterance, in the same order and made from the same
    mel and noise, so any difference is the backend's arithmetic.
    """
    if reference not in outputs:
        raise ValueError(f"reference backend {reference!r} has no outputs (have: {', '.join(outputs)})")
    ref = outputs[reference]
    rows = []
    for name, audios in outputs.items():
        if len(audios) != len(ref):
            raise ValueError(f"backend {name!r} has {len(audios)} outputs, {reference!r} has {len(ref)}")
        pairs = [_common_length(r, a) for r, a in zip(ref, audios)]
        snrs = [snr_db(r, a) for r, a in pairs]
        rows.append({
            "backend": name,
            "reference": reference,
            "utterances": len(pairs),
            "snr_db_min": min(snrs),
            "snr_db_mean": float(np.mean(snrs)),
            "max_abs_diff": max(float(np.max(np.abs(r - a))) for r, a in pairs),
        })
    return rows


def round_trip(model: Any, audio: Any, stft: STFTConfig = STFTConfig()) -> dict[str, Any]:
    """audio → mel → `noise_from_audio` → `infer(sigma=1)`: the flow is invertible, so the audio comes back.

    This holds for any weights (the untrained demo model too), which makes it the check that the model, its
    inverse and the mel front-end fit together. Returns the trimmed input, the reconstruction and their SNR.
    """
    import torch

    from .audio import mel_spectrogram

    x = _as_1d(audio, "audio").astype(np.float32)
    hop = int(model.hop_length)
    frames = x.size // hop
    if frames < 1:
        raise ValueError(f"round_trip: audio has {x.size} samples, fewer than one hop ({hop})")
    x = x[:frames * hop]
    mel = mel_spectrogram(x, stft)[:, :frames]
    param = next(model.parameters())
    mel_t = torch.from_numpy(np.ascontiguousarray(mel))[None].to(param.device, param.dtype)
    audio_t = torch.from_numpy(x)[None].to(param.device, param.dtype)
    with torch.no_grad():
        z = model.noise_from_audio(mel_t, audio_t)
        back = model.infer(mel_t, sigma=1.0, z=z)
    back_np = back[0].detach().float().cpu().numpy()
    return {
        "audio": x,
        "reconstructed": back_np,
        "seconds": x.size / stft.sampling_rate,
        "snr_db": snr_db(x, back_np),
        "log_mel_distance": log_mel_distance(mel, mel_spectrogram(back_np.astype(np.float32), stft)[:, :frames]),
    }


# --- over a run folder ----------------------------------------------------------------------------
def _run_items(cfg: WorkflowConfig) -> tuple[dict, list[dict]]:
    from .stages.preprocess import load_manifest

    manifest = load_manifest(cfg.run_dir / "mel")
    return manifest, manifest["items"]


def _run_stft(manifest: Mapping[str, Any]) -> STFTConfig:
    """The STFT settings the run's mels were made with (recorded by preprocess)."""
    stft = manifest.get("settings", {}).get("stft")
    return STFTConfig(**stft) if stft else STFTConfig()


def evaluate_run(cfg: WorkflowConfig, perceptual: bool | None = None) -> list[dict[str, Any]]:
    """Per utterance of the run: `quality_metrics` of `wav/<id>_syn.wav` against the original wav.

    `perceptual` (STOI, PESQ) defaults to `cfg.metrics`.
    """
    from tqdm.auto import tqdm

    from .audio import load_wav

    manifest, items = _run_items(cfg)
    stft = _run_stft(manifest)
    rate = stft.sampling_rate
    wav_dir = cfg.run_dir / "wav"
    rows = []
    for item in tqdm(items, desc="evaluate", unit="utt"):
        syn_path = wav_dir / f"{item['id']}_syn.wav"
        if not syn_path.is_file():
            raise FileNotFoundError(f"{syn_path}: synthesised wav not found; run the postprocess stage first")
        reference, _ = load_wav(item["wav"], expected_rate=rate, resample=cfg.resample, downmix=cfg.downmix)
        synthesised, _ = load_wav(syn_path, expected_rate=rate)
        metrics = quality_metrics(reference, synthesised, rate, stft,
                                  perceptual=cfg.metrics if perceptual is None else perceptual)
        rows.append({"id": item["id"], **metrics})
    return rows


def usable_backends(cfg: WorkflowConfig) -> list[str]:
    """The backends that can run this run's model here: installed, and their model file made."""
    from .backends import available_backends
    from .stages.infer import model_files

    files = model_files(cfg)
    needs = {"torch": None, "onnxruntime": files["onnx"], "openvino": files["onnx"], "om": files["om"]}
    return [name for name, (ok, _) in available_backends().items()
            if ok and (needs.get(name) is None or needs[name].is_file())]


def backend_outputs(cfg: WorkflowConfig, names: Sequence[str] | None = None, *, model: Any = None,
                    n_utterances: int = 2, precision: str = "fp32") -> dict[str, list[np.ndarray]]:
    """Audio of the run's `n_utterances` shortest utterances from each backend, all fed the same mel and noise.

    The backends are opened the way the infer stage opens them (same files, same padding and trimming),
    at `precision` (fp32 by default: parity is about the backends' arithmetic, not reduced precision).
    The shortest utterances keep this quick; any utterance shows the same arithmetic differences. The `om`
    backend runs on `cfg.device`; on an NPU run the others run on the CPU (the reference stays PyTorch fp32).
    """
    from .io import read_bin
    from .stages.infer import open_backend, resolve_model_config, utterance_noise, vocode

    manifest, items = _run_items(cfg)
    items = sorted(items, key=lambda item: (int(item["mel_frames"]), item["id"]))[:n_utterances]
    names = list(names) if names is not None else usable_backends(cfg)
    config = resolve_model_config(cfg, model)
    mel_dir = cfg.run_dir / "mel"
    mels = [read_bin(mel_dir / item.get("bin", f"{item['id']}.bin"), tuple(item["shape"])) for item in items]
    noises = [utterance_noise(config, int(item["mel_frames"]), cfg.seed, item["id"]) for item in items]
    pad = float(np.log(_run_stft(manifest).clip_val))
    outputs: dict[str, list[np.ndarray]] = {}
    for name in names:
        device = "cpu" if cfg.device.startswith("npu") and name != "om" else cfg.device
        run_cfg = cfg.with_overrides(precision=precision, device=device)
        backend = open_backend(run_cfg, model=model, model_config=config, name=name)
        try:
            outputs[name] = [vocode(backend, [m], [z], cfg.sigma, config, pad_value=pad)[0][0]
                             for m, z in zip(mels, noises)]
        finally:
            backend.close()
    return outputs


def throughput_table(cfg: WorkflowConfig, batch_sizes: Sequence[int] | None = None, *, backend: str | None = None,
                     model: Any = None, repeats: int = 1) -> list[dict[str, Any]]:
    """Utterances/s (the guide's unit), audio-seconds/s and real-time factor by batch size, on this run's
    utterances and backend, batched exactly as the infer stage batches them.

    Real-time factor = processing seconds / audio seconds (below 1 is faster than real time). Each batch
    size (default `cfg.bench_batch_sizes`) is timed `repeats` times after one warm-up batch; the median
    counts. One pass by default: this is the notebook's quick look, the bench harness does the repeats. The rows are saved to runs/<name>/throughput.json. For the full harness (peers, precisions,
    the guide's workload) see `python -m waveglow_lib bench`.
    """
    import statistics
    import time

    from .io import read_bin
    from .stages.infer import (Utterance, backend_name, open_backend, plan_batches, resolve_model_config,
                               utterance_noise, vocode)

    manifest, items = _run_items(cfg)
    config = resolve_model_config(cfg, model)
    name = backend or backend_name(cfg)
    hop, rate = config.hop_length, _run_stft(manifest).sampling_rate
    pad = float(np.log(_run_stft(manifest).clip_val))
    mel_dir = cfg.run_dir / "mel"
    utterances = [Utterance(item["id"], int(item["mel_frames"]), mel_dir / item.get("bin", f"{item['id']}.bin"))
                  for item in items]
    mels = {u.id: read_bin(u.bin_path, (config.n_mel_channels, u.frames)) for u in utterances}
    noises = {u.id: utterance_noise(config, u.frames, cfg.seed, u.id) for u in utterances}
    audio_seconds = sum(u.frames * hop for u in utterances) / rate
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
                         "utterances": len(utterances), "seconds": seconds,
                         "utterances_per_second": len(utterances) / seconds,
                         "audio_seconds_per_second": audio_seconds / seconds,
                         "real_time_factor": seconds / audio_seconds})
    finally:
        runner.close()
    from .io import atomic_write_json

    atomic_write_json(cfg.run_dir / THROUGHPUT_FILE, rows)
    return rows


def guide_throughput_rows(measured: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The guide's table layout: one row per batch size, utterances/s here beside the guide's devices."""
    from .config import GUIDE_THROUGHPUT

    sizes = sorted({int(r["batch_size"]) for r in measured} | {b for t in GUIDE_THROUGHPUT.values() for b in t})
    by_size = {int(r["batch_size"]): r for r in measured}
    rows = []
    for size in sizes:
        here = by_size.get(size, {})
        row = {"batch": f"batch{size}", "this machine (utt/s)": here.get("utterances_per_second"),
               "audio s/s": here.get("audio_seconds_per_second"), "real-time factor": here.get("real_time_factor")}
        row.update({device: table.get(size) for device, table in GUIDE_THROUGHPUT.items()})
        rows.append(row)
    return rows


# --- metrics.json ---------------------------------------------------------------------------------
def summarise(utterances: Sequence[Mapping[str, Any]],
              keys: Sequence[str] = ("log_mel_distance", "mcd_db", "stoi", "pesq")) -> dict[str, Any]:
    """Mean of each metric over the utterances that have a finite value of it (None where none has)."""
    summary: dict[str, Any] = {"utterances": len(utterances)}
    for key in keys:
        values = [u[key] for u in utterances if u.get(key) is not None and math.isfinite(u[key])]
        summary[key] = float(np.mean(values)) if values else None
    return summary


def _finite_or_none(obj: Any) -> Any:
    """JSON has no NaN/Infinity: store such values as null rather than writing invalid JSON."""
    if isinstance(obj, Mapping):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def collect_metrics(cfg: WorkflowConfig, *, utterances: Sequence[Mapping[str, Any]] | None = None,
                    parity: Sequence[Mapping[str, Any]] | None = None,
                    round_trip: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Gather a run's numbers into runs/<name>/metrics.json (written atomically) and return them.

    Sections already computed (the notebooks compute them once to show them) are passed in; arrays in
    them (e.g. the round trip's audio) are left out of the file. `utterances` defaults to the per-utterance
    quality of the run's synthesised audio against the originals (`evaluate_run`); the throughput rows
    `throughput_table` saved are included when present.
    """
    import json

    from .io import atomic_write_json

    if utterances is None:
        utterances = evaluate_run(cfg)
    record: dict[str, Any] = {
        "name": cfg.name,
        "backend": cfg.backend,
        "precision": cfg.precision,
        "sigma": cfg.sigma,
        "seed": cfg.seed,
        "summary": summarise(utterances),
        "utterances": [dict(u) for u in utterances],
    }
    if parity is not None:
        record["parity"] = [dict(row) for row in parity]
    if round_trip is not None:
        record["round_trip"] = {k: v for k, v in round_trip.items() if not isinstance(v, np.ndarray)}
    from .stages.infer import TIMINGS_FILE

    timings_path = cfg.run_dir / "out" / TIMINGS_FILE  # what `auto` became in the infer stage
    if timings_path.is_file():
        settings = json.loads(timings_path.read_text()).get("settings", {})
        record.update({k: settings[k] for k in ("backend_used", "precision_used") if k in settings})
    throughput_path = cfg.run_dir / THROUGHPUT_FILE
    if throughput_path.is_file():
        record["throughput"] = json.loads(throughput_path.read_text())
    record.update(run_provenance(cfg))   # checkpoint, demo or not, backend/precision used, machine, commit
    if extra:
        record.update(extra)
    record = _finite_or_none(record)
    atomic_write_json(cfg.run_dir / "metrics.json", record)
    return record
