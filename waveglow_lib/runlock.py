"""One run folder, one writer: `run_folder_lock(root)` around every stage that writes to `runs/<name>/`.

The lock is `runs/<name>/.lock`, held with `flock` (the kernel drops it when the holder dies, so a lock
left by a killed run is stale by construction and is taken over) and holding the holder's pid, host,
command and start time, which a refused second writer is shown. Re-entrant: within one process
(`run_all` → the stages) and in the processes it starts (the notebook kernels of `run`), which inherit
the holder's token through the environment. A folder the user cannot write to is not locked: nothing can
be written there, and a stage that has nothing to write still runs.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import secrets
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from .errors import ResourceError, RunFolderError
from .io import read_bounded, remove_temp_files

LOCK_NAME = ".lock"
#: `<resolved root>=<token>` pairs (os.pathsep separated) of the locks this process or its parent holds
TOKEN_ENV = "WAVEGLOW_RUN_LOCKS"
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
#: a lock record is one line of JSON (pid, host, command line, start, token)
MAX_LOCK_BYTES = 2**20

_held: dict[str, list] = {}  # resolved root -> [fd, depth, token]
_guard = threading.Lock()


def lock_path(root: str | Path) -> Path:
    return Path(root) / LOCK_NAME


def read_holder(root: str | Path) -> dict:
    """What the lock file says about its holder (empty when there is none or it is unreadable)."""
    try:
        info = json.loads(read_bounded(lock_path(root), "a lock record", MAX_LOCK_BYTES, follow_links=False))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _inherited_tokens() -> dict[str, str]:
    pairs = [p.rpartition("=") for p in os.environ.get(TOKEN_ENV, "").split(os.pathsep) if "=" in p]
    return {root: token for root, _, token in pairs}


def _describe(info: dict) -> str:
    if not info:
        return "another process (the lock file gives no details)"
    started = info.get("started")
    since = "?"
    if isinstance(started, (int, float)) and not isinstance(started, bool):
        try:  # a lock file is anyone's text: a start time the clock cannot show is not a traceback
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
        except (OverflowError, OSError, ValueError):
            pass
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {since} "
            f"(command: {info.get('command', '?')})")


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _open_locked(path: Path) -> int | None:
    """An fd of `path` holding its flock; None when the folder is read-only (nothing can be written)."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno in _READ_ONLY:
                return None
            if exc.errno == errno.ELOOP:
                raise RunFolderError(f"{path}: the lock file is a symbolic link; remove it", path=path) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            root = path.parent
            info = read_holder(root)
            if info.get("token") and _inherited_tokens().get(str(root.resolve())) == info["token"]:
                return -1  # our parent holds it (run → notebook kernel → stage)
            raise RunFolderError(f"{root}: run folder is in use by {_describe(info)}; wait for it to finish, "
                                 f"or use another run name", path=root) from None
        # the file may have been removed (released) between open and flock: then lock the new one
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def run_folder_lock(root: str | Path, command: str | None = None) -> Iterator[dict]:
    """Hold the run folder's lock for the block; yields the holder record (`{}` when not locked because
    the folder is read-only or a parent process holds it). RunFolderError names the current holder."""
    root = Path(root)
    key = str(root.resolve())
    with _guard:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is not None:
        try:
            yield {"reentrant": True}
        finally:
            with _guard:
                entry[1] -= 1
        return
    if not root.is_dir():
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno not in _READ_ONLY:  # a file in the way, a folder nothing can be made in
                where = f"{exc.strerror}: {exc.filename}" if exc.filename and str(exc.filename) != str(root) \
                    else exc.strerror
                raise RunFolderError(f"{root}: cannot create the run folder ({where}); set runs_dir to a "
                                     "folder where runs may be written", path=root) from None
    path = lock_path(root)
    previous = read_holder(root) if path.is_file() else {}
    fd = _open_locked(path) if root.is_dir() else None
    if fd is None or fd == -1:
        yield {}
        return
    token = secrets.token_hex(8)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "command": command or " ".join(sys.argv) or "python", "token": token}
    if previous and previous.get("pid") != os.getpid():
        # the kernel released the old holder's flock: it died (a stale lock); say so once
        info["took_over"] = {k: previous.get(k) for k in ("pid", "host", "command")}
        info["took_over"]["alive"] = previous.get("host") == info["host"] and _pid_alive(previous.get("pid"))
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except OSError as exc:  # a full disk: say so, naming the file, and leave no lock behind
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
        raise ResourceError(f"{path}: could not write the run folder's lock ({exc.strerror})", path=path) from None
    if "took_over" in info:
        # we hold the flock its dead holder had: the temp files of its unfinished outputs are nobody's now
        removed = remove_temp_files(root)
        if removed:
            print(f"{root}: removed {len(removed)} half-written file(s) a killed run left (e.g. {removed[0].name})",
                  file=sys.stderr)
    with _guard:
        _held[key] = [fd, 1, token]
    old_env = os.environ.get(TOKEN_ENV)
    os.environ[TOKEN_ENV] = os.pathsep.join(filter(None, [old_env, f"{key}={token}"]))
    try:
        yield info
    finally:
        with _guard:
            del _held[key]
        if old_env is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = old_env
        # unlink while still holding the flock: a waiter that opened the old file re-checks and retries
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def locked(command: str):
    """Decorator: run `fn(cfg, ...)` holding `cfg.run_dir`'s lock (re-entrant)."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(cfg, *args, **kwargs):
            with run_folder_lock(cfg.run_dir, command=f"{command} ({' '.join(sys.argv) or 'python'})"):
                return fn(cfg, *args, **kwargs)
        return inner
    return wrap
