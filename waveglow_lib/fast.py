"""The fast CPU path: the same WaveGlow reverse pass with less arithmetic per sample.

`fold_waveglow(model) -> FastWaveGlow` rewrites a trained `WaveGlow` into an equivalent network
(exact in real arithmetic; fp32 results agree to rounding) that needs about 27 % fewer multiply-adds:

1. Conditioning at mel-frame rate. NVIDIA's graph upsamples the mel to audio rate
   (ConvTranspose1d 80→80, kernel 1024, stride 256), folds 8 samples into 640 channels, then every flow's
   `cond_layer` (1×1 conv 640 → 2·C·L) runs at step rate. Both maps are linear, so their composition is
   one transposed convolution straight from the mel: kernel 4·32, stride 32 (32 steps per frame), 80 → 2·C
   per WN layer. Each output step then reads 4 frames × 80 bands = 320 inputs instead of 640 folded
   samples: half the work of the conditioning branch (which was 39 % of the model), and the audio-rate
   upsampled mel is never built. The in-layer biases are merged into it. This branch does not depend on the
   audio, so a runtime is free to schedule it ahead of the flows.
2. Skip outputs folded into `end`. Every WN layer's skip half (C → C) is only ever summed and then mapped
   by `end` (C → 2·n_half, i.e. 8 channels or fewer); `end ∘ skip_i` is one C → 8 conv, so the res/skip
   conv of a layer produces C + 8 channels instead of 2·C (the last layer: 8 instead of C).

`FastWaveGlow` is a `WaveGlow` whose coupling networks are these folded ones (the flow code is shared),
so `stages.export.export_onnx` exports it unchanged and every
backend (torch, ONNX Runtime, OpenVINO bf16) can run it.

`FastEngine` runs the folded network on the CPU the way the profiler says the time should be spent: all
the arithmetic as large GEMMs (oneDNN through `torch.matmul`, bf16 with fp32 accumulation where the CPU has
native bf16, AVX512-BF16 or AMX) in a channels-last layout, where a dilated tap is a row offset and the
frame-rate conditioning GEMM `[frames, 4·80] @ [4·80, 32·2C]` lands directly as `[steps, 2C]` rows; each
WN layer is processed in blocks of `block_frames` mel frames so that the gate, residual and skip updates
stay in cache instead of streaming full-length tensors through memory (what an op-by-op graph runtime
does). Utterances of a batch run on separate threads when there are spare cores.

Precisions: fp32; bf16 (GEMM operands and the WN state in bf16, fp32 accumulation); int8 (every WN GEMM —
conditioning, dilated taps, res/skip — through oneDNN's `quantized.linear_dynamic`: weights int8 with one
scale per output channel, packed at load; activations quantized per call with a per-tensor scale and zero
point, fp32 in and out, so the state and the gate stay fp32). On 2 EPYC cores (AVX512-VNNI, official
architecture, batch 1) int8 runs 1.36× real time at 172 frames vs bf16 0.97×, 0.94× vs 0.56× at 10
frames (half the folded weight traffic), at ~40 dB SNR against fp32 (bf16: ~47 dB).

What the profiler showed (torch.profiler, official architecture, 172 frames, batch 1, 2 EPYC cores): in
bf16 the GEMMs are 88 % of the time (dilated taps 51 %, conditioning + res/skip 37 %) at 79-94 % of the
measured bf16 matmul peak, so only cheaper arithmetic could buy more: int8. With the conditioning GEMM
left in bf16 it still took a third of the time (int8 gained only 1.15x), hence int8 there too. Now the int8
GEMMs are 75 %; the rest is eager element-wise work (concatenating taps 7 %, sigmoid 5 %, adds 9 %).

`precision: auto` (`auto_engine`): the fastest precision that the CPU runs natively (int8: VNNI or AMX-INT8,
for WN layers of ≥ 128 channels such as the official 256; bf16: AVX512-BF16 or AMX) *and* that passes the
quality gate (`evaluate.quality_ok`: log-mel distance ≤ 0.05, SNR ≥ 20 dB against the fp32 model, same
noise) on a probe of real speech — 48 frames of the bundled demo corpus's first wav, about 0.6 s of audio,
checked for the model actually loaded; else fp32. The probe's numbers are kept with the engine.

Costs: the folded conditioning weights are 32 phases × (4·80 → 2C) per layer, 16× the original
cond_layer (503 M values for the official model: 0.5 GB in int8, 1 GB in bf16, 2 GB in fp32), read once
per block; for very short utterances (≲ 20 frames) that traffic, not arithmetic, bounds the conditioning
GEMM.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .model import Invertible1x1Conv, WaveGlow


class FastWN(nn.Module):
    """One coupling network with conditioning from the mel and the skip path folded into `end`."""

    def __init__(self, n_half: int, config: ModelConfig):
        super().__init__()
        c = config
        self.n_layers, self.n_channels, self.n_out = c.n_layers, c.n_channels, 2 * n_half
        steps = c.upsample_stride // c.n_group  # steps of the folded time axis per mel frame
        taps = c.upsample_kernel // c.upsample_stride  # mel frames that reach one audio sample
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
        self.config = c = config
        self.WN = nn.ModuleList()
        self.convinv = nn.ModuleList()
        n_remaining = c.n_group
        for k in range(c.n_flows):
            if self._has_early_output(k):
                n_remaining -= c.n_early_size
            self.convinv.append(Invertible1x1Conv(n_remaining))
            self.WN.append(wns[k] if wns is not None else FastWN(n_remaining // 2, c))
        self.n_remaining_channels = n_remaining
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
def fold_wn(model, k: int) -> FastWN:
    """Flow k's coupling network of `model` (a WaveGlow), folded (float32; computed in float64)."""
    c = model.config
    wn = model.WN[k]
    n, layers, n_mel, g = c.n_channels, c.n_layers, c.n_mel_channels, c.n_group
    fwn = FastWN(wn.start.weight.shape[1], c)
    steps, taps = fwn.steps, fwn.taps
    # upsampler as a map mel[m, frame f - j] → folded channel (band c·g + sample offset) at step 32f + p:
    # W_up[m, band, 256 j + 8 p + g'] ; reshape its kernel axis as (j, p, g')
    w_up = model.upsample.weight.double().reshape(n_mel, n_mel, taps, steps, g)
    w_cond = wn.cond_layer.weight.double()[..., 0].reshape(2 * n * layers, n_mel, g)  # [out, band, g']
    bias = wn.cond_layer.bias.double() + torch.einsum("obg,b->o", w_cond, model.upsample.bias.double())
    w_end, b_end = wn.end.weight.double()[..., 0], wn.end.bias.double()
    fwn.start.load_state_dict(wn.start.state_dict())
    for i in range(layers):
        rows = slice(2 * n * i, 2 * n * (i + 1))
        # composed kernel [out, p, m, j] = Σ_band,g' w_cond[out, band, g'] · w_up[m, band, j, p, g'];
        # frame f - j meets conv tap taps-1-j of the left-padded mel, hence the flip
        kernel = torch.einsum("obg,mbjpg->opmj", w_cond[rows], w_up).flip(-1)
        fwn.in_layers[i].weight.copy_(wn.in_layers[i].weight)
        fwn.cond_layers[i].weight.copy_(kernel.reshape(-1, n_mel, taps))
        fwn.cond_layers[i].bias.copy_((bias[rows] + wn.in_layers[i].bias.double()).repeat_interleave(steps))
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


# --- the engine --------------------------------------------------------------------------------------
def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX): else bf16 only costs conversions."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def native_int8() -> bool:
    """True when this CPU has int8 dot products (AVX512-VNNI, AVX-VNNI or AMX-INT8) and PyTorch has the
    oneDNN quantized engine and API (deprecated in torch 2.x): else int8 is not offered (falls back to bf16)."""
    engines = torch.backends.quantized.supported_engines
    api = hasattr(torch, "quantize_per_channel") and hasattr(torch.ops.quantized, "linear_dynamic")  # deprecated
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags()) and "onednn" in engines and api


def _pack_int8(weight: torch.Tensor, bias: torch.Tensor | None):
    """`weight` [in, out] (x @ weight) → oneDNN's packed int8 weight, one scale per output channel, for
    `quantized.linear_dynamic` (activations quantized per call, per tensor, fp32 in and out)."""
    import warnings

    w = weight.t().float().contiguous()  # [out, in]
    scales = (w.abs().amax(1) / 127.0).clamp_min(1e-12).double()
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "onednn"  # the packing decides the kernels, not the global setting
    try:
        with warnings.catch_warnings():  # quantized tensors are deprecated in torch, still the int8 GEMM API
            warnings.simplefilter("ignore", UserWarning)
            qw = torch.quantize_per_channel(w, scales, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
            return torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.float())
    finally:
        torch.backends.quantized.engine = previous


class _Layer:
    """One WN layer's weights in GEMM form (x @ w, channels-last). The tanh half of the gate's input is
    scaled by 2 (exact in binary), so the gate is one sigmoid over all 2C channels:
    tanh(a)·σ(b) = (2σ(2a) − 1)·σ(b) — bf16 tanh is about twice the cost of sigmoid in PyTorch."""

    __slots__ = ("w_in", "w_cond", "b_cond", "w_rs", "b_rs", "dilation", "taps", "int8", "rs_out")

    def __init__(self, fwn: FastWN, i: int, dtype: torch.dtype, int8: bool = False):
        n, steps, taps = fwn.n_channels, fwn.steps, fwn.taps
        gain = torch.ones(2 * n)  # ×2 is exact in any binary format
        gain[:n] = 2.0
        w_in = fwn.in_layers[i].weight.detach().float() * gain[:, None, None]  # [2n, n, kernel]
        self.taps = w_in.shape[2]
        self.w_in = w_in.permute(2, 1, 0).reshape(-1, 2 * n).contiguous().to(dtype)  # rows (tap, channel)
        self.dilation = fwn.in_layers[i].dilation[0]
        conv = fwn.cond_layers[i]  # [2n·steps (o, p), n_mel, taps] → [(tap, mel), (p, o)]
        w_cond = conv.weight.detach().float().reshape(2 * n, steps, -1, taps) * gain[:, None, None, None]
        w_cond = w_cond.permute(3, 2, 1, 0)
        self.w_cond = w_cond.reshape(taps * w_cond.shape[1], steps * 2 * n).contiguous().to(dtype)
        b_cond = conv.bias.detach().float().reshape(2 * n, steps) * gain[:, None]
        self.b_cond = b_cond.t().reshape(-1).contiguous().to(dtype)
        rs = fwn.res_skip_layers[i]
        self.w_rs = rs.weight.detach()[..., 0].t().contiguous().to(dtype)
        self.b_rs = rs.bias.detach().to(dtype)
        self.rs_out = self.w_rs.shape[1]  # C + skip channels; the last layer: skip channels only
        self.int8 = int8
        if int8:  # all three GEMMs in int8 (`dtype` is fp32 then: the packing takes fp32 weights)
            self.w_in = _pack_int8(self.w_in, None)
            self.w_cond = _pack_int8(self.w_cond, self.b_cond)
            self.w_rs = _pack_int8(self.w_rs, self.b_rs)

    def linear(self, x: torch.Tensor, weight, bias: torch.Tensor) -> torch.Tensor:
        """x @ weight + bias; for int8 the bias is packed with the weight."""
        if self.int8:
            return torch.ops.quantized.linear_dynamic(x, weight, False)
        return torch.addmm(bias, x, weight)


#: FastEngine precisions, fastest first
PRECISIONS = ("int8", "bf16", "fp32")


class FastEngine:
    """The folded WaveGlow reverse pass as blocked GEMMs: `run(mel, z) -> audio` like a Backend.

    - `model`: a `WaveGlow` (folded here) or a `FastWaveGlow`.
    - `precision`: "bf16" (GEMM operands in bf16, fp32 accumulation; the flows' affine/1×1 parts stay fp32)
      or "fp32". bf16 on a CPU without native bf16 falls back to fp32 (see `self.precision`).
    - `block_frames`: mel frames per block (× 32 steps). On 2 EPYC cores, 172-frame mels: 64–256 within
      the noise of each other, 32 about 10 % slower (per-op overhead dominates small blocks).
    - `threads`: cores to use (default: torch's setting); with a batch, utterances run in parallel, one
      core each, since one core per GEMM is more efficient than two on small blocks.
    """

    def __init__(self, model, precision: str = "bf16", block_frames: int = 128, threads: int | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"FastEngine: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if block_frames < 1:
            raise ValueError(f"FastEngine: block_frames must be >= 1, got {block_frames}")
        if precision == "int8" and not native_int8():
            precision = "bf16"
        if precision == "bf16" and not native_bf16():
            precision = "fp32"
        self.precision = precision
        # the GEMM operands and the WN state; int8 GEMMs take fp32 in and give fp32 out (quantized per call)
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.config = c = model.config
        self.block_frames = block_frames
        self.threads = threads or torch.get_num_threads()
        self.steps, self.taps = c.upsample_stride // c.n_group, c.upsample_kernel // c.upsample_stride
        self.pad = (c.kernel_size - 1) // 2 * 2 ** (c.n_layers - 1)  # rows of zeros around each utterance
        self.flows = []
        for k in range(c.n_flows):  # one flow folded at a time: the fp32 folded weights never all exist
            fwn = model.WN[k] if isinstance(model, FastWaveGlow) else fold_wn(model, k)
            layers = [_Layer(fwn, i, self.dtype, int8=precision == "int8") for i in range(c.n_layers)]
            start_w = fwn.start.weight.detach()[..., 0].t().float().contiguous()
            w_inv = model.convinv[k].W_inverse.detach()[..., 0].t().float().contiguous()
            self.flows.append((layers, start_w, fwn.start.bias.detach().float().clone(), w_inv))
            del fwn
        self.n_remaining_channels = model.n_remaining_channels

    def noise_shape(self, batch: int, frames: int) -> tuple[int, int, int]:
        return batch, self.config.n_group, frames * self.config.hop_length // self.config.n_group

    @torch.inference_mode()
    def run(self, mel, z) -> np.ndarray:
        """mel [B, n_mel, T], z [B, n_group, T·hop/n_group] (complete, sigma-scaled) → audio [B, T·hop] float32."""
        mel = torch.as_tensor(mel).float()
        z = torch.as_tensor(z).float()
        if mel.dim() != 3 or tuple(z.shape) != self.noise_shape(mel.shape[0], mel.shape[2]):
            raise ValueError(f"FastEngine: mel {tuple(mel.shape)} and z {tuple(z.shape)} do not fit "
                             f"(z must be [B, {self.config.n_group}, T*{self.steps}] for mel [B, n_mel, T])")
        # conditioning input at frame rate: row f holds mel frames f-3 .. f (zeros before the start)
        batch, frames = mel.shape[0], mel.shape[2]
        mel_rows = F.pad(mel.transpose(1, 2), (0, 0, self.taps - 1, 0))
        unfolded = mel_rows.unfold(1, self.taps, 1).transpose(2, 3).reshape(batch, frames, -1)
        unfolded = unfolded.to(self.dtype).contiguous()
        noise = z.transpose(1, 2).contiguous()  # [B, steps, n_group]
        # Whole utterances on our own threads, one core each, rather than OpenMP inside every op: no
        # barrier per GEMM, and one-core GEMMs waste less. Left-over utterances (and batch 1) use OpenMP.
        parallel = batch - batch % self.threads if self.threads > 1 else 0
        audio = []
        if parallel:
            previous = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(self.threads) as pool:
                    audio = list(pool.map(lambda b: self._reverse(unfolded[b], noise[b]), range(parallel)))
            finally:
                torch.set_num_threads(previous)
        audio += [self._reverse(unfolded[b], noise[b]) for b in range(parallel, batch)]
        return torch.stack(audio).numpy()

    @torch.inference_mode()  # per call: worker threads do not inherit the caller's mode
    def _reverse(self, unfolded: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        c, pad, steps = self.config, self.pad, self.steps
        n, total = c.n_channels, unfolded.shape[0] * steps
        frames = unfolded.shape[0]
        blocks = [(f0, min(frames, f0 + self.block_frames)) for f0 in range(0, frames, self.block_frames)]
        x = torch.zeros(total + 2 * pad, n, dtype=self.dtype)
        x_next = torch.zeros_like(x)
        audio = noise[:, : self.n_remaining_channels]
        next_row = self.n_remaining_channels
        for k in reversed(range(c.n_flows)):
            layers, start_w, start_b, w_inv = self.flows[k]
            n_half = audio.shape[1] // 2
            swap = c.layout == "glow_old" and k % 2 == 1
            audio_0, audio_1 = (audio[:, n_half:], audio[:, :n_half]) if swap else (audio[:, :n_half], audio[:, n_half:])
            x[pad: pad + total] = torch.addmm(start_b, audio_0, start_w)
            skip = torch.zeros(total, 2 * n_half)
            for layer in layers:
                for f0, f1 in blocks:
                    self._layer_block(layer, unfolded, x, x_next, skip, f0, f1)
                if layer.rs_out > skip.shape[1]:  # the residual stream moved to x_next
                    x, x_next = x_next, x
            log_s, b = skip[:, n_half:], skip[:, :n_half]
            audio_1 = (audio_1 - b) * torch.exp(-log_s)
            audio = torch.cat((audio_1, audio_0) if swap else (audio_0, audio_1), 1) @ w_inv
            if k > 0 and k % c.n_early_every == 0:
                audio = torch.cat((noise[:, next_row: next_row + c.n_early_size], audio), 1)
                next_row += c.n_early_size
        return audio.reshape(-1)

    def _layer_block(self, layer: _Layer, unfolded, x, x_next, skip, f0: int, f1: int) -> None:
        """One WN layer on frames [f0, f1): conditioning GEMM, dilated taps, gate, residual and skip."""
        n, pad, steps = self.config.n_channels, self.pad, self.steps
        t0, t1 = pad + f0 * steps, pad + f1 * steps
        acts = layer.linear(unfolded[f0:f1], layer.w_cond, layer.b_cond).view(t1 - t0, 2 * n)
        centre, d = (layer.taps - 1) // 2, layer.dilation  # the dilated taps side by side: one GEMM, K = 3C
        taps = torch.cat([x[t0 + (j - centre) * d: t1 + (j - centre) * d] for j in range(layer.taps)], 1)
        if layer.int8:  # int8 GEMMs cannot accumulate into `acts`: add after
            sig = torch.sigmoid(torch.ops.quantized.linear_dynamic(taps, layer.w_in, False).add_(acts))
        else:
            sig = torch.sigmoid(acts.addmm_(taps, layer.w_in))
        gated = torch.addcmul(sig[:, n:].neg(), sig[:, :n], sig[:, n:], value=2.0)
        res_skip = layer.linear(gated, layer.w_rs, layer.b_rs)
        n_skip = skip.shape[1]
        skip[t0 - pad: t1 - pad] += res_skip[:, res_skip.shape[1] - n_skip:]
        if res_skip.shape[1] > n_skip:
            torch.add(x[t0:t1], res_skip[:, :n], out=x_next[t0:t1])


# --- precision: auto -----------------------------------------------------------------------------------
#: frames of real speech a reduced-precision engine is checked on before `precision: auto` trusts it
PROBE_FRAMES = 48
PROBE_SIGMA = 0.6
#: `auto` tries int8 only for WN layers this wide: measured on 2 EPYC cores (batch 1, 10 and 52 frames),
#: int8 vs bf16 1.4-1.6x at 128 and 256 channels, 0.8-1.3x at 24-64 (per-call quantisation overhead)
INT8_MIN_CHANNELS = 128


def probe_mel(n_mel: int, frames: int = PROBE_FRAMES) -> torch.Tensor:
    """[1, n_mel, frames]: the log-mel of the bundled demo corpus's first utterance (speech, not noise)."""
    from .audio import load_wav, mel_spectrogram
    from .config import DEMO_CORPUS_DIR, STFTConfig

    audio, _ = load_wav(sorted((DEMO_CORPUS_DIR / "wavs").glob("*.wav"))[0])
    mel = mel_spectrogram(audio, STFTConfig(n_mel_channels=n_mel))[:, :frames]
    return torch.from_numpy(np.ascontiguousarray(mel))[None]


@torch.inference_mode()
def probe_reference(model, frames: int = PROBE_FRAMES) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(mel, noise, audio): the probe mel, its noise, and the fp32 model's audio for them (`model.forward`,
    NVIDIA's algorithm): computed once, then every engine tried is compared with it (`probe_quality`)."""
    mel = probe_mel(model.config.n_mel_channels, frames)
    generator = torch.Generator().manual_seed(0)
    z = PROBE_SIGMA * torch.randn(model.noise_shape(1, mel.shape[2]), generator=generator)
    dtype = next(model.parameters()).dtype
    return mel, z, model.forward(mel.to(dtype), z.to(dtype)).float().reshape(-1).numpy()


def probe_quality(engine: "FastEngine", probe: tuple[torch.Tensor, torch.Tensor, np.ndarray]) -> dict:
    """`engine` against the fp32 audio of `probe_reference`, same mel and noise: `evaluate.quality_check`'s
    SNR / log-mel distance / finite."""
    from .evaluate import quality_check

    mel, z, reference = probe
    return quality_check([reference], [engine.run(mel, z).reshape(-1)])


def auto_engine(model, **options) -> tuple["FastEngine", dict]:
    """`precision: auto`: the fastest of int8 (for models of ≥ INT8_MIN_CHANNELS WN channels), bf16 that
    this CPU runs natively and that passes the quality gate on the probe, else fp32. Returns (engine,
    record): the precision chosen, why, and the probe numbers of every precision tried (`tried`).
    `options`: FastEngine's block_frames / threads."""
    from .evaluate import quality_ok

    tried, skipped, probe = {}, [], None
    for precision, native, hardware in (("int8", native_int8, "int8 dot products (VNNI / AMX-INT8)"),
                                        ("bf16", native_bf16, "native bf16 (AVX512-BF16 / AMX)")):
        if not native():
            skipped.append(f"no {hardware} on this CPU")
            continue
        if precision == "int8" and model.config.n_channels < INT8_MIN_CHANNELS:
            skipped.append(f"int8 not faster for {model.config.n_channels} WN channels (< {INT8_MIN_CHANNELS})")
            continue
        engine = FastEngine(model, precision, **options)
        probe = probe or probe_reference(model)
        tried[precision] = quality = probe_quality(engine, probe)
        if quality_ok(quality):
            return engine, {"precision": precision, "reason": "; ".join(
                skipped + [f"{p} failed the quality gate" for p in tried if p != precision]
                + [f"{precision}: native, quality gate passed on the probe"]), **quality, "tried": tried}
        del engine  # its packed weights go before the next ones are built
    reasons = skipped + [f"{p} failed the quality gate on the probe" for p in tried]
    return FastEngine(model, "fp32", **options), {"precision": "fp32", "reason": "; ".join(reasons), "tried": tried}
