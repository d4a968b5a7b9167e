"""The train stage: a params file (+ overrides) → `TrainConfig` → `waveglow_lib.train.train` (or Ray Train).

Thin on purpose: the loop, its checkpoints and its checks live in `waveglow_lib.train`. The parameters
used are written to `<out_dir>/params.yaml` by rank 0, so the folder says how its model was made, beside a
marker (TRAIN_MARKER) that lets later runs write there: a folder that is not a training folder is refused.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import yaml

from ..audio import load_wav, mel_spectrogram
from ..config import STFTConfig
from ..errors import RunFolderError
from ..io import atomic_write_text
from ..layout import CORPUS_WAVS_DIR, PARAMS_FILE, TRAIN_HISTORY_FILE, TRAIN_STATE_FILE
from ..layout import TRAIN_MARKER_FILE as TRAIN_MARKER
from ..model import WaveGlow
from ..train import TrainConfig, train, train_with_ray

#: TrainConfig fields that are paths ("" and "demo" mean no path)
PATH_FIELDS = ("corpus", "out_dir", "warm_start")


def load_train_config(params: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
                      base_dir: str | Path | None = None) -> TrainConfig:
    """A params YAML file (None = TrainConfig defaults) with `overrides` (e.g. from --set) on top.

    With `base_dir` (a notebook passes the repository root), relative paths are taken from there.
    """
    if params is not None and base_dir is not None and not Path(params).is_absolute():
        params = Path(base_dir) / params
    if params is None:
        config = TrainConfig.from_dict(dict(overrides or {}), source="command line")
    else:
        config = TrainConfig.from_yaml(params, overrides)
    if base_dir is None:
        return config
    changes = {key: str(Path(base_dir) / getattr(config, key)) for key in PATH_FIELDS
               if getattr(config, key) not in ("", "demo") and not Path(getattr(config, key)).is_absolute()}
    return config.with_overrides(**changes)


@dataclass
class TrainingSamples:
    """What a notebook shows while training: one utterance vocoded every N steps (audio and its mel)."""

    reference: np.ndarray
    reference_mel: np.ndarray
    sigma: float = 0.6
    seed: int = 1234
    show: Callable[[dict], None] | None = None
    samples: list[dict] = field(default_factory=list)

    @classmethod
    def for_corpus(cls, config: TrainConfig, utterance: int = 0, seconds: float = 2.0,
                   **kwargs: Any) -> "TrainingSamples":
        """The first `seconds` of the corpus's `utterance`-th wav (sorted), as the reference."""
        wav = sorted((config.corpus_dir / CORPUS_WAVS_DIR).glob("*.wav"))[utterance]
        audio, rate = load_wav(wav)
        audio = audio[: int(seconds * rate)]
        return cls(audio, mel_spectrogram(audio, STFTConfig()), **kwargs)

    def __call__(self, step: int, model: WaveGlow) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            audio = model.infer(torch.from_numpy(self.reference_mel)[None], sigma=self.sigma,
                                generator=generator)[0, : len(self.reference)].numpy()
        sample = {"step": step, "audio": audio, "mel": mel_spectrogram(np.clip(audio, -1, 1))}
        self.samples.append(sample)
        if self.show is not None:
            self.show(sample)


def check_train_folder(out_dir: str | Path, force: bool = False) -> Path:
    """`out_dir` may be trained in (and its params.yaml, history.json, model.safetensors overwritten) when it
    is missing, empty, marked as ours (TRAIN_MARKER), or a training folder of an earlier version (a resume
    state and a history, no marker); anything else only with `force`. RunFolderError otherwise."""
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"{folder}: out_dir is not a folder; choose another out_dir", path=folder)
    if force or not folder.exists() or (folder / TRAIN_MARKER).is_file() or not any(folder.iterdir()):
        return folder
    if (folder / TRAIN_STATE_FILE).is_file() and (folder / TRAIN_HISTORY_FILE).is_file():
        return folder  # written before the marker existed
    raise RunFolderError(f"{folder}: out_dir is not a training folder (it holds other files, and training "
                         "writes params.yaml, history.json, model.safetensors there); choose a new or empty "
                         "out_dir, or pass --force (force=True) to train in it anyway", path=folder)


def run_train(config: TrainConfig, on_log: Callable[[dict], None] | None = None,
              on_sample: Callable[[int, WaveGlow], None] | None = None, sample_every: int = 0,
              force: bool = False, progress: bool = False) -> dict[str, Any]:
    """Train as `config` says (engine local: this process or its torchrun group; engine ray: Ray Train).

    `out_dir` must be new, empty or a training folder (check_train_folder) unless `force`."""
    if int(os.environ.get("RANK", "0")) == 0:
        # rank 0 alone checks: the others would race its first writes; a refusal ends the torchrun group
        out_dir = check_train_folder(config.out_dir, force)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / TRAIN_MARKER, "a waveglow-workflow training folder (waveglow_lib train)\n")
        atomic_write_text(out_dir / PARAMS_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))
    if config.engine == "ray":
        return train_with_ray(config, num_workers=config.ray_workers, use_gpu=config.device.startswith("cuda"))
    return train(config, on_log=on_log, on_sample=on_sample, sample_every=sample_every, progress=progress)
