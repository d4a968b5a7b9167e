"""What made an output, and whether a file is still what its record says: resume stamps, and the content
hashes of the run's files, cached in the run folder.

Every stage that skips finished work compares one thing, a resume stamp (`stage_stamp`): the fingerprint
of the model that shaped the output (`checkpoint.model_fingerprint`, a hash of its config and weights),
the settings that shape it, and the hash of its source when it has one. An output whose record holds the
run's stamp is reused (`is_current`); any other is redone (export, convert, postprocess, vocode) or refused
with the reason (infer, which does not mix outputs of other settings). The checkpoint's path is never part
of a stamp: the same model at another path is the same model, another model at the same path is not.

Files are known by their content, never by their names or times. A record holds each output's size and
sha256 (`FileStamps.entry`), and a file is reused only while it still has them (`FileStamps.changed`): an
output cut short, replaced by another or turned into a link is made again, naming it; an input that is not
what its record says (the ONNX graph, the OpenVINO IR) is refused, naming it. What a file's content hashes
to (its sha256; for the checkpoint, its model fingerprint and STFT settings) is kept in
`runs/<name>/.file_stamps.json`, keyed by the file's resolved path, device, inode, size, mtime and ctime: a
file replaced, even with its old size and mtime put back (os.utime), has another inode or ctime and is
read anew, so re-runs stay cheap (one stat per file) without trusting times a user can set. A value read
while the file may still have been changing (its ctime within RACY_NS of the read: file system clocks are
coarse) is not trusted until read again later, as git treats "racily clean" entries.

The cache is not trusted as proof of content merely because it is there (issue 38): whoever can write the
run folder could swap an output and rewrite its entry (new stat, old sha256). Each entry carries an
HMAC-SHA256 under this user's secret (`userkey`, the key the engine cache proves its entries with, 0600 in
the user's cache folder) over the file's path, its stat key and every value; an entry whose MAC does not
match (forged, copied from another user's run, written without a secret) is read anew from the file's
content. Where no secret can be kept (a read-only home, a refused key file) nothing is cached: each file's
content is hashed whenever it is asked for (said once on stderr).
"""
from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from .checkpoint import load_waveglow, model_fingerprint, read_stft_config
from .config import DEMO_MODEL_PATH, STFTConfig, WorkflowConfig, from_mapping
from .errors import ConfigError, DataError, InputNotFound, ResourceError, WaveGlowError
from .io import atomic_write_json, sha256_file
from .layout import FILE_STAMPS_FILE as CACHE_NAME
from .records import OUTPUT_KEY, SOURCE_KEY, FileStampsCache, read_record
from .userkey import default_cache_dir, folder_secret, mac, proven

#: what the cache file holds, for its errors
STAMPS_WHAT = "the run's file stamps (content hashes by path and stat)"
#: a run's cache holds at most this many files (the oldest are dropped: read again when next asked)
_MAX_ENTRIES = 200_000
#: a value read less than this after the file's last change is read again next time (coarse fs clocks)
RACY_NS = 2_000_000_000
#: unsaved values are written to the cache at most this often (and when a stage ends, `FileStamps.save`)
_SAVE_EVERY_S = 10.0
#: the stamp's key for the model's fingerprint (those of the source's sha256 and a record entry's output:
#: `records.SOURCE_KEY`, `records.OUTPUT_KEY`)
MODEL_KEY = "model"
#: `stage_stamp`'s default: the fingerprint of the model given, else of the run's checkpoint
RUN_MODEL = "<the run's model>"


#: an entry's key for its MAC (`_entry_mac`)
MAC_KEY = "mac"
#: the user's secret, read once per process (None: none can be kept; then nothing is cached)
_secret: list = []


def _refuse_key(path: Path, problem: str) -> DataError:
    return DataError(f"{path}: refused as your secret key: {problem}; delete it (a new one is made)", path=path)


def user_secret() -> bytes | None:
    """This user's secret (`userkey.folder_secret` in `userkey.default_cache_dir()`), or None when none can be
    kept or the file there is refused (said once: the file stamps then cache nothing)."""
    if not _secret:
        try:
            _secret.append(folder_secret(default_cache_dir(), _refuse_key))
        except (OSError, DataError) as exc:
            print(f"file stamps: no secret key ({exc}); every file's content is hashed whenever it is checked",
                  file=sys.stderr)
            _secret.append(None)
    return _secret[0]


def _entry_record(name: str, entry: dict) -> dict:
    """What a cache entry's MAC covers: the file's resolved path, its stat key and every value."""
    return {"path": name, **{k: v for k, v in entry.items() if k != MAC_KEY}}


def _stat_key(info: os.stat_result) -> str:
    # ctime cannot be set back by a user (os.utime itself moves it): a replaced file never keeps its key
    return f"{info.st_dev}|{info.st_ino}|{info.st_size}|{info.st_mtime_ns}|{info.st_ctime_ns}"


class FileStamps:
    """What the files a run reads and writes hash to, cached by path and stat (see the module's docstring).

    One per run folder and process (`file_stamps`); values are written to the cache now and then and by
    `save`, which a stage calls when it ends (an unsaved value is only read again, never wrong)."""

    def __init__(self, cache_path: Path) -> None:
        self.cache_path = cache_path
        self._entries: dict | None = None
        self._unsaved: dict = {}
        self._last_save = time.monotonic()

    @property
    def entries(self) -> dict:
        if self._entries is None:  # a damaged cache is rebuilt
            self._entries = read_record(self.cache_path, FileStampsCache, STAMPS_WHAT)
        return self._entries

    def value(self, path: str | Path, field: str, compute, *, save_now: bool = False,
              valid: Callable[[Any], bool] = lambda value: isinstance(value, str)):
        """`compute()` (a value of the file's content), or what it gave for this very file before, when it is
        `valid` (by default a string, as a hash is): a damaged cache is computed again, never trusted."""
        name = str(Path(path).resolve())
        try:
            before = os.stat(path)
        except FileNotFoundError:
            raise InputNotFound(f"{path}: not found", path=Path(path)) from None
        key = _stat_key(before)
        secret = user_secret()
        if secret is None:
            return compute()  # nothing can prove a cached value: the content is read every time
        entry = self.entries.get(name)
        trusted = (isinstance(entry, dict) and entry.get("stat") == key
                   and isinstance(entry.get("checked_ns"), int)
                   and before.st_ctime_ns < entry["checked_ns"] - RACY_NS
                   and proven(secret, _entry_record(name, entry), entry.get(MAC_KEY)))
        if trusted and field in entry and valid(entry[field]):
            return entry[field]
        checked_ns = time.time_ns()
        value = compute()
        if _stat_key(os.stat(path)) != key:
            return value  # changed while it was read: the value may be of either content, so not kept
        entry = dict(entry) if trusted else {"stat": key, "checked_ns": checked_ns}
        entry[field] = value
        entry[MAC_KEY] = mac(secret, _entry_record(name, entry))
        self.entries.pop(name, None)
        self.entries[name] = self._unsaved[name] = entry
        if save_now or time.monotonic() - self._last_save > _SAVE_EVERY_S:
            self.save()
        return value

    def sha256(self, path: str | Path, what: str = "a file", error: type[WaveGlowError] = DataError) -> str:
        """The sha256 of the file's content (`io.sha256_file`, whose `error` names a FIFO or a folder)."""
        return self.value(path, "sha256", lambda: sha256_file(path, what, error))

    def entry(self, path: str | Path) -> dict:
        """What a record holds of a file it describes (an output just written, a model file): size and sha256."""
        return {"size": os.stat(path).st_size, "sha256": self.sha256(path)}

    def changed(self, path: str | Path, recorded) -> str | None:
        """Why the file at `path` is not the one `recorded` (an `entry`) describes, or None when it is.
        A link is never the recorded file: what was written was a file, and writes replace links."""
        path = Path(path)
        if not (isinstance(recorded, dict) and isinstance(recorded.get("size"), int)
                and isinstance(recorded.get("sha256"), str)):
            return "no size and content hash of it is recorded"
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return "it is missing"
        if stat.S_ISLNK(info.st_mode):
            return "it is a symbolic link, not the file that was written"
        if not stat.S_ISREG(info.st_mode):
            return "it is not a regular file"
        if info.st_size != recorded["size"]:
            return f"it has {info.st_size} bytes, its record {recorded['size']}"
        try:
            if self.sha256(path) != recorded["sha256"]:
                return "its content differs from its record (same size, another sha256)"
        except (DataError, InputNotFound, OSError) as exc:
            return f"it cannot be read ({exc})"
        return None

    def files_changed(self, folder: str | Path, files, *, including: str) -> str | None:
        """"<file>: why" for the first file of a record's `files` ({name: entry}, names in `folder`) that is not
        as recorded, or None when all are; a record that does not list `including` is not a record of it."""
        folder = Path(folder)
        if not isinstance(files, dict) or including not in files:
            return f"{folder / including}: no size and content hash of it is recorded"
        for name, recorded in files.items():
            if not isinstance(name, str) or name != Path(name).name or name in ("", ".", ".."):
                return f"{folder}: its record names {name!r}, not a file in that folder"
            why = self.changed(folder / name, recorded)
            if why:
                return f"{folder / name}: {why}"
        return None

    def save(self) -> None:
        """Add the values computed since the last save to the cache file (merged with what is there)."""
        if not self._unsaved:
            return
        cache = read_record(self.cache_path, FileStampsCache, STAMPS_WHAT)
        for name, entry in self._unsaved.items():
            cache.pop(name, None)
            cache[name] = entry
        while len(cache) > _MAX_ENTRIES:
            cache.pop(next(iter(cache)))
        self._unsaved, self._entries, self._last_save = {}, cache, time.monotonic()
        try:
            atomic_write_json(self.cache_path, cache)
        except ResourceError:
            pass  # read-only run folder or full disk: the values are still right, only not kept


#: cache file → its FileStamps in this process
_open: dict[Path, FileStamps] = {}


def file_stamps(cfg: WorkflowConfig) -> FileStamps:
    """The run's FileStamps (one per run folder in this process)."""
    cache_path = cfg.run_dir / CACHE_NAME
    if cache_path not in _open:
        _open[cache_path] = FileStamps(cache_path)
    return _open[cache_path]


def announce_redo(what: str) -> str:
    """Say (on stderr, past any progress bar) that a finished output is made again: `what` is "<file>: why";
    returned for the stage's summary ("redone": {id: what})."""
    tqdm.write(f"{what}; made again", file=sys.stderr)
    return what


def _cached(cfg: WorkflowConfig, field: str, compute, **checks) -> object:
    """`FileStamps.value` of the run's checkpoint (`checks`: its `valid`)."""
    path = cfg.checkpoint_path or DEMO_MODEL_PATH
    if not path.is_file():
        return compute()  # the loader's own error names the missing file
    return file_stamps(cfg).value(path, field, compute, save_now=True, **checks)


def forget_checkpoints(cfg: WorkflowConfig) -> None:
    """Drop the run's file stamps (`--force`: nothing earlier runs computed is trusted)."""
    cache_path = cfg.run_dir / CACHE_NAME
    _open.pop(cache_path, None)
    if cache_path.is_file() and not cache_path.is_symlink():
        try:
            cache_path.unlink()
        except OSError:
            pass  # a read-only run folder: its cache is keyed by content-changing stats anyway


def fingerprint_of(model) -> str:
    """`model_fingerprint(model)`, hashed anew at every call: a weight edited in place through `.data` (a
    notebook's `p.data.copy_(...)`) bumps no version counter torch keeps, so no memo can know it is stale;
    the hash costs a read of the weights (a fraction of one synthesis), paid once per stage."""
    return model_fingerprint(model)


def model_stamp(cfg: WorkflowConfig, model=None) -> str:
    """The fingerprint of `model` when given, else of the run's checkpoint (cached, see above)."""
    if model is not None:
        return fingerprint_of(model)
    return _cached(cfg, "fingerprint", lambda: model_fingerprint(load_waveglow(cfg.checkpoint_path)))


def checkpoint_stft(cfg: WorkflowConfig) -> STFTConfig:
    """The STFT settings the run's model was trained with (cached, as the fingerprint)."""
    return from_mapping(STFTConfig, _cached(cfg, "stft", lambda: read_stft_config(cfg.checkpoint_path).to_dict(),
                                            valid=_stft_settings), "the checkpoint's STFT settings")


def _stft_settings(value) -> bool:
    """Whether a cached value is a whole set of STFT settings of the right types."""
    try:
        return isinstance(value, dict) and set(value) == set(STFTConfig().to_dict()) \
            and from_mapping(STFTConfig, value) is not None
    except ConfigError:
        return False


def stage_stamp(cfg: WorkflowConfig | None, settings: dict, *, model=None, fingerprint=RUN_MODEL,
                source_sha256: str | None = None) -> dict:
    """The resume stamp of an output: `{"model": fingerprint, **settings, "source_sha256": sha}`.

    The fingerprint is, by default, `model_stamp(cfg, model)` (of `model`, else of the run's checkpoint);
    a `fingerprint` given is used as it is (the one an ONNX's record names, for what is converted from
    it), and None leaves the model out (an output no model shapes). `source_sha256` is left out when None
    (a source the stage does not hash).
    """
    if fingerprint is RUN_MODEL:
        fingerprint = model_stamp(cfg, model)
    stamp: dict = {MODEL_KEY: fingerprint} if fingerprint is not None else {}
    stamp.update(settings)
    if source_sha256 is not None:
        stamp[SOURCE_KEY] = source_sha256
    return stamp


def differences(recorded: dict, expected: dict) -> dict:
    """{key: (recorded, expected)} for every key of `expected` the record disagrees with, and for a model or
    source the record names where `expected` has none (an output made by a model is not one made by none)."""
    recorded = recorded if isinstance(recorded, dict) else {}
    keys = list(expected) + [k for k in (MODEL_KEY, SOURCE_KEY) if k in recorded and k not in expected]
    return {k: (recorded.get(k), expected.get(k)) for k in keys if recorded.get(k) != expected.get(k)}


def is_current(record, stamp: dict) -> bool:
    """Whether an output's record holds `stamp` (what a stamp leaves out, like timings, is not compared)."""
    return isinstance(record, dict) and not differences(record, stamp)


def describe(changed: dict) -> str:
    return ", ".join(f"{k}: {a!r} (file) vs {b!r} (now)" for k, (a, b) in changed.items())


def model_changed(cfg: WorkflowConfig, changed: dict) -> str:
    """The sentence that names the cause when the model is among `changed` ("" otherwise)."""
    if MODEL_KEY not in changed:
        return ""
    if changed[MODEL_KEY][0] is None:  # a record from before fingerprints were kept
        return f"no model fingerprint is recorded for them, so they cannot be trusted to be {cfg.checkpoint}'s"
    return f"the checkpoint {cfg.checkpoint} is another model than the one they were made with"
