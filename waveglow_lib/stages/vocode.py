"""The vocode stage: a folder (or file) of mels from elsewhere — a TTS model, another toolkit — into
`runs/<name>/vocode/<id>_syn.wav` (and the guide's `<id>_out.bin` with `vocode_out_bin`).

Every mel goes through `mel_input.read_mel` (reader and format check) before anything is vocoded, so a
mel in the wrong format is refused with its file's name instead of becoming noise. Each utterance is
vocoded alone, in chunks when it is longer than `chunk_frames` + context (`batching.vocode`: exactly the
one-shot output, memory bounded by a chunk), with the noise of (seed, file stem) as the infer stage
draws it: a mel saved from our own preprocess gives the wav route's samples. Resumable: a wav made from
the same file with the same settings is skipped (`vocode/vocode.json`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..batching import NOISE_SCHEME, utterance_noise, vocode as vocode_batch, vocode_stream
from ..checkpoint import load_waveglow
from ..config import STFTConfig, WorkflowConfig
from ..denoiser import Denoiser
from ..errors import MelError, SynthesisError
from ..io import atomic_write_bytes, atomic_write_json, sha256_bytes, write_bin
from ..layout import out_bin, syn_wav
from ..mel_input import list_mels, mel_sample_count, read_mel
from ..metrics import snr_db
from .infer import backend_name, open_backend, resolve_model_config
from .postprocess import wav_bytes

__all__ = ["vocode", "read_mels", "stream_matches_offline"]


def read_mels(cfg: WorkflowConfig, mels: str | Path, n_mel: int = 80) -> list[dict]:
    """Read and check every mel of `mels` (folder or file): `[{"id", "path", "mel", "samples"}]`, by id.

    `samples` is the `.txt` sample count beside a guide-style `.bin` (the wav route trims to it), else None.
    Raises MelError naming the first file that is unreadable or not natural-log mel magnitudes.
    """
    convert = None if cfg.mel_convert == "none" else cfg.mel_convert
    items = []
    for utt_id, path in list_mels(mels):
        mel = read_mel(path, n_mel, layout=cfg.mel_layout, convert=convert, stft=STFTConfig(n_mel_channels=n_mel))
        samples = mel_sample_count(path) if path.suffix.lower() == ".bin" else None
        items.append({"id": utt_id, "path": path, "mel": mel, "samples": samples})
    return items


def vocode(cfg: WorkflowConfig, mels: str | Path, *, model=None, backend=None, out_dir: str | Path | None = None,
           force: bool = False) -> dict:
    """Vocode every mel of `mels` (a folder of `<id>.npy|.pt|.bin`, or one file) into `<out_dir>/<id>_syn.wav`.

    `out_dir` defaults to `runs/<name>/vocode/`. Settings that shape the audio: `checkpoint`, `backend`,
    `precision`, `sigma`, `seed` (noise per file stem), `denoiser_strength`, `mel_layout`, `mel_convert`,
    `chunk_frames` (changes memory and time, not the audio). `backend=` takes an opened Backend (not
    closed here). Returns a summary with the written / skipped ids and the real-time factor.
    """
    out_dir = Path(out_dir) if out_dir else cfg.layout.vocode_dir
    model_config = resolve_model_config(cfg, model)
    items = read_mels(cfg, mels, model_config.n_mel_channels)  # every file checked before any audio
    stft = STFTConfig(n_mel_channels=model_config.n_mel_channels)
    name = backend.name if backend is not None else backend_name(cfg)
    settings = {"checkpoint": cfg.checkpoint, "backend": name, "precision": cfg.precision, "sigma": cfg.sigma,
                "seed": cfg.seed, "noise": NOISE_SCHEME, "denoiser_strength": float(cfg.denoiser_strength),
                "mel_layout": cfg.mel_layout, "mel_convert": cfg.mel_convert, "out_bin": cfg.vocode_out_bin}
    record_path = out_dir / "vocode.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() and not force else {}
    done: dict = record.get("items", {})
    for item in items:
        item["source_sha256"] = sha256_bytes(item["path"].read_bytes())

    def finished(item: dict) -> bool:
        entry = done.get(item["id"], {})
        return (syn_wav(out_dir, item["id"]).is_file() and entry.get("settings") == settings
                and entry.get("source_sha256") == item["source_sha256"])

    todo = [item for item in items if not finished(item)]
    skipped = [item["id"] for item in items if item not in todo]
    written: list[str] = []
    seconds = audio_seconds = 0.0
    if todo:
        if model is None and (name in ("torch", "fast") or cfg.denoiser_strength > 0):
            model = load_waveglow(cfg.checkpoint_path)
        denoiser = Denoiser.from_model(model) if cfg.denoiser_strength > 0 else None
        own_backend = backend is None
        if own_backend:
            backend = open_backend(cfg, model=model, model_config=model_config, name=name)
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            for item in tqdm(todo, desc=f"vocode ({backend.name})", unit="utt"):
                utt_id, mel = item["id"], item["mel"]
                noise = utterance_noise(model_config, mel.shape[1], cfg.seed, utt_id)
                t0 = time.perf_counter()
                audios, stats = vocode_batch(backend, [mel], [noise], cfg.sigma, model_config,
                                             exact=cfg.exact_batching, pad_value=stft.pad_value,
                                             chunk_frames=cfg.chunk_frames)
                raw = audios[0]
                if not np.isfinite(raw).all():
                    raise SynthesisError(f"{item['path']}: the {backend.name} backend produced NaN/Inf audio",
                                         path=item["path"])
                audio = raw
                if denoiser is not None:
                    audio = np.asarray(denoiser(audio[None], strength=cfg.denoiser_strength),
                                       dtype=np.float32).reshape(-1)
                if item["samples"] is not None:  # the source's length, as the wav route trims
                    audio = audio[: item["samples"]]
                elapsed = time.perf_counter() - t0
                if cfg.vocode_out_bin:
                    write_bin(out_bin(out_dir, utt_id), raw)
                atomic_write_bytes(syn_wav(out_dir, utt_id), wav_bytes(audio, stft.sampling_rate))
                done[utt_id] = {"source": str(item["path"]), "source_sha256": item["source_sha256"],
                                "frames": int(mel.shape[1]), "samples": int(audio.size),
                                "chunk_windows": stats["chunk_windows"], "exact": not stats["inexact"],
                                "seconds": round(elapsed, 6), "settings": settings}
                # rewritten after each file: an interrupted run keeps what it finished
                atomic_write_json(record_path, {"settings": settings, "items": done})
                written.append(utt_id)
                seconds += elapsed
                audio_seconds += audio.size / stft.sampling_rate
        finally:
            if own_backend:
                backend.close()
    if not items:
        raise MelError(f"{mels}: no mels to vocode", path=Path(mels))
    return {"out_dir": str(out_dir), "backend": name, "written": written, "skipped": skipped,
            "seconds": round(seconds, 3), "audio_seconds": round(audio_seconds, 3),
            "real_time_factor": round(seconds / audio_seconds, 4) if audio_seconds else None,
            "record": str(record_path)}


def stream_matches_offline(cfg: WorkflowConfig, mel, utt_id: str, *, model=None, chunk_frames: int | None = None,
                           backend=None) -> dict:
    """Feed `mel` frame by frame through `batching.vocode_stream` (as a TTS front-end would) and compare the
    joined stream with one-shot synthesis of the whole mel, same noise: {chunks, samples, snr_db}."""
    model_config = resolve_model_config(cfg, model)
    chunk_frames = cfg.chunk_frames if chunk_frames is None else chunk_frames
    own_backend = backend is None
    if own_backend:
        backend = open_backend(cfg, model=model, model_config=model_config)
    pad_value = STFTConfig(n_mel_channels=model_config.n_mel_channels).pad_value
    try:
        pieces = list(vocode_stream(iter(np.asarray(mel).T), backend, model_config, sigma=cfg.sigma, seed=cfg.seed,
                                    utt_id=utt_id, chunk_frames=chunk_frames, pad_value=pad_value))
        noise = utterance_noise(model_config, mel.shape[1], cfg.seed, utt_id)
        offline = backend.run(mel[None], cfg.sigma * noise[None])[0]
    finally:
        if own_backend:
            backend.close()
    return {"chunk_frames": chunk_frames, "chunks": len(pieces), "samples": int(offline.size),
            "snr_db": round(snr_db(offline, np.concatenate(pieces)), 1)}
