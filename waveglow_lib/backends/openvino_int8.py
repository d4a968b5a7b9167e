"""OpenVINO int8: NNCF post-training quantisation of the exported graph, calibrated on given mels, cached.

`quantized_ir(graph, calibration, cache_dir)` returns the quantised model's IR (`.xml`/`.bin`) for the
graph at `graph` (the export stage's ONNX, or an IR) calibrated on `calibration` — (mel `[B, n_mel, T]`,
z `[B, n_group, T·hop/n_group]`) pairs, z already scaled by sigma, as `Backend.run` takes them — built
once with `nncf.quantize` and re-used after:

    <cache_dir>/openvino/int8-<key>/model.xml, model.bin   the quantised IR (`openvino.save_model`)
    <cache_dir>/openvino/int8-<key>/record.json            the key's fields and each file's sha256

The key is a hash of the graph's bytes (sha256 of the ONNX, or of the IR's .xml and .bin), of the
calibration (`calibration_fingerprint`: every mel and noise value), of NNCF's options
(`QUANTIZE_OPTIONS`) and of the nncf and openvino versions: any change makes another key. An entry is
written into a temporary folder and renamed into place (a crash or a concurrent build never leaves a
half-written one); it is used only when its record names this key and each file's bytes match the
sha256 it records, else it is rebuilt (with a warning) and replaced. The proof is against corruption
and stale entries, not against someone who can write to the cache folder (the bench keeps it beside the
exported ONNX it quantises, which is trusted the same way).

Calibration: NNCF collects each quantised tensor's statistics by running the whole graph once per sample
with every such tensor made an output; on the official model that holds all of them at once (an 832-frame
utterance needed more than 22 GB), so the mels are cut into `CALIBRATION_FRAMES`-frame windows (with the
matching noise), at most `CALIBRATION_WINDOWS` of them spread evenly over the utterances
(`calibration_windows`). Statistics per channel do not need long windows.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import BackendError, import_optional
from ..io import atomic_write_json, sha256_file
from ..records import Int8Record, read_record

NNCF_INSTALL = "pip install nncf (or pip install 'waveglow-workflow[nncf]')"
#: bump when what an entry holds or how it is made changes
CACHE_FORMAT = 1
MAX_RECORD_BYTES = 2**20
#: calibration windows: frames each, and how many at most (see the module doc)
CALIBRATION_FRAMES = 32
CALIBRATION_WINDOWS = 12
#: `nncf.quantize`'s options for this graph (measured on the official architecture: docs/benchmarks.md)
QUANTIZE_OPTIONS = {"preset": "performance", "fast_bias_correction": True}


def import_nncf():
    """nncf, or a one-line MissingDependency saying how to install it."""
    return import_optional("nncf", NNCF_INSTALL, "OpenVINO int8 (the openvino backend at precision int8, "
                                                 "bench row openvino-int8)")


def calibration_windows(calibration: Sequence[tuple[np.ndarray, np.ndarray]], frames: int = CALIBRATION_FRAMES,
                        count: int = CALIBRATION_WINDOWS) -> list[dict[str, np.ndarray]]:
    """NNCF's samples: {"mel", "z"} windows of `frames` frames (an utterance shorter than that: whole), at
    most `count`: one per pair, the rest in proportion to their lengths, each pair's spread evenly over it."""
    if not calibration:
        raise BackendError("openvino int8: no calibration mels given (calibration= [(mel, z), ...])")
    lengths = [int(np.shape(mel)[-1]) for mel, _ in calibration]
    per = _shares(count, [max(1, n - frames + 1) for n in lengths])
    samples = []
    for (mel, z), n, k in zip(calibration, lengths, per):
        mel, z = np.asarray(mel, dtype=np.float32), np.asarray(z, dtype=np.float32)
        if mel.ndim != 3 or z.ndim != 3 or z.shape[-1] % max(n, 1):
            raise BackendError(f"openvino int8: calibration pairs must be mel [B, n_mel, T] and z [B, n_group, "
                               f"T*hop/n_group]; got {mel.shape} and {z.shape}")
        steps = z.shape[-1] // n  # noise steps per frame
        width = min(frames, n)
        for start in np.linspace(0, n - width, k).round().astype(int):
            samples.append({"mel": np.ascontiguousarray(mel[:, :, start:start + width]),
                            "z": np.ascontiguousarray(z[:, :, start * steps:(start + width) * steps])})
    return samples[:count] if len(samples) > count else samples


def _shares(count: int, weights: Sequence[int]) -> list[int]:
    """`count` split over `weights`: one each (while they last), the rest in proportion (largest remainders)."""
    extra = max(0, count - len(weights))
    quotas = [extra * w / sum(weights) for w in weights]
    shares = [1 + int(q) for q in quotas]
    for i in sorted(range(len(quotas)), key=lambda i: int(quotas[i]) - quotas[i])[:extra - sum(int(q) for q in quotas)]:
        shares[i] += 1
    return shares


def calibration_fingerprint(samples: Sequence[dict[str, np.ndarray]]) -> str:
    """16 hex digits of sha256 over every calibration sample's shapes and values."""
    digest = hashlib.sha256()
    for sample in samples:
        for name in sorted(sample):
            array = np.ascontiguousarray(sample[name], dtype=np.float32)
            digest.update(f"{name}{array.shape}".encode())
            digest.update(array)
    return digest.hexdigest()[:16]


def graph_files(graph: Path) -> list[Path]:
    """The files a graph is: the ONNX, or an IR's .xml and .bin."""
    return [graph, graph.with_suffix(".bin")] if graph.suffix == ".xml" else [graph]


def cache_fields(graph: Path, samples: Sequence[dict[str, np.ndarray]]) -> dict:
    """What an entry's key is made of (module doc)."""
    import openvino as ov  # noqa: PLC0415  (the caller imported it: optional)

    nncf = import_nncf()
    return {"format": CACHE_FORMAT, "graph": {p.name: sha256_file(p, "the graph to quantise", BackendError)
                                              for p in graph_files(graph)},
            "calibration": calibration_fingerprint(samples), "samples": len(samples), "options": QUANTIZE_OPTIONS,
            "nncf": nncf.__version__, "openvino": ov.__version__.split("-")[0]}


def entry_dir(cache_dir: Path, fields: dict) -> Path:
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir) / "openvino" / f"int8-{key}"


def quantized_ir(graph: str | Path, calibration: Sequence[tuple[np.ndarray, np.ndarray]], cache_dir: str | Path,
                 *, core=None) -> tuple[Path, dict]:
    """(the quantised IR's .xml, info): from the cache when an entry for this graph, calibration and
    versions proves itself, else quantised with NNCF and stored. info: {"cache": "hit" | "built" |
    "rebuilt: <why>", "seconds": quantisation seconds (0 on a hit), "entry": the folder, "samples": n}."""
    nncf = import_nncf()
    import openvino as ov  # noqa: PLC0415  (optional; the backend imported it before calling)

    graph = Path(graph)
    samples = calibration_windows(calibration)
    fields = cache_fields(graph, samples)
    folder = entry_dir(Path(cache_dir), fields)
    problem = _check_entry(folder, fields)
    if problem is None:
        return folder / "model.xml", {"cache": "hit", "seconds": 0.0, "entry": str(folder), "samples": len(samples)}
    if problem != "missing":
        warnings.warn(f"openvino int8 cache: {folder}: {problem}; quantised again", RuntimeWarning, stacklevel=2)
    core = core or ov.Core()
    t0 = time.perf_counter()
    quantized = nncf.quantize(core.read_model(str(graph)), nncf.Dataset(samples), subset_size=len(samples),
                              preset=getattr(nncf.QuantizationPreset, QUANTIZE_OPTIONS["preset"].upper()),
                              fast_bias_correction=QUANTIZE_OPTIONS["fast_bias_correction"])
    seconds = time.perf_counter() - t0
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        ov.save_model(quantized, str(tmp / "model.xml"), compress_to_fp16=False)
        files = {name: sha256_file(tmp / name, "the quantised IR", BackendError) for name in ("model.xml", "model.bin")}
        atomic_write_json(tmp / "record.json", {"key": fields, "files": files, "quantise_seconds": round(seconds, 3)})
        if folder.is_symlink():
            folder.unlink()
        elif folder.exists():  # stale or corrupt under this key: replaced
            shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
    except OSError:  # another process stored the same key first: its entry is as good
        shutil.rmtree(tmp, ignore_errors=True)
        if _check_entry(folder, fields) is not None:
            raise
    return folder / "model.xml", {"cache": "built" if problem == "missing" else f"rebuilt: {problem}",
                                  "seconds": round(seconds, 3), "entry": str(folder), "samples": len(samples)}


def _check_entry(folder: Path, fields: dict) -> str | None:
    """None when the entry at `folder` is complete, for `fields`, and its files match their sha256; else why
    not ("missing" when there is none)."""
    record_path = folder / "record.json"
    if folder.is_symlink():
        return "a symbolic link, not an entry this cache wrote"
    if not record_path.exists():
        return "missing"
    damage: list[str] = []
    record = read_record(record_path, Int8Record, "an int8 entry's record", on_damage=damage.append,
                         max_bytes=MAX_RECORD_BYTES, follow_links=False)
    if damage or not record:
        return f"record.json unreadable ({damage[0] if damage else 'not a file'})"
    if record.get("key") != fields:
        return "stale (its key fields differ)"
    files = record.get("files")
    if not isinstance(files, dict) or sorted(files) != ["model.bin", "model.xml"]:
        return "incomplete (file list)"
    for name, digest in files.items():
        try:
            if (folder / name).is_symlink() or sha256_file(folder / name, "the quantised IR", BackendError) != digest:
                return f"{name}: its sha256 differs from record.json (corrupt)"
        except (OSError, BackendError) as exc:
            return f"{name}: unreadable ({exc})"
    return None
