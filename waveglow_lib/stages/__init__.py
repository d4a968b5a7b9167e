"""The guide's chain as library functions: preprocess → export → convert → infer → postprocess.

Each stage takes the run's `WorkflowConfig`, reads the previous stage's outputs from `runs/<name>/`,
writes its own (atomically, skipping finished work) and returns a summary dict.
"""
from __future__ import annotations

from ..config import WorkflowConfig
from .convert import convert
from .export import export, export_onnx
from .infer import infer, utterance_noise
from .postprocess import postprocess
from .preprocess import load_manifest, preprocess

STAGES = ("preprocess", "export", "convert", "infer", "postprocess")

__all__ = ["STAGES", "preprocess", "export", "export_onnx", "convert", "infer", "postprocess", "run_all",
           "utterance_noise", "load_manifest"]


def run_all(cfg: WorkflowConfig, *, model=None, force: bool = False, convert_targets=None) -> dict:
    """Run every stage in order for `cfg` (the model is loaded once and shared); returns each summary.

    The params are saved as `runs/<name>/params.yaml` first, so the run folder says how it was made.
    `convert_targets` defaults to ("atc", "openvino", "onnxruntime").
    """
    from ..checkpoint import load_waveglow

    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(cfg.run_dir / "params.yaml")
    if model is None:
        model = load_waveglow(cfg.checkpoint_path)
    results = {"preprocess": preprocess(cfg, force=force),
               "export": export(cfg, model=model, force=force)}
    targets = convert_targets if convert_targets is not None else ("atc", "openvino", "onnxruntime")
    results["convert"] = convert(cfg, targets=targets, force=force) if targets else {}
    results["infer"] = infer(cfg, model=model, force=force)
    results["postprocess"] = postprocess(cfg, model=model, force=force)
    return results
