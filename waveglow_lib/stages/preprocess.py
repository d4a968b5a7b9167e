"""Stage 1, preprocess: an LJSpeech-layout folder → `mel/<id>.bin` + `mel/<id>.txt` + `mel/manifest.json`.

Exactly the guide's files: per wav the log-mel as raw float32 `[n_mel, T]` (`<id>.bin`) and a text file
with the audio's sample count (`<id>.txt`). The manifest lists, in the guide's file order
(`ls wavs/*.wav | head -n<limit>`), id, wav path, sample count, mel frames, shape, dtype and sha256, plus
the inputs that were skipped and why (unreadable, wrong format, silent). Re-runs skip unchanged files.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..audio import WavStream, mel_blocks, wav_file_stat
from ..config import STFTConfig, WorkflowConfig, forced
from ..errors import AudioError, DataError, InputNotFound, ManifestError, ResourceError
from ..io import (MAX_RECORD_BYTES, atomic_write_json, atomic_write_text, read_bounded, sha256_bytes,
                  storage_problem, write_bin_blocks)
from ..layout import (CORPUS_WAVS_DIR, MANIFEST_FORMAT, MANIFEST_NAME, check_utterance_id, load_manifest, mel_file,
                      sample_count_file)
from ..layout import PREPROCESS_JOURNAL_FILE as JOURNAL_NAME
from ..records import Manifest, read_record
from ..runlock import locked
from ..stamps import announce_redo, checkpoint_stft, file_stamps

__all__ = ["preprocess", "list_wavs", "load_manifest", "ManifestError"]


def list_wavs(corpus_dir: str | Path, limit: int = 0) -> list[Path]:
    """`ls <corpus>/wavs/*.wav | head -n<limit>` (0 = all); a folder of wavs without `wavs/` works too."""
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise InputNotFound(f"{corpus_dir}: corpus folder not found (expected LJSpeech layout: wavs/*.wav)",
                            path=corpus_dir)
    wav_dir = corpus_dir / CORPUS_WAVS_DIR if (corpus_dir / CORPUS_WAVS_DIR).is_dir() else corpus_dir
    wavs = sorted(wav_dir.glob("*.wav"))
    if not wavs:
        raise InputNotFound(f"{wav_dir}: no .wav files", path=wav_dir)
    return wavs[:limit] if limit else wavs


@locked("preprocess")
def preprocess(cfg: WorkflowConfig, *, force: bool = False, stft: STFTConfig | None = None) -> dict:
    """Compute the mels of `cfg.corpus` (first `cfg.limit` wavs) into `runs/<name>/mel/`.

    Unreadable, wrongly formatted (rate/channels without `cfg.resample`/`cfg.downmix`), too short, silent
    wavs, and wavs whose name cannot be an utterance id, are reported in the result and the manifest's
    `skipped` list; the batch goes on. Each finished item is also appended to `mel/.preprocess.jsonl`
    as it finishes, so a killed run resumes where it stopped; the manifest is rebuilt from them and
    written only when it changed (a finished, read-only run folder is not written to).
    """
    force = forced(force)  # `run --force` reaches the notebooks' stage calls
    if stft is None:
        stft = checkpoint_stft(cfg)
    layout = cfg.layout
    mel_dir = layout.check(layout.mel_dir, "the mel folder")
    wavs = list_wavs(cfg.corpus_dir, cfg.limit)
    settings = {"stft": stft.to_dict(), "resample": cfg.resample, "downmix": cfg.downmix}
    manifest_path = mel_dir / MANIFEST_NAME
    journal_path = mel_dir / JOURNAL_NAME
    current: dict | None = None
    previous: dict = {}
    if not force:
        # only says what may be reused: a damaged manifest (not JSON, a field of the wrong shape) is said,
        # and rebuilt from the wavs
        current = read_record(manifest_path, Manifest, "the mel manifest", on_damage=announce_redo)
        if current.get("settings") == settings:
            previous = {item["id"]: item for item in current.get("items", []) if isinstance(item.get("id"), str)}
        previous.update(_read_journal(journal_path, settings))

    items: list[dict] = []
    skipped: list[dict] = []
    reused = 0
    stamps = file_stamps(cfg)
    #: id → "<file>: why" for each finished mel made again (its wav or its files no longer as recorded)
    redone: dict = {}

    def manifest() -> dict:
        return {"format": MANIFEST_FORMAT, "corpus": str(cfg.corpus_dir), "limit": cfg.limit,
                "sampling_rate": stft.sampling_rate, "hop_length": stft.hop_length,
                "n_mel_channels": stft.n_mel_channels, "settings": settings, "items": items, "skipped": skipped}

    def skip(wav: Path, reason: str) -> None:
        skipped.append({"wav": str(wav), "reason": reason})
        tqdm.write(f"skipped: {reason}")

    journal = None
    last_save = time.monotonic()
    try:
        for wav in tqdm(wavs, desc="preprocess", unit="wav"):
            utt_id = wav.stem
            try:
                check_utterance_id(utt_id, wav)
            except ManifestError:
                skip(wav, f"{wav}: the name {utt_id!r} cannot be an utterance id (letters, digits, _ . - + # @)")
                continue
            try:
                wav_size = wav_file_stat(wav).st_size  # a folder, FIFO or device named *.wav: said, never opened
            except AudioError as exc:
                skip(wav, str(exc))
                continue
            try:  # the wav by its content: one replaced with its old size and mtime put back is read anew
                wav_sha = stamps.sha256(wav, "a WAV file", AudioError)
            except AudioError as exc:
                skip(wav, str(exc))
                continue
            old = previous.get(utt_id)
            if old:
                why = _changed(old, wav, wav_size, wav_sha, mel_dir, stamps, stft.n_mel_channels)
                if why is None:
                    items.append(old)
                    reused += 1
                    continue
                redone[utt_id] = announce_redo(why)
            bin_path = mel_file(mel_dir, utt_id)
            txt_path = sample_count_file(bin_path)
            try:
                samples, sha, shape = _write_mel(wav, bin_path, stft, cfg)
            except AudioError as exc:
                reason = str(exc)
                skip(wav, reason if str(wav) in reason else f"{wav}: {reason}")
                continue
            except MemoryError:
                raise ResourceError(f"{wav}: out of memory computing its mel", path=wav) from None
            atomic_write_text(txt_path, f"{samples}\n")
            item = _item(wav, wav_size, samples, shape, sha, wav_sha, bin_path)
            items.append(item)
            if journal is None:  # O_NOFOLLOW: never append through a link left in the run folder
                journal = os.fdopen(os.open(journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW,
                                            0o644), "a", encoding="utf-8")
            _append(journal, journal_path, {"settings": settings, "item": item})
            if time.monotonic() - last_save > 5.0:  # large corpora: keep a recent manifest on disk
                atomic_write_json(manifest_path, manifest())
                last_save = time.monotonic()
    finally:
        if journal is not None:
            journal.close()
    final = manifest()
    if final != current:
        atomic_write_json(manifest_path, final)
    if journal_path.is_file():
        journal_path.unlink()  # the manifest now holds every finished item
    stamps.save()
    if not items:
        raise AudioError(f"{cfg.corpus_dir}: none of {len(wavs)} wav(s) could be used: "
                         + "; ".join(s["reason"] for s in skipped[:3]))
    return {"mel_dir": str(mel_dir), "manifest": str(manifest_path), "items": len(items),
            "computed": len(items) - reused, "reused": reused, "redone": redone, "skipped": skipped,
            "mel_frames": [item["mel_frames"] for item in items]}


def _write_mel(wav: Path, bin_path: Path, stft: STFTConfig, cfg: WorkflowConfig) -> tuple[int, str, tuple[int, int]]:
    """The wav's mel into `bin_path` block by block (`audio.WavStream` → `audio.mel_blocks` →
    `io.write_bin_blocks`): equal to the one-shot mel, in memory bounded by a block, not by the wav.
    Returns (samples, sha256, shape). AudioError, and nothing written, for a wav that is unusable, too short
    or silent."""
    stream = WavStream(wav, stft.sampling_rate, resample=cfg.resample, downmix=cfg.downmix)

    def checked_audio():
        yield from stream.pieces()
        if stream.samples <= stft.filter_length // 2:
            raise AudioError(f"{wav}: {stream.samples} sample(s) is too short; the STFT needs more than "
                             f"filter_length // 2 = {stft.filter_length // 2}", path=wav)
        unusable = stream.unusable()
        if unusable:
            raise AudioError(f"{wav}: {unusable}; nothing to vocode", path=wav)

    sha, shape = write_bin_blocks(bin_path, mel_blocks(checked_audio(), stft))
    return stream.samples, sha, shape


def _append(journal, path: Path, entry: dict) -> None:
    """One line per finished item, flushed and synced: a kill loses at most the line being written."""
    try:
        journal.write(json.dumps(entry) + "\n")
        journal.flush()
        os.fsync(journal.fileno())
    except OSError as exc:
        problem = storage_problem(exc)
        if problem:
            raise ResourceError(f"{path}: could not write ({problem})", path=path) from None
        raise


def _read_journal(path: Path, settings: dict) -> dict:
    """The items a killed run finished (same settings), by id; a torn last line is ignored."""
    found: dict = {}
    if not path.is_file():
        return found
    try:
        data = read_bounded(path, "the preprocess journal (one JSON line per finished item)", MAX_RECORD_BYTES,
                            follow_links=False)
    except (DataError, InputNotFound):
        return found  # it only says what may be reused: without it every wav is computed again
    for line in data.split(b"\n"):
        try:
            entry = json.loads(line.decode("utf-8", errors="replace"))
        except (ValueError, RecursionError):  # a torn last line (or one no run writes)
            continue
        if isinstance(entry, dict) and entry.get("settings") == settings and isinstance(entry.get("item"), dict) \
                and isinstance(entry["item"].get("id"), str):
            found[entry["item"]["id"]] = entry["item"]  # as trusted as the manifest's: `_changed` checks it
    return found


def _item(wav: Path, wav_size: int, samples: int, shape, sha: str, wav_sha: str, bin_path: Path) -> dict:
    """A manifest item, exactly as preprocess writes it (`_changed` reuses only an item that is one)."""
    return {"id": wav.stem, "wav": str(wav), "samples": samples, "mel_frames": shape[1], "shape": list(shape),
            "dtype": "float32", "sha256": sha, "bin": bin_path.name, "txt": sample_count_file(bin_path).name,
            "wav_size": wav_size, "wav_sha256": wav_sha}


def _changed(item: dict, wav: Path, wav_size: int, wav_sha: str, mel_dir: Path, stamps, n_mel: int) -> str | None:
    """Why a finished item's record no longer describes this wav (by content) and its own `<id>.bin`/`.txt`
    (by size and sha256, `stamps.FileStamps.changed`), or None when it does. Records are data: an item
    that is not exactly what preprocess writes (a field missing or of another type, a shape that is not
    [n_mel, mel_frames]) is not trusted, its mel is made again."""
    utt_id = wav.stem
    bin_path = mel_file(mel_dir, utt_id)
    txt_path = sample_count_file(bin_path)
    if item.get("bin") != bin_path.name or item.get("txt") != txt_path.name or item.get("id") != utt_id:
        return f"{wav}: its record names other files"  # not trusted: recomputed
    if item.get("wav") != str(wav) or item.get("wav_sha256") != wav_sha:
        return f"{wav}: not the audio its mel was made from (another content)"
    samples, shape, sha = item.get("samples"), item.get("shape"), item.get("sha256")
    well_formed = (type(samples) is int and samples > 0 and isinstance(sha, str) and isinstance(shape, list)
                   and len(shape) == 2 and shape[0] == n_mel and all(type(n) is int and n > 0 for n in shape))
    if not well_formed or (json.dumps(item, sort_keys=True)
                           != json.dumps(_item(wav, wav_size, samples, shape, sha, wav_sha, bin_path), sort_keys=True)):
        return f"{bin_path}: its record is not one preprocess writes (a field missing or of the wrong shape)"
    mel = {"size": shape[0] * shape[1] * 4, "sha256": sha}
    text = f"{samples}\n".encode()
    for path, recorded in ((bin_path, mel), (txt_path, {"size": len(text), "sha256": sha256_bytes(text)})):
        why = stamps.changed(path, recorded)
        if why:
            return f"{path}: {why}"
    return None
