"""This user's secret key and the HMACs made with it: what proves that a cached value was written by this
user's own runs, not rewritten beside the file by whoever else can write there.

The key is `<folder>/secret.key` (the engine cache's folder, `default_cache_dir()`, for the per-user key):
32 random bytes made once by the first process that needs it (O_CREAT|O_EXCL, rights 0600: two processes
never both make one). It is refused with one line (`refuse`'s error type, naming the file) when it is not a
regular file (a link, a folder), belongs to another user, is readable or writable by others, has other hard
links or is not 32 bytes: delete it and a new one is made. Its users are the engine cache
(`backends/fast/cache.py`: every entry and verdict carries a MAC) and the run's file stamps (`stamps.py`:
every cached content hash carries one).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import time
from pathlib import Path
from typing import Callable

from .errors import WaveGlowError
from .io import file_kind

CACHE_ENV = "WAVEGLOW_CACHE_DIR"
#: the key's file name in its folder, and its size
SECRET_NAME = "secret.key"
SECRET_BYTES = 32


def default_cache_dir() -> Path:
    """$WAVEGLOW_CACHE_DIR, else $XDG_CACHE_HOME/waveglow-workflow, else ~/.cache/waveglow-workflow."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "waveglow-workflow"


def folder_secret(root: Path, refuse: Callable[[Path, str], WaveGlowError]) -> bytes:
    """The secret of `root` (`<root>/secret.key`): made here when there is none (32 random bytes, rights 0600,
    O_EXCL so that a concurrent process reads the one made first), else read and checked (`read_secret`:
    `refuse(path, problem)` is the error raised for a file that is not one this user made). OSError when the
    folder cannot hold one (read-only, not a folder)."""
    path = root / SECRET_NAME
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return read_secret(path, refuse)
    secret = os.urandom(SECRET_BYTES)
    try:
        if os.write(fd, secret) != SECRET_BYTES:
            raise OSError(f"{path}: short write")
        os.fsync(fd)
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)  # a half-made secret would be refused by every later process
        raise
    os.close(fd)
    return secret


def read_secret(path: Path, refuse: Callable[[Path, str], WaveGlowError], wait_s: float = 2.0) -> bytes:
    """The secret at `path`, once it is a regular file of this user with rights no wider than 0600, one
    link and 32 bytes; else `refuse(path, what is wrong)` is raised (one line). A file still being made by
    another process (empty for a moment) is waited for up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if path.is_symlink():
                raise refuse(path, "a symbolic link") from None
            raise refuse(path, f"unreadable ({exc.strerror or exc})") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise refuse(path, f"not a regular file ({file_kind(info)})")
            if info.st_uid != os.geteuid():
                raise refuse(path, f"it belongs to uid {info.st_uid}, not to you (uid {os.geteuid()})")
            if info.st_mode & 0o077:
                raise refuse(path, f"others may read or write it (mode {stat.S_IMODE(info.st_mode):04o}, not 0600)")
            if info.st_nlink != 1:
                raise refuse(path, f"it has {info.st_nlink} hard links")
            data = os.read(fd, SECRET_BYTES + 1)
        finally:
            os.close(fd)
        if len(data) == SECRET_BYTES:
            return data
        if data or time.monotonic() > deadline:  # empty: another process is writing it (O_EXCL, then write)
            raise refuse(path, f"{len(data)} bytes, not {SECRET_BYTES}")
        time.sleep(0.05)


def mac(secret: bytes, record) -> str:
    """HMAC-SHA256 of `record` (as canonical JSON) with `secret`."""
    return hmac.new(secret, json.dumps(record, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def proven(secret: bytes, record, claimed: object) -> bool:
    """Whether `claimed` is `record`'s MAC under `secret` (compared in constant time)."""
    return isinstance(claimed, str) and hmac.compare_digest(claimed, mac(secret, record))
