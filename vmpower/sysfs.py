"""Sysfs(root): the only code in vmpower that opens files under /sys.

Everything is addressed relative to a root (``/sys`` in production, a simulated tree
under ``tmp_path`` in tests). Writes can be journaled: when a journal is attached,
the original content of a file is handed to it *before* the first write to that
file, so every change can be undone (see ``vmpower.restore``).

Every attribute is opened non-blocking, without following a symbolic link in its last
component, and must be a regular file (sysfs attributes are): a FIFO or a device where
an attribute should be is that attribute's error, never a hang of the monitor thread
(issue #11 point 10: a FIFO in a test tree once held the daemon 60 s).

A file vmpower writes stays open, read-write where the attribute can be read, and may
be opened so ahead of its first write (``keep_open``: a CPU's files while the daemon
warms up). A file the request path reads but never writes (``scaling_cur_freq``) may be
kept open read-only the same way (``keep_for_reads``), within a smaller share. Reading
such a file is then one ``pread`` on that fd (``read_kept``; kernfs runs the attribute's
show() anew for every read from offset 0, so it is the kernel's value now, not a
copy), and so is the value before a write (``read_for_write``: what a
failed change puts back, and the journal's original, which the journal also reads
ahead through these fds). A value the caller has just read is handed to the journal as
it is (``remember_original``), not read again. A CPU's first request pays for every
syscall of these (issue #16, first contact: taking an acpi-cpufreq CPU over cost 41
syscalls, 12 now; tests/test_first_contact.py).
"""

from __future__ import annotations

import errno
import os
import resource
import stat
import weakref
from pathlib import Path
from typing import Protocol

from vmpower.errors import SysfsError

# O_NONBLOCK: opening a FIFO neither waits for its other end nor, once open, does a read
# wait for data; regular files (and sysfs attributes) ignore it. O_NOFOLLOW: an
# attribute is never a symbolic link (its directories may be: cpuN/cpufreq).
_OPEN_FLAGS = os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}
# Attributes are at most one page (sysfs show() fills a PAGE_SIZE buffer); simulated
# trees and other files read through Sysfs stay far below this bound.
READ_MAX_BYTES = 64 * 1024
# keep_open opens files ahead of their writes while the fds kept stay below this share
# of the process's limit (RLIMIT_NOFILE): the rest is the sockets' and the VMs'. Past
# it, a file is opened by its first write, as without keep_open.
KEEP_OPEN_FD_SHARE = 4
# keep_for_reads' own share, apart: fds kept for reads never take one the writes could
# have kept (a write saves more per request than a read does).
KEEP_FOR_READS_FD_SHARE = 16


def open_attribute(path: str, access: int) -> int:
    """Open ``path`` (``os.O_RDONLY``, ``os.O_WRONLY`` or ``os.O_RDWR``) as an attribute,
    never blocking.

    Raises OSError, whose strerror names what is wrong when the file is no regular file.
    """
    return _open_checked(path, access)[0]


def _open_checked(path: str, access: int) -> tuple[int, os.stat_result]:
    """``open_attribute``, and the fstat it checked the file with (its device too)."""
    fd = os.open(path, access | _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise OSError(errno.EINVAL, f"{kind}, not an attribute")
    return fd, st


def sysfs_devices(mountinfo: str = "/proc/self/mountinfo") -> frozenset[int]:
    """The device numbers of this process's sysfs mounts (empty when none is found)."""
    devices = set()
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return frozenset()
    for line in lines:
        # "id parent major:minor root mount-point options ... - fstype source options"
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        if dash + 1 < len(fields) and fields[dash + 1] == "sysfs" and len(fields) > 4:
            try:
                devices.add(os.stat(fields[4]).st_dev)
            except OSError:
                continue
    return frozenset(devices)


def read_attribute(path: str) -> str:
    """An attribute's content, stripped of surrounding whitespace; OSError or
    UnicodeDecodeError when it cannot be read."""
    fd = open_attribute(path, os.O_RDONLY)
    try:
        data = os.read(fd, READ_MAX_BYTES)
    finally:
        os.close(fd)
    return data.decode().strip()


class WriteJournal(Protocol):
    """What Sysfs needs from a restore journal (implemented by restore.RestoreJournal)."""

    def remember(self, path: str, original: str) -> None:
        """Record ``original`` for absolute ``path`` unless already recorded; in the
        journal's file on return."""
        ...

    def knows(self, path: str) -> bool:
        """True when ``path`` already has its original recorded."""
        ...


def _keep_open_max(share: int = KEEP_OPEN_FD_SHARE) -> int:
    """How many fds Sysfs may keep before keep_open declines: 1/``share`` of the limit."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return (1 << 18) // share
    return int(soft) // share


class Sysfs:
    """Reads and writes sysfs attributes under ``root``."""

    def __init__(self, root: str | os.PathLike[str] = "/sys", journal: WriteJournal | None = None):
        self.root = Path(root)
        self.journal = journal
        self._paths: dict[str, str] = {}
        # Attributes vmpower writes stay open: a frequency step is then one pwrite
        # instead of open, write, close (the request path's largest cost otherwise).
        self._write_fds: dict[str, int] = {}
        # Kept fds of regular files (a simulated tree): each write is followed by a
        # truncate. On sysfs itself (kernfs) a write is the whole value and a truncate
        # is a wasted syscall per request.
        self._truncated: set[int] = set()
        # Kept fds opened read-write: read_for_write reads through them (a write-only
        # attribute, without show(), is opened write-only and read on its own).
        self._readable: set[int] = set()
        # Attributes read on the request path but never written (scaling_cur_freq, where
        # a requester new to a CPU starts): kept read-only, read with one pread.
        self._read_fds: dict[str, int] = {}
        self._sysfs_devices: frozenset[int] | None = None
        self._keep_max: int | None = None  # _keep_open_max(), asked once
        self._keep_reads_max: int | None = None  # the same, for keep_for_reads
        # The journal reads the originals it records ahead (a turn's other CPUs) through
        # these fds too. Weakly: a journal outliving this Sysfs reads the files itself.
        use = getattr(journal, "read_originals_with", None)
        if use is not None:
            use(weakref.WeakMethod(self.read_kept_path))

    def path(self, rel: str) -> str:
        """Absolute path of ``rel`` (a path relative to the sysfs root)."""
        path = self._paths.get(rel)
        if path is None:
            path = self._paths[rel] = os.path.join(self.root, rel)
        return path

    def exists(self, rel: str) -> bool:
        return os.path.exists(self.path(rel))

    def read(self, rel: str) -> str:
        """Content of an attribute, stripped of surrounding whitespace."""
        path = self.path(rel)
        try:
            return read_attribute(path)
        except OSError as exc:
            raise SysfsError(path, _reason(exc)) from exc
        except UnicodeDecodeError as exc:
            raise SysfsError(path, f"unreadable content: {exc}") from None

    def read_int(self, rel: str) -> int:
        return self._as_int(rel, self.read(rel))

    def read_kept_int(self, rel: str) -> int:
        """``read_int`` through the fd kept for ``rel`` where there is one (``read_kept``)."""
        return self._as_int(rel, self.read_kept(rel))

    def _as_int(self, rel: str, text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise SysfsError(self.path(rel), f"expected an integer, read {text!r}") from None

    def listdir(self, rel: str = "") -> list[str]:
        path = self.path(rel)
        try:
            return sorted(os.listdir(path))
        except OSError as exc:
            raise SysfsError(path, _reason(exc)) from exc

    def open_reader(self, rel: str) -> Reader:
        """Keep attribute ``rel`` open for repeated reads (telemetry's hot path)."""
        path = self.path(rel)
        try:
            fd = open_attribute(path, os.O_RDONLY)
        except OSError as exc:
            raise SysfsError(path, _reason(exc)) from exc
        return Reader(path, fd)

    def keep_open(self, rel: str) -> bool:
        """Open attribute ``rel`` now for the writes to come (nothing is written), so
        that its first write and the reads before it (``read_kept``) open nothing.

        False when it cannot be opened (its first write says why), or when the fds kept
        reach their share of the process's limit (``KEEP_OPEN_FD_SHARE``).
        """
        path = self.path(rel)
        if path in self._write_fds:
            return True
        if self._keep_max is None:
            self._keep_max = _keep_open_max()
        if len(self._write_fds) >= self._keep_max:
            return False
        try:
            self._open_for_writes(path)
        except OSError:
            return False
        return True

    def keep_for_reads(self, rel: str) -> bool:
        """Open attribute ``rel`` now, read-only, for the reads to come (``read_kept``:
        one pread each, the value as the kernel shows it at that read). False when it
        cannot be opened (a read says why) or the fds kept for reads reach their own
        share (``KEEP_FOR_READS_FD_SHARE``)."""
        path = self.path(rel)
        if path in self._write_fds or path in self._read_fds:
            return True
        if self._keep_reads_max is None:
            self._keep_reads_max = _keep_open_max(KEEP_FOR_READS_FD_SHARE)
        if len(self._read_fds) >= self._keep_reads_max:
            return False
        try:
            self._read_fds[path] = open_attribute(path, os.O_RDONLY)
        except OSError:
            return False
        return True

    def read_kept(self, rel: str) -> str:
        """Content of attribute ``rel`` as ``read`` gives it: through the fd kept for its
        writes or for reads when there is one (one ``pread``: kernfs shows the value anew
        for each read from offset 0), else opened, read and closed as ``read`` does."""
        text = self.read_kept_path(self.path(rel))
        return self.read(rel) if text is None else text  # read says why, if it fails

    def read_kept_path(self, path: str) -> str | None:
        """The content of absolute ``path`` through a fd kept for it, or None when none is
        kept or it cannot be read so (the caller reads the file itself)."""
        fd = self._write_fds.get(path, -1)
        if fd not in self._readable:
            fd = self._read_fds.get(path, -1)
            if fd < 0:
                return None
        try:
            return os.pread(fd, READ_MAX_BYTES, 0).decode().strip()
        except OSError:
            self._drop_fd(path)  # stale (the CPU went away): the path as it is now
            return None
        except UnicodeDecodeError:
            return None

    def read_for_write(self, rel: str) -> str:
        """Content of attribute ``rel``, which the caller writes next (stripped).

        Read through the fd that write will use, opened now if it is not yet (and kept):
        one ``pread``, and the write then opens nothing. The journal is handed this
        content as ``rel``'s original if it has none yet (``remember_original``): it is
        the file's content before the write. Raises SysfsError when it cannot be read.
        """
        path = self.path(rel)
        if path not in self._write_fds:
            try:
                self._open_for_writes(path)
            except OSError:
                pass  # not writable: read_kept reads it on its own; the write says why
        text = self.read_kept(rel)
        self.remember_original(rel, text)
        return text

    def remember_original(self, rel: str, original: str) -> None:
        """Hand the journal ``original`` as attribute ``rel``'s content before vmpower's
        first write to it, unless it holds one already. ``original`` must have been
        read from the file just now, with no write of vmpower's since: the write that
        follows then does not read the file again for the journal."""
        journal = self.journal
        if journal is not None:
            path = self.path(rel)
            if not journal.knows(path):
                journal.remember(path, original)

    def journal_now(self, rel: str) -> None:
        """Hand the journal attribute ``rel``'s content now as its original, unless it
        holds one already: for a file that a write to another file changes (taking the
        governor makes ``scaling_setspeed`` show a frequency instead of
        ``<unsupported>``), before that write. Nothing is recorded when it cannot be
        read (its own first write then says why)."""
        journal = self.journal
        if journal is None or journal.knows(self.path(rel)):
            return
        try:
            self.read_for_write(rel)  # hands the journal what it read
        except SysfsError:
            pass

    def write(self, rel: str, value: str | int) -> None:
        """Write ``value`` to an attribute; the journal sees the original first."""
        path = self._paths.get(rel) or self.path(rel)  # the request path: no call
        text = str(value)
        journal = self.journal
        if journal is not None and not journal.knows(path):
            self.read_for_write(rel)  # hands the journal the original, recorded on return
        data = text.encode()
        try:
            fd = self._write_fds.get(path)
            if fd is None:
                fd = self._open_for_writes(path)
            # sysfs takes the whole value in one write(2) at offset 0 (kernfs hands the
            # store() callback each write from position 0). Simulated trees are regular
            # files: the truncate drops what a longer old value left.
            os.pwrite(fd, data, 0)
            if fd in self._truncated:
                os.ftruncate(fd, len(data))
        except OSError as exc:
            self._drop_fd(path)  # e.g. the CPU went offline and its policy dir vanished
            raise SysfsError(path, f"write {text!r}: {_reason(exc)}") from exc

    def _open_for_writes(self, path: str) -> int:
        """Open ``path`` to be kept for writes: read-write, so that read_for_write needs
        no fd of its own; write-only where the attribute cannot be read (kernfs refuses
        to open one without show() for reading: EACCES)."""
        try:
            fd, st = _open_checked(path, os.O_RDWR)
            readable = True
        except PermissionError:
            fd, st = _open_checked(path, os.O_WRONLY)
            readable = False
        self._write_fds[path] = fd
        if readable:
            self._readable.add(fd)
        if self._sysfs_devices is None:
            self._sysfs_devices = sysfs_devices()
        if st.st_dev not in self._sysfs_devices:  # the open's own fstat: none more
            self._truncated.add(fd)
        return fd

    def _drop_fd(self, path: str) -> None:
        fd = self._write_fds.pop(path, None)
        if fd is not None:
            self._truncated.discard(fd)
            self._readable.discard(fd)
            os.close(fd)
        fd = self._read_fds.pop(path, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Close the attributes kept open for writing and for reading."""
        for path in [*self._write_fds, *self._read_fds]:
            self._drop_fd(path)

    def close_under(self, rel_dir: str) -> None:
        """Close the attributes kept open in directory ``rel_dir`` (a CPU reserved by a
        reload: its files are never written again)."""
        prefix = self.path(rel_dir).rstrip("/") + "/"
        for path in [p for p in (*self._write_fds, *self._read_fds) if p.startswith(prefix)]:
            self._drop_fd(path)

    def __del__(self) -> None:
        # A Sysfs nobody closed (a test's, a probe's) must not keep its fds: a process
        # that makes many runs out of them.
        try:
            self.close()
        except Exception:  # interpreter shutdown: os may already be gone
            pass


class Reader:
    """One attribute kept open; ``read()`` re-reads it with ``pread`` at offset 0.

    sysfs regenerates an attribute's text on every read that starts at offset 0
    (fs/kernfs/file.c: the show() callback runs for position 0), so a kept fd plus
    pread costs one syscall per sample instead of open/read/close.
    """

    __slots__ = ("fd", "path")

    # Attributes are at most one page (sysfs show() fills a PAGE_SIZE buffer).
    MAX_BYTES = 4096

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd

    def read(self) -> str:
        """The attribute's content, stripped of surrounding whitespace."""
        try:
            return os.pread(self.fd, self.MAX_BYTES, 0).decode().strip()
        except OSError as exc:
            raise SysfsError(self.path, _reason(exc)) from exc
        except (UnicodeDecodeError, ValueError) as exc:
            raise SysfsError(self.path, f"unreadable content: {exc}") from None

    def read_int(self) -> int:
        text = self.read()
        try:
            return int(text)
        except ValueError:
            raise SysfsError(self.path, f"expected an integer, read {text!r}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: os may already be gone
            pass

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _reason(exc: OSError) -> str:
    if exc.strerror and exc.strerror.endswith("not an attribute"):
        return exc.strerror  # open_attribute's own: what the file is instead
    if exc.errno == errno.ELOOP:
        return "a symbolic link, not an attribute"
    if exc.errno == errno.ENXIO:
        return "a FIFO or device without its other end, not an attribute"
    if exc.errno == errno.ENOENT:
        return "no such file"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EINVAL:
        return "value refused by the kernel (EINVAL)"
    if exc.errno == errno.EBUSY:
        return "device busy (EBUSY)"
    return exc.strerror or str(exc)
