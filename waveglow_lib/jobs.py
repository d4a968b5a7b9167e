"""Jobs: the vocoding work a stage prepares and an engine runs, below both (`stages/` → `engines/` → here).

A job (`InferJob`) is one output folder's work: the items still to do, how to read each one's mel
(`ManifestMelReader`, `MelFileReader`: small and picklable, so a remote worker can hold them), the settings
a worker needs (`VocodeSettings`), the batch plan, and the folder's record (`timings.json`, or a
subclass's own), which only the process that owns the folder writes. Every engine does the same three
things with it: `job.start()`, `vocode_batch` per planned batch (wherever the backend lives: this
process, a Ray actor), `job.write` per result (atomic outputs, then the record), and returns
`job.summary()`.

A stage builds its job: `prepare_job` for raw `<id>_out.bin` outputs (the infer stage, or any folder of
mels), a subclass with its own writer like `stages.vocode.VocodeJob`. What makes an output reusable is
its resume stamp (`waveglow_lib.stamps`). The backend helpers (`backend_name`, `open_backend`, which
checks an exported model file was made from the run's model) live here too: engines open backends.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .backends import ModelSpec, get_backend, resolve_backend
from .batching import Utterance, batch_noise, check_mel, chunk_window, plan_batches, vocode
from .checkpoint import load_waveglow
from .config import FORCE_ADVICE, ModelConfig, STFTConfig, WorkflowConfig, forced
from .convert import load_export_info
from .errors import ConfigError, ResourceError, RunFolderError, SynthesisError
from .io import allocation_problem, atomic_write_json, read_bin, write_bin
from .layout import TIMINGS_FILE, gears_file, out_bin, record_path
from .mel_input import list_mels, open_mel, read_mel
from .records import ConvertedRecord, GearsRecord, JobRecord, TimingsEntry, read_record
from .stamps import (OUTPUT_KEY, SOURCE_KEY, FileStamps, announce_redo, differences, file_stamps, model_changed,
                     model_stamp)


# --- backends ---------------------------------------------------------------------------------------------
def backend_name(cfg: WorkflowConfig) -> str:
    """The backend `cfg.backend` stands for (`auto` resolved against the files the earlier stages made)."""
    files = cfg.layout.model_files()
    return resolve_backend(cfg.backend, device=cfg.device, onnx_path=files["onnx"], om_path=files["om"])


def open_backend(cfg: WorkflowConfig, model=None, model_config: ModelConfig | None = None,
                 name: str | None = None, threads: int | None = None):
    """The backend `name` (default: `cfg.backend`, `auto` resolved), on the best file earlier stages made.

    `threads` caps the backend's cores (an engine's worker gets the CPUs it reserved); the `om` backend
    runs on its NPU and takes none.
    """
    files = cfg.layout.model_files()
    name = name or backend_name(cfg)
    opts = {"threads": threads} if threads and name != "om" else {}
    if name in ("torch", "fast"):  # built from the model itself, no exported file
        if model is None:
            model = load_waveglow(cfg.checkpoint_path)
        if name == "fast":  # the engine cache (backends/fast/cache.py)
            opts["cache_dir"] = cfg.cache_dir
        return get_backend(name, model=model, device=cfg.device, precision=cfg.precision, **opts)
    spec = ModelSpec.from_model_config(model_config or model.config)
    if name == "om":
        check_model_file(cfg, files["om"], model)
        return get_backend("om", om_path=files["om"], device=cfg.device, precision=cfg.precision, spec=spec)
    path = files["onnx"]
    if name == "openvino" and files["openvino_ir"].is_file():
        path = files["openvino_ir"]
    if name == "onnxruntime" and files["onnx_optimized"].is_file() and cfg.device == "cpu":
        path = files["onnx_optimized"]
    check_model_file(cfg, path, model)
    return get_backend(name, onnx_path=path, device=cfg.device, precision=cfg.precision, spec=spec, **opts)


def check_model_file(cfg: WorkflowConfig, path: Path, model=None) -> None:
    """An exported or converted model file must have been made from the run's model (or `model`): its record
    (`<name>.json`, for the `.om` the gears file and the ONNX's record) names the model's fingerprint, and
    lists the files it is (the graph and any external data, the IR's .xml and .bin) by size and sha256, which
    they must still have (`stamps.FileStamps.files_changed`). The `.om`'s content is checked when the convert
    stage ran atc here (else it was built elsewhere, from the script, and has no record of its bytes).
    RunFolderError saying what to redo otherwise: vocoding with another model's graph is never silent."""
    layout = cfg.layout
    if not path.is_file():
        return  # the backend's own error says which stage makes it
    layout.check(path, "the model file")
    expected = model_stamp(cfg, model)
    onnx_info = load_export_info(layout.onnx)
    record_file = record_path(path)
    if path == layout.om:
        redo = "the export and convert stages (then atc)"
        record_file = gears_file(path)
        record = read_record(record_file, GearsRecord, "the gears the .om was built for",
                             damaged="refuse", advice=f"run {redo} again")
        recorded = record.get("source", {}).get("model") or onnx_info.get("model_fingerprint")
    elif path == layout.onnx:
        record = onnx_info
        recorded = onnx_info.get("model_fingerprint")
        redo = "the export stage"
    else:
        redo = "the convert stage"
        record = read_record(record_file, ConvertedRecord, "the record of what a converted model was made from",
                             damaged="refuse", advice=f"run {redo} again")
        recorded = record.get("source", {}).get("model")
    if recorded == expected:
        # an .om built by atc elsewhere (from the script) has no record of its bytes
        why = None if path == layout.om and "files" not in record else \
            file_stamps(cfg).files_changed(path.parent, record.get("files"), including=path.name)
        if why:
            raise RunFolderError(f"{why}: not the model file {record_file} describes; run {redo} again "
                                 f"(or {FORCE_ADVICE})", path=path)
        return
    if not recorded:
        raise RunFolderError(f"{path}: no record of the model it was made from; run {redo} again "
                             f"(or {FORCE_ADVICE})", path=path)
    raise RunFolderError(f"{path}: made from another model (fingerprint {recorded}) than this run's "
                         f"{cfg.checkpoint} ({expected}); run {redo} again, or use the checkpoint it was made "
                         "from", path=path)


def resolve_model_config(cfg: WorkflowConfig, model=None) -> ModelConfig:
    """The model's config: from the model, else from the export record, else by loading the checkpoint."""
    if model is not None:
        return model.config
    info = load_export_info(cfg.layout.onnx)
    if "model_config" in info:
        return ModelConfig.from_dict(info["model_config"])
    return load_waveglow(cfg.checkpoint_path).config


# --- reading the work items' mels -------------------------------------------------------------------------
@dataclass(frozen=True)
class ManifestMelReader:
    """Reads a work item's mel from the manifest's raw `.bin` (picklable, so a remote worker can hold it)."""

    n_mel: int

    def __call__(self, item: Utterance) -> np.ndarray:
        mel = read_bin(item.bin_path, (self.n_mel, item.frames))
        check_mel(item.bin_path, mel)
        return mel


@dataclass(frozen=True)
class MelFileReader:
    """Reads a work item's mel from a TTS model's file (`.npy`, `.pt`, `.bin`) through `mel_input.read_mel`,
    format check included (picklable, like ManifestMelReader)."""

    n_mel: int
    #: `mel_input.read_mel`'s layout and (asked-for) conversion
    layout: str = "auto"
    convert: str | None = None
    #: `mel_input.open_mel`: read by blocks as it is vocoded (memory: a chunk), not whole
    blocks: bool = False

    def __call__(self, item: Utterance) -> np.ndarray:
        return (open_mel if self.blocks else read_mel)(item.bin_path, self.n_mel, layout=self.layout,
                                                       convert=self.convert, stft=STFTConfig(n_mel_channels=self.n_mel))


def mel_folder_items(folder: str | Path, reader: MelFileReader | None = None) -> tuple[list[Utterance], MelFileReader]:
    """Work items for a folder (or one file) of mels (`mel_input.list_mels`), each read and checked once
    here for its length by `reader` (default: 80 bands, layout auto, no conversion): a file in the wrong
    format is refused by name before any audio is made."""
    reader = reader or MelFileReader(80)
    items = [Utterance(utt_id, reader(Utterance(utt_id, 0, path)).shape[1], path) for utt_id, path in list_mels(folder)]
    return items, reader


# --- one batch, wherever the backend lives ----------------------------------------------------------------
@dataclass(frozen=True)
class VocodeSettings:
    """What a worker needs to turn a batch of work items into audio: small and picklable.

    `read_mel(item) -> float32 [n_mel, item.frames]` reads one item's mel wherever it lives (the manifest's
    `.bin`, a TTS model's `.npy`, ...)."""

    model_config: ModelConfig
    sigma: float
    seed: int
    exact: bool
    pad_value: float
    read_mel: Callable[[Utterance], np.ndarray]
    #: named when the audio comes out NaN from a finite mel
    checkpoint: str = "?"
    #: utterances longer than this (+ the model's context) are vocoded alone in exact chunks; 0 = never
    chunk_frames: int = 0


@dataclass
class BatchResult:
    """One vocoded batch: the audio of each item, the batching stats, and who made it how fast."""

    items: list[Utterance]
    audios: list[np.ndarray]
    stats: dict
    seconds: float
    device_ms: list[float] = field(default_factory=list)
    worker: str = "local"
    backend_info: dict = field(default_factory=dict)


def worker_name() -> str:
    """host:pid — names a worker in timings.json (a Ray actor is one process)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def backend_info(backend) -> dict:
    """What timings.json says about the backend that ran (its description, precision, auto's probe)."""
    return {"backend_used": getattr(backend, "description", getattr(backend, "name", "?")),
            "precision_used": getattr(backend, "precision", None),
            # precision auto: the fast backend's quality probe (fast.auto_engine)
            **({"precision_probe": backend.probe} if getattr(backend, "probe", None) else {})}


@dataclass(frozen=True)
class StreamedAudio:
    """An utterance's audio that went to its job's `stream_writer` chunk by chunk (never held whole): its
    sample count and what the writer says of its output (the record entry)."""

    size: int
    entry: dict


def vocode_batch(backend, settings: VocodeSettings, batch: list[Utterance], worker: str = "local", *,
                 stream: Callable[[Utterance], Any] | None = None,
                 progress: Callable[[int], None] | None = None) -> BatchResult:
    """Read, noise and vocode one batch; every engine runs exactly this per batch. NaN/Inf audio is refused.

    `stream(utterance)` (a job's `stream_writer`; this process only): a writer (`write(audio)`, `finish()
    -> entry`, `abort()`) for each utterance vocoded in chunks, which then gets its audio chunk by chunk and
    comes back as a StreamedAudio. `progress(samples)`: told as audio is made, inside an utterance too.
    """
    mels = [settings.read_mel(u) for u in batch]
    noises = [batch_noise(settings.model_config, u.frames, settings.seed, u.id, settings.chunk_frames) for u in batch]
    chunked = settings.chunk_frames > 0 and stream is not None
    window = chunk_window(settings.model_config, settings.chunk_frames) if chunked else 0
    writers = {i: stream(u) for i, u in enumerate(batch) if chunked and u.frames > window}
    calls_before = len(getattr(backend, "device_times_ms", None) or [])
    t0 = time.perf_counter()
    try:
        audios, stats = vocode(backend, mels, noises, settings.sigma, settings.model_config,
                               exact=settings.exact, pad_value=settings.pad_value,
                               chunk_frames=settings.chunk_frames, progress=progress,
                               sinks={i: _finite_to(w, batch[i], backend, settings) for i, w in writers.items()})
        for i, writer in writers.items():
            audios[i] = StreamedAudio(*writer.finish())
    except BaseException as exc:
        for writer in writers.values():
            writer.abort()
        problem = allocation_problem(exc)
        if problem:
            raise ResourceError(f"{batch[0].bin_path}: {problem} vocoding a batch of {len(batch)} "
                                f"({max(u.frames for u in batch)} frames); lower batch_size or chunk_frames",
                                path=batch[0].bin_path) from None
        raise
    seconds = time.perf_counter() - t0
    # the NPU's own time for this batch's calls (om backend), from ais_bench
    device_ms = list((getattr(backend, "device_times_ms", None) or [])[calls_before:])
    for u, audio in zip(batch, audios):
        if isinstance(audio, np.ndarray):
            _check_finite(audio, u, backend, settings)
    return BatchResult(list(batch), audios, stats, seconds, device_ms, worker, backend_info(backend))


def _finite_to(writer, u: Utterance, backend, settings: VocodeSettings) -> Callable[[np.ndarray], None]:
    def write(audio: np.ndarray) -> None:
        _check_finite(audio, u, backend, settings)
        writer.write(audio)
    return write


def _check_finite(audio: np.ndarray, u: Utterance, backend, settings: VocodeSettings) -> None:
    if not np.isfinite(audio).all():
        # the mel was checked finite when read: the weights or the arithmetic are to blame
        raise SynthesisError(f"{u.bin_path}: the {backend.name} backend produced NaN/Inf audio from a finite "
                             f"mel; check the checkpoint {settings.checkpoint} (NaN/Inf weights?) and the precision "
                             f"({getattr(backend, 'precision', '?')}; try fp32)", path=u.bin_path)


# --- the job: what is left to do, and its record -----------------------------------------------------------
#: a job's record (`timings.json`, `vocode.json`) is `records.JobRecord`, its entries `records.TimingsEntry`
#: (infer) and `records.VocodeEntry` (vocode)


@dataclass
class InferJob:
    """What is left to vocode for one output folder, and its `timings.json` record (owned by one process)."""

    out_dir: Path
    settings: VocodeSettings
    todo: list[Utterance]
    skipped: list[str]
    backend: str
    batch_size: int
    rate: int
    record: dict
    output_settings: dict
    device: str = "cpu"
    engine: str = "local"
    #: id → {"source_sha256": ..., ...}: what each item is made from (recorded with its output)
    sources: dict = field(default_factory=dict)
    #: id → "<file>: why" for each finished output made again because it no longer matched its record
    redone: dict = field(default_factory=dict)
    #: the run's file stamps (`stamps.file_stamps`): each output's size and sha256 go into the record
    stamps: FileStamps | None = None
    written: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    #: a job that writes an utterance's audio as it is made, chunk by chunk (`vocode_batch`'s `stream`),
    #: defines it (stages.vocode.VocodeJob); this one writes each output whole
    stream_writer = None

    @property
    def timings_path(self) -> Path:
        return self.out_dir / TIMINGS_FILE

    def batches(self) -> list[list[Utterance]]:
        return plan_batches(self.todo, self.batch_size)

    def start(self, info: dict | None = None) -> None:
        """Write the record's header (before any output) when there is work, or when none exists yet."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.todo or not self.timings_path.is_file():
            old = self.record.get("settings", {})
            info = info or {k: old.get(k) for k in ("backend_used", "precision_used")}
            self.record = {"settings": {**self.output_settings, "batch_size": self.batch_size, **info,
                                        "device": self.device, "engine": self.engine},
                           "items": self.record.get("items", {}), "workers": {}}
            atomic_write_json(self.timings_path, self.record)

    def write(self, index: int, result: BatchResult) -> list[str]:
        """Write one batch's outputs atomically, then its timings (so a crash loses at most this batch)."""
        items = self.record["items"]
        self.record["settings"].update(result.backend_info)
        batch_frames = sum(u.frames for u in result.items)
        for position, (u, audio) in enumerate(zip(result.items, result.audios)):
            items[u.id] = {
                **self.write_item(u, audio), "batch": index,
                "batch_items": len(result.items), "padded_frames": result.stats["padded_frames"],
                "tail_frames": result.stats["tail_frames"], "exact": position not in result.stats["inexact"],
                # vocoded alone in chunks of chunk_frames (+ context): exact, bounded memory
                **({"chunked": True} if position in result.stats.get("chunked", ()) else {}),
                "batch_seconds": round(result.seconds, 6),
                "seconds": round(result.seconds * u.frames / batch_frames, 6),
                "audio_seconds": round(audio.size / self.rate, 4), "worker": result.worker,
                **({"batch_device_ms": round(sum(result.device_ms), 3)} if result.device_ms else {})}
            self.written.append(u.id)
        worker = self.record["workers"].setdefault(result.worker, {"batches": 0, "items": 0, "busy_seconds": 0.0,
                                                                   "audio_seconds": 0.0})
        worker["batches"] += 1
        worker["items"] += len(result.items)
        worker["busy_seconds"] = round(worker["busy_seconds"] + result.seconds, 6)
        worker["audio_seconds"] = round(worker["audio_seconds"] + sum(a.size for a in result.audios) / self.rate, 4)
        # throughput while vocoding (audio seconds per busy second): the per-worker rate an engine scales
        worker["audio_seconds_per_second"] = round(worker["audio_seconds"] / worker["busy_seconds"], 4) \
            if worker["busy_seconds"] else None
        atomic_write_json(self.timings_path, self.record)
        return [u.id for u in result.items]

    def write_item(self, utterance: Utterance, audio: np.ndarray) -> dict:
        """Write one utterance's output atomically; returns what its record entry says of the output (with
        its size and sha256 under OUTPUT_KEY, checked before it is skipped again)."""
        target = out_bin(self.out_dir, utterance.id)
        write_bin(target, audio)
        source = self.sources.get(utterance.id) or {}
        return {"frames": utterance.frames, "samples": int(audio.size), OUTPUT_KEY: self.stamps.entry(target),
                **({SOURCE_KEY: source[SOURCE_KEY]} if source.get(SOURCE_KEY) else {})}

    def summary(self) -> dict:
        total = time.perf_counter() - self.started
        items = self.record.get("items", {})
        if self.stamps is not None:
            self.stamps.save()  # what this run hashed: the next one only stats the files
        audio_seconds = sum(items[i]["audio_seconds"] for i in self.written)
        return {"out_dir": str(self.out_dir), "engine": self.engine,
                "backend": self.record.get("settings", {}).get("backend_used"), "written": list(self.written),
                "skipped": self.skipped, "redone": self.redone, "seconds": round(total, 3),
                "audio_seconds": round(audio_seconds, 3),
                "real_time_factor": round(total / audio_seconds, 4) if audio_seconds else None,
                "workers": self.record.get("workers", {}), "timings": str(self.timings_path)}


def prepare_job(cfg: WorkflowConfig, *, items: list[Utterance], read_mel: Callable[[Utterance], np.ndarray],
                model_config: ModelConfig, out_dir: Path, stamp: dict, name: str, pad_value: float, rate: int,
                force: bool = False, sources: dict | None = None, engine: str = "local") -> InferJob:
    """A job whose outputs are raw `<out_dir>/<id>_out.bin` float32 audio, recorded in `timings.json`.

    `stamp` (`stamps.stage_stamp`: model fingerprint and the settings that shape the audio) is the folder's:
    outputs made under another stamp are refused (ConfigError saying what changed, naming the checkpoint
    when the model did) unless `force`, which redoes everything; they are never mixed with new ones.
    An item is finished when its output still has the size and sha256 its record entry lists and, when
    `sources` gives its source's sha256, the entry names the same source (a mel made again from a changed
    wav is vocoded again). An output that no longer matches its entry (cut short, replaced, a link) is made
    again and named (on stderr, and in the summary's `redone`).
    """
    force = forced(force)  # `run --force` reaches the notebooks' stage calls
    sources = sources or {}
    timings_path = out_dir / TIMINGS_FILE
    # it says which settings the folder's outputs were made with (never mixed): a damaged one is refused;
    # a damaged entry only says less of what is finished (redone)
    record = {} if force else read_record(timings_path, JobRecord, "the infer stage's settings and per-utterance timings",
                                          entries=TimingsEntry,
                                          damaged="refuse", advice=f"or {FORCE_ADVICE}",
                                          on_damage=announce_redo)
    if record and not force:
        changed = differences(record.get("settings", {}), stamp)
        if changed:
            cause = model_changed(cfg, changed)
            raise ConfigError(f"{out_dir}: holds outputs made with other settings "
                              f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changed.items())}); "
                              + (f"{cause}; " if cause else "")
                              + f"{FORCE_ADVICE}, or use another run name / out_dir")
    if force:
        record = {}
    done = record.get("items", {})
    hop = model_config.hop_length
    stamps = file_stamps(cfg)
    redone: dict = {}

    def finished(u: Utterance) -> bool:
        source = (sources.get(u.id) or {}).get(SOURCE_KEY)
        entry = done.get(u.id)
        if force or not isinstance(entry, dict) or (source is not None and entry.get(SOURCE_KEY) != source):
            return False
        target = out_bin(out_dir, u.id)
        why = stamps.changed(target, entry.get(OUTPUT_KEY))
        if why is None and target.stat().st_size != u.frames * hop * 4:
            why = f"it has {target.stat().st_size} bytes, {u.frames} frames of audio need {u.frames * hop * 4}"
        if why:
            redone[u.id] = announce_redo(f"{target}: {why}")
        return why is None

    todo = [u for u in items if not finished(u)]
    return InferJob(out_dir=out_dir, todo=todo, skipped=[u.id for u in items if u not in todo], backend=name,
                    settings=VocodeSettings(model_config, cfg.sigma, cfg.seed, cfg.exact_batching, pad_value,
                                            read_mel, cfg.checkpoint, cfg.chunk_frames),
                    batch_size=cfg.batch_size, rate=rate, record=record,
                    output_settings={"checkpoint": cfg.checkpoint, **stamp}, device=cfg.device, engine=engine,
                    sources=sources, redone=redone, stamps=stamps)
