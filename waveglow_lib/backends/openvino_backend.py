"""OpenVINO backend (CPU): reads the ONNX graph or the IR (.xml/.bin) that convert writes."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..convert import OV_INSTALL
from ..errors import import_optional
from .base import Backend, BackendError, ModelSpec, check_graph_io
from .openvino_int8 import import_nncf, quantized_ir

#: our precision names → OpenVINO's INFERENCE_PRECISION_HINT (int8: NNCF's quantised graph, the operations
#: left unquantised in f32; openvino_int8.py)
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}


def import_openvino():
    return import_optional("openvino", OV_INSTALL, "the 'openvino' backend")


class OpenVinoBackend(Backend):
    """`core.compile_model` on CPU with `INFERENCE_PRECISION_HINT` f32 (exact) or bf16.

    bf16 only changes anything on CPUs with native bf16 (AVX512-BF16/AMX); elsewhere OpenVINO computes
    in f32 (the description records the precision it reports).
    int8: the graph quantised by NNCF (optional package `nncf`), calibrated on `calibration=` [(mel, z), ...]
    (z scaled by sigma, as `run` takes it), cached under `cache_dir=` (openvino_int8.py; `self.cache`
    says "hit", "built" or "rebuilt: <why>").
    """

    name = "openvino"

    def __init__(self, model_path: str | Path, spec: ModelSpec | None = None, device: str = "cpu",
                 precision: str = "fp32", threads: int | None = None, calibration=None,
                 cache_dir: str | Path | None = None) -> None:
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
        if precision == "int8":
            import_nncf()  # before any work: one line saying what to install
            if not calibration or cache_dir is None:
                raise BackendError("openvino backend: precision int8 needs calibration= [(mel, z), ...] (the mels "
                                   "NNCF calibrates on) and cache_dir= (where the quantised graph is kept); the "
                                   "bench's openvino-int8 row passes the run's mels; for int8 in a run use the "
                                   "fast backend")
        core = ov.Core()
        self.cache = None
        try:
            model = core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long texts
            raise BackendError(f"{path}: OpenVINO cannot read it: {str(exc).splitlines()[0]}") from None
        check_graph_io(path, [(p.get_any_name(), _dims(p.get_partial_shape())) for p in model.inputs],
                       [(p.get_any_name(), _dims(p.get_partial_shape())) for p in model.outputs], self.spec)
        if precision == "int8":  # checked as the graph it was made from, then quantised (or read back)
            quantized, self.cache = quantized_ir(path, calibration, cache_dir, core=core)
            model = core.read_model(str(quantized))
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
        if self.cache is not None:
            self.description += (f" + NNCF {import_nncf().__version__} int8 ({self.cache['samples']} calibration "
                                 f"windows; quantised graph: {self.cache['cache']})")

    def _run(self, mel: np.ndarray, z: np.ndarray) -> np.ndarray:
        result = self.request.infer({"mel": mel, "z": z})
        return np.array(result[self.output], dtype=np.float32, copy=True)

    def close(self) -> None:
        self.request = self.compiled = None


def _dims(partial_shape) -> list:
    if partial_shape.rank.is_dynamic:
        return []
    return [d.get_length() if d.is_static else None for d in partial_shape]
