"""The model's weights in the training direction: NVIDIA's initialisation, a warm start, and weight norm
put on for training and folded off for inference (`save_waveglow` writes the folded model)."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import fold_weight_norm, load_waveglow
from ..config import ModelConfig
from ..errors import CheckpointError
from ..model import WaveGlow

#: the sub-layers NVIDIA wraps in weight norm (glow.py WN.__init__); `end` is not (it starts at zero)
WEIGHT_NORM_LAYERS = ("start", "cond_layer", "in_layers", "res_skip_layers")


def apply_weight_norm(glow: WaveGlow) -> WaveGlow:
    """Wrap NVIDIA's weight-normed layers in `torch.nn.utils.weight_norm` (parameters weight_g, weight_v)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates the hook version; its names are NVIDIA's
        for wn in glow.WN:
            for name in WEIGHT_NORM_LAYERS:
                layer = getattr(wn, name)
                for module in (layer if isinstance(layer, nn.ModuleList) else [layer]):
                    torch.nn.utils.weight_norm(module, name="weight")
    return glow


def folded_copy(glow: WaveGlow) -> WaveGlow:
    """A plain (inference) WaveGlow with the weight norm folded in; the training model is left alone."""
    with torch.random.fork_rng(devices=[]):  # building it draws random weights: leave the run's RNG alone
        plain = WaveGlow(glow.config)
    state = fold_weight_norm(glow.state_dict())
    plain.load_state_dict({k: v.detach().float().cpu() for k, v in state.items()})
    plain.refresh_inverses()
    return plain.eval()


def init_from_scratch(config: ModelConfig, seed: int, hann_upsample: bool = False) -> WaveGlow:
    """NVIDIA's initialisation: torch defaults, random rotations, and each WN `end` at zero (flows start as identity)."""
    torch.manual_seed(seed)
    glow = WaveGlow(config)
    with torch.no_grad():
        for wn in glow.WN:
            wn.end.weight.zero_()
            wn.end.bias.zero_()
        if hann_upsample:  # each band interpolated to audio rate by itself; overlap-added Hann sums to 1
            # at the kernel's start: frame t is centred on sample t*hop, and the transposed convolution
            # places it from sample t*hop on, so a window at the start is as close to aligned as it gets
            width = 2 * config.upsample_stride
            glow.upsample.weight.zero_()
            for band in range(config.n_mel_channels):
                glow.upsample.weight[band, band, :width] = torch.hann_window(width, periodic=True)
            glow.upsample.bias.zero_()
    glow.refresh_inverses()
    return glow


def warm_start_model(path: str | Path, expected: ModelConfig | None = None) -> WaveGlow:
    """Any checkpoint `load_waveglow` reads; with `expected`, a different architecture is refused."""
    glow = load_waveglow(path)
    if expected is not None and glow.config != expected:
        diff = {k: (v, getattr(glow.config, k)) for k, v in expected.to_dict().items()
                if getattr(glow.config, k) != v}
        detail = ", ".join(f"{k}: config {a!r} vs checkpoint {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"{path}: warm-start checkpoint has another architecture than the run's "
                              f"'model' parameter ({detail}); remove 'model' to take the checkpoint's, "
                              "or start from scratch", path=path)
    return glow.train()
