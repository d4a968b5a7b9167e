"""ONNX Runtime backend: CPU EP; CUDA EP (onnxruntime-gpu) or CANN EP (onnxruntime-cann) when installed."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..convert import ORT_INSTALL
from ..errors import import_optional
from .base import Backend, BackendError, BackendUnavailable, ModelSpec, check_graph_io


def import_onnxruntime():
    return import_optional("onnxruntime", ORT_INSTALL, "the 'onnxruntime' backend")


def providers_for(device: str) -> list:
    """Execution providers for `device`, CPU last as fallback for unsupported nodes."""
    ort = import_onnxruntime()
    available = ort.get_available_providers()
    text = str(device or "cpu")
    kind, _, ident = text.partition(":")
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    wanted, package = {"cuda": ("CUDAExecutionProvider", "onnxruntime-gpu"),
                       "npu": ("CANNExecutionProvider", "onnxruntime-cann")}.get(kind, (None, None))
    if wanted is None:
        raise BackendError(f"onnxruntime backend: unknown device {text!r} (cpu, cuda[:N], npu[:N])")
    if wanted not in available:
        raise BackendUnavailable(f"onnxruntime backend: {wanted} is not in this onnxruntime build "
                                 f"(available: {', '.join(available)}); pip install {package}")
    return [(wanted, {"device_id": int(ident or 0)}), "CPUExecutionProvider"]


class OnnxRuntimeBackend(Backend):
    """An `InferenceSession` on the exported graph (inputs `mel`, `z`; output `audio`), fp32."""

    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, spec: ModelSpec | None = None, device: str = "cpu",
                 precision: str = "fp32", threads: int | None = None) -> None:
        ort = import_onnxruntime()
        if precision != "fp32":
            raise BackendError(f"onnxruntime backend: precision {precision!r} not supported (fp32 only; "
                               "use openvino with bf16, or torch with bf16/fp16)")
        super().__init__(spec, precision, device)
        path = Path(onnx_path)
        if not path.is_file():
            raise BackendError(f"{path}: ONNX file not found; run the export stage first")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3  # the optimised graph's shape-merge warnings are noise here
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers_for(device))
        except BackendError:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types for invalid graphs
            raise BackendError(f"{path}: onnxruntime cannot load it: {str(exc).splitlines()[0]}") from None
        check_graph_io(path, [(i.name, i.shape) for i in self.session.get_inputs()],
                       [(o.name, o.shape) for o in self.session.get_outputs()], self.spec)
        self.path = path
        self.description = (f"onnxruntime {ort.__version__} {path.name} "
                            f"{self.session.get_providers()[0]} {precision}")

    def _run(self, mel: np.ndarray, z: np.ndarray) -> np.ndarray:
        return self.session.run(["audio"], {"mel": mel, "z": z})[0]

    def close(self) -> None:
        self.session = None
