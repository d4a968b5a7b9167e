"""Inference backends behind one interface: `get_backend(name, ...)` → `Backend.run(mel, z) -> audio`.

The registry (`BACKENDS`) is one table: name → how to load it, the file it needs, devices, precisions.
Optional packages are imported only when their backend is asked for.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BackendError, BackendUnavailable, MissingDependency
from ..hardware import native_bf16, native_int8
from .base import Backend, ModelSpec, runs_utterances
from .om_backend import om_available


@dataclass(frozen=True)
class BackendInfo:
    """One registry row. `needs`: "model" (built from the PyTorch model) or the run-folder file it loads."""

    name: str
    module: str
    cls: str
    needs: str
    devices: str
    precisions: tuple[str, ...]
    summary: str
    #: the package whose import decides availability (None: built in)
    package: str | None = None
    install: str = ""

    def load(self):
        return getattr(importlib.import_module(f".{self.module}", __name__), self.cls)


BACKENDS: dict[str, BackendInfo] = {b.name: b for b in (
    BackendInfo("torch", "torch_backend", "TorchBackend", "model", "cpu, cuda[:N]", ("fp32", "bf16", "fp16"),
                "the PyTorch model"),
    BackendInfo("onnxruntime", "onnxruntime_backend", "OnnxRuntimeBackend", "onnx",
                "cpu, cuda[:N] (CUDA EP), npu[:N] (CANN EP)", ("fp32",), "the exported ONNX graph (mel, z)",
                "onnxruntime", "pip install onnxruntime (or onnxruntime-gpu / onnxruntime-cann)"),
    BackendInfo("openvino", "openvino_backend", "OpenVinoBackend", "onnx", "cpu", ("fp32", "bf16", "fp16", "int8"),
                "the exported ONNX graph or the OpenVINO IR", "openvino", "pip install openvino"),
    BackendInfo("om", "om_backend", "OmBackend", "om", "npu[:N]", ("fp32",), "the ATC `.om` through ais_bench"),
    BackendInfo("fast", "fast", "FastBackend", "model", "cpu", ("fp32", "bf16", "int8"),
                "our folded model on blocked GEMMs"),
)}
BACKEND_NAMES = tuple(BACKENDS)
#: `auto` on a CPU: the first usable of these, in order. `fast` is built in and needs no export, so it is
#: the pick (bench.md has the measured order); the rest are the order when it is taken out.
AUTO_CPU_ORDER = ("fast", "onnxruntime", "openvino", "torch")

__all__ = ["Backend", "BackendError", "BackendUnavailable", "MissingDependency", "ModelSpec", "BACKENDS",
           "BACKEND_NAMES", "BackendInfo", "get_backend", "available_backends", "resolve_backend", "runs_utterances"]


def _info(name: str) -> BackendInfo:
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)} or auto")
    return BACKENDS[name]


def get_backend(name: str, *, model=None, onnx_path=None, device: str = "cpu", precision: str = "fp32",
                **opts) -> Backend:
    """Load a backend once; then call `.run(mel, z)` per batch and `.close()` at the end.

    - torch, fast: `model=` a WaveGlow.
    - onnxruntime / openvino: `onnx_path=` the exported graph (openvino also takes the IR `.xml`; at
      precision int8 also `calibration=` and `cache_dir=`: NNCF's quantisation, backends/openvino_int8.py).
    - om: `om_path=` the ATC output (or an `.om` passed as onnx_path); `batch=`/`gears=` override the
      `.gears.json` convert wrote beside it.
    `spec=` (ModelSpec) tells the graph backends the model's sizes; taken from `model.config` when a model
    is given. Other keyword options: `threads=` (torch, onnxruntime, openvino, fast).
    `precision="auto"`: fast chooses int8, bf16 or fp32 behind a quality gate (backends/fast/auto.py); every
    other backend runs fp32.
    """
    info = _info(name)
    spec = opts.pop("spec", None)
    if spec is None and model is not None:
        spec = ModelSpec.from_model_config(model.config)
    if precision == "auto" and name != "fast":
        precision = "fp32"
    cls = info.load()
    if info.needs == "model":
        return cls(model, device=device, precision=precision, **opts)
    if info.needs == "om":
        om_path = opts.pop("om_path", None) or onnx_path
        if om_path is None:
            raise BackendError("om backend needs om_path= (the convert stage's .om file)")
        return cls(om_path, spec=spec, device="npu:0" if device == "cpu" else device, precision=precision, **opts)
    if onnx_path is None:
        raise BackendError(f"{name} backend needs onnx_path= (the export stage's ONNX file)")
    return cls(onnx_path, spec=spec, device=device, precision=precision, **opts)


def available_backends() -> dict[str, tuple[bool, str]]:
    """name → (usable, message): what is installed here, and what to install when it is not."""
    result: dict[str, tuple[bool, str]] = {}
    for name, info in BACKENDS.items():
        if name == "torch":
            cuda = "CUDA available" if torch.cuda.is_available() else "CPU only"
            result[name] = (True, f"torch {torch.__version__} ({cuda})")
        elif name == "fast":
            result[name] = (True, f"built in (PyTorch GEMMs; native bf16: {'yes' if native_bf16() else 'no'}, "
                                  f"int8: {'yes' if native_int8() else 'no'})")
        elif name == "om":
            result[name] = om_available()
        else:
            try:
                module = importlib.import_module(info.package)
            except ImportError:
                result[name] = (False, info.install)
                continue
            detail = module.__version__.split("-")[0]
            if name == "onnxruntime":
                detail += f" ({', '.join(module.get_available_providers())})"
            result[name] = (True, f"{info.package} {detail}")
    return result


def resolve_backend(name: str, *, device: str = "cpu", onnx_path=None, om_path=None) -> str:
    """The backend `name` stands for: itself, or for `auto` the best usable one for these files/device.

    `auto`: on an NPU device with an `.om` and ais_bench → om; on CUDA → torch; on a CPU the first usable of
    AUTO_CPU_ORDER (fast; the graph runtimes need the ONNX export, torch always works).
    """
    if name != "auto":
        return _info(name).name
    usable = {k: ok for k, (ok, _) in available_backends().items()}
    if str(device).startswith("npu") and om_path is not None and Path(om_path).is_file() and usable["om"]:
        return "om"
    if str(device).startswith("cuda"):
        return "torch"
    has_onnx = onnx_path is not None and Path(onnx_path).is_file()
    on_cpu = str(device or "cpu") == "cpu"  # an NPU without its .om falls through to the graph runtimes' errors
    for candidate in AUTO_CPU_ORDER:
        if candidate == "fast" and not on_cpu:
            continue
        if BACKENDS[candidate].needs == "model" or (has_onnx and usable.get(candidate)):
            return candidate
    return "torch"
