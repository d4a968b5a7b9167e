"""Test stand-in for NVIDIA/waveglow `glow_old.py`: per-layer `cond_layers`, split `res_layers` /
`skip_layers` (as the oldest pickles have them), and coupling halves that swap on odd flows. It imports
`Invertible1x1Conv` from `glow`, so its pickles reference both modules, like the real ones.
"""
import torch
from torch import nn
from torch.nn.utils import weight_norm

import glow
from glow import Invertible1x1Conv  # noqa: F401  (pickles reference glow.Invertible1x1Conv)


class WN(nn.Module):
    def __init__(self, n_in_channels, n_mel_channels, n_layers, n_channels, kernel_size):
        super().__init__()
        self.n_layers = n_layers
        self.n_channels = n_channels
        self.in_layers = nn.ModuleList()
        self.res_layers = nn.ModuleList()
        self.skip_layers = nn.ModuleList()
        self.cond_layers = nn.ModuleList()
        self.start = weight_norm(nn.Conv1d(n_in_channels, n_channels, 1), name="weight")
        self.end = nn.Conv1d(n_channels, 2 * n_in_channels, 1)
        for i in range(n_layers):
            d = 2 ** i
            self.in_layers.append(weight_norm(
                nn.Conv1d(n_channels, 2 * n_channels, kernel_size, dilation=d, padding=(kernel_size * d - d) // 2),
                name="weight"))
            self.cond_layers.append(weight_norm(nn.Conv1d(n_mel_channels, 2 * n_channels, 1), name="weight"))
            if i < n_layers - 1:
                self.res_layers.append(weight_norm(nn.Conv1d(n_channels, n_channels, 1), name="weight"))
            self.skip_layers.append(weight_norm(nn.Conv1d(n_channels, n_channels, 1), name="weight"))

    def forward(self, forward_input):
        audio, spect = forward_input
        audio = self.start(audio)
        output = None
        for i in range(self.n_layers):
            acts = glow.gated(self.in_layers[i](audio) + self.cond_layers[i](spect), self.n_channels)
            if i < self.n_layers - 1:
                audio = self.res_layers[i](acts) + audio
            skip = self.skip_layers[i](acts)
            output = skip if output is None else skip + output
        return self.end(output)


class WaveGlow(glow.WaveGlow):
    swap_odd_flows = True
    WN_class = WN
