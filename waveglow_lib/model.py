"""WaveGlow (Prenger et al., 2019): a normalising flow from Gaussian noise to audio, conditioned on a mel.

Pure torch, no I/O. Module and parameter names follow NVIDIA's `glow.py`, so state dicts map one to one.
Differences from NVIDIA's code, all numerically neutral in fp32:
- weight norm is folded into plain weights at load time (it only matters for training);
- the inverses of the invertible 1x1 convolutions are computed once, in float64, and kept as buffers;
- the noise is an argument (`z`) or drawn from a seedable `torch.Generator`, on any device, and `sigma`
  scales all of it, the early-output noise included;
- the old layout (`glow_old.py`) is the same network with one flag: its coupling halves swap on odd
  flows. Its per-layer `cond_layers` are concatenated into one `cond_layer` when loading.

Noise layout, used by `infer(z=...)` and returned by `noise_from_audio`: `z` has shape
`[B, n_group, T * hop / n_group]`; its first `n_remaining_channels` rows start the reverse pass and the
following `n_early_size`-row blocks are the early insertions, in the order the reverse pass consumes them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import AudioError, MelError


class Invertible1x1Conv(nn.Module):
    """A learned channel rotation; `W_inverse` is refreshed by `WaveGlow.refresh_inverses()`."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size=1, bias=False)
        with torch.no_grad():  # a random rotation with det +1, as NVIDIA initialises it
            q = torch.linalg.qr(torch.randn(channels, channels))[0]
            if torch.det(q) < 0:
                q[:, 0] = -q[:, 0]
            self.conv.weight.copy_(q[..., None])
        self.register_buffer("W_inverse", torch.eye(channels)[..., None], persistent=False)

    def refresh_inverse(self) -> None:
        weight = self.conv.weight.detach().squeeze(-1)
        inverse = torch.linalg.inv(weight.double()).to(weight.dtype)
        self.W_inverse = inverse[..., None].to(self.W_inverse.device)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.conv1d(z, self.conv.weight.to(z.dtype))

    def reverse(self, z: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.conv.weight.requires_grad and not torch.jit.is_tracing():
            # training through the generation direction: the inverse must carry gradients
            return F.conv1d(z, torch.linalg.inv(self.conv.weight.squeeze(-1).float())[..., None].to(z.dtype))
        return F.conv1d(z, self.W_inverse.to(z.dtype))


class WN(nn.Module):
    """Non-causal WaveNet-like network giving the affine coupling's (b, log s) from half the channels."""

    def __init__(self, n_in_channels: int, n_cond_channels: int, n_layers: int, n_channels: int,
                 kernel_size: int):
        super().__init__()
        self.n_layers = n_layers
        self.n_channels = n_channels
        self.start = nn.Conv1d(n_in_channels, n_channels, 1)
        self.end = nn.Conv1d(n_channels, 2 * n_in_channels, 1)
        self.cond_layer = nn.Conv1d(n_cond_channels, 2 * n_channels * n_layers, 1)
        self.in_layers = nn.ModuleList()
        self.res_skip_layers = nn.ModuleList()
        for i in range(n_layers):
            dilation = 2 ** i
            padding = (kernel_size * dilation - dilation) // 2
            self.in_layers.append(nn.Conv1d(n_channels, 2 * n_channels, kernel_size,
                                            dilation=dilation, padding=padding))
            # the last layer has no residual output, only skip
            res_skip_channels = 2 * n_channels if i < n_layers - 1 else n_channels
            self.res_skip_layers.append(nn.Conv1d(n_channels, res_skip_channels, 1))

    def forward(self, audio: torch.Tensor, spect: torch.Tensor) -> torch.Tensor:
        audio = self.start(audio)
        cond = self.cond_layer(spect)
        n = self.n_channels
        output = None
        for i in range(self.n_layers):
            acts = self.in_layers[i](audio) + cond[:, 2 * n * i: 2 * n * (i + 1)]
            acts = torch.tanh(acts[:, :n]) * torch.sigmoid(acts[:, n:])
            res_skip = self.res_skip_layers[i](acts)
            if i < self.n_layers - 1:
                audio = audio + res_skip[:, :n]
                skip = res_skip[:, n:]
            else:
                skip = res_skip
            output = skip if output is None else output + skip
        return self.end(output)


class WaveGlow(nn.Module):
    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        c = config
        self.upsample = nn.ConvTranspose1d(c.n_mel_channels, c.n_mel_channels, c.upsample_kernel,
                                           stride=c.upsample_stride)
        self.WN = nn.ModuleList()
        self.convinv = nn.ModuleList()
        for n_remaining in c.flow_channels():
            self.convinv.append(Invertible1x1Conv(n_remaining))
            self.WN.append(WN(n_remaining // 2, c.n_mel_channels * c.n_group, c.n_layers, c.n_channels,
                              c.kernel_size))
        self.n_remaining_channels = c.flow_channels()[-1]
        self.refresh_inverses()

    # --- shapes -----------------------------------------------------------------------------
    @property
    def n_group(self) -> int:
        return self.config.n_group

    @property
    def hop_length(self) -> int:
        return self.config.upsample_stride

    def noise_shape(self, batch: int, frames: int) -> tuple[int, int, int]:
        return batch, self.n_group, frames * self.hop_length // self.n_group

    # --- inference --------------------------------------------------------------------------
    @torch.no_grad()
    def refresh_inverses(self) -> None:
        """Recompute every 1x1 inverse in float64 (call after changing the weights)."""
        for conv in self.convinv:
            conv.refresh_inverse()

    def condition(self, mel: torch.Tensor) -> torch.Tensor:
        """Upsample the mel to audio rate and fold `n_group` samples into channels: [B, n_mel*n_group, T*hop/n_group]."""
        spect = self.upsample(mel)
        cutoff = self.config.upsample_kernel - self.config.upsample_stride  # trim the transposed-conv tail
        spect = spect[:, :, : spect.shape[2] - cutoff]
        batch, channels, length = spect.shape
        g = self.n_group
        return spect.reshape(batch, channels, length // g, g).transpose(2, 3).reshape(batch, channels * g, length // g)

    def forward(self, mel: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The reverse pass with complete noise `z` (already scaled by sigma): what ONNX export traces."""
        return self.flows_reverse(z, self.condition(mel))

    def flows_reverse(self, z: torch.Tensor, spect: torch.Tensor) -> torch.Tensor:
        """Every flow in the generation direction: noise z [B, n_group, T'] (scaled, `infer`'s row order) and
        conditioning spect [B, n_mel*n_group, T'] → audio [B, n_group*T']. Inference and the training's
        generation losses (`train.GenerationLoss`) both walk the flows here."""
        c = self.config
        n_rem = self.n_remaining_channels
        audio = z[:, :n_rem]
        next_row = n_rem
        for k in reversed(range(c.n_flows)):
            n_half = audio.shape[1] // 2
            if c.swaps_halves(k):
                audio_1, audio_0 = audio[:, :n_half], audio[:, n_half:]
            else:
                audio_0, audio_1 = audio[:, :n_half], audio[:, n_half:]
            output = self.WN[k](audio_0, spect)
            log_s, b = output[:, n_half:], output[:, :n_half]
            audio_1 = (audio_1 - b) / torch.exp(log_s)
            pair = (audio_1, audio_0) if c.swaps_halves(k) else (audio_0, audio_1)
            audio = self.convinv[k].reverse(torch.cat(pair, 1))
            if c.has_early_output(k):
                audio = torch.cat((z[:, next_row: next_row + c.n_early_size], audio), 1)
                next_row += c.n_early_size
        return audio.transpose(1, 2).reshape(audio.shape[0], -1)

    @torch.no_grad()
    def infer(self, mel: torch.Tensor, sigma: float = 1.0, z: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """mel [B, n_mel, T] → audio [B, T*hop] (about [-1, 1]).

        `z`: the complete noise (see module docstring), or None to draw it from `generator`.
        `sigma` scales all of the noise, early insertions included.
        """
        self._check_mel(mel)
        shape = self.noise_shape(mel.shape[0], mel.shape[2])
        if z is None:
            z = torch.randn(shape, generator=generator, dtype=torch.float32,
                            device=generator.device if generator is not None else "cpu")
        elif tuple(z.shape) != shape:
            raise MelError(f"z has shape {tuple(z.shape)}, expected {shape} for a mel of shape {tuple(mel.shape)}")
        z = (z.to(device=mel.device, dtype=torch.float32) * sigma).to(mel.dtype)
        return self.forward(mel, z)

    @torch.no_grad()
    def noise_from_audio(self, mel: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """The forward (training-direction) pass: audio [B, N] with N ≤ T*hop → z in `infer`'s row order.

        Shorter audio is zero-padded to T*hop, so `infer(mel, 1.0, z)` returns the padded audio.
        """
        self._check_mel(mel)
        if audio.dim() == 1:
            audio = audio[None]
        length = mel.shape[2] * self.hop_length
        if audio.shape[0] != mel.shape[0] or audio.shape[1] > length:
            raise AudioError(f"audio of shape {tuple(audio.shape)} does not fit mel of shape {tuple(mel.shape)} "
                             f"(need batch {mel.shape[0]} and at most {length} samples)")
        audio = F.pad(audio.to(mel.dtype), (0, length - audio.shape[1]))
        grouped = audio.reshape(audio.shape[0], -1, self.n_group).transpose(1, 2)
        return self.flows_forward(grouped, self.condition(mel))[0]

    def flows_forward(self, x: torch.Tensor, spect: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every flow in the training direction: grouped audio x [B, n_group, T'] and conditioning spect
        [B, n_mel*n_group, T'] → (z in `infer`'s row order, the sum of all log s, the sum over flows of
        log|det W| — per column: NVIDIA's loss multiplies it by B·T'). Training (`train.FlowLoss`) and
        `noise_from_audio` both walk the flows here."""
        c = self.config
        early, log_s_total, log_det_w = [], x.new_zeros((), dtype=torch.float32), x.new_zeros((), dtype=torch.float32)
        for k in range(c.n_flows):
            if c.has_early_output(k):
                early.append(x[:, : c.n_early_size])
                x = x[:, c.n_early_size:]
            x = self.convinv[k](x)
            # in fp32 whatever an autocast region around this call says
            log_det_w = log_det_w + torch.linalg.slogdet(self.convinv[k].conv.weight.squeeze(-1).float())[1]
            n_half = x.shape[1] // 2
            if c.swaps_halves(k):
                audio_1, audio_0 = x[:, :n_half], x[:, n_half:]
            else:
                audio_0, audio_1 = x[:, :n_half], x[:, n_half:]
            output = self.WN[k](audio_0, spect)
            log_s, b = output[:, n_half:], output[:, :n_half]
            audio_1 = torch.exp(log_s) * audio_1 + b
            log_s_total = log_s_total + torch.sum(log_s.float())
            pair = (audio_1, audio_0) if c.swaps_halves(k) else (audio_0, audio_1)
            x = torch.cat(pair, 1)
        # the reverse pass starts from the last flow's output and re-inserts the early outputs last-first
        return torch.cat([x] + early[::-1], 1), log_s_total, log_det_w

    def _check_mel(self, mel: torch.Tensor) -> None:
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return
        n_mel = self.config.n_mel_channels
        if mel.dim() != 3 or mel.shape[1] != n_mel:
            raise MelError(f"mel must have shape [batch, {n_mel}, frames], got {tuple(mel.shape)}")
        if mel.shape[2] < 1:
            raise MelError("mel has no frames")
        if not torch.isfinite(mel).all():
            raise MelError("mel contains NaN or Inf values")
