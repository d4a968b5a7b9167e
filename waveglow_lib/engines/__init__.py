"""Engines: where the infer stage's batches run — this process (`local`) or a Ray cluster (`ray`).

An engine takes a prepared `InferJob` (`stages.infer.prepare_infer`: the work items still to do, how to
read each one's mel, the batch plan, the run folder's `timings.json`) and returns the job's summary.
A stage with other inputs prepares its own job — `prepare_infer(items=..., read_mel=...)`, or a subclass
with its own writer like `stages.vocode.prepare_vocode` for a folder of TTS mels — and calls `run_job`; the
outputs, the skipping of finished items and the timings are the same on every engine.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .. import stages
from ..config import WorkflowConfig
from ..runlock import locked
from ..stages.infer import InferJob, prepare_infer
from . import local, ray

#: engine name (`WorkflowConfig.engine`) → run(cfg, job, *, model=None) -> summary
ENGINES: dict[str, Callable[..., dict]] = {"local": local.run, "ray": ray.run}

__all__ = ["ENGINES", "infer", "run_all", "run_job", "vocode"]


def run_job(cfg: WorkflowConfig, job: InferJob, *, model=None) -> dict:
    """Run a prepared job on `cfg.engine`."""
    return ENGINES[cfg.engine](cfg, job, model=model)


@locked("infer")
def infer(cfg: WorkflowConfig, *, model=None, out_dir: str | Path | None = None, force: bool = False) -> dict:
    """The infer stage (`mel/manifest.json` → `out/`) on the engine `cfg.engine` names."""
    job = prepare_infer(cfg, model=model, out_dir=out_dir, force=force, engine=cfg.engine)
    return run_job(cfg, job, model=model)


def vocode(cfg: WorkflowConfig, mels: str | Path, *, model=None, out_dir: str | Path | None = None,
           force: bool = False) -> dict:
    """The vocode stage (a folder of TTS mels → wavs) on the engine `cfg.engine` names."""
    return stages.vocode(cfg, mels, model=model, out_dir=out_dir, force=force, run_with=run_job)


def run_all(cfg: WorkflowConfig, *, model=None, force: bool = False, convert_targets=None) -> dict:
    """`stages.run_all` with its infer stage on `cfg.engine`."""
    return stages.run_all(cfg, model=model, force=force, convert_targets=convert_targets, infer_with=infer)
