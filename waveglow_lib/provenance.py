"""Where a run's numbers come from: the checkpoint (file, fingerprint, size, whether it is the bundled
demo model), the backend and precision the infer stage actually used, the machine and the commit.

`evaluate.collect_metrics` merges `run_provenance(cfg)` into metrics.json, and the report's summary reads
it back, so a metrics file says on its own which model and which code made it.
"""
from __future__ import annotations

import hashlib
import os
import platform
import signal
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import DEMO_MODEL_PATH, PACKAGE_DIR, WorkflowConfig
from .hardware import cpu_model, usable_cpus
from .records import JobRecord, read_record


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file read in chunks (the official checkpoint is ~650 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_info(cfg: WorkflowConfig) -> dict[str, Any]:
    """The checkpoint's path, sha256, size, and whether it is the bundled demo model (by content,
    so a copy of the demo file elsewhere is recognised too)."""
    path = cfg.checkpoint_path or DEMO_MODEL_PATH
    info: dict[str, Any] = {"path": str(path), "file": Path(path).name}
    if not Path(path).is_file():
        info.update(sha256=None, size_bytes=None, is_demo_model=cfg.checkpoint == "demo",
                    note=f"{path}: checkpoint file not found when the metrics were written")
        return info
    sha = file_sha256(path)
    demo_sha = file_sha256(DEMO_MODEL_PATH) if DEMO_MODEL_PATH.is_file() else None
    info.update(sha256=sha, size_bytes=Path(path).stat().st_size, is_demo_model=sha == demo_sha)
    return info


def machine() -> dict[str, Any]:
    """CPU model and core counts (what the speed figures depend on), OS and Python."""
    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "usable_cpus": usable_cpus(),
            "hostname": platform.node(), "system": f"{platform.system()} {platform.release()}",
            "python": platform.python_version()}


#: the commit the runner worked out once, handed to its notebook kernels (they inherit the environment)
COMMIT_ENV = "WAVEGLOW_COMMIT"
#: bound on the dirty check: `git status` runs the nbstripout clean filter (a Python start) for every notebook
#: whose file stat changed (docs/benchmarks.md, "Figures behind constants", has what it took)
DIRTY_CHECK_SECONDS = 30


def _git(args: list[str], where: str | Path, timeout: float) -> subprocess.CompletedProcess:
    """`git args` in `where`; on timeout its whole process group (the filters it started too) is killed."""
    proc = subprocess.Popen(["git", *args], cwd=where, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def git_commit(where: str | Path | None = None) -> str:
    """The commit of the code that ran: the hash, "+dirty" when it had uncommitted changes, "+dirty?" when
    that check did not finish within DIRTY_CHECK_SECONDS; "unknown" outside a git checkout.

    Default: this package's repository (found from the package, not the working directory), or the value
    of $WAVEGLOW_COMMIT when the runner set it for its notebooks (worked out once per run)."""
    if where is None:
        if os.environ.get(COMMIT_ENV):
            return os.environ[COMMIT_ENV]
        where = PACKAGE_DIR
    try:
        head = _git(["rev-parse", "HEAD"], where, timeout=10)  # reads refs only: no filters run
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0 or not head.stdout.strip():
        return "unknown"
    try:  # a slow or failing dirty check must not cost the hash
        dirty = _git(["status", "--porcelain", "--untracked-files=no"], where, timeout=DIRTY_CHECK_SECONDS)
    except (OSError, subprocess.SubprocessError):
        return head.stdout.strip() + "+dirty?"
    return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def read_timings(path: str | Path) -> dict[str, Any]:
    """The infer stage's out/timings.json read through the infer job's own model of it (`records.JobRecord`)."""
    return read_record(path, JobRecord, "the infer stage's settings and timings", damaged="refuse", required=True)


def backend_used(cfg: WorkflowConfig) -> dict[str, Any]:
    """What the infer stage ran (what `auto` became, and the precision probe's verdict), from out/timings.json."""
    path = cfg.layout.timings
    if not path.is_file():
        return {}
    settings = read_timings(path).get("settings") or {}
    keys = ("backend_used", "precision_used", "precision_probe")
    return {k: settings[k] for k in keys if settings.get(k) is not None}


def run_provenance(cfg: WorkflowConfig) -> dict[str, Any]:
    """The provenance fields of metrics.json: checkpoint, backend/precision used, machine, commit, date."""
    return {"checkpoint": checkpoint_info(cfg),
            "backend_requested": cfg.backend, "precision_requested": cfg.precision,
            **backend_used(cfg),
            "machine": machine(),
            "commit": git_commit(),
            "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
