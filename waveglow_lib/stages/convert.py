"""Stage 3, convert: `onnx/waveglow.onnx` → the Ascend `.om` (runs `atc` when it is on PATH, else writes
`om/convert_atc.sh`), an OpenVINO IR and an ONNX Runtime optimised graph (see `waveglow_lib.convert`).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Sequence

from ..batching import chunk_window
from ..config import ModelConfig, WorkflowConfig, forced
from ..convert import (atc_command, convert_openvino, format_command, load_export_info, mel_gears, optimize_onnxruntime, padding_overhead, with_window_gear)
from ..errors import ConvertError, InputNotFound, RunFolderError
from ..io import atomic_write_json, atomic_write_text
from ..layout import CONVERT_TARGETS, gears_file, load_manifest, record_path
from ..records import ConvertedRecord, GearsRecord, read_record
from ..runlock import locked
from ..stamps import announce_redo, describe, differences, file_stamps, is_current, model_stamp, stage_stamp

__all__ = ["convert", "convert_atc", "manifest_lengths", "mel_gears", "padding_overhead"]


def manifest_lengths(cfg: WorkflowConfig) -> list[int]:
    return [int(item["mel_frames"]) for item in load_manifest(cfg.layout.mel_dir)["items"]]


def source_stamp(info: dict) -> dict:
    """What a converted file inherits from the ONNX it was made from (model fingerprint, opset, variant)."""
    return stage_stamp(None, {"opset": info.get("opset"), "variant": info.get("variant")},
                       fingerprint=info.get("model_fingerprint"))


def check_onnx_model(cfg: WorkflowConfig, onnx_path: Path, info: dict, model=None) -> None:
    """The run's ONNX must hold the run's model, and be the graph its record lists (size and sha256 of the
    graph and any external data): RunFolderError saying to export again otherwise."""
    recorded = info.get("model_fingerprint")
    expected = model_stamp(cfg, model)
    if recorded != expected:
        why = ("has no model fingerprint in its record (made before fingerprints were kept, or not by the "
               "export stage)" if not recorded else
               f"was exported from another model (fingerprint {recorded}; {cfg.checkpoint} is {expected})")
        raise RunFolderError(f"{onnx_path}: {why}; run the export stage again (it re-exports when the model "
                             "changed)", path=onnx_path)
    altered = file_stamps(cfg).files_changed(onnx_path.parent, info.get("files"), including=onnx_path.name)
    if altered:
        raise RunFolderError(f"{altered}: not the graph {record_path(onnx_path)} describes; run the export stage "
                             "again (it re-exports a graph that no longer matches its record)", path=onnx_path)


def _stamped(cfg: WorkflowConfig, artefact: Path, stamp: dict) -> tuple[bool, str]:
    """(up to date?, why not) for a converted file whose record should hold `stamp` and its files' entries."""
    record = record_path(artefact)
    if not record.is_file():   # built for the first time: a state, not a problem
        return False, "first build" if not artefact.exists() else "no record of what it was made from"
    # a damaged record (not JSON, a field of the wrong shape) is said and counts as none: converted again
    recorded = read_record(record, ConvertedRecord, "the record of what a converted model was made from",
                           on_damage=announce_redo)
    if not recorded:
        return False, f"{record}: no usable record of what it was made from"
    changed = differences(recorded.get("source", {}), stamp)
    if changed:
        return False, describe(changed)
    altered = file_stamps(cfg).files_changed(artefact.parent, recorded.get("files"), including=artefact.name)
    return (False, announce_redo(altered)) if altered else (True, "")


def _convert_stamped(cfg: WorkflowConfig, build, artefact: Path, files: Sequence[Path], stamp: dict,
                     force: bool) -> dict:
    """Build `artefact` (made of `files`) unless its record holds `stamp` and the files it lists are intact."""
    record = record_path(artefact)
    up_to_date, why = _stamped(cfg, artefact, stamp)
    if not up_to_date or force:
        record.unlink(missing_ok=True)  # no moment where a new file sits beside an old record
    result = build(force=force or not up_to_date)
    if result.get("status") == "converted":
        stamps = file_stamps(cfg)
        atomic_write_json(record, {"source": stamp, "files": {f.name: stamps.entry(f) for f in files}})
        stamps.save()
        if not up_to_date and why:
            result["reason"] = why
    return result


@locked("convert")
def convert(cfg: WorkflowConfig, *, targets: Sequence[str] = CONVERT_TARGETS,
            onnx_path: str | Path | None = None, lengths: Sequence[int] | None = None,
            run_atc: bool | None = None, force: bool = False, model=None) -> dict:
    """Compile `runs/<name>/onnx/waveglow.onnx` for each target; returns what was done per target.

    - `atc`: gears from the manifest's mel lengths (`cfg.gear_policy`, `cfg.n_buckets`), batch
      `cfg.batch_size`, `cfg.soc_version`; runs atc when on PATH (`run_atc=None`), else writes
      `om/convert_atc.sh`. Writes `om/waveglow.gears.json` for the om backend either way.
    - `openvino`: `onnx/waveglow_openvino.xml/.bin` (fp32 weights).
    - `onnxruntime`: `onnx/waveglow_optimized.onnx` (extended graph optimisations, CPU EP).
    Each output records what it was made from (the ONNX's model fingerprint, opset, variant; for atc
    also the command); finished outputs made from the same are skipped unless `force`, others redone.
    The run's ONNX must hold the run's model, or `model` when given (RunFolderError otherwise: export again).
    """
    force = forced(force)  # `run --force` reaches the notebooks' stage calls
    layout = cfg.layout
    onnx_path = Path(onnx_path) if onnx_path else layout.onnx
    if not onnx_path.is_file():
        raise InputNotFound(f"{onnx_path}: ONNX file not found; run the export stage first", path=onnx_path)
    unknown = [t for t in targets if t not in CONVERT_TARGETS]
    if unknown:
        raise ConvertError(f"unknown convert target(s) {unknown}; choose from {', '.join(CONVERT_TARGETS)}")
    if "atc" in targets and lengths is None:
        lengths = manifest_lengths(cfg)  # every input present before what made them is checked
    info = load_export_info(onnx_path)
    if onnx_path == layout.onnx:
        layout.check(onnx_path, "the exported graph")
        check_onnx_model(cfg, onnx_path, info, model)
    stamp = source_stamp(info)
    result: dict = {"onnx": str(onnx_path)}
    if "atc" in targets:
        result["atc"] = convert_atc(cfg, onnx_path, lengths=lengths, run_atc=run_atc, force=force)
    if "openvino" in targets:
        xml = layout.check(layout.openvino_ir, "the OpenVINO IR")
        result["openvino"] = _convert_stamped(cfg, lambda force: convert_openvino(onnx_path, xml, force=force),
                                              xml, (xml, xml.with_suffix(".bin")), stamp, force)
    if "onnxruntime" in targets:
        optimized = layout.check(layout.onnx_optimized, "the optimised ONNX graph")
        result["onnxruntime"] = _convert_stamped(
            cfg, lambda force: optimize_onnxruntime(onnx_path, optimized, force=force),
            optimized, (optimized,), stamp, force)
    return result


def convert_atc(cfg: WorkflowConfig, onnx_path: Path, *, lengths: Sequence[int] | None = None,
                run_atc: bool | None = None, force: bool = False) -> dict:
    force = forced(force)  # `run --force` reaches the notebooks' stage calls
    info = load_export_info(onnx_path)
    if info.get("variant", "noise_input") != "noise_input":
        raise ConvertError(f"{onnx_path}: exported as the guide's variant; convert expects the (mel, z) graph")
    lengths = list(lengths) if lengths is not None else manifest_lengths(cfg)
    model_config = ModelConfig.from_dict(info["model_config"]) if "model_config" in info else None
    if cfg.gear_policy == "chunks" and model_config is None:
        raise ConvertError(f"{onnx_path}: gear_policy chunks needs the model's config (the export's .json "
                           "record is missing); re-run the export stage")
    window = chunk_window(model_config, cfg.chunk_frames) if cfg.gear_policy == "chunks" and cfg.chunk_frames else None
    gears = mel_gears(lengths, cfg.gear_policy, cfg.n_buckets, chunk_window=window)
    if (cfg.exact_batching and (cfg.batch_size > 1 or cfg.gear_policy in ("buckets", "chunks"))
            and model_config is not None):
        gears = with_window_gear(gears, model_config)
    layout = cfg.layout
    om_dir = layout.om_dir
    om_dir.mkdir(parents=True, exist_ok=True)
    layout.check(om_dir, "the om folder")
    output = layout.om.with_suffix("")
    shape = model_config or ModelConfig()  # the graph's sizes when its record does not name them
    argv = atc_command(onnx_path.resolve(), output.resolve(), gears, batch=cfg.batch_size,
                       n_mel=int(info.get("n_mel_channels", shape.n_mel_channels)),
                       n_group=int(info.get("n_group", shape.n_group)),
                       hop_length=int(info.get("hop_length", shape.hop_length)), soc_version=cfg.soc_version)
    command = format_command(argv)
    om_file = output.with_suffix(".om")
    meta = {"batch": cfg.batch_size, "mel_lengths": gears, "gear_policy": cfg.gear_policy,
            "soc_version": cfg.soc_version, "command": command,
            "padding_overhead": round(padding_overhead(lengths, gears), 4)}
    gears_path = gears_file(om_file)
    result = {"command": command, "gears": gears, "om": str(om_file), "gears_file": str(gears_path),
              "padding_overhead": meta["padding_overhead"]}
    layout.check(gears_path, "the gears record")
    meta["source"] = source_stamp(info)
    # damaged (not JSON, a field of the wrong shape): said, and rebuilt
    previous = read_record(gears_path, GearsRecord, "the gears the .om was built for (batch, mel_lengths)",
                           on_damage=announce_redo)
    # an .om atc built here is listed by size and sha256 (one built elsewhere, from the script, is not)
    altered = file_stamps(cfg).files_changed(om_dir, previous["files"], including=om_file.name) \
        if om_file.is_file() and "files" in previous else None
    if (om_file.is_file() and previous.get("command") == command
            and is_current(previous.get("source"), meta["source"]) and not force and not altered):
        result["status"] = "skipped (up to date)"
        return result
    if altered and not force:
        result["reason"] = announce_redo(altered)
    atc = shutil.which("atc")
    if run_atc is None:
        run_atc = atc is not None
    if run_atc:
        if atc is None:
            raise ConvertError("atc is not on PATH (source /usr/local/Ascend/ascend-toolkit/set_env.sh)")
        log_path = layout.check(layout.atc_log, "the atc log")
        log_path.unlink(missing_ok=True)  # never write through a link left there
        started = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, cwd=om_dir)
        if proc.returncode != 0 or not om_file.is_file():
            raise ConvertError(f"atc failed (exit {proc.returncode}) converting {onnx_path}; see {log_path}")
        meta["files"] = {om_file.name: file_stamps(cfg).entry(om_file)}
        atomic_write_json(gears_path, meta)
        result.update(status="converted", seconds=round(time.perf_counter() - started, 1), log=str(log_path))
        return result
    script = layout.atc_script
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


