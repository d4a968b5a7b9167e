"""Turning utterances into backend calls: noise per utterance, the batch plan, padding, exact tails.

Utterances are sorted by length and grouped into batches; each mel is padded with `log(clip_val)` (the
value a silent frame has) to the batch's longest (or to the `.om`'s next gear), the noise of each utterance
is its own noise zero-padded, and each output is trimmed back to its own `frames × hop` samples.
WaveGlow's convolutions are not causal, so the last samples of a padded utterance see the padding; with
`exact=True` those tails are recomputed from a short window (`ModelConfig.tail_window`), which makes
batched output equal unbatched output. The noise is drawn per utterance from (seed, utterance id), so
every backend and every batch size is fed the same numbers and outputs can be compared sample by sample.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ModelConfig, STFTConfig
from .errors import BackendError, MelError


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
               rows: int | None = None, pad_value: float = STFTConfig().pad_value
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


def _run_padded(backend, mels, noises, sigma, length, pad_value) -> list[np.ndarray]:
    rows = max(len(mels), backend.fixed_batch or 0)
    mel, z = make_batch(mels, noises, sigma, length, rows=rows, pad_value=pad_value)
    audio = backend.run(mel, z)
    hop = audio.shape[1] // length
    return [audio[i, : m.shape[1] * hop].copy() for i, m in enumerate(mels)]


def vocode(backend, mels: list[np.ndarray], noises: list[np.ndarray], sigma: float, model_config: ModelConfig,
           *, exact: bool = True, pad_value: float = STFTConfig().pad_value
           ) -> tuple[list[np.ndarray], dict]:
    """Run one padded batch through `backend`; each utterance's audio comes back trimmed to its length.

    With `exact`, every utterance shorter than the padded length gets its tail (the samples whose
    receptive field reaches into the padding) recomputed from a short window of its own mel and noise,
    all windows in one batch; utterances shorter than the window are rerun alone. The result equals
    running each utterance by itself. A backend that cannot take the window length (an `.om` without that
    gear) leaves those tails as padded: their indices are listed in `stats["inexact"]`. A backend with
    `run_ragged` (fast) runs each utterance at its own length: nothing padded, so exact either way.
    """
    lengths = [m.shape[1] for m in mels]
    if getattr(backend, "run_ragged", None) is not None:  # each utterance at its own length (fast): exact
        audios = backend.run_ragged(mels, [(sigma * n).astype(np.float32) for n in noises])
        return audios, {"padded_frames": max(lengths), "tail_frames": 0, "inexact": []}
    padded = backend.pad_length(max(lengths))
    audios = _run_padded(backend, mels, noises, sigma, padded, pad_value)
    stats = {"padded_frames": padded, "tail_frames": 0, "inexact": []}
    short = [i for i, n in enumerate(lengths) if n < padded]
    if not exact:
        stats["inexact"] = short
        return audios, stats
    window, tail = model_config.tail_window()
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
    except BackendError:  # beyond the largest gear
        return False


def check_mel(path: Path, mel: np.ndarray) -> None:
    """A mel with NaN/Inf values is refused, naming its file (the model would return NaN audio)."""
    if not np.isfinite(mel).all():
        bad = int(np.count_nonzero(~np.isfinite(mel)))
        raise MelError(f"{path}: mel has {bad} NaN/Inf values; re-run preprocess for this file", path=path)
