"""Where the time goes: torch.profiler on the reference and the fast path, OpenVINO's perf counters."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from ..backends.fast import FastEngine
from ..errors import import_optional, MissingDependency
from ..config import WorkflowConfig
from ..hardware import native_bf16
from ..layout import BENCH_MODELS_DIR
from .workload import exported_graph


def profile_paths(model, frames: int = 172, threads: int | None = None,
                  cache_dir: str | Path = Path(WorkflowConfig.runs_dir) / BENCH_MODELS_DIR, top: int = 8) -> dict:
    """Where the time goes, batch 1, one `frames`-frame mel: torch.profiler on the reference and on the
    fast path (self CPU time per op), OpenVINO's per-node perf counters (bf16) grouped by node type."""
    rng = np.random.default_rng(0)
    mel = (rng.standard_normal((1, model.config.n_mel_channels, frames)) - 5.0).astype(np.float32)
    z = (0.6 * rng.standard_normal(model.noise_shape(1, frames))).astype(np.float32)
    out = {"frames": frames}

    def torch_table(fn):
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events) or 1
        return {"wall_seconds": round(wall, 3),
                "top": [{"op": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 1),
                         "percent": round(100 * e.self_cpu_time_total / total, 1)} for e in events[:top]]}

    with torch.inference_mode():
        out["reference_torch_fp32"] = torch_table(lambda: model.infer(torch.from_numpy(mel), 1.0, torch.from_numpy(z)))
    engine = FastEngine(model, "bf16" if native_bf16() else "fp32", threads=threads)
    out[f"fast_{engine.precision}"] = torch_table(lambda: engine.run(mel, z))
    try:
        ov = import_optional("openvino", "pip install openvino", "OpenVINO profiling")
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(exported_graph(model, "model", Path(cache_dir)))), "CPU",
                                      {"INFERENCE_PRECISION_HINT": "bf16" if native_bf16() else "f32",
                                       "PERF_COUNT": True})
        request = compiled.create_infer_request()
        request.infer({"mel": mel, "z": z})
        t0 = time.perf_counter()
        request.infer({"mel": mel, "z": z})
        wall = time.perf_counter() - t0
        groups: dict[tuple, list] = {}
        for info in request.get_profiling_info():
            groups.setdefault((info.node_type, info.exec_type), []).append(info.real_time.total_seconds())
        total = sum(sum(v) for v in groups.values()) or 1
        ranked = sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:top]
        out["openvino"] = {"wall_seconds": round(wall, 3), "top": [
            {"op": f"{k[0]} ({k[1]})", "calls": len(v), "self_ms": round(1e3 * sum(v), 1),
             "percent": round(100 * sum(v) / total, 1)} for k, v in ranked]}
    except MissingDependency:
        out["openvino"] = None
    return out
