"""OpenVINO backend (CPU): reads the ONNX graph or the IR (.xml/.bin) that convert writes."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..convert import OV_INSTALL
from ..errors import import_optional
from .base import Backend, BackendError, ModelSpec, check_graph_io

#: our precision names → OpenVINO's INFERENCE_PRECISION_HINT
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


def import_openvino():
    return import_optional("openvino", OV_INSTALL, "the 'openvino' backend")


class OpenVinoBackend(Backend):
    """`core.compile_model` on CPU with `INFERENCE_PRECISION_HINT` f32 (exact) or bf16.

    bf16 only changes anything on CPUs with native bf16 (AVX512-BF16/AMX); elsewhere OpenVINO computes
    in f32 (the description records the precision it reports).
    """

    name = "openvino"

    def __init__(self, model_path: str | Path, spec: ModelSpec | None = None, device: str = "cpu",
                 precision: str = "fp32", threads: int | None = None) -> None:
        ov = import_openvino()
        if precision not in PRECISION_HINTS:
            raise BackendError(f"openvino backend: precision {precision!r} not supported "
                               f"(one of {', '.join(PRECISION_HINTS)})")
        if str(device or "cpu") != "cpu":
            raise BackendError(f"openvino backend: device {device!r} not supported here (cpu)")
        super().__init__(spec, precision, device)
        path = Path(model_path)
        if not path.is_file():
            raise BackendError(f"{path}: model file not found; run the export (and convert) stage first")
        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long texts
            raise BackendError(f"{path}: OpenVINO cannot read it: {str(exc).splitlines()[0]}") from None
        check_graph_io(path, [(p.get_any_name(), _dims(p.get_partial_shape())) for p in model.inputs],
                       [(p.get_any_name(), _dims(p.get_partial_shape())) for p in model.outputs], self.spec)
        config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision]}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(model, "CPU", config)
        self.output = self.compiled.output("audio")
        self.request = self.compiled.create_infer_request()
        actual = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        actual = actual.get_type_name() if hasattr(actual, "get_type_name") else str(actual)
        self.path = path
        self.description = f"openvino {ov.__version__.split('-')[0]} {path.name} CPU {actual}"

    def _run(self, mel: np.ndarray, z: np.ndarray) -> np.ndarray:
        result = self.request.infer({"mel": mel, "z": z})
        return np.array(result[self.output], dtype=np.float32, copy=True)

    def close(self) -> None:
        self.request = self.compiled = None


def _dims(partial_shape) -> list:
    if partial_shape.rank.is_dynamic:
        return []
    return [d.get_length() if d.is_static else None for d in partial_shape]
