"""A run's results: per-utterance quality against the originals, backend parity, the round trip, and
`metrics.json`. The measures themselves live in `metrics.py`; timing lives in `bench/`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .audio import load_wav, mel_spectrogram
from .backends import available_backends
from .batching import utterance_noise, vocode
from .config import STFTConfig, WorkflowConfig
from .errors import AudioError, InputNotFound
from .io import atomic_write_json, read_bin, read_json
from .jobs import open_backend, resolve_model_config
from .layout import corpus_wav, load_manifest, mel_bin, syn_wav
from .metrics import _as_1d, log_mel_distance, quality_metrics, snr_db
from .runlock import locked
from .stages.infer import manifest_stft
from .provenance import run_provenance
from .records import METRIC_KEYS, Metrics, read_record


# --- the round trip ---------------------------------------------------------------------------------
def round_trip(model: Any, audio: Any, stft: STFTConfig = STFTConfig()) -> dict[str, Any]:
    """audio → mel → `noise_from_audio` → `infer(sigma=1)`: the flow is invertible, so the audio comes back.

    This holds for any weights (untrained ones too), which makes it the check that the model, its
    inverse and the mel front-end fit together. Returns the trimmed input, the reconstruction and their SNR.
    """
    x = _as_1d(audio, "audio").astype(np.float32)
    hop = int(model.hop_length)
    frames = x.size // hop
    if frames < 1:
        raise AudioError(f"round_trip: audio has {x.size} samples, fewer than one hop ({hop})")
    x = x[:frames * hop]
    mel = mel_spectrogram(x, stft)[:, :frames]
    param = next(model.parameters())
    mel_t = torch.from_numpy(np.ascontiguousarray(mel))[None].to(param.device, param.dtype)
    audio_t = torch.from_numpy(x)[None].to(param.device, param.dtype)
    with torch.no_grad():
        z = model.noise_from_audio(mel_t, audio_t)
        back = model.infer(mel_t, sigma=1.0, z=z)
    back_np = back[0].detach().float().cpu().numpy()
    return {
        "audio": x,
        "reconstructed": back_np,
        "seconds": x.size / stft.sampling_rate,
        "snr_db": snr_db(x, back_np),
        "log_mel_distance": log_mel_distance(mel, mel_spectrogram(back_np.astype(np.float32), stft)[:, :frames]),
    }


# --- over a run folder ----------------------------------------------------------------------------
def _run_items(cfg: WorkflowConfig) -> tuple[dict, list[dict]]:
    manifest = load_manifest(cfg.layout.mel_dir)
    return manifest, manifest["items"]


def _run_stft(manifest: Mapping[str, Any], path: str | Path) -> STFTConfig:
    """The STFT settings the run's mels were made with (`stages.infer.manifest_stft`), the defaults when
    the manifest names none."""
    return manifest_stft(manifest, path) or STFTConfig()


def evaluate_run(cfg: WorkflowConfig, perceptual: bool | None = None) -> list[dict[str, Any]]:
    """Per utterance of the run: `quality_metrics` of `wav/<id>_syn.wav` against the original wav.

    `perceptual` (STOI, PESQ) defaults to `cfg.metrics`.
    """
    manifest, items = _run_items(cfg)
    stft = _run_stft(manifest, cfg.layout.manifest)
    rate = stft.sampling_rate
    wav_dir = cfg.layout.wav_dir
    rows = []
    for item in tqdm(items, desc="evaluate", unit="utt"):
        syn_path = syn_wav(wav_dir, item["id"])
        if not syn_path.is_file():
            raise InputNotFound(f"{syn_path}: synthesised wav not found; run the postprocess stage first",
                                path=syn_path)
        # a wav path read from the manifest must name a file of the run's corpus
        reference, _ = load_wav(corpus_wav(cfg.corpus_dir, item["wav"]), expected_rate=rate,
                                resample=cfg.resample, downmix=cfg.downmix)
        synthesised, _ = load_wav(syn_path, expected_rate=rate)
        metrics = quality_metrics(reference, synthesised, rate, stft,
                                  perceptual=cfg.metrics if perceptual is None else perceptual)
        rows.append({"id": item["id"], **metrics})
    return rows


def usable_backends(cfg: WorkflowConfig) -> list[str]:
    """The backends that can run this run's model here: installed, and their model file made."""
    files = cfg.layout.model_files()
    needs = {"torch": None, "onnxruntime": files["onnx"], "openvino": files["onnx"], "om": files["om"]}
    return [name for name, (ok, _) in available_backends().items()
            if ok and (needs.get(name) is None or needs[name].is_file())]


def backend_outputs(cfg: WorkflowConfig, names: Sequence[str] | None = None, *, model: Any = None,
                    n_utterances: int = 2, precision: str = "fp32") -> dict[str, list[np.ndarray]]:
    """Audio of the run's `n_utterances` shortest utterances from each backend, all fed the same mel and noise.

    The backends are opened the way the infer stage opens them (same files, same padding and trimming),
    at `precision` (fp32 by default: parity is about the backends' arithmetic, not reduced precision).
    The shortest utterances keep this quick; any utterance shows the same arithmetic differences. The `om`
    backend runs on `cfg.device`; on an NPU run the others run on the CPU (the reference stays PyTorch fp32).
    """
    manifest, items = _run_items(cfg)
    items = sorted(items, key=lambda item: (int(item["mel_frames"]), item["id"]))[:n_utterances]
    names = list(names) if names is not None else usable_backends(cfg)
    config = resolve_model_config(cfg, model)
    mel_dir = cfg.layout.mel_dir
    mels = [read_bin(mel_bin(mel_dir, item), tuple(item["shape"])) for item in items]
    noises = [utterance_noise(config, int(item["mel_frames"]), cfg.seed, item["id"]) for item in items]
    pad = _run_stft(manifest, cfg.layout.manifest).pad_value
    outputs: dict[str, list[np.ndarray]] = {}
    for name in names:
        device = "cpu" if cfg.device.startswith("npu") and name != "om" else cfg.device
        run_cfg = cfg.with_overrides(precision=precision, device=device)
        backend = open_backend(run_cfg, model=model, model_config=config, name=name)
        try:
            outputs[name] = [vocode(backend, [m], [z], cfg.sigma, config, pad_value=pad)[0][0]
                             for m, z in zip(mels, noises)]
        finally:
            backend.close()
    return outputs


# --- metrics.json ---------------------------------------------------------------------------------
def read_metrics(path: str | Path) -> dict[str, Any]:
    """A run's metrics.json read back through its model (`records.Metrics`): DataError naming the file and
    the field otherwise."""
    return read_record(path, Metrics, "a run's metrics (written by evaluate)", damaged="refuse", required=True)


def summarise(utterances: Sequence[Mapping[str, Any]], keys: Sequence[str] = METRIC_KEYS) -> dict[str, Any]:
    """Mean of each metric over the utterances that have a finite value of it (None where none has)."""
    summary: dict[str, Any] = {"utterances": len(utterances)}
    for key in keys:
        values = [u[key] for u in utterances if u.get(key) is not None and math.isfinite(u[key])]
        summary[key] = float(np.mean(values)) if values else None
    return summary


def _finite_or_none(obj: Any) -> Any:
    """JSON has no NaN/Infinity: store such values as null rather than writing invalid JSON."""
    if isinstance(obj, Mapping):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


@locked("evaluate")
def collect_metrics(cfg: WorkflowConfig, *, utterances: Sequence[Mapping[str, Any]] | None = None,
                    parity: Sequence[Mapping[str, Any]] | None = None,
                    round_trip: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Gather a run's numbers into runs/<name>/metrics.json (written atomically) and return them.

    Sections already computed (the notebooks compute them once to show them) are passed in; arrays in
    them (e.g. the round trip's audio) are left out of the file. `utterances` defaults to the per-utterance
    quality of the run's synthesised audio against the originals (`evaluate_run`); the throughput rows
    `bench.throughput_table` saved are included when present.
    """
    if utterances is None:
        utterances = evaluate_run(cfg)
    record: dict[str, Any] = {
        "name": cfg.name,
        "backend": cfg.backend,
        "precision": cfg.precision,
        "sigma": cfg.sigma,
        "seed": cfg.seed,
        "summary": summarise(utterances),
        "utterances": [dict(u) for u in utterances],
    }
    if parity is not None:
        record["parity"] = [dict(row) for row in parity]
    if round_trip is not None:
        record["round_trip"] = {k: v for k, v in round_trip.items() if not isinstance(v, np.ndarray)}
    layout = cfg.layout
    throughput_path = layout.throughput
    if throughput_path.is_file():
        record["throughput"] = read_json(throughput_path, "the notebooks' throughput rows", kind=list)
    record.update(run_provenance(cfg))   # checkpoint, demo or not, backend/precision used, machine, commit
    if extra:
        record.update(extra)
    record = _finite_or_none(record)
    atomic_write_json(layout.metrics, record)
    return record
