"""Any length, exactly: chunked and streamed synthesis equal one-shot synthesis with the same noise, the
context each chunk carries is derived from the model (and is tight), noise is drawn so a stream can
draw it incrementally, and the infer stage / `.om` gear policy use the chunked path."""
from __future__ import annotations

import numpy as np
import pytest

from support import TINY_PIPELINE, snr_db
from waveglow_lib.backends import get_backend
from waveglow_lib.batching import (NOISE_BLOCK_STEPS, chunk_plan, chunk_window, noise_source, noise_steps,
                                   utterance_noise, vocode, vocode_chunked, vocode_stream, NOT_YET)
from waveglow_lib.config import ModelConfig
from waveglow_lib.convert import mel_gears
from waveglow_lib.errors import MelError

SIGMA = 0.6
FRAMES = 64  # the tiny model's context is (4, 1) frames: chunks of 1 … 64 frames cover every case


def _mel(frames: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((TINY_PIPELINE.n_mel_channels, frames)) - 5.0).astype(np.float32)


@pytest.fixture(scope="module")
def torch_backend(tiny_model):
    with get_backend("torch", model=tiny_model()) as backend:
        yield backend


@pytest.fixture(scope="module")
def long_case(torch_backend):
    mel = _mel(FRAMES)
    noise = utterance_noise(TINY_PIPELINE, FRAMES, 1234, "long")
    one_shot = torch_backend.run(mel[None], SIGMA * noise[None])[0]
    return mel, noise, one_shot


def test_chunk_context_is_derived_from_the_receptive_field_and_the_upsampler():
    official = ModelConfig()
    # 12 flows × (2^8 - 1) steps each side = 3060 steps = 95.6 frames of 32 steps → 96; the upsampler's
    # kernel of 4 frames reaches 3 frames back
    assert official.receptive_field() == 3060
    assert official.chunk_context() == (3 + 96, 96)
    assert TINY_PIPELINE.chunk_context() == (3 + 1, 1)
    assert chunk_window(official, 2048) == 2048 + 195


@pytest.mark.parametrize("chunk_frames", [1, 3, 5, 17, FRAMES - 1, FRAMES, 400])
def test_chunked_equals_one_shot_at_any_chunk_size(torch_backend, long_case, chunk_frames):
    """Including chunks much shorter than the context (1 and 3 frames against 4 + 1)."""
    mel, noise, one_shot = long_case
    stats: dict = {}
    audio = vocode_chunked(torch_backend, mel, noise, SIGMA, TINY_PIPELINE, chunk_frames, stats=stats)
    assert audio.shape == one_shot.shape
    assert snr_db(one_shot, audio) >= 100
    assert stats["chunks"] == len(chunk_plan(FRAMES, chunk_frames, TINY_PIPELINE))
    assert not stats["inexact"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_one_frame_less_context_is_not_exact(torch_backend, long_case, monkeypatch, side):
    """The bound is tight: with one frame less on either side the seams' samples differ from one-shot
    far beyond fp32 rounding (which is what the exact context leaves)."""
    mel, noise, one_shot = long_case
    exact = np.abs(vocode_chunked(torch_backend, mel, noise, SIGMA, TINY_PIPELINE, 17) - one_shot).max()
    left, right = TINY_PIPELINE.chunk_context()
    short = (left - 1, right) if side == "left" else (left, right - 1)
    monkeypatch.setattr(ModelConfig, "chunk_context", lambda self: short)
    error = np.abs(vocode_chunked(torch_backend, mel, noise, SIGMA, TINY_PIPELINE, 17) - one_shot).max()
    assert error > 20 * max(exact, 1e-6), (error, exact)


def test_fast_backend_chunked_equals_one_shot(tiny_model, long_case):
    mel, noise, _ = long_case
    with get_backend("fast", model=tiny_model(), precision="fp32", threads=1) as backend:
        one_shot = backend.run(mel[None], SIGMA * noise[None])[0]
        for chunk_frames in (3, 40):
            assert snr_db(one_shot, vocode_chunked(backend, mel, noise, SIGMA, TINY_PIPELINE, chunk_frames)) >= 100


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_graph_backends_chunked_equal_one_shot(tiny_onnx, name):
    pytest.importorskip(name)
    frames = 60
    mel = _mel(frames, seed=3)
    noise = utterance_noise(TINY_PIPELINE, frames, 7, "graph")
    with get_backend(name, onnx_path=tiny_onnx) as backend:
        one_shot = backend.run(mel[None], SIGMA * noise[None])[0]
        assert snr_db(one_shot, vocode_chunked(backend, mel, noise, SIGMA, TINY_PIPELINE, 9)) >= 100


def test_stream_equals_offline_and_yields_early(torch_backend, long_case):
    """Frames arrive one by one (a TTS front-end); audio comes out as soon as its right context is in."""
    mel, _, one_shot = long_case
    pulled = []

    def frames():
        for t in range(FRAMES):
            pulled.append(t)
            yield mel[:, t]

    chunk_frames = 10
    right = TINY_PIPELINE.chunk_context()[1]
    pieces = []
    for piece in vocode_stream(frames(), torch_backend, TINY_PIPELINE, sigma=SIGMA, seed=1234, utt_id="long",
                               chunk_frames=chunk_frames):
        if not pieces:  # the first chunk needed its 10 frames and 1 frame of right context, no more
            assert len(pulled) == chunk_frames + right
        pieces.append(piece)
    assert [p.size for p in pieces[:-1]] == [chunk_frames * TINY_PIPELINE.hop_length] * (len(pieces) - 1)
    assert snr_db(one_shot, np.concatenate(pieces)) >= 100
    # pieces of varying sizes and a whole-mel input give the same stream
    uneven = [mel[:, a:b] for a, b in zip([0, 3, 30, 31, 50], [3, 30, 31, 50, FRAMES])]
    again = np.concatenate(list(vocode_stream(uneven, torch_backend, TINY_PIPELINE, sigma=SIGMA, seed=1234,
                                              utt_id="long", chunk_frames=chunk_frames)))
    assert np.array_equal(again, np.concatenate(pieces))


def test_stream_with_a_short_first_chunk_and_a_live_source(torch_backend, long_case):
    """A first chunk of 2 frames, doubling to 10: audio starts after 2 + right frames, sizes 2, 4, 8, 10, ...;
    a live source that says NOT_YET gets NOT_YET back and the stream resumes; the joined audio is the same."""
    mel, _, one_shot = long_case
    right = TINY_PIPELINE.chunk_context()[1]
    arrived: list = []  # frames the source has, as a socket would have them
    given = []

    def live():
        while True:
            if arrived:
                given.append(1)
                yield arrived.pop(0)
            elif len(given) >= FRAMES:
                return
            else:
                yield NOT_YET

    pieces, waits = [], 0
    stream = vocode_stream(live(), torch_backend, TINY_PIPELINE, sigma=SIGMA, seed=1234, utt_id="long",
                           chunk_frames=10, first_chunk_frames=2)
    t = 0
    for piece in stream:
        if piece is NOT_YET:
            waits += 1
            arrived.append(mel[:, t])
            t += 1
            continue
        if not pieces:
            assert len(given) == 2 + right
        pieces.append(piece)
    hop = TINY_PIPELINE.hop_length
    assert [p.size // hop for p in pieces[:4]] == [2, 4, 8, 10] and waits == FRAMES
    assert np.array_equal(np.concatenate(pieces), np.concatenate(list(vocode_stream(
        mel, torch_backend, TINY_PIPELINE, sigma=SIGMA, seed=1234, utt_id="long", chunk_frames=10,
        first_chunk_frames=2))))
    assert snr_db(one_shot, np.concatenate(pieces)) >= 100


def test_stream_of_a_short_utterance_and_bad_streams(torch_backend):
    mel = _mel(3, seed=5)
    noise = utterance_noise(TINY_PIPELINE, 3, 1, "short")
    one_shot = torch_backend.run(mel[None], SIGMA * noise[None])[0]
    stream = list(vocode_stream(iter(mel.T), torch_backend, TINY_PIPELINE, sigma=SIGMA, seed=1, utt_id="short",
                                chunk_frames=50))
    assert len(stream) == 1 and snr_db(one_shot, stream[0]) >= 100
    with pytest.raises(MelError, match="without a single frame"):
        list(vocode_stream(iter([]), torch_backend, TINY_PIPELINE, sigma=SIGMA, seed=1, utt_id="x"))
    bad = mel.copy()
    bad[0, 1] = np.nan
    with pytest.raises(MelError, match="NaN"):
        list(vocode_stream([bad], torch_backend, TINY_PIPELINE, sigma=SIGMA, seed=1, utt_id="x"))


def test_noise_is_drawn_in_blocks_so_a_prefix_does_not_depend_on_the_length():
    steps = TINY_PIPELINE.steps_per_frame
    frames = 2 * NOISE_BLOCK_STEPS // steps + 5  # crosses two block boundaries
    full = utterance_noise(TINY_PIPELINE, frames, 9, "u")
    assert full.shape == (TINY_PIPELINE.n_group, frames * steps) and full.dtype == np.float32
    assert np.array_equal(utterance_noise(TINY_PIPELINE, 10, 9, "u"), full[:, : 10 * steps])
    a, b = NOISE_BLOCK_STEPS - 7, 2 * NOISE_BLOCK_STEPS + 3
    assert np.array_equal(noise_steps(TINY_PIPELINE, 9, "u", a, b), full[:, a:b])
    assert np.array_equal(noise_source(TINY_PIPELINE, 9, "u")(a, b), full[:, a:b])
    # blocks are independent draws, not a repeated block
    assert not np.allclose(full[:, :100], full[:, NOISE_BLOCK_STEPS: NOISE_BLOCK_STEPS + 100])
    assert abs(float(full.std()) - 1.0) < 0.02


def test_vocode_batches_short_utterances_and_chunks_long_ones(torch_backend):
    lengths = [200, 30, 12]
    mels = [_mel(n, seed=n) for n in lengths]
    noises = [utterance_noise(TINY_PIPELINE, n, 1, f"u{n}") for n in lengths]
    alone = [torch_backend.run(m[None], SIGMA * z[None])[0] for m, z in zip(mels, noises)]
    audios, stats = vocode(torch_backend, mels, noises, SIGMA, TINY_PIPELINE, chunk_frames=30)
    assert stats["chunked"] == [0] and stats["chunk_windows"] == 7 and not stats["inexact"]
    for reference, audio in zip(alone, audios):
        assert snr_db(reference, audio) >= 100


class GearedTorch:
    """The torch backend behind an `.om`-like gear list (pad_length from base.Backend): what the om
    backend does with a `chunks`-policy `.gears.json`, without an NPU."""

    def __init__(self, backend, gears):
        self.inner, self.gear_lengths, self.fixed_batch, self.lengths_run = backend, sorted(gears), None, []
        self.name = "geared"

    def pad_length(self, frames):
        from waveglow_lib.backends.base import Backend
        return Backend.pad_length(self, frames)

    def run(self, mel, z):
        assert mel.shape[2] in self.gear_lengths, mel.shape
        self.lengths_run.append(mel.shape[2])
        return self.inner.run(mel, z)


def test_chunks_gear_policy_covers_any_length_with_a_few_gears(torch_backend):
    chunk_frames = 24
    window = chunk_window(TINY_PIPELINE, chunk_frames)
    lengths = [12, 20, 25, 300, 1000]
    gears = mel_gears(lengths, "chunks", n_buckets=2, chunk_window=window)
    assert max(gears) == window and len(gears) <= 3
    geared = GearedTorch(torch_backend, gears + [TINY_PIPELINE.tail_window()[0]])
    for frames in (300, 20):
        mel = _mel(frames, seed=frames)
        noise = utterance_noise(TINY_PIPELINE, frames, 1, "g")
        one_shot = torch_backend.run(mel[None], SIGMA * noise[None])[0]
        audios, stats = vocode(geared, [mel], [noise], SIGMA, TINY_PIPELINE, chunk_frames=chunk_frames)
        assert not stats["inexact"]
        assert snr_db(one_shot, audios[0]) >= 100
    with pytest.raises(Exception, match="chunk_frames > 0"):
        mel_gears(lengths, "chunks", n_buckets=2, chunk_window=None)


def test_infer_stage_chunks_long_utterances_exactly(preprocessed_run, tmp_path):
    """The infer stage with tiny chunks writes what it writes without chunking (same noise), and says so."""
    import json

    from waveglow_lib.io import read_bin
    from waveglow_lib.layout import out_bin
    from waveglow_lib.stages import infer

    whole = preprocessed_run(tmp_path / "whole", chunk_frames=0)
    chunked = preprocessed_run(tmp_path / "chunked", chunk_frames=40)
    infer(whole)
    infer(chunked)
    record = json.loads(chunked.layout.timings.read_text())
    for utt_id, item in record["items"].items():
        assert item.get("chunked") is True  # 99 … 281 frames, all longer than 40 + 5
        shape = (item["samples"],)
        a = read_bin(out_bin(whole.layout.out_dir, utt_id), shape)
        b = read_bin(out_bin(chunked.layout.out_dir, utt_id), shape)
        assert snr_db(a, b) >= 100


def test_convert_stage_chunks_policy_writes_a_few_gears(preprocessed_run, tmp_path, monkeypatch):
    """Lengths 99, 125, 281 with chunks of 40 frames (+ 5 context): one bucket below the window, the
    window, the exact-tail window; no length of the corpus needs its own gear."""
    import json

    from waveglow_lib.stages import convert

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no atc: the script is written
    cfg = preprocessed_run(tmp_path, with_onnx=True, gear_policy="chunks", n_buckets=1, chunk_frames=40)
    result = convert(cfg, targets=("atc",))["atc"]
    window = chunk_window(TINY_PIPELINE, 40)
    assert result["gears"] == sorted({TINY_PIPELINE.tail_window()[0], window})
    assert json.loads((cfg.run_dir / "om" / "waveglow.gears.json").read_text())["gear_policy"] == "chunks"
    with pytest.raises(Exception, match="chunk_frames > 0"):
        convert(cfg.with_overrides(chunk_frames=0), targets=("atc",), force=True)


def test_stream_bench_smoke(tiny_model, tmp_path):
    """`bench --stream` on the tiny model: the rows and files are made (what it measures is not asserted)."""
    from waveglow_lib.bench.stream import stream_bench

    result = stream_bench(None, model=tiny_model(), backends=["torch"], lengths=[20, 9], chunk_frames=8,
                          memory_seconds=(1,), memory_backend="torch", out_dir=tmp_path)
    row = result["rows"][0]
    assert row["backend"] == "torch" and row["chunks"] == 3 + 2 and row["chunk_ms_p95"] >= row["chunk_ms_p50"] > 0
    assert result["memory"][0]["frames"] == 86 and result["context_frames"] == [4, 1]
    assert (tmp_path / "bench_stream.md").read_text().startswith("# Streaming")
