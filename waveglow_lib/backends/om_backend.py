"""Ascend `.om` backend through ais_bench's Python API (one session, many calls; no subprocess per file).

`ais_bench` is not on PyPI: it comes as two wheels built from Ascend's tools repository
(`ais-bench_workload/tool/ais_bench`: `aclruntime-*.whl` and `ais_bench-*-py3-none-any.whl`), or via
`pip install msit` + `msit install benchmark`, and needs CANN (`source /usr/local/Ascend/ascend-toolkit/set_env.sh`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..records import GearsRecord, read_record
from ..layout import gears_file
from .base import Backend, BackendError, BackendUnavailable, ModelSpec

INSTALL_HINT = (
    "the 'om' backend needs ais_bench (InferSession), which is not on PyPI: build/install the wheels "
    "aclruntime-*.whl and ais_bench-*-py3-none-any.whl from Ascend's tools repository "
    "(ais-bench_workload/tool/ais_bench), or `pip install msit && msit install benchmark`; both need CANN "
    "(source /usr/local/Ascend/ascend-toolkit/set_env.sh). Or use backend onnxruntime/openvino/torch.")


def import_infer_session():
    """`ais_bench.infer.interface.InferSession`, or BackendUnavailable saying where to get it."""
    try:
        from ais_bench.infer.interface import InferSession
    except ImportError as exc:
        raise BackendUnavailable(f"{INSTALL_HINT} (import error: {exc})") from None
    return InferSession


def om_available() -> tuple[bool, str]:
    try:
        import_infer_session()
    except BackendUnavailable as exc:
        return False, str(exc)
    return True, "ais_bench InferSession importable (an NPU and an .om file are still needed)"


def parse_device_id(device: str) -> int:
    """'npu', 'npu:1', '1' → device id; the guide uses device 0."""
    text = str(device)
    if text in ("cpu", "npu", "auto", ""):
        return 0
    _, _, ident = text.rpartition(":")
    try:
        return int(ident)
    except ValueError:
        raise BackendError(f"om backend: cannot read an NPU device id from device={device!r} (use npu:<id>)") \
            from None


class OmBackend(Backend):
    """Runs the ATC-compiled model with `InferSession.infer([mel, z], mode="dymdims")`.

    The `.om` has its batch size and mel-length gears baked in (`--input_shape`, `--dynamic_dims`);
    they are read from the `.gears.json` that convert writes (or passed as `batch` / `gears`), so the infer
    stage pads each batch to a gear. Per-call device times (ms) from `summary().exec_time_list` are kept in
    `self.device_times_ms`.
    """

    name = "om"

    def __init__(self, om_path: str | Path, spec: ModelSpec | None = None, device: str = "npu:0",
                 precision: str = "fp32", batch: int | None = None, gears: Sequence[int] | None = None) -> None:
        super().__init__(spec, precision, device)
        om_path = Path(om_path)
        if om_path.suffix != ".om":
            raise BackendError(f"{om_path}: the om backend needs an .om file made by atc (see the convert stage)")
        if not om_path.is_file():
            raise BackendError(f"{om_path}: .om file not found; run the convert stage where atc is installed")
        InferSession = import_infer_session()
        meta = read_record(gears_file(om_path), GearsRecord, "the gears the .om was built for (batch, mel_lengths)",
                           damaged="refuse", advice="run the convert stage again")
        self.fixed_batch = int(batch or meta.get("batch", 1))
        lengths = gears if gears is not None else meta.get("mel_lengths")
        self.gear_lengths = sorted(int(g) for g in lengths) if lengths else None
        self.om_path = om_path
        self.device_id = parse_device_id(device)
        self.session = InferSession(self.device_id, str(om_path))
        self.device_times_ms: list[float] = []
        self.description = f"om {om_path.name} on npu:{self.device_id} (batch {self.fixed_batch})"

    def _run(self, mel: np.ndarray, z: np.ndarray) -> np.ndarray:
        if self.fixed_batch and mel.shape[0] != self.fixed_batch:
            raise BackendError(f"{self.om_path}: compiled for batch {self.fixed_batch}, got batch {mel.shape[0]}")
        if self.gear_lengths and mel.shape[2] not in self.gear_lengths:
            raise BackendError(f"{self.om_path}: mel length {mel.shape[2]} is not one of its gears "
                               f"{self.gear_lengths}")
        outputs = self.session.infer([mel, z], mode="dymdims")
        times = self.exec_times_ms()
        if times:
            self.device_times_ms.append(float(times[-1]))
        return np.asarray(outputs[0], dtype=np.float32)

    def exec_times_ms(self) -> list[float]:
        """Device time per call so far; older ais_bench releases spell `summary()` as `sumary()`."""
        summary = getattr(self.session, "summary", None) or getattr(self.session, "sumary", None)
        if summary is None:
            return []
        return list(getattr(summary(), "exec_time_list", []) or [])

    def close(self) -> None:
        session, self.session = getattr(self, "session", None), None
        if session is None:
            return
        # the release call is `finalize()` in newer ais_bench and `free_resource()` in older ones
        for method in ("finalize", "free_resource"):
            if hasattr(session, method):
                getattr(session, method)()
                return
