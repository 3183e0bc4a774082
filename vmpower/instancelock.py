"""The single-instance lock in state.dir: one vmpowerd per host, and no restore beside it.

An exclusive, non-blocking ``flock`` on ``state.dir/vmpowerd.lock`` holding the
holder's pid. vmpowerd takes it for its lifetime (channels must connect once, and the
restore journal has one writer); ``vmpower restore`` takes it while it works, so it
never runs beside a daemon and no daemon starts meanwhile. Opened ``O_NOFOLLOW``: a
link planted at the lock's path would have its target truncated.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from vmpower.errors import VmpowerError

LOCK_NAME = "vmpowerd.lock"


class LockHeld(VmpowerError):
    """Another process holds the lock; ``holder`` is the pid it wrote ("?" if none)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"another vmpowerd (pid {holder}) is running: it holds {path}")
        self.path = path
        self.holder = holder


class InstanceLock:
    """``state_dir/vmpowerd.lock``, taken with ``acquire`` and let go with ``release``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self.fd = -1

    def acquire(self) -> None:
        """Take the lock (creating state.dir, mode 0700); LockHeld or VmpowerError."""
        state_dir = self.path.parent
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise VmpowerError(state_dir_problem(state_dir, self.path, exc)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LockHeld(self.path, holder) from None
            raise VmpowerError(state_dir_problem(state_dir, self.path, exc)) from None
        try:
            # Freed and written again: on a full file system this fails here, at the start,
            # rather than at the journal's first save under a guest's request.
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise VmpowerError(state_dir_problem(state_dir, self.path, exc)) from None
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the fd lets the flock go
            self.fd = -1


def state_dir_problem(state_dir: Path, lock: Path, exc: OSError) -> str:
    """One line for an unusable state.dir: the path and the cause."""
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        # mkdir says "File exists" for a regular file: what is wrong is its type.
        for path in (state_dir, *state_dir.parents):
            if os.path.lexists(path) and not path.is_dir():
                what = "" if path == state_dir else f"{path} is "
                return f"state.dir {state_dir}: {what}not a directory"
    cause = (exc.strerror or str(exc)).lower()
    return f"state.dir {state_dir}: cannot create or write {lock.name}: {cause}"
