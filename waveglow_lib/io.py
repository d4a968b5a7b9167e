"""Atomic file writing and the raw `.bin` arrays the guide's tools exchange."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np

from .errors import DataError, InputNotFound, ResourceError, WaveGlowError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temp file in the same folder, fsync, then rename: readers never see half a file.

    A full disk, a read-only folder or an allocation failure raises ResourceError naming the file, and
    the temp file is removed: what was there before stays as it was.
    """
    with atomic_stream(path) as handle:
        handle.write(data)
    return Path(path)


@contextlib.contextmanager
def atomic_stream(path: str | Path) -> Iterator[BinaryIO]:
    """`atomic_write_bytes` for a file written piece by piece: yields a temp file (`w+b`) in the same folder,
    renamed onto `path` (after fsync) only when the `with` block ends without an error; on any error,
    Ctrl-C included, it is removed and `path` stays as it was (ResourceError for a full disk, a read-only
    folder or an allocation failure, naming the file). Nothing exists at `path` until it is complete."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
        with os.fdopen(fd, "w+b") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        error = _unwritten(path, exc)
        if error:
            raise error from None
        raise


#: `<resolved root>=<token>` pairs (os.pathsep separated) of the run-folder locks this process or its parent
#: holds (`runlock`): a temp file written under a locked folder carries the lock's token in its name
TOKEN_ENV = "WAVEGLOW_RUN_LOCKS"
#: a token is 16 hex digits (`runlock`); a temp name is `.<name>.<token>.<8 characters from mkstemp>.tmp`
_TOKEN = re.compile(r"[0-9a-f]{16}")


def held_lock_tokens() -> dict[str, str]:
    """{resolved run folder: token} of the locks this process holds or inherited (TOKEN_ENV)."""
    pairs = [p.rpartition("=") for p in os.environ.get(TOKEN_ENV, "").split(os.pathsep) if "=" in p]
    return {root: token for root, _, token in pairs if _TOKEN.fullmatch(token)}


def temp_prefix(path: Path) -> str:
    """The prefix of `atomic_stream`'s temp file for `path`: `.<name>.<token>.` under a locked run folder (the
    token of its lock: what `remove_temp_files` may remove once that holder is dead), else `.<name>.`."""
    tokens = held_lock_tokens()
    if tokens:
        folder = path.parent.resolve()
        for root in (folder, *folder.parents):
            if str(root) in tokens:
                return f".{path.name}.{tokens[str(root)]}."
    return f".{path.name}."


def remove_temp_files(folders: Iterable[str | Path], token: str) -> list[Path]:
    """Remove the temp files `atomic_stream` made for the lock whose token is `token`, directly in `folders`
    (the folders a run's layout owns: never their subfolders, never through a link, only regular files of this
    user): call it only while holding a folder's lock taken over from a dead holder, with that holder's token.
    A file that merely looks like a temp file (`mynotes/.draft.abcd1234.tmp`) is never touched. The files removed."""
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        return []
    name_rule = re.compile(rf"\..+\.{token}\.[A-Za-z0-9_]{{8}}\.tmp")
    removed = []
    for folder in folders:
        folder = Path(folder)
        try:
            if not stat.S_ISDIR(os.lstat(folder).st_mode):
                continue
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            if not name_rule.fullmatch(name):
                continue
            path = folder / name
            with contextlib.suppress(OSError):
                info = os.lstat(path)
                if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid():
                    path.unlink()
                    removed.append(path)
    return removed


def replace_file(tmp: str | Path, path: str | Path) -> None:
    """os.replace(tmp, path) for a temp file a library wrote (ONNX, OpenVINO): a folder where the file goes
    (EISDIR), a full disk or a read-only folder is ResourceError naming `path`, not a traceback."""
    try:
        os.replace(tmp, path)
    except OSError as exc:
        error = _unwritten(path, exc)
        if error:
            raise error from None
        raise


def _unwritten(path: str | Path, exc: BaseException) -> ResourceError | None:
    """The ResourceError naming `path` for a write that failed on storage (`storage_problem`), else None."""
    problem = storage_problem(exc)
    return ResourceError(f"{path}: could not write ({problem}); nothing was changed", path=path) if problem else None


def storage_problem(exc: BaseException) -> str | None:
    """What a full disk, a read-only folder or an allocation failure is, in words (None for other errors)."""
    allocation = allocation_problem(exc)
    if allocation:
        return allocation
    if isinstance(exc, OSError):
        reasons = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                   errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                   errno.EPERM: "operation not permitted", errno.EFBIG: "file too large",
                   errno.EISDIR: "a folder is where the file goes; remove it"}
        if exc.errno in reasons:
            return reasons[exc.errno]
    return None


def allocation_problem(exc: BaseException) -> str | None:
    """A failed allocation in words, with the size it asked for when the allocator said it: numpy's
    `_ArrayMemoryError` ("Unable to allocate 1.2 GiB for an array ..."), torch's DefaultCPUAllocator
    ("not enough memory: you tried to allocate N bytes", a RuntimeError), CUDA's "out of memory". None otherwise."""
    text = str(exc)
    if not isinstance(exc, MemoryError) and not (isinstance(exc, RuntimeError) and (
            "DefaultCPUAllocator" in text or "out of memory" in text.lower())):
        return None
    numpy_size = re.search(r"Unable to allocate ([0-9.]+ [KMGTPE]?i?B)", text)
    torch_size = re.search(r"allocate ([0-9]+) bytes", text) or re.search(r"allocate ([0-9.]+ [KMGTPE]i?B)", text)
    if numpy_size:
        return f"out of memory: {numpy_size.group(1)} were asked for"
    if torch_size:
        size = torch_size.group(1)
        size = f"{int(size) / 2**30:.2f} GiB" if size.isdigit() else size
        return f"out of memory: {size} were asked for"
    return "out of memory"


#: the records and manifests the stages keep (JSON): a manifest of a million utterances is ~200 MB
MAX_RECORD_BYTES = 256 * 2**20

_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


def file_kind(info: os.stat_result) -> str:
    """What a path that is not a regular file is, in words: "a folder", "a FIFO", "a character device" ..."""
    return next((name for test, name in _FILE_KINDS if test(info.st_mode)), "not a file")


@contextlib.contextmanager
def open_bounded(path: str | Path, what: str, max_bytes: int, error: type[WaveGlowError] = DataError, *,
                 follow_links: bool = True) -> Iterator[BinaryIO]:
    """Open a file we did not write in this process for reading, once it is known to be a regular file of at
    most `max_bytes`: a device, a FIFO or a folder would be read until memory runs out, or for ever.

    `error` (naming the file and `what` it should hold) for anything else; InputNotFound when it is missing.
    `follow_links=False` refuses a symbolic link itself (folders only we write, such as the engine cache).
    The kind is checked before opening (opening a FIFO waits for a writer) and again on the open file.
    """
    path = Path(path)

    def check(info: os.stat_result) -> None:
        if not stat.S_ISREG(info.st_mode):
            kind = file_kind(info)
            raise error(f"{path}: not a regular file ({kind}); expected {what}", path=path)
        if info.st_size > max_bytes:
            raise error(f"{path}: refused: {info.st_size} bytes, more than {what} may have ({max_bytes})",
                        path=path)

    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW)
    try:
        check(os.stat(path, follow_symlinks=follow_links))
        fd = os.open(path, flags)
    except WaveGlowError:
        raise  # check's own verdict (some of the errors are OSErrors too)
    except FileNotFoundError:
        raise InputNotFound(f"{path}: not found (expected {what})", path=path) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_links:
            raise error(f"{path}: not a regular file (a symbolic link); expected {what}", path=path) from None
        raise error(f"{path}: unreadable ({exc.strerror or exc}; expected {what})", path=path) from None
    with os.fdopen(fd, "rb") as handle:
        check(os.fstat(fd))  # what was opened, should the path have been swapped since the first look
        yield handle


def read_bounded(path: str | Path, what: str, max_bytes: int, error: type[WaveGlowError] = DataError, *,
                 follow_links: bool = True) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (`open_bounded`); a file that grows while it is
    read is refused (read(n) allocates n bytes up front: n is the file's size, not the cap)."""
    with open_bounded(path, what, max_bytes, error, follow_links=follow_links) as handle:
        size = os.fstat(handle.fileno()).st_size
        try:
            data = handle.read(size + 1)
        except OSError as exc:
            raise error(f"{path}: unreadable ({exc.strerror or exc}; expected {what})", path=path) from None
    if len(data) > size:
        raise error(f"{path}: refused: it grew while it was read; expected {what}", path=path)
    return data


#: JSON's names for Python's types, for errors that say what a record holds
_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def json_name(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words: "object", "array", "string", "number", "boolean", "null"."""
    return _JSON_NAMES.get(type(value), "null")


def read_json(path: str | Path, what: str, kind: type = dict, *, max_bytes: int = MAX_RECORD_BYTES,
              follow_links: bool = True) -> Any:
    """Parse a JSON file the workflow wrote (`read_bounded`): DataError naming the file and what it should hold
    when it is missing, not JSON, or not a `kind` (dict by default). A record's fields are checked by its model
    (`records.read_record`)."""
    path = Path(path)
    try:
        text = read_bounded(path, what, max_bytes, follow_links=follow_links).decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text file (expected {what}, as JSON)", path=path) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); "
                        f"expected {what} (delete it to have it rebuilt)", path=path) from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply; expected {what}", path=path) from None
    if not isinstance(value, kind):
        raise DataError(f"{path}: holds a JSON {json_name(value)}, expected {what} "
                        f"(a JSON {_JSON_NAMES.get(kind, kind.__name__)})", path=path)
    return value


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


def sha256_file(path: str | Path, what: str = "a file", error: type[WaveGlowError] = DataError) -> str:
    """The sha256 of a regular file's content, read in blocks (`open_bounded`: a FIFO or a folder is `error`).
    `stamps.FileStamps` caches it for the run's files; this is the uncached read."""
    digest = hashlib.sha256()
    with open_bounded(path, what, 2**62, error) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: str | Path) -> dict:
    """What a record says of a file it describes: its size and content hash (`stamps.FileStamps.changed`
    compares them with the file as it is)."""
    return {"size": Path(path).stat().st_size, "sha256": sha256_file(path)}


def write_bin(path: str | Path, array: np.ndarray) -> str:
    """Raw little-endian float32, no header (what atc/ais_bench read and write); returns sha256."""
    data = np.ascontiguousarray(array, dtype="<f4").tobytes()
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


#: columns placed at a time by `write_bin_blocks` (× rows × 4 bytes: 1.3 MB for an 80-band mel)
_PLACE_COLUMNS = 4096


def write_bin_blocks(path: str | Path, blocks: Iterable[np.ndarray]) -> tuple[str, tuple[int, int]]:
    """`write_bin` of a `[rows, T]` array that comes as column blocks `[rows, k]` (a mel, block of frames by
    block of frames), in memory bounded by a block: the blocks go to an anonymous scratch file as they come,
    and once T is known each row is placed at its offset in the row-major file (atomically: nothing at
    `path` until it is complete; an error raised by `blocks` leaves nothing). Returns (sha256, (rows, T))."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows, total = None, 0
    with atomic_stream(path) as out, tempfile.TemporaryFile(dir=path.parent) as scratch:
        for block in blocks:
            block = np.asarray(block)
            if rows is None:
                rows = block.shape[0]
            if block.ndim != 2 or block.shape[0] != rows:
                raise DataError(f"{path}: a block of shape {block.shape} among blocks of {rows} rows")
            scratch.write(np.ascontiguousarray(block.T, dtype="<f4").tobytes())
            total += block.shape[1]
        rows = rows or 0
        scratch.flush()
        for t0 in range(0, total, _PLACE_COLUMNS):
            k = min(_PLACE_COLUMNS, total - t0)
            chunk = np.frombuffer(os.pread(scratch.fileno(), k * rows * 4, t0 * rows * 4), dtype="<f4")
            columns = np.ascontiguousarray(chunk.reshape(k, rows).T)
            for row in range(rows):
                os.pwrite(out.fileno(), columns[row].tobytes(), (row * total + t0) * 4)
        out.seek(0)
        digest = hashlib.sha256()
        for data in iter(lambda: out.read(1 << 20), b""):
            digest.update(data)
    return digest.hexdigest(), (rows, total)


#: what a .npy opens with (np.save)
NPY_MAGIC = b"\x93NUMPY"


def npy_header(handle: BinaryIO, size: int) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, offset of the data) of the `.npy` that `handle` holds (`size` bytes in all),
    checked before anything is allocated (a header of a few bytes may declare terabytes): format 1.0 or 2.0
    (what np.save writes for numbers; 3.0 only adds UTF-8 field names, which no number array has), no Python
    objects (pickles), no negative dimension, and a shape whose bytes are exactly the `size` after the header.
    The one reader of .npy headers (mel files and service bodies): DataError with a one-line reason, which
    the caller prefixes with the file or request it read."""
    problem = "not a plain numeric .npy array"
    try:
        version = np.lib.format.read_magic(handle)
        if version not in ((1, 0), (2, 0)):
            raise DataError(f"{problem}: format version {version[0]}.{version[1]} (np.save writes 1.0 or 2.0 "
                            "for numbers)")
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(handle)
    except DataError:
        raise
    except Exception as error:  # numpy parses the header with ast and, for old headers, tokenize: anything goes
        raise DataError(f"{problem}: its header is unreadable ({error})") from None
    if dtype.hasobject:
        raise DataError(f"{problem}: dtype {dtype} holds Python objects (a pickle; pickles are never read)")
    if any(n < 0 for n in shape):
        raise DataError(f"its header declares shape {tuple(shape)}, with a negative dimension: not an array np.save "
                        "wrote (damaged or forged header); save it again")
    offset = handle.tell()
    expected, actual = math.prod(shape) * dtype.itemsize, size - offset
    if expected != actual:
        diff = (f"{actual - expected} bytes more (data after the array: not written by np.save?)"
                if actual > expected else f"{expected - actual} bytes fewer (truncated?)")
        raise DataError(f"its header declares shape {tuple(shape)} of {dtype} ({expected} bytes), but it holds "
                        f"{actual} bytes after its header: {diff}")
    return tuple(shape), bool(fortran), dtype, offset


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
