"""The training objective: NVIDIA's flow loss (`FlowLoss`), and optional generation-direction losses
(`GenerationLoss`) on audio the model makes from noise."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..audio import mel_filterbank
from ..config import STFTConfig
from ..model import WaveGlow


class FlowLoss(nn.Module):
    """WaveGlow run audio → noise with gradients; forward returns NVIDIA's loss (a scalar).

    With a `generation` loss, forward adds it (weighted): the model also runs noise → audio with gradients.
    A module (not a function) so that DDP can wrap it: DDP syncs gradients of what its forward ran.
    """

    def __init__(self, glow: WaveGlow, sigma: float = 1.0, generation: "GenerationLoss | None" = None):
        super().__init__()
        self.glow = glow
        self.sigma = sigma
        self.generation = generation
        #: the last call's terms (flow, stft, mel), for the history
        self.terms: dict[str, float] = {}

    def forward(self, mel: torch.Tensor, audio: torch.Tensor,
                autocast_dtype: torch.dtype | None = None, with_generation: bool = False) -> torch.Tensor:
        columns = audio.shape[1] // self.glow.n_group
        with _autocast(audio.device, autocast_dtype):
            spect = condition(self.glow, mel, columns)  # one conditioning for both directions
        z, log_s_total, log_det_w_total = self.flow(mel, audio, autocast_dtype, spect)
        sum_sq = torch.sum(z.float() * z.float())
        loss = (sum_sq / (2 * self.sigma ** 2) - log_s_total - log_det_w_total) / z.numel()
        self.terms = {"flow": float(loss.detach())}
        if with_generation and self.generation is not None:
            with _autocast(audio.device, autocast_dtype):
                noise = torch.randn(audio.shape[0], self.glow.n_group, columns, device=audio.device)
                generated = self.glow.flows_reverse(noise * self.generation.sigma, spect)
            extra, parts = self.generation(generated.float(), audio[:, : generated.shape[1]])
            loss = loss + extra
            self.terms.update(parts)
        return loss

    def flow(self, mel: torch.Tensor, audio: torch.Tensor, autocast_dtype: torch.dtype | None = None,
             spect: torch.Tensor | None = None):
        """(z, sum of log s, sum of log|det W|) for audio [B, N] (N a multiple of n_group, ≤ frames*hop);
        `spect`: the conditioning `condition(glow, mel, N // n_group)` when already computed."""
        glow = self.glow
        batch, n_samples = audio.shape
        columns = n_samples // glow.n_group
        with _autocast(audio.device, autocast_dtype):
            if spect is None:
                spect = condition(glow, mel, columns)
            x = audio.reshape(batch, columns, glow.n_group).transpose(1, 2)
            z, log_s_total, log_det_w = glow.flows_forward(x, spect)
        # NVIDIA's batch * n_of_groups * logdet(W)
        return z, log_s_total, batch * columns * log_det_w


def _autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`'s type; a no-op context for None (fp32)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


class GenerationLoss(nn.Module):
    """Generated audio against the recording, both [B, N]: multi-resolution STFT loss (spectral convergence
    + L1 of log magnitudes, averaged over resolutions, as Parallel WaveGAN's) and L1 of the log-mel
    (the front-end's filterbank on a magnitude STFT). What the flow loss learns last, voicing, is what
    these see first."""

    #: (fft size, hop, window) per resolution
    RESOLUTIONS = ((512, 128, 512), (1024, 256, 1024), (2048, 512, 2048))

    def __init__(self, sigma: float, stft_weight: float, mel_weight: float, stft: STFTConfig = STFTConfig()):
        super().__init__()
        self.sigma, self.stft_weight, self.mel_weight, self.stft = sigma, stft_weight, mel_weight, stft
        basis = mel_filterbank(stft.sampling_rate, stft.filter_length, stft.n_mel_channels, stft.mel_fmin,
                               stft.mel_fmax)
        self.register_buffer("mel_basis", torch.from_numpy(basis).float(), persistent=False)

    @staticmethod
    def magnitude(audio: torch.Tensor, n_fft: int, hop: int, window: int) -> torch.Tensor:
        spec = torch.stft(audio, n_fft, hop, window, torch.hann_window(window, device=audio.device),
                          return_complex=True)
        return torch.sqrt(spec.real ** 2 + spec.imag ** 2 + 1e-9)

    def forward(self, generated: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        total, parts, known = generated.new_zeros(()), {}, {}

        def magnitudes(n_fft: int, hop: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
            # the mel loss's STFT is also one of the resolutions: each is computed once per call
            key = (n_fft, hop, window)
            if key not in known:
                known[key] = (self.magnitude(generated, *key), self.magnitude(target, *key))
            return known[key]

        if self.stft_weight:
            stft_loss = generated.new_zeros(())
            for n_fft, hop, window in self.RESOLUTIONS:
                mag_g, mag_t = magnitudes(n_fft, hop, window)
                convergence = torch.linalg.norm(mag_t - mag_g) / torch.linalg.norm(mag_t).clamp(min=1e-7)
                stft_loss = stft_loss + convergence + F.l1_loss(torch.log(mag_g), torch.log(mag_t))
            stft_loss = stft_loss / len(self.RESOLUTIONS)
            total, parts["stft"] = total + self.stft_weight * stft_loss, float(stft_loss.detach())
        if self.mel_weight:
            c = self.stft
            mels = [torch.log(torch.clamp(self.mel_basis @ magnitude, min=c.clip_val))
                    for magnitude in magnitudes(c.filter_length, c.hop_length, c.win_length)]
            mel_loss = F.l1_loss(*mels)
            total, parts["mel"] = total + self.mel_weight * mel_loss, float(mel_loss.detach())
        return total, parts


def upsample(layer: nn.ConvTranspose1d, mel: torch.Tensor) -> torch.Tensor:
    """`layer(mel)` as one matmul and an overlap-add: the same numbers, and on the CPU many times faster
    than torch's transposed convolution for the few frames of a training segment."""
    weight = layer.weight  # [in, out, kernel]
    channels_in, channels_out, kernel = weight.shape
    stride = layer.stride[0]
    frames = mel.shape[2]
    columns = torch.matmul(weight.reshape(channels_in, -1).t().to(mel.dtype), mel)  # [B, out*kernel, T]
    out = F.fold(columns, output_size=(1, (frames - 1) * stride + kernel), kernel_size=(1, kernel),
                 stride=(1, stride))[:, :, 0]
    return out + layer.bias.to(out.dtype)[None, :, None]


def condition(glow: WaveGlow, mel: torch.Tensor, columns: int) -> torch.Tensor:
    """`glow.condition(mel)` trimmed to `columns` groups of audio (NVIDIA trims the upsampled mel to the
    audio): [B, n_mel * n_group, columns]."""
    g = glow.n_group
    spect = upsample(glow.upsample, mel)[:, :, : columns * g]
    batch, channels, _ = spect.shape
    return spect.reshape(batch, channels, columns, g).transpose(2, 3).reshape(batch, channels * g, columns)
