"""The engine cache: a built `FastEngine`'s tensors and `precision: auto`'s verdict on disk, so that a model
loaded before on this machine is ready in seconds.

Layout (`cache_dir`, default `$WAVEGLOW_CACHE_DIR`, else `$XDG_CACHE_HOME/waveglow-workflow`, else
`~/.cache/waveglow-workflow`):

    fast/engine-<key>/meta.json          what the entry is (its key's fields) and each file's sha256
    fast/engine-<key>/flow<k>.safetensors the engine's tensors of flow k (`engine.flow_arrays`)
    fast/probe-<key>.json                precision: auto's verdict for a model on this machine, with the
                                         sha256 of its key and record

The key is a hash of the model's fingerprint (`checkpoint.model_fingerprint`: its config and every
weight), the precision, the CPU (`hardware.cpu_signature`), the library versions and the entry format: any
change makes another key, and an old entry is never read again. An entry is used only when its meta.json
names the same key fields and every file's sha256 matches; anything else (missing, truncated, corrupt,
another format) is rebuilt and replaced, with a warning; a verdict is used only when its sha256 matches
(an edited verdict must not choose the precision in silence), else the probe runs again. Every file is
read only when it is a regular file (not a link) of a bounded size: a link to a device would be read
until memory runs out. Tensors are stored with safetensors (no pickles). oneDNN's packed
int8 weights cannot be serialised: the entry holds the int8 weights and their scales, and they are packed
again at load (`engine._pack_int8`, bit-identical to a fresh build).

Entries are written into a temporary folder and renamed into place, so a crash or a concurrent build never
leaves a half-written entry under a key.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import safetensors
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ...checkpoint import model_fingerprint
from ...hardware import cpu_signature
from ...io import atomic_write_json, read_bounded
from .engine import FastEngine, flow_arrays, native_precision

#: bump when what an entry holds changes (tensor names, layout, quantisation)
CACHE_FORMAT = 6
CACHE_ENV = "WAVEGLOW_CACHE_DIR"
#: meta.json and a verdict are a few KiB; one flow's tensors of the official model about 30 MB
MAX_META_BYTES = 2**20
MAX_FLOW_BYTES = 2**30


def default_cache_dir() -> Path:
    """$WAVEGLOW_CACHE_DIR, else $XDG_CACHE_HOME/waveglow-workflow, else ~/.cache/waveglow-workflow."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "waveglow-workflow"


def resolve_cache_dir(cache_dir: str | Path | None) -> Path | None:
    """`None` or "" → the default folder; "off" / False → no cache (None); a path → that folder."""
    if cache_dir is False or (isinstance(cache_dir, str) and cache_dir.strip().lower() in ("off", "none", "false")):
        return None
    if cache_dir is None or cache_dir is True or str(cache_dir).strip() == "":
        return default_cache_dir()
    return Path(cache_dir).expanduser()


def environment_key() -> dict:
    """The machine's part of every key: CPU features, library versions, the entry format."""
    return {"format": CACHE_FORMAT, "cpu": cpu_signature(), "torch": torch.__version__,
            "numpy": np.__version__, "safetensors": safetensors.__version__,
            "python": platform.python_version()}


def _digest(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


class EngineCache:
    """Built engines and auto verdicts of models on this machine, under `root` (see the module doc).

    `engine(model, precision)` returns the cached engine or builds it (and stores it); `verdict` /
    `store_verdict` hold `auto_engine`'s record. `self.events` lists what happened ("hit", "built",
    "rebuilt: <why>") for the caller's description and the tests."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.events: list[str] = []
        self._environment = environment_key()
        self._fingerprints: dict[int, str] = {}

    def fingerprint(self, model) -> str:
        """The model's fingerprint, computed once per model object."""
        if id(model) not in self._fingerprints:
            self._fingerprints[id(model)] = model_fingerprint(model)
        return self._fingerprints[id(model)]

    # --- keys ---------------------------------------------------------------------------------------------
    def engine_fields(self, model, precision: str) -> dict:
        return {"kind": "engine", "model": self.fingerprint(model), "precision": precision, **self._environment}

    def engine_dir(self, model, precision: str) -> Path:
        return self.root / "fast" / f"engine-{_digest(self.engine_fields(model, precision))}"

    def probe_fields(self, model, probe_settings: dict) -> dict:
        return {"kind": "probe", "model": self.fingerprint(model), "probe": probe_settings, **self._environment}

    def probe_path(self, model, probe_settings: dict) -> Path:
        return self.root / "fast" / f"probe-{_digest(self.probe_fields(model, probe_settings))}.json"

    # --- engines --------------------------------------------------------------------------------------------
    def engine(self, model, precision: str, **options) -> FastEngine:
        """The engine for `model` at `precision` (resolved to what this CPU runs natively), from the cache
        when a valid entry exists, else built and stored. `options`: FastEngine's block_frames / threads."""
        precision = native_precision(precision)
        folder = self.engine_dir(model, precision)
        fields = self.engine_fields(model, precision)
        problem = self._check_entry(folder, fields, model.config.n_flows)
        if problem is None:
            try:
                engine = FastEngine(model, precision, flows=self._read_flows(folder, model.config.n_flows), **options)
                self.events.append("hit")
                return engine
            except Exception as exc:  # noqa: BLE001  any failure to read an entry: never trusted, rebuilt
                problem = f"unreadable ({type(exc).__name__}: {exc})"
        if problem != "missing":
            _warn(folder, f"{problem}; rebuilt")
        self.events.append("built" if problem == "missing" else f"rebuilt: {problem}")
        return self._build(model, precision, folder, fields, **options)

    def _check_entry(self, folder: Path, fields: dict, n_flows: int) -> str | None:
        """None when the entry at `folder` is complete and matches `fields`; else why not."""
        meta_path = folder / "meta.json"
        if folder.is_symlink():
            return "not an entry this cache wrote (a symbolic link)"
        if not (meta_path.exists() or meta_path.is_symlink()):
            return "missing"
        try:
            meta = json.loads(read_bounded(meta_path, "an engine's meta.json", MAX_META_BYTES, follow_links=False))
        except (OSError, ValueError, RecursionError) as exc:
            return f"meta.json unreadable ({exc})"
        if not isinstance(meta, dict) or meta.get("key") != fields:
            return "stale (its key fields differ)"
        files = meta.get("files")
        if not isinstance(files, dict) or sorted(files) != [f"flow{k:02d}.safetensors" for k in range(n_flows)]:
            return "incomplete (file list)"
        return None

    def _read_flows(self, folder: Path, n_flows: int) -> Iterator[dict[str, torch.Tensor]]:
        """Each flow's tensors, its bytes checked against meta.json's sha256 before they are parsed."""
        files = json.loads(read_bounded(folder / "meta.json", "an engine's meta.json", MAX_META_BYTES,
                                        follow_links=False))["files"]
        for k in range(n_flows):
            name = f"flow{k:02d}.safetensors"
            data = read_bounded(folder / name, "a flow's tensors", MAX_FLOW_BYTES, follow_links=False)
            if hashlib.sha256(data).hexdigest() != files[name]:
                raise ValueError(f"{name}: sha256 differs from meta.json (corrupt)")
            yield load_safetensors(data)

    def _build(self, model, precision: str, folder: Path, fields: dict, **options) -> FastEngine:
        """Build the engine flow by flow, writing each flow's tensors into a temporary folder as it goes;
        the folder becomes the entry (rename) once complete. A cache that cannot be written is skipped."""
        files: dict[str, str] = {}
        tmp: Path | None = None
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        except OSError:
            tmp = None

        def flows() -> Iterator[dict[str, torch.Tensor]]:
            nonlocal tmp
            for k in range(model.config.n_flows):
                arrays = flow_arrays(model, k, precision)
                if tmp is not None:
                    name = f"flow{k:02d}.safetensors"
                    try:
                        data = save_safetensors({key: t.contiguous() for key, t in arrays.items()})
                        (tmp / name).write_bytes(data)
                        files[name] = hashlib.sha256(data).hexdigest()
                    except OSError:
                        shutil.rmtree(tmp, ignore_errors=True)
                        tmp = None
                yield arrays

        engine = FastEngine(model, precision, flows=flows(), **options)
        if tmp is not None:
            try:
                atomic_write_json(tmp / "meta.json", {"key": fields, "files": files})
                if folder.is_symlink():  # planted: the link goes, not what it points to
                    folder.unlink()
                elif folder.exists():  # a stale or corrupt entry under this key: replaced
                    shutil.rmtree(folder, ignore_errors=True)
                os.rename(tmp, folder)
            except OSError:  # another process committed the same key first, or the disk is read-only
                shutil.rmtree(tmp, ignore_errors=True)
        return engine

    # --- auto's verdict -----------------------------------------------------------------------------------
    def verdict(self, model, probe_settings: dict) -> dict | None:
        """The stored `auto_engine` record for this model on this machine, or None (missing, stale, corrupt or
        edited: each but missing with a warning, and the probe runs again)."""
        path = self.probe_path(model, probe_settings)
        if not (path.exists() or path.is_symlink()):
            return None
        fields = self.probe_fields(model, probe_settings)
        try:
            stored = json.loads(read_bounded(path, "a probe verdict", MAX_META_BYTES, follow_links=False))
        except (OSError, ValueError, RecursionError) as exc:
            return _warn(path, f"unreadable ({exc}); probing again")
        record = stored.get("record") if isinstance(stored, dict) else None
        if not isinstance(record, dict) or stored.get("key") != fields \
                or record.get("precision") not in ("int8", "bf16", "fp32"):
            return _warn(path, "not a verdict for this model and machine; probing again")
        if stored.get("sha256") != _verdict_sha256(fields, record):
            return _warn(path, "its sha256 does not match its key and record (edited?); probing again")
        return record

    def store_verdict(self, model, probe_settings: dict, record: dict) -> None:
        path = self.probe_path(model, probe_settings)
        fields = self.probe_fields(model, probe_settings)
        try:
            atomic_write_json(path, {"key": fields, "record": record, "sha256": _verdict_sha256(fields, record)})
        except OSError:
            pass  # a read-only cache: the probe runs again next time


def _verdict_sha256(fields: dict, record: dict) -> str:
    """The content hash a verdict is stored with: bound to its key, so a record cannot be moved either."""
    return hashlib.sha256(json.dumps({"key": fields, "record": record}, sort_keys=True).encode()).hexdigest()


def _warn(path: Path, problem: str) -> None:
    """A cache file that is there but not trusted: say so (it is rebuilt or re-probed, never used)."""
    warnings.warn(f"engine cache: {path}: {problem}", RuntimeWarning, stacklevel=3)
