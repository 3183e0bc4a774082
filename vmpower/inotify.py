"""Linux inotify(7) through libc: the one module that calls it.

The standard library has no binding; ``ctypes`` reaches ``inotify_init1``,
``inotify_add_watch`` and ``inotify_rm_watch``, and the events are read with
``os.read`` and parsed here. The descriptor is non-blocking and close-on-exec.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
import sys
import termios
from collections.abc import Iterator

# <sys/inotify.h>
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000  # the kernel's queue was full: events were lost
IN_IGNORED = 0x00008000  # the watch is gone (removed, or its inode)
IN_ONLYDIR = 0x01000000

# struct inotify_event { int wd; uint32_t mask, cookie, len; char name[len]; }
_HEADER = struct.Struct("iIII")

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        # The process's own symbols, libc's among them: ctypes.util.find_library runs
        # ldconfig as a subprocess (13 ms, on the loop at the first add_vm).
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
        _libc.inotify_rm_watch.argtypes = (ctypes.c_int, ctypes.c_int)
    return _libc


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


class Inotify:
    """One inotify instance (raises OSError when the kernel refuses one: EMFILE past
    fs.inotify.max_user_instances, ENOSYS without inotify)."""

    def __init__(self) -> None:
        self.fd = _check(_lib().inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC), "inotify_init1")

    def add_watch(self, path: str, mask: int) -> int:
        """Watch ``path``; its watch descriptor. OSError: ENOENT, ENOTDIR, EACCES, ENOSPC
        (past fs.inotify.max_user_watches)."""
        return _check(_lib().inotify_add_watch(self.fd, os.fsencode(path), mask), path)

    def rm_watch(self, wd: int) -> None:
        """Stop watching; the kernel then queues IN_IGNORED for ``wd``. A watch already
        gone (its inode deleted) is not an error here."""
        _lib().inotify_rm_watch(self.fd, wd)

    def pending_bytes(self) -> int:
        """How many bytes of events are queued (FIONREAD, which inotify answers)."""
        answer = fcntl.ioctl(self.fd, termios.FIONREAD, b"\0\0\0\0")
        return int.from_bytes(answer, "little" if sys.byteorder == "little" else "big")

    def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of whole events waiting (b"" when none). ``max_bytes``
        must hold one event with the longest name: 16 + NAME_MAX + 1 bytes."""
        try:
            return os.read(self.fd, max_bytes)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def events(data: bytes) -> Iterator[tuple[int, int, str]]:
    """The (wd, mask, name) of each event in ``data`` (whole events, as read returns
    them); ``name`` is "" for an event on the watched directory itself."""
    offset, end = 0, len(data)
    header = _HEADER
    while offset < end:
        wd, mask, _cookie, length = header.unpack_from(data, offset)
        offset += header.size
        raw = data[offset : offset + length]
        offset += length
        yield wd, mask, os.fsdecode(raw.rstrip(b"\0"))
