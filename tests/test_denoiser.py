"""waveglow_lib.denoiser.Denoiser against a literal re-implementation of NVIDIA's denoiser.

The reference below follows NVIDIA/waveglow `denoiser.py` + tacotron2 `stft.py` step by step (forward
conv1d with the windowed rows of np.fft.fft(np.eye(1024)), inverse conv_transpose1d with the windowed
pinv basis, the looped window sum-square envelope, the filter_length/hop rescale and the trims), in
float64 so that the comparison measures algorithmic agreement rather than float32 rounding.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.io import wavfile
from scipy.signal import get_window

from waveglow_lib.audio import AudioError
from waveglow_lib.config import DEMO_CORPUS_DIR
from waveglow_lib.denoiser import Denoiser

from support import snr_db

N_FFT, HOP, SR = 1024, 256, 22050


class NvidiaDenoiserReference:
    def __init__(self, bias_audio: np.ndarray):
        basis = np.fft.fft(np.eye(N_FFT))
        cutoff = N_FFT // 2 + 1
        basis = np.vstack([np.real(basis[:cutoff]), np.imag(basis[:cutoff])])
        scale = N_FFT / HOP
        window = torch.from_numpy(get_window("hann", N_FFT, fftbins=True))
        self.forward_basis = torch.from_numpy(basis[:, None, :]) * window
        self.inverse_basis = torch.from_numpy(np.linalg.pinv(scale * basis).T[:, None, :]) * window
        self.win_sq = get_window("hann", N_FFT, fftbins=True) ** 2
        self.bias_spec = self.transform(bias_audio)[0][:, :, 0][:, :, None]

    def transform(self, audio: np.ndarray):
        x = torch.from_numpy(np.asarray(audio, np.float64)).reshape(1, 1, 1, -1)
        x = torch.nn.functional.pad(x, (N_FFT // 2, N_FFT // 2, 0, 0), mode="reflect").squeeze(1)
        out = torch.nn.functional.conv1d(x, self.forward_basis, stride=HOP)
        real, imag = out[:, :N_FFT // 2 + 1], out[:, N_FFT // 2 + 1:]
        return torch.sqrt(real ** 2 + imag ** 2), torch.atan2(imag, real)

    def inverse(self, magnitude, phase):
        spec = torch.cat([magnitude * torch.cos(phase), magnitude * torch.sin(phase)], dim=1)
        out = torch.nn.functional.conv_transpose1d(spec, self.inverse_basis, stride=HOP)
        n_frames = magnitude.shape[-1]
        n = N_FFT + HOP * (n_frames - 1)
        envelope = np.zeros(n)
        for i in range(n_frames):
            envelope[i * HOP: min(n, i * HOP + N_FFT)] += self.win_sq[:max(0, min(N_FFT, n - i * HOP))]
        nonzero = torch.from_numpy(np.where(envelope > np.finfo(np.float32).tiny)[0])
        out[:, :, nonzero] /= torch.from_numpy(envelope)[nonzero]
        out *= float(N_FFT) / HOP
        return out[:, :, N_FFT // 2:][:, :, :-(N_FFT // 2)]

    def __call__(self, audio: np.ndarray, strength: float = 0.1) -> np.ndarray:
        magnitude, phase = self.transform(audio)
        cleaned = torch.clamp(magnitude - self.bias_spec * strength, 0.0)
        return self.inverse(cleaned, phase)[0, 0].numpy()


def hum(n: int, phase: float = 0.0, amplitude: float = 0.02) -> np.ndarray:
    """Stationary hum: a 300 Hz tone with overtones, like a vocoder's bias.

    With phase 0 every component is a cosine, so the reflect padding continues it seamlessly and the
    first STFT frame (the one NVIDIA's denoiser keeps) has the steady-state spectrum.
    """
    t = np.arange(n) / SR
    return (amplitude * (np.cos(2 * np.pi * 300 * t + phase) + 0.5 * np.cos(2 * np.pi * 900 * t + 2 * phase)
                         + 0.25 * np.cos(2 * np.pi * 2100 * t + 3 * phase))).astype(np.float32)


def speech(utt: str = "LJ001-0008") -> np.ndarray:
    rate, data = wavfile.read(DEMO_CORPUS_DIR / "wavs" / f"{utt}.wav")
    return (data / 32768.0).astype(np.float32)


class FakeVocoder(torch.nn.Module):
    """Stand-in for waveglow_lib.model.WaveGlow (contract test): exposes `.config.n_mel_channels` and
    `.infer(mel, sigma)` returning [B, T * 256] audio; records what it was called with."""

    class config:  # noqa: N801 - mimics the ModelConfig attribute the denoiser reads
        n_mel_channels = 80

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
        self.calls = []

    def infer(self, mel, sigma=1.0):
        self.calls.append((mel.clone(), sigma))
        return torch.from_numpy(hum(mel.shape[-1] * HOP))[None].to(mel.dtype) + 0.01 * mel.mean()


# ---------------------------------------------------------------------------------------------
def test_matches_nvidia_reference():
    bias = hum(88 * HOP, phase=0.3)
    audio = speech() + hum(len(speech()))
    ours_denoiser, theirs_denoiser = Denoiser(bias), NvidiaDenoiserReference(bias)
    np.testing.assert_allclose(ours_denoiser.bias_spec.numpy(), theirs_denoiser.bias_spec[0, :, 0].numpy(),
                               atol=1e-9)
    for strength in (0.1, 1.0):
        ours = ours_denoiser(audio, strength=strength)
        theirs = theirs_denoiser(audio, strength=strength)
        # NVIDIA returns the first (N // hop) * hop samples; we return all N, agreeing on theirs
        assert len(theirs) == (len(audio) // HOP) * HOP and ours.shape == audio.shape
        err = float(np.abs(ours[:len(theirs)] - theirs).max())
        print(f"strength {strength}: max abs difference to NVIDIA's algorithm {err:.2e}")
        assert err < 1e-6


def test_strength_zero_gives_input_back():
    audio = speech("LJ001-0002")
    out = Denoiser(hum(88 * HOP))(audio, strength=0.0)
    inner = slice(N_FFT, -N_FFT)
    assert snr_db(audio[inner], out[inner]) >= 40
    assert snr_db(audio, out) >= 40  # edges too: reflect padding + the sum-square envelope are exact
    assert snr_db(audio, Denoiser(hum(88 * HOP))(audio, strength=0.5)) < 40  # and strength does act


def test_subtracting_the_bias_removes_a_matching_hum():
    denoiser = Denoiser(hum(88 * HOP))
    pure = hum(2 * SR, phase=1.0)  # the same hum, different start phase and length
    cleaned = denoiser(pure, strength=1.0)
    inner = slice(N_FFT, -N_FFT)
    drop_db = 10 * np.log10(np.sum(pure[inner] ** 2) / np.sum(cleaned[inner] ** 2))
    print(f"pure hum energy drop {drop_db:.1f} dB")
    assert drop_db > 20
    # on speech + hum the output is closer to the clean speech than the input was
    clean = speech()
    noisy = clean + hum(len(clean), phase=2.0)
    before, after = snr_db(clean, noisy), snr_db(clean, denoiser(noisy, strength=1.0))
    print(f"speech + hum: SNR {before:.1f} dB -> {after:.1f} dB")
    assert after > before + 3


def test_types_shapes_and_dtypes():
    denoiser = Denoiser(torch.from_numpy(hum(88 * HOP)))
    a = speech()
    out = denoiser(a)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == a.shape
    out64 = denoiser(a.astype(np.float64))
    assert out64.dtype == np.float64
    np.testing.assert_allclose(out64, out, atol=1e-6)
    batch = torch.from_numpy(np.stack([a, a[::-1].copy()]))
    out_t = denoiser(batch, strength=0.3)
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32 and out_t.shape == batch.shape
    np.testing.assert_allclose(out_t[1].numpy(), denoiser(a[::-1].copy(), strength=0.3), atol=1e-6)
    odd = a[:1000 + 37]  # not a multiple of the hop
    assert denoiser(odd).shape == odd.shape
    assert denoiser.bias_spec.shape == (N_FFT // 2 + 1,)


def test_bad_input():
    denoiser = Denoiser(hum(88 * HOP))
    bad = speech().copy()
    bad[10] = np.nan
    with pytest.raises(AudioError, match="NaN"):
        denoiser(bad)
    with pytest.raises(AudioError, match="too short"):
        denoiser(np.zeros(100, np.float32))
    with pytest.raises(AudioError, match="too short"):
        Denoiser(np.zeros(100, np.float32))


def test_from_model_uses_a_zero_mel_and_sigma_zero():
    model = FakeVocoder()
    denoiser = Denoiser.from_model(model)
    (mel, sigma), = model.calls
    assert sigma == 0.0 and mel.shape == (1, 80, 88) and mel.dtype == torch.float32
    assert torch.count_nonzero(mel) == 0
    np.testing.assert_allclose(denoiser.bias_spec.numpy(), Denoiser(hum(88 * HOP)).bias_spec.numpy(), atol=1e-6)
    # the mel follows the model's parameter dtype (NVIDIA: waveglow.upsample.weight.dtype)
    model64 = FakeVocoder(torch.float64)
    Denoiser.from_model(model64, n_frames=20)
    assert model64.calls[0][0].dtype == torch.float64 and model64.calls[0][0].shape == (1, 80, 20)
    # mode="normal" draws a seeded random mel: reproducible, and different from zeros
    a, b = FakeVocoder(), FakeVocoder()
    Denoiser.from_model(a, mode="normal", seed=3)
    Denoiser.from_model(b, mode="normal", seed=3)
    assert torch.equal(a.calls[0][0], b.calls[0][0]) and a.calls[0][0].abs().sum() > 0
    with pytest.raises(ValueError, match="mode"):
        Denoiser.from_model(model, mode="uniform")


def test_from_real_model(tiny_config):
    model_module = pytest.importorskip("waveglow_lib.model")
    model = model_module.WaveGlow(tiny_config).eval()
    denoiser = Denoiser.from_model(model)
    assert denoiser.bias_spec.shape == (N_FFT // 2 + 1,) and torch.isfinite(denoiser.bias_spec).all()
    audio = speech()
    assert denoiser(audio, strength=0.1).shape == audio.shape
