"""waveglow-workflow: WaveGlow vocoder inference from an LJSpeech recording to a measured `.wav`.

Modules import only from those before them, in the data's order: leaves (errors, io, layout, config,
hardware) → audio → model → export, convert → backends/ → batching → stamps → jobs (the work a stage
prepares) → engines/ (where a job runs) → stages/ (which build jobs) → evaluate → bench/ → notebook/ →
service → cli (the full order, which tests/test_layers.py checks, is its LAYERS).
Names are imported lazily, so `import waveglow_lib` stays cheap and optional packages stay optional.
"""
from __future__ import annotations

import importlib
from typing import Any

from .isa import apply_isa_cap

__version__ = "0.1.0"

# an ISA cap (WAVEGLOW_ISA_CAP, see isa.py) must reach oneDNN and MKL before their first GEMM
apply_isa_cap()

_EXPORTS = {
    "ModelConfig": "config", "STFTConfig": "config", "WorkflowConfig": "config",
    "WaveGlow": "model",
    "load_waveglow": "checkpoint", "save_waveglow": "checkpoint",
    "WaveGlowError": "errors", "CheckpointError": "errors", "AudioError": "errors", "MelError": "errors",
    "load_wav": "audio", "mel_spectrogram": "audio",
    "Denoiser": "denoiser",
    "export_onnx": "export",
    "get_backend": "backends", "available_backends": "backends", "resolve_backend": "backends",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
