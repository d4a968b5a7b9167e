"""Stage 4, infer: mel `.bin` files → `out/<id>_out.bin` float32 audio, with any backend, in true batches
(planned, padded and made exact by `waveglow_lib.batching`).

Resumable: an utterance whose `<id>_out.bin` exists is skipped; each file is written atomically as soon
as its batch finishes, so a crash loses only the batch in flight.

The work is split so that every engine (`waveglow_lib.engines`: this process, or a Ray actor pool) does
the same three things: `prepare_infer` (check the inputs, what is left to do, the batch plan),
`vocode_batch` (one batch → audio, wherever the backend lives) and `InferJob.write` (atomic outputs and
`timings.json`, in the process that owns the run folder).
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from ..backends import ModelSpec, get_backend, resolve_backend
from ..batching import NOISE_SCHEME, Utterance, check_mel, plan_batches, utterance_noise, vocode
from ..checkpoint import load_waveglow
from ..config import ModelConfig, STFTConfig, WorkflowConfig
from ..errors import (ConfigError, DataError, InputNotFound, ManifestError, MelError, ResourceError, RunFolderError,
                      SynthesisError)
from ..io import atomic_write_json, read_bin, read_json, write_bin
from ..layout import TIMINGS_FILE, gears_file, load_manifest, mel_bin, out_bin
from ..mel_input import list_mels, read_mel
from ..runlock import locked
from .stamps import checkpoint_stft, model_stamp

#: settings that change the audio: outputs made with other values are not silently mixed with new ones
OUTPUT_SETTINGS = ("checkpoint", "model", "sigma", "seed", "backend", "precision", "noise")


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
    (`<name>.json`, for the `.om` the gears file and the ONNX's record) names the model's fingerprint.
    RunFolderError saying what to redo otherwise: vocoding with another model's graph is never silent."""
    layout = cfg.layout
    if not path.is_file():
        return  # the backend's own error says which stage makes it
    layout.check(path, "the model file")
    expected = model_stamp(cfg, model)
    onnx_info = (read_json(layout.onnx.with_suffix(".json"), "the export record")
                 if layout.onnx.with_suffix(".json").is_file() else {})
    if path == layout.om:
        gears = gears_file(path)
        record = read_json(gears, "the gears the .om was built for") if gears.is_file() else {}
        recorded = (record.get("source") or {}).get("model") or onnx_info.get("model_fingerprint")
        redo = "the export and convert stages (then atc)"
    elif path == layout.onnx:
        recorded = onnx_info.get("model_fingerprint")
        redo = "the export stage"
    else:
        record_path = path.with_suffix(".json")
        record = read_json(record_path, "the record of what a converted model was made from") \
            if record_path.is_file() else {}
        recorded = (record.get("source") or {}).get("model")
        redo = "the convert stage"
    if recorded == expected:
        return
    if not recorded:
        raise RunFolderError(f"{path}: no record of the model it was made from; run {redo} again "
                             "(or pass --force to those stages)", path=path)
    raise RunFolderError(f"{path}: made from another model (fingerprint {recorded}) than this run's "
                         f"{cfg.checkpoint} ({expected}); run {redo} again, or use the checkpoint it was made "
                         "from", path=path)


def check_mel_settings(cfg: WorkflowConfig, manifest: dict, manifest_path: Path) -> None:
    """Mels made with other STFT settings than the model was trained on vocode into wrong audio: refuse."""
    made = (manifest.get("settings") or {}).get("stft")
    if not made:
        return  # a manifest of mels made elsewhere: their format was checked when read
    model_stft = checkpoint_stft(cfg).to_dict()
    changed = {k: (made.get(k), model_stft.get(k)) for k in model_stft if made.get(k) != model_stft.get(k)}
    if changed:
        raise MelError(f"{manifest_path}: the mels were made with other STFT settings than the model "
                       f"{cfg.checkpoint} expects ({', '.join(f'{k}: {a} vs {b}' for k, (a, b) in changed.items())}); "
                       "run the preprocess stage again (it redoes mels whose settings changed)", path=manifest_path)


def resolve_model_config(cfg: WorkflowConfig, model=None) -> ModelConfig:
    """The model's config: from the model, else from the export record, else by loading the checkpoint."""
    if model is not None:
        return model.config
    info_path = cfg.layout.onnx.with_suffix(".json")
    if info_path.is_file():
        info = read_json(info_path, "the export record (model_config, opset, ...)")
        if "model_config" in info:
            return ModelConfig.from_dict(info["model_config"])
    return load_waveglow(cfg.checkpoint_path).config


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

    def __call__(self, item: Utterance) -> np.ndarray:
        return read_mel(item.bin_path, self.n_mel, layout=self.layout, convert=self.convert,
                        stft=STFTConfig(n_mel_channels=self.n_mel))


def mel_folder_items(folder: str | Path, reader: MelFileReader | None = None) -> tuple[list[Utterance], MelFileReader]:
    """Work items for a folder (or one file) of mels (`mel_input.list_mels`), each read and checked once
    here for its length by `reader` (default: 80 bands, layout auto, no conversion): a file in the wrong
    format is refused by name before any audio is made."""
    reader = reader or MelFileReader(80)
    items = [Utterance(utt_id, reader(Utterance(utt_id, 0, path)).shape[1], path) for utt_id, path in list_mels(folder)]
    return items, reader


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


def vocode_batch(backend, settings: VocodeSettings, batch: list[Utterance], worker: str = "local") -> BatchResult:
    """Read, noise and vocode one batch; every engine runs exactly this per batch. NaN/Inf audio is refused."""
    mels = [settings.read_mel(u) for u in batch]
    noises = [utterance_noise(settings.model_config, u.frames, settings.seed, u.id) for u in batch]
    calls_before = len(getattr(backend, "device_times_ms", None) or [])
    t0 = time.perf_counter()
    try:
        audios, stats = vocode(backend, mels, noises, settings.sigma, settings.model_config,
                               exact=settings.exact, pad_value=settings.pad_value,
                               chunk_frames=settings.chunk_frames)
    except MemoryError:
        raise ResourceError(f"{batch[0].bin_path}: out of memory vocoding a batch of {len(batch)} "
                            f"({max(u.frames for u in batch)} frames); lower batch_size",
                            path=batch[0].bin_path) from None
    seconds = time.perf_counter() - t0
    # the NPU's own time for this batch's calls (om backend), from ais_bench
    device_ms = list((getattr(backend, "device_times_ms", None) or [])[calls_before:])
    for u, audio in zip(batch, audios):
        if not np.isfinite(audio).all():
            # the mel was checked finite when read: the weights or the arithmetic are to blame
            raise SynthesisError(f"{u.bin_path}: the {backend.name} backend produced NaN/Inf audio from a finite "
                                 f"mel; check the checkpoint {settings.checkpoint} (NaN/Inf weights?) and the precision "
                                 f"({getattr(backend, 'precision', '?')}; try fp32)", path=u.bin_path)
    return BatchResult(list(batch), audios, stats, seconds, device_ms, worker, backend_info(backend))


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
    written: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

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
        """Write one utterance's output atomically; returns what its record entry says of the output."""
        write_bin(out_bin(self.out_dir, utterance.id), audio)
        return {"frames": utterance.frames, "samples": int(audio.size)}

    def summary(self) -> dict:
        total = time.perf_counter() - self.started
        items = self.record.get("items", {})
        audio_seconds = sum(items[i]["audio_seconds"] for i in self.written)
        return {"out_dir": str(self.out_dir), "engine": self.engine,
                "backend": self.record.get("settings", {}).get("backend_used"), "written": list(self.written),
                "skipped": self.skipped, "seconds": round(total, 3), "audio_seconds": round(audio_seconds, 3),
                "real_time_factor": round(total / audio_seconds, 4) if audio_seconds else None,
                "workers": self.record.get("workers", {}), "timings": str(self.timings_path)}


def manifest_items(mel_dir: Path, manifest: dict, model_config: ModelConfig) -> list[Utterance]:
    """The manifest's utterances, each checked against the model and its file (nothing read but sizes)."""
    utterances = []
    for item in manifest["items"]:
        path = mel_bin(mel_dir, item)
        shape = tuple(item["shape"])
        if len(shape) != 2 or shape[0] != model_config.n_mel_channels:
            raise ManifestError(f"{path}: mel has shape {list(shape)}, this model needs "
                                f"[{model_config.n_mel_channels}, T] (n_mel_channels differ)", path=path)
        if int(item["mel_frames"]) != shape[1]:
            raise ManifestError(f"{path}: manifest says {item['mel_frames']} frames but shape {list(shape)}",
                                path=path)
        expected = shape[0] * shape[1] * 4
        if not path.is_file():
            raise InputNotFound(f"{path}: mel file listed in {mel_dir / 'manifest.json'} is missing", path=path)
        if path.stat().st_size != expected:
            raise ManifestError(f"{path}: {path.stat().st_size} bytes, but manifest shape {list(shape)} of "
                                f"float32 needs {expected} bytes (truncated file, or a manifest from another run?)",
                                path=path)
        utterances.append(Utterance(item["id"], shape[1], path))
    return utterances


def prepare_infer(cfg: WorkflowConfig, *, model=None, name: str | None = None, out_dir: str | Path | None = None,
                  force: bool = False, items: list[Utterance] | None = None,
                  read_mel: Callable[[Utterance], np.ndarray] | None = None, pad_value: float | None = None,
                  rate: int | None = None, engine: str = "local") -> InferJob:
    """Check everything that can be checked without reading the data, before anything is written.

    By default the work items are `mel/manifest.json`'s utterances read from their `.bin`; a stage with
    other inputs (a folder of TTS mels) passes `items` and `read_mel` instead. Outputs made earlier with
    different output settings are refused unless `force`, which redoes everything.
    """
    model_config = resolve_model_config(cfg, model)
    if items is None:
        mel_dir = cfg.layout.mel_dir
        manifest = load_manifest(mel_dir)
        stft = manifest.get("settings", {}).get("stft", {})
        # pad with the mel of silence under the STFT settings the mels were made with
        pad_value = STFTConfig(**stft).pad_value if stft else STFTConfig().pad_value
        rate = int(manifest.get("sampling_rate", STFTConfig().sampling_rate))
        check_mel_settings(cfg, manifest, cfg.layout.manifest)
        items = manifest_items(mel_dir, manifest, model_config)
        read_mel = ManifestMelReader(model_config.n_mel_channels)
    pad_value = STFTConfig().pad_value if pad_value is None else pad_value
    rate = rate or STFTConfig().sampling_rate
    # an out_dir the user names may lie anywhere; the default one must stay in the run folder
    out_dir = Path(out_dir) if out_dir else cfg.layout.check(cfg.layout.out_dir, "the output folder")
    name = name or backend_name(cfg)
    settings = {"checkpoint": cfg.checkpoint, "model": model_stamp(cfg, model), "sigma": cfg.sigma,
                "seed": cfg.seed, "backend": name, "precision": cfg.precision, "noise": NOISE_SCHEME}
    timings_path = out_dir / TIMINGS_FILE
    record = {}
    if timings_path.is_file():
        try:
            record = read_json(timings_path, "the infer stage's settings and per-utterance timings")
        except DataError as exc:
            if not force:
                raise DataError(f"{exc}; or pass force=True (CLI --force) to redo the outputs",
                                path=timings_path) from None
    if record and not force:
        old = {k: record.get("settings", {}).get(k) for k in OUTPUT_SETTINGS}
        if old["model"] is None:
            old["model"] = settings["model"]  # a record from before fingerprints: the checkpoint path decides
        changed = {k: (old[k], settings[k]) for k in OUTPUT_SETTINGS if old[k] != settings[k]}
        if changed:
            raise ConfigError(f"{out_dir}: holds outputs made with other settings "
                             f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changed.items())}); "
                             "pass force=True (CLI --force) to redo them, or use another run name / out_dir")
    if force:
        record = {}
    hop = model_config.hop_length

    def finished(u: Utterance) -> bool:
        target = out_bin(out_dir, u.id)
        # a link is never a finished output: it is replaced by the file (writes never follow links)
        return (not force and target.is_file() and not target.is_symlink()
                and target.stat().st_size == u.frames * hop * 4)

    todo = [u for u in items if not finished(u)]
    return InferJob(out_dir=out_dir, todo=todo, skipped=[u.id for u in items if u not in todo], backend=name,
                    settings=VocodeSettings(model_config, cfg.sigma, cfg.seed, cfg.exact_batching, pad_value,
                                            read_mel, cfg.checkpoint, cfg.chunk_frames),
                    batch_size=cfg.batch_size, rate=rate, record=record, output_settings=settings,
                    device=cfg.device, engine=engine)


def run_batches(job: InferJob, backend) -> None:
    """Every batch of the plan through `backend` in this process, each written as soon as it finishes."""
    # nothing to do: no empty "0/0" bar (the notebook says the stage was skipped)
    with tqdm(total=len(job.todo), desc=f"infer ({getattr(backend, 'name', '-')})", unit="utt",
              disable=not job.todo) as bar:
        for index, batch in enumerate(job.batches()):
            job.write(index, vocode_batch(backend, job.settings, batch))
            bar.update(len(batch))


def run_local(cfg: WorkflowConfig, job: InferJob, *, model=None, backend=None) -> dict:
    """The local engine: open the backend (unless given; a given one is not closed), run `job`, summarise."""
    own_backend = backend is None
    if own_backend and job.todo:
        backend = open_backend(cfg, model=model, model_config=job.settings.model_config, name=job.backend)
    try:
        job.start(backend_info(backend) if backend is not None else None)
        run_batches(job, backend)
    finally:
        if own_backend and backend is not None:
            backend.close()
    return job.summary()


@locked("infer")
def infer(cfg: WorkflowConfig, *, model=None, backend=None, out_dir: str | Path | None = None,
          force: bool = False) -> dict:
    """Vocode every utterance of `mel/manifest.json` into `out/<id>_out.bin` in this process; returns a summary.

    `cfg.sigma` defaults to 0.6: the flow is trained with sigma 1.0, but NVIDIA's inference default
    samples at 0.6, a lower temperature that trades a little naturalness for audibly less background
    noise/hiss. `backend=` takes an opened Backend (it is not closed here); else one is opened from `cfg`
    (`model=` avoids reloading the checkpoint for the torch backend). Per-item timings go to
    `out/timings.json`. Outputs made earlier with different output settings (sigma, seed, backend,
    precision, checkpoint) are refused unless `force=True`, which redoes everything. An utterance longer
    than `cfg.chunk_frames` + the model's context is vocoded alone in chunks (`batching.vocode_chunked`:
    exactly the one-shot output, memory bounded by the chunk). `cfg.engine` is not
    read here: `waveglow_lib.engines.infer` chooses between this and a Ray cluster.
    """
    job = prepare_infer(cfg, model=model, name=backend.name if backend is not None else None, out_dir=out_dir,
                        force=force)
    return run_local(cfg, job, model=model, backend=backend)
