"""Performance measurement, apart from inference (NVIDIA DeepLearningExamples' `inference_perf.py` split):
the workload (`workload.py`), the harness that times every path in one run (`harness.py`), its report
(`report.py`), the profiler view (`profile.py`), streaming latency and memory by length (`stream.py`), the
service's load test (`serve_load.py`) and a competitor keeping cores busy (`load.py`). The stages record
their own per-utterance timings (`out/timings.json`); comparisons of paths are measured here.
"""
from __future__ import annotations

from .harness import (DEFAULT_ROWS, REFERENCE, ROWS, Row, default_path, default_path_summary,
                      folded_macs_per_step, matmul_peaks, pick_auto, reference_flops_per_audio_second,
                      reference_macs_per_step, run_bench, run_throughput, throughput_table)
from .profile import profile_paths
from .report import guide_throughput_rows, render_markdown
from .workload import DEFAULT_LENGTHS, GUIDE_MEAN_SECONDS, QUICK_LENGTHS, build_model, parse_lengths, workload

__all__ = ["run_bench", "render_markdown", "throughput_table", "run_throughput", "guide_throughput_rows", "profile_paths",
           "ROWS", "DEFAULT_ROWS", "REFERENCE", "Row", "pick_auto", "default_path", "default_path_summary",
           "parse_lengths", "workload", "build_model", "matmul_peaks", "reference_macs_per_step",
           "folded_macs_per_step", "reference_flops_per_audio_second", "DEFAULT_LENGTHS", "QUICK_LENGTHS",
           "GUIDE_MEAN_SECONDS"]
