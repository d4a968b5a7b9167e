"""What this machine can do: CPU features that decide bf16/int8 speed, usable cores, load, versions."""
from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from .isa import capped_flags, isa_cap


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none), less what an ISA cap
    (`isa.ENV`) takes away."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return capped_flags(set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX): else bf16 only costs conversions."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def native_int8() -> bool:
    """True when this CPU has int8 dot products (AVX512-VNNI, AVX-VNNI or AMX-INT8) and PyTorch the API the
    int8 engine calls (`int8_api`): else int8 is not offered (falls back to bf16)."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags()) and int8_api()


def int8_api() -> bool:
    """True when this PyTorch has oneDNN's u8·s8 GEMM (`onednn.qlinear_prepack`, `qlinear_pointwise`) and
    `quantize_per_tensor` (deprecated in torch 2.x)."""
    try:
        onednn = torch.ops.onednn
        return (torch.backends.mkldnn.is_available() and hasattr(torch, "quantize_per_tensor")
                and all(hasattr(onednn, op) for op in ("qlinear_prepack", "qlinear_pointwise")))
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def usable_cpus() -> int:
    """Cores this process may run on (affinity / cgroup cpuset), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def cpu_jiffies(stat_text: str, cpus: set[int] | None = None, count_nice: bool = True) -> tuple[int, int]:
    """(busy, total) clock ticks since boot summed over `cpus` (default: all) from /proc/stat's text;
    busy = everything but idle and iowait (steal counts as busy: another guest has the core); without
    `count_nice`, also not the time of niced processes (they yield to a process of normal priority)."""
    busy = total = 0
    for line in stat_text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        ticks = [int(v) for v in rest.split()[:8]]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0) + (0 if count_nice else ticks[1])
        busy += sum(ticks) - idle
        total += sum(ticks)
    return busy, total


class CpuMeter:
    """How many cores' worth of *other* processes' work runs on this process's CPUs right now: /proc/stat's
    busy ticks over a window (niced processes' ticks left out when this one is not niced: they yield to
    it), less this process's own CPU time. `others_busy()` measures at most once per `reuse` seconds and
    returns 0.0 where /proc/stat is missing.

    The window: since the previous call, when that was at least `window` and at most `max_age` seconds
    ago — for back-to-back runs, the run just done, measured for free (others' share of the cores while
    we ran; a competitor still shows) and over more ticks than a short window has; else a fresh `window`
    seconds, slept."""

    def __init__(self, window: float = 0.05, reuse: float = 1.0, max_age: float = 10.0):
        self.window, self.reuse, self.max_age = window, reuse, max_age
        self._value: float | None = None
        self._when = -1e9
        self._last: tuple[int, float, float, int] | None = None  # the previous call's sample

    @staticmethod
    def _sample() -> tuple[int, float, float, int] | None:
        try:
            text = Path("/proc/stat").read_text()
        except OSError:
            return None
        try:
            cpus = os.sched_getaffinity(0)
        except AttributeError:  # pragma: no cover - not Linux
            cpus = None
        # a niced background job yields to us, unless we are niced too: then it competes
        count_nice = os.nice(0) > 0 if hasattr(os, "nice") else True
        busy = cpu_jiffies(text, cpus, count_nice)[0]
        return busy, time.process_time(), time.monotonic(), len(cpus) if cpus else os.cpu_count()

    def others_busy(self) -> float:
        now = time.monotonic()
        if self._value is not None and now - self._when < self.reuse:
            return self._value
        first, second = self._last, self._sample()
        if second is None:
            return 0.0
        if first is None or not self.window <= second[2] - first[2] <= self.max_age:
            time.sleep(self.window)
            first, second = second, self._sample()
        self._last = second
        ticks_per_second = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        wall = max(second[2] - first[2], 1e-6)
        busy = (second[0] - first[0]) / ticks_per_second - (second[1] - first[1])
        # ticks are counted in 1/100 s steps per core: a short window can over- or undershoot by a tick
        self._value, self._when = min(float(second[3] or 1), max(0.0, busy / wall)), second[2]
        return self._value


def cpu_signature() -> dict:
    """What decides which kernels oneDNN picks on this CPU: its model, ISA flags, torch's CPU capability
    (the engine cache's key: an entry built on another CPU is not trusted here)."""
    prefixes = ("avx", "amx", "fma", "f16c", "sse", "ssse", "vnni", "bmi")
    return {"cpu": cpu_model(), "flags": sorted(f for f in cpu_flags() if f.startswith(prefixes)),
            "capability": torch.backends.cpu.get_cpu_capability(), "isa_cap": isa_cap()}


def load_average() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_busy() -> str | None:
    """A warning when the 1-minute load exceeds the usable cores (timings then understate this machine)."""
    load = load_average()
    cores = usable_cpus()
    if load and load[0] > cores:
        return f"machine busy: load average {load[0]:.1f} on {cores} usable cores; timings are pessimistic"
    return None


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version(), "numpy": np.__version__,
                                       "torch": torch.__version__}
    for name in ("onnxruntime", "openvino", "safetensors"):
        try:
            module = __import__(name)
            versions[name] = module.__version__.split("-")[0]
        except ImportError:
            versions[name] = None
    return versions


def machine_info() -> dict:
    """CPU model, cores, the ISA features that decide bf16/int8 speed, library versions, load."""
    flags = cpu_flags()
    isa = {"AVX2": "avx2" in flags, "AVX-512": "avx512f" in flags, "AVX-512 BF16": "avx512_bf16" in flags,
           "AVX-512 VNNI": "avx512_vnni" in flags, "AVX-VNNI": "avx_vnni" in flags,
           "AMX-BF16": "amx_bf16" in flags, "AMX-INT8": "amx_int8" in flags}
    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "usable_cpus": usable_cpus(),
            "torch_threads": torch.get_num_threads(), "isa": isa, "native_bf16": native_bf16(),
            "native_int8": native_int8(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "versions": library_versions(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "isa_cap": isa_cap(),
            "load_average": load_average()}


def choose_threads(usable: int, others_busy: float, limit: int | None = None) -> int:
    """Threads for one `run`: the cores not taken by other processes (`others_busy`: cores' worth of
    other work, `CpuMeter.others_busy`), at least 1, at most `limit` (the caller's cap) and `usable`.

    Why: OpenMP's GEMMs split every op evenly across threads and wait at a barrier after each, so one
    thread sharing its core with another process makes every op as slow as that thread; one thread per
    free core avoids it."""
    cap = max(1, min(limit or usable, usable))
    free = usable - max(0.0, others_busy)
    return max(1, min(cap, math.floor(free + 0.5)))
