"""Numbers that compare two signals; they need only audio (and the mel front-end), never a model.

Against the original recording (per utterance):
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

Between signals that should be equal (backend parity, the round trip, chunked vs one-shot): `snr_db`.

The quality gate for reduced-precision paths (`quality_check` / `quality_ok`; used by the benchmark's
`auto` pick and by `precision: auto`): against fp32 with the same mel and noise, the output must be finite,
its log-mel distance ≤ MAX_LOG_MEL_DISTANCE = 0.05 (a 5 % mean deviation of the mel magnitude, ≈ 0.43 dB,
below the ~1 dB level difference a listener notices) and its SNR ≥ MIN_SNR_DB = 20 dB.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from scipy.fft import dct

from .audio import mel_spectrogram, resample
from .config import STFTConfig
from .errors import MetricError

#: SNR of identical signals is infinite; report this instead so metrics.json holds plain numbers
SNR_CAP_DB = 200.0
#: cepstral coefficients c_1 .. c_K used by MCD
MCD_COEFFS = 13
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
        raise MetricError(f"{what}: expected a non-empty 1-D signal, got shape {np.shape(x)}")
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
        raise MetricError("snr_db: the reference signal is all zeros")
    if noise == 0.0:
        return SNR_CAP_DB
    return min(SNR_CAP_DB, 10.0 * math.log10(signal / noise))


# --- mel-level metrics ----------------------------------------------------------------------------
def _common_frames(mel_ref: Any, mel_est: Any) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(mel_ref.detach().cpu() if hasattr(mel_ref, "detach") else mel_ref, dtype=np.float64)
    b = np.asarray(mel_est.detach().cpu() if hasattr(mel_est, "detach") else mel_est, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise MetricError(f"expected two [n_mel, frames] log mels with the same n_mel, got {a.shape} and {b.shape}")
    t = min(a.shape[1], b.shape[1])
    if t == 0:
        raise MetricError("a log mel has no frames")
    return a[:, :t], b[:, :t]


def log_mel_distance(mel_ref: Any, mel_est: Any) -> float:
    """Mean absolute difference of two log mels [n_mel, frames] over their common frames."""
    a, b = _common_frames(mel_ref, mel_est)
    return float(np.mean(np.abs(a - b)))


def mel_cepstrum(log_mel: Any, n_coeffs: int = MCD_COEFFS) -> np.ndarray:
    """c_1 .. c_K of the orthonormal DCT-II along the mel axis: [n_coeffs, frames]."""
    mel = np.asarray(log_mel, dtype=np.float64)
    if not 1 <= n_coeffs < mel.shape[0]:
        raise MetricError(f"n_coeffs must be in 1..{mel.shape[0] - 1}, got {n_coeffs}")
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
        raise MetricError(f"STOI could not score this pair: {type(exc).__name__}: {exc}") from None


def pesq_score(reference: Any, estimate: Any, sample_rate: int) -> float:
    """Wide-band PESQ (MOS-LQO, about 1.0 … 4.64) after resampling both signals to 16 kHz."""
    pesq = _optional("pesq", "PESQ")
    ref, est = _common_length(reference, estimate)
    ref16, est16 = resample(ref, sample_rate, PESQ_RATE), resample(est, sample_rate, PESQ_RATE)
    try:
        return float(pesq.pesq(PESQ_RATE, ref16, est16, "wb"))
    except Exception as exc:  # pesq raises its own error types (no utterance found, buffer too short)
        raise MetricError(f"PESQ could not score this pair: {type(exc).__name__}: {exc}") from None


def quality_check(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray],
                  stft: STFTConfig = STFTConfig()) -> dict[str, Any]:
    """SNR (all utterances joined) and mean log-mel distance of `outputs` against `reference` (fp32, same
    noise), and whether every output is finite: the inputs of `quality_ok`."""
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


def quality_metrics(reference: Any, estimate: Any, sample_rate: int = STFTConfig().sampling_rate,
                    stft: STFTConfig = STFTConfig(), perceptual: bool = True) -> dict[str, Any]:
    """All per-utterance metrics of `estimate` against `reference` (both mono float audio).

    Perceptual metrics whose package is missing (or that cannot score the pair) are None, with the reason
    in `notes`, so one missing extra never stops an evaluation.
    """
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


# --- backend parity ------------------------------------------------------------------------------
def parity_table(outputs: Mapping[str, Sequence[Any]], reference: str) -> list[dict[str, Any]]:
    """One row per backend: SNR (dB) and max |difference| against `reference`, over the same utterances.

    `outputs[name]` holds that backend's audio for each utterance, in the same order and made from the same
    mel and noise, so any difference is the backend's arithmetic.
    """
    if reference not in outputs:
        raise MetricError(f"reference backend {reference!r} has no outputs (have: {', '.join(outputs)})")
    ref = outputs[reference]
    rows = []
    for name, audios in outputs.items():
        if len(audios) != len(ref):
            raise MetricError(f"backend {name!r} has {len(audios)} outputs, {reference!r} has {len(ref)}")
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
