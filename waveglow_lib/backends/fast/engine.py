"""`FastEngine`: the folded WaveGlow reverse pass on the CPU as large GEMMs.

All the arithmetic runs as GEMMs (oneDNN through `torch.matmul`; bf16 with fp32 accumulation where the CPU
has native bf16, AVX512-BF16 or AMX) in a channels-last layout, where a dilated tap is a row offset and the
frame-rate conditioning GEMM `[frames, 4·80] @ [4·80, 32·2C]` lands directly as `[steps, 2C]` rows. Each
WN layer runs in blocks of `block_frames` mel frames, by default (fp32, bf16) whole utterances of up to
~24 s: on the CPU measured, large GEMMs win over cache-sized blocks (and the conditioning's weights are
read once per block). The utterances of a batch run end to end as one sequence (zero frames between them,
as wide as the WN's reach), so that short utterances make large GEMMs too. Memory per call: the WN state
(C + skip columns per step, twice) and one block's conditioning.

Precisions: fp32; bf16 (GEMM operands and the WN state in bf16, fp32 accumulation); int8 (every WN GEMM —
conditioning, dilated taps, res/skip — through oneDNN's u8·s8 GEMM, `onednn.qlinear_pointwise`: weights
int8 with one scale per output channel, packed at load; each activation quantized once where it is made,
not per GEMM call — the mel once per sequence, the residual stream once per layer for its three taps,
−gate — with scales fixed per engine (calibrated on the probe, `FastEngine.calibrate`; −gate's is 1/127 as
it lies in (−1, 1)), so that chunked, streamed and batched synthesis equal one-shot synthesis exactly;
every GEMM adds onto its fp32 output inside the kernel; the residual stream and the skip sum stay fp32). Where the time goes, and why int8 covers the
conditioning GEMM too, is recorded by `python -m waveglow_lib bench --profile`.

Cost: the folded conditioning weights are `steps` phases × (4·80 → 2C) per layer, 16× the original
cond_layer (503 M values for the official model), read once per layer and block; for very short
utterances that traffic, not arithmetic, bounds the conditioning GEMM.
"""
from __future__ import annotations

import contextlib
import math
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import ConfigError, MelError
from ...hardware import CpuMeter, choose_threads, native_bf16, native_int8, usable_cpus
from .fold import FastWaveGlow, FastWN, conditioning_layers, fold_wn
from .probe import PROBE_SIGMA, probe_mel

# the quantized-tensor API is deprecated in torch 2.x but is what hands oneDNN's int8 GEMM its uint8 input
# in one vectorised pass; the day it goes, `hardware.native_int8` is False and int8 falls back to bf16
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
                        category=UserWarning)

#: FastEngine precisions, fastest first
PRECISIONS = ("int8", "bf16", "fp32")
#: the GEMM operands and the WN state per precision; int8 GEMMs take fp32 in and give fp32 out
DTYPES = {"int8": torch.float32, "bf16": torch.bfloat16, "fp32": torch.float32}

class LoadTimes(dict):
    """Seconds per phase of making an engine, summed over its flows: fingerprint, fold, arrays (GEMM form,
    int8 quantisation), pack (the engine's GEMMs; int8: oneDNN's packing), store (serialise, hash, write);
    on a cache hit read (the safetensors library's load) and verify (sha256); `precision: auto` adds
    probe_reference and probe_run. Phases run on several threads (a hit's read and verify) are summed over
    them. The bench reports them (where a first load's time goes)."""

    _lock = threading.Lock()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self[name] = self.get(name, 0.0) + time.perf_counter() - start

    def rounded(self) -> dict[str, float]:
        return {name: round(seconds, 3) for name, seconds in self.items()}


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` [in, out] (x @ weight) → (int8 [out, in], float64 scale per output channel): what the
    engine cache stores for an int8 GEMM (oneDNN's packed form cannot be serialised; `_Int8Gemm` packs
    these again at load, bit for bit the same)."""
    w = weight.t().float()  # [out, in]
    scales = (torch.maximum(w.amax(1), w.amin(1).neg_()) / 127.0).clamp_min(1e-12).double()
    # what torch.quantize_per_channel computes (round half to even of w · (1/scale in float32)), bit for
    # bit, in vectorised passes instead of its per-element loop, with one full-size temporary: a fresh
    # buffer per pass cost more than the pass (page faults; the official model's conditioning is 96 × 21 MB)
    inverse = 1.0 / scales.float()
    q = torch.mul(w, inverse[:, None]).round_().clamp_(-128, 127)
    return q.to(torch.int8).contiguous(), scales


class _FloatGemm:
    """x @ weight in the weight's dtype (fp32 or bf16, fp32 accumulation); a bias is the weight's last row
    (see `layer_arrays`)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight.contiguous()
        self.in_features, self.out_features = self.weight.shape

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x @ weight; into `out` when given (no allocation)."""
        return torch.mm(x, self.weight, out=out)

    def add_into(self, out: torch.Tensor, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out = base + x @ weight (one GEMM; `out` may be `base`)."""
        return out.addmm_(x, self.weight) if out is base else torch.addmm(base, x, self.weight, out=out)


@dataclass(frozen=True)
class _U8:
    """Activations quantized per tensor to uint8: x ≈ (data − zero_point) · scale."""

    data: torch.Tensor
    scale: float
    zero_point: int

    def rows(self, start: int, end: int) -> "_U8":
        return _U8(self.data[start:end], self.scale, self.zero_point)


#: −gate = tanh(a)·σ(b) lies in (−1, 1): it is quantized with this fixed scale (zero point 128), no range pass
GATE_SCALE = 1.0 / 127.0
#: int8 engines quantise the mel and each layer's residual stream with static scales, calibrated once per
#: engine (`FastEngine.calibrate`) on this many frames of the probe (real speech), each observed range
#: widened by ACTIVATION_MARGIN (a value beyond it saturates) and rounded outwards to 4 significant bits
#: (a last-bit difference in the calibration run cannot change a scale); the margins tried and the SNR
#: each gave are in docs/benchmarks.md
CALIBRATION_FRAMES = 96
ACTIVATION_MARGIN = 1.1


def value_range(x: torch.Tensor) -> tuple[float, float]:
    """(min, max) of x; MelError when either is not finite."""
    lo, hi = (v.item() for v in torch.aminmax(x))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise MelError("FastEngine (int8): the activations are not finite (inf or NaN in the mel or the "
                       "model's weights)")
    return lo, hi


def u8_params(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero point) of the uint8 quantisation of [lo, hi], widened to hold 0 so that zeros (padding,
    the gaps between packed utterances) stay exactly zero."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255.0, 1e-12)
    return scale, min(255, max(0, round(-lo / scale)))


def widened_range(lo: float, hi: float) -> list[float]:
    """A calibrated range [lo, hi] (holding 0) widened by ACTIVATION_MARGIN and rounded outwards to 4
    significant bits."""
    def outwards(v: float) -> float:
        v *= ACTIVATION_MARGIN
        if v == 0.0:
            return 0.0
        step = 2.0 ** (math.floor(math.log2(abs(v))) - 3)
        return math.copysign(math.ceil(abs(v) / step) * step, v)
    return [outwards(min(lo, 0.0)), outwards(max(hi, 0.0))]


def quantize_u8(x: torch.Tensor, scale: float | None = None, zero_point: int = 128) -> _U8:
    """x (fp32, contiguous) → uint8, per tensor; values beyond the scale's range saturate. Without `scale`:
    from x's range (`value_range`, `u8_params`)."""
    if scale is None:
        scale, zero_point = u8_params(*value_range(x))
    q = torch.quantize_per_tensor(x, scale, zero_point, torch.quint8)
    # the quantized tensor's bytes as a plain uint8 tensor, no copy (oneDNN's int8 GEMM takes uint8)
    data = torch.empty(0, dtype=torch.uint8).set_(q.untyped_storage(), q.storage_offset(), q.shape, q.stride())
    return _U8(data, float(scale), int(zero_point))


class _Int8Gemm:
    """x @ weight + bias through oneDNN's int8 GEMM (`onednn.qlinear_pointwise`): weight int8 with one scale
    per output channel, packed once; x uint8 (`_U8`, quantized by the caller once for all its GEMMs);
    fp32 out, or accumulated onto an fp32 tensor in the GEMM itself (oneDNN's sum post-op)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        self.out_features, self.in_features = q.shape
        self.packed = torch.ops.onednn.qlinear_prepack(q.contiguous(), None)
        self.scales = scales.float().contiguous()
        self.zero_points = torch.zeros(self.out_features, dtype=torch.long)
        self.bias = None if bias is None else bias.float().contiguous()

    def __call__(self, x: _U8) -> torch.Tensor:
        """x @ weight + bias, a new fp32 tensor."""
        return torch.ops.onednn.qlinear_pointwise(x.data, x.scale, x.zero_point, self.packed, self.scales,
                                                  self.zero_points, self.bias, 1.0, 0, torch.float32, "none",
                                                  [], "")

    def accumulate(self, out: torch.Tensor, x: _U8) -> torch.Tensor:
        """out += x @ weight + bias, in the GEMM (`out`: fp32, contiguous — oneDNN's sum post-op writes a
        strided `out` wrongly)."""
        return torch.ops.onednn.qlinear_pointwise.binary(x.data, x.scale, x.zero_point, self.packed, self.scales,
                                                         self.zero_points, out, self.bias, 1.0, 0, torch.float32,
                                                         1.0, 0, "sum", 1.0, "none", [], "")


#: mel frames per block by default, per precision: float, a whole utterance of up to ~24 s in one pass per
#: op (large GEMMs win over keeping a block in cache); int8 runs fastest on short blocks (its fp32 gate input
#: is 4× the bytes of the uint8 GEMM operands); the figures: docs/benchmarks.md, "Figures behind constants"
BLOCK_FRAMES = {"fp32": 2048, "bf16": 2048, "int8": 256}
#: the utterances of a batch run end to end in sequences of up to this many mel frames: short ones leave the
#: conditioning GEMM bound by its weights, long ones spill out of cache, and either way it is faster than an
#: utterance per thread (docs/benchmarks.md, "Figures behind constants")
PACK_FRAMES = 1024
#: how close an utterance run in a batch (packed with others), or in chunks, is to the same utterance run
#: alone and whole, as SNR in dB, per precision. They differ by rounding at most: the float GEMM library may
#: sum a row in another order when the matrix holds other rows (MKL's AVX2 path, which it takes on AMD CPUs,
#: does), and are bit-identical where it does not (seen with AMX). bf16 without AMX (AVX-512 BF16) differs
#: more: the blocks then cut a packed utterance elsewhere. Chunked and streamed bf16 stay bit-identical. The
#: SNRs measured: docs/backends.md and docs/benchmarks.md, "Figures behind constants".
#: int8 quantises with scales fixed per engine (`FastEngine.calibrate`) and sums in int32, exactly.
PACKED_MIN_SNR_DB = {"fp32": 100.0, "bf16": 90.0, "int8": 100.0}
#: float res/skip GEMMs have their rows and columns padded to a multiple of this
RS_ALIGN = 32


def state_width(n_channels: int, n_skip: int, precision: str) -> int:
    """Columns of the engine's WN state: the residual stream (C), the skip sum, and (float) zeros up to a
    multiple of RS_ALIGN."""
    width = n_channels + n_skip
    return width if precision == "int8" else -(-width // RS_ALIGN) * RS_ALIGN


def layer_gain(n_channels: int) -> torch.Tensor:
    """The factor on a WN layer's 2C gate inputs: 2 on the tanh half (see `layer_arrays`), 1 on the sigmoid
    half; ×2 is exact in any binary format."""
    gain = torch.ones(2 * n_channels)
    gain[:n_channels] = 2.0
    return gain


def layer_arrays(fwn: FastWN, i: int, precision: str,
                 cond: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Layer i of a folded coupling network in GEMM form (x @ w, channels-last), as the tensors the engine
    is built from (and the cache stores): per GEMM `<name>.weight` (bf16/fp32, [in, out]) or `<name>.q`
    + `<name>.scale` (int8, [out, in]), and (int8) `<name>.bias` (fp32) where it has one. `cond`: the
    layer's conditioning from `fold.conditioning_layers` with `layer_gain` (taken over: changed in place;
    phase-major, or with `gemm=True` already the float GEMM form), else `fwn`'s.

    The gate needs no tanh: the tanh half of its input is scaled by 2 (exact in binary), so
    tanh(a)·σ(b) = (2σ(2a) − 1)·σ(b). The engine takes one in-place sigmoid over all 2C channels and one
    fused multiply-add, σ(b) − 2·σ(2a)·σ(b) = −gate, which the res/skip GEMM takes with the weight −W (the
    sign is exact).

    Float GEMMs carry their biases as a last weight row, against a column of ones the engine appends to
    the mel and to the gate: a separate bias costs a pass over the GEMM's output. The res/skip GEMM adds
    straight onto the engine's state, [residual (C) | skip | zeros] (the last layer: its skip columns
    only), its columns padded to a multiple of RS_ALIGN, and its rows (the gate, the bias, zeros) too: AMX
    tiles are that wide, and a ragged edge costs more than the padding."""
    n, steps, taps = fwn.n_channels, fwn.steps, fwn.taps
    gain = layer_gain(n)
    w_in = fwn.in_layers[i].weight.detach().float() * gain[:, None, None]  # [2n, n, kernel]
    w_in = w_in.permute(2, 1, 0).reshape(-1, 2 * n)  # rows (tap, channel)
    # conditioning, the largest array of the engine: int8 phase-major [p, o, (tap, mel)], quantised in place
    # as its GEMM's [out, in]; float [(tap, mel), (p, o)] with the bias as a last row. `conditioning_layers`
    # composes it in that layout; a folded model's conv layout [(o, p), mel, tap] takes one copy
    if cond is None:  # the folded model's own (conv layout), phase-major, with the gain
        conv = fwn.cond_layers[i]
        cond = (conv.weight.detach().view(2 * n, steps, -1, taps).permute(1, 0, 3, 2).reshape(steps, 2 * n, -1)
                * gain.view(1, -1, 1), conv.bias.detach().view(2 * n, steps).t() * gain)
    w, b_cond = cond
    if b_cond is None:  # already the float GEMM form (`conditioning_layers(gemm=True)`)
        w_cond = w.view(w.shape[0], -1)
    elif precision == "int8":  # quantised in place as its GEMM's [out, in]
        w_cond, b_cond = w.float().view(steps * 2 * n, -1).t(), b_cond.float().reshape(-1)
    else:
        weight = torch.empty(w.shape[2] + 1, steps, 2 * n, dtype=DTYPES[precision])
        weight[:-1].copy_(w.permute(2, 0, 1))
        weight[-1].copy_(b_cond)
        w_cond, b_cond = weight.view(-1, steps * 2 * n), None
    rs = fwn.res_skip_layers[i]
    w_rs, b_rs = -rs.weight.detach()[..., 0].t().float(), rs.bias.detach().float()  # −W: applied to −gate
    if precision != "int8":  # int8's packed GEMMs take their biases themselves
        w_rs, b_rs = torch.cat([w_rs, b_rs[None]]), None  # against the gate's column of ones
        width = state_width(n, fwn.n_out, precision)  # the last layer writes only the columns after C
        columns = width - n if i == fwn.n_layers - 1 else width
        w_rs = F.pad(w_rs, (0, columns - w_rs.shape[1], 0, -w_rs.shape[0] % RS_ALIGN))
    arrays = {}
    for name, weight, bias in (("taps", w_in, None), ("cond", w_cond, b_cond), ("res_skip", w_rs, b_rs)):
        if precision == "int8":  # all three GEMMs in int8
            arrays[f"{name}.q"], arrays[f"{name}.scale"] = quantize_int8(weight)
        else:
            arrays[f"{name}.weight"] = weight.to(DTYPES[precision]).contiguous()  # no copy where it is already
        if bias is not None:  # int8 only: float biases are weight rows
            arrays[f"{name}.bias"] = bias.float().contiguous()
    return arrays


class _Layer:
    """One WN layer's GEMMs, built from `layer_arrays` (int8: packed here). Float: one GEMM per dilated tap
    (`tap_gemms`), each accumulating into the gate's input, no concatenated copy of the taps; int8: one GEMM
    over the taps side by side (`taps_gemm`, K = taps·C: their uint8 copy is a quarter of the float bytes,
    and one large GEMM ran faster than three), and res/skip split in two GEMMs (`res_gemm`, None in the last
    layer, and `skip_gemm`), each adding onto its own contiguous state: oneDNN's in-GEMM sum needs a
    contiguous output."""

    __slots__ = ("dilation", "taps", "has_residual", "cond_gemm", "tap_gemms", "taps_gemm", "res_skip_gemm",
                 "res_gemm", "skip_gemm", "x_quant")

    def __init__(self, arrays: dict[str, torch.Tensor], dilation: int, taps: int, precision: str,
                 has_residual: bool):
        self.dilation, self.taps, self.has_residual = dilation, taps, has_residual
        self.tap_gemms, self.taps_gemm = [], None
        self.x_quant: tuple[float, int] | None = None  # int8: the residual stream's (scale, zero point)
        self.res_skip_gemm = self.res_gemm = self.skip_gemm = None
        if precision == "int8":
            self.taps_gemm = _Int8Gemm(arrays["taps.q"], arrays["taps.scale"], None)  # [out, (tap, channel)]
            self.cond_gemm = _Int8Gemm(arrays["cond.q"], arrays["cond.scale"], arrays.get("cond.bias"))
            q, scale, bias = arrays["res_skip.q"], arrays["res_skip.scale"], arrays["res_skip.bias"]
            n = q.shape[1] if has_residual else 0  # the residual's rows come first: C of them
            self.res_gemm = _Int8Gemm(q[:n], scale[:n], bias[:n]) if has_residual else None
            self.skip_gemm = _Int8Gemm(q[n:], scale[n:], bias[n:])
        else:
            weight = arrays["taps.weight"]  # [(tap, channel), out]: a tap's rows are a contiguous slice
            width = weight.shape[0] // taps
            self.tap_gemms = [_FloatGemm(weight[j * width:(j + 1) * width]) for j in range(taps)]
            self.cond_gemm = _FloatGemm(arrays["cond.weight"])
            self.res_skip_gemm = _FloatGemm(arrays["res_skip.weight"])


def flow_arrays(model, k: int, precision: str, times: LoadTimes | None = None) -> dict[str, torch.Tensor]:
    """Flow k of `model` (a WaveGlow, folded here, or a FastWaveGlow) as the engine's tensors:
    `layer<i>.<gemm>.<part>` per WN layer, `start.weight`/`start.bias` (the start 1x1 conv) and `inverse`
    (the inverse of the flow's 1x1 mixing), all channels-last. `times`: where the fold and the arrays'
    seconds are added."""
    times = LoadTimes() if times is None else times
    folded = isinstance(model, FastWaveGlow)
    # the composition's precision: fp32 engines float64; the others bf16 where it is native (they round
    # their weights to bf16 or int8 anyway: measured, the probe's SNR did not move), else float32
    dtype = torch.float64 if precision == "fp32" else torch.bfloat16 if native_bf16() else torch.float32
    with times.phase("fold"):
        fwn = model.WN[k] if folded else fold_wn(model, k, conditioning=False)
        # the float engines' weights come out of the composition in their GEMM layout, int8's phase-major
        conds = None if folded else conditioning_layers(model, k, dtype, gemm=precision != "int8",
                                                        gain=layer_gain(model.config.n_channels))
    arrays = {}
    for i in range(model.config.n_layers):
        with times.phase("fold"):  # the conditioning's composition, one batched GEMM per layer
            cond = None if conds is None else next(conds)
        with times.phase("arrays"):
            arrays.update((f"layer{i}.{name}", t) for name, t in layer_arrays(fwn, i, precision, cond).items())
    arrays["start.weight"] = fwn.start.weight.detach()[..., 0].t().float().contiguous()
    arrays["start.bias"] = fwn.start.bias.detach().float().clone()
    arrays["inverse"] = model.convinv[k].W_inverse.detach()[..., 0].t().float().contiguous()
    return arrays


@dataclass
class _Flow:
    """One flow in GEMM form: its WN layers, the `start` 1x1 conv, and the inverse of its 1x1 mixing."""

    layers: list[_Layer]
    start_weight: torch.Tensor
    start_bias: torch.Tensor
    inverse: torch.Tensor


def native_precision(precision: str) -> str:
    """`precision` if this CPU runs it natively, else the next one down (int8 → bf16 → fp32)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"FastEngine: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8" and not native_int8():
        precision = "bf16"
    if precision == "bf16" and not native_bf16():
        precision = "fp32"
    return precision


class FastEngine:
    """The folded WaveGlow reverse pass as blocked GEMMs: `run(mel, z) -> audio` like a Backend.

    - `model`: a `WaveGlow` (folded here) or a `FastWaveGlow`.
    - `precision`: "int8", "bf16" (GEMM operands in bf16, fp32 accumulation; the flows' affine/1×1 parts
      stay fp32) or "fp32". A precision the CPU does not run natively falls back (int8 → bf16 → fp32; see
      `self.precision`).
    - `block_frames`: mel frames per block of the taps, gate, residual and skip (× steps per frame): a
      cap on their temporaries; default: BLOCK_FRAMES for the precision.
    - `threads`: the most cores to use (default: torch's setting). Each `run` uses as many of them as are
      free at that moment (`choose_threads`; `adaptive=False`: always `threads`).
    - `flows`: the engine's tensors per flow (`flow_arrays`; the cache's way in): then `model` is only
      asked for its `config` and `n_remaining_channels`.
    - `load_times`: a `LoadTimes` the seconds of making it are added to (default: a new one);
      `self.load_times` holds them.
    - `plan_load`: fold and pack on the cores free now (`plan_threads`: `CpuMeter.others_busy`), as `run`
      does; default: where there is heavy work, i.e. it folds the model itself or packs int8 weights.
    - `activations`: int8: the activation ranges `calibrate` returned for these weights (the cache's way
      in); default: calibrated here. `self.activations` holds them (None for float engines).
    """

    def __init__(self, model, precision: str = "bf16", block_frames: int | None = None, threads: int | None = None,
                 adaptive: bool = True, flows: Iterable[dict[str, torch.Tensor]] | None = None,
                 load_times: LoadTimes | None = None, plan_load: bool | None = None,
                 activations: dict | None = None):
        if block_frames is not None and block_frames < 1:
            raise ConfigError(f"FastEngine: block_frames must be >= 1, got {block_frames}")
        self.precision = precision = native_precision(precision)
        block_frames = block_frames or BLOCK_FRAMES[precision]
        self.dtype = DTYPES[precision]
        self.config = c = model.config
        self.block_frames = block_frames
        self.threads = threads or torch.get_num_threads()
        self.adaptive = adaptive
        self.last_threads = self.threads  # what the latest `run` used
        self._meter = CpuMeter()
        self.steps, self.taps = c.steps_per_frame, c.upsample_taps
        self.pad = (c.kernel_size - 1) // 2 * 2 ** (c.n_layers - 1)  # rows of zeros around each utterance
        self.gap_frames = -(-self.pad // self.steps)  # zero frames between packed utterances: ≥ pad rows
        self.pack_frames = PACK_FRAMES
        self.n_remaining_channels = model.n_remaining_channels
        self.load_times = times = LoadTimes() if load_times is None else load_times
        if flows is None:  # one flow folded at a time: the fp32 folded weights never all exist
            flows = (flow_arrays(model, k, precision, times) for k in range(c.n_flows))
        self.flows = []
        previous = torch.get_num_threads()
        if plan_load is None:
            plan_load = flows is None or precision == "int8"
        try:  # a core shared with another process makes every OpenMP op wait for it (the packing's figure:
            # docs/benchmarks.md, "Figures behind constants")
            if plan_load:
                torch.set_num_threads(self.plan_threads())
            for arrays in flows:
                with times.phase("pack"):
                    layers = [_Layer({key.split(".", 1)[1]: t for key, t in arrays.items()
                                      if key.startswith(f"layer{i}.")},
                                     2 ** i, c.kernel_size, precision, has_residual=i < c.n_layers - 1)
                              for i in range(c.n_layers)]
                    # the start 1x1 conv writes the WN state directly, so in its dtype
                    self.flows.append(_Flow(layers, arrays["start.weight"].to(self.dtype),
                                            arrays["start.bias"].to(self.dtype), arrays["inverse"]))
            if len(self.flows) != c.n_flows:
                raise ConfigError(f"FastEngine: {len(self.flows)} flows given for a model of {c.n_flows}")
            self.mel_quant: tuple[float, int] | None = None  # int8: the mel's (scale, zero point)
            self.activations = None
            if precision == "int8":
                if activations is None:
                    with times.phase("calibrate"):
                        activations = self.calibrate()
                self.set_activations(activations)
        finally:
            torch.set_num_threads(previous)

    def noise_shape(self, batch: int, frames: int) -> tuple[int, int, int]:
        return batch, self.config.n_group, frames * self.config.hop_length // self.config.n_group

    @torch.inference_mode()
    def calibrate(self) -> dict:
        """int8: the activation ranges to quantise with, {"mel": [lo, hi], "x": per flow, per layer [lo, hi]
        of the residual stream}: observed on CALIBRATION_FRAMES of the probe mel (real speech, noise of
        sigma PROBE_SIGMA) run with per-sequence scales, then widened (`widened_range`).

        Why static: a scale taken from the sequence run makes an utterance's audio depend on what else is in
        that sequence — a chunk of a stream is a sequence, so chunked and streamed synthesis would differ
        from one-shot (38 dB measured), and a batch's neighbours would change an utterance. With every scale
        fixed per engine, a row's int8 GEMM sums are exact integers and every fp32 step after them is
        elementwise: an utterance's audio does not depend on the chunking or the batch."""
        c = self.config
        mel = probe_mel(c.n_mel_channels, CALIBRATION_FRAMES)[0]
        z = PROBE_SIGMA * torch.randn(self.noise_shape(1, mel.shape[1])[1:], generator=torch.Generator().manual_seed(2))
        self.mel_quant = None
        for flow in self.flows:
            for layer in flow.layers:
                layer.x_quant = None
        observed: dict = {}
        self._reverse(self._unfold(mel), z.t().contiguous(), observed=observed)
        return {"mel": widened_range(*observed["mel"]),
                "x": [[widened_range(*observed[k, i]) for i in range(c.n_layers)] for k in range(c.n_flows)]}

    def set_activations(self, activations: dict) -> None:
        """Quantise with these ranges (`calibrate`'s form); ValueError when they do not fit this engine."""
        c = self.config
        try:
            mel, x = activations["mel"], activations["x"]
            ranges = [mel, *(r for flow in x for r in flow)]
            ok = len(x) == c.n_flows and all(len(flow) == c.n_layers for flow in x) and all(
                len(r) == 2 and all(isinstance(v, float) and math.isfinite(v) for v in r) and r[0] <= 0.0 <= r[1]
                for r in ranges)
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise ValueError("FastEngine: int8 activation ranges that do not fit this model")
        self.activations = activations
        self.mel_quant = u8_params(*mel)
        for flow, flow_ranges in zip(self.flows, x):
            for layer, r in zip(flow.layers, flow_ranges):
                layer.x_quant = u8_params(*r)

    def plan_threads(self) -> int:
        """The threads the next `run` uses (see `choose_threads`)."""
        if not self.adaptive or self.threads == 1:
            return self.threads
        return choose_threads(usable_cpus(), self._meter.others_busy(), self.threads)

    @torch.inference_mode()
    def run(self, mel, z) -> np.ndarray:
        """mel [B, n_mel, T], z [B, n_group, T·hop/n_group] (complete, sigma-scaled) → audio [B, T·hop] float32."""
        mel = torch.as_tensor(mel).float()
        z = torch.as_tensor(z).float()
        if mel.dim() != 3 or tuple(z.shape) != self.noise_shape(mel.shape[0], mel.shape[2]):
            raise MelError(f"FastEngine: mel {tuple(mel.shape)} and z {tuple(z.shape)} do not fit "
                             f"(z must be [B, {self.config.n_group}, T*{self.steps}] for mel [B, n_mel, T])")
        return np.stack(self.run_utterances(list(mel), list(z)))

    @torch.inference_mode()
    def run_utterances(self, mels, zs) -> list[np.ndarray]:
        """Utterances of any lengths, each at its own length (no padding): mels [n_mel, T_i], zs [n_group,
        T_i·hop/n_group] (complete, sigma-scaled) → audio [T_i·hop] float32 each, equal to running each alone
        within `PACKED_MIN_SNR_DB` (fp32 and bf16 up to the GEMM library's rounding, int8 up to quantisation)."""
        prepared = []
        for mel, z in zip(mels, zs, strict=True):
            mel, z = torch.as_tensor(mel).float(), torch.as_tensor(z).float()
            if mel.dim() != 2 or tuple(z.shape) != self.noise_shape(1, mel.shape[1])[1:]:
                raise MelError(f"FastEngine: mel {tuple(mel.shape)} and z {tuple(z.shape)} do not fit (z must be "
                               f"[{self.config.n_group}, T*{self.steps}] for mel [n_mel, T])")
            prepared.append((self._unfold(mel), z.t().contiguous()))  # noise [steps, n_group]
        threads = self.last_threads = self.plan_threads()
        previous = torch.get_num_threads()
        try:
            torch.set_num_threads(threads)
            return self._run_packed(prepared)
        finally:
            torch.set_num_threads(previous)

    def _unfold(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [n_mel, T] → the conditioning input at frame rate [T, taps·n_mel] (+ the bias's column of ones,
        float; see layer_arrays) in the engine's dtype: row f holds mel frames f-3 .. f (zeros before the start)."""
        rows = F.pad(mel.t(), (0, 0, self.taps - 1, 0))
        unfolded = rows.unfold(0, self.taps, 1).transpose(1, 2).reshape(mel.shape[1], -1)
        if self.precision != "int8":
            unfolded = F.pad(unfolded, (0, 1), value=1.0)
        return unfolded.to(self.dtype).contiguous()

    def _run_packed(self, prepared) -> list[np.ndarray]:
        """Utterances end to end, longest first, as few sequences of up to `pack_frames` frames as they fit
        in (an utterance longer than that alone), `gap_frames` zero frames apart — at least the WN's reach,
        so that no tap sees another utterance: each sequence runs as one utterance with larger GEMMs."""
        order = sorted(range(len(prepared)), key=lambda i: -prepared[i][0].shape[0])
        groups: list[list[int]] = []
        frames = 0
        for i in order:
            length = prepared[i][0].shape[0]
            if not groups or frames + self.gap_frames + length > self.pack_frames:
                groups.append([])
                frames = -self.gap_frames
            groups[-1].append(i)
            frames += self.gap_frames + length
        outputs: list[np.ndarray | None] = [None] * len(prepared)
        for group in groups:
            gap = (torch.zeros(self.gap_frames, prepared[group[0]][0].shape[1], dtype=self.dtype),
                   torch.zeros(self.gap_frames * self.steps, self.config.n_group))
            parts, spans, gaps, row = [], [], [], 0
            for i in group:
                if parts:
                    parts.append(gap)
                    gaps.append((row, row + self.gap_frames * self.steps))
                    row = gaps[-1][1]
                parts.append(prepared[i])
                spans.append((i, row, row + prepared[i][1].shape[0]))
                row = spans[-1][2]
            unfolded, noise = (torch.cat([p[j] for p in parts]) if len(parts) > 1 else parts[0][j] for j in (0, 1))
            audio = self._reverse(unfolded, noise, gaps=gaps)
            for i, r0, r1 in spans:
                outputs[i] = audio[r0:r1].reshape(-1).numpy()
        return outputs

    @torch.inference_mode()
    def _reverse(self, unfolded: torch.Tensor, noise: torch.Tensor, gaps=(), observed: dict | None = None
                 ) -> torch.Tensor:
        """One sequence (an utterance, or several packed by `_run_packed`): unfolded mel [T, taps·n_mel],
        noise [T·steps, n_group] → audio [T·steps, n_group].
        `gaps`: (first, end) step rows that separate packed utterances (`_run_packed`): kept at zero in the
        WN state, as the padding around an utterance is. `observed` (int8 calibration): receives the
        activations' ranges."""
        c, steps = self.config, self.steps
        total = unfolded.shape[0] * steps
        frames = unfolded.shape[0]
        blocks = [(f0, min(frames, f0 + self.block_frames)) for f0 in range(0, frames, self.block_frames)]
        wn = _Int8WN(self, unfolded, blocks, gaps, observed) if self.precision == "int8" else \
            _FloatWN(self, unfolded, blocks, gaps)
        audio = noise[:, : self.n_remaining_channels]
        next_row = self.n_remaining_channels
        for k in reversed(range(c.n_flows)):
            flow = self.flows[k]
            n_half = audio.shape[1] // 2
            swap = c.swaps_halves(k)
            audio_0, audio_1 = (audio[:, n_half:], audio[:, :n_half]) if swap else (audio[:, :n_half], audio[:, n_half:])
            skip = wn.run(flow, audio_0, k)
            log_s, b = skip[:, n_half:], skip[:, :n_half]
            audio_1 = (audio_1 - b) * torch.exp(-log_s)
            audio = torch.cat((audio_1, audio_0) if swap else (audio_0, audio_1), 1) @ flow.inverse
            for g0, g1 in gaps:  # whatever the gaps' rows became (they are thrown away), not inf or NaN
                audio[g0:g1] = 0.0
            if c.has_early_output(k):
                audio = torch.cat((noise[:, next_row: next_row + c.n_early_size], audio), 1)
                next_row += c.n_early_size
        return audio


class _FloatWN:
    """The WN layers of one sequence in fp32 or bf16: the state, [residual stream (C) | skip sum | zeros],
    with `pad` zero rows around the sequence; with several blocks, each layer but the last writes the next
    state into the other buffer (the dilated taps of the rows after a block still read the old one); with
    one, it adds onto the state in place."""

    def __init__(self, engine: FastEngine, unfolded: torch.Tensor, blocks, gaps):
        self.engine, self.unfolded, self.blocks, self.gaps = engine, unfolded, blocks, gaps
        n, steps, dtype = engine.config.n_channels, engine.steps, engine.dtype
        self.total = total = unfolded.shape[0] * steps
        width = n + max(flow.layers[-1].res_skip_gemm.out_features for flow in engine.flows)
        self.state = torch.zeros(total + 2 * engine.pad, width, dtype=dtype)
        self.state_next = torch.zeros_like(self.state) if len(blocks) > 1 else None  # one block: in place
        # −gate, then a column of ones for the res/skip bias and zeros up to the GEMM's K
        k_rs = engine.flows[0].layers[0].res_skip_gemm.in_features
        self.gate = torch.zeros(min(total, blocks[0][1] * steps), k_rs, dtype=dtype)
        self.gate[:, n:n + 1] = 1.0
        # the conditioning of a block, [frames, steps·2C]: reused by every layer
        self.cond = torch.empty(blocks[0][1], engine.flows[0].layers[0].cond_gemm.out_features, dtype=dtype)

    def run(self, flow: _Flow, audio_0: torch.Tensor, k: int) -> torch.Tensor:
        """Flow k's WN on audio_0 [total, n_half] → its output [total, 2·n_half] (b | log s), fp32."""
        engine, pad, total, steps = self.engine, self.engine.pad, self.total, self.engine.steps
        n = engine.config.n_channels
        rows = self.state[pad: pad + total]
        rows[:, :n] = torch.addmm(flow.start_bias, audio_0.to(engine.dtype), flow.start_weight)
        rows[:, n:] = 0.0
        for g0, g1 in self.gaps:
            rows[g0:g1] = 0.0
        for layer in flow.layers:
            for f0, f1 in self.blocks:  # the conditioning's weights (steps × 2C per mel row): once per block
                acts = layer.cond_gemm(self.unfolded[f0:f1], out=self.cond[: f1 - f0])
                self._block(layer, acts.view(-1, 2 * n), f0 * steps, f1 * steps)
            if layer.has_residual:
                if len(self.blocks) > 1:
                    self.state, self.state_next = self.state_next, self.state
                for g0, g1 in self.gaps:
                    self.state[pad + g0: pad + g1, :n] = 0.0
        return self.state[pad: pad + total, n: n + 2 * audio_0.shape[1]].float()  # past it: padding

    def _block(self, layer: _Layer, acts: torch.Tensor, s0: int, s1: int) -> None:
        """One WN layer on steps [s0, s1): dilated taps added onto the conditioning `acts` (in place), gate,
        then the residual and skip added onto the state."""
        n, pad = self.engine.config.n_channels, self.engine.pad
        state, state_next = self.state, self.state_next
        t0, t1 = pad + s0, pad + s1
        centre, d = (layer.taps - 1) // 2, layer.dilation
        x = state[:, :n]
        for j, gemm in enumerate(layer.tap_gemms):  # each dilated tap is a row offset
            acts.addmm_(x[t0 + (j - centre) * d: t1 + (j - centre) * d], gemm.weight)
        sig = acts.sigmoid_()  # [σ(2a) | σ(b)] in place
        gate = self.gate[: s1 - s0]
        torch.addcmul(sig[:, n:], sig[:, :n], sig[:, n:], value=-2.0, out=gate[:, :n])  # −gate: see layer_arrays
        width = layer.res_skip_gemm.out_features
        if layer.has_residual and len(self.blocks) > 1:  # next state = state + residual and skip, one GEMM
            layer.res_skip_gemm.add_into(state_next[t0:t1, :width], state[t0:t1, :width], gate)
        elif layer.has_residual:  # one block: its taps are done, so in place (no copy of the state)
            columns = state[t0:t1, :width]
            layer.res_skip_gemm.add_into(columns, columns, gate)
        else:  # skip only, in place: no later block reads these columns
            columns = state[t0:t1, n:n + width]
            layer.res_skip_gemm.add_into(columns, columns, gate)


class _Int8WN:
    """The WN layers of one sequence in int8: the mel quantized once for all layers, the residual stream
    (fp32, `pad` zero rows around) quantized once per layer for all its taps, both with the engine's
    calibrated scales (`FastEngine.calibrate`), −gate with a fixed scale; every GEMM adds onto its fp32
    output in oneDNN's kernel. The taps read the layer's quantized copy, so the residual stream is updated
    in place. `observed` (calibration: the engine has no scales yet): scales from this sequence's ranges,
    which are recorded there."""

    def __init__(self, engine: FastEngine, unfolded: torch.Tensor, blocks, gaps, observed: dict | None = None):
        self.engine, self.blocks, self.gaps, self.observed = engine, blocks, gaps, observed
        self.mel = quantize_u8(unfolded, *(engine.mel_quant or self._observe("mel", unfolded)))
        self.total = total = unfolded.shape[0] * engine.steps
        n = engine.config.n_channels
        self.x = torch.zeros(total + 2 * engine.pad, n)
        self.gate = torch.empty(min(total, blocks[0][1] * engine.steps), n)

    def _observe(self, key, x: torch.Tensor) -> tuple[float, int]:
        """Calibration: x's range recorded under `key`, and the scale it gives."""
        if self.observed is None:
            raise ConfigError("FastEngine (int8): no activation scales (calibrate, or set_activations, first)")
        self.observed[key] = value_range(x)
        return u8_params(*self.observed[key])

    def run(self, flow: _Flow, audio_0: torch.Tensor, k: int) -> torch.Tensor:
        """Flow k's WN on audio_0 [total, n_half] → its output [total, 2·n_half] (b | log s), fp32."""
        engine, pad, total, steps = self.engine, self.engine.pad, self.total, self.engine.steps
        n, x = engine.config.n_channels, self.x
        rows = x[pad: pad + total]
        torch.addmm(flow.start_bias, audio_0, flow.start_weight, out=rows)
        for g0, g1 in self.gaps:
            rows[g0:g1] = 0.0
        skip = torch.zeros(total, flow.layers[-1].skip_gemm.out_features)
        for i, layer in enumerate(flow.layers):
            x_q = quantize_u8(x, *(layer.x_quant or self._observe((k, i), x)))  # pad and gap rows stay zero
            centre, d = (layer.taps - 1) // 2, layer.dilation
            for f0, f1 in self.blocks:
                s0, s1 = f0 * steps, f1 * steps
                acts = layer.cond_gemm(self.mel.rows(f0, f1)).view(-1, 2 * n)
                taps = torch.cat([x_q.data[s0 + pad + (j - centre) * d: s1 + pad + (j - centre) * d]
                                  for j in range(layer.taps)], 1)
                layer.taps_gemm.accumulate(acts, _U8(taps, x_q.scale, x_q.zero_point))
                sig = acts.sigmoid_()  # [σ(2a) | σ(b)] in place
                gate = self.gate[: s1 - s0]
                torch.addcmul(sig[:, n:], sig[:, :n], sig[:, n:], value=-2.0, out=gate)  # −gate: see layer_arrays
                gate_q = quantize_u8(gate, GATE_SCALE, 128)
                if layer.res_gemm is not None:
                    layer.res_gemm.accumulate(x[pad + s0: pad + s1], gate_q)
                layer.skip_gemm.accumulate(skip[s0:s1], gate_q)
            if layer.has_residual:
                for g0, g1 in self.gaps:
                    rows[g0:g1] = 0.0
        return skip
