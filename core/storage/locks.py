"""One writer per run folder: an exclusive lock file, and cleaning what killed writers left.

A writer holds ``<folder>/.lock`` with ``fcntl.flock``; the file also names its pid (and the
process's start time, so a reused pid is not mistaken for the owner). The kernel drops a
flock when its process dies, even by ``kill -9``, so a lock left by a killed process is
simply taken over by the next writer; the pid in the file is only for the message
"already running (pid …)". Readers (``core show``, the app) never lock. This module
imports neither torch nor pandas, so the app can ask :func:`lock_owner` cheaply.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from core.storage.errors import AtlasError

LOCK_FILE = ".lock"
# Temporary folders of the data stage; a pid in the name tells whose they are.
TEMP_PREFIX = ".atlas-"
_TEMP_PID = re.compile(r"^\.atlas-(\d+)-")
# A reader probing with is_locked holds the lock for microseconds; a writer retries this long.
_ACQUIRE_TRIES = 5
_ACQUIRE_PAUSE_S = 0.05

# Folders this process holds: path → [fd, depth], so nested holds of one folder are cheap.
_held: dict[Path, list[int]] = {}


def lock_path(folder: str | os.PathLike) -> Path:
    """The lock file of a run or sweep folder."""
    return Path(folder) / LOCK_FILE


@contextlib.contextmanager
def hold(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold ``folder``'s lock for the block; raise :class:`AtlasError` if another process does.

    The folder is created if needed and removed again on exit when this call created it
    and nothing else was written in it (a request that failed leaves nothing behind).
    Litter of killed writers in the folder (``.atlas-*`` folders, ``.*.tmp`` files) is
    removed once the lock is held. Re-entrant within one process.
    """
    key = Path(folder).absolute()
    if key in _held:
        _held[key][1] += 1
        try:
            yield key
        finally:
            _held[key][1] -= 1
        return
    created = not key.exists()
    try:
        key.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AtlasError(f"{key} cannot be created ({exc.strerror or exc}).") from None
    try:
        fd = _acquire(key)
    except BaseException:
        if created:
            _remove_if_empty(key)
        raise
    _held[key] = [fd, 1]
    try:
        clean_litter(key)
        yield key
    finally:
        del _held[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path(key))  # while still locked: see _acquire's inode check
        os.close(fd)
        if created:
            _remove_if_empty(key)


def lock_owner(folder: str | os.PathLike) -> int | None:
    """The pid of the live process holding ``folder``'s lock, or None when nobody does."""
    path = lock_path(folder)
    try:
        # A reader follows no link either: a planted link could point at a FIFO and hang it.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            pid = _read_info(fd).get("pid")
            return pid if isinstance(pid, int) and pid > 0 else -1  # -1: held, pid not written yet
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def is_locked(folder: str | os.PathLike) -> bool:
    """Whether a live process is writing ``folder`` (a run or a sweep)."""
    return lock_owner(folder) is not None


def clean_litter(folder: str | os.PathLike) -> list[Path]:
    """Remove temporary files and folders that killed writers left in ``folder``.

    Call only while holding ``folder``'s lock (or for a cache folder, whose ``.atlas-*``
    folders are owned by the pid in their name): ``.atlas-*`` folders whose owner is not
    alive and top-level ``.*.tmp`` files of interrupted atomic writes. Returns what went.
    """
    root = Path(folder)
    mine = root.absolute() in _held
    removed = []
    try:
        children = list(root.iterdir())
    except OSError:
        return removed
    for child in children:
        name = child.name
        if name.startswith(TEMP_PREFIX) and child.is_dir():
            match = _TEMP_PID.match(name)
            if match and _alive(int(match.group(1))):
                continue  # a live process's work in progress
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
        elif mine and name.startswith(".") and name.endswith(".tmp") and child.is_file():
            with contextlib.suppress(OSError):
                child.unlink()
                removed.append(child)
    return removed


def temp_prefix() -> str:
    """Prefix for a temporary folder owned by this process (cleaned once it is dead)."""
    return f"{TEMP_PREFIX}{os.getpid()}-"


def _acquire(folder: Path) -> int:
    """Open and flock the folder's lock file, write our pid; return the descriptor."""
    path = lock_path(folder)
    for attempt in range(_ACQUIRE_TRIES):
        fd = _open_lock(path, folder)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            info = _read_info(fd)
            os.close(fd)
            if attempt + 1 < _ACQUIRE_TRIES:
                time.sleep(_ACQUIRE_PAUSE_S)
                continue
            pid = info.get("pid", "unknown")
            raise AtlasError(
                f"{folder} is already running (pid {pid}); wait for it to finish or stop it."
            ) from None
        # A holder that finished unlinks the file before unlocking it; if we locked such a
        # dead inode, the path now names another file (or none): start over on the new one.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_self_info()).encode(), 0)
        return fd
    raise AtlasError(f"{folder}'s lock keeps changing hands; try again.")


def _open_lock(path: Path, folder: Path) -> int:
    """Open (or create) the lock file itself, never what a link in its place points to.

    On a shared cache anyone who can write the folder could plant ``.lock`` as a symbolic
    link (or a FIFO, a device): following it would make this writer truncate and overwrite
    a file of the link's choosing. ``O_NOFOLLOW`` refuses the link and the type check
    refuses anything but a regular file, before a byte is written.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise AtlasError(_not_a_lock_file(path)) from None
        raise AtlasError(
            f"{folder} cannot be written ({exc.strerror or exc}); copy the run somewhere writable."
        ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise AtlasError(_not_a_lock_file(path))
    return fd


def _not_a_lock_file(path: Path) -> str:
    """The sentence refusing a lock path that is a link or not a regular file."""
    try:
        what = "a symbolic link" if path.is_symlink() else "not a regular file"
    except OSError:
        what = "not a regular file"
    return (
        f"{path} is {what}, so it is not used as a lock (anyone who can write this cache "
        "could have planted it to make writers overwrite another file); check it and remove it."
    )


def _self_info() -> dict:
    """What the lock file says about its holder."""
    return {
        "pid": os.getpid(),
        "start": _proc_start(os.getpid()),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _read_info(fd: int) -> dict:
    """The holder's info from an open lock file ({} when unreadable)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remove_if_empty(folder: Path) -> None:
    """Remove a folder this process created, if it is empty (another writer's lock keeps it)."""
    with contextlib.suppress(OSError):
        folder.rmdir()


def _proc_start(pid: int) -> int | None:
    """Start time of a process in clock ticks (Linux), None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists (zombies count as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not Path("/proc").is_dir()  # no /proc: the signal probe is all we have
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
