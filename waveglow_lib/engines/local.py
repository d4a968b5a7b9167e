"""The local engine: the infer stage's own loop, every batch in this process (the default, `engine: local`).

It lives with the stage (`stages.infer.run_local`), because a stage may not import an engine and must run
on its own; this module names it for the engine table. Both engines share the per-batch work
(`stages.infer.vocode_batch`) and the writing (`InferJob.write`).
"""
from __future__ import annotations

from ..stages.infer import run_local as run

__all__ = ["run"]
