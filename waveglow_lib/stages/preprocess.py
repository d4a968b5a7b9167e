"""Stage 1, preprocess: an LJSpeech-layout folder → `mel/<id>.bin` + `mel/<id>.txt` + `mel/manifest.json`.

Exactly the guide's files: per wav the log-mel as raw float32 `[n_mel, T]` (`<id>.bin`) and a text file
with the audio's sample count (`<id>.txt`). The manifest lists, in the guide's file order
(`ls wavs/*.wav | head -n<limit>`), id, wav path, sample count, mel frames, shape, dtype and sha256, plus
the inputs that were skipped and why (unreadable, wrong format, silent). Re-runs skip unchanged files.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..audio import load_wav, mel_spectrogram
from ..checkpoint import read_stft_config
from ..config import STFTConfig, WorkflowConfig
from ..errors import AudioError, InputNotFound, ManifestError
from ..io import atomic_write_json, atomic_write_text, write_bin
from ..layout import MANIFEST_FORMAT, MANIFEST_NAME, load_manifest

__all__ = ["preprocess", "list_wavs", "load_manifest", "ManifestError"]
#: a wav whose peak stays below this (≈3 LSB of int16) is treated as silent and skipped
SILENCE_PEAK = 1e-4


def list_wavs(corpus_dir: str | Path, limit: int = 0) -> list[Path]:
    """`ls <corpus>/wavs/*.wav | head -n<limit>` (0 = all); a folder of wavs without `wavs/` works too."""
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise InputNotFound(f"{corpus_dir}: corpus folder not found (expected LJSpeech layout: wavs/*.wav)",
                            path=corpus_dir)
    wav_dir = corpus_dir / "wavs" if (corpus_dir / "wavs").is_dir() else corpus_dir
    wavs = sorted(wav_dir.glob("*.wav"))
    if not wavs:
        raise InputNotFound(f"{wav_dir}: no .wav files", path=wav_dir)
    return wavs[:limit] if limit else wavs


def preprocess(cfg: WorkflowConfig, *, force: bool = False, stft: STFTConfig | None = None) -> dict:
    """Compute the mels of `cfg.corpus` (first `cfg.limit` wavs) into `runs/<name>/mel/`.

    Unreadable, wrongly formatted (rate/channels without `cfg.resample`/`cfg.downmix`) and silent wavs
    are reported in the result and the manifest's `skipped` list; the batch goes on.
    """
    if stft is None:
        stft = read_stft_config(cfg.checkpoint_path)
    mel_dir = cfg.layout.mel_dir
    mel_dir.mkdir(parents=True, exist_ok=True)
    wavs = list_wavs(cfg.corpus_dir, cfg.limit)
    settings = {"stft": stft.to_dict(), "resample": cfg.resample, "downmix": cfg.downmix}
    manifest_path = mel_dir / MANIFEST_NAME
    previous: dict = {}
    if manifest_path.is_file() and not force:
        try:
            old = json.loads(manifest_path.read_text())
            if old.get("settings") == settings:
                previous = {item["id"]: item for item in old.get("items", [])}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            previous = {}  # an unreadable manifest is rebuilt from the wavs

    items: list[dict] = []
    skipped: list[dict] = []
    reused = 0

    def save() -> None:
        atomic_write_json(manifest_path, {
            "format": MANIFEST_FORMAT, "corpus": str(cfg.corpus_dir), "limit": cfg.limit,
            "sampling_rate": stft.sampling_rate, "hop_length": stft.hop_length,
            "n_mel_channels": stft.n_mel_channels, "settings": settings, "items": items, "skipped": skipped})

    last_save = time.monotonic()
    for wav in tqdm(wavs, desc="preprocess", unit="wav"):
        utt_id = wav.stem
        stat = wav.stat()
        old = previous.get(utt_id)
        if old and _unchanged(old, wav, stat, mel_dir):
            items.append(old)
            reused += 1
            continue
        try:
            audio, _ = load_wav(wav, expected_rate=stft.sampling_rate, resample=cfg.resample,
                                downmix=cfg.downmix)
        except AudioError as exc:
            skipped.append({"wav": str(wav), "reason": str(exc)})
            tqdm.write(f"skipped: {exc}")
            continue
        peak = float(np.max(np.abs(audio)))
        if peak < SILENCE_PEAK:
            reason = f"{wav}: silent (peak {peak:.2e}); nothing to vocode"
            skipped.append({"wav": str(wav), "reason": reason})
            tqdm.write(f"skipped: {reason}")
            continue
        mel = np.asarray(mel_spectrogram(audio, stft), dtype=np.float32)
        sha = write_bin(mel_dir / f"{utt_id}.bin", mel)
        atomic_write_text(mel_dir / f"{utt_id}.txt", f"{audio.size}\n")
        items.append({"id": utt_id, "wav": str(wav), "samples": int(audio.size), "mel_frames": int(mel.shape[1]),
                      "shape": list(mel.shape), "dtype": "float32", "sha256": sha, "bin": f"{utt_id}.bin",
                      "txt": f"{utt_id}.txt", "wav_size": stat.st_size, "wav_mtime_ns": stat.st_mtime_ns})
        if time.monotonic() - last_save > 5.0:  # large corpora: keep a recent manifest on disk
            save()
            last_save = time.monotonic()
    save()
    if not items:
        raise AudioError(f"{cfg.corpus_dir}: none of {len(wavs)} wav(s) could be used: "
                         + "; ".join(s["reason"] for s in skipped[:3]))
    return {"mel_dir": str(mel_dir), "manifest": str(manifest_path), "items": len(items),
            "computed": len(items) - reused, "reused": reused, "skipped": skipped,
            "mel_frames": [item["mel_frames"] for item in items]}


def _unchanged(item: dict, wav: Path, stat, mel_dir: Path) -> bool:
    """The manifest entry still describes this wav and its `.bin`/`.txt` are complete."""
    bin_path = mel_dir / item.get("bin", "")
    return (item.get("wav") == str(wav) and item.get("wav_size") == stat.st_size
            and item.get("wav_mtime_ns") == stat.st_mtime_ns and bin_path.is_file()
            and bin_path.stat().st_size == int(np.prod(item["shape"])) * 4
            and (mel_dir / item.get("txt", "")).is_file())
