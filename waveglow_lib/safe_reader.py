"""Reading torch and safetensors files without running anything in them: the generic half of loading a checkpoint.

It turns bytes into tensors, dicts and inert stand-ins for pickled objects, and knows nothing of WaveGlow
(`checkpoint` maps what it reads to a model; `mel_input` reads mels with `load_tensor_file`).

- torch's zip format and its pre-1.6 legacy format: the container is inspected first (zip members, the
  legacy magic number) and the pickle and its tensor storages are read here, through an allow-listed
  unpickler. torch's own loaders are never called: `torch.load(weights_only=False)` hands a TorchScript
  archive to `torch.jit.load`, which runs the archive's code. What a pickle may name is tensors and plain
  containers (`TENSOR_GLOBALS`), and for a pickled model the classes its `PickleKind` lists, each mapped
  to an inert `PickledObject`; any other global is refused, and a bare pickle stream is not unpickled.
- safetensors: no pickle at all; the safetensors library checks the offsets.
- gzip of either: inflated only as far as the content declares.

Sizes are bounded before anything is allocated: the file, what a `.gz` inflates to (what the safetensors
header declares), every tensor (its storage) and a pickled module graph.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
import pickle
import re
import reprlib
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load as load_safetensors

from .errors import CheckpointError, InputNotFound, WaveGlowError

# --- limits ----------------------------------------------------------------------------------------

#: largest checkpoint read, on disk and after gunzip (NVIDIA's universal model is 676 MB, with optimizer
#: state DeepLearningExamples' are about 1 GB)
MAX_FILE_BYTES = 4 * 2**30
#: safetensors refuses larger headers too
MAX_HEADER_BYTES = 100_000_000
#: a pickled model is a tree of modules (NVIDIA's WaveGlow: about 400, 5 deep)
MAX_MODULES = 10_000
MAX_MODULE_DEPTH = 32

_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of torch's legacy format
_TORCH_LEGACY_PROTOCOL = 1001
#: records torch.save writes into its zip (under one top folder); anything else (TorchScript's `code/`,
#: `constants.pkl`, `extra/`) is refused before it is read
_TORCH_ZIP_RECORD = re.compile(
    r"data\.pkl|version|\.data/version|byteorder|\.format_version|\.storage_alignment|"
    r"\.data/serialization_id|data/\d+")


def file_error(source: Any, message: str, error: type[WaveGlowError] = CheckpointError) -> WaveGlowError:
    """`error` whose one-line message starts with the file it is about."""
    return error(f"{source}: {message}", path=source)


# --- the allow-listed unpickler ---------------------------------------------------------------

class PickledObject:
    """Inert stand-in for a pickled class instance: it only stores the pickled state."""

    pickled_name = "?"
    dump_patches = False

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected pickled state for {self.pickled_name}")
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"<pickled {self.pickled_name}>"


#: classes a pickled NVIDIA model is built from; each becomes an inert `PickledObject`

@dataclasses.dataclass(frozen=True)
class _StorageType:
    """What a pickled `torch.FloatStorage` (etc.) global stands for: only its dtype."""

    dtype: torch.dtype


#: the storage classes torch pickles (one per dtype); calling one is not allowed, only naming it
STORAGE_TYPES = {
    f"torch.{name}Storage": _StorageType(dtype) for name, dtype in {
        "Double": torch.float64, "Float": torch.float32, "Half": torch.float16, "BFloat16": torch.bfloat16,
        "Long": torch.int64, "Int": torch.int32, "Short": torch.int16, "Char": torch.int8,
        "Byte": torch.uint8, "Bool": torch.bool}.items()}
STORAGE_TYPES["torch.UntypedStorage"] = _StorageType(torch.uint8)


@dataclasses.dataclass
class _Storage:
    """A storage read from the file: raw bytes and the dtype they hold."""

    data: torch.UntypedStorage
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return self.data.nbytes() // _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > 8 or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**62 for v in value):
        raise pickle.UnpicklingError(f"tensor {what} must be up to 8 non-negative ints, got {reprlib.repr(value)}")
    return tuple(value)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> torch.Tensor:
    """A view of a storage read from this file; bounds checked here, so nothing is allocated."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"tensor storage must come from the file, got {reprlib.repr(storage)}")
    (offset,), size, stride = _ints((offset,), "offset"), _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in length")
    numel = math.prod(size)
    if numel:
        end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
        # numel bounded too: zero strides would make a small storage look like a huge tensor
        if end > storage.numel or numel > storage.numel:
            raise pickle.UnpicklingError(
                f"tensor of size {size} (stride {stride}, offset {offset}) does not fit its storage of "
                f"{storage.numel} elements")
    return torch.empty((0,), dtype=storage.dtype).set_(storage.data, offset, size, stride)


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    if metadata:  # conj/neg bits: never set on weights
        raise pickle.UnpicklingError(f"tensor metadata is not supported: {reprlib.repr(metadata)}")
    return _rebuild_tensor(storage, offset, size, stride)  # hooks are never attached, so never run


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None,
                       state: Any = None) -> torch.Tensor:
    """A Parameter is kept as its tensor; its hooks and extra state are dropped."""
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError(f"a parameter's data must be a tensor, got {type(data).__name__}")
    return data


def _no_backend() -> None:
    """torch < 1.4 modules kept a `_backend` attribute pickled as a call of this name; it is unused."""
    return None


def _reconstructor(cls: type, base: type, state: Any) -> Any:
    """copyreg._reconstructor for protocol 0/1 pickles, restricted to our inert classes."""
    if not (isinstance(cls, type) and issubclass(cls, PickledObject)) or base is not object:
        raise pickle.UnpicklingError("copyreg._reconstructor is only allowed for allow-listed classes")
    return object.__new__(cls)


#: functions and types that rebuild tensors and plain containers; none allocates more than the file holds
TENSOR_GLOBALS = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch.nn.parameter.Parameter": _rebuild_parameter,
    "torch.Size": torch.Size,
    "collections.OrderedDict": collections.OrderedDict,
    **STORAGE_TYPES,
}
#: what a pickled nn.Module tree names besides its classes (allowed only where a `PickleKind` lists classes)
MODULE_GLOBALS = {
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.object": object,
    "copyreg._reconstructor": _reconstructor,
    "torch.nn.backends.thnn._get_thnn_function_backend": _no_backend,
    "torch.device": torch.device,
}
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_STUBS: dict[str, type] = {}


def _stub_class(qualified: str) -> type:
    if qualified not in _STUBS:
        module, _, name = qualified.rpartition(".")
        _STUBS[qualified] = type(name, (PickledObject,), {"pickled_name": qualified, "__module__": __name__})
    return _STUBS[qualified]


@dataclasses.dataclass(frozen=True)
class PickleKind:
    """What a pickle may name besides `TENSOR_GLOBALS` (the callers' part of the allow-list, one constant each).

    Each of `classes` (qualified names) is unpickled as an inert `PickledObject`; listing any also allows
    `MODULE_GLOBALS`. `name` says what the file should be, in a refusal.
    """

    name: str
    classes: frozenset[str] = frozenset()


#: tensors, dicts of them and their sizes: any class (a module, a TorchScript archive, ...) is refused
TENSORS = PickleKind("tensors")


class _Refused(pickle.UnpicklingError):
    """A global off the allow-list (kept apart from format errors for the message)."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; `storages` resolves persistent ids (None: none allowed)."""

    def __init__(self, file: Any, kind: PickleKind, storages: Any = None):
        super().__init__(file, encoding="utf-8")
        self.kind = kind
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)  # protocol-2 pickles name Python 2 modules
        qualified = f"{module}.{name}"
        if qualified in TENSOR_GLOBALS:
            return TENSOR_GLOBALS[qualified]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if qualified in self.kind.classes:
            return _stub_class(qualified)
        if self.kind.classes and qualified in MODULE_GLOBALS:
            return MODULE_GLOBALS[qualified]
        raise _Refused(f"refused to unpickle global '{qualified}': it is not on the allow-list of what "
                       f"{self.kind.name} may contain (this file may run code when loaded with plain torch.load)")

    def persistent_load(self, pid: Any) -> Any:
        if self.storages is None:
            raise pickle.UnpicklingError("unexpected persistent id in a header pickle")
        return self.storages(pid)


def _unpickle(stream: io.BytesIO, kind: PickleKind, storages: Any = None) -> Any:
    return _RestrictedUnpickler(stream, kind, storages).load()


# --- containers: torch zip, torch legacy, gzip --------------------------------------------------

def _storage_from_bytes(raw: bytes) -> torch.UntypedStorage:
    if not raw:
        return torch.UntypedStorage(0)
    return torch.UntypedStorage.from_buffer(raw, byte_order="little", dtype=torch.uint8)  # a copy


def _read_torch_zip(data: bytes, kind: PickleKind) -> Any:
    """torch.save's zip format: one folder with data.pkl and data/<key> storages, nothing else."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise pickle.UnpicklingError(f"unreadable zip archive ({error})") from None
    names = [info.filename for info in infos]
    prefix = names[0].split("/")[0] + "/" if names else ""
    if any(name.endswith(("constants.pkl", ".py")) or "/code/" in name for name in names):
        raise _Refused("refused: a TorchScript archive (it holds code/ and constants.pkl), whose code would run "
                       "when torch loads it; give the plain checkpoint (a pickle of tensors) instead")
    for name in names:
        if not name.startswith(prefix) or not _TORCH_ZIP_RECORD.fullmatch(name[len(prefix):]):
            raise _Refused(f"refused: unexpected member '{reprlib.repr(name)}': a torch checkpoint archive holds only "
                           "data.pkl, data/<n> and version records")
    if sum(info.file_size for info in infos) > MAX_FILE_BYTES:
        raise pickle.UnpicklingError(f"archive members add up to more than {MAX_FILE_BYTES} bytes")
    members = {info.filename: info for info in infos}
    if prefix + "data.pkl" not in members:
        raise pickle.UnpicklingError("zip archive without data.pkl")
    if prefix + "byteorder" in members and archive.read(prefix + "byteorder") != b"little":
        raise pickle.UnpicklingError("big-endian checkpoints are not supported")
    read: dict[str, torch.UntypedStorage] = {}

    def storage(pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise pickle.UnpicklingError(f"unexpected persistent id {reprlib.repr(pid)}")
        _, kind, key, _location, numel = pid
        name = f"{prefix}data/{key}"
        nbytes = numel * _itemsize(kind.dtype)
        if name not in members or members[name].file_size != nbytes:
            raise pickle.UnpicklingError(f"storage '{key}' of {nbytes} bytes is missing or has another size")
        if key not in read:
            read[key] = _storage_from_bytes(archive.read(name))
        return _Storage(read[key], kind.dtype)

    return _unpickle(io.BytesIO(archive.read(prefix + "data.pkl")), kind, storage)


def _read_torch_legacy(data: bytes, kind: PickleKind) -> Any:
    """torch's pre-1.6 format: magic, version, sys_info, the object pickle, storage keys, then raw storages."""
    magic = pickle.dumps(_TORCH_MAGIC, protocol=2)  # torch wrote its legacy format with protocol 2
    stream = io.BytesIO(data)
    if stream.read(len(magic)) != magic:
        raise _Refused("refused: a bare pickle stream, not a torch checkpoint (no torch magic number); "
                       "it is not unpickled")
    if _unpickle(stream, TENSORS) != _TORCH_LEGACY_PROTOCOL:
        raise pickle.UnpicklingError("unknown torch legacy protocol version")
    sys_info = _unpickle(stream, TENSORS)
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", True):
        raise pickle.UnpicklingError("big-endian checkpoints are not supported")
    roots: dict[Any, _Storage] = {}
    budget = [len(data)]  # storages cannot hold more bytes than the file

    def persistent(pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError(f"unexpected persistent id {reprlib.repr(pid)}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and len(pid) == 4:  # (class, source file, source): the source is not checked
            return pid[1]
        if kind != "storage" or len(pid) != 6 or not isinstance(pid[1], _StorageType) \
                or not isinstance(pid[4], int) or not isinstance(pid[2], (str, int)):
            raise pickle.UnpicklingError(f"unexpected persistent id {reprlib.repr(pid)}")
        _, storage_type, key, _location, numel, view = pid
        size = _itemsize(storage_type.dtype)
        if key not in roots:
            if not 0 <= numel * size <= budget[0]:
                raise pickle.UnpicklingError(f"storage '{key}' declares {numel} elements, more than the file holds")
            budget[0] -= numel * size
            roots[key] = _Storage(torch.UntypedStorage(numel * size), storage_type.dtype)
        root = roots[key]
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3):
            raise pickle.UnpicklingError(f"unexpected storage view {reprlib.repr(view)}")
        _view_key, offset, view_numel = view
        if not all(isinstance(v, int) and v >= 0 for v in (offset, view_numel)) \
                or (offset + view_numel) * size > root.data.nbytes():
            raise pickle.UnpicklingError(f"storage view {reprlib.repr(view)} outside its storage")
        return _Storage(root.data[offset * size:(offset + view_numel) * size], storage_type.dtype)

    result = _unpickle(stream, kind, persistent)
    keys = _unpickle(stream, TENSORS)
    if not isinstance(keys, list) or set(keys) != set(roots):
        raise pickle.UnpicklingError("storage key list does not match the storages the pickle uses")
    for key in keys:
        storage = roots[key]
        head = stream.read(8)
        nbytes = storage.data.nbytes()
        if len(head) < 8 or struct.unpack("<q", head)[0] * _itemsize(storage.dtype) != nbytes:
            raise pickle.UnpicklingError(f"storage '{key}' has another size in the file than in the pickle")
        raw = stream.read(nbytes)
        if len(raw) != nbytes:
            raise pickle.UnpicklingError(f"storage '{key}' is cut short")
        if nbytes:
            storage.data.copy_(_storage_from_bytes(raw))
    return result


def read_pickled(data: bytes, source: Any, kind: PickleKind = TENSORS,
                 error: type[WaveGlowError] = CheckpointError) -> Any:
    """Unpickle a torch zip or legacy file through the allow-list; any other pickle is refused unread."""
    try:
        if data[:4] == b"PK\x03\x04":
            return _read_torch_zip(data, kind)
        return _read_torch_legacy(data, kind)
    except _Refused as refused:
        raise file_error(source, str(refused), error) from None
    except RecursionError:
        raise file_error(source, "refused: the pickle nests too deeply", error) from None
    except MemoryError:
        raise file_error(source, "refused: the pickle needs more memory than is available", error) from None
    except Exception as cause:  # pickle and zip errors of all kinds: not what the file claims to be
        raise file_error(source, "not a readable torch checkpoint (truncated or corrupt?): "
                            f"{type(cause).__name__}: {str(cause)[:300]}", error) from None


def _declared_size(head: bytes) -> int | None:
    """Total size a safetensors file declares in its header, once `head` holds the header."""
    if len(head) < 8:
        return None
    header_len = int.from_bytes(head[:8], "little")
    if not 0 < header_len <= MAX_HEADER_BYTES or head[8:9] not in (b"", b"{"):
        return MAX_FILE_BYTES  # not ours: only the absolute cap applies
    if len(head) < 8 + header_len:
        return None
    try:
        header = json.loads(head[8:8 + header_len])
        end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"], default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        return MAX_FILE_BYTES
    return 8 + header_len + max(end, 0)


_INFLATE_STEP = 1 << 20  # the header is checked after the first step, the size after every step


def _gunzip(raw: bytes, path: Path, error: type[WaveGlowError]) -> bytes:
    """Inflate a gzip member, stopping as soon as it exceeds what its content declares (or the cap)."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    out = bytearray()
    pending, cap = raw, None
    try:
        while True:
            limit = min(cap if cap is not None else MAX_FILE_BYTES, MAX_FILE_BYTES)
            piece = inflater.decompress(pending, min(limit - len(out) + 1, _INFLATE_STEP))
            out += piece
            if cap is None:
                cap = _declared_size(out)
            if len(out) > min(cap if cap is not None else MAX_FILE_BYTES, MAX_FILE_BYTES):
                declared = f"the {cap} bytes its safetensors header declares" if cap and cap < MAX_FILE_BYTES \
                    else f"{MAX_FILE_BYTES} bytes"
                raise file_error(path, f"refused: inflates to more than {declared} (a decompression bomb?)", error)
            pending = inflater.unconsumed_tail
            if inflater.eof or not piece:  # with all input at hand, no output means no progress
                break
    except zlib.error as cause:
        raise file_error(path, f"corrupt gzip data: {cause}", error) from None
    if not inflater.eof:
        raise file_error(path, "truncated gzip file (the compressed stream ends early)", error)
    if inflater.unused_data:
        raise file_error(path, "unexpected data after the gzip stream", error)
    return bytes(out)


def read_bytes(path: Path, error: type[WaveGlowError] = CheckpointError) -> bytes:
    """The file's bytes (inflated when gzipped), within MAX_FILE_BYTES; `error` names the file otherwise."""
    if not path.exists():
        raise InputNotFound(f"{'checkpoint' if error is CheckpointError else 'file'} not found: {path}", path=path)
    if not path.is_file():
        raise file_error(path, "not a regular file", error)
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise file_error(path, f"refused: {size} bytes, more than the {MAX_FILE_BYTES} a checkpoint may have", error)
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = _gunzip(data, path, error)
    if not data:
        raise file_error(path, "empty file", error)
    return data


def is_safetensors(data: bytes) -> bool:
    """Told by content, not name: a plausible header length, then the header's JSON object."""
    if len(data) < 10:
        return False
    header_len = int.from_bytes(data[:8], "little")
    return 0 < header_len <= min(len(data) - 8, MAX_HEADER_BYTES) and data[8:9] == b"{"


def is_torch_container(data: bytes) -> bool:
    """A zip archive, or a pickle stream (torch's legacy format starts with one)."""
    return data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"


def read_safetensors(data: bytes, source: Any, error: type[WaveGlowError] = CheckpointError
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, the header's `__metadata__`). The safetensors library validates offsets against the buffer."""
    try:
        header = json.loads(data[8: 8 + int.from_bytes(data[:8], "little")])
        state = load_safetensors(data)
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict):
            raise TypeError(f"__metadata__ is a {type(metadata).__name__}, not an object")
    except (Exception, RecursionError) as cause:
        raise file_error(source, f"unreadable safetensors file (truncated or corrupt?): {str(cause)[:300]}",
                         error) from None
    return state, metadata


# --- pickled modules ------------------------------------------------------------------------------

def pickled_module_state(root: Any, source: Any) -> dict[str, Any]:
    """The state dict of a pickled (inert) nn.Module tree, with weight norm still unfolded.

    Each module is visited once: a module reached twice (shared, or a cycle) is refused, so a
    hostile graph can neither make the walk exponential nor exhaust the recursion limit.
    """
    state: dict[str, Any] = {}
    seen: set[int] = set()
    stack = [(root, "", 0)]
    while stack:
        module, prefix, depth = stack.pop()
        where = prefix.rstrip(".") or "the model"
        if id(module) in seen:
            raise file_error(source, f"refused: module '{where}' is reached twice (a shared or cyclic module "
                                     "graph); a model is a tree of modules")
        if depth > MAX_MODULE_DEPTH or len(seen) >= MAX_MODULES:
            raise file_error(source, f"refused: the module graph is deeper than {MAX_MODULE_DEPTH} or larger than "
                                     f"{MAX_MODULES} modules")
        seen.add(id(module))
        attrs = getattr(module, "__dict__", None)
        if not isinstance(module, PickledObject) or not isinstance(attrs, dict):
            raise file_error(source, f"'{where}' is a {type(module).__name__}, expected a pickled module")
        for group in ("_parameters", "_buffers"):
            tensors = attrs.get(group) or {}
            if not isinstance(tensors, Mapping):
                raise file_error(source, f"'{where}'.{group} is a {type(tensors).__name__}, expected a dict")
            for name, tensor in tensors.items():
                if tensor is not None:
                    state[f"{prefix}{name}"] = tensor
        children = attrs.get("_modules") or {}
        if not isinstance(children, Mapping):
            raise file_error(source, f"'{where}'._modules is a {type(children).__name__}, expected a dict")
        stack.extend((child, f"{prefix}{name}.", depth + 1)
                     for name, child in reversed(list(children.items())) if child is not None)
    return state


# --- tensor files ---------------------------------------------------------------------------------

def load_tensor_file(path: str | Path, error: type[WaveGlowError] = CheckpointError
                     ) -> torch.Tensor | dict[str, torch.Tensor]:
    """A tensor, or a dict of named tensors, from a torch `.pt` file or safetensors (optionally gzipped).

    The same container checks and allow-list as checkpoints, narrower still (`TENSORS`): no class may be named.
    `error` is the type raised (e.g. MelError for mel files); its message names the file.
    """
    path = Path(path)
    data = read_bytes(path, error)
    if is_safetensors(data):
        return read_safetensors(data, path, error)[0]
    if not is_torch_container(data):
        raise file_error(path, "not a tensor file (expected torch.save output or safetensors)", error)
    obj = read_pickled(data, path, TENSORS, error)
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return dict(obj)
    raise file_error(path, f"expected a tensor or a dict of named tensors, found {type(obj).__name__}", error)
