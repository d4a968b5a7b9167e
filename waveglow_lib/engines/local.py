"""The local engine (`engine: local`, the default): every batch of a job in this process.

It opens the job's backend once (or runs on one it is given, which it does not close), plans the batches
(`InferJob.batches`: length-grouped, longest first), and for each runs `jobs.vocode_batch` and writes the
result at once (`InferJob.write`), so a crash loses only the batch in flight.
"""
from __future__ import annotations

from tqdm.auto import tqdm

from ..config import WorkflowConfig
from ..jobs import InferJob, backend_info, open_backend, vocode_batch

__all__ = ["run", "run_batches"]


def run_batches(job: InferJob, backend) -> None:
    """Every batch of the plan through `backend` in this process, each written as soon as it finishes."""
    # in seconds of audio, moving inside a long utterance too (chunk by chunk); nothing to do: no empty bar
    # (the notebook says the stage was skipped)
    # (counted in samples, shown in seconds: unit_scale)
    total = sum(u.frames for u in job.todo) * job.settings.model_config.hop_length
    with tqdm(total=total, unit_scale=1 / job.rate, desc=f"infer ({getattr(backend, 'name', '-')})",
              bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s audio [{elapsed}<{remaining}]",
              disable=not job.todo) as bar:
        for index, batch in enumerate(job.batches()):
            job.write(index, vocode_batch(backend, job.settings, batch, stream=job.stream_writer,
                                          progress=bar.update))


def run(cfg: WorkflowConfig, job: InferJob, *, model=None, backend=None) -> dict:
    """Open the backend (unless given; a given one is not closed), run `job`, return its summary."""
    job.engine = "local"
    own_backend = backend is None
    if own_backend and job.todo:
        backend = open_backend(cfg, model=model, model_config=job.settings.model_config, name=job.backend)
    try:
        job.start(backend_info(backend) if backend is not None else None)
        run_batches(job, backend)
    finally:
        if own_backend and backend is not None:
            backend.close()
    return job.summary()
