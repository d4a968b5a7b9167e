"""The engine cache: a built `FastEngine`'s tensors and `precision: auto`'s verdict on disk, so that a model
loaded before on this machine is ready in seconds.

Layout (`cache_dir`, default `$WAVEGLOW_CACHE_DIR`, else `$XDG_CACHE_HOME/waveglow-workflow`, else
`~/.cache/waveglow-workflow`):

    secret.key                           this user's key for the entries' MACs (32 random bytes, 0600)
    fast/engine-<key>/meta.json          what the entry is (its key's fields), each file's sha256, int8's
                                         calibrated activation ranges, and the MAC
    fast/engine-<key>/flow<k>.safetensors the engine's tensors of flow k (`engine.flow_arrays`)
    fast/probe-<key>.json                precision: auto's verdict for a model on this machine, with its MAC

The key is a hash of the model's fingerprint (`checkpoint.model_fingerprint`: its config and every
weight), the precision, the CPU (`hardware.cpu_signature`), the library versions and the entry format: any
change makes another key, and an old entry is never read again.

An entry proves it is this model's before it is used: its meta.json carries an HMAC-SHA256, made with the
cache's secret, over the key fields (this model's fingerprint, computed here, not read from the entry),
every file's sha256 and the activation ranges, and each file's tensors are checked against that sha256 before they are used. Whoever
can write to the cache but cannot read the secret cannot make an entry pass: flow files swapped for
corrupt or foreign ones with meta.json's hashes rewritten to match, an entry copied from another cache,
or one written with another secret are misses, rebuilt and replaced with a warning (`events`: "rebuilt:
not proven ..."), never used. Anything else (missing, truncated, corrupt, another format) is rebuilt the
same way; a verdict is used only when its MAC matches, else the probe runs again.

The secret is `<cache_dir>/secret.key`, made once by the first process that needs it (O_CREAT|O_EXCL,
rights 0600: two processes never both make one); it is refused with a one-line BackendError when it is
not a regular file (a link, a folder), belongs to another user, is readable or writable by others, has
other hard links or is not 32 bytes: delete it and a new one is made (every entry is then rebuilt once).
A cache folder where no secret can be made (read-only) is not used: the engine is built and not stored.
Every file is read only when it is a regular file (not a link) of a bounded size: a link to a device
would be read until memory runs out. Tensors are stored as safetensors (no pickles) and loaded by the
safetensors library from the file opened once; the sha256 is that of the file the loaded tensors make,
so what is proven is what is used (a file changed after the check cannot slip in). oneDNN's packed
int8 weights cannot be serialised: the entry holds the int8 weights and their scales, and they are packed
again at load (`engine._Int8Gemm`, bit-identical to a fresh build).

Entries are written into a temporary folder and renamed into place, so a crash or a concurrent build never
leaves a half-written entry under a key.
"""
from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import platform
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import safetensors
import safetensors.torch
import torch

from ...checkpoint import model_fingerprint
from ...errors import BackendError
from ...hardware import CpuMeter, choose_threads, cpu_signature, usable_cpus
from ...io import atomic_write_json, file_kind, open_bounded
from ...records import EngineMeta, ProbeVerdict, read_record
from ...userkey import CACHE_ENV, SECRET_BYTES, SECRET_NAME, default_cache_dir, folder_secret, mac
from .engine import FastEngine, LoadTimes, flow_arrays, native_precision

#: bump when what an entry holds changes (tensor names, layout, quantisation, its proof)
CACHE_FORMAT = 8
#: meta.json and a verdict are a few KiB; one flow's tensors of the official model about 90 MB (bf16)
MAX_META_BYTES = 2**20
MAX_FLOW_BYTES = 2**30
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


def _refuse_secret(path: Path, problem: str) -> BackendError:
    return BackendError(f"engine cache: {path}: refused as the cache's secret: {problem}; delete it (a new "
                        f"one is made, and every cached engine is rebuilt once) or set another cache_dir", path=path)


def cache_secret(root: Path) -> bytes:
    """The cache's secret (`<root>/secret.key`, `userkey.folder_secret`): BackendError for a file there that is
    not one this user made; OSError when the folder cannot hold one (read-only, not a folder)."""
    return folder_secret(root, _refuse_secret)


#: the dtypes an entry's tensors have (safetensors' names)
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "I8": torch.int8, "F64": torch.float64}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def _flow_chunks(tensors: dict[str, torch.Tensor]) -> list:
    """The bytes of a flow file as this cache writes it, in order, as views of the tensors' memory (no copy):
    the safetensors header's length, the header (largest element size first, so that every span is
    aligned; padded to 8 bytes), then each tensor's bytes. The writer writes them; the reader hashes them
    again from the tensors it loaded (`_read_flow`)."""
    order = sorted(tensors, key=lambda key: (-tensors[key].element_size(), key))
    header, chunks, offset = {}, [], 0
    for key in order:
        tensor = tensors[key].contiguous()
        chunk = tensor.reshape(-1).view(torch.uint8).numpy()  # its bytes, no copy
        header[key] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + chunk.size]}
        chunks.append(chunk)
        offset += chunk.size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the tensors' bytes start 8-aligned
    return [len(head).to_bytes(8, "little"), head, *chunks]


def _write_flow(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write `tensors` to `path` as a safetensors file straight from their memory (`_flow_chunks`); returns
    the file's sha256, hashed as it is written. Read back by the safetensors library (`_read_flow`). Why
    not its writer: `safetensors.torch.save` copies each tensor twice first, and the copies slowed the
    packing the writer thread overlaps — the official model's first int8 load spent store 2.7 s with it,
    1.3 s with this (AMD EPYC, 2 cores, commit f1e219b; docs/benchmarks.md)."""
    digest = hashlib.sha256()
    with open(path, "xb") as handle:
        for chunk in _flow_chunks(tensors):
            digest.update(chunk)
            handle.write(chunk)
    return digest.hexdigest()


def _read_flow(path: Path, sha256: str, times: LoadTimes) -> dict[str, torch.Tensor]:
    """A flow file's tensors, loaded by the safetensors library from the file this opened (a regular file
    of bounded size, not a link: `io.open_bounded`), then proven: the sha256 of the file they make
    (`_flow_chunks`) must be `sha256`. What is hashed is what is used — the tensors copied out of the
    file's pages, not the file again (it could have changed since). ValueError when the digest or a dtype
    is not one an engine holds."""
    with open_bounded(path, "a flow's tensors", MAX_FLOW_BYTES, follow_links=False) as handle:
        with times.phase("read"):
            opened = f"/proc/self/fd/{handle.fileno()}"
            mapped = safetensors.torch.load_file(opened if os.path.exists(opened) else path)
            # the library's tensors are views of the file's pages (mmap): copied out, so that the file
            # changed or truncated later cannot change (or crash) the engine; one copy, as read() was
            tensors = {key: tensor.clone() for key, tensor in mapped.items()}
            del mapped
    for key, tensor in tensors.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {key!r}: {tensor.dtype}, not one an engine holds")
    with times.phase("verify"):
        digest = hashlib.sha256()
        for chunk in _flow_chunks(tensors):
            digest.update(chunk)
        if not hmac.compare_digest(digest.hexdigest(), sha256):
            raise ValueError(f"{path.name}: sha256 differs from meta.json (corrupt)")
    return tensors


def _meta_record(fields: dict, files: dict, activations: dict | None) -> dict:
    """What an engine entry's meta.json says, and its MAC covers."""
    return {"key": fields, "files": files, "activations": activations}


_mac = mac


class EngineCache:
    """Built engines and auto verdicts of models on this machine, under `root` (see the module doc).

    `engine(model, precision)` returns the cached engine or builds it (and stores it); `verdict` /
    `store_verdict` hold `auto_engine`'s record. `self.events` lists what happened ("hit", "built",
    "rebuilt: <why>") for the caller's description and the tests. The secret is read (or made) on first
    use: BackendError when the file there is not one this user made (see `_read_secret`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.events: list[str] = []
        self._environment = environment_key()
        self._fingerprints: dict[int, str] = {}
        self._secret: bytes | None = None
        self._no_secret: str | None = None  # why this cache folder cannot hold a secret (then nothing is used)

    def secret(self) -> bytes | None:
        """The cache's secret, or None when the folder cannot hold one (then entries are neither used nor
        stored)."""
        if self._secret is None and self._no_secret is None:
            try:
                self._secret = cache_secret(self.root)
            except OSError as exc:
                self._no_secret = f"no secret can be kept in {self.root} ({exc.strerror or exc})"
        return self._secret

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
        when an entry exists and proves itself, else built and stored. `options`: FastEngine's block_frames /
        threads. `engine.load_times`: seconds per phase (fingerprint, fold, arrays, pack, store; read,
        verify)."""
        precision = native_precision(precision)
        times = LoadTimes()
        with times.phase("fingerprint"):
            folder = self.engine_dir(model, precision)
            fields = self.engine_fields(model, precision)
        secret = self.secret()
        files, activations, problem = self._proven_files(folder, fields, model.config.n_flows, secret)
        if files is not None:
            try:
                # float entries need no packing: read them on every free core
                workers = 1 if precision == "int8" else choose_threads(usable_cpus(), CpuMeter().others_busy(),
                                                                      options.get("threads"))
                engine = FastEngine(model, precision, flows=self._read_flows(folder, files, times, workers),
                                    load_times=times, activations=activations, **options)
                self.events.append("hit")
                return engine
            except Exception as exc:  # noqa: BLE001  any failure to read an entry: never trusted, rebuilt
                problem = f"unreadable ({type(exc).__name__}: {exc})"
        if problem != "missing":
            _warn(folder, f"{problem}; rebuilt")
        self.events.append("built" if problem == "missing" else f"rebuilt: {problem}")
        return self._build(model, precision, folder, fields, secret, times, **options)

    def _proven_files(self, folder: Path, fields: dict, n_flows: int,
                      secret: bytes | None) -> tuple[dict | None, dict | None, str | None]:
        """(each flow file's sha256, the activation ranges, None) when the entry at `folder` is complete,
        matches `fields` and its MAC proves it was written with this cache's secret for them; else (None,
        None, why not)."""
        meta_path = folder / "meta.json"
        if folder.is_symlink():
            return None, None, "not an entry this cache wrote (a symbolic link)"
        if not (meta_path.exists() or meta_path.is_symlink()):
            return None, None, "missing"
        damage: list[str] = []
        meta = read_record(meta_path, EngineMeta, "an engine's meta.json", on_damage=damage.append,
                           max_bytes=MAX_META_BYTES, follow_links=False)
        if damage or not meta:
            return None, None, f"meta.json unreadable ({damage[0] if damage else _not_regular(meta_path)})"
        if meta.get("key") != fields:
            return None, None, "stale (its key fields differ)"
        files, activations = meta.get("files"), meta.get("activations")
        names = [f"flow{k:02d}.safetensors" for k in range(n_flows)]
        if not isinstance(files, dict) or sorted(files) != names:
            return None, None, "incomplete (file list)"
        if secret is None:
            return None, None, f"not proven: {self._no_secret}"
        if not hmac.compare_digest(str(meta.get("mac", "")), _mac(secret, _meta_record(fields, files, activations))):
            return None, None, ("not proven (its MAC does not match this cache's secret and this model: "
                                "altered, or written with another secret)")
        return files, activations, None

    def _read_flows(self, folder: Path, files: dict, times: LoadTimes,
                    workers: int = 1) -> Iterator[dict[str, torch.Tensor]]:
        """Each flow's tensors, in order, its bytes checked against the proven sha256 (`files`) before they
        are used (`_read_flow`, the safetensors library). `workers` threads load and hash flows ahead of
        the one being packed (hashing and the library's copy run outside the GIL), at most
        `workers` flows ahead: the caller says how many (`EngineCache.engine`: the cores other processes
        leave free, and one where the engine packs int8 weights, as a second thread slowed oneDNN's reorder
        by as much as it hid; docs/benchmarks.md, "Figures behind constants")."""
        def load(name: str) -> dict[str, torch.Tensor]:
            return _read_flow(folder / name, files[name], times)

        names = sorted(files)
        if workers <= 1:
            yield from map(load, names)
            return
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="engine-cache-reader") as pool:
            pending = [pool.submit(load, name) for name in names[:workers]]
            queued = iter(names[workers:])
            try:
                while pending:
                    tensors = pending.pop(0).result()
                    pending.extend(pool.submit(load, name) for name in itertools.islice(queued, 1))
                    yield tensors
            finally:  # an error (or a consumer that stops early) leaves nothing running behind it
                for future in pending:
                    future.cancel()

    def _build(self, model, precision: str, folder: Path, fields: dict, secret: bytes | None, times: LoadTimes,
               **options) -> FastEngine:
        """Build the engine flow by flow, writing each flow's tensors into a temporary folder on a writer
        thread while the next flow is folded and packed (serialising, hashing and writing are mostly
        outside the GIL); the folder becomes the entry (rename) once complete. A cache that cannot be
        written (or holds no secret) is skipped."""
        files: dict[str, str] = {}
        tmp: Path | None = None
        if secret is not None:
            try:
                folder.parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
            except OSError:
                tmp = None

        def store(name: str, arrays: dict[str, torch.Tensor]) -> None:
            with times.phase("store"):
                files[name] = _write_flow(tmp / name, arrays)

        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-cache-writer")
        stored = []

        def flows() -> Iterator[dict[str, torch.Tensor]]:
            for k in range(model.config.n_flows):
                arrays = flow_arrays(model, k, precision, times)
                if tmp is not None:
                    stored.append(writer.submit(store, f"flow{k:02d}.safetensors", arrays))
                yield arrays

        try:
            engine = FastEngine(model, precision, flows=flows(), load_times=times, plan_load=True, **options)
        except BaseException:
            writer.shutdown(wait=True)
            if tmp is not None:  # no half-written entry left behind
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        writer.shutdown(wait=True)
        failures = [f.exception() for f in stored if f.exception() is not None]
        if failures:
            shutil.rmtree(tmp, ignore_errors=True)  # a full or read-only disk: the engine is used, not stored
            tmp = None
            if not isinstance(failures[0], OSError):
                raise failures[0]
        if tmp is not None:
            try:
                record = _meta_record(fields, files, engine.activations)
                atomic_write_json(tmp / "meta.json", {**record, "mac": _mac(secret, record)})
                if folder.is_symlink():  # planted: the link goes, not what it points to
                    folder.unlink()
                elif folder.exists():  # a stale, corrupt or unproven entry under this key: replaced
                    shutil.rmtree(folder, ignore_errors=True)
                os.rename(tmp, folder)
            except OSError:  # another process committed the same key first, or the disk is read-only
                shutil.rmtree(tmp, ignore_errors=True)
        return engine

    # --- auto's verdict -----------------------------------------------------------------------------------
    def verdict(self, model, probe_settings: dict) -> dict | None:
        """The stored `auto_engine` record for this model on this machine, or None (missing, stale, corrupt,
        edited or written with another secret: each but missing with a warning, and the probe runs again)."""
        path = self.probe_path(model, probe_settings)
        if not (path.exists() or path.is_symlink()):
            return None
        fields = self.probe_fields(model, probe_settings)
        damage: list[str] = []
        stored = read_record(path, ProbeVerdict, "a probe verdict", on_damage=damage.append,
                             max_bytes=MAX_META_BYTES, follow_links=False)
        if damage or not stored:
            why = damage[0].removeprefix(f"{path}: ") if damage else _not_regular(path)
            return _warn(path, f"unreadable ({why}); probing again")
        record = stored.get("record")
        if not isinstance(record, dict) or stored.get("key") != fields \
                or record.get("precision") not in ("int8", "bf16", "fp32"):
            return _warn(path, "not a verdict for this model and machine; probing again")
        secret = self.secret()
        if secret is None:
            return _warn(path, f"not proven: {self._no_secret}; probing again")
        if not hmac.compare_digest(str(stored.get("mac", "")), _mac(secret, {"key": fields, "record": record})):
            return _warn(path, "not proven (its MAC does not match this cache's secret: edited, or written with "
                               "another secret); probing again")
        return record

    def store_verdict(self, model, probe_settings: dict, record: dict) -> None:
        secret = self.secret()
        if secret is None:
            return  # no secret, no proof: the probe runs again next time
        path = self.probe_path(model, probe_settings)
        fields = self.probe_fields(model, probe_settings)
        try:
            atomic_write_json(path, {"key": fields, "record": record, "mac": _mac(secret, {"key": fields, "record": record})})
        except OSError:
            pass  # a read-only cache: the probe runs again next time


def _not_regular(path: Path) -> str:
    """Why `records.read_record` found no record at a path that is there: it is not a regular file (a link
    is not followed: the cache's files are ours, never links)."""
    try:
        return f"not a regular file ({file_kind(os.lstat(path))})"
    except OSError:
        return "removed since the look"


def _warn(path: Path, problem: str) -> None:
    """A cache file that is there but not trusted: say so (it is rebuilt or re-probed, never used)."""
    warnings.warn(f"engine cache: {path}: {problem}", RuntimeWarning, stacklevel=3)
