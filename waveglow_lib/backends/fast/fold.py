"""Folding: rewrite a trained `WaveGlow` into an equivalent network with fewer multiply-adds.

`fold_waveglow(model) -> FastWaveGlow` is exact in real arithmetic (fp32 results agree to rounding):

1. Conditioning at mel-frame rate. NVIDIA's graph upsamples the mel to audio rate
   (ConvTranspose1d 80→80, kernel 1024, stride 256), folds 8 samples into 640 channels, then every flow's
   `cond_layer` (1×1 conv 640 → 2·C·L) runs at step rate. Both maps are linear, so their composition is
   one transposed convolution straight from the mel: kernel 4·32, stride 32 (32 steps per frame), 80 → 2·C
   per WN layer. Each output step then reads 4 frames × 80 bands = 320 inputs instead of 640 folded
   samples, and the audio-rate upsampled mel is never built. The in-layer biases are merged into it. This
   branch does not depend on the audio, so a runtime is free to schedule it ahead of the flows.
2. Skip outputs folded into `end`. Every WN layer's skip half (C → C) is only ever summed and then mapped
   by `end` (C → 2·n_half, i.e. 8 channels or fewer); `end ∘ skip_i` is one C → 8 conv, so the res/skip
   conv of a layer produces C + 8 channels instead of 2·C (the last layer: 8 instead of C).

`FastWaveGlow` is a `WaveGlow` whose coupling networks are these folded ones (the flow code is shared), so
`export.export_onnx` exports it unchanged and every backend can run it.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ModelConfig
from ...model import Invertible1x1Conv, WaveGlow


class FastWN(nn.Module):
    """One coupling network with conditioning from the mel and the skip path folded into `end`."""

    def __init__(self, n_half: int, config: ModelConfig):
        super().__init__()
        c = config
        self.n_layers, self.n_channels, self.n_out = c.n_layers, c.n_channels, 2 * n_half
        steps, taps = c.steps_per_frame, c.upsample_taps
        self.steps, self.taps = steps, taps
        self.start = nn.Conv1d(n_half, c.n_channels, 1)
        self.in_layers = nn.ModuleList()
        self.cond_layers = nn.ModuleList()  # mel → this layer's conditioning, at step rate
        self.res_skip_layers = nn.ModuleList()  # C → C residual + 2·n_half (end ∘ skip); last: 2·n_half
        for i in range(c.n_layers):
            dilation = 2 ** i
            self.in_layers.append(nn.Conv1d(c.n_channels, 2 * c.n_channels, c.kernel_size, dilation=dilation,
                                            padding=(c.kernel_size * dilation - dilation) // 2, bias=False))
            # output channel o·steps + p is channel o at step p of the frame (a depth-to-space below)
            self.cond_layers.append(nn.Conv1d(c.n_mel_channels, 2 * c.n_channels * steps, taps))
            out = c.n_channels + self.n_out if i < c.n_layers - 1 else self.n_out
            self.res_skip_layers.append(nn.Conv1d(c.n_channels, out, 1))

    def conditioning(self, mel_padded: torch.Tensor, i: int) -> torch.Tensor:
        """Layer i's conditioning [B, 2C, frames·steps] from the mel left-padded by taps-1 frames."""
        frame_rate = self.cond_layers[i](mel_padded)  # [B, 2C·steps, frames]
        batch, frames = frame_rate.shape[0], frame_rate.shape[2]
        out = frame_rate.reshape(batch, 2 * self.n_channels, self.steps, frames).transpose(2, 3)
        return out.reshape(batch, 2 * self.n_channels, frames * self.steps)

    def forward(self, audio: torch.Tensor, mel: torch.Tensor) -> torch.Tensor:
        """(b, log s) of the coupling, [B, 2·n_half, steps]: the sum of every layer's folded skip output."""
        n = self.n_channels
        mel_padded = F.pad(mel, (self.taps - 1, 0))
        hidden = self.start(audio)
        total = 0
        for i, (in_layer, res_skip_layer) in enumerate(zip(self.in_layers, self.res_skip_layers)):
            pre = in_layer(hidden) + self.conditioning(mel_padded, i)
            out = res_skip_layer(torch.tanh(pre[:, :n]) * torch.sigmoid(pre[:, n:]))
            total = total + out[:, out.shape[1] - self.n_out:]
            if out.shape[1] > self.n_out:  # all but the last layer update the residual stream
                hidden = hidden + out[:, :n]
        return total


class FastWaveGlow(WaveGlow):
    """The folded network. It reuses WaveGlow's flow code (`forward`, `infer`, `noise_from_audio`): only
    the coupling networks differ, and they take the mel itself, so `condition` is the identity."""

    def __init__(self, config: ModelConfig, wns: list[FastWN] | None = None):
        nn.Module.__init__(self)  # not WaveGlow.__init__: no upsampler, other WN modules
        self.config = config
        channels = config.flow_channels()  # the flow schedule, as WaveGlow builds it
        self.convinv = nn.ModuleList(Invertible1x1Conv(n) for n in channels)
        self.WN = nn.ModuleList(wns if wns is not None else [FastWN(n // 2, config) for n in channels])
        self.n_remaining_channels = channels[-1]
        self.refresh_inverses()

    def condition(self, mel: torch.Tensor) -> torch.Tensor:
        return mel


@torch.no_grad()
def fold_waveglow(model) -> FastWaveGlow:
    """A `FastWaveGlow` computing what `model` (a WaveGlow) computes; the weights are folded in float64."""
    fast = FastWaveGlow(model.config, wns=[fold_wn(model, k) for k in range(model.config.n_flows)])
    for k, conv in enumerate(fast.convinv):
        conv.conv.weight.copy_(model.convinv[k].conv.weight)
    fast.refresh_inverses()
    return fast.to(next(model.parameters()).dtype).eval()


@torch.no_grad()
def conditioning_layers(model, k: int, dtype: torch.dtype = torch.float64, *, gain: torch.Tensor | None = None,
                        gemm: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Flow k's conditioning of `model` (a WaveGlow) composed with the upsampler (point 1 above), one WN
    layer at a time, by one GEMM per layer whose result is already in the layout its user wants:

    - default: (weight [steps, 2C, taps·n_mel] — row (step phase p, channel o), column (tap, mel band) —,
      bias [steps, 2C] float64, the in-layer's bias merged). Phase-major: the int8 engine quantises it as it
      is. Returned as float32 when `dtype` is bfloat16.
    - `gemm`: (weight [taps·n_mel + 1, steps, 2C] in `dtype`, None): the float engines' GEMM form, x @ w
      with the bias as a last row (against a column of ones), written by the composing GEMM itself — no
      transposing copy of the engine's largest array.

    `gain`: a per-channel factor [2C] applied to the layer's outputs (exact when a power of two). `dtype`
    bfloat16: the GEMM's operands and its result in bf16 (fp32 accumulation), 3× faster than float32
    where the CPU multiplies bf16 natively, for the engines that round their weights to bf16 or int8 anyway."""
    c = model.config
    wn = model.WN[k]
    n, n_mel, g = c.n_channels, c.n_mel_channels, c.n_group
    steps, taps = c.steps_per_frame, c.upsample_taps
    # upsampler as a map mel[m, frame f - j] → folded channel (band c·g + sample offset) at step 32f + p:
    # W_up[m, band, 256 j + 8 p + g'] ; reshape its kernel axis as (j, p, g'). Frame f - j meets conv tap
    # taps-1-j of the left-padded mel, hence the flip. Laid out once per flow so that each layer's
    # composition writes its result in the wanted layout
    w_up = model.upsample.weight.to(dtype).reshape(n_mel, n_mel, taps, steps, g).flip(2)  # [m, band, tap, p, g']
    if gemm:  # [(tap, m, p), (band, g')]
        w_up = w_up.permute(2, 0, 3, 1, 4).reshape(taps * n_mel * steps, n_mel * g).contiguous()
    else:  # [p, (band, g'), (tap, m)]
        w_up = w_up.permute(3, 1, 4, 2, 0).reshape(steps, n_mel * g, taps * n_mel).contiguous()
    w_cond = wn.cond_layer.weight.to(dtype)[..., 0]  # [out, (band, g')]
    result = torch.float32 if dtype == torch.bfloat16 else dtype
    bias = wn.cond_layer.bias.double() + torch.einsum("obg,b->o", w_cond.double().reshape(-1, n_mel, g),
                                                      model.upsample.bias.double())
    for i in range(c.n_layers):
        rows = slice(2 * n * i, 2 * n * (i + 1))
        w_layer, b_layer = w_cond[rows], bias[rows] + wn.in_layers[i].bias.double()
        if gain is not None:
            w_layer, b_layer = w_layer * gain.to(dtype)[:, None], b_layer * gain.double()
        if gemm:
            # [(tap, m, p), out] = [(tap, m), (p, out)]: the GEMM writes the engine's weight rows in place
            weight = torch.empty(taps * n_mel + 1, steps, 2 * n, dtype=dtype)
            torch.mm(w_up, w_layer.t(), out=weight[:-1].view(-1, 2 * n))
            weight[-1] = b_layer.to(dtype)
            yield weight, None
        else:  # one GEMM per phase: [p, out, (tap, m)]
            yield torch.matmul(w_layer, w_up).to(result), b_layer.expand(steps, 2 * n)


@torch.no_grad()
def fold_wn(model, k: int, dtype: torch.dtype = torch.float64, conditioning: bool = True) -> FastWN:
    """Flow k's coupling network of `model` (a WaveGlow), folded: float32 weights, the conditioning's
    composition (`conditioning_layers`) computed in `dtype` (float64 by default). Without `conditioning`,
    its `cond_layers` are left out (an empty list) and `dtype` is unused: the engine takes the conditioning
    from `conditioning_layers` in its own layout and precision, without the conv layout in between."""
    c = model.config
    wn = model.WN[k]
    n, layers, n_mel = c.n_channels, c.n_layers, c.n_mel_channels
    with torch.device("meta"):  # every weight is written below: no random initialisation to pay for
        fwn = FastWN(wn.start.weight.shape[1], c)
    if not conditioning:
        fwn.cond_layers = nn.ModuleList()
    fwn = fwn.to_empty(device="cpu")
    steps, taps = fwn.steps, fwn.taps
    conds = conditioning_layers(model, k, dtype) if conditioning else None
    w_end, b_end = wn.end.weight.double()[..., 0], wn.end.bias.double()
    fwn.start.load_state_dict(wn.start.state_dict())
    for i in range(layers):
        fwn.in_layers[i].weight.copy_(wn.in_layers[i].weight)
        if conds is not None:  # conv layout: output channel o·steps + p, kernel [m, tap]
            weight, bias = next(conds)
            fwn.cond_layers[i].weight.view(2 * n, steps, n_mel, taps).copy_(
                weight.view(steps, 2 * n, taps, n_mel).permute(1, 0, 3, 2))
            fwn.cond_layers[i].bias.view(2 * n, steps).copy_(bias.t())
        w_rs = wn.res_skip_layers[i].weight.double()[..., 0]
        b_rs = wn.res_skip_layers[i].bias.double()
        if i < layers - 1:  # rows: residual (C) then end ∘ skip (2·n_half)
            weight = torch.cat([w_rs[:n], w_end @ w_rs[n:]])
            bias_rs = torch.cat([b_rs[:n], w_end @ b_rs[n:]])
        else:  # the last layer carries end's own bias
            weight, bias_rs = w_end @ w_rs, w_end @ b_rs + b_end
        fwn.res_skip_layers[i].weight.copy_(weight[..., None])
        fwn.res_skip_layers[i].bias.copy_(bias_rs)
    return fwn.eval()
