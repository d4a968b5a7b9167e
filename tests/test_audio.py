"""waveglow_lib.audio: WAV loading, the Slaney mel filterbank, the NVIDIA/Tacotron2 STFT mel, STFT inverse.

The mel is checked against two references written here, independently of the module:
* a float64 numpy/scipy computation (np.pad reflect, framing, scipy Hann, np.fft.rfft, a loop-built
  Slaney filterbank), which our float64 implementation should hit to float32 rounding;
* a literal float32 re-implementation of NVIDIA's tacotron2 `stft.STFT.transform` (conv1d with the
  windowed rows of np.fft.fft(np.eye(1024))) + `TacotronSTFT.mel_spectrogram`, the issue's ≤ 1e-3 bar.
"""
from __future__ import annotations

import math
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import wavfile
from scipy.signal import get_window

from waveglow_lib.audio import (
    STFT, AudioError, frames_for_samples, hz_to_mel, load_wav, mel_filterbank, mel_spectrogram, mel_to_hz)
from waveglow_lib.config import DEMO_CORPUS_DIR, STFTConfig

SR, N_FFT, HOP, N_MELS, FMAX = 22050, 1024, 256, 80, 8000.0


# ---------------------------------------------------------------------------------------------
# independent references
# ---------------------------------------------------------------------------------------------
def ref_hz_to_mel(f: float) -> float:
    """Slaney: 3 mels per 200 Hz up to 1 kHz, then 27 mels per factor 6.4."""
    if f < 1000.0:
        return 3.0 * f / 200.0
    return 15.0 + 27.0 * math.log(f / 1000.0) / math.log(6.4)


def ref_mel_to_hz(m: float) -> float:
    if m < 15.0:
        return 200.0 * m / 3.0
    return 1000.0 * 6.4 ** ((m - 15.0) / 27.0)


def ref_slaney_filterbank(sr=SR, n_fft=N_FFT, n_mels=N_MELS, fmin=0.0, fmax=FMAX) -> np.ndarray:
    """Loop version of librosa.filters.mel(htk=False, norm='slaney')."""
    lo, hi = ref_hz_to_mel(fmin), ref_hz_to_mel(fmax)
    points = [ref_mel_to_hz(lo + (hi - lo) * i / (n_mels + 1)) for i in range(n_mels + 2)]
    bins = [k * sr / n_fft for k in range(n_fft // 2 + 1)]
    fb = np.zeros((n_mels, len(bins)))
    for m in range(n_mels):
        left, centre, right = points[m], points[m + 1], points[m + 2]
        height = 2.0 / (right - left)
        for k, f in enumerate(bins):
            if left < f <= centre:
                fb[m, k] = height * (f - left) / (centre - left)
            elif centre < f < right:
                fb[m, k] = height * (right - f) / (right - centre)
    return fb


def ref_mel_numpy(audio: np.ndarray) -> np.ndarray:
    """float64 numpy: reflect pad, Hann-windowed rfft frames, |.|, Slaney mel, log clamp."""
    x = np.pad(audio.astype(np.float64), N_FFT // 2, mode="reflect")
    n_frames = 1 + (len(x) - N_FFT) // HOP
    frames = np.stack([x[t * HOP: t * HOP + N_FFT] for t in range(n_frames)])
    spec = np.abs(np.fft.rfft(frames * get_window("hann", N_FFT, fftbins=True), axis=1)).T
    return np.log(np.maximum(ref_slaney_filterbank() @ spec, 1e-5))


def nvidia_mel_float32(audio: np.ndarray) -> np.ndarray:
    """NVIDIA tacotron2 stft.STFT.transform + TacotronSTFT.mel_spectrogram, step by step, float32."""
    basis = np.fft.fft(np.eye(N_FFT))
    cutoff = N_FFT // 2 + 1
    basis = np.vstack([np.real(basis[:cutoff]), np.imag(basis[:cutoff])])
    forward = torch.FloatTensor(basis[:, None, :]) * torch.from_numpy(get_window("hann", N_FFT, fftbins=True)).float()
    y = torch.from_numpy(audio.astype(np.float32))[None, None, None, :]
    y = torch.nn.functional.pad(y, (N_FFT // 2, N_FFT // 2, 0, 0), mode="reflect").squeeze(1)
    out = torch.nn.functional.conv1d(y, forward, stride=HOP)
    magnitude = torch.sqrt(out[:, :cutoff] ** 2 + out[:, cutoff:] ** 2)
    mel_basis = torch.from_numpy(ref_slaney_filterbank().astype(np.float32))  # librosa returns float32
    return torch.log(torch.clamp(torch.matmul(mel_basis, magnitude), min=1e-5))[0].numpy()


def demo_audio(utt: str) -> np.ndarray:
    rate, data = wavfile.read(DEMO_CORPUS_DIR / "wavs" / f"{utt}.wav")
    assert rate == SR and data.dtype == np.int16
    return data / 32768.0  # float64, what NVIDIA's get_mel feeds in (after its own float32 cast)


# ---------------------------------------------------------------------------------------------
# mel scale and filterbank
# ---------------------------------------------------------------------------------------------
def test_hz_to_mel_known_values():
    # librosa.hz_to_mel (htk=False): linear 200/3 Hz per mel below 1 kHz, 1000 Hz -> 15, 6400 Hz -> 42
    assert hz_to_mel(1000.0) == pytest.approx(15.0, abs=1e-12)
    assert hz_to_mel(500.0) == pytest.approx(7.5, abs=1e-12)
    assert hz_to_mel(60.0) == pytest.approx(0.9, abs=1e-12)
    assert hz_to_mel(6400.0) == pytest.approx(42.0, abs=1e-12)
    assert hz_to_mel(8000.0) == pytest.approx(15 + 27 * math.log(8) / math.log(6.4), abs=1e-12)
    freqs = np.array([0.0, 37.5, 999.0, 1000.0, 1001.0, 4000.0, 11025.0])
    np.testing.assert_allclose(hz_to_mel(freqs), [ref_hz_to_mel(f) for f in freqs], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(freqs)), freqs, rtol=1e-12, atol=1e-9)
    assert mel_to_hz(3.0) == pytest.approx(200.0)


def test_filterbank_matches_loop_reference_and_slaney_properties():
    fb = mel_filterbank(SR, N_FFT, N_MELS, 0.0, FMAX)
    assert fb.shape == (80, 513) and fb.dtype == np.float64
    np.testing.assert_allclose(fb, ref_slaney_filterbank(), rtol=0, atol=1e-12)
    # a value by hand: filter 0 spans 0 .. 2*f1 Hz with f1 = (200/3) * mel(8000)/81; bin 1 is at 22050/1024 Hz
    f1 = 200.0 / 3.0 * (15 + 27 * math.log(8) / math.log(6.4)) / 81
    assert fb[0, 1] == pytest.approx((22050 / 1024) / f1 * 2.0 / (2 * f1), rel=1e-12)
    assert fb[0, 0] == 0.0 and np.all(fb >= 0)
    # Slaney norm: each triangle has unit area in Hz (bin sampling jitters narrow ones by a few %)
    areas = fb.sum(axis=1) * SR / N_FFT
    np.testing.assert_allclose(areas[50:], 1.0, atol=0.015)
    assert abs(areas[20:].mean() - 1.0) < 0.002
    assert fb[:, np.flatnonzero(np.fft.rfftfreq(N_FFT, 1 / SR) > FMAX)].max() == 0.0


# ---------------------------------------------------------------------------------------------
# mel spectrogram
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("utt", ["LJ001-0001", "LJ001-0008"])
def test_mel_matches_float64_numpy_reference(utt):
    audio = demo_audio(utt)
    ours = mel_spectrogram(audio.astype(np.float32))
    ref = ref_mel_numpy(audio.astype(np.float32))
    assert ours.shape == ref.shape == (80, frames_for_samples(len(audio)))
    err = float(np.abs(ours - ref).max())
    print(f"{utt}: mel max abs error vs float64 numpy reference {err:.2e}")
    assert err < 1e-5


@pytest.mark.parametrize("utt", ["LJ001-0001", "LJ001-0008"])
def test_mel_matches_nvidia_float32_algorithm(utt):
    audio = demo_audio(utt).astype(np.float32)
    ours = mel_spectrogram(audio)
    theirs = nvidia_mel_float32(audio)
    assert ours.shape == theirs.shape
    err = float(np.abs(ours - theirs).max())
    print(f"{utt}: mel max abs error vs NVIDIA float32 conv1d algorithm {err:.2e}")
    assert err <= 1e-3
    # most of the error is NVIDIA's float32 rounding on near-silent frames; speech frames agree closely
    loud = theirs.max(axis=0) > -6
    assert loud.sum() > 50 and np.abs(ours - theirs)[:, loud].max() < 1e-4


def test_mel_types_shapes_and_batches():
    rng = np.random.default_rng(0)
    a = (0.3 * rng.standard_normal(5000)).clip(-1, 1).astype(np.float32)
    b = (0.1 * rng.standard_normal(5000)).astype(np.float32)
    mel_a = mel_spectrogram(a)
    assert isinstance(mel_a, np.ndarray) and mel_a.dtype == np.float32
    assert mel_a.shape == (80, frames_for_samples(5000)) == (80, 1 + 5000 // 256)
    batched = mel_spectrogram(np.stack([a, b]))
    assert batched.shape == (2, 80, 20)
    np.testing.assert_allclose(batched[0], mel_a, atol=1e-6)
    np.testing.assert_allclose(batched[1], mel_spectrogram(b), atol=1e-6)
    as_torch = mel_spectrogram(torch.from_numpy(np.stack([a, b])))
    assert isinstance(as_torch, torch.Tensor) and as_torch.dtype == torch.float32
    np.testing.assert_allclose(as_torch.numpy(), batched, atol=1e-6)
    # silence maps to log(clip_val) everywhere
    silent = mel_spectrogram(np.zeros(2048, np.float32))
    np.testing.assert_allclose(silent, math.log(1e-5), rtol=0, atol=1e-6)
    # other STFT settings are honoured (hop 128 -> twice the frames, 40 bands)
    small = mel_spectrogram(a, STFTConfig(hop_length=128, n_mel_channels=40))
    assert small.shape == (40, 1 + 5000 // 128)
    assert frames_for_samples(0) == 1 and frames_for_samples(255) == 1 and frames_for_samples(256) == 2
    assert frames_for_samples(1000, hop=100) == 11


def test_mel_rejects_bad_audio():
    ok = np.zeros(513, np.float32)
    assert mel_spectrogram(ok).shape == (80, 3)  # the shortest input reflect padding allows
    with pytest.raises(AudioError, match="too short"):
        mel_spectrogram(np.zeros(512, np.float32))
    bad = np.zeros(4000, np.float32)
    bad[100] = np.nan
    with pytest.raises(AudioError, match="NaN or Inf"):
        mel_spectrogram(bad)
    bad[100] = np.inf
    with pytest.raises(AudioError, match="NaN or Inf"):
        mel_spectrogram(torch.from_numpy(bad))
    with pytest.raises(AudioError, match=r"\[N\] or \[B, N\]"):
        mel_spectrogram(np.zeros((1, 1, 4000), np.float32))
    with pytest.raises(AudioError, match="float samples"):
        mel_spectrogram(np.zeros(4000, np.int16))


# ---------------------------------------------------------------------------------------------
# STFT inverse
# ---------------------------------------------------------------------------------------------
def test_stft_round_trip_and_lengths():
    stft = STFT()
    x = torch.from_numpy(np.random.default_rng(1).uniform(-0.5, 0.5, (2, 6000)))
    magnitude, phase = stft.transform(x)
    assert magnitude.shape == phase.shape == (2, 513, 1 + 6000 // 256)
    nvidia_length = stft.inverse(magnitude, phase)  # NVIDIA trims to (T - 1) * hop samples
    assert nvidia_length.shape == (2, (6000 // 256) * 256)
    np.testing.assert_allclose(nvidia_length.numpy(), x[:, :nvidia_length.shape[1]].numpy(), atol=1e-12)
    full = stft.inverse(magnitude, phase, length=6000)
    np.testing.assert_allclose(full.numpy(), x.numpy(), atol=1e-12)
    with pytest.raises(ValueError, match="longer"):
        stft.inverse(magnitude, phase, length=10_000)


# ---------------------------------------------------------------------------------------------
# load_wav
# ---------------------------------------------------------------------------------------------
def test_load_wav_int16_scaling_like_nvidia(tmp_path):
    data = np.array([0, 1, -1, 16384, -32768, 32767] * 100, dtype=np.int16)
    wavfile.write(tmp_path / "a.wav", SR, data)
    audio, rate = load_wav(tmp_path / "a.wav")
    assert rate == SR and audio.dtype == np.float32 and audio.shape == (600,)
    np.testing.assert_array_equal(audio, data.astype(np.float32) / 32768.0)


def _write_24bit(path: Path, values: np.ndarray, rate: int = SR) -> None:
    raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in values)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(3)
        handle.setframerate(rate)
        handle.writeframes(raw)


def test_load_wav_other_sample_formats(tmp_path):
    values = np.array([0, 1000, -1000, 2 ** 22, -(2 ** 23)])
    _write_24bit(tmp_path / "p24.wav", values)
    audio, _ = load_wav(tmp_path / "p24.wav")
    np.testing.assert_allclose(audio, values / 2 ** 23, atol=1e-7)

    wavfile.write(tmp_path / "p32.wav", SR, np.array([2 ** 30, -(2 ** 31)], dtype=np.int32))
    np.testing.assert_allclose(load_wav(tmp_path / "p32.wav")[0], [0.5, -1.0])

    wavfile.write(tmp_path / "u8.wav", SR, np.array([128, 192, 0], dtype=np.uint8))
    np.testing.assert_allclose(load_wav(tmp_path / "u8.wav")[0], [0.0, 0.5, -1.0])

    wavfile.write(tmp_path / "f32.wav", SR, np.array([0.25, -0.5], dtype=np.float32))
    np.testing.assert_allclose(load_wav(tmp_path / "f32.wav")[0], [0.25, -0.5])

    wavfile.write(tmp_path / "loud.wav", SR, np.array([1.5, -0.5], dtype=np.float32))
    with pytest.warns(UserWarning, match="beyond full scale"):
        np.testing.assert_allclose(load_wav(tmp_path / "loud.wav")[0], [1.0, -0.5])

    wavfile.write(tmp_path / "nan.wav", SR, np.array([0.1, np.nan], dtype=np.float32))
    with pytest.raises(AudioError, match="nan.wav.*NaN"):
        load_wav(tmp_path / "nan.wav")


def test_load_wav_wrong_rate_and_resample(tmp_path):
    t = np.arange(44100) / 44100
    tone = (0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    path = tmp_path / "tone44k.wav"
    wavfile.write(path, 44100, tone)
    with pytest.raises(AudioError) as info:
        load_wav(path)
    message = str(info.value)
    assert "tone44k.wav" in message and "44100" in message and "22050" in message and "resample=True" in message
    audio, rate = load_wav(path, resample=True)
    assert rate == SR and audio.shape == (22050,) and audio.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(audio))
    assert np.argmax(spectrum) == 440  # 1 s long: bin k is k Hz
    assert np.abs(audio[1000:-1000]).max() == pytest.approx(0.5, abs=0.01)
    # 16 kHz -> 22050 Hz uses the exact ratio 441/320
    wavfile.write(tmp_path / "t16k.wav", 16000, tone[:16000])
    assert load_wav(tmp_path / "t16k.wav", resample=True)[0].shape == (22050,)
    # expected_rate=None accepts whatever the file has
    assert load_wav(path, expected_rate=None)[1] == 44100


def test_load_wav_stereo(tmp_path):
    stereo = np.stack([np.full(1000, 8192, np.int16), np.full(1000, -16384, np.int16)], axis=1)
    wavfile.write(tmp_path / "st.wav", SR, stereo)
    with pytest.raises(AudioError, match=r"st\.wav: 2 channels.*downmix=True"):
        load_wav(tmp_path / "st.wav")
    audio, _ = load_wav(tmp_path / "st.wav", downmix=True)
    assert audio.shape == (1000,)
    np.testing.assert_allclose(audio, (0.25 - 0.5) / 2)
    wavfile.write(tmp_path / "mono2d.wav", SR, stereo[:, :1])
    assert load_wav(tmp_path / "mono2d.wav")[0].shape == (1000,)


def test_load_wav_broken_files(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav: the file is empty"):
        load_wav(tmp_path / "empty.wav")
    wavfile.write(tmp_path / "zero.wav", SR, np.zeros(0, np.int16))
    with pytest.raises(AudioError, match=r"zero\.wav: .*zero samples"):
        load_wav(tmp_path / "zero.wav")
    (tmp_path / "text.wav").write_text("this is not audio at all\n" * 10)
    with pytest.raises(AudioError, match=r"text\.wav: not a readable WAV file"):
        load_wav(tmp_path / "text.wav")
    wavfile.write(tmp_path / "cut.wav", SR, np.zeros(1000, np.int16))
    (tmp_path / "cut.wav").write_bytes((tmp_path / "cut.wav").read_bytes()[:30])
    with pytest.raises(AudioError, match=r"cut\.wav: not a readable WAV file"):
        load_wav(tmp_path / "cut.wav")
    with pytest.raises(AudioError, match=r"missing\.wav: no such WAV file"):
        load_wav(tmp_path / "missing.wav")
    assert issubclass(AudioError, ValueError)


# ---------------------------------------------------------------------------------------------
# demo corpus
# ---------------------------------------------------------------------------------------------
def test_demo_corpus_layout():
    from waveglow_lib.assets.make_demo_corpus import TRANSCRIPTS

    lines = (DEMO_CORPUS_DIR / "metadata.csv").read_text(encoding="utf-8").splitlines()
    rows = [line.split("|") for line in lines]
    assert [r[0] for r in rows] == [f"LJ001-{i:04d}" for i in range(1, 11)]
    assert all(len(r) == 3 for r in rows)
    assert [tuple(r) for r in rows] == list(TRANSCRIPTS)
    assert rows[0][1].startswith("Printing, in the only sense with which we are at present concerned")
    assert "1455" in rows[6][1] and "fourteen fifty-five" in rows[6][2]
    total = (DEMO_CORPUS_DIR / "metadata.csv").stat().st_size
    for utt, *_ in rows:
        path = DEMO_CORPUS_DIR / "wavs" / f"{utt}.wav"
        rate, data = wavfile.read(path)
        assert rate == 22050 and data.dtype == np.int16 and data.ndim == 1
        assert 0.5 < len(data) / rate < 12 and np.abs(data).max() > 8000
        total += path.stat().st_size
    assert sorted(p.name for p in (DEMO_CORPUS_DIR / "wavs").iterdir()) == [f"{r[0]}.wav" for r in rows]
    assert total < 2_000_000


# ---------------------------------------------------------------------------------------------
# by blocks: memory bounded by a block, not by the wav
# ---------------------------------------------------------------------------------------------
def test_mel_blocks_equal_the_one_shot_mel():
    """Exact seams: a stream of odd-sized pieces, small blocks of frames, both ends' reflection."""
    from waveglow_lib.audio import mel_blocks
    rng = np.random.default_rng(3)
    for n in (513, 22050 * 3 + 7, 256 * 40):
        audio = (rng.standard_normal(n) * 0.3).astype(np.float32)
        pieces = np.split(audio, np.sort(rng.integers(0, n, 6)))
        for block_frames in (1, 7, 512):
            got = np.concatenate(list(mel_blocks(pieces, block_frames=block_frames)), axis=1)
            assert got.shape == mel_spectrogram(audio).shape
            assert np.abs(got - mel_spectrogram(audio)).max() < 1e-5


def test_wav_stream_reads_load_wavs_samples_by_blocks(tmp_path):
    """Resampled (the resampler as a stream) and down-mixed, a block at a time: load_wav's samples."""
    from waveglow_lib.audio import WavStream
    rng = np.random.default_rng(4)
    stereo = (rng.standard_normal((44100, 2)) * 3000).astype(np.int16)
    wavfile.write(tmp_path / "st.wav", 44100, stereo)
    whole, rate = load_wav(tmp_path / "st.wav", resample=True, downmix=True)
    stream = WavStream(tmp_path / "st.wav", resample=True, downmix=True, block=1000)
    pieces = list(stream.pieces())
    assert len(pieces) > 20 and rate == stream.rate == 22050
    assert np.array_equal(np.concatenate(pieces), whole)
    assert stream.samples == whole.size and stream.peak == float(np.max(np.abs(whole)))


def test_wav_writer_writes_wav_bytes_piece_by_piece():
    import io as _io
    from waveglow_lib.audio import WavWriter, wav_bytes
    audio = (np.random.default_rng(5).standard_normal(5000) * 0.3).astype(np.float32)
    buffer = _io.BytesIO()
    writer = WavWriter(buffer, 22050)
    for piece in np.split(audio, [100, 2000, 2001]):
        writer.write(piece)
    writer.close()
    assert buffer.getvalue() == wav_bytes(audio, 22050)
