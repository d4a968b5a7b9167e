"""WaveGlow checkpoints in and out. Nothing in a checkpoint is trusted: no code from it ever runs.

Formats `load_waveglow` reads (detected from the file's content, not its name):
1. NVIDIA/waveglow training checkpoints (`waveglow_256channels_universal_v5.pt`): a pickle of
   `{"model": glow.WaveGlow, ...}`, in torch's zip or legacy format. It is read by an allow-listed
   unpickler that maps NVIDIA's classes (and the torch classes a pickled module holds) to inert
   containers, so neither NVIDIA's `glow` module nor anything else runs. Any other global is refused.
2. DeepLearningExamples checkpoints `{"state_dict": ..., "config": ...}` or a bare state dict,
   keys possibly prefixed `module.`; read through the same unpickler.
3. Our own format, written by `save_waveglow`: safetensors (no pickle at all) with the model and STFT
   config as JSON in the header metadata; optionally gzip-compressed (`.gz`), as the demo model is.

torch's own loaders are never called: `torch.load(weights_only=False)` hands a TorchScript archive to
`torch.jit.load`, which runs the archive's code. The container is inspected first (zip members, the legacy
format's magic number) and the pickle and its tensor storages are read here, with the unpickler below.
Sizes are bounded before anything is allocated: the file, what a `.gz` inflates to (what the safetensors
header declares), every tensor (its storage), the module graph, and the hyper-parameters (sane limits,
then the shapes they imply against the tensors, before a model is built).
"""
from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
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
from safetensors.torch import save as save_safetensors

from .config import DEMO_MODEL_PATH, ModelConfig, STFTConfig
from .errors import CheckpointError, InputNotFound, WaveGlowError
from .io import atomic_write_bytes
from .model import WaveGlow

FORMAT_NAME = "waveglow-workflow"
FORMAT_VERSION = "1"

# --- limits ----------------------------------------------------------------------------------------

#: largest checkpoint read, on disk and after gunzip (NVIDIA's universal model is 676 MB, with optimizer
#: state DeepLearningExamples' are about 1 GB)
MAX_FILE_BYTES = 4 * 2**30
#: safetensors refuses larger headers too
MAX_HEADER_BYTES = 100_000_000
#: hyper-parameters beyond these are not a WaveGlow anyone trained (NVIDIA's: 80, 12, 8, 4, 2, 8, 256/512, 3)
MODEL_LIMITS = {
    "n_mel_channels": 1024, "n_flows": 64, "n_group": 256, "n_early_every": 64, "n_early_size": 256,
    "n_layers": 16, "n_channels": 4096, "kernel_size": 63, "upsample_kernel": 16384, "upsample_stride": 4096,
}
#: a pickled WaveGlow is a tree of about 400 modules, 5 deep
MAX_MODULES = 10_000
MAX_MODULE_DEPTH = 32

_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of torch's legacy format
_TORCH_LEGACY_PROTOCOL = 1001
#: records torch.save writes into its zip (under one top folder); anything else (TorchScript's `code/`,
#: `constants.pkl`, `extra/`) is refused before it is read
_TORCH_ZIP_RECORD = re.compile(
    r"data\.pkl|version|\.data/version|byteorder|\.format_version|\.storage_alignment|"
    r"\.data/serialization_id|data/\d+")


def _fail(source: Any, message: str, error: type[WaveGlowError] = CheckpointError) -> WaveGlowError:
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
STUB_CLASSES = frozenset({
    "glow.WaveGlow", "glow.WN", "glow.Invertible1x1Conv", "glow.WaveGlowLoss",
    "glow_old.WaveGlow", "glow_old.WN",
    "torch.nn.modules.conv.Conv1d", "torch.nn.modules.conv.ConvTranspose1d",
    "torch.nn.modules.container.ModuleList",
    "torch.nn.utils.weight_norm.WeightNorm",
    "torch.nn.modules.module._WrappedHook",
    "argparse.Namespace",
})


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
#: what a pickled model (not only tensors) may name besides TENSOR_GLOBALS and STUB_CLASSES
MODEL_GLOBALS = {
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


class _Refused(pickle.UnpicklingError):
    """A global off the allow-list (kept apart from format errors for the message)."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; `storages` resolves persistent ids (None: none allowed)."""

    def __init__(self, file: Any, models: bool = True, storages: Any = None):
        super().__init__(file, encoding="utf-8")
        self.models = models
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)  # protocol-2 pickles name Python 2 modules
        qualified = f"{module}.{name}"
        if qualified in TENSOR_GLOBALS:
            return TENSOR_GLOBALS[qualified]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if self.models and qualified in STUB_CLASSES:
            return _stub_class(qualified)
        if self.models and qualified in MODEL_GLOBALS:
            return MODEL_GLOBALS[qualified]
        allowed = "tensors" if not self.models else "a WaveGlow checkpoint"
        raise _Refused(f"refused to unpickle global '{qualified}': it is not on the allow-list of what "
                       f"{allowed} may contain (this file may run code when loaded with plain torch.load)")

    def persistent_load(self, pid: Any) -> Any:
        if self.storages is None:
            raise pickle.UnpicklingError("unexpected persistent id in a header pickle")
        return self.storages(pid)


def _unpickle(stream: io.BytesIO, models: bool, storages: Any = None) -> Any:
    return _RestrictedUnpickler(stream, models, storages).load()


# --- containers: torch zip, torch legacy, gzip --------------------------------------------------

def _storage_from_bytes(raw: bytes) -> torch.UntypedStorage:
    if not raw:
        return torch.UntypedStorage(0)
    return torch.UntypedStorage.from_buffer(raw, byte_order="little", dtype=torch.uint8)  # a copy


def _read_torch_zip(data: bytes, models: bool) -> Any:
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

    return _unpickle(io.BytesIO(archive.read(prefix + "data.pkl")), models, storage)


def _read_torch_legacy(data: bytes, models: bool) -> Any:
    """torch's pre-1.6 format: magic, version, sys_info, the object pickle, storage keys, then raw storages."""
    magic = pickle.dumps(_TORCH_MAGIC, protocol=2)  # torch wrote its legacy format with protocol 2
    stream = io.BytesIO(data)
    if stream.read(len(magic)) != magic:
        raise _Refused("refused: a bare pickle stream, not a torch checkpoint (no torch magic number); "
                       "it is not unpickled")
    if _unpickle(stream, models=False) != _TORCH_LEGACY_PROTOCOL:
        raise pickle.UnpicklingError("unknown torch legacy protocol version")
    sys_info = _unpickle(stream, models=False)
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

    result = _unpickle(stream, models, persistent)
    keys = _unpickle(stream, models=False)
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


def _read_pickled(data: bytes, source: Any, models: bool, error: type[WaveGlowError] = CheckpointError) -> Any:
    """Unpickle a torch zip or legacy file through the allow-list; any other pickle is refused unread."""
    try:
        if data[:4] == b"PK\x03\x04":
            return _read_torch_zip(data, models)
        return _read_torch_legacy(data, models)
    except _Refused as refused:
        raise _fail(source, str(refused), error) from None
    except RecursionError:
        raise _fail(source, "refused: the pickle nests too deeply", error) from None
    except MemoryError:
        raise _fail(source, "refused: the pickle needs more memory than is available", error) from None
    except Exception as cause:  # pickle and zip errors of all kinds: not what the file claims to be
        raise _fail(source, "not a readable torch checkpoint (truncated or corrupt?): "
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
                raise _fail(path, f"refused: inflates to more than {declared} (a decompression bomb?)", error)
            pending = inflater.unconsumed_tail
            if inflater.eof or not piece:  # with all input at hand, no output means no progress
                break
    except zlib.error as cause:
        raise _fail(path, f"corrupt gzip data: {cause}", error) from None
    if not inflater.eof:
        raise _fail(path, "truncated gzip file (the compressed stream ends early)", error)
    if inflater.unused_data:
        raise _fail(path, "unexpected data after the gzip stream", error)
    return bytes(out)


def _read_bytes(path: Path, error: type[WaveGlowError] = CheckpointError) -> bytes:
    if not path.exists():
        raise InputNotFound(f"{'checkpoint' if error is CheckpointError else 'file'} not found: {path}", path=path)
    if not path.is_file():
        raise _fail(path, "not a regular file", error)
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise _fail(path, f"refused: {size} bytes, more than the {MAX_FILE_BYTES} a checkpoint may have", error)
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = _gunzip(data, path, error)
    if not data:
        raise _fail(path, "empty file", error)
    return data


def _is_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    header_len = int.from_bytes(data[:8], "little")
    return 0 < header_len <= min(len(data) - 8, MAX_HEADER_BYTES) and data[8:9] == b"{"


def _is_torch_container(data: bytes) -> bool:
    return data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"


def _read_safetensors(data: bytes, source: Any, error: type[WaveGlowError] = CheckpointError
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, our metadata). The safetensors library validates offsets against the buffer."""
    try:
        header = json.loads(data[8: 8 + int.from_bytes(data[:8], "little")])
        state = load_safetensors(data)
    except (Exception, RecursionError) as cause:
        raise _fail(source, f"unreadable safetensors file (truncated or corrupt?): {str(cause)[:300]}",
                    error) from None
    try:
        stored = (header.get("__metadata__") or {}).get(FORMAT_NAME)
        info = json.loads(stored) if stored else {}
        if not isinstance(info, dict):
            raise TypeError(f"a {type(info).__name__}")
    except (ValueError, TypeError, AttributeError, RecursionError) as cause:
        raise _fail(source, f"the '{FORMAT_NAME}' metadata is not a JSON object ({cause})", error) from None
    return state, info


# --- from pickled objects / state dicts to our model -------------------------------------------

def _check_weights(state: Any, source: Any) -> dict[str, torch.Tensor]:
    """Every entry a named floating-point tensor with finite values (or the error names the entry)."""
    if not isinstance(state, Mapping):
        raise _fail(source, f"expected a state dict (names to tensors), found {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str):
            raise _fail(source, f"weight name {reprlib.repr(key)} is a {type(key).__name__}, expected a string")
        if not isinstance(value, torch.Tensor):
            raise _fail(source, f"weight '{key}' is a {type(value).__name__}, expected a tensor")
        if not value.is_floating_point():
            raise _fail(source, f"weight '{key}' has dtype {value.dtype}, expected floating point")
        if not bool(torch.isfinite(value).all()):
            raise _fail(source, f"weight '{key}' holds NaN or Inf values: the checkpoint is corrupt")
    return dict(state)


def _module_state(root: Any, source: Any) -> dict[str, Any]:
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
            raise _fail(source, f"refused: module '{where}' is reached twice (a shared or cyclic module "
                                "graph); a WaveGlow is a tree of modules")
        if depth > MAX_MODULE_DEPTH or len(seen) >= MAX_MODULES:
            raise _fail(source, f"refused: the module graph is deeper than {MAX_MODULE_DEPTH} or larger than "
                                f"{MAX_MODULES} modules")
        seen.add(id(module))
        attrs = getattr(module, "__dict__", None)
        if not isinstance(module, PickledObject) or not isinstance(attrs, dict):
            raise _fail(source, f"'{where}' is a {type(module).__name__}, expected a pickled module")
        for group in ("_parameters", "_buffers"):
            tensors = attrs.get(group) or {}
            if not isinstance(tensors, Mapping):
                raise _fail(source, f"'{where}'.{group} is a {type(tensors).__name__}, expected a dict")
            for name, tensor in tensors.items():
                if tensor is not None:
                    state[f"{prefix}{name}"] = tensor
        children = attrs.get("_modules") or {}
        if not isinstance(children, Mapping):
            raise _fail(source, f"'{where}'._modules is a {type(children).__name__}, expected a dict")
        stack.extend((child, f"{prefix}{name}.", depth + 1)
                     for name, child in reversed(list(children.items())) if child is not None)
    return state


def _config_from_pickled(model: Any, source: Any) -> dict[str, Any]:
    attrs = model.__dict__
    try:
        modules = attrs["_modules"]
        wn = modules["WN"].__dict__["_modules"]["0"].__dict__
        in_layer = wn["_modules"]["in_layers"].__dict__["_modules"]["0"].__dict__
        upsample = modules["upsample"].__dict__
        return dict(
            n_mel_channels=int(upsample["in_channels"]),
            n_flows=int(attrs["n_flows"]), n_group=int(attrs["n_group"]),
            n_early_every=int(attrs["n_early_every"]), n_early_size=int(attrs["n_early_size"]),
            n_layers=int(wn["n_layers"]), n_channels=int(wn["n_channels"]),
            kernel_size=int(in_layer["kernel_size"][0]),
            upsample_kernel=int(upsample["kernel_size"][0]), upsample_stride=int(upsample["stride"][0]),
            layout="glow_old" if model.pickled_name.startswith("glow_old.") else "glow",
        )
    except (KeyError, AttributeError, TypeError, IndexError, ValueError, RuntimeError, OverflowError) as error:
        raise _fail(source, f"pickled WaveGlow lacks an expected attribute ({reprlib.repr(error)})") from None


def _fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    folded = {}
    for key, value in state.items():
        if key.endswith("_g") and key[:-2] + "_v" in state:
            base = key[:-2]
            # dim 0, as torch.nn.utils.weight_norm uses by default and NVIDIA kept
            folded[base] = torch._weight_norm(state[base + "_v"].float(), value.float(), 0)
        elif key.endswith("_v") and key[:-2] + "_g" in state:
            continue
        else:
            folded[key] = value
    return folded


def _to_current_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map glow_old's per-layer `cond_layers` and split `res_layers`/`skip_layers` to glow.py names."""
    out: dict[str, torch.Tensor] = {}
    grouped: dict[tuple[str, str, str], dict[int, torch.Tensor]] = collections.defaultdict(dict)
    pattern = re.compile(r"^(WN\.\d+)\.(cond_layers|res_layers|skip_layers)\.(\d+)\.(weight|bias)$")
    for key, value in state.items():
        match = pattern.match(key)
        if match:
            wn, kind, index, param = match.groups()
            grouped[(wn, kind, param)][int(index)] = value
        else:
            out[key] = value
    for (wn, kind, param), layers in grouped.items():
        ordered = [layers[i] for i in sorted(layers)]
        if kind == "cond_layers":
            out[f"{wn}.cond_layer.{param}"] = torch.cat(ordered, 0)
        elif kind == "skip_layers":
            residual = grouped.get((wn, "res_layers", param), {})
            for i, skip in enumerate(ordered):
                merged = torch.cat([residual[i], skip], 0) if i in residual else skip
                out[f"{wn}.res_skip_layers.{i}.{param}"] = merged
    return out


def _normalise_state(state: Any, source: Any) -> dict[str, torch.Tensor]:
    """Check the weights, strip DataParallel prefixes, drop cached inverses, fold weight norm, map glow_old."""
    state = _check_weights(state, source)
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.endswith("W_inverse")}
    try:
        return _to_current_layout(_fold_weight_norm(state))
    except (RuntimeError, ValueError, IndexError, KeyError) as error:  # shapes that do not fit together
        raise _fail(source, f"weights do not fit together as a WaveGlow's: {str(error)[:300]}") from None


def _config_from_state(state: Mapping[str, torch.Tensor], source: Any, layout: str = "glow") -> dict[str, Any]:
    """Hyper-parameters read off the shapes of a normalised state dict."""
    try:
        n_flows = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("WN."))
        n_layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("WN.0.in_layers."))
        in_weight = state["WN.0.in_layers.0.weight"]
        sizes = [state[f"convinv.{k}.conv.weight"].shape[0] for k in range(min(n_flows, MODEL_LIMITS["n_flows"]))]
        upsample = state["upsample.weight"]
        if in_weight.dim() != 3 or upsample.dim() != 3:
            raise ValueError("3-d convolution weights")
    except (KeyError, ValueError, IndexError) as error:
        raise _fail(source, f"state dict does not look like WaveGlow (missing {error})") from None
    drops = [k for k in range(1, len(sizes)) if sizes[k] < sizes[k - 1]]
    return dict(
        n_mel_channels=int(upsample.shape[0]), n_flows=n_flows, n_group=int(sizes[0]),
        n_early_every=drops[0] if drops else n_flows, n_early_size=int(sizes[0] - sizes[drops[0]]) if drops else 2,
        n_layers=n_layers, n_channels=int(in_weight.shape[0] // 2), kernel_size=int(in_weight.shape[2]),
        upsample_kernel=int(upsample.shape[2]), layout=layout,
    )


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every weight a `WaveGlow(config)` holds, computed without building it."""
    c = config
    shapes = {"upsample.weight": (c.n_mel_channels, c.n_mel_channels, c.upsample_kernel),
              "upsample.bias": (c.n_mel_channels,)}
    n_half, n_remaining, channels, layers = c.n_group // 2, c.n_group, c.n_channels, c.n_layers

    def conv(name: str, out: int, into: int, kernel: int = 1, bias: bool = True) -> None:
        shapes[f"{name}.weight"] = (out, into, kernel)
        if bias:
            shapes[f"{name}.bias"] = (out,)

    for k in range(c.n_flows):
        if k > 0 and k % c.n_early_every == 0:
            n_half -= c.n_early_size // 2
            n_remaining -= c.n_early_size
        conv(f"convinv.{k}.conv", n_remaining, n_remaining, bias=False)
        conv(f"WN.{k}.start", channels, n_half)
        conv(f"WN.{k}.end", 2 * n_half, channels)
        conv(f"WN.{k}.cond_layer", 2 * channels * layers, c.n_mel_channels * c.n_group)
        for i in range(layers):
            conv(f"WN.{k}.in_layers.{i}", 2 * channels, channels, c.kernel_size)
            conv(f"WN.{k}.res_skip_layers.{i}", 2 * channels if i < layers - 1 else channels, channels)
    return shapes


def _check_config(config: Mapping[str, Any], source: Any) -> ModelConfig:
    """Sane limits first (before ModelConfig derives anything from the values), then its own checks."""
    flat = {**config, **(config.get("WN_config") if isinstance(config.get("WN_config"), Mapping) else {})}
    beyond = [f"{name}={flat[name]} (at most {limit})" for name, limit in MODEL_LIMITS.items()
              if isinstance(flat.get(name), int) and flat[name] > limit]
    if beyond:
        raise _fail(source, f"refused: hyper-parameters beyond what a WaveGlow uses: {', '.join(beyond)}")
    try:
        return ModelConfig.from_dict(config)
    except (ValueError, TypeError) as error:
        raise _fail(source, str(error)) from None


def _build(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], source: Any) -> WaveGlow:
    """`state` must be normalised (see `_normalise_state`). Everything is checked before the model is built."""
    model_config = _check_config(config, source)
    expected = expected_shapes(model_config)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = "; ".join(filter(None, [
            f"missing {len(missing)} (e.g. {', '.join(missing[:3])})" if missing else "",
            f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})" if unexpected else ""]))
        raise _fail(source, f"weights do not match a WaveGlow with {_describe(model_config)}: {detail}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise _fail(source, f"'{key}' has shape {tuple(state[key].shape)} but a WaveGlow with "
                                f"{_describe(model_config)} needs {shape}")
    model = WaveGlow(model_config)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    for name, tensor in model.state_dict().items():
        if not bool(torch.isfinite(tensor).all()):
            raise _fail(source, f"'{name}' is NaN or Inf once loaded (a weight-normed layer with zero norm?)")
    for k, conv in enumerate(model.convinv):
        try:
            conv.refresh_inverse()
        except RuntimeError:  # torch.linalg.inv of a singular matrix
            conv.W_inverse = torch.full_like(conv.W_inverse, math.inf)
        if not bool(torch.isfinite(conv.W_inverse).all()):
            raise _fail(source, f"'convinv.{k}.conv.weight' is singular: the flow cannot be inverted")
    return model


def _describe(config: ModelConfig) -> str:
    return (f"n_mel_channels={config.n_mel_channels}, n_flows={config.n_flows}, n_group={config.n_group}, "
            f"n_layers={config.n_layers}, n_channels={config.n_channels}, layout={config.layout}")


def _model_from_pickle(obj: Any, source: Any, override: Mapping[str, Any]) -> WaveGlow:
    if isinstance(obj, dict) and isinstance(obj.get("model"), PickledObject):
        obj = obj["model"]
    if isinstance(obj, PickledObject):
        if not obj.pickled_name.endswith(".WaveGlow"):
            raise _fail(source, f"expected a pickled WaveGlow, found {obj.pickled_name}")
        config = _config_from_pickled(obj, source)
        return _build(_normalise_state(_module_state(obj, source), source), {**config, **override}, source)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        config = obj.get("config") or {}
        if isinstance(config, PickledObject):  # an argparse.Namespace
            config = dict(config.__dict__)
        if not isinstance(config, Mapping):
            raise _fail(source, f"'config' is a {type(config).__name__}, expected a mapping")
        state = obj["state_dict"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        config, state = {}, obj
    else:
        keys = ", ".join(reprlib.repr(k) for k in list(obj)[:5]) if isinstance(obj, dict) else type(obj).__name__
        raise _fail(source, "not a WaveGlow checkpoint: expected a pickled model under 'model', "
                            f"a 'state_dict', or a state dict of tensors; found {keys}")
    state = _normalise_state(state, source)
    layout = "glow_old" if any(".cond_layers." in k for k in obj.get("state_dict", obj)) else "glow"
    known = set(ModelConfig.__dataclass_fields__) | {"WN_config"}
    config = {k: v for k, v in config.items() if k in known}
    return _build(state, {**_config_from_state(state, source, layout), **config, **override}, source)


# --- our format ---------------------------------------------------------------------------------

def save_waveglow(model: WaveGlow, path: str | Path, dtype: torch.dtype = torch.float32,
                  stft: STFTConfig = STFTConfig()) -> Path:
    """Write `model` as safetensors (+ JSON config in the header); `.gz` suffix compresses it.

    This is also how to make an untrusted checkpoint safe once: `save_waveglow(load_waveglow(x), y)`.
    """
    path = Path(path)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()
             if not k.endswith("W_inverse")}
    # one metadata key: safetensors writes several in hash order, and we want byte-identical files
    info = {"version": FORMAT_VERSION, "model_config": model.config.to_dict(), "stft_config": stft.to_dict()}
    data = save_safetensors(state, metadata={FORMAT_NAME: json.dumps(info, sort_keys=True)})
    if path.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=9, mtime=0)
    return atomic_write_bytes(path, data)


def _load_safetensors(data: bytes, source: Any, override: Mapping[str, Any]) -> WaveGlow:
    state, info = _read_safetensors(data, source)
    state = _normalise_state(state, source)
    config = info.get("model_config")
    if config is not None and not isinstance(config, Mapping):
        raise _fail(source, f"'model_config' in the header is a {type(config).__name__}, expected an object")
    config = config if config is not None else _config_from_state(state, source)
    return _build(state, {**config, **override}, source)


def read_stft_config(path: str | Path | None = None) -> STFTConfig:
    """The STFT settings stored with a model in our format (defaults for other formats)."""
    path = Path(path) if path else DEMO_MODEL_PATH
    data = _read_bytes(path)
    if not _is_safetensors(data):
        return STFTConfig()
    stored = _read_safetensors(data, path)[1].get("stft_config", {})
    fields = {f.name: f.type for f in dataclasses.fields(STFTConfig)}
    if not isinstance(stored, Mapping) or set(stored) - set(fields) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
            for v in stored.values()):
        raise _fail(path, f"'stft_config' in the header must map {', '.join(fields)} to finite numbers >= 0, "
                          f"got {reprlib.repr(stored)}")
    return STFTConfig(**stored)


# --- entry points ---------------------------------------------------------------------------------

def load_waveglow(checkpoint: str | Path | None = None, config: ModelConfig | Mapping[str, Any] | None = None,
                  device: str | torch.device = "cpu") -> WaveGlow:
    """Load a WaveGlow in eval mode; `checkpoint=None` gives the bundled demo model.

    `config` overrides or fills in hyper-parameters the checkpoint does not carry.
    """
    path = Path(checkpoint) if checkpoint is not None else DEMO_MODEL_PATH
    override = config.to_dict() if isinstance(config, ModelConfig) else dict(config or {})
    data = _read_bytes(path)
    if _is_safetensors(data):
        model = _load_safetensors(data, path, override)
    elif _is_torch_container(data):  # torch zip archive, or a legacy pickle stream
        model = _model_from_pickle(_read_pickled(data, path, models=True), path, override)
    else:
        raise _fail(path, "not a WaveGlow checkpoint (expected a torch .pt/.pth file or safetensors written "
                          "by save_waveglow)")
    return model.to(device).eval()


def model_fingerprint(model) -> str:
    """16 hex digits of sha256 over the config and every weight: what derived artefacts are stamped with."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_tensor_file(path: str | Path, error: type[WaveGlowError] = CheckpointError
                     ) -> torch.Tensor | dict[str, torch.Tensor]:
    """A tensor, or a dict of named tensors, from a torch `.pt` file or safetensors (optionally gzipped).

    The same container checks and allow-list as checkpoints, narrower still: only tensors, dicts of them
    and their sizes may be named, so any class (a module, a TorchScript archive, ...) is refused.
    `error` is the type raised (e.g. MelError for mel files); its message names the file.
    """
    path = Path(path)
    data = _read_bytes(path, error)
    if _is_safetensors(data):
        return _read_safetensors(data, path, error)[0]
    if not _is_torch_container(data):
        raise _fail(path, "not a tensor file (expected torch.save output or safetensors)", error)
    obj = _read_pickled(data, path, models=False, error=error)
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return dict(obj)
    raise _fail(path, f"expected a tensor or a dict of named tensors, found {type(obj).__name__}", error)
