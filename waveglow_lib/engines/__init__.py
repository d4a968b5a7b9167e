"""Engines: where a job's batches run — this process (`local`) or a Ray cluster (`ray`).

An engine takes a prepared job (`waveglow_lib.jobs.InferJob`: the work items still to do, how to read
each one's mel, the batch plan, the output folder's record), runs `jobs.vocode_batch` per batch and
writes each result through the job, and returns the job's summary; the outputs, the skipping of finished
items and the timings are the same on every engine. Engines know nothing of stages: the stages
(`waveglow_lib.stages.infer`, `.vocode`, `.run_all`) build the jobs and run them through `run_job`.
"""
from __future__ import annotations

from typing import Callable

from ..config import WorkflowConfig
from ..jobs import InferJob
from . import local, ray

#: engine name (`WorkflowConfig.engine`) → run(cfg, job, *, model=None) -> summary
ENGINES: dict[str, Callable[..., dict]] = {"local": local.run, "ray": ray.run}

__all__ = ["ENGINES", "run_job"]


def run_job(cfg: WorkflowConfig, job: InferJob, *, model=None, backend=None) -> dict:
    """Run a prepared job on `cfg.engine`; on an opened `backend` (not closed here), in this process."""
    if backend is not None:
        return local.run(cfg, job, model=model, backend=backend)
    return ENGINES[cfg.engine](cfg, job, model=model)
