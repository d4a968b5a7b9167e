"""Shared fixtures: tiny model configs and NVIDIA-layout reference models (see tests/reference/)."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from waveglow_lib.config import ModelConfig

REFERENCE_DIR = Path(__file__).parent / "reference"

#: small enough for fast tests, big enough to exercise early outputs, odd flows and dilations
TINY = dict(n_mel_channels=80, n_flows=6, n_group=8, n_early_every=2, n_early_size=2,
            n_layers=3, n_channels=16, kernel_size=3)


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig(**TINY)


def randomise_(module: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    """Give every parameter (WN `end` convs included, which NVIDIA zero-initialises) a random value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "convinv" in name:
                continue
            fan_in = param[0].numel() if param.dim() > 1 else 1
            param.copy_(torch.randn(param.shape, generator=generator) * scale / fan_in ** 0.5)
    return module


class ReferenceModules:
    """Imports tests/reference/glow.py (+ glow_old.py) as top-level `glow`/`glow_old`, then removes them."""

    def __enter__(self):
        sys.path.insert(0, str(REFERENCE_DIR))
        self.glow = importlib.import_module("glow")
        self.glow_old = importlib.import_module("glow_old")
        return self

    def __exit__(self, *exc):
        sys.path.remove(str(REFERENCE_DIR))
        for name in ("glow", "glow_old"):
            sys.modules.pop(name, None)


def make_reference(layout: str = "glow", seed: int = 0, save_to: Path | None = None,
                   legacy_format: bool = False, before_save=None, **overrides):
    """A randomised NVIDIA-layout WaveGlow (glow or glow_old) built from the test stand-in classes.

    With `save_to`, it is also saved like NVIDIA's train.py does ({"model": ..., "optimizer": ...}),
    while the stand-in modules are importable (pickle needs them at save time, never at load time).
    """
    cfg = {**TINY, **overrides}
    wn = {k: cfg.pop(k) for k in ("n_layers", "n_channels", "kernel_size")}
    torch.manual_seed(seed)
    with ReferenceModules() as ref:
        cls = ref.glow.WaveGlow if layout == "glow" else ref.glow_old.WaveGlow
        model = cls(WN_config=wn, **cfg)
        randomise_(model, seed)
        with torch.no_grad():  # make the 1x1 convs non-orthogonal so their inverse matters
            for conv in model.convinv:
                w = conv.conv.weight
                w.add_(0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)))
        if save_to is not None:
            if before_save is not None:
                before_save(model)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
            torch.save({"model": model, "iteration": 580000, "optimizer": optimizer.state_dict(),
                        "learning_rate": 1e-4}, save_to, _use_new_zipfile_serialization=not legacy_format)
        return model.eval()


def snr_db(reference, estimate) -> float:
    """SNR in dB of two arrays or tensors of the same shape (any batch layout), uncapped."""
    reference = np.asarray(torch.as_tensor(reference).detach().double().cpu())
    estimate = np.asarray(torch.as_tensor(estimate).detach().double().cpu())
    assert reference.shape == estimate.shape, (reference.shape, estimate.shape)
    noise = np.sum((reference - estimate) ** 2)
    return float(10 * np.log10(np.sum(reference ** 2) / max(noise, 1e-300)))
