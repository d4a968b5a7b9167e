"""Inference backends behind one interface: `get_backend(name, ...)` → `Backend.run(mel, z) -> audio`.

| name         | runs                         | devices                        | precisions        |
|--------------|------------------------------|--------------------------------|-------------------|
| torch        | the PyTorch model            | cpu, cuda[:N]                  | fp32, bf16, fp16  |
| onnxruntime  | exported ONNX (mel, z)       | cpu, cuda[:N] (CUDA EP), npu[:N] (CANN EP) | fp32  |
| openvino     | exported ONNX or OpenVINO IR | cpu                            | fp32, bf16 (fp16) |
| om           | ATC `.om` via ais_bench      | npu[:N]                        | as compiled       |
| fast         | folded model, blocked GEMMs  | cpu (fast.py)                  | fp32, bf16        |

Optional packages are imported only when their backend is asked for.
"""
from __future__ import annotations

from pathlib import Path

from .base import (GUIDE_INPUTS, GUIDE_OUTPUT, ONNX_INPUTS, ONNX_OUTPUT, Backend, BackendError,
                   BackendUnavailable, ModelSpec)

BACKEND_NAMES = ("torch", "onnxruntime", "openvino", "om", "fast")
#: `auto` on a CPU: the first usable of these, in order. `fast` is built in and needs no export, so it is the
#: pick; the rest are the order when it is taken out. Measured (bench.py, same run, 2 EPYC cores, batch 1):
#: official architecture fast int8 1.23x real time, fast bf16 0.86, OpenVINO bf16 0.60, ONNX Runtime fp32
#: 0.42, PyTorch fp32 0.37; demo model fast bf16 27x, fast fp32 22x, ONNX Runtime 11x, OpenVINO 9x, PyTorch 8x.
AUTO_CPU_ORDER = ("fast", "onnxruntime", "openvino", "torch")

__all__ = ["Backend", "BackendError", "BackendUnavailable", "ModelSpec", "BACKEND_NAMES", "get_backend",
           "available_backends", "resolve_backend", "ONNX_INPUTS", "ONNX_OUTPUT", "GUIDE_INPUTS", "GUIDE_OUTPUT"]


def get_backend(name: str, *, model=None, onnx_path=None, device: str = "cpu", precision: str = "fp32",
                **opts) -> Backend:
    """Load a backend once; then call `.run(mel, z)` per batch and `.close()` at the end.

    - torch: `model=` a WaveGlow.
    - onnxruntime / openvino: `onnx_path=` the exported graph (openvino also takes the IR `.xml`).
    - om: `om_path=` the ATC output (or an `.om` passed as onnx_path); `batch=`/`gears=` override the
      `.gears.json` convert wrote beside it.
    `spec=` (ModelSpec) tells the graph backends the model's sizes; taken from `model.config` when a model
    is given. Other keyword options: `threads=` (torch, onnxruntime, openvino, fast).
    `precision="auto"`: fast chooses int8, bf16 or fp32 behind a quality gate (fast.auto_engine); every
    other backend runs fp32.
    """
    spec = opts.pop("spec", None)
    if spec is None and model is not None:
        spec = ModelSpec.from_model_config(model.config)
    if precision == "auto" and name != "fast":
        precision = "fp32"
    if name == "fast":  # needs model=, like torch
        from .fast_backend import FastBackend

        return FastBackend(model, device=device, precision=precision, **opts)
    if name == "torch":
        from .torch_backend import TorchBackend

        return TorchBackend(model, device=device, precision=precision, **opts)
    if name in ("onnxruntime", "openvino"):
        if onnx_path is None:
            raise BackendError(f"{name} backend needs onnx_path= (the export stage's ONNX file)")
        if name == "onnxruntime":
            from .onnxruntime_backend import OnnxRuntimeBackend as cls
        else:
            from .openvino_backend import OpenVinoBackend as cls
        return cls(onnx_path, spec=spec, device=device, precision=precision, **opts)
    if name == "om":
        from .om_backend import OmBackend

        om_path = opts.pop("om_path", None) or onnx_path
        if om_path is None:
            raise BackendError("om backend needs om_path= (the convert stage's .om file)")
        if device == "cpu":
            device = "npu:0"
        return OmBackend(om_path, spec=spec, device=device, precision=precision, **opts)
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)} or auto")


def available_backends() -> dict[str, tuple[bool, str]]:
    """name → (usable, message): what is installed here, and what to install when it is not."""
    result: dict[str, tuple[bool, str]] = {}
    try:
        import torch

        cuda = "CUDA available" if torch.cuda.is_available() else "CPU only"
        result["torch"] = (True, f"torch {torch.__version__} ({cuda})")
    except ImportError:  # pragma: no cover - torch is a hard dependency
        result["torch"] = (False, "pip install torch")
    try:
        import onnxruntime

        result["onnxruntime"] = (True, f"onnxruntime {onnxruntime.__version__} "
                                       f"({', '.join(onnxruntime.get_available_providers())})")
    except ImportError:
        result["onnxruntime"] = (False, "pip install onnxruntime (or onnxruntime-gpu / onnxruntime-cann)")
    try:
        import openvino

        result["openvino"] = (True, f"openvino {openvino.__version__.split('-')[0]}")
    except ImportError:
        result["openvino"] = (False, "pip install openvino")
    from ..fast import native_bf16

    result["fast"] = (True, f"built in (PyTorch GEMMs; native bf16: {'yes' if native_bf16() else 'no, runs fp32'})")
    from .om_backend import om_available

    result["om"] = om_available()
    return result


def resolve_backend(name: str, *, device: str = "cpu", onnx_path=None, om_path=None) -> str:
    """The backend `name` stands for: itself, or for `auto` the best usable one for these files/device.

    `auto`: on an NPU device with an `.om` and ais_bench → om; on CUDA → torch; on a CPU the first usable of
    AUTO_CPU_ORDER (fast; the graph runtimes need the ONNX export, torch always works).
    """
    if name != "auto":
        if name not in BACKEND_NAMES:
            raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)} or auto")
        return name
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
        if candidate in ("fast", "torch") or (has_onnx and usable.get(candidate)):
            return candidate
    return "torch"
