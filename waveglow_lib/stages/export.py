"""Stage 2, export: the run's model → `runs/<name>/onnx/waveglow.onnx` (see `waveglow_lib.export`)."""
from __future__ import annotations

import json

from ..checkpoint import load_waveglow
from ..config import WorkflowConfig
from ..export import export_onnx
from ..io import atomic_write_json

__all__ = ["export", "export_onnx"]


def export(cfg: WorkflowConfig, *, model=None, guide_variant: bool = False, force: bool = False) -> dict:
    """Export the run's model to `runs/<name>/onnx/waveglow.onnx` (and, with `guide_variant`, the
    guide's `WaveGlow_onnx.onnx`). Skipped when an export with the same checkpoint and opset exists."""
    layout = cfg.layout
    targets = [("noise_input", layout.onnx)]
    if guide_variant:
        targets.append(("guide", layout.guide_onnx))
    results = {}
    for variant, path in targets:
        info_path = path.with_suffix(".json")
        stamp = {"checkpoint": cfg.checkpoint, "opset": cfg.opset, "sigma": cfg.sigma if variant == "guide" else None}
        if not force and path.is_file() and info_path.is_file():
            info = json.loads(info_path.read_text())
            if info.get("stamp") == stamp:
                results[variant] = {**info, "status": "skipped (up to date)"}
                continue
        if model is None:
            model = load_waveglow(cfg.checkpoint_path)
        info = export_onnx(model, path, opset=cfg.opset, variant=variant, sigma=cfg.sigma, seed=cfg.seed)
        info["stamp"] = stamp
        atomic_write_json(info_path, info)
        results[variant] = {**info, "status": "exported"}
    return results
