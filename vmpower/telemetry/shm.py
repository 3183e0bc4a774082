"""Shared-memory files of the batch server: safe creation, mapping, and the value buffers.

This module owns

* how a file meant for one client is created in a world-writable directory such as
  ``/dev/shm``: ``O_CREAT | O_EXCL | O_NOFOLLOW`` (never an existing file, never through a
  symlink someone planted), mode 0600, then ``fchown`` to the client (the daemon runs as
  root; the client must own its buffers, docs/telemetry.md section 2);
* ``ValueBuffer``: the signal and control buffers. Layout, host byte order (both ends run
  on the same host)::

      offset  0  u32  magic "VMPB"
              4  u16  version (1)
              6  u16  kind (1 signals, 2 controls)
              8  u32  count (number of values)
             12  u32  reserved (0)
             16  u64  sequence (even: stable, odd: a write is in progress)
             24  f64  value[0] ... value[count - 1], in request order

  Writers follow a sequence lock: bump the sequence to odd, store the values, bump it to
  even. Readers copy the values between two reads of the sequence and retry while it is
  odd or changed, so a reader never returns a torn sample and never blocks the writer
  (continuous mode, docs/telemetry.md section 2). The sequence is read and written as one
  aligned 8-byte access through a ``memoryview`` cast, so it cannot tear itself; on
  x86-64 (TSO) stores become visible in program order, which is all the lock needs.
"""

from __future__ import annotations

import array
import contextlib
import math
import mmap
import os
import stat
import struct
import time
from collections.abc import Sequence
from pathlib import Path

from vmpower.errors import TelemetryError

MAGIC = 0x42504D56  # b"VMPB" read as a little-endian u32
VERSION = 1
KIND_SIGNALS = 1
KIND_CONTROLS = 2
_KIND_NAMES = {KIND_SIGNALS: "signals", KIND_CONTROLS: "controls"}

HEADER = struct.Struct("=IHHIIQ")
HEADER_SIZE = HEADER.size  # 24: values start 8-aligned
_SEQ_INDEX = 2  # the sequence is the third u64 of the header

Owner = tuple[int, int]
"""(uid, gid) a created file is handed to."""

# A reader spins this many times on an odd or moving sequence before yielding the CPU:
# the writer's critical section is one memcpy, so a short spin almost always suffices.
_SPINS = 64


def create_file(path: str | os.PathLike[str], size: int, owner: Owner | None = None) -> int:
    """Create ``path`` (which must not exist) with ``size`` zero bytes; return its fd.

    Mode 0600, owned by ``owner`` when given (``fchown`` on the fd, so no path race).
    On failure nothing is left behind and TelemetryError says why.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise TelemetryError(f"{path} already exists (another session, or not ours)") from None
    except OSError as exc:
        raise TelemetryError(f"cannot create {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # the umask may only have removed bits; make it exact
        if owner is not None and (owner[0], owner[1]) != (os.geteuid(), os.getegid()):
            os.fchown(fd, owner[0], owner[1])
        os.ftruncate(fd, size)
    except OSError as exc:
        os.close(fd)
        unlink_quietly(path)
        raise TelemetryError(f"cannot prepare {path}: {exc.strerror}") from None
    return fd


def open_file(path: str | os.PathLike[str], writable: bool) -> int:
    """Open an existing regular file without following a symlink; TelemetryError if not."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise TelemetryError(f"{path} does not exist") from None
    except OSError as exc:
        raise TelemetryError(f"cannot open {path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TelemetryError(f"{path} is not a regular file")
    return fd


def map_fd(fd: int, writable: bool, path: str | os.PathLike[str] = "") -> mmap.mmap:
    """Map the whole file behind ``fd`` (shared); the fd may be closed afterwards."""
    size = os.fstat(fd).st_size
    if size <= 0:
        raise TelemetryError(f"{path or fd}: empty shared-memory file")
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    try:
        return mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
    except OSError as exc:
        raise TelemetryError(f"cannot map {path or fd}: {exc.strerror}") from None


def unlink_quietly(path: str | os.PathLike[str]) -> bool:
    """Remove ``path``; True if it was there. Other errors (not ours to remove) are ignored."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError:
        return False
    return True


class ValueBuffer:
    """One mapped signal or control buffer (see the module docstring for the layout)."""

    def __init__(self, mm: mmap.mmap, kind: int, count: int, path: str, writable: bool) -> None:
        self._mm = mm
        self.kind = kind
        self.count = count
        self.path = path
        self.writable = writable
        self._words = memoryview(mm)[:HEADER_SIZE].cast("Q")
        self._values = memoryview(mm)[HEADER_SIZE : HEADER_SIZE + 8 * count].cast("d")

    # -- creation and attachment -------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        kind: int,
        count: int,
        owner: Owner | None = None,
        fill: float = math.nan,
    ) -> ValueBuffer:
        """Create the buffer file (0600, owned by ``owner``) with ``count`` values ``fill``."""
        if kind not in _KIND_NAMES:
            raise TelemetryError(f"unknown buffer kind {kind!r}")
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count < 2**31:
            raise TelemetryError(f"buffer value count must be 0..2**31-1, not {count!r}")
        size = HEADER_SIZE + 8 * max(count, 1)  # mmap refuses a zero length
        fd = create_file(path, size, owner)
        try:
            mm = map_fd(fd, True, path)
        except TelemetryError:
            os.close(fd)
            unlink_quietly(path)
            raise
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
        HEADER.pack_into(mm, 0, MAGIC, VERSION, kind, count, 0, 0)
        buf = cls(mm, kind, count, str(path), True)
        buf._values[:] = array.array("d", [fill] * count)
        return buf

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        kind: int,
        writable: bool,
        count: int | None = None,
    ) -> ValueBuffer:
        """Map an existing buffer, checking magic, version, kind and (if given) count."""
        fd = open_file(path, writable)
        try:
            mm = map_fd(fd, writable, path)
        finally:
            os.close(fd)
        try:
            if len(mm) < HEADER_SIZE:
                raise TelemetryError(f"{path}: too short for a batch buffer header")
            magic, version, got_kind, got_count, _, _ = HEADER.unpack_from(mm, 0)
            if magic != MAGIC:
                raise TelemetryError(f"{path}: not a vmpower batch buffer (bad magic)")
            if version != VERSION:
                raise TelemetryError(f"{path}: buffer version {version}, expected {VERSION}")
            if got_kind != kind:
                got = _KIND_NAMES.get(got_kind, "?")
                raise TelemetryError(f"{path}: a {got} buffer, expected {_KIND_NAMES[kind]}")
            if count is not None and got_count != count:
                raise TelemetryError(f"{path}: holds {got_count} values, expected {count}")
            if len(mm) < HEADER_SIZE + 8 * got_count:
                raise TelemetryError(f"{path}: shorter than its {got_count} values")
        except TelemetryError:
            mm.close()
            raise
        return cls(mm, kind, got_count, str(path), writable)

    # -- the sequence lock --------------------------------------------------------------

    @property
    def sequence(self) -> int:
        """Even when stable; bumped by 2 for every completed write."""
        return self._words[_SEQ_INDEX]

    def write(self, values: Sequence[float]) -> None:
        """Store one sample (exactly ``count`` values) under the sequence lock."""
        if len(values) != self.count:
            raise TelemetryError(f"{self.path}: expected {self.count} values, got {len(values)}")
        words = self._words
        seq = words[_SEQ_INDEX]
        words[_SEQ_INDEX] = seq | 1  # odd: a write is in progress
        try:
            self._values[:] = array.array("d", values)
        finally:
            words[_SEQ_INDEX] = (seq | 1) + 1

    def read(self, max_wait_s: float = 1.0) -> list[float]:
        """The latest complete sample; TelemetryError if no stable one shows up in time.

        Only a writer stopped in the middle of a write (killed, or descheduled for
        ``max_wait_s``) can make this fail.
        """
        words = self._words
        values = self._values
        for _ in range(_SPINS):
            seq = words[_SEQ_INDEX]
            if not seq & 1:
                sample = values.tolist()
                if words[_SEQ_INDEX] == seq:
                    return sample
        deadline = time.monotonic() + max_wait_s
        while time.monotonic() < deadline:
            os.sched_yield()  # let a descheduled writer finish its memcpy
            seq = words[_SEQ_INDEX]
            if not seq & 1:
                sample = values.tolist()
                if words[_SEQ_INDEX] == seq:
                    return sample
        raise TelemetryError(f"{self.path}: no stable sample within {max_wait_s} s (writer stuck)")

    def close(self) -> None:
        """Unmap (the file itself is left alone)."""
        if self._mm.closed:
            return
        self._words.release()
        self._values.release()
        self._mm.close()

    def __enter__(self) -> ValueBuffer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def file_facts(path: str | os.PathLike[str]) -> tuple[int, int, int] | None:
    """(mode bits, uid, gid) of ``path`` without following a symlink; None if absent."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def exists(path: str | os.PathLike[str]) -> bool:
    return Path(path).exists() or Path(path).is_symlink()
