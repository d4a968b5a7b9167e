"""Turning utterances into backend calls: noise per utterance, the batch plan, padding, exact tails.

Utterances are sorted by length and grouped into batches; each mel is padded with `log(clip_val)` (the
value a silent frame has) to the batch's longest (or to the `.om`'s next gear), the noise of each utterance
is its own noise zero-padded, and each output is trimmed back to its own `frames × hop` samples.
WaveGlow's convolutions are not causal, so the last samples of a padded utterance see the padding; with
`exact=True` those tails are recomputed from a short window (`ModelConfig.tail_window`), which makes
batched output equal unbatched output. The noise is drawn per utterance from (seed, utterance id), so
every backend and every batch size is fed the same numbers and outputs can be compared sample by sample;
it is drawn in fixed blocks of steps, so a prefix's noise does not depend on the length (streams).

Any length: WaveGlow is non-causal but local, so a long mel is cut into chunks, each run with
`ModelConfig.chunk_context()` frames of context each side, and the chunks' centres concatenated:
exactly the one-shot output with the same noise, in memory bounded by one chunk (`vocode_stream`,
`vocode_chunked`; `vocode(..., chunk_frames=)` chunks what is longer than a chunk's window).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .config import ModelConfig, STFTConfig
from .backends.base import runs_utterances
from .errors import BackendError, MelError, SynthesisError


#: noise is drawn in blocks of this many steps (n_group samples each), each from its own seed: the noise
#: of a prefix does not depend on the total length, so a stream can draw it as frames arrive
NOISE_BLOCK_STEPS = 4096
#: recorded with outputs (infer's timings.json): outputs drawn with another scheme are not mixed in
NOISE_SCHEME = f"pcg64 blocks of {NOISE_BLOCK_STEPS} steps"


def noise_steps(model_config: ModelConfig, seed: int, utt_id: str, start: int, stop: int) -> np.ndarray:
    """Standard-normal noise `[n_group, stop - start]` for steps `start … stop-1` of one utterance, float32.

    Block b (steps b·NOISE_BLOCK_STEPS …) is drawn from numpy's PCG64 seeded with (seed, sha256(utt_id), b),
    so any range can be drawn without the rest and without knowing the utterance's length.
    """
    digest = int.from_bytes(hashlib.sha256(str(utt_id).encode("utf-8")).digest()[:8], "little")
    out = np.empty((model_config.n_group, max(0, stop - start)), dtype=np.float32)
    if stop <= start:
        return out
    first, last = start // NOISE_BLOCK_STEPS, (stop - 1) // NOISE_BLOCK_STEPS
    for block in range(first, last + 1):
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, digest, block])
        values = rng.standard_normal((model_config.n_group, NOISE_BLOCK_STEPS), dtype=np.float32)
        lo, hi = max(start, block * NOISE_BLOCK_STEPS), min(stop, (block + 1) * NOISE_BLOCK_STEPS)
        out[:, lo - start: hi - start] = values[:, lo - block * NOISE_BLOCK_STEPS: hi - block * NOISE_BLOCK_STEPS]
    return out


def utterance_noise(model_config: ModelConfig, frames: int, seed: int, utt_id: str) -> np.ndarray:
    """Standard-normal noise `[n_group, frames*hop/n_group]` for one utterance, float32.

    A function of (seed, utterance id) only: independent of backend, batch size, batch composition,
    processing order, chunking, and of the length itself (a shorter utterance's noise is a prefix of a
    longer one's; `noise_steps`). Multiply by sigma before use.
    """
    return noise_steps(model_config, seed, utt_id, 0, frames * model_config.steps_per_frame)


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


def batch_noise(model_config: ModelConfig, frames: int, seed: int, utt_id: str,
                chunk_frames: int = 0) -> np.ndarray | NoiseSource:
    """An utterance's noise for `vocode`: the array (`utterance_noise`), or, for one `vocode` will chunk,
    its `noise_source` (drawn chunk by chunk: the noise of an hour is 1 KiB per frame, 170 MB)."""
    if chunk_frames > 0 and frames > chunk_window(model_config, chunk_frames):
        return noise_source(model_config, seed, utt_id)
    return utterance_noise(model_config, frames, seed, utt_id)


def vocode(backend, mels: list[np.ndarray], noises: list[np.ndarray], sigma: float, model_config: ModelConfig,
           *, exact: bool = True, pad_value: float = STFTConfig().pad_value, chunk_frames: int = 0,
           sinks: dict | None = None, progress: Callable[[int], None] | None = None
           ) -> tuple[list[np.ndarray], dict]:
    """Run one padded batch through `backend`; each utterance's audio comes back trimmed to its length.

    With `chunk_frames` > 0, an utterance longer than `chunk_window(model_config, chunk_frames)` is
    vocoded alone in chunks (`vocode_chunked`: exact, memory bounded by the window); the others form
    the padded batch. Its index is listed in `stats["chunked"]`. A mel may be any `[n_mel, T]` that slices
    like an array (`mel_input.MelBlocks`: read by blocks); its noise a `NoiseSource` (`batch_noise`).
    `sinks` {index: write(audio)}: a chunked utterance's audio goes to its sink chunk by chunk as it is made
    (memory: one chunk), and its entry in the returned list is None. `progress(samples)` is told of every
    chunk and every other utterance as its audio is made.

    With `exact`, every utterance shorter than the padded length gets its tail (the samples whose
    receptive field reaches into the padding) recomputed from a short window of its own mel and noise,
    all windows in one batch; utterances shorter than the window are rerun alone. The result equals
    running each utterance by itself. A backend that cannot take the window length (an `.om` without that
    gear) leaves those tails as padded: their indices are listed in `stats["inexact"]`. A backend with
    `run_utterances` (fast) runs each utterance at its own length: nothing padded, so exact either way.
    """
    if chunk_frames > 0:
        window = chunk_window(model_config, chunk_frames)
        long = [i for i, m in enumerate(mels) if m.shape[1] > window]
        if long:
            return _vocode_with_chunks(backend, mels, noises, sigma, model_config, exact, pad_value,
                                       chunk_frames, long, sinks or {}, progress)
    mels = [np.asarray(m, dtype=np.float32) for m in mels]  # short: whole (a mel read by blocks, too)
    audios, stats = _vocode_whole(backend, mels, noises, sigma, model_config, exact, pad_value)
    if progress is not None:
        progress(sum(a.size for a in audios))
    return audios, stats


def _vocode_whole(backend, mels, noises, sigma, model_config, exact, pad_value) -> tuple[list[np.ndarray], dict]:
    lengths = [m.shape[1] for m in mels]
    if runs_utterances(backend):  # each utterance at its own length (fast): exact
        audios = backend.run_utterances(mels, [(sigma * n).astype(np.float32) for n in noises])
        return audios, {"padded_frames": max(lengths), "tail_frames": 0, "inexact": [], "chunked": [],
                        "chunk_windows": 0}
    padded = backend.pad_length(max(lengths))
    audios = _run_padded(backend, mels, noises, sigma, padded, pad_value)
    stats = {"padded_frames": padded, "tail_frames": 0, "inexact": [], "chunked": [], "chunk_windows": 0}
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


def _vocode_with_chunks(backend, mels, noises, sigma, model_config, exact, pad_value, chunk_frames, long, sinks,
                        progress):
    rest = [i for i in range(len(mels)) if i not in long]
    audios: list[np.ndarray | None] = [None] * len(mels)
    stats = {"padded_frames": 0, "tail_frames": 0, "inexact": [], "chunked": list(long), "chunk_windows": 0}
    if rest:
        outs, stats_rest = vocode(backend, [mels[i] for i in rest], [noises[i] for i in rest], sigma,
                                  model_config, exact=exact, pad_value=pad_value, progress=progress)
        for i, out in zip(rest, outs):
            audios[i] = out
        stats.update(padded_frames=stats_rest["padded_frames"], tail_frames=stats_rest["tail_frames"],
                     inexact=[rest[k] for k in stats_rest["inexact"]])
    for i in long:
        chunk_stats: dict = {}
        pieces = []
        for audio in vocode_stream(mels[i], backend, model_config, sigma=sigma, noise=noises[i],
                                   chunk_frames=chunk_frames, pad_value=pad_value, exact=exact, stats=chunk_stats):
            if i in sinks:
                sinks[i](audio)
            else:
                pieces.append(audio)
            if progress is not None:
                progress(audio.size)
        audios[i] = None if i in sinks else np.concatenate(pieces)
        stats["chunk_windows"] += chunk_stats["chunks"]
        stats["tail_frames"] += chunk_stats["computed_frames"] - mels[i].shape[1]
        if chunk_stats["inexact"]:
            stats["inexact"].append(i)
    return audios, stats


# --- any length: chunks with exact context, offline or as a stream ----------------------------------

#: `noise(start_step, stop_step) -> [n_group, stop - start]` standard-normal noise of one utterance
NoiseSource = Callable[[int, int], np.ndarray]
_END = object()


def chunk_window(model_config: ModelConfig, chunk_frames: int) -> int:
    """Mel frames one chunk runs: its `chunk_frames` of new audio plus the context each side needs."""
    left, right = model_config.chunk_context()
    return chunk_frames + left + right


def chunk_plan(frames: int, chunk_frames: int, model_config: ModelConfig,
               first_chunk_frames: int = 0) -> list[tuple[int, int, int, int]]:
    """(window start, window stop, centre start, centre stop) of each chunk of a `frames`-long mel.

    Centres are consecutive `chunk_frames` pieces (with `first_chunk_frames`: that many first, each next
    twice the last, up to chunk_frames); each window adds `ModelConfig.chunk_context()` frames each side,
    cut at the utterance's ends (where one-shot synthesis has the same boundary). This is the plan
    `vocode_stream` follows on a backend without gears (one with gears may widen the last window).
    """
    left, right = model_config.chunk_context()
    plan, start = [], 0
    size = min(first_chunk_frames, chunk_frames) if first_chunk_frames > 0 else chunk_frames
    while start < frames:
        stop = min(frames, start + size) if chunk_frames > 0 else frames
        plan.append((max(0, start - left), min(frames, stop + right), start, stop))
        start, size = stop, min(chunk_frames, 2 * size)
    return plan


def noise_source(model_config: ModelConfig, seed: int, utt_id: str) -> NoiseSource:
    """The utterance's noise (`utterance_noise`) drawn range by range, as a stream needs it."""
    return lambda start, stop: noise_steps(model_config, seed, utt_id, start, stop)


def _array_noise(noise: np.ndarray) -> NoiseSource:
    noise = np.asarray(noise, dtype=np.float32)

    def take(start: int, stop: int) -> np.ndarray:
        if stop > noise.shape[1]:
            raise SynthesisError(f"noise has {noise.shape[1]} steps, the mel needs at least {stop}")
        return noise[:, start:stop]
    return take


#: what a live mel source yields when no frame is ready yet (`vocode_stream` then yields it too)
NOT_YET = None


def _mel_pieces(mels: np.ndarray | Iterable[np.ndarray], n_mel: int, block: int = 0) -> Iterator[np.ndarray | None]:
    """A whole mel `[n_mel, T]` (an array, or `mel_input.MelBlocks`) in pieces of `block` frames, or an
    iterable of `[n_mel, k]` pieces / `[n_mel]` frames (NOT_YET passed on as it is)."""
    if getattr(mels, "ndim", None) == 2 and hasattr(mels, "shape"):
        whole, step = mels, max(1, block or mels.shape[1])
        mels = (whole[:, start:start + step] for start in range(0, whole.shape[1], step))
    for index, piece in enumerate(mels):
        if piece is NOT_YET:
            yield piece
            continue
        piece = np.asarray(piece, dtype=np.float32)
        if piece.ndim == 1:
            piece = piece[:, None]
        if piece.ndim != 2 or piece.shape[0] != n_mel:
            raise MelError(f"mel stream piece {index}: shape {piece.shape}, expected [{n_mel}, k] or [{n_mel}]")
        if not np.isfinite(piece).all():
            raise MelError(f"mel stream piece {index}: contains NaN/Inf values")
        if piece.shape[1]:
            yield piece


def vocode_stream(mels: np.ndarray | Iterable[np.ndarray], backend, model_config: ModelConfig, *,
                  sigma: float, noise: np.ndarray | NoiseSource | None = None, seed: int | None = None,
                  utt_id: str | None = None, chunk_frames: int = 2048,
                  pad_value: float = STFTConfig().pad_value, exact: bool = True,
                  stats: dict | None = None, first_chunk_frames: int = 0) -> Iterator[np.ndarray | None]:
    """Vocode one utterance chunk by chunk, yielding each chunk's audio as soon as its context is there.

    `mels`: the whole mel `[n_mel, T]`, or an iterable of `[n_mel, k]` pieces or `[n_mel]` frames (a TTS
    front-end producing frames progressively). `noise`: the utterance's noise `[n_group, ≥ T·hop/n_group]`
    or a `NoiseSource`; default `noise_source(model_config, seed, utt_id)` (= `utterance_noise`).
    Audio for centre frames [c0, c1) is yielded once frames up to c1 + right context have arrived (or the
    input ended); the concatenation equals `backend.run` on the whole mel with the same noise (each
    window carries `chunk_context()` frames each side, so no sample sees a window's edge). Memory holds
    one window (+ the largest gear) of mel, not the utterance. `chunk_frames=0`: one shot at the end.
    `stats` (a dict) receives chunks, computed_frames (window frames run, padding included), inexact.
    `first_chunk_frames` (< chunk_frames): the first centre is that short and each next one twice the last,
    up to chunk_frames — audio starts after a short window, later chunks carry their context rarely.
    A live source (a socket) may yield NOT_YET when it has no frame ready: the stream then yields NOT_YET
    (no audio) and goes on where it was when next asked, once the caller has more frames for the source.
    """
    if noise is None:
        if seed is None or utt_id is None:
            raise SynthesisError("vocode_stream needs noise= or seed= and utt_id= to draw it")
        noise = noise_source(model_config, seed, utt_id)
    take_noise = noise if callable(noise) else _array_noise(noise)
    left, right = model_config.chunk_context()
    hop = model_config.hop_length
    gears = list(getattr(backend, "gear_lengths", None) or [])
    keep = max(left, max(gears, default=0))  # frames kept before the next centre (left context, gear room)
    stats = stats if stats is not None else {}
    stats.update(chunks=0, computed_frames=0, inexact=False)
    pieces = _mel_pieces(mels, model_config.n_mel_channels, chunk_frames)  # a whole mel: read a chunk at a time
    buffer = np.zeros((model_config.n_mel_channels, 0), dtype=np.float32)
    pending: list[np.ndarray] = []
    base = received = start = 0  # buffer holds frames [base, received); next centre starts at `start`
    ended = False
    size = min(first_chunk_frames, chunk_frames) if first_chunk_frames > 0 else chunk_frames
    while True:
        while not ended and (chunk_frames <= 0 or received < start + size + right):
            piece = next(pieces, _END)
            if piece is _END:
                ended = True
            elif piece is NOT_YET:
                yield NOT_YET
            else:
                pending.append(piece)
                received += piece.shape[1]
        if pending:
            buffer = np.concatenate([buffer, *pending], axis=1)
            pending = []
        if ended and start >= received:
            break
        stop = min(received, start + size) if chunk_frames > 0 else received
        a, b = max(0, start - left), min(received, stop + right)
        audio, a = _run_window(backend, buffer, base, a, b, ended and b == received, take_noise, sigma,
                               model_config, exact, pad_value, stats)
        yield audio[(start - a) * hop: (stop - a) * hop]
        start, size = stop, min(chunk_frames, 2 * size)
        drop = max(0, start - keep) - base
        if drop > 0:
            buffer, base = buffer[:, drop:], base + drop
    if received == 0:
        raise MelError("the mel stream ended without a single frame")


def _run_window(backend, buffer, base, a, b, at_end, take_noise, sigma, model_config, exact, pad_value, stats):
    """Audio of window [a, b) (frame indices of the utterance), and the window start actually used."""
    spf = model_config.steps_per_frame
    length = b - a
    try:
        target = backend.pad_length(length)
    except BackendError as error:
        raise BackendError(f"{error}: a chunk window is {length} frames; lower chunk_frames or convert with "
                           "gear_policy=chunks") from None
    if at_end and target > length:
        # right padding would change the utterance's last samples: widen the window leftwards instead
        a = b - target
    stats["chunks"] += 1
    if at_end and a <= 0:  # the window is the whole utterance: vocode() pads it and makes its tail exact
        a = 0
        mel = buffer[:, a - base: b - base]
        audios, batch_stats = vocode(backend, [mel], [take_noise(0, b * spf)], sigma, model_config, exact=exact,
                                     pad_value=pad_value)
        stats["computed_frames"] += batch_stats["padded_frames"] + batch_stats["tail_frames"]
        stats["inexact"] = stats["inexact"] or bool(batch_stats["inexact"])
        return audios[0], a
    mel = buffer[:, a - base: b - base]
    # a window that ends before the utterance does may be padded on the right: the centre never sees it
    audio = _run_padded(backend, [mel], [take_noise(a * spf, b * spf)], sigma, max(target, b - a), pad_value)[0]
    stats["computed_frames"] += max(target, b - a)
    return audio, a


def vocode_chunked(backend, mel: np.ndarray, noise: np.ndarray | NoiseSource, sigma: float,
                   model_config: ModelConfig, chunk_frames: int, *, pad_value: float = STFTConfig().pad_value,
                   exact: bool = True, stats: dict | None = None) -> np.ndarray:
    """One utterance `[n_mel, T]` → audio `[T·hop]` in chunks of `chunk_frames` (`vocode_stream`, collected).

    Equal to one-shot synthesis with the same noise (fp32: to rounding), with memory bounded by one
    window instead of the utterance.
    """
    return np.concatenate(list(vocode_stream(mel, backend, model_config, sigma=sigma, noise=noise,
                                             chunk_frames=chunk_frames, pad_value=pad_value, exact=exact,
                                             stats=stats)))


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
