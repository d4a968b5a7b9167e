"""Stage 4, infer: mel `.bin` files → `out/<id>_out.bin` float32 audio, with any backend, in true batches.

Utterances are sorted by length and grouped into batches of `cfg.batch_size`; each mel is padded with
`log(clip_val)` (the value a silent frame has) to the batch's longest (or to the `.om`'s next gear), the
noise of each utterance is its own noise zero-padded, and each output is trimmed back to its own
`frames × 256` samples. WaveGlow's convolutions are not causal, so the last samples of a padded
utterance see the padding; with `cfg.exact_batching` (default) those tails are recomputed from a short
window (see `tail_window`), which makes batched output equal unbatched output. The noise is drawn per utterance from (seed, utterance id), so every backend
and every batch size is fed the same numbers and outputs can be compared sample by sample.

Resumable: an utterance whose `<id>_out.bin` exists is skipped; each file is written atomically as soon
as its batch finishes, so a crash loses only the batch in flight.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..config import ModelConfig, STFTConfig, WorkflowConfig
from ..io import atomic_write_json, read_bin, write_bin

#: settings that change the audio: outputs made with other values are not silently mixed with new ones
OUTPUT_SETTINGS = ("checkpoint", "sigma", "seed", "backend", "precision")
#: per-run settings (incl. what `auto` became) and per-utterance timings, in the output folder
TIMINGS_FILE = "timings.json"


def utterance_noise(model_config: ModelConfig, frames: int, seed: int, utt_id: str) -> np.ndarray:
    """Standard-normal noise `[n_group, frames*hop/n_group]` for one utterance, float32.

    Drawn from numpy's PCG64 seeded with (seed, sha256(utt_id)): independent of backend, batch size,
    batch composition and processing order. Multiply by sigma before use.
    """
    digest = int.from_bytes(hashlib.sha256(str(utt_id).encode("utf-8")).digest()[:8], "little")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, digest])
    length = frames * model_config.hop_length // model_config.n_group
    return rng.standard_normal((model_config.n_group, length), dtype=np.float32)


@dataclass
class Utterance:
    id: str
    frames: int
    bin_path: Path


def plan_batches(utterances: list[Utterance], batch_size: int) -> list[list[Utterance]]:
    """Longest first, consecutive lengths together: padding stays small and memory peaks at the start."""
    ordered = sorted(utterances, key=lambda u: (-u.frames, u.id))
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


def make_batch(mels: list[np.ndarray], noises: list[np.ndarray], sigma: float, length: int,
               rows: int | None = None, pad_value: float = float(np.log(STFTConfig().clip_val))
               ) -> tuple[np.ndarray, np.ndarray]:
    """Stack utterances into padded `mel [B, n_mel, length]` and `z [B, n_group, length*hop/n_group]`.

    Mels are padded with `pad_value` (log of the mel floor = silence), noise with zeros; `rows` pads the
    batch itself (an `.om` compiled for a fixed batch) with silent rows.
    """
    n_mel, n_group = mels[0].shape[0], noises[0].shape[0]
    per_frame = noises[0].shape[1] // mels[0].shape[1]
    rows = rows or len(mels)
    mel = np.full((rows, n_mel, length), pad_value, dtype=np.float32)
    z = np.zeros((rows, n_group, length * per_frame), dtype=np.float32)
    for i, (m, n) in enumerate(zip(mels, noises)):
        mel[i, :, : m.shape[1]] = m
        z[i, :, : n.shape[1]] = sigma * n
    return mel, z


def receptive_field(model_config: ModelConfig) -> int:
    """How far (in noise steps, i.e. groups of n_group samples) one output step sees along time, each side.

    Every flow's WN stacks dilated convolutions (kernel k, dilations 1, 2, ..., 2^(L-1)), everything else
    is pointwise in time; the upsampler is causal. 12 flows × 255 = 3060 steps (≈ 96 frames) for the
    official model.
    """
    c = model_config
    return c.n_flows * (c.kernel_size // 2) * (2 ** c.n_layers - 1)


def tail_window(model_config: ModelConfig) -> tuple[int, int]:
    """(frames, samples): the window rerun to make a padded utterance exact, and the tail it replaces.

    In a padded batch only an utterance's last `receptive_field` steps see the padding. Rerunning its
    last `frames` mel frames alone gives those samples exactly: the window's own left edge (zero padding
    of the convolutions, and the upsampler's 3 missing frames of context) is far enough away.
    """
    c = model_config
    steps = c.hop_length // c.n_group
    reach = receptive_field(c)
    context = (c.upsample_kernel - c.upsample_stride) // c.n_group
    return -(-(2 * reach + context) // steps), reach * c.n_group


def _run_padded(backend, mels, noises, sigma, length, pad_value) -> list[np.ndarray]:
    rows = max(len(mels), backend.fixed_batch or 0)
    mel, z = make_batch(mels, noises, sigma, length, rows=rows, pad_value=pad_value)
    audio = backend.run(mel, z)
    hop = audio.shape[1] // length
    return [audio[i, : m.shape[1] * hop].copy() for i, m in enumerate(mels)]


def vocode(backend, mels: list[np.ndarray], noises: list[np.ndarray], sigma: float, model_config: ModelConfig,
           *, exact: bool = True, pad_value: float = float(np.log(STFTConfig().clip_val))
           ) -> tuple[list[np.ndarray], dict]:
    """Run one padded batch through `backend`; each utterance's audio comes back trimmed to its length.

    With `exact`, every utterance shorter than the padded length gets its tail (the samples whose
    receptive field reaches into the padding) recomputed from a short window of its own mel and noise,
    all windows in one batch; utterances shorter than the window are rerun alone. The result equals
    running each utterance by itself. A backend that cannot take the window length (an `.om` without that
    gear) leaves those tails as padded: their indices are listed in `stats["inexact"]`.
    """
    lengths = [m.shape[1] for m in mels]
    padded = backend.pad_length(max(lengths))
    audios = _run_padded(backend, mels, noises, sigma, padded, pad_value)
    stats = {"padded_frames": padded, "tail_frames": 0, "inexact": []}
    short = [i for i, n in enumerate(lengths) if n < padded]
    if not exact:
        stats["inexact"] = short
        return audios, stats
    window, tail = tail_window(model_config)
    steps = model_config.hop_length // model_config.n_group
    windowed, alone = [], []
    for i in short:
        if lengths[i] > window and _fits(backend, window):
            windowed.append(i)
        elif _fits(backend, lengths[i]):
            alone.append(i)
        else:
            stats["inexact"].append(i)
    chunk = backend.fixed_batch or max(1, len(windowed))
    for k in range(0, len(windowed), chunk):
        ids = windowed[k:k + chunk]
        starts = [lengths[i] - window for i in ids]
        outs = _run_padded(backend, [mels[i][:, s:] for i, s in zip(ids, starts)],
                           [noises[i][:, s * steps:] for i, s in zip(ids, starts)], sigma, window, pad_value)
        for i, out in zip(ids, outs):
            audios[i][-tail:] = out[-tail:]
        stats["tail_frames"] += window * len(ids)
    for i in alone:
        audios[i] = _run_padded(backend, [mels[i]], [noises[i]], sigma, lengths[i], pad_value)[0]
        stats["tail_frames"] += lengths[i]
    return audios, stats


def _fits(backend, frames: int) -> bool:
    """The backend accepts a mel of exactly this length (always, unless it has compiled gears)."""
    try:
        return backend.pad_length(frames) == frames
    except Exception:  # beyond the largest gear
        return False


def model_files(cfg: WorkflowConfig) -> dict[str, Path]:
    from .convert import OM_NAME, ONNX_NAME, OPENVINO_NAME, ORT_OPT_NAME

    onnx_dir = cfg.run_dir / "onnx"
    return {"onnx": onnx_dir / ONNX_NAME, "openvino_ir": onnx_dir / OPENVINO_NAME,
            "onnx_optimized": onnx_dir / ORT_OPT_NAME, "om": cfg.run_dir / "om" / f"{OM_NAME}.om"}


def backend_name(cfg: WorkflowConfig) -> str:
    """The backend `cfg.backend` stands for (`auto` resolved against the files the earlier stages made)."""
    from ..backends import resolve_backend

    files = model_files(cfg)
    return resolve_backend(cfg.backend, device=cfg.device, onnx_path=files["onnx"], om_path=files["om"])


def open_backend(cfg: WorkflowConfig, model=None, model_config: ModelConfig | None = None,
                 name: str | None = None):
    """The backend `name` (default: `cfg.backend`, `auto` resolved), on the best file earlier stages made."""
    from ..backends import ModelSpec, get_backend

    files = model_files(cfg)
    name = name or backend_name(cfg)
    if name in ("torch", "fast"):  # built from the model itself, no exported file
        if model is None:
            from ..checkpoint import load_waveglow

            model = load_waveglow(cfg.checkpoint_path)
        return get_backend(name, model=model, device=cfg.device, precision=cfg.precision)
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
    info_path = model_files(cfg)["onnx"].with_suffix(".json")
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if "model_config" in info:
            return ModelConfig.from_dict(info["model_config"])
    from ..checkpoint import load_waveglow

    return load_waveglow(cfg.checkpoint_path).config


def check_mel(path: Path, mel: np.ndarray) -> None:
    if not np.isfinite(mel).all():
        bad = int(np.count_nonzero(~np.isfinite(mel)))
        raise ValueError(f"{path}: mel has {bad} NaN/Inf values; re-run preprocess for this file")


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
    from .preprocess import load_manifest

    mel_dir = cfg.run_dir / "mel"
    manifest = load_manifest(mel_dir)
    out_dir = Path(out_dir) if out_dir else cfg.run_dir / "out"
    model_config = resolve_model_config(cfg, model)
    hop = model_config.hop_length
    stft = manifest.get("settings", {}).get("stft", {})
    # pad with the mel of silence under the STFT settings the mels were made with
    pad_value = float(np.log(stft.get("clip_val", STFTConfig().clip_val)))
    rate = int(manifest.get("sampling_rate", STFTConfig().sampling_rate))

    # validate everything that can be checked without reading the data, before writing anything
    utterances = []
    for item in manifest["items"]:
        path = mel_dir / item.get("bin", f"{item['id']}.bin")
        shape = tuple(item["shape"])
        if len(shape) != 2 or shape[0] != model_config.n_mel_channels:
            raise ValueError(f"{path}: mel has shape {list(shape)}, this model needs "
                             f"[{model_config.n_mel_channels}, T] (n_mel_channels differ)")
        if int(item["mel_frames"]) != shape[1]:
            raise ValueError(f"{path}: manifest says {item['mel_frames']} frames but shape {list(shape)}")
        expected = shape[0] * shape[1] * 4
        if not path.is_file():
            raise FileNotFoundError(f"{path}: mel file listed in {mel_dir / 'manifest.json'} is missing")
        if path.stat().st_size != expected:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, but manifest shape {list(shape)} of "
                             f"float32 needs {expected} bytes (truncated file, or a manifest from another run?)")
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
            raise ValueError(f"{out_dir}: holds outputs made with other settings "
                             f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changed.items())}); "
                             "pass force=True (CLI --force) to redo them, or use another run name / out_dir")
    if force:
        record = {}
    items_record: dict = record.get("items", {})

    def finished(u: Utterance) -> bool:
        target = out_dir / f"{u.id}_out.bin"
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
        # nothing to do: no empty "0/0" bar (the notebook says the stage was skipped)
        with tqdm(total=len(todo), desc=f"infer ({getattr(backend, 'name', '-')})", unit="utt",
                  disable=not todo) as bar:
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
                        raise RuntimeError(f"{u.bin_path}: the {backend.name} backend produced NaN/Inf audio "
                                           f"(precision {getattr(backend, 'precision', cfg.precision)}?)")
                    write_bin(out_dir / f"{u.id}_out.bin", audio)
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
