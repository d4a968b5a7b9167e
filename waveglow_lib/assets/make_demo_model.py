"""Regenerate the bundled demo model: `python -m waveglow_lib.assets.make_demo_model`.

The demo model is UNTRAINED. It has the official architecture (upsampler, 12 flows, early outputs
every 4 flows, WN with dilated gated convolutions) at a reduced width (WN 4 layers x 24 channels) so the
repository stays small, and every weight is set — including the WN `end` convolutions that NVIDIA
initialises to zero — so that every layer does real work. It turns a mel into noise-like audio; its
inverse pass (`noise_from_audio`) round-trips real speech exactly, which the notebooks use.

Weights are stored in float16 and gzip-compressed; the upsampler maps each mel band only to itself
(a Hann interpolation kernel), which compresses to almost nothing.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..checkpoint import save_waveglow
from ..config import DEMO_MODEL_PATH, ModelConfig
from ..model import WaveGlow

DEMO_CONFIG = ModelConfig(n_mel_channels=80, n_flows=12, n_group=8, n_early_every=4, n_early_size=2,
                          n_layers=4, n_channels=24, kernel_size=3)
SEED = 20181031  # WaveGlow's arXiv date


def build_demo_model(seed: int = SEED) -> WaveGlow:
    torch.manual_seed(seed)
    model = WaveGlow(DEMO_CONFIG)
    generator = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=generator) * std

    with torch.no_grad():
        kernel = torch.hann_window(DEMO_CONFIG.upsample_kernel, periodic=True) * 0.5  # overlap-add sums to 1
        model.upsample.weight.zero_()
        for band in range(DEMO_CONFIG.n_mel_channels):
            model.upsample.weight[band, band] = kernel
        model.upsample.bias.copy_(normal(model.upsample.bias.shape, 0.02))
        for name, param in model.named_parameters():
            if name.startswith("upsample"):
                continue
            if name.startswith("convinv"):  # a rotation, perturbed so that its inverse is not a transpose
                param.add_(normal(param.shape, 0.05))
                continue
            fan_in = param[0].numel() if param.dim() > 1 else 1
            gain = {"cond_layer": 0.15, "end": 0.2}.get(name.split(".")[2], 1.0)
            std = gain / fan_in ** 0.5 if param.dim() > 1 else 0.02
            param.copy_(normal(param.shape, std))
        for wn in model.WN:  # a positive log-s bias shrinks each flow's output: keeps audio within [-1, 1]
            n_half = wn.end.bias.shape[0] // 2
            wn.end.bias[n_half:] += 0.6
    model.refresh_inverses()
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEMO_MODEL_PATH)
    args = parser.parse_args(argv)
    model = build_demo_model()
    # round to float16 first, so the stored model is exactly the one this script describes
    path = save_waveglow(model, args.output, dtype=torch.float16)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, {n_params / 1e6:.2f} M parameters)")


if __name__ == "__main__":
    main()
