"""The vocode stage: a folder (or file) of mels from elsewhere — a TTS model, another toolkit — into
`runs/<name>/vocode/<id>_syn.wav` (and the guide's `<id>_out.bin` with `vocode_out_bin`).

Every mel goes through `mel_input.read_mel` (reader and format check) before anything is vocoded, so a
mel in the wrong format is refused with its file's name instead of becoming noise. The mels are then a
job like the infer stage's (`prepare_vocode`: a `jobs.InferJob` of the files and their reader): the same
batch plan, per-batch work (`jobs.vocode_batch`: long utterances alone in exact chunks, memory bounded by
a chunk) and noise of (seed, file stem), so a mel saved from our own preprocess gives the wav route's
samples — and the same engines (`cfg.engine`: this process, or a Ray actor pool). Only the writing
differs (`VocodeJob.write_item`: denoiser, the `.txt` length, a wav). Resumable: a wav whose resume
stamp (the model's fingerprint, the settings that shape it, the source file's sha256) is this run's is
skipped (`vocode/vocode.json`, which also holds the per-worker timings).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
import sys
import time
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm.auto import tqdm

from ..batching import NOISE_SCHEME, Utterance, utterance_noise, vocode_stream
from ..checkpoint import load_waveglow
from ..config import STFTConfig, WorkflowConfig, forced
from ..denoiser import Denoiser
from ..engines import run_job
from ..errors import MelError
from ..io import atomic_stream, atomic_write_bytes, write_bin
from ..audio import PcmWriter, WavWriter, wav_bytes
from ..jobs import (InferJob, MelFileReader, StreamedAudio, VocodeSettings, backend_name,
                    mel_folder_items, open_backend, resolve_model_config, vocode_batch)
from ..layout import VOCODE_RECORD_FILE, out_bin, syn_wav
from ..mel_input import list_mels, mel_sample_count
from ..metrics import snr_db
from ..records import JobRecord, VocodeEntry, read_record
from ..runlock import locked
from ..stamps import OUTPUT_KEY, SOURCE_KEY, announce_redo, file_stamps, is_current, stage_stamp

__all__ = ["vocode", "vocode_pipe", "prepare_vocode", "VocodeJob", "read_mels", "stream_matches_offline"]


def read_mels(cfg: WorkflowConfig, mels: str | Path, n_mel: int = 80) -> list[dict]:
    """Read and check every mel of `mels` (folder or file): `[{"id", "path", "mel", "samples"}]`, by id.

    `samples` is the `.txt` sample count beside a guide-style `.bin` (the wav route trims to it), else None.
    Raises MelError naming the first file that is unreadable or not natural-log mel magnitudes.
    """
    reader = mel_file_reader(cfg, n_mel)
    return [{"id": utt_id, "path": path, "mel": reader(Utterance(utt_id, 0, path)), "samples": _source_samples(path)}
            for utt_id, path in list_mels(mels)]


def mel_file_reader(cfg: WorkflowConfig, n_mel: int, blocks: bool = False) -> MelFileReader:
    """The reader of `cfg`'s mel files: its `mel_layout` and `mel_convert` ("none" = no conversion);
    `blocks`: read by blocks as they are vocoded (`mel_input.open_mel`), not whole."""
    return MelFileReader(n_mel, cfg.mel_layout, None if cfg.mel_convert == "none" else cfg.mel_convert, blocks)


def _source_samples(path: Path) -> int | None:
    return mel_sample_count(path) if path.suffix.lower() == ".bin" else None


def item_outputs(out_dir: Path, utt_id: str, with_bin: bool) -> list[Path]:
    """The files one item makes: its wav, and with `vocode_out_bin` the raw `<id>_out.bin`."""
    return [syn_wav(out_dir, utt_id), *([out_bin(out_dir, utt_id)] if with_bin else [])]


@dataclass
class VocodeJob(InferJob):
    """An infer job whose outputs are wavs: denoised (`denoiser_strength`), cut to the source's `.txt`
    length, written with the raw `<id>_out.bin` on request; its record is `vocode.json`."""

    denoiser: Denoiser | None = None
    denoiser_strength: float = 0.0
    write_bin: bool = False
    # `sources`: id → {"source", "source_sha256", "samples" (the .txt count or None)}

    @property
    def timings_path(self) -> Path:
        return self.out_dir / VOCODE_RECORD_FILE

    def write_item(self, utterance: Utterance, audio: np.ndarray | StreamedAudio) -> dict:
        if isinstance(audio, StreamedAudio):  # written as it was made (`stream_writer`)
            return audio.entry
        raw, audio = audio, self.wav_audio(utterance, audio)
        if self.write_bin:
            write_bin(out_bin(self.out_dir, utterance.id), raw)
        atomic_write_bytes(syn_wav(self.out_dir, utterance.id), wav_bytes(audio, self.rate))
        return self.entry(utterance, int(audio.size))

    def wav_audio(self, utterance: Utterance, audio: np.ndarray) -> np.ndarray:
        """An utterance's whole audio as its wav holds it: denoised, cut to the source's `.txt` length."""
        if self.denoiser is not None:
            audio = np.asarray(self.denoiser(audio[None], strength=self.denoiser_strength),
                               dtype=np.float32).reshape(-1)
        samples = self.sources[utterance.id]["samples"]
        return audio if samples is None else audio[:samples]  # the source's length, as the wav route trims

    def entry(self, utterance: Utterance, samples: int) -> dict:
        """What the record says of an utterance's outputs, once they are in place."""
        source = self.sources[utterance.id]
        return {"source": source["source"], "source_sha256": source["source_sha256"], "frames": utterance.frames,
                "samples": samples, "settings": self.output_settings,
                # each file written, by size and sha256: checked before the item is skipped again
                OUTPUT_KEY: {path.name: self.stamps.entry(path)
                             for path in item_outputs(self.out_dir, utterance.id, self.write_bin)}}

    def stream_writer(self, utterance: Utterance) -> "WavSink":
        """A long utterance's outputs written chunk by chunk as they are vocoded (`jobs.vocode_batch`)."""
        return WavSink(self, utterance)

    def pipe_writer(self, utterance: Utterance, out: BinaryIO) -> "WavSink":
        """The same, the wav's data chunk only (raw PCM) to `out`, nothing written to files (`vocode_pipe`)."""
        return WavSink(self, utterance, PcmWriter(out))

    def summary(self) -> dict:
        return {**super().summary(), "backend": self.backend, "record": str(self.timings_path)}


class _Aborted(Exception):
    """Thrown into a sink's temp files to remove them."""


class WavSink:
    """One utterance's outputs written as its audio is made (memory: a chunk, not the utterance): the wav
    (denoised block by block, cut to the source's length) and, with `vocode_out_bin`, the raw `<id>_out.bin`,
    each a temp file renamed into place by `finish()` only (`io.atomic_stream`); `abort()` removes them.
    The same bytes `VocodeJob.write_item` writes for the joined audio (the denoiser: to float rounding).
    With `pcm` (an `audio.PcmWriter` on a pipe): the wav's data chunk goes there instead, and no file is made."""

    def __init__(self, job: VocodeJob, utterance: Utterance, pcm: PcmWriter | None = None) -> None:
        self.job, self.utterance, self.to_files = job, utterance, pcm is None
        self.limit = job.sources[utterance.id]["samples"]  # the source's length (None: all of it)
        self.files = contextlib.ExitStack()
        self.wav = pcm or WavWriter(self.files.enter_context(atomic_stream(syn_wav(job.out_dir, utterance.id))),
                                    job.rate)
        self.raw = (self.files.enter_context(atomic_stream(out_bin(job.out_dir, utterance.id)))
                    if job.write_bin and self.to_files else None)
        self.denoise = BlockDenoiser(job.denoiser, job.denoiser_strength) if job.denoiser is not None else None
        self.samples = 0

    def write(self, audio: np.ndarray) -> None:
        if self.raw is not None:
            self.raw.write(np.ascontiguousarray(audio, dtype="<f4").tobytes())
        self._emit(self.denoise.push(audio) if self.denoise is not None else audio)

    def _emit(self, audio: np.ndarray) -> None:
        if self.limit is not None:
            audio = audio[: max(0, self.limit - self.samples)]
        self.wav.write(audio)
        self.samples += audio.size

    def finish(self) -> tuple[int, dict]:
        if self.denoise is not None:
            self._emit(self.denoise.end())
        self.wav.close()
        self.files.close()  # complete: renamed into place
        if not self.to_files:
            return self.samples, {"samples": self.samples}
        return self.samples, self.job.entry(self.utterance, self.samples)

    def abort(self) -> None:
        self.files.__exit__(_Aborted, _Aborted(), None)


class BlockDenoiser:
    """NVIDIA's denoiser on audio that comes in pieces. An output sample depends on the input within
    filter_length of it (the STFT frames covering it), so each stretch is denoised with that much context
    each side (hop-aligned, so the frames fall where the whole's do) and its centre kept; the file's two
    ends are the whole's ends. Equal to denoising the whole, to float rounding; memory: a piece and context."""

    def __init__(self, denoiser: Denoiser, strength: float) -> None:
        self.denoiser, self.strength = denoiser, strength
        hop = denoiser.stft.hop_length
        self.context = -(-(denoiser.stft.filter_length + hop) // hop) * hop
        self.buffer = np.zeros(0, dtype=np.float32)  # input samples [base, base + buffer.size)
        self.base = self.done = 0  # output made up to `done`

    def push(self, audio: np.ndarray) -> np.ndarray:
        self.buffer = np.concatenate([self.buffer, np.asarray(audio, dtype=np.float32).reshape(-1)])
        return self._run(self.base + self.buffer.size - self.context, at_end=False)

    def end(self) -> np.ndarray:
        return self._run(self.base + self.buffer.size, at_end=True)

    def _run(self, stop: int, at_end: bool) -> np.ndarray:
        if stop <= self.done and not at_end:
            return np.zeros(0, dtype=np.float32)
        start = max(0, self.done - self.context)
        segment = self.buffer[start - self.base:]
        out = np.asarray(self.denoiser(segment[None], strength=self.strength), dtype=np.float32)[0]
        out = out[self.done - start: stop - start]
        self.done = stop
        drop = max(0, stop - self.context) - self.base
        if drop > 0:
            self.buffer, self.base = self.buffer[drop:], self.base + drop
        return out


def prepare_vocode(cfg: WorkflowConfig, mels: str | Path, *, model=None, name: str | None = None,
                   out_dir: str | Path | None = None, force: bool = False, engine: str = "local") -> VocodeJob:
    """Read and check every mel of `mels`, then what is left to vocode into `out_dir` (nothing written)."""
    force = forced(force)  # `run --force` reaches the notebooks' stage calls
    out_dir = Path(out_dir) if out_dir else cfg.layout.vocode_dir
    model_config = resolve_model_config(cfg, model)
    stft = STFTConfig(n_mel_channels=model_config.n_mel_channels)
    # by blocks: the length here, and the frames as they are vocoded (memory: a chunk, not the mel)
    items, reader = mel_folder_items(mels, mel_file_reader(cfg, model_config.n_mel_channels, blocks=True))
    if not items:
        raise MelError(f"{mels}: no mels to vocode", path=Path(mels))
    name = name or backend_name(cfg)
    # the model by its fingerprint, never by the checkpoint's path (recorded beside it, for the reader)
    stamp = stage_stamp(cfg, {"backend": name, "precision": cfg.precision, "sigma": cfg.sigma, "seed": cfg.seed,
                              "noise": NOISE_SCHEME, "denoiser_strength": float(cfg.denoiser_strength),
                              "mel_layout": cfg.mel_layout, "mel_convert": cfg.mel_convert,
                              "out_bin": cfg.vocode_out_bin}, model=model)
    settings = {"checkpoint": cfg.checkpoint, **stamp}
    record_path = out_dir / VOCODE_RECORD_FILE
    # only says what may be skipped (stale wavs are redone): damaged (not JSON, a field of the wrong shape), it is
    # said and counts as none; a damaged entry, its wav is redone
    record = {} if force else read_record(record_path, JobRecord, "the vocode stage's record",
                                          entries=VocodeEntry, on_damage=announce_redo)
    done: dict = record.get("items", {})
    stamps = file_stamps(cfg)
    # each mel by its content (cached by file stamps: a re-run does not read the mels again to hash them)
    sources = {u.id: {"source": str(u.bin_path), "source_sha256": stamps.sha256(u.bin_path, "a mel file", MelError),
                      "samples": _source_samples(u.bin_path)} for u in items}
    redone: dict = {}

    def finished(u: Utterance) -> bool:
        # an entry records the folder's stamp under "settings" and its own source beside it
        entry = done.get(u.id, {})  # records.read_record: an entry, when there is one, is of the right shape
        if entry.get("settings") is None:
            return False
        recorded = {**entry["settings"], SOURCE_KEY: entry.get(SOURCE_KEY)}
        if not is_current(recorded, {**stamp, SOURCE_KEY: sources[u.id][SOURCE_KEY]}):
            return False
        files = entry.get(OUTPUT_KEY) or {}
        for path in item_outputs(out_dir, u.id, cfg.vocode_out_bin):
            why = stamps.changed(path, files.get(path.name))
            if why:
                redone[u.id] = announce_redo(f"{path}: {why}")
                return False
        return True

    todo = [u for u in items if not finished(u)]
    denoiser = None
    if todo and cfg.denoiser_strength > 0:
        denoiser = Denoiser.from_model(model if model is not None else load_waveglow(cfg.checkpoint_path))
    return VocodeJob(out_dir=out_dir, todo=todo, skipped=[u.id for u in items if u not in todo], backend=name,
                     settings=VocodeSettings(model_config, cfg.sigma, cfg.seed, cfg.exact_batching, stft.pad_value,
                                             reader, cfg.checkpoint, cfg.chunk_frames),
                     batch_size=cfg.batch_size, rate=stft.sampling_rate, record=record, output_settings=settings,
                     device=cfg.device, engine=engine, denoiser=denoiser,
                     denoiser_strength=float(cfg.denoiser_strength), write_bin=cfg.vocode_out_bin, sources=sources,
                     redone=redone, stamps=stamps)


@locked("vocode")
def vocode(cfg: WorkflowConfig, mels: str | Path, *, model=None, backend=None, out_dir: str | Path | None = None,
           force: bool = False) -> dict:
    """Vocode every mel of `mels` (a folder of `<id>.npy|.pt|.bin`, or one file) into `<out_dir>/<id>_syn.wav`.

    `out_dir` defaults to `runs/<name>/vocode/`. What shapes the audio: the model (its fingerprint: a
    checkpoint replaced at the same path is another model), `backend`, `precision`, `sigma`, `seed` (noise
    per file stem), `denoiser_strength`, `mel_layout`, `mel_convert`; `batch_size` and `chunk_frames`
    change memory and time, not the audio (exact batching). Runs on the engine `cfg.engine` names;
    `backend=` takes an opened Backend (not closed here) and runs in this process.
    Returns a summary with the written / skipped ids and the real-time factor.
    """
    job = prepare_vocode(cfg, mels, model=model, name=backend.name if backend is not None else None,
                         out_dir=out_dir, force=force, engine="local" if backend is not None else cfg.engine)
    return run_job(cfg, job, model=model, backend=backend)


def vocode_pipe(cfg: WorkflowConfig, mels: str | Path, out: BinaryIO, *, model=None, backend=None) -> dict:
    """One mel file → the data chunk of the `<id>_syn.wav` that `vocode` writes for it (same settings: raw
    PCM, int16 little-endian, mono, the model's rate), written to `out` as chunks finish: a mel longer than
    `chunk_window(chunk_frames)` chunk by chunk (the stage's `WavSink` path), a shorter one whole (its
    `write_item` path), so the bytes are the wav's. Nothing is written to files and nothing is skipped; runs
    in this process (`backend=`: an opened one, not closed here). The format and progress go to stderr.
    A closed `out` (the player quit) raises BrokenPipeError, after which nothing more is computed."""
    job = prepare_vocode(cfg, mels, model=model, name=backend.name if backend is not None else None, force=True,
                         engine="local")
    if len(job.todo) != 1:
        raise MelError(f"{mels}: holds {len(job.todo)} mels; the stdout pipe carries one utterance's audio: give "
                       "one mel file", path=Path(mels))
    utterance = job.todo[0]
    rate = job.rate
    print(f"vocode {utterance.id} → stdout: raw PCM, signed 16-bit little-endian, mono, {rate} Hz (the data "
          f"chunk of {utterance.id}_syn.wav); play it with: aplay -r {rate} -f S16_LE -c 1  (or sox -t raw -r "
          f"{rate} -e signed -b 16 -c 1 - -d)", file=sys.stderr, flush=True)
    own_backend = backend is None
    if own_backend:
        backend = open_backend(cfg, model=model, model_config=job.settings.model_config, name=job.backend)
    sink = job.pipe_writer(utterance, out)
    total = utterance.frames * job.settings.model_config.hop_length
    t0 = time.perf_counter()
    try:
        with tqdm(total=total, unit_scale=1 / rate, desc=f"vocode → stdout (s16le {rate} Hz, {backend.name})",
                  bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s audio [{elapsed}<{remaining}]",
                  file=sys.stderr) as bar:
            result = vocode_batch(backend, job.settings, [utterance], stream=lambda u: sink, progress=bar.update)
        audio = result.audios[0]
        if isinstance(audio, StreamedAudio):  # written chunk by chunk, as the stage's WavSink writes the wav
            samples = audio.size
        else:  # short: one piece, as write_item writes it
            audio = job.wav_audio(utterance, audio)
            sink.wav.write(audio)
            samples = int(audio.size)
    finally:
        if own_backend:
            backend.close()
    seconds = time.perf_counter() - t0
    return {"id": utterance.id, "format": "s16le", "rate": rate, "channels": 1, "samples": samples,
            "bytes": sink.wav.data_bytes, "seconds": round(seconds, 3),
            "real_time_factor": round(seconds / (samples / rate), 4) if samples else None}


def stream_matches_offline(cfg: WorkflowConfig, mel, utt_id: str, *, model=None, chunk_frames: int | None = None,
                           backend=None) -> dict:
    """Feed `mel` frame by frame through `batching.vocode_stream` (as a TTS front-end would) and compare the
    joined stream with one-shot synthesis of the whole mel, same noise: {chunks, samples, snr_db, precision}."""
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
        precision = getattr(backend, "precision", None)   # what `auto` became
    finally:
        if own_backend:
            backend.close()
    return {"chunk_frames": chunk_frames, "chunks": len(pieces), "samples": int(offline.size),
            "snr_db": round(snr_db(offline, np.concatenate(pieces)), 1), "precision": precision}
