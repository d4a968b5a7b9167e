"""Stage 5, postprocess: `out/<id>_out.bin` (float32 audio) → `wav/<id>_syn.wav` (22050 Hz int16).

The guide multiplies by 32768 and casts: a full-scale +1.0 then wraps to −32768 (a click at full
amplitude). Here the audio is clipped to [-1, 1] and scaled by 32767, rounded to nearest.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from scipy.io import wavfile
from tqdm.auto import tqdm

from ..checkpoint import load_waveglow
from ..config import STFTConfig, WorkflowConfig
from ..denoiser import Denoiser
from ..errors import DataError, InputNotFound
from ..io import atomic_write_bytes, atomic_write_json, read_bin, sha256_bytes
from ..layout import load_manifest, out_bin, syn_wav

INT16_SCALE = 32767


def to_int16(audio: np.ndarray) -> np.ndarray:
    """float audio → int16 PCM: clip to [-1, 1], ×32767, round (no wrap-around at +1.0)."""
    audio = np.asarray(audio, dtype=np.float32)
    return np.rint(np.clip(audio, -1.0, 1.0) * INT16_SCALE).astype(np.int16)


def wav_bytes(audio: np.ndarray, sample_rate: int = 22050) -> bytes:
    """A complete int16 mono .wav file in memory (written atomically by the caller)."""
    buffer = io.BytesIO()
    wavfile.write(buffer, sample_rate, to_int16(audio))
    return buffer.getvalue()


def postprocess(cfg: WorkflowConfig, *, out_dir: str | Path | None = None, wav_dir: str | Path | None = None,
                model=None, denoiser=None, trim: bool = True, force: bool = False) -> dict:
    """Convert every utterance of the manifest whose `<id>_out.bin` exists into `<id>_syn.wav`.

    - `cfg.denoiser_strength > 0` applies NVIDIA's denoiser (bias spectrum of the same model); pass
      `denoiser=` to reuse one, or `model=` to build it without reloading the checkpoint.
    - `trim`: cut the vocoder's `frames × 256` samples back to the source wav's sample count (the `.txt`
      preprocess wrote), so synthesised and reference audio align sample for sample.
    - Finished wavs made from the same `.bin` with the same settings are skipped (`wav/postprocess.json`).
    """
    layout = cfg.layout
    out_dir = Path(out_dir) if out_dir else layout.out_dir
    wav_dir = Path(wav_dir) if wav_dir else layout.wav_dir
    manifest = load_manifest(layout.mel_dir)
    hop = int(manifest.get("hop_length", STFTConfig().hop_length))
    rate = int(manifest.get("sampling_rate", STFTConfig().sampling_rate))
    record_path = wav_dir / "postprocess.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() and not force else {}
    items_record = record.get("items", {})
    strength = float(cfg.denoiser_strength)
    if strength > 0 and denoiser is None:
        if model is None:
            model = load_waveglow(cfg.checkpoint_path)
        denoiser = Denoiser.from_model(model)
    written, skipped, missing = [], [], []
    wav_dir.mkdir(parents=True, exist_ok=True)
    for item in tqdm(manifest["items"], desc="postprocess", unit="utt"):
        utt_id = item["id"]
        src = out_bin(out_dir, utt_id)
        dst = syn_wav(wav_dir, utt_id)
        if not src.is_file():
            missing.append(utt_id)
            continue
        raw = read_bin(src, (int(item["mel_frames"]) * hop,))
        source_sha = sha256_bytes(raw.tobytes())
        settings = {"source_sha256": source_sha, "denoiser_strength": strength, "trim": trim}
        if dst.is_file() and items_record.get(utt_id, {}).get("settings") == settings:
            skipped.append(utt_id)
            continue
        if not np.isfinite(raw).all():
            raise DataError(f"{src}: audio contains NaN/Inf values (a failed inference?); not converted")
        audio = raw
        if strength > 0:
            audio = np.asarray(denoiser(audio[None], strength=strength), dtype=np.float32).reshape(-1)
        if trim:
            audio = audio[: int(item["samples"])]
        peak = float(np.max(np.abs(audio))) if audio.size else 0.0
        atomic_write_bytes(dst, wav_bytes(audio, rate))
        items_record[utt_id] = {"wav": dst.name, "samples": int(audio.size), "peak": round(peak, 6),
                                "clipped_samples": int(np.count_nonzero(np.abs(audio) > 1.0)),
                                "settings": settings}
        # the record is rewritten after each file: an interrupted run keeps what it finished
        atomic_write_json(record_path, {"items": items_record})
        written.append(utt_id)
    if not written and not skipped:
        raise InputNotFound(f"{out_dir}: no <id>_out.bin files for the manifest's utterances; "
                            "run the infer stage first", path=out_dir)
    return {"wav_dir": str(wav_dir), "written": written, "skipped": skipped, "missing": missing,
            "denoiser_strength": strength, "sample_rate": rate}
