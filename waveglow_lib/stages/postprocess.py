"""Stage 5, postprocess: `out/<id>_out.bin` (float32 audio) → `wav/<id>_syn.wav` (22050 Hz int16).

The guide multiplies by 32768 and casts: a full-scale +1.0 then wraps to −32768 (a click at full
amplitude). Here the audio is clipped to [-1, 1] and scaled by 32767, rounded to nearest.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from scipy.io import wavfile
from tqdm.auto import tqdm

from ..checkpoint import load_waveglow
from ..config import STFTConfig, WorkflowConfig
from ..denoiser import Denoiser
from ..errors import DataError, InputNotFound
from ..io import atomic_write_bytes, atomic_write_json, read_bin, read_json, sha256_bytes
from ..layout import load_manifest, out_bin, syn_wav
from ..runlock import locked
from .stamps import model_stamp

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


@locked("postprocess")
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
    # folders the user names may lie anywhere; the default ones must stay in the run folder
    own_out_dir = out_dir is None
    out_dir = Path(out_dir) if out_dir else layout.check(layout.out_dir, "the infer outputs folder")
    wav_dir = Path(wav_dir) if wav_dir else layout.check(layout.wav_dir, "the wav folder")
    manifest = load_manifest(layout.mel_dir)
    hop = int(manifest.get("hop_length", STFTConfig().hop_length))
    rate = int(manifest.get("sampling_rate", STFTConfig().sampling_rate))
    record_path = wav_dir / "postprocess.json"
    record = {}
    if record_path.is_file() and not force:
        try:
            record = read_json(record_path, "the postprocess record (settings per finished wav)")
        except DataError:
            record = {}  # only says what may be skipped: without it every wav is redone
    items_record = record.get("items") if isinstance(record.get("items"), dict) else {}
    strength = float(cfg.denoiser_strength)
    # the denoiser subtracts the model's own bias spectrum: its wavs depend on the model too
    denoiser_model = (model_stamp(cfg, model) if denoiser is None else "given") if strength > 0 else None
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
        if own_out_dir and src.exists():
            layout.check(src, "an infer output")  # a link in out/ must not make us read elsewhere
        if not src.is_file():
            missing.append(utt_id)
            continue
        raw = read_bin(src, (int(item["mel_frames"]) * hop,))
        source_sha = sha256_bytes(raw.tobytes())
        settings = {"source_sha256": source_sha, "denoiser_strength": strength, "trim": trim,
                    **({"denoiser_model": denoiser_model} if denoiser_model else {})}
        if dst.is_file() and items_record.get(utt_id, {}).get("settings") == settings:
            skipped.append(utt_id)
            continue
        if not np.isfinite(raw).all():
            raise DataError(f"{src}: audio contains NaN/Inf values (a failed inference?); not converted",
                            path=src)
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
