"""The guide's chain as library functions: preprocess → export → convert → infer → postprocess.

Each stage takes the run's `WorkflowConfig`, reads the previous stage's outputs from `runs/<name>/`,
writes its own (atomically, skipping finished work whose resume stamp is this run's, `waveglow_lib.stamps`)
and returns a summary dict. `vocode` is the side entrance: mels from elsewhere (a TTS model) straight to
wavs. `infer` and `vocode` build a job and run it on the engine `cfg.engine` names (`waveglow_lib.engines`).
"""
from __future__ import annotations

from ..checkpoint import load_waveglow
from ..config import WorkflowConfig, forced
from ..layout import CONVERT_TARGETS
from ..runlock import locked
from ..stamps import forget_checkpoints
from .convert import convert
from .export import export
from .infer import infer
from .postprocess import postprocess
from .preprocess import preprocess
from .vocode import vocode, vocode_pipe

STAGES = ("preprocess", "export", "convert", "infer", "postprocess")

__all__ = ["STAGES", "preprocess", "export", "convert", "infer", "postprocess", "run_all", "vocode", "vocode_pipe"]


@locked("run-all")
def run_all(cfg: WorkflowConfig, *, model=None, force: bool = False, convert_targets=None) -> dict:
    """Run every stage in order for `cfg` (the model is loaded once and shared); returns each summary.

    The params are saved as `runs/<name>/params.yaml` first, so the run folder says how it was made. The
    run folder's lock is held throughout (the stages take it again, re-entrantly). Infer runs on the engine
    `cfg.engine` names. `convert_targets` defaults to every target (layout.CONVERT_TARGETS). `force` redoes
    every stage's outputs and drops the run's cached checkpoint fingerprints, so nothing an earlier run
    computed is trusted.
    """
    force = forced(force)  # `run --force` reaches the notebooks' stage calls
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(cfg.layout.params)
    if force:
        forget_checkpoints(cfg)
    if model is None:
        model = load_waveglow(cfg.checkpoint_path)
    results = {"preprocess": preprocess(cfg, force=force),
               "export": export(cfg, model=model, force=force)}
    targets = convert_targets if convert_targets is not None else CONVERT_TARGETS
    # every stage checks its inputs against the model this run vocodes with
    results["convert"] = convert(cfg, targets=targets, force=force, model=model) if targets else {}
    results["infer"] = infer(cfg, model=model, force=force)
    results["postprocess"] = postprocess(cfg, model=model, force=force)
    return results
