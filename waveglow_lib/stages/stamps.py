"""What model made an artefact: fingerprints of the run's checkpoint, cached in the run folder.

Every exported or converted file carries, in its `.json` record, the fingerprint of the model it was made
from (`checkpoint.model_fingerprint`) and the settings that shaped it; a stage that finds a record that
disagrees with the run's model and settings redoes the file (export, convert) or refuses with the reason
(infer, which cannot rebuild them). Fingerprinting the official model costs about a second and loading it
several, so a checkpoint's fingerprint and STFT settings are kept in `runs/<name>/.model_stamps.json`,
keyed by the checkpoint's resolved path, size and mtime.
"""
from __future__ import annotations

import weakref
from pathlib import Path

from ..checkpoint import load_waveglow, model_fingerprint, read_stft_config
from ..config import DEMO_MODEL_PATH, STFTConfig, WorkflowConfig
from ..errors import DataError, ResourceError
from ..io import atomic_write_json, read_json

CACHE_NAME = ".model_stamps.json"
_MAX_ENTRIES = 16
#: model object → (tensor versions, fingerprint): a model passed along a run is hashed once
_by_model: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _checkpoint_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _cached(cfg: WorkflowConfig, field: str, compute) -> object:
    path = cfg.checkpoint_path or DEMO_MODEL_PATH
    if not path.is_file():
        return compute()  # the loader's own error names the missing file
    cache_path = cfg.run_dir / CACHE_NAME
    key = _checkpoint_key(path)
    cache: dict = {}
    if cache_path.is_file():
        try:
            cache = read_json(cache_path, "the run's checkpoint fingerprints")
        except DataError:
            cache = {}  # a damaged cache is only a cache: rebuilt
    entry = cache.get(key) if isinstance(cache.get(key), dict) else {}
    if field not in entry:
        entry[field] = compute()
        cache.pop(key, None)
        cache[key] = entry
        while len(cache) > _MAX_ENTRIES:
            cache.pop(next(iter(cache)))
        try:
            atomic_write_json(cache_path, cache)
        except ResourceError:
            pass  # read-only run folder or full disk: the value is still right, only not kept
    return entry[field]


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


def differences(recorded: dict, expected: dict) -> dict:
    """{key: (recorded, expected)} for every key of `expected` the record disagrees with."""
    return {k: (recorded.get(k), v) for k, v in expected.items() if recorded.get(k) != v}


def describe(changed: dict) -> str:
    return ", ".join(f"{k}: {a!r} (file) vs {b!r} (now)" for k, (a, b) in changed.items())
