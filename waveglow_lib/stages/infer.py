"""Stage 4, infer: mel `.bin` files → `out/<id>_out.bin` float32 audio, with any backend, in true batches
(planned, padded and made exact by `waveglow_lib.batching`).

Resumable: an utterance whose `<id>_out.bin` exists, made from the same mel, is skipped; each file is
written atomically as soon as its batch finishes, so a crash loses only the batch in flight.

The stage builds the job (`prepare_infer`: check the inputs, what is left to do) and an engine runs it
(`waveglow_lib.engines.run_job`: this process, or a Ray actor pool, as `cfg.engine` says); the job
machinery both share is `waveglow_lib.jobs`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..batching import NOISE_SCHEME, Utterance
from ..config import ModelConfig, STFTConfig, WorkflowConfig, from_mapping
from ..engines import run_job
from ..errors import InputNotFound, ManifestError, MelError
from ..jobs import InferJob, ManifestMelReader, backend_name, prepare_job, resolve_model_config
from ..layout import MANIFEST_NAME, load_manifest, mel_bin
from ..runlock import locked
from ..stamps import SOURCE_KEY, checkpoint_stft, file_stamps, stage_stamp

__all__ = ["infer", "prepare_infer", "manifest_items", "check_mel_settings", "manifest_stft", "output_stamp"]


def output_stamp(cfg: WorkflowConfig, name: str, model=None) -> dict:
    """What shapes the audio (`stamps.stage_stamp`): the model, sigma, seed, backend, precision and noise
    scheme; outputs made under another stamp are not silently mixed with new ones."""
    return stage_stamp(cfg, {"sigma": cfg.sigma, "seed": cfg.seed, "backend": name, "precision": cfg.precision,
                             "noise": NOISE_SCHEME}, model=model)


def manifest_stft(manifest: dict, path: str | Path) -> STFTConfig | None:
    """The STFT settings the manifest's mels were made with (recorded by preprocess; None for mels made
    elsewhere); ManifestError (ConfigError for a setting's value) naming the manifest and the field when
    they are not STFT settings."""
    settings = manifest.get("settings") or {}
    if not isinstance(settings, dict):
        raise ManifestError(f"{path}: field settings holds {type(settings).__name__}, expected an object", path=path)
    stft = settings.get("stft")
    if stft is None or stft == {}:
        return None
    if not isinstance(stft, dict):
        raise ManifestError(f"{path}: field settings.stft holds {type(stft).__name__}, expected an object", path=path)
    return from_mapping(STFTConfig, stft, f"{path}: settings.stft")


def check_mel_settings(cfg: WorkflowConfig, manifest: dict, manifest_path: Path) -> None:
    """Mels made with other STFT settings than the model was trained on vocode into wrong audio: refuse."""
    if manifest_stft(manifest, manifest_path) is None:
        return  # a manifest of mels made elsewhere: their format was checked when read
    made = manifest["settings"]["stft"]
    model_stft = checkpoint_stft(cfg).to_dict()
    changed = {k: (made.get(k), model_stft.get(k)) for k in model_stft if made.get(k) != model_stft.get(k)}
    if changed:
        raise MelError(f"{manifest_path}: the mels were made with other STFT settings than the model "
                       f"{cfg.checkpoint} expects ({', '.join(f'{k}: {a} vs {b}' for k, (a, b) in changed.items())}); "
                       "run the preprocess stage again (it redoes mels whose settings changed)", path=manifest_path)


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
            raise InputNotFound(f"{path}: mel file listed in {mel_dir / MANIFEST_NAME} is missing", path=path)
        if path.stat().st_size != expected:
            raise ManifestError(f"{path}: {path.stat().st_size} bytes, but manifest shape {list(shape)} of "
                                f"float32 needs {expected} bytes (truncated file, or a manifest from another run?)",
                                path=path)
        utterances.append(Utterance(item["id"], shape[1], path))
    return utterances


def check_mel_contents(cfg: WorkflowConfig, manifest: dict, items: list[Utterance]) -> None:
    """Each mel must still be the one the manifest lists by sha256 (cached by the run's file stamps): a mel
    changed since preprocess is never vocoded under the manifest's hash of another. ManifestError naming it."""
    stamps = file_stamps(cfg)
    for item, utterance in zip(manifest["items"], items):
        if not isinstance(item.get("sha256"), str):
            continue  # a manifest made elsewhere, without hashes: its mels' format is checked when read
        why = stamps.changed(utterance.bin_path, {"size": utterance.bin_path.stat().st_size, "sha256": item["sha256"]})
        if why:
            raise ManifestError(f"{utterance.bin_path}: {why}: not the mel {cfg.layout.manifest} lists; run the "
                                "preprocess stage again (it makes a mel that no longer matches again)",
                                path=utterance.bin_path)


def prepare_infer(cfg: WorkflowConfig, *, model=None, name: str | None = None, out_dir: str | Path | None = None,
                  force: bool = False, items: list[Utterance] | None = None,
                  read_mel: Callable[[Utterance], np.ndarray] | None = None, pad_value: float | None = None,
                  rate: int | None = None, engine: str = "local") -> InferJob:
    """Check everything that can be checked without reading the data, before anything is written.

    By default the work items are `mel/manifest.json`'s utterances read from their `.bin` (each made
    again when the manifest's sha256 of its mel changed); other inputs (a folder of TTS mels) come as
    `items` and `read_mel` instead. Outputs made earlier with a different stamp (`output_stamp`) are
    refused unless `force`, which redoes everything (`jobs.prepare_job`).
    """
    model_config = resolve_model_config(cfg, model)
    sources = {}
    if items is None:
        mel_dir = cfg.layout.mel_dir
        manifest = load_manifest(mel_dir)
        # pad with the mel of silence under the STFT settings the mels were made with
        pad_value = (manifest_stft(manifest, cfg.layout.manifest) or STFTConfig()).pad_value
        rate = int(manifest.get("sampling_rate", STFTConfig().sampling_rate))
        check_mel_settings(cfg, manifest, cfg.layout.manifest)
        items = manifest_items(mel_dir, manifest, model_config)
        check_mel_contents(cfg, manifest, items)
        read_mel = ManifestMelReader(model_config.n_mel_channels)
        # the manifest's hash of each mel: no mel is read here
        sources = {item["id"]: {SOURCE_KEY: item["sha256"]} for item in manifest["items"]
                   if isinstance(item.get("sha256"), str)}
    pad_value = STFTConfig().pad_value if pad_value is None else pad_value
    rate = rate or STFTConfig().sampling_rate
    # an out_dir the user names may lie anywhere; the default one must stay in the run folder
    out_dir = Path(out_dir) if out_dir else cfg.layout.check(cfg.layout.out_dir, "the output folder")
    name = name or backend_name(cfg)
    return prepare_job(cfg, items=items, read_mel=read_mel, model_config=model_config, out_dir=out_dir,
                       stamp=output_stamp(cfg, name, model), name=name, pad_value=pad_value, rate=rate,
                       force=force, sources=sources, engine=engine)


@locked("infer")
def infer(cfg: WorkflowConfig, *, model=None, backend=None, out_dir: str | Path | None = None,
          force: bool = False) -> dict:
    """Vocode every utterance of `mel/manifest.json` into `out/<id>_out.bin` on the engine `cfg.engine`
    names (this process, or a Ray actor pool); returns a summary.

    `cfg.sigma` defaults to 0.6: the flow is trained with sigma 1.0, but NVIDIA's inference default
    samples at 0.6, a lower temperature that trades a little naturalness for audibly less background
    noise/hiss. `backend=` takes an opened Backend (it is not closed here) and runs in this process; else
    the engine opens one from `cfg` (`model=` avoids reloading the checkpoint for the torch backend).
    Per-item timings go to `out/timings.json`. Outputs made earlier with a different model (its
    fingerprint) or output settings (sigma, seed, backend, precision) are refused unless `force=True`,
    which redoes everything. An utterance longer than `cfg.chunk_frames` + the model's context is vocoded
    alone in chunks (`batching.vocode_chunked`: exactly the one-shot output, memory bounded by the chunk).
    """
    job = prepare_infer(cfg, model=model, name=backend.name if backend is not None else None, out_dir=out_dir,
                        force=force, engine="local" if backend is not None else cfg.engine)
    return run_job(cfg, job, model=model, backend=backend)
