"""What this machine can do: CPU features that decide bf16/int8 speed, usable cores, load, versions."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import torch


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
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
    """True when this CPU has int8 dot products (AVX512-VNNI, AVX-VNNI or AMX-INT8) and PyTorch has the
    oneDNN quantized engine and API (deprecated in torch 2.x): else int8 is not offered (falls back to bf16)."""
    engines = torch.backends.quantized.supported_engines
    api = hasattr(torch, "quantize_per_channel") and hasattr(torch.ops.quantized, "linear_dynamic")  # deprecated
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags()) and "onednn" in engines and api


def usable_cpus() -> int:
    """Cores this process may run on (affinity / cgroup cpuset), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


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
    for name in ("onnxruntime", "openvino"):
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
            "load_average": load_average()}
