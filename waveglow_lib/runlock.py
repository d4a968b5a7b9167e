"""One run folder, one writer: `run_folder_lock(root)` around every stage that writes to `runs/<name>/`.

The lock is `runs/<name>/.lock`, held with `flock` (the kernel drops it when the holder dies, so a lock
left by a killed run is stale by construction and is taken over) and holding the holder's pid, host,
command and start time, which a refused second writer is shown. Re-entrant: within one process
(`run_all` → the stages) and in the processes it starts (the notebook kernels of `run`), which inherit
the holder's token through the environment. A folder the user cannot write to is not locked: nothing can
be written there, and a stage that has nothing to write still runs.

No other user can take the lock (round 5): the file is made 0600 (one left wider by an older version is
narrowed before it is locked), a run folder every user may write to is refused (anyone could replace its
lock), and a lock file of this user held by another user's process (opened while it was readable) is
replaced, saying so. A lock file another user made is theirs: refused while they hold it, naming them,
replaced when nobody does. A holder is named from what the kernel says (`/proc/locks`) checked against the
record: a recorded pid that is dead, or owned by someone else, is said to be so, with the processes that
really hold the lock. A takeover from a dead holder removes exactly that holder's temp files (their names
carry its token, `io.temp_prefix`) in the folders the layout owns.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import pwd
import secrets
import stat
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from .errors import ResourceError, RunFolderError
from .io import TOKEN_ENV, held_lock_tokens, remove_temp_files
from .layout import RunLayout
from .records import LockRecord, read_record

LOCK_NAME = ".lock"
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
#: a lock record is one line of JSON (pid, host, command line, start, token)
MAX_LOCK_BYTES = 2**20

_held: dict[str, list] = {}  # resolved root -> [fd, depth, token]
_guard = threading.Lock()


def lock_path(root: str | Path) -> Path:
    return Path(root) / LOCK_NAME


def read_holder(root: str | Path) -> dict:
    """What the lock file says about its holder (`records.LockRecord`; empty when there is none or it is
    damaged)."""
    return read_record(lock_path(root), LockRecord, "a lock record", max_bytes=MAX_LOCK_BYTES, follow_links=False)


_inherited_tokens = held_lock_tokens


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
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _pid_uid(pid: int) -> int | None:
    """The uid a live process runs as (None when it is gone)."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            text = handle.read(400).replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"
    return text or "?"


def _flock_pids(info: os.stat_result) -> list[int]:
    """The pids `/proc/locks` names for flock locks on the file `info` describes (the process that took each
    lock; it may be dead while a process that inherited the descriptor still holds it)."""
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    pids = []
    try:
        with open("/proc/locks") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == device and fields[4].isdigit():
                    pids.append(int(fields[4]))
    except OSError:
        pass
    return pids


def _openers(info: os.stat_result) -> list[int]:
    """The processes (of this user: others' descriptors cannot be read) with the file `info` open."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    target = os.stat(f"/proc/{entry}/fd/{fd}")
                    if (target.st_dev, target.st_ino) == (info.st_dev, info.st_ino):
                        found.append(int(entry))
                        break
        except OSError:
            continue
    return found


def _foreign(uid: int | None) -> bool:
    """A process of another user (not root, who may run anything of anyone's)."""
    return uid is not None and uid not in (os.geteuid(), 0)


def _check_folder(root: Path) -> None:
    """A run folder every user may write to is refused: any of them could replace its lock or its files."""
    with contextlib.suppress(OSError):
        mode = os.stat(root).st_mode
        if mode & stat.S_IWOTH:
            raise RunFolderError(f"{root}: every user may write to this run folder (mode {stat.S_IMODE(mode):04o}): "
                                 f"any of them could take or replace its lock and its files; make it yours alone "
                                 f"(chmod o-w {root}) or set runs_dir to a folder of your own", path=root)


def _refusal(root: Path, info: dict, held: os.stat_result) -> RunFolderError:
    """Why the lock is busy, from the kernel's holders checked against the record (`info`)."""
    host = socket.gethostname()
    lockers = [pid for pid in _flock_pids(held) if _pid_alive(pid)]
    recorded = info.get("pid")
    here = info.get("host") in (None, host)
    if info and (not here or recorded in lockers):
        owner = _pid_uid(recorded) if here else None
        who = f" of user {_user(owner)}" if owner is not None and owner != os.geteuid() else ""
        return RunFolderError(f"{root}: run folder is in use by {_describe(info)}{who}; wait for it to finish, "
                              f"or use another run name", path=root)
    holders = sorted(set(lockers) | set(_openers(held)))
    named = ", ".join(f"pid {pid} of user {_user(_pid_uid(pid))} ({_cmdline(pid)})" for pid in holders[:3])
    if info and not _pid_alive(recorded):
        said = f"its recorded holder, {_describe(info)}, is no longer running"
    elif info:
        said = f"its record names pid {recorded}, which does not hold it (now: {_cmdline(recorded)})"
    else:
        said = "its lock file names no holder"
    if named:
        return RunFolderError(f"{root}: run folder is locked, but {said}: the lock is held by {named}, which "
                              f"inherited it; end those processes or wait for them, or use another run name",
                              path=root)
    return RunFolderError(f"{root}: run folder is locked, but {said}, and the process holding the lock cannot be "
                          f"seen (another user's?); find it with `fuser {lock_path(root)}`, or use another run name",
                          path=root)


def _open_locked(path: Path) -> int | None:
    """An fd of `path` holding its flock; None when the folder is read-only (nothing can be written)."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise RunFolderError(f"{path}: the lock file is a symbolic link; remove it", path=path) from None
            if exc.errno == errno.EISDIR:
                raise RunFolderError(f"{path}: a folder is where the run folder's lock file goes; remove it",
                                     path=path) from None
            if exc.errno in _READ_ONLY and _foreign_lock(path):
                continue  # another user's stale lock file, removed: make ours
            if exc.errno in _READ_ONLY:
                return None
            raise
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
            os.close(fd)
            what = "is not a regular file" if not stat.S_ISREG(info.st_mode) else \
                f"has {info.st_nlink} hard links (writing the lock would change the other names' file)"
            raise RunFolderError(f"{path}: the lock file {what}; remove it", path=path)
        if info.st_uid != os.geteuid() and _foreign_lock(path, fd):
            continue
        if info.st_mode & 0o077 and info.st_uid == os.geteuid():
            os.fchmod(fd, 0o600)  # left readable by an older version: nobody else may open it from now on
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            root = path.parent
            holder = read_holder(root)
            if holder.get("token") and _inherited_tokens().get(str(root.resolve())) == holder["token"]:
                return -1  # our parent holds it (run → notebook kernel → stage)
            if info.st_uid == os.geteuid() and _break_foreign_hold(path, info):
                continue
            raise _refusal(root, holder, info) from None
        # the file may have been removed (released) between open and flock: then lock the new one
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _break_foreign_hold(path: Path, info: os.stat_result) -> bool:
    """This user's lock file held only by other users' processes (which opened it while it was readable: no
    run of this user's): remove it, so that a fresh 0600 one is made; True when it was removed."""
    holders = [pid for pid in _flock_pids(info) if _pid_alive(pid)]
    if not holders or not all(_foreign(_pid_uid(pid)) for pid in holders):
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    print(f"{path}: was held by {', '.join(f'pid {p} of user {_user(_pid_uid(p))}' for p in holders)}, not by a run "
          f"of yours (the file was readable by others); replaced by a lock only you can open", file=sys.stderr)
    return True


def _foreign_lock(path: Path, fd: int | None = None) -> bool:
    """A lock file another user made (in a folder shared with them): theirs while they hold it (refused, naming
    them), removed when nobody does (True: make ours). False when it is not another user's."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if info.st_uid == os.geteuid():
        return False
    if fd is not None:
        os.close(fd)
    holders = [pid for pid in _flock_pids(info) if _pid_alive(pid)]
    if holders:
        raise RunFolderError(f"{path.parent}: run folder is in use by user {_user(info.st_uid)} (pid "
                             f"{', '.join(map(str, holders))}: {_cmdline(holders[0])}); wait for it to finish, or "
                             f"use another run name", path=path.parent)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise RunFolderError(f"{path}: a lock file of user {_user(info.st_uid)}, held by nobody, that you cannot "
                             f"remove ({exc.strerror}); ask them to remove it, or use another run name",
                             path=path) from None
    print(f"{path}: removed a lock file of user {_user(info.st_uid)} that no process held", file=sys.stderr)
    return True


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
    if root.is_dir():
        _check_folder(root)
    fd = _open_locked(path) if root.is_dir() else None
    if fd is None or fd == -1:
        yield {}
        return
    previous = read_holder(root) if os.fstat(fd).st_size else {}  # ours: 0600, of this user, locked
    token = secrets.token_hex(8)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "command": command or " ".join(sys.argv) or "python", "token": token}
    if previous and previous.get("pid") != os.getpid():
        # the kernel released the old holder's flock: it died (a stale lock); say so once. A live pid of that
        # number is another process now (the pid was reused): it never held this lock
        info["took_over"] = {k: previous.get(k) for k in ("pid", "host", "command")}
        info["took_over"]["alive"] = False  # we hold the flock it held: it no longer runs
        if previous.get("host") == info["host"] and _pid_alive(previous.get("pid")):
            info["took_over"]["pid_now"] = _cmdline(previous["pid"])  # reused by another process
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except OSError as exc:  # a full disk: say so, naming the file, and leave no lock behind
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
        raise ResourceError(f"{path}: could not write the run folder's lock ({exc.strerror})", path=path) from None
    if "took_over" in info:
        # we hold the flock its dead holder had: the temp files of its unfinished outputs are nobody's now;
        # exactly those carry its token, in the folders the layout owns
        removed = remove_temp_files(RunLayout(root).owned_folders(), previous.get("token"))
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
