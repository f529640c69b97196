"""Locks that keep processes sharing a folder apart: a cache's shards, a sweep's cell folds, the
creation of either folder.

    lock_file / unlock_file    an exclusive flock on a lock file, dropped with its holder
    held_lock, folder_lock     for short steps several processes may run at once
    Claims                     one process's claims on units of work (cache.ShardClaims,
                               sweeping's task claims)

Why flock on a lock file: the kernel drops the lock when its holder ends, however it ends
(exit, exception, SIGKILL, OOM kill), so a dead job never blocks a shard and no heartbeat,
pid check or stale-claim timeout is needed, as claim files made with O_CREAT|O_EXCL would
be. On NFS, Linux emulates flock with byte-range locks, which hold across machines only
where the server's locking works (NFSv4, or v3 with lockd) and not with `nolock` or
`local_lock=flock` mounts; there, jobs on several machines must keep to disjoint
`--shard I/N` parts (which never need a claim to stay apart).
"""
from __future__ import annotations

import errno
import fcntl
import os
import threading
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

CREATE_LOCK = "create.lock"  # held while a process creates a folder's settings (cache.json, sweep.json)


class LockError(UserError):
    """A lock the file system cannot give; the message names the fix."""


def lock_file(path: Path, wait: bool) -> int | None:
    """Take the exclusive flock on `path` (created if absent): its descriptor, or None when
    `wait` is False and another open file (another process, or another claim) holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise LockError(
                    f"cannot lock {path} ({e.strerror}): this file system does not support the locks that keep "
                    "jobs sharing a cache apart; put --out on a local disk, or on NFS mounted with locking"
                ) from e
            raise
        except BaseException:
            os.close(fd)
            raise
        # A holder unlinks the file as it lets go (`unlock_file`), so that finished shards
        # leave no lock files; a lock on a file no longer at `path` guards nothing: try again.
        if _still_linked(path, fd):
            return fd
        os.close(fd)


def unlock_file(path: Path, fd: int) -> None:
    """Let go of a lock from `lock_file`: unlink while still holding it, then close."""
    try:
        os.unlink(path)
    except FileNotFoundError:  # removed by hand meanwhile: nothing left to tidy
        pass
    finally:
        os.close(fd)


def lock_held(path: Path) -> bool:
    """True when a live process holds the exclusive lock on `path`. Probes with a shared lock,
    so that two processes probing at once do not take each other for writers."""
    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # a holder keeps its file at `path` until it lets go
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            if _still_linked(path, fd):
                return True
        finally:
            os.close(fd)  # also drops the shared lock, if taken


def _still_linked(path: Path, fd: int) -> bool:
    try:
        st, mine = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


@contextmanager
def held_lock(path: Path):
    """Hold the exclusive lock on `path` for the block, waiting for its holder to let go (for
    short steps that several jobs may run at once: creating a folder, appending to a file)."""
    fd = lock_file(path, wait=True)
    try:
        yield
    finally:
        unlock_file(path, fd)


@contextmanager
def folder_lock(root: Path):
    """Hold the creation lock of a cache folder (waiting for another creator to finish)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with held_lock(root / CREATE_LOCK):
        yield


class Claims:
    """This process's claims on units of work (shards of a cache, cell folds of a sweep), each an
    exclusive flock on its own lock file (`lock_path(key)`): a unit is worked on only by the
    process holding its claim, and a killed holder's claims go with it.

    Claims may be taken by one thread and let go by another, hence the mutex.
    """

    def __init__(self, lock_path):
        self.lock_path = lock_path  # key -> Path of its lock file (its folder must exist)
        self._held: dict = {}  # key -> descriptor of its locked lock file
        self._mutex = threading.Lock()

    def take(self, key) -> bool:
        """Claim `key` without waiting; False when another live process holds it."""
        with self._mutex:
            assert key not in self._held, f"{key} claimed twice by one process"
        fd = lock_file(self.lock_path(key), wait=False)
        if fd is None:
            return False
        with self._mutex:
            self._held[key] = fd
        return True

    def release(self, key) -> None:
        with self._mutex:
            fd = self._held.pop(key, None)
        if fd is not None:
            unlock_file(self.lock_path(key), fd)

    def release_all(self) -> None:
        with self._mutex:
            held = list(self._held)
        for key in held:
            self.release(key)

    def held_elsewhere(self, key) -> bool:
        """True when another live process holds the claim on `key`."""
        with self._mutex:
            if key in self._held:
                return False
        return lock_held(self.lock_path(key))
