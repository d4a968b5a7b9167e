"""The benchmark's workload: which utterance lengths, which mels, which model."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..audio import load_wav, mel_spectrogram
from ..backends.fast import fold_waveglow
from ..checkpoint import load_waveglow, model_fingerprint
from ..config import GUIDE_MEL_LENGTHS, ModelConfig, STFTConfig, WorkflowConfig
from ..errors import AudioError, ConfigError, WaveGlowError
from ..export import export_onnx
from ..io import read_bin
from ..layout import CORPUS_WAVS_DIR, load_manifest, mel_bin
from ..model import WaveGlow

#: the guide's utterances, mean audio length in seconds (their utterances/s → audio-s/s)
GUIDE_MEAN_SECONDS = (sum(GUIDE_MEL_LENGTHS) * STFTConfig().hop_length / STFTConfig().sampling_rate
                      / len(GUIDE_MEL_LENGTHS))
DEFAULT_LENGTHS = "guide/16"
#: --quick times three one-second slices of the run's own utterances: long enough that the engines' own
#: speed, not their per-call overhead, decides the table (a few frames each favoured the graph runtimes
#: over the engine `auto` picks)
QUICK_SECONDS = 1.0
QUICK_LENGTHS = (math.ceil(QUICK_SECONDS * STFTConfig().sampling_rate / STFTConfig().hop_length),) * 3


def parse_lengths(text: str | Sequence[int]) -> list[int]:
    """'guide' | 'guide/N' (each guide length divided by N, at least 2 frames) | '832,164' | a list."""
    if not isinstance(text, str):
        lengths = [int(v) for v in text]
    else:
        spec = text.strip().lower()
        if spec == "guide":
            lengths = list(GUIDE_MEL_LENGTHS)
        elif spec.startswith("guide/"):
            try:
                divisor = float(spec.split("/", 1)[1])
            except ValueError:
                raise ConfigError(f"--lengths: cannot read the divisor in {text!r} (e.g. guide/16)") from None
            if divisor <= 0:
                raise ConfigError(f"--lengths: divisor must be positive in {text!r}")
            lengths = [max(2, round(v / divisor)) for v in GUIDE_MEL_LENGTHS]
        else:
            try:
                lengths = [int(v) for v in spec.replace(" ", "").split(",") if v]
            except ValueError:
                raise ConfigError(f"--lengths: expected guide, guide/N or frame counts like 832,164; got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise ConfigError(f"--lengths: need at least one length of >= 1 frame, got {lengths}")
    return lengths


def workload(lengths: Sequence[int], cfg: WorkflowConfig, n_mel: int = 80) -> tuple[list[str], list[np.ndarray], str]:
    """(ids, mels [n_mel, L], source): the run's preprocessed mels, else the corpus wavs, else synthetic.

    Mel i is cut to (or repeated up to) lengths[i]; ids name the source utterance (noise is per id).
    """
    sources = _preprocessed_mels(cfg, n_mel) or _corpus_mels(cfg, len(lengths), n_mel)
    if sources:
        origin, items = sources
        ids, mels = [], []
        for i, frames in enumerate(lengths):
            utt_id, mel = items[i % len(items)]
            reps = -(-frames // mel.shape[1])
            ids.append(f"{utt_id}" if i < len(items) else f"{utt_id}#{i}")
            mels.append(np.ascontiguousarray(np.tile(mel, (1, reps))[:, :frames], dtype=np.float32))
        return ids, mels, origin
    rng = np.random.default_rng(cfg.seed)
    ids, mels = [], []
    for i, frames in enumerate(lengths):
        # a smooth spectral envelope with slow changes over time: log-mel values of speech-like level
        base = np.linspace(-4.0, -9.0, n_mel)[:, None]
        wobble = np.cumsum(rng.standard_normal((n_mel, frames)) * 0.15, axis=1)
        mels.append(np.clip(base + wobble - wobble.mean(), STFTConfig().pad_value, 1.0).astype(np.float32))
        ids.append(f"synthetic-{i:02d}")
    return ids, mels, "synthetic"


def _preprocessed_mels(cfg: WorkflowConfig, n_mel: int):
    manifest_path = cfg.layout.manifest
    if not manifest_path.is_file():
        return None
    try:
        items = load_manifest(cfg.layout.mel_dir)["items"]
        mels = [(it["id"], read_bin(mel_bin(cfg.layout.mel_dir, it), tuple(it["shape"]))) for it in items]
    except (OSError, WaveGlowError, ValueError):  # an unusable run folder: fall back to the corpus
        return None
    mels = [(i, m) for i, m in mels if m.shape[0] == n_mel and m.shape[1] > 0]
    return (f"preprocessed mels ({manifest_path.parent})", mels) if mels else None


def _corpus_mels(cfg: WorkflowConfig, count: int, n_mel: int):
    wav_dir = cfg.corpus_dir / CORPUS_WAVS_DIR
    if not wav_dir.is_dir() or n_mel != STFTConfig().n_mel_channels:
        return None
    items = []
    for path in sorted(wav_dir.glob("*.wav"))[:count]:
        try:
            audio, _ = load_wav(path)
        except AudioError:
            continue
        items.append((path.stem, mel_spectrogram(audio)))
    return (f"corpus wavs ({cfg.corpus_dir})", items) if items else None


def build_model(spec: Any = "official", seed: int = 0):
    """'official' (the 87.7 M-parameter architecture, random weights: no download; speed does not depend on
    the values), 'demo' (the bundled model), a checkpoint path, or a WaveGlow instance. Returns (model, name)."""
    if isinstance(spec, torch.nn.Module):
        return spec.float().eval(), f"given model ({spec.config.n_channels} channels)"
    if spec == "official":
        torch.manual_seed(seed)
        return WaveGlow(ModelConfig()).eval(), f"official architecture, random weights (seed {seed})"
    if spec == "demo":
        return load_waveglow(None), "bundled demo model"
    return load_waveglow(spec), str(spec)


def exported_graph(model, kind: str, cache_dir: Path) -> Path:
    """The model's ONNX export (`kind` "model" or "folded"), cached by weight fingerprint."""
    path = Path(cache_dir) / f"waveglow_{model_fingerprint(model)}{'_folded' if kind == 'folded' else ''}.onnx"
    if not path.is_file():
        export_onnx(fold_waveglow(model) if kind == "folded" else model, path, opset=17)
    return path
