"""Stage 4, infer: mel `.bin` files → `out/<id>_out.bin` float32 audio, with any backend, in true batches
(planned, padded and made exact by `waveglow_lib.batching`).

Resumable: an utterance whose `<id>_out.bin` exists is skipped; each file is written atomically as soon
as its batch finishes, so a crash loses only the batch in flight.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..backends import ModelSpec, get_backend, resolve_backend
from ..batching import Utterance, check_mel, plan_batches, utterance_noise, vocode
from ..checkpoint import load_waveglow
from ..config import ModelConfig, STFTConfig, WorkflowConfig
from ..errors import InputNotFound, RunFolderError, ManifestError, SynthesisError
from ..io import atomic_write_json, read_bin, write_bin
from ..layout import TIMINGS_FILE, load_manifest, mel_bin, out_bin

#: settings that change the audio: outputs made with other values are not silently mixed with new ones
OUTPUT_SETTINGS = ("checkpoint", "sigma", "seed", "backend", "precision")


def backend_name(cfg: WorkflowConfig) -> str:
    """The backend `cfg.backend` stands for (`auto` resolved against the files the earlier stages made)."""
    files = cfg.layout.model_files()
    return resolve_backend(cfg.backend, device=cfg.device, onnx_path=files["onnx"], om_path=files["om"])


def open_backend(cfg: WorkflowConfig, model=None, model_config: ModelConfig | None = None,
                 name: str | None = None):
    """The backend `name` (default: `cfg.backend`, `auto` resolved), on the best file earlier stages made."""
    files = cfg.layout.model_files()
    name = name or backend_name(cfg)
    if name in ("torch", "fast"):  # built from the model itself, no exported file
        if model is None:
            model = load_waveglow(cfg.checkpoint_path)
        extra = {"cache_dir": cfg.cache_dir} if name == "fast" else {}  # the engine cache (backends/fast/cache.py)
        return get_backend(name, model=model, device=cfg.device, precision=cfg.precision, **extra)
    spec = ModelSpec.from_model_config(model_config or model.config)
    if name == "om":
        return get_backend("om", om_path=files["om"], device=cfg.device, precision=cfg.precision, spec=spec)
    path = files["onnx"]
    if name == "openvino" and files["openvino_ir"].is_file():
        path = files["openvino_ir"]
    if name == "onnxruntime" and files["onnx_optimized"].is_file() and cfg.device == "cpu":
        path = files["onnx_optimized"]
    return get_backend(name, onnx_path=path, device=cfg.device, precision=cfg.precision, spec=spec)


def resolve_model_config(cfg: WorkflowConfig, model=None) -> ModelConfig:
    """The model's config: from the model, else from the export record, else by loading the checkpoint."""
    if model is not None:
        return model.config
    info_path = cfg.layout.onnx.with_suffix(".json")
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if "model_config" in info:
            return ModelConfig.from_dict(info["model_config"])
    return load_waveglow(cfg.checkpoint_path).config


def infer(cfg: WorkflowConfig, *, model=None, backend=None, out_dir: str | Path | None = None,
          force: bool = False) -> dict:
    """Vocode every utterance of `mel/manifest.json` into `out/<id>_out.bin`; returns a summary.

    `cfg.sigma` defaults to 0.6: the flow is trained with sigma 1.0, but NVIDIA's inference default
    samples at 0.6, a lower temperature that trades a little naturalness for audibly less background
    noise/hiss. `backend=` takes an opened Backend (it is not closed here); else one is opened from `cfg`
    (`model=` avoids reloading the checkpoint for the torch backend). Per-item timings go to
    `out/timings.json`. Outputs made earlier with different output settings (sigma, seed, backend,
    precision, checkpoint) are refused unless `force=True`, which redoes everything.
    """
    mel_dir = cfg.layout.mel_dir
    manifest = load_manifest(mel_dir)
    out_dir = Path(out_dir) if out_dir else cfg.layout.out_dir
    model_config = resolve_model_config(cfg, model)
    hop = model_config.hop_length
    stft = manifest.get("settings", {}).get("stft", {})
    # pad with the mel of silence under the STFT settings the mels were made with
    pad_value = STFTConfig(**stft).pad_value if stft else STFTConfig().pad_value
    rate = int(manifest.get("sampling_rate", STFTConfig().sampling_rate))

    # validate everything that can be checked without reading the data, before writing anything
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

    name = backend.name if backend is not None else backend_name(cfg)
    settings = {"checkpoint": cfg.checkpoint, "sigma": cfg.sigma, "seed": cfg.seed,
                "backend": name, "precision": cfg.precision}
    timings_path = out_dir / TIMINGS_FILE
    record = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    if record and not force:
        old = {k: record.get("settings", {}).get(k) for k in OUTPUT_SETTINGS}
        changed = {k: (old[k], settings[k]) for k in OUTPUT_SETTINGS if old[k] != settings[k]}
        if changed:
            raise RunFolderError(f"{out_dir}: holds outputs made with other settings "
                             f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changed.items())}); "
                             "pass force=True (CLI --force) to redo them, or use another run name / out_dir")
    if force:
        record = {}
    items_record: dict = record.get("items", {})

    def finished(u: Utterance) -> bool:
        target = out_bin(out_dir, u.id)
        return not force and target.is_file() and target.stat().st_size == u.frames * hop * 4

    todo = [u for u in utterances if not finished(u)]
    skipped = [u.id for u in utterances if u not in todo]
    own_backend = backend is None
    if own_backend and todo:
        backend = open_backend(cfg, model=model, model_config=model_config, name=name)
    description = (getattr(backend, "description", getattr(backend, "name", "?")) if backend
                   else record.get("settings", {}).get("backend_used"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if todo or not timings_path.is_file():
        record = {"settings": {**settings, "batch_size": cfg.batch_size, "backend_used": description,
                               "precision_used": getattr(backend, "precision", None), "device": cfg.device,
                               # precision auto: the fast backend's quality probe (fast.auto_engine)
                               **({"precision_probe": backend.probe} if getattr(backend, "probe", None) else {})},
                  "items": items_record}
        atomic_write_json(timings_path, record)

    written: list[str] = []
    started = time.perf_counter()
    try:
        with tqdm(total=len(todo), desc=f"infer ({getattr(backend, 'name', '-')})", unit="utt") as bar:
            for index, batch in enumerate(plan_batches(todo, cfg.batch_size)):
                mels = []
                for u in batch:
                    mel = read_bin(u.bin_path, (model_config.n_mel_channels, u.frames))
                    check_mel(u.bin_path, mel)
                    mels.append(mel)
                noises = [utterance_noise(model_config, u.frames, cfg.seed, u.id) for u in batch]
                calls_before = len(getattr(backend, "device_times_ms", None) or [])
                t0 = time.perf_counter()
                audios, stats = vocode(backend, mels, noises, cfg.sigma, model_config,
                                       exact=cfg.exact_batching, pad_value=pad_value)
                seconds = time.perf_counter() - t0
                device_ms = (getattr(backend, "device_times_ms", None) or [])[calls_before:]
                for position, (u, audio) in enumerate(zip(batch, audios)):
                    if not np.isfinite(audio).all():
                        raise SynthesisError(f"{u.bin_path}: the {backend.name} backend produced NaN/Inf audio "
                                             f"(precision {getattr(backend, 'precision', cfg.precision)}?)",
                                             path=u.bin_path)
                    write_bin(out_bin(out_dir, u.id), audio)
                    items_record[u.id] = {
                        "frames": u.frames, "samples": int(audio.size), "batch": index,
                        "batch_items": len(batch), "padded_frames": stats["padded_frames"],
                        "tail_frames": stats["tail_frames"], "exact": position not in stats["inexact"],
                        "batch_seconds": round(seconds, 6),
                        "seconds": round(seconds * u.frames / sum(b.frames for b in batch), 6),
                        "audio_seconds": round(audio.size / rate, 4),
                        # the NPU's own time for this batch's calls (om backend), from ais_bench
                        **({"batch_device_ms": round(sum(device_ms), 3)} if device_ms else {})}
                    written.append(u.id)
                atomic_write_json(timings_path, record)
                bar.update(len(batch))
    finally:
        if own_backend and backend is not None:
            backend.close()
    total = time.perf_counter() - started
    audio_seconds = sum(items_record[i]["audio_seconds"] for i in written)
    return {"out_dir": str(out_dir), "backend": description, "written": written, "skipped": skipped,
            "seconds": round(total, 3), "audio_seconds": round(audio_seconds, 3),
            "real_time_factor": round(total / audio_seconds, 4) if audio_seconds else None,
            "timings": str(timings_path)}
