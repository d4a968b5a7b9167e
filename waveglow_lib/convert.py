"""The offline compile step for each target (the `convert` stage runs these on a run folder).

- Ascend: the `atc` command of the guide (framework 5, `--input_shape` with -1, `--dynamic_dims` gears,
  `--soc_version`), for our two-input graph (mel, z). Gear policies: `exact` (one gear per distinct mel
  length, as the guide), `buckets` (lengths rounded up to `n_buckets` sizes chosen to minimise padding;
  ATC accepts at most 100 gears) and `chunks` (buckets up to the chunk window plus the window itself:
  longer utterances run in chunks of that window, so a few gears cover any length).
- CPU: an OpenVINO IR (`.xml/.bin`) and an ONNX Runtime optimised graph, the same "compile once" step.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .config import ModelConfig
from .errors import ConfigError, ConvertError, DataError, import_optional
from .io import replace_file
from .layout import record_path
from .records import ExportRecord, read_record
from .export import ONNX_INPUTS

#: ATC's limit on the number of `--dynamic_dims` gears
MAX_GEARS = 100

ORT_INSTALL = "pip install onnxruntime (or onnxruntime-gpu for CUDA, onnxruntime-cann for Ascend)"
OV_INSTALL = "pip install openvino"


# --- gears -------------------------------------------------------------------------------------
def bucket_lengths(lengths: Iterable[int], n_buckets: int) -> list[int]:
    """At most `n_buckets` gear lengths covering `lengths`, chosen to minimise the total padded frames.

    Each utterance is padded to the smallest gear >= its length; the largest length is always a gear.
    Exact 1-D optimal partition (dynamic programming over the sorted distinct lengths).
    """
    values, counts = np.unique(np.asarray(list(lengths), dtype=np.int64), return_counts=True)
    if values.size == 0:
        raise ConvertError("no mel lengths to build gears from (empty manifest?)")
    if n_buckets < 1:
        raise ConvertError(f"n_buckets must be >= 1, got {n_buckets}")
    n, k = values.size, min(n_buckets, values.size)
    if k == n:
        return values.tolist()
    cum_count = np.concatenate([[0], np.cumsum(counts)])
    cum_sum = np.concatenate([[0], np.cumsum(counts * values)])
    inf = np.iinfo(np.int64).max // 4
    # best[m][j]: least padding for values[:j+1] with m+1 buckets, the last one topped at values[j]
    best = np.full((k, n), inf, dtype=np.int64)
    choice = np.zeros((k, n), dtype=np.int64)
    best[0] = values * cum_count[1:] - cum_sum[1:]
    for m in range(1, k):
        for j in range(m, n):
            i = np.arange(m, j + 1)  # first value index of the last bucket
            cost = best[m - 1, i - 1] + values[j] * (cum_count[j + 1] - cum_count[i]) - (cum_sum[j + 1] - cum_sum[i])
            pick = int(np.argmin(cost))
            best[m, j], choice[m, j] = cost[pick], i[pick]
    gears, j = [], n - 1
    for m in range(k - 1, -1, -1):
        gears.append(int(values[j]))
        if m:
            j = int(choice[m, j]) - 1
    return sorted(gears)


def mel_gears(lengths: Iterable[int], policy: str = "exact", n_buckets: int = 8,
              chunk_window: int | None = None) -> list[int]:
    """Gear lengths for `--dynamic_dims`: `exact` = every distinct length, `buckets` = bucket_lengths,
    `chunks` = bucket_lengths of the lengths capped at `chunk_window` (`batching.chunk_window`: a chunk
    and its context), plus that window: utterances longer than it are vocoded in chunks of it."""
    lengths = [int(v) for v in lengths]
    if not lengths:
        raise ConvertError("no mel lengths to build gears from (empty manifest?)")
    if policy == "chunks":
        if not chunk_window or chunk_window < 1:
            raise ConvertError("gear_policy chunks needs chunk_frames > 0 (the chunk size the gears are built for)")
        if n_buckets > MAX_GEARS - 2:
            raise ConvertError(f"n_buckets={n_buckets}: ATC allows at most {MAX_GEARS} gears")
        return sorted(set(bucket_lengths([min(n, chunk_window) for n in lengths], n_buckets)) | {chunk_window})
    if policy == "exact":
        gears = sorted(set(lengths))
    elif policy == "buckets":
        if n_buckets > MAX_GEARS:
            raise ConvertError(f"n_buckets={n_buckets}: ATC allows at most {MAX_GEARS} gears")
        gears = bucket_lengths(lengths, n_buckets)
    else:
        raise ConvertError(f"gear_policy {policy!r} is not one of exact, buckets, chunks")
    if len(gears) > MAX_GEARS:
        raise ConvertError(f"{len(gears)} distinct mel lengths, but ATC's --dynamic_dims allows at most "
                           f"{MAX_GEARS} gears: use gear_policy=buckets (n_buckets <= {MAX_GEARS})")
    return gears


def padding_overhead(lengths: Sequence[int], gears: Sequence[int]) -> float:
    """Fraction of extra frames computed when every utterance is padded to its gear (an utterance longer
    than every gear is chunked: counted at the largest gear's padding, chunk context not included)."""
    gears = sorted(gears)
    lengths = [min(n, gears[-1]) for n in lengths]
    padded = sum(min(g for g in gears if g >= n) for n in lengths)
    return padded / max(1, sum(lengths)) - 1.0


# --- the atc command -----------------------------------------------------------------------------
def atc_command(onnx_path: str | Path, output: str | Path, gears: Sequence[int], *, batch: int = 1,
                n_mel: int = ModelConfig().n_mel_channels, n_group: int = ModelConfig().n_group,
                hop_length: int = ModelConfig().hop_length, soc_version: str = "Ascend310P3",
                inputs: Sequence[str] = ONNX_INPUTS, log: str = "debug") -> list[str]:
    """argv of `atc` for the graph `onnx_path` → `<output>.om`, one gear per mel length in `gears`.

    With inputs ("mel", "z") each gear lists both dynamic sizes in input order, the noise length being
    `frames * hop_length / n_group` (32 × frames for the official model); with ("mel",) this is the guide's
    command for its mel-only graph.
    """
    if len(gears) > MAX_GEARS:
        raise ConvertError(f"{len(gears)} gears: ATC's --dynamic_dims allows at most {MAX_GEARS}")
    if hop_length % n_group:
        raise ConvertError(f"hop_length {hop_length} is not a multiple of n_group {n_group}")
    shapes = {"mel": f"{batch},{n_mel},-1", "z": f"{batch},{n_group},-1"}
    unknown = [name for name in inputs if name not in shapes]
    if unknown:
        raise ConvertError(f"unknown graph inputs {unknown}; expected mel and z")
    per_input = {"mel": lambda t: t, "z": lambda t: t * hop_length // n_group}
    dims = ";".join(",".join(str(per_input[name](int(t))) for name in inputs) for t in sorted(gears))
    return ["atc", f"--model={onnx_path}", f"--output={output}",
            "--input_shape=" + ";".join(f"{name}:{shapes[name]}" for name in inputs),
            "--framework=5", "--input_format=ND", f"--soc_version={soc_version}", f"--log={log}",
            f"--dynamic_dims={dims}"]


def format_command(argv: Sequence[str]) -> str:
    """One shell line, quoted the way the guide writes it (`--key="value"` only where needed)."""
    return " ".join(_quote_arg(arg) for arg in argv)


_SAFE = re.compile(r"^[A-Za-z0-9_./+@%-]*$")


def _quote_arg(arg: str) -> str:
    key, sep, value = arg.partition("=")
    # fullmatch: `$` also matches before a final newline, which would end the shell command there
    if sep and key.startswith("--") and _SAFE.fullmatch(key):
        return f"{key}={value}" if _SAFE.fullmatch(value) and value else f'{key}="{_escape(value)}"'
    return arg if _SAFE.fullmatch(arg) and arg else f'"{_escape(arg)}"'


def _escape(text: str) -> str:
    return re.sub(r'(["\\$`])', r"\\\1", text)


def with_window_gear(gears: Sequence[int], model_config: ModelConfig) -> list[int]:
    """`gears` plus the exact-batching window (padded batches recompute each padded utterance's tail from
    a window of that many frames, which the `.om` must then accept)."""
    window = model_config.tail_window()[0]
    gears = sorted(set(gears) | {window})
    if len(gears) > MAX_GEARS:
        raise ConvertError(f"{len(gears)} gears (with the exact-batching window gear {window}): ATC allows "
                           f"at most {MAX_GEARS}; lower n_buckets or set exact_batching=false")
    return gears


# --- graph files ---------------------------------------------------------------------------------
#: what to do about a damaged export record (it proves which model the graph holds: never guessed)
EXPORT_AGAIN = "run the export stage again (it rebuilds the graph and its record)"


def load_export_info(onnx_path: Path, on_damage: Callable[[str], Any] | None = None) -> dict:
    """The sizes the export stage recorded beside the graph (`layout.record_path`), {} when there is none.
    One of the wrong shape (`records.ExportRecord`; a `model_config` that is no WaveGlow config) is DataError
    naming the file and the field, or, with `on_damage` (the export stage, which rebuilds it), said to it
    and taken as none."""
    info_path = record_path(onnx_path)
    info = read_record(info_path, ExportRecord, "the export record written beside the ONNX graph",
                       damaged="redo" if on_damage else "refuse", advice=EXPORT_AGAIN, on_damage=on_damage)
    if "model_config" in info:  # read_record: a null field is gone
        try:
            ModelConfig.from_dict(info["model_config"])
        except (ConfigError, ValueError) as exc:
            why = f"{info_path}: field model_config is not a WaveGlow config ({exc})"
            if on_damage is None:
                raise DataError(f"{why}; {EXPORT_AGAIN}", path=info_path) from None
            on_damage(why)
            return {}
    return info


def _up_to_date(target: Path, source: Path) -> bool:
    return target.is_file() and target.stat().st_mtime >= source.stat().st_mtime


def convert_openvino(onnx_path: Path, xml_path: Path, *, force: bool = False) -> dict:
    """OpenVINO IR with fp32 weights (save_model's default would compress them to fp16)."""
    xml_path = Path(xml_path)
    if _up_to_date(xml_path, onnx_path) and xml_path.with_suffix(".bin").is_file() and not force:
        return {"status": "skipped (up to date)", "xml": str(xml_path)}
    ov = import_optional("openvino", OV_INSTALL, "OpenVINO IR conversion")
    started = time.perf_counter()
    model = ov.convert_model(str(onnx_path))
    # write under a temporary stem, then rename .bin before .xml: an .xml present means a complete IR
    tmp = xml_path.with_name(f".{xml_path.stem}.tmp.xml")
    try:
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        replace_file(tmp.with_suffix(".bin"), xml_path.with_suffix(".bin"))
        replace_file(tmp, xml_path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".bin").unlink(missing_ok=True)
    return {"status": "converted", "xml": str(xml_path), "bin": str(xml_path.with_suffix(".bin")),
            "seconds": round(time.perf_counter() - started, 2)}


def optimize_onnxruntime(onnx_path: Path, out_path: Path, *, force: bool = False) -> dict:
    """ONNX Runtime's offline optimisation: load once with `optimized_model_filepath` set.

    Extended (not `all`) optimisations: the result stays portable across CPUs.
    """
    out_path = Path(out_path)
    if _up_to_date(out_path, onnx_path) and not force:
        return {"status": "skipped (up to date)", "onnx": str(out_path)}
    ort = import_optional("onnxruntime", ORT_INSTALL, "ONNX Runtime graph optimisation")
    started = time.perf_counter()
    tmp = out_path.with_name(f".{out_path.stem}.tmp.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp)
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        replace_file(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"status": "converted", "onnx": str(out_path), "seconds": round(time.perf_counter() - started, 2)}
