"""Atomic file writing and the raw `.bin` arrays the guide's tools exchange."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, InputNotFound


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temp file in the same folder, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_bin(path: str | Path, array: np.ndarray) -> str:
    """Raw little-endian float32, no header (what atc/ais_bench read and write); returns sha256."""
    data = np.ascontiguousarray(array, dtype="<f4").tobytes()
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def read_bin(path: str | Path, shape: tuple[int, ...], dtype: str = "float32") -> np.ndarray:
    """Read a raw `.bin`; its byte size must agree with `shape` exactly."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"{path}: file not found", path=path)
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise DataError(f"{path}: {actual} bytes, but shape {tuple(shape)} of {dtype} needs {expected} bytes "
                         "(truncated file, or a manifest from another run?)")
    return np.fromfile(path, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape).astype(dtype, copy=False)
