"""NVIDIA's WaveGlow denoiser: subtract the model's own bias spectrum from its output.

A vocoder fed a silent (all-zero) mel still produces a faint, stationary hiss/hum: its bias. NVIDIA's
`denoiser.Denoiser` takes the STFT magnitude of the first frame of that bias audio and subtracts
`strength` times it from every frame of the audio to clean, keeping the phase, clamping at 0, then
inverts the STFT (tacotron2 `stft.py`, filter 1024, hop 256, window 1024). The same transform is
`waveglow_lib.audio.STFT`, so this works on any backend's output (numpy or torch).

One deliberate difference: NVIDIA's inverse returns the first (N // hop) * hop samples; we return all N
(the first (N // hop) * hop agree with theirs), so the output has the input's length.
"""
from __future__ import annotations

from typing import Any

import torch

from .audio import STFT, AudioError, as_batch, restore
from .config import STFTConfig
from .errors import ConfigError

__all__ = ["Denoiser"]


class Denoiser:
    """`Denoiser(bias_audio)(audio, strength=0.1)`; build it from a model with `Denoiser.from_model`."""

    def __init__(self, bias_audio: Any, stft: STFTConfig = STFTConfig()) -> None:
        self.stft_config = stft
        self.stft = STFT.from_config(stft)
        bias, _ = as_batch(bias_audio)
        if bias.shape[-1] <= self.stft.pad:
            raise AudioError(f"bias audio: {bias.shape[-1]} samples is too short for the STFT (needs more "
                             f"than {self.stft.pad})")
        magnitude = self.stft.magnitude(bias[:1].cpu())
        #: [n_freqs] magnitude of the bias audio's first frame (NVIDIA: bias_spec[:, :, 0])
        self.bias_spec: torch.Tensor = magnitude[0, :, 0].clone()

    @classmethod
    def from_model(cls, model: Any, n_frames: int = 88, mode: str = "zeros", stft: STFTConfig = STFTConfig(),
                   seed: int = 0) -> "Denoiser":
        """Bias from `model.infer(mel, sigma=0.0)` on a [1, n_mel, n_frames] mel of zeros (NVIDIA's
        default) or, with mode="normal", of standard-normal values drawn from `seed`."""
        n_mel = int(model.config.n_mel_channels)
        parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        dtype = parameter.dtype if parameter is not None else torch.float32
        device = parameter.device if parameter is not None else torch.device("cpu")
        if mode == "zeros":
            mel = torch.zeros((1, n_mel, n_frames), dtype=dtype, device=device)
        elif mode == "normal":
            generator = torch.Generator().manual_seed(seed)
            mel = torch.randn((1, n_mel, n_frames), generator=generator).to(device=device, dtype=dtype)
        else:
            raise ConfigError(f"denoiser mode must be 'zeros' or 'normal', got {mode!r}")
        with torch.no_grad():
            bias_audio = model.infer(mel, sigma=0.0)
        return cls(bias_audio.detach().float().cpu(), stft=stft)

    def __call__(self, audio: Any, strength: float = 0.1) -> Any:
        """Denoise [N] or [B, N] audio (numpy or torch); returns the same type, shape and dtype."""
        batch, info = as_batch(audio)
        magnitude, phase = self.stft.transform(batch)
        bias = self.bias_spec.to(device=magnitude.device, dtype=magnitude.dtype)[None, :, None]
        cleaned = torch.clamp(magnitude - float(strength) * bias, min=0.0)
        out = self.stft.inverse(cleaned, phase, length=batch.shape[-1])
        return restore(out, info)

    def __repr__(self) -> str:
        return (f"Denoiser(filter_length={self.stft.filter_length}, hop_length={self.stft.hop_length}, "
                f"bias peak={float(self.bias_spec.max()):.3g})")
