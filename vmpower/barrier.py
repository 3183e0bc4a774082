"""The inter-process barrier (model: systemd's ``Barrier``, src/basic/barrier.c).

This module owns the synchronisation of a parent and the one child it forks (used by
the batch server's start-up, docs/telemetry.md sections 1 and 2). Standard library only.

Mechanism: two eventfds and a pipe, all created before ``fork()``.

* Each side owns one eventfd and writes 1 to it per barrier it places; the other side
  reads it. An eventfd read returns the sum of everything written since the last read
  and resets it (eventfd(2)), so barriers are counted, not named: ``_barriers`` is
  "placed by me" minus "seen from them", and a side is ahead when it is positive.
* An abortion is written as 2**63 - 1 (systemd's ``BARRIER_ABORTION``, INT64_MAX). It
  lands in the same counter as the pending barriers, so the reader gets one value at
  least that large: the abortion supersedes every barrier still pending. (An eventfd
  counter holds up to 2**64 - 2, so it cannot overflow.)
* Only the child keeps the pipe's write end and only the parent its read end. When
  the child exits, every write end is closed and the parent's ``poll`` reports
  ``POLLHUP`` on the read end (pipe(7)); when the parent exits, the child's write end
  reports ``POLLERR``. That hang-up is an implicit abortion. It is only taken when the
  eventfd has nothing to read, so an exit is queued *behind* the barriers the side
  placed before exiting.

Results: every operation returns True on success and False when the barrier is aborted
(by the other side, by its exit, or by this side, as systemd's rules say). A timeout is
*not* an abortion: it raises :class:`BarrierTimeout` and leaves the barrier usable (the
barriers seen before the timeout stay counted). Misuse (no role yet, a role set twice,
use after ``destroy``) raises :class:`~vmpower.errors.BarrierError`.

A process that forks again while holding a barrier passes its pipe end on: the other
side then sees the hang-up only when both processes have exited (or closed it). The
fds are close-on-exec; to use the barrier after ``exec``, pass :meth:`Barrier.fds` to
the new program (e.g. ``subprocess``'s ``pass_fds``) and rebuild it there with
:meth:`Barrier.from_fds`. The rebuilt side's count starts at zero, so that side must not
place or consume barriers before the exec (the other side may).
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import time
from collections.abc import Callable
from types import TracebackType
from typing import NamedTuple

from vmpower.errors import BarrierError, VmpowerError

ABORTION = 2**63 - 1
"""Value written to an eventfd to abort (systemd: BARRIER_ABORTION = INT64_MAX)."""

PARENT = "parent"
CHILD = "child"

# Any of these on the pipe end means the other side has closed it (exited).
_HANGUP = select.POLLHUP | select.POLLERR | select.POLLNVAL


def _check_timeout(timeout_s: float | None) -> float | None:
    """A wait's timeout: None (or +inf) waits forever; else finite seconds >= 0."""
    if timeout_s is None:
        return None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float):
        raise BarrierError(f"timeout_s must be seconds or None, not {timeout_s!r}")
    if timeout_s == math.inf:
        return None
    if not timeout_s >= 0:  # also refuses NaN
        raise BarrierError(f"timeout_s must be >= 0 seconds or None, not {timeout_s!r}")
    return float(timeout_s)


class BarrierTimeout(VmpowerError, TimeoutError):
    """A barrier wait ran out of time; the barrier is still usable."""


class BarrierFds(NamedTuple):
    """The three fds one side of a barrier uses; ``encode`` suits a command line."""

    me_fd: int
    them_fd: int
    pipe_fd: int

    def encode(self) -> str:
        """``"me,them,pipe"``."""
        return f"{self.me_fd},{self.them_fd},{self.pipe_fd}"

    @classmethod
    def decode(cls, text: str) -> BarrierFds:
        """Parse :meth:`encode`'s output; BarrierError if it is not three fd numbers."""
        parts = text.split(",")
        if len(parts) != 3 or not all(part.strip().isdigit() for part in parts):
            raise BarrierError(f"barrier fds must be three numbers 'me,them,pipe', not {text!r}")
        me_fd, them_fd, pipe_fd = (int(part) for part in parts)
        return cls(me_fd, them_fd, pipe_fd)


class Barrier:
    """One side of a parent/child barrier. Create before ``fork()``, then ``set_role``.

    Each side is used by one thread at a time (like systemd's): two threads reading the
    same eventfd would split the barriers between them.
    """

    def __init__(self) -> None:
        self._set_state(-1, -1, -1, None)
        try:
            # Non-blocking: every wait goes through poll, and a read racing another
            # reader must fail with EAGAIN rather than hang.
            self._me_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._them_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._pipe = list(os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK))
        except OSError as exc:
            self._close_all()
            raise BarrierError(f"cannot create the barrier's fds: {exc}") from exc

    @classmethod
    def from_fds(cls, me_fd: int, them_fd: int, pipe_fd: int, role: str = CHILD) -> Barrier:
        """Rebuild one side from :meth:`fds` (after ``exec``); its count starts at zero.

        ``role`` only says which side this is (for :meth:`fds`); the fds decide the rest.
        """
        if role not in (PARENT, CHILD):
            raise BarrierError(f"barrier role must be 'parent' or 'child', not {role!r}")
        fds = BarrierFds(me_fd, them_fd, pipe_fd)
        for fd in fds:
            if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
                raise BarrierError(f"barrier fd must be a number >= 0, not {fd!r}")
            try:
                os.fstat(fd)
            except OSError as exc:
                raise BarrierError(f"barrier fd {fd} is not open: {exc.strerror}") from exc
        if len(set(fds)) != 3:
            raise BarrierError(f"barrier fds must be three different fds, not {fds.encode()}")
        for fd in fds:
            os.set_blocking(fd, False)  # see __init__; O_NONBLOCK survives exec anyway
        barrier = cls.__new__(cls)
        # Which end of the pipe it is does not matter: it is only polled for a hang-up.
        barrier._set_state(me_fd, them_fd, pipe_fd, role)
        barrier._make_poller()
        return barrier

    def _set_state(self, me_fd: int, them_fd: int, pipe_fd: int, role: str | None) -> None:
        self._me_fd = me_fd
        self._them_fd = them_fd
        # Before set_role: [read end, write end]; after: [this side's end, -1].
        self._pipe = [pipe_fd, -1]
        self._role = role
        self._destroyed = False
        self._barriers = 0
        self._i_aborted = False
        self._they_aborted = False
        self._poller: select.poll | None = None

    # -- set-up ----------------------------------------------------------------------

    def set_role(self, role: str) -> None:
        """After ``fork()``: "parent" or "child"; closes the fds the other side owns."""
        self._check_alive()
        if role not in (PARENT, CHILD):
            raise BarrierError(f"barrier role must be 'parent' or 'child', not {role!r}")
        if self._role is not None:
            raise BarrierError(f"barrier role already set ({self._role})")
        read_fd, write_fd = self._pipe
        if role == PARENT:
            os.close(write_fd)
            self._pipe = [read_fd, -1]
        else:
            os.close(read_fd)
            self._pipe = [write_fd, -1]
            # The child writes where the parent reads and the other way round.
            self._me_fd, self._them_fd = self._them_fd, self._me_fd
        self._role = role
        self._make_poller()

    def fds(self, role: str | None = None) -> BarrierFds:
        """The fds ``role`` uses (default: this side's own, once its role is set).

        Before ``set_role``, ``fds("child")`` gives what to pass to an exec'd child.
        """
        self._check_alive()
        if self._role is None:
            if role == PARENT:
                return BarrierFds(self._me_fd, self._them_fd, self._pipe[0])
            if role == CHILD:
                return BarrierFds(self._them_fd, self._me_fd, self._pipe[1])
            raise BarrierError(
                f"fds() before set_role needs role 'parent' or 'child', not {role!r}"
            )
        if role is not None and role != self._role:
            raise BarrierError(f"this side is {self._role}: the {role}'s fds are closed here")
        return BarrierFds(self._me_fd, self._them_fd, self._pipe[0])

    def destroy(self) -> None:
        """Close this side's fds: to the other side, an abortion queued behind my barriers."""
        if self._destroyed:
            return
        self._destroyed = True
        self._poller = None
        self._close_all()

    def __enter__(self) -> Barrier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    # -- state -----------------------------------------------------------------------

    def is_aborted(self) -> bool:
        """True once either side aborted (or the other exited)."""
        return self._i_aborted or self._they_aborted

    def i_aborted(self) -> bool:
        """True once this side called :meth:`abort`."""
        return self._i_aborted

    def they_aborted(self) -> bool:
        """True once this side has *seen* the other side's abortion or exit."""
        return self._they_aborted

    # -- operations ------------------------------------------------------------------

    def place(self) -> bool:
        """Place one barrier; never blocks. False if the barrier is aborted."""
        self._check_ready()
        if self.is_aborted():
            return False
        self._write(1)
        return not self.is_aborted()

    def abort(self) -> bool:
        """Place an abortion (once; later calls do nothing). False if they aborted first."""
        self._check_ready()
        if not self._i_aborted:
            self._write(ABORTION)
            self._i_aborted = True
        return not self._they_aborted

    def wait_next(self, timeout_s: float | None = None) -> bool:
        """Wait until the other side placed at least one barrier more than I have seen.

        Consumes every barrier pending at that moment.
        """
        self._check_ready()
        if self.is_aborted():
            return False
        target = self._barriers - 1
        self._read(lambda: self._barriers <= target, timeout_s)
        return not self.is_aborted()

    def wait_abortion(self, timeout_s: float | None = None) -> bool:
        """Wait until the other side aborts or exits; False if I aborted too."""
        self._check_ready()
        self._read(lambda: False, timeout_s)
        return not self._i_aborted

    def sync_next(self, timeout_s: float | None = None) -> bool:
        """``wait_next``, but return at once when the other side is already ahead.

        Waits for the other side's next barrier only while I am ahead of it.
        """
        self._check_ready()
        if self.is_aborted():
            return False
        target = max(0, self._barriers - 1)
        self._read(lambda: self._barriers <= target, timeout_s)
        return not self.is_aborted()

    def sync(self, timeout_s: float | None = None) -> bool:
        """Wait until the other side has reached every barrier I placed."""
        self._check_ready()
        if self.is_aborted():
            return False
        self._read(lambda: self._barriers <= 0, timeout_s)
        return not self.is_aborted()

    # -- internals -------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self._destroyed:
            raise BarrierError("barrier already destroyed")

    def _check_ready(self) -> None:
        self._check_alive()
        if self._role is None:
            raise BarrierError("barrier role not set: call set_role() after fork()")

    def _make_poller(self) -> None:
        poller = select.poll()
        # POLLHUP/POLLERR are always reported; asking for POLLIN on the pipe end would
        # only add wake-ups nobody writes for.
        poller.register(self._pipe[0], select.POLLHUP)
        poller.register(self._them_fd, select.POLLIN)
        self._poller = poller

    def _close_all(self) -> None:
        for fd in (self._me_fd, self._them_fd, *self._pipe):
            if fd >= 0:
                # EBADF means someone closed it under us: nothing left to release.
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._me_fd = self._them_fd = -1
        self._pipe = [-1, -1]

    def _fatal(self) -> None:
        # systemd: a failed eventfd read or write cannot be recovered from (counts would
        # disagree forever), so close the pipe end: the other side sees an abortion.
        for fd in self._pipe:
            if fd >= 0:
                with contextlib.suppress(OSError):  # only that this end is gone matters
                    os.close(fd)
        self._pipe = [-1, -1]
        self._poller = None
        self._i_aborted = self._they_aborted = True

    def _write(self, value: int) -> None:
        try:
            os.eventfd_write(self._me_fd, value)
        except OSError:
            self._fatal()
            return
        if value < ABORTION and not self.is_aborted():
            self._barriers += value

    def _read(self, done: Callable[[], bool], timeout_s: float | None) -> None:
        """Consume the other side's barriers until ``done()`` or they abort/exit."""
        timeout_s = _check_timeout(timeout_s)
        deadline_s = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._they_aborted and not done():
            poller = self._poller
            if poller is None:  # after a fatal error
                return
            timeout_ms = None
            if deadline_s is not None:
                # poll() counts whole milliseconds: round up so it never returns early.
                timeout_ms = max(0, math.ceil((deadline_s - time.monotonic()) * 1000))
            ready = dict(poller.poll(timeout_ms))
            if not ready:
                if deadline_s is not None and time.monotonic() >= deadline_s:
                    raise BarrierTimeout(f"barrier wait timed out after {timeout_s} s")
                continue
            if ready.get(self._them_fd, 0):
                try:
                    value = os.eventfd_read(self._them_fd)
                except BlockingIOError:
                    continue  # nothing left: someone else read it first
                except OSError:
                    self._fatal()
                    return
                if value >= ABORTION:
                    self._they_aborted = True
                elif not self.is_aborted():
                    self._barriers -= value
            elif ready.get(self._pipe[0], 0) & _HANGUP:
                # The hang-up counts only when the eventfd had nothing to read: the
                # barriers placed before the exit are seen first (systemd's rule).
                self._they_aborted = True
