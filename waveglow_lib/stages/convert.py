"""Stage 3, convert: the offline compile step for each target.

- Ascend: the `atc` command of the guide (framework 5, `--input_shape` with -1, `--dynamic_dims` gears,
  `--soc_version`), for our two-input graph (mel, z). Gear policies: `exact` (one gear per distinct mel
  length, as the guide) and `buckets` (lengths rounded up to `n_buckets` sizes chosen to minimise padding;
  ATC accepts at most 100 gears). Runs `atc` when it is on PATH, else writes `om/convert_atc.sh`.
- CPU: an OpenVINO IR (`.xml/.bin`) and an ONNX Runtime optimised graph, the same "compile once" step.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..config import GUIDE_MEL_LENGTHS, WorkflowConfig
from ..io import atomic_write_json, atomic_write_text
from ..errors import ConvertError  # noqa: F401  (re-exported: the old import path)

#: ATC's limit on the number of `--dynamic_dims` gears
MAX_GEARS = 100
#: the guide's command line, verbatim (with its soc_version filled in)
GUIDE_ATC_COMMAND = ('atc --model=WaveGlow_onnx.onnx --output=WaveGlow_om --input_shape="mel:1,80,-1" '
                     '--framework=5 --input_format=ND --soc_version=Ascend310P3 --log=debug '
                     '--dynamic_dims="154;164;443;490;651;699;723;760;832;833"')

OM_NAME = "waveglow"
ONNX_NAME = "waveglow.onnx"
OPENVINO_NAME = "waveglow_openvino.xml"
ORT_OPT_NAME = "waveglow_optimized.onnx"


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


def mel_gears(lengths: Iterable[int], policy: str = "exact", n_buckets: int = 8) -> list[int]:
    """Gear lengths for `--dynamic_dims`: `exact` = every distinct length, `buckets` = bucket_lengths."""
    lengths = [int(v) for v in lengths]
    if not lengths:
        raise ConvertError("no mel lengths to build gears from (empty manifest?)")
    if policy == "exact":
        gears = sorted(set(lengths))
    elif policy == "buckets":
        if n_buckets > MAX_GEARS:
            raise ConvertError(f"n_buckets={n_buckets}: ATC allows at most {MAX_GEARS} gears")
        gears = bucket_lengths(lengths, n_buckets)
    else:
        raise ConvertError(f"gear_policy {policy!r} is not one of exact, buckets")
    if len(gears) > MAX_GEARS:
        raise ConvertError(f"{len(gears)} distinct mel lengths, but ATC's --dynamic_dims allows at most "
                           f"{MAX_GEARS} gears: use gear_policy=buckets (n_buckets <= {MAX_GEARS})")
    return gears


def padding_overhead(lengths: Sequence[int], gears: Sequence[int]) -> float:
    """Fraction of extra frames computed when every utterance is padded to its gear."""
    gears = sorted(gears)
    padded = sum(min(g for g in gears if g >= n) for n in lengths)
    return padded / max(1, sum(lengths)) - 1.0


# --- the atc command -----------------------------------------------------------------------------
def atc_command(onnx_path: str | Path, output: str | Path, gears: Sequence[int], *, batch: int = 1,
                n_mel: int = 80, n_group: int = 8, hop_length: int = 256, soc_version: str = "Ascend310P3",
                inputs: Sequence[str] = ("mel", "z"), log: str = "debug") -> list[str]:
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


def guide_atc_command(soc_version: str = "Ascend310P3") -> list[str]:
    """The guide's own command (mel-only graph, batch 1, its 10 gears)."""
    return atc_command("WaveGlow_onnx.onnx", "WaveGlow_om", GUIDE_MEL_LENGTHS, soc_version=soc_version,
                       inputs=("mel",))


_SAFE = re.compile(r"^[A-Za-z0-9_./+@%-]*$")


def _quote_arg(arg: str) -> str:
    key, sep, value = arg.partition("=")
    if sep and key.startswith("--") and _SAFE.match(key):
        return f"{key}={value}" if _SAFE.match(value) and value else f'{key}="{_escape(value)}"'
    return arg if _SAFE.match(arg) and arg else f'"{_escape(arg)}"'


def _escape(text: str) -> str:
    return re.sub(r'(["\\$`])', r"\\\1", text)


# --- the stage ---------------------------------------------------------------------------------
def load_export_info(onnx_path: Path) -> dict:
    """The sizes the export stage recorded beside the graph (`<name>.json`)."""
    info_path = onnx_path.with_suffix(".json")
    if info_path.is_file():
        return json.loads(info_path.read_text())
    return {}


def manifest_lengths(cfg: WorkflowConfig) -> list[int]:
    from .preprocess import load_manifest

    return [int(item["mel_frames"]) for item in load_manifest(cfg.run_dir / "mel")["items"]]


def convert(cfg: WorkflowConfig, *, targets: Sequence[str] = ("atc", "openvino", "onnxruntime"),
            onnx_path: str | Path | None = None, lengths: Sequence[int] | None = None,
            run_atc: bool | None = None, force: bool = False) -> dict:
    """Compile `runs/<name>/onnx/waveglow.onnx` for each target; returns what was done per target.

    - `atc`: gears from the manifest's mel lengths (`cfg.gear_policy`, `cfg.n_buckets`), batch
      `cfg.batch_size`, `cfg.soc_version`; runs atc when on PATH (`run_atc=None`), else writes
      `om/convert_atc.sh`. Writes `om/waveglow.gears.json` for the om backend either way.
    - `openvino`: `onnx/waveglow_openvino.xml/.bin` (fp32 weights).
    - `onnxruntime`: `onnx/waveglow_optimized.onnx` (extended graph optimisations, CPU EP).
    Finished outputs newer than the ONNX file are skipped unless `force`.
    """
    run_dir = cfg.run_dir
    onnx_path = Path(onnx_path) if onnx_path else run_dir / "onnx" / ONNX_NAME
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path}: ONNX file not found; run the export stage first")
    unknown = [t for t in targets if t not in ("atc", "openvino", "onnxruntime")]
    if unknown:
        raise ConvertError(f"unknown convert target(s) {unknown}; choose from atc, openvino, onnxruntime")
    result: dict = {"onnx": str(onnx_path)}
    if "atc" in targets:
        result["atc"] = convert_atc(cfg, onnx_path, lengths=lengths, run_atc=run_atc, force=force)
    if "openvino" in targets:
        result["openvino"] = convert_openvino(onnx_path, onnx_path.parent / OPENVINO_NAME, force=force)
    if "onnxruntime" in targets:
        result["onnxruntime"] = optimize_onnxruntime(onnx_path, onnx_path.parent / ORT_OPT_NAME, force=force)
    return result


def convert_atc(cfg: WorkflowConfig, onnx_path: Path, *, lengths: Sequence[int] | None = None,
                run_atc: bool | None = None, force: bool = False) -> dict:
    info = load_export_info(onnx_path)
    if info.get("variant", "noise_input") != "noise_input":
        raise ConvertError(f"{onnx_path}: exported as the guide's variant; convert expects the (mel, z) graph")
    lengths = list(lengths) if lengths is not None else manifest_lengths(cfg)
    gears = mel_gears(lengths, cfg.gear_policy, cfg.n_buckets)
    if cfg.exact_batching and (cfg.batch_size > 1 or cfg.gear_policy == "buckets") and "model_config" in info:
        # padded batches recompute each padded utterance's tail from a window of this many frames
        from ..config import ModelConfig
        from .infer import tail_window

        window = tail_window(ModelConfig.from_dict(info["model_config"]))[0]
        if window not in gears:
            gears = sorted(gears + [window])
        if len(gears) > MAX_GEARS:
            raise ConvertError(f"{len(gears)} gears (with the exact-batching window gear {window}): ATC allows "
                               f"at most {MAX_GEARS}; lower n_buckets or set exact_batching=false")
    om_dir = cfg.run_dir / "om"
    om_dir.mkdir(parents=True, exist_ok=True)
    output = om_dir / OM_NAME
    argv = atc_command(onnx_path.resolve(), output.resolve(), gears, batch=cfg.batch_size,
                       n_mel=int(info.get("n_mel_channels", 80)), n_group=int(info.get("n_group", 8)),
                       hop_length=int(info.get("hop_length", 256)), soc_version=cfg.soc_version)
    command = format_command(argv)
    om_file = output.with_suffix(".om")
    meta = {"batch": cfg.batch_size, "mel_lengths": gears, "gear_policy": cfg.gear_policy,
            "soc_version": cfg.soc_version, "command": command,
            "padding_overhead": round(padding_overhead(lengths, gears), 4)}
    from ..backends.om_backend import gears_file

    gears_path = gears_file(om_file)
    result = {"command": command, "gears": gears, "om": str(om_file), "gears_file": str(gears_path),
              "padding_overhead": meta["padding_overhead"]}
    previous = json.loads(gears_path.read_text()) if gears_path.is_file() else {}
    if om_file.is_file() and previous.get("command") == command and not force:
        result["status"] = "skipped (up to date)"
        return result
    atc = shutil.which("atc")
    if run_atc is None:
        run_atc = atc is not None
    if run_atc:
        if atc is None:
            raise ConvertError("atc is not on PATH (source /usr/local/Ascend/ascend-toolkit/set_env.sh)")
        log_path = om_dir / "atc.log"
        started = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, cwd=om_dir)
        if proc.returncode != 0 or not om_file.is_file():
            raise ConvertError(f"atc failed (exit {proc.returncode}) converting {onnx_path}; see {log_path}")
        atomic_write_json(gears_path, meta)
        result.update(status="converted", seconds=round(time.perf_counter() - started, 1), log=str(log_path))
        return result
    script = om_dir / "convert_atc.sh"
    atomic_write_text(script, "#!/bin/sh\n"
                      "# ATC conversion of the (mel, z) WaveGlow graph; written by waveglow_lib convert because\n"
                      "# `atc` was not on PATH here. On a machine with CANN run:\n"
                      "#   source /usr/local/Ascend/ascend-toolkit/set_env.sh && sh convert_atc.sh\n"
                      f"# gears ({cfg.gear_policy}, {len(gears)}): padding overhead {meta['padding_overhead']:.1%}\n"
                      "set -e\n" + command + "\n")
    os.chmod(script, 0o755)
    atomic_write_json(gears_path, meta)
    result.update(status=f"atc not on PATH: wrote {script} (run it where CANN is installed)", script=str(script))
    return result


def _up_to_date(target: Path, source: Path) -> bool:
    return target.is_file() and target.stat().st_mtime >= source.stat().st_mtime


def convert_openvino(onnx_path: Path, xml_path: Path, *, force: bool = False) -> dict:
    """OpenVINO IR with fp32 weights (save_model's default would compress them to fp16)."""
    from ..backends.openvino_backend import import_openvino

    xml_path = Path(xml_path)
    if _up_to_date(xml_path, onnx_path) and xml_path.with_suffix(".bin").is_file() and not force:
        return {"status": "skipped (up to date)", "xml": str(xml_path)}
    ov = import_openvino()
    started = time.perf_counter()
    model = ov.convert_model(str(onnx_path))
    # write under a temporary stem, then rename .bin before .xml: an .xml present means a complete IR
    tmp = xml_path.with_name(f".{xml_path.stem}.tmp.xml")
    try:
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), xml_path.with_suffix(".bin"))
        os.replace(tmp, xml_path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".bin").unlink(missing_ok=True)
    return {"status": "converted", "xml": str(xml_path), "bin": str(xml_path.with_suffix(".bin")),
            "seconds": round(time.perf_counter() - started, 2)}


def optimize_onnxruntime(onnx_path: Path, out_path: Path, *, force: bool = False) -> dict:
    """ONNX Runtime's offline optimisation: load once with `optimized_model_filepath` set.

    Extended (not `all`) optimisations: the result stays portable across CPUs.
    """
    from ..backends.onnxruntime_backend import import_onnxruntime

    out_path = Path(out_path)
    if _up_to_date(out_path, onnx_path) and not force:
        return {"status": "skipped (up to date)", "onnx": str(out_path)}
    ort = import_onnxruntime()
    started = time.perf_counter()
    tmp = out_path.with_name(f".{out_path.stem}.tmp.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp)
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"status": "converted", "onnx": str(out_path), "seconds": round(time.perf_counter() - started, 2)}
