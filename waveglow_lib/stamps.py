"""What made an output: resume stamps, and fingerprints of the run's checkpoint cached in the run folder.

Every stage that skips finished work compares one thing, a resume stamp (`stage_stamp`): the fingerprint
of the model that shaped the output (`checkpoint.model_fingerprint`, a hash of its config and weights),
the settings that shape it, and the hash of its source when it has one. An output whose record holds the
run's stamp is reused (`is_current`); any other is redone (export, convert, postprocess, vocode) or refused
with the reason (infer, which does not mix outputs of other settings). The checkpoint's path is never part
of a stamp: the same model at another path is the same model, another model at the same path is not.

Fingerprinting the official model costs about a second and loading it several, so a checkpoint's
fingerprint and STFT settings are kept in `runs/<name>/.model_stamps.json`, keyed by the file's resolved
path, inode, size, mtime and ctime: a file replaced at the same path, even with its old size and mtime put
back (os.utime), has another inode or ctime, and is fingerprinted anew.
"""
from __future__ import annotations

import weakref
from pathlib import Path

from .checkpoint import load_waveglow, model_fingerprint, read_stft_config
from .config import DEMO_MODEL_PATH, STFTConfig, WorkflowConfig
from .errors import ResourceError
from .io import atomic_write_json, read_hint
from .layout import MODEL_STAMPS_FILE as CACHE_NAME

_MAX_ENTRIES = 16
#: model object → (tensor versions, fingerprint): a model passed along a run is hashed once
_by_model: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
#: the stamp's key for the model's fingerprint, and for the source's sha256
MODEL_KEY = "model"
SOURCE_KEY = "source_sha256"
#: `stage_stamp`'s default: the fingerprint of the model given, else of the run's checkpoint
RUN_MODEL = "<the run's model>"


def _checkpoint_key(path: Path) -> str:
    # ctime cannot be set back by a user (os.utime itself moves it): a replaced file never keeps its key
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"


def _cached(cfg: WorkflowConfig, field: str, compute) -> object:
    path = cfg.checkpoint_path or DEMO_MODEL_PATH
    if not path.is_file():
        return compute()  # the loader's own error names the missing file
    cache_path = cfg.run_dir / CACHE_NAME
    key = _checkpoint_key(path)
    cache = read_hint(cache_path, "the run's checkpoint fingerprints")  # a damaged cache is rebuilt
    entry = cache.get(key) if isinstance(cache.get(key), dict) else {}
    if field not in entry:
        value = compute()
        if _checkpoint_key(path) != key:
            return value  # replaced while it was read: the value may be of either file, so not kept
        entry[field] = value
        cache.pop(key, None)
        cache[key] = entry
        while len(cache) > _MAX_ENTRIES:
            cache.pop(next(iter(cache)))
        try:
            atomic_write_json(cache_path, cache)
        except ResourceError:
            pass  # read-only run folder or full disk: the value is still right, only not kept
    return entry[field]


def forget_checkpoints(cfg: WorkflowConfig) -> None:
    """Drop the run's fingerprint cache (`--force`: nothing earlier runs computed is trusted)."""
    cache_path = cfg.run_dir / CACHE_NAME
    if cache_path.is_file() and not cache_path.is_symlink():
        try:
            cache_path.unlink()
        except OSError:
            pass  # a read-only run folder: its cache is keyed by content-changing stats anyway


def fingerprint_of(model) -> str:
    """`model_fingerprint(model)`, remembered for this model object until a weight changes in place."""
    versions = tuple((t.data_ptr(), t._version) for t in model.state_dict().values())
    known = _by_model.get(model)
    if known is not None and known[0] == versions:
        return known[1]
    value = model_fingerprint(model)
    _by_model[model] = (versions, value)
    return value


def model_stamp(cfg: WorkflowConfig, model=None) -> str:
    """The fingerprint of `model` when given, else of the run's checkpoint (cached, see above)."""
    if model is not None:
        return fingerprint_of(model)
    return str(_cached(cfg, "fingerprint", lambda: model_fingerprint(load_waveglow(cfg.checkpoint_path))))


def checkpoint_stft(cfg: WorkflowConfig) -> STFTConfig:
    """The STFT settings the run's model was trained with (cached, as the fingerprint)."""
    return STFTConfig(**_cached(cfg, "stft", lambda: read_stft_config(cfg.checkpoint_path).to_dict()))


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
