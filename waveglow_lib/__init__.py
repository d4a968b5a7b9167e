"""waveglow-workflow: WaveGlow vocoder inference from an LJSpeech recording to a measured `.wav`.

The pipeline, one module per step: audio → mel (audio.py) → model (model.py, checkpoint.py) →
export (stages/export.py) → convert (stages/convert.py) → backends (backends/) → postprocess
(stages/postprocess.py, denoiser.py) → evaluate (evaluate.py) → bench (bench.py).
Names are imported lazily, so `import waveglow_lib` stays cheap and optional packages stay optional.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "config", "STFTConfig": "config", "WorkflowConfig": "config",
    "WaveGlow": "model",
    "load_waveglow": "checkpoint", "save_waveglow": "checkpoint", "CheckpointError": "checkpoint",
    "load_wav": "audio", "mel_spectrogram": "audio", "AudioError": "audio",
    "Denoiser": "denoiser",
    "export_onnx": "stages.export",
    "get_backend": "backends", "available_backends": "backends",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
