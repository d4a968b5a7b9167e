"""A reproducible shared machine: `CpuLoad(n)` keeps n cores busy with a competitor while a `with` block
runs (`python -m waveglow_lib bench --load N`).

Each competitor is a subprocess spinning in a pure-Python loop, pinned to one core (the last n of this
process's CPUs, where the OS allows pinning), so "one core saturated" means the same on every run. They
are bounded three ways: stopped when the block ends (terminate, then kill), by their own deadline
(`max_seconds`), and when their parent process goes away.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

#: the competitor: spin until the deadline or until the parent is gone
_BUSY_LOOP = """
import os, sys, time
deadline, parent, n = time.monotonic() + float(sys.argv[1]), int(sys.argv[2]), 0
while time.monotonic() < deadline:
    n += 1
    if n % 200000 == 0 and os.getppid() != parent:
        break
"""


class CpuLoad:
    """`with CpuLoad(cores):` — `cores` busy subprocesses for the duration of the block.

    After the block, `self.summary()` says what ran: the cores asked, the CPUs they were pinned to, and
    the CPU time each competitor actually got (cores' worth over the block), read from /proc."""

    def __init__(self, cores: int, max_seconds: float = 3600.0):
        if cores < 0:
            raise ValueError(f"CpuLoad: cores must be >= 0, got {cores}")
        self.cores, self.max_seconds = int(cores), float(max_seconds)
        self.processes: list[subprocess.Popen] = []
        self.pinned: list[int | None] = []
        self.cpu_seconds: list[float | None] = []
        self.wall_seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> "CpuLoad":
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux: unpinned
            cpus = []
        self._start = time.monotonic()
        for i in range(self.cores):
            cpu = cpus[-1 - i % len(cpus)] if cpus else None
            process = subprocess.Popen([sys.executable, "-S", "-c", _BUSY_LOOP, str(self.max_seconds), str(os.getpid())],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if cpu is not None:
                try:
                    os.sched_setaffinity(process.pid, {cpu})
                except OSError:
                    cpu = None
            self.processes.append(process)
            self.pinned.append(cpu)
        return self

    def running(self) -> list[bool]:
        return [p.poll() is None for p in self.processes]

    def __exit__(self, *exc) -> None:
        self.wall_seconds = time.monotonic() - self._start
        self.cpu_seconds = [_cpu_seconds(p.pid) for p in self.processes]
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)

    def summary(self) -> dict:
        share = [None if s is None or self.wall_seconds <= 0 else round(s / self.wall_seconds, 3)
                 for s in self.cpu_seconds]
        return {"cores": self.cores, "pinned_to_cpus": self.pinned, "seconds": round(self.wall_seconds, 2),
                "competitor_core_share": share}


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a running process (Linux /proc), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None
