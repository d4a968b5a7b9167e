"""Stage 5, postprocess: `out/<id>_out.bin` (float32 audio) → `wav/<id>_syn.wav` (int16 at the model's rate:
the manifest's `sampling_rate`, `STFTConfig.sampling_rate` by default).

The guide multiplies by 32768 and casts: a full-scale +1.0 then wraps to −32768 (a click at full
amplitude). Here the audio is clipped to [-1, 1] and scaled by 32767, rounded to nearest.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..audio import wav_bytes
from ..checkpoint import load_waveglow
from ..config import STFTConfig, WorkflowConfig, forced
from ..denoiser import Denoiser
from ..errors import DataError, InputNotFound
from ..io import atomic_write_bytes, atomic_write_json, read_bin
from ..layout import POSTPROCESS_RECORD_FILE, load_manifest, out_bin, syn_wav
from ..records import PostprocessEntry, PostprocessRecord, read_record
from ..runlock import locked
from ..stamps import OUTPUT_KEY, announce_redo, file_stamps, is_current, model_stamp, stage_stamp



@locked("postprocess")
def postprocess(cfg: WorkflowConfig, *, out_dir: str | Path | None = None, wav_dir: str | Path | None = None,
                model=None, denoiser=None, trim: bool = True, force: bool = False) -> dict:
    """Convert every utterance of the manifest whose `<id>_out.bin` exists into `<id>_syn.wav`.

    - `cfg.denoiser_strength > 0` applies NVIDIA's denoiser (bias spectrum of the same model); pass
      `denoiser=` to reuse one, or `model=` to build it without reloading the checkpoint.
    - `trim`: cut the vocoder's `frames × hop` samples (the manifest's `hop_length`) back to the source
      wav's sample count (the `.txt` preprocess wrote), so synthesised and reference audio align sample
      for sample.
    - Finished wavs whose resume stamp is this run's (the `.bin`'s sha256, the settings, and with the
      denoiser the model's fingerprint) and which still have the size and sha256 the record lists are
      skipped (`wav/postprocess.json`); others are redone, a changed wav named (summary's `redone`).
    """
    force = forced(force)  # `run --force` reaches the notebooks' stage calls
    layout = cfg.layout
    # folders the user names may lie anywhere; the default ones must stay in the run folder
    own_out_dir = out_dir is None
    out_dir = Path(out_dir) if out_dir else layout.check(layout.out_dir, "the infer outputs folder")
    wav_dir = Path(wav_dir) if wav_dir else layout.check(layout.wav_dir, "the wav folder")
    manifest = load_manifest(layout.mel_dir)
    hop = int(manifest.get("hop_length", STFTConfig().hop_length))
    rate = int(manifest.get("sampling_rate", STFTConfig().sampling_rate))
    record_path = wav_dir / POSTPROCESS_RECORD_FILE
    # only says what may be skipped: without it, or damaged (said), every wav is redone; a damaged entry, its wav
    record = {} if force else read_record(record_path, PostprocessRecord, "the postprocess record (settings per finished wav)",
                                          entries=PostprocessEntry, on_damage=announce_redo)
    items_record = record.get("items", {})
    strength = float(cfg.denoiser_strength)
    # the denoiser subtracts the model's own bias spectrum: its wavs depend on the model too (a denoiser
    # given ready-made cannot be fingerprinted); without it, only on the raw audio
    denoiser_model = (model_stamp(cfg, model) if denoiser is None else "given") if strength > 0 else None
    if strength > 0 and denoiser is None:
        if model is None:
            model = load_waveglow(cfg.checkpoint_path)
        denoiser = Denoiser.from_model(model)
    written, skipped, missing = [], [], []
    stamps = file_stamps(cfg)
    redone: dict = {}
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
        # the .bin's sha256 from the file stamps: an unchanged output of infer is not read again
        settings = stage_stamp(cfg, {"denoiser_strength": strength, "trim": trim}, fingerprint=denoiser_model,
                               source_sha256=stamps.sha256(src, "an infer output"))
        entry = items_record.get(utt_id, {})
        if is_current(entry.get("settings"), settings):
            why = stamps.changed(dst, entry.get(OUTPUT_KEY))
            if why is None:
                skipped.append(utt_id)
                continue
            redone[utt_id] = announce_redo(f"{dst}: {why}")
        raw = read_bin(src, (int(item["mel_frames"]) * hop,))
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
                                "settings": settings, OUTPUT_KEY: stamps.entry(dst)}
        # the record is rewritten after each file: an interrupted run keeps what it finished
        atomic_write_json(record_path, {"items": items_record})
        written.append(utt_id)
    stamps.save()
    if not written and not skipped:
        raise InputNotFound(f"{out_dir}: no <id>_out.bin files for the manifest's utterances; "
                            "run the infer stage first", path=out_dir)
    return {"wav_dir": str(wav_dir), "written": written, "skipped": skipped, "redone": redone, "missing": missing,
            "denoiser_strength": strength, "sample_rate": rate}
