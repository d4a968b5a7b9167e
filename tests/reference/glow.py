"""Test stand-in for NVIDIA/waveglow `glow.py`: same class names, attributes and parameter layout
(weight-normed convolutions, one `cond_layer` per WN), written independently and straightforwardly so
that pickles made from it have the official checkpoint's structure and its `infer` serves as the
reference the library is compared against. The noise is passed in (NVIDIA draws it on CUDA).
Not part of the library; imported only by tests, then removed from sys.modules before loading.
"""
import torch
from torch import nn
from torch.nn.utils import weight_norm


def gated(x, n):
    return torch.tanh(x[:, :n, :]) * torch.sigmoid(x[:, n:, :])


class Invertible1x1Conv(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv1d(c, c, kernel_size=1, stride=1, padding=0, bias=False)
        q = torch.linalg.qr(torch.randn(c, c))[0]
        if torch.det(q) < 0:
            q[:, 0] = -q[:, 0]
        self.conv.weight.data = q.view(c, c, 1)

    def forward(self, z, reverse=False):
        w = self.conv.weight.squeeze()
        if reverse:
            return nn.functional.conv1d(z, w.float().inverse()[..., None])
        return self.conv(z), z.size(0) * z.size(2) * torch.slogdet(w)[1]


class WN(nn.Module):
    def __init__(self, n_in_channels, n_mel_channels, n_layers, n_channels, kernel_size):
        super().__init__()
        self.n_layers = n_layers
        self.n_channels = n_channels
        self.in_layers = nn.ModuleList()
        self.res_skip_layers = nn.ModuleList()
        self.start = weight_norm(nn.Conv1d(n_in_channels, n_channels, 1), name="weight")
        self.end = nn.Conv1d(n_channels, 2 * n_in_channels, 1)
        self.cond_layer = weight_norm(nn.Conv1d(n_mel_channels, 2 * n_channels * n_layers, 1), name="weight")
        for i in range(n_layers):
            d = 2 ** i
            self.in_layers.append(weight_norm(
                nn.Conv1d(n_channels, 2 * n_channels, kernel_size, dilation=d, padding=(kernel_size * d - d) // 2),
                name="weight"))
            out = 2 * n_channels if i < n_layers - 1 else n_channels
            self.res_skip_layers.append(weight_norm(nn.Conv1d(n_channels, out, 1), name="weight"))

    def forward(self, forward_input):
        audio, spect = forward_input
        audio = self.start(audio)
        output = torch.zeros_like(audio)
        spect = self.cond_layer(spect)
        n = self.n_channels
        for i in range(self.n_layers):
            acts = gated(self.in_layers[i](audio) + spect[:, i * 2 * n:(i + 1) * 2 * n, :], n)
            rs = self.res_skip_layers[i](acts)
            if i < self.n_layers - 1:
                audio = audio + rs[:, :n, :]
                output = output + rs[:, n:, :]
            else:
                output = output + rs
        return self.end(output)


class WaveGlow(nn.Module):
    swap_odd_flows = False
    WN_class = WN

    def __init__(self, n_mel_channels, n_flows, n_group, n_early_every, n_early_size, WN_config):
        super().__init__()
        self.upsample = nn.ConvTranspose1d(n_mel_channels, n_mel_channels, 1024, stride=256)
        self.n_flows = n_flows
        self.n_group = n_group
        self.n_early_every = n_early_every
        self.n_early_size = n_early_size
        self.WN = nn.ModuleList()
        self.convinv = nn.ModuleList()
        n_half = n_group // 2
        n_remaining_channels = n_group
        for k in range(n_flows):
            if k % n_early_every == 0 and k > 0:
                n_half -= n_early_size // 2
                n_remaining_channels -= n_early_size
            self.convinv.append(Invertible1x1Conv(n_remaining_channels))
            self.WN.append(self.WN_class(n_half, n_mel_channels * n_group, **WN_config))
        self.n_remaining_channels = n_remaining_channels

    def _spect(self, spect, length):
        spect = self.upsample(spect)[:, :, :length]
        spect = spect.unfold(2, self.n_group, self.n_group).permute(0, 2, 1, 3)
        return spect.contiguous().view(spect.size(0), spect.size(1), -1).permute(0, 2, 1)

    def _halves(self, audio, k):
        n_half = audio.size(1) // 2
        lower, upper = audio[:, :n_half, :], audio[:, n_half:, :]
        if self.swap_odd_flows and k % 2 == 1:
            return upper, lower  # (audio_0, audio_1)
        return lower, upper

    def _join(self, audio_0, audio_1, k):
        if self.swap_odd_flows and k % 2 == 1:
            return torch.cat([audio_1, audio_0], 1)
        return torch.cat([audio_0, audio_1], 1)

    def forward(self, forward_input):
        """Returns NVIDIA's ordering: early outputs first (flow order), then the last flow's output."""
        spect, audio = forward_input
        spect = self._spect(spect, audio.size(1))
        audio = audio.unfold(1, self.n_group, self.n_group).permute(0, 2, 1)
        outputs = []
        for k in range(self.n_flows):
            if k % self.n_early_every == 0 and k > 0:
                outputs.append(audio[:, :self.n_early_size, :])
                audio = audio[:, self.n_early_size:, :]
            audio, _ = self.convinv[k](audio)
            audio_0, audio_1 = self._halves(audio, k)
            out = self.WN[k]((audio_0, spect))
            n_half = audio_0.size(1)
            audio_1 = torch.exp(out[:, n_half:, :]) * audio_1 + out[:, :n_half, :]
            audio = self._join(audio_0, audio_1, k)
        outputs.append(audio)
        return torch.cat(outputs, 1)

    def infer(self, spect, sigma=1.0, noise=None):
        """`noise`: [B, n_group, L]; rows consumed as: initial block, then each early block in turn."""
        frames = spect.size(2)
        spect = self._spect(spect, frames * 256)
        rows = iter(range(noise.size(1)))
        take = lambda n: noise[:, [next(rows) for _ in range(n)], :]
        audio = sigma * take(self.n_remaining_channels)
        for k in reversed(range(self.n_flows)):
            audio_0, audio_1 = self._halves(audio, k)
            out = self.WN[k]((audio_0, spect))
            n_half = audio_0.size(1)
            audio_1 = (audio_1 - out[:, :n_half, :]) / torch.exp(out[:, n_half:, :])
            audio = self.convinv[k](self._join(audio_0, audio_1, k), reverse=True)
            if k % self.n_early_every == 0 and k > 0:
                audio = torch.cat((sigma * take(self.n_early_size), audio), 1)
        return audio.permute(0, 2, 1).contiguous().view(audio.size(0), -1)
