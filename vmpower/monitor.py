"""The monitor loop: one thread, one epoll set, all agent state.

Everything that changes agent state runs on the thread that calls ``Monitor.run()``:
fd readiness callbacks, timers, and work handed over by other threads through
``call_soon_threadsafe`` (libvirt's event thread, signal handlers, exporters), which
queue a callable and wake the loop through an eventfd.

A turn is: wait (epoll, timeout = next timer), run every ready fd's callback, run
due timers and queued calls, then the *end-of-turn* hooks, then the *last* steps. The
request handler uses the end-of-turn hook to coalesce sysfs writes once per turn, which
is what lets one Python thread keep up with many busy channels; the channel registry
sends the turn's replies as a last step, after everything else the turn does.
"""

from __future__ import annotations

import bisect
import gc
import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("vmpower.monitor")

READ = select.EPOLLIN
WRITE = select.EPOLLOUT
_ERRORS = select.EPOLLERR | select.EPOLLHUP

FdCallback = Callable[[int], None]

# Upper bounds (ms) of the turn-duration histogram ``status`` shows; the last is open.
TURN_BUCKETS_MS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 500.0)
# Ready fds handled per turn. Each turn ends with the writes and the replies of what it
# read, so a burst on thousands of channels at once (every guest's first request) is
# answered in slices of this many, not after all of them (a 1023-fd turn took 80 ms at
# 4000 channels). epoll's ready list is level-triggered: fds not returned this turn
# come first in the next (ep_send_events puts those it returned at the tail).
MAX_READY_PER_TURN = 64


class LoopStats:
    """How long the loop is held: each turn's work (the epoll wait excluded) in a
    histogram, the longest turn, and the longest run of each control command (a sliced
    command's longest step), in wall time and in the loop thread's CPU time: on a
    loaded host the difference is time the thread waited (preempted, or for the GIL).

    Issue #16: no control command may hold the loop more than 5 ms; these figures
    let an operator (``status``.loop) and the scale bench see whether one does.
    Bounded: a fixed bucket list, one entry per command name the server knows.
    """

    def __init__(self) -> None:
        self.buckets = [0] * (len(TURN_BUCKETS_MS) + 1)
        self.longest_turn_s = 0.0
        self.command_longest_s: dict[str, float] = {}
        self.command_longest_cpu_s: dict[str, float] = {}

    def turn(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(TURN_BUCKETS_MS, seconds * 1e3)] += 1
        if seconds > self.longest_turn_s:
            self.longest_turn_s = seconds

    def command(self, name: str, seconds: float, cpu_s: float) -> None:
        if seconds > self.command_longest_s.get(name, 0.0):
            self.command_longest_s[name] = seconds
        if cpu_s > self.command_longest_cpu_s.get(name, 0.0):
            self.command_longest_cpu_s[name] = cpu_s

    def report(self) -> dict[str, object]:
        labels = [f"le_{b:g}ms" for b in TURN_BUCKETS_MS] + [f"gt_{TURN_BUCKETS_MS[-1]:g}ms"]
        return {
            "turns_by_duration": dict(zip(labels, self.buckets, strict=True)),
            "longest_turn_ms": round(self.longest_turn_s * 1e3, 3),
            "command_longest_ms": {
                name: round(s * 1e3, 3) for name, s in sorted(self.command_longest_s.items())
            },
            "command_longest_cpu_ms": {
                name: round(s * 1e3, 3) for name, s in sorted(self.command_longest_cpu_s.items())
            },
            # The cyclic collector pauses the loop thread inside turns: whether it runs,
            # its passes per generation. (Not gc.get_freeze_count(): it walks every
            # frozen object, 5 ms at 1000 VMs.)
            "collector": {
                "enabled": gc.isenabled(),
                "collections": [generation["collections"] for generation in gc.get_stats()],
            },
        }


class Ticker(Protocol):
    """A scheduler the loop drives (the periodic event queue): due time and dispatch."""

    def next_due(self) -> float | None: ...

    def run_due(self) -> int: ...


class TimerHandle:
    """A scheduled callback; ``cancel()`` prevents it from running."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Monitor:
    """An epoll loop with timers, a thread-safe call queue and end-of-turn hooks."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._epoll = select.epoll()
        self._handlers: dict[int, tuple[int, FdCallback | None, FdCallback | None]] = {}
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._calls: deque[Callable[[], None]] = deque()
        self._calls_lock = threading.Lock()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, READ)
        self._end_of_turn: list[Callable[[], None]] = []
        self._last: list[Callable[[], None]] = []
        # A timer set (or a ticker added) since the next turn's wait was computed: the
        # wait is computed again (run() computes it ahead, before the last steps).
        self._timers_changed = False
        self._tickers: list[Ticker] = []
        # The tickers' earliest due as the turn's wait was computed (-inf: ask them all).
        # A ticker whose due comes sooner during a turn (work done in the turn) is run
        # in the next: its new due bounds that turn's wait, zero when already past. So
        # a turn asks the tickers once, not twice (the latency case's turn, issue #16).
        self._tickers_due: float | None = None
        self._stopping = False
        self.turns = 0
        self.stats = LoopStats()

    # -- fds ---------------------------------------------------------------------------

    def add_reader(self, fd: int, callback: FdCallback) -> None:
        """Call ``callback(fd)`` whenever ``fd`` is readable (or hung up / in error)."""
        self._set(fd, read=callback, keep_write=True)

    def add_writer(self, fd: int, callback: FdCallback) -> None:
        """Call ``callback(fd)`` whenever ``fd`` is writable; remove it when done."""
        self._set(fd, write=callback, keep_read=True)

    def remove_writer(self, fd: int) -> None:
        entry = self._handlers.get(fd)
        if entry is not None and entry[2] is not None:
            self._set(fd, read=entry[1], write=None)

    def remove(self, fd: int) -> None:
        """Forget ``fd`` entirely (call before closing it)."""
        if self._handlers.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def _set(
        self,
        fd: int,
        read: FdCallback | None = None,
        write: FdCallback | None = None,
        keep_read: bool = False,
        keep_write: bool = False,
    ) -> None:
        old = self._handlers.get(fd)
        if old is not None:
            if keep_read:
                read = old[1]
            if keep_write:
                write = old[2]
        mask = (READ if read else 0) | (WRITE if write else 0)
        if mask == 0:
            self.remove(fd)
            return
        self._handlers[fd] = (mask, read, write)
        if old is None:
            self._epoll.register(fd, mask)
        elif old[0] != mask:
            self._epoll.modify(fd, mask)

    # -- time and work -----------------------------------------------------------------

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback`` on the loop thread at monotonic time ``when`` (never earlier)."""
        handle = TimerHandle(when, callback)
        heapq.heappush(self._timers, (when, next(self._seq), handle))
        self._timers_changed = True
        return handle

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> TimerHandle:
        return self.call_at(self.clock() + delay_s, callback)

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """Queue ``callback`` for the loop thread from any thread, and wake the loop."""
        with self._calls_lock:
            self._calls.append(callback)
        self.wake()

    def wake(self) -> None:
        """Make the loop's current wait return (safe from any thread and signal handlers)."""
        try:
            os.eventfd_write(self._wake_fd, 1)
        except OSError:  # counter saturated or closed during shutdown: a wake is pending anyway
            pass

    def add_end_of_turn(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` after every turn's callbacks (coalesced work: writes, reply flush)."""
        self._end_of_turn.append(hook)

    def add_last(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` as every turn's very last step: after the end-of-turn hooks and,
        in ``run``, after the next turn's wait is computed.

        For what wakes another process (a guest's reply): on a CPU shared with that
        peer (QEMU's main loop, on the housekeeping CPUs as vmpowerd), it runs when the
        loop blocks, so any work of the turn left after the send was in the guest's round
        trip (issue #16, the guest bench).
        """
        self._last.append(hook)

    def add_ticker(self, ticker: Ticker) -> None:
        """Drive an external scheduler: its next_due() bounds the wait, run_due() runs it."""
        self._tickers.append(ticker)
        self._timers_changed = True

    # -- the loop ----------------------------------------------------------------------

    def stop(self) -> None:
        """Leave run() after the current turn (safe from any thread)."""
        self._stopping = True
        self.wake()

    def run(self) -> None:
        """Run turns until stop().

        Each turn's wait is computed at the end of the turn before, ahead of its last
        steps: the replies are then the last thing before the wait. Nothing runs on
        this thread between two turns, and a call queued by another thread meanwhile
        wakes the wait (its eventfd); a timer set by a last step has it computed again.
        """
        self._stopping = False
        wait: float | None = None
        while not self._stopping:
            wait = self._turn(self._timeout(None) if wait is None else wait, ahead=True)

    def run_once(self, max_wait_s: float | None = None) -> None:
        """One turn: wait for fds or the next timer, then dispatch everything due."""
        self._turn(self._timeout(max_wait_s), ahead=False)

    def _turn(self, timeout: float, ahead: bool) -> float | None:
        """One turn waiting at most ``timeout``; the next turn's wait when ``ahead``."""
        try:
            ready = self._epoll.poll(timeout, MAX_READY_PER_TURN)
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for safety
            ready = []
        started = time.perf_counter()  # the turn's work, for LoopStats (wait excluded)
        handlers = self._handlers
        for fd, events in ready:
            if fd == self._wake_fd:
                try:
                    os.eventfd_read(self._wake_fd)
                except BlockingIOError:
                    pass
                continue
            entry = handlers.get(fd)
            if entry is None:
                continue
            _, reader, writer = entry
            try:
                if writer is not None and events & (WRITE | _ERRORS):
                    writer(fd)
                    entry = handlers.get(fd)  # the writer may have removed or changed it
                    reader = entry[1] if entry else None
                if reader is not None and events & (READ | _ERRORS):
                    reader(fd)
            except Exception:
                log.exception("fd %d handler failed; the loop goes on", fd)
        if self._calls:  # the checks inline: most turns have neither
            self._run_calls()
        now = self.clock()
        timers = self._timers
        if timers and timers[0][0] <= now:
            self._run_timers(now)
        tickers_due = self._tickers_due
        if tickers_due is not None and tickers_due <= now:  # most turns: none is due
            for ticker in self._tickers:
                due = ticker.next_due()
                if due is None or due > now:
                    continue
                try:
                    ticker.run_due()
                except Exception:
                    log.exception("scheduler failed; the loop goes on")
        for hook in self._end_of_turn:
            try:
                hook()
            except Exception:
                log.exception("end-of-turn hook failed; the loop goes on")
        following = None
        if ahead:
            self._timers_changed = False
            following = self._timeout(None)
        for hook in self._last:
            try:
                hook()
            except Exception:
                log.exception("last step of a turn failed; the loop goes on")
        if self._timers_changed:
            following = None
        self.turns += 1
        self.stats.turn(time.perf_counter() - started)
        return following

    def _timeout(self, max_wait_s: float | None) -> float:
        if self._calls:
            self._tickers_due = float("-inf")
            return 0.0
        tickers_due: float | None = None
        for ticker in self._tickers:
            due = ticker.next_due()
            if due is not None and (tickers_due is None or due < tickers_due):
                tickers_due = due
        self._tickers_due = deadline = tickers_due
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if self._timers and (deadline is None or self._timers[0][0] < deadline):
            deadline = self._timers[0][0]
        wait = -1.0 if deadline is None else max(0.0, deadline - self.clock())
        if max_wait_s is not None and (wait < 0 or wait > max_wait_s):
            wait = max_wait_s
        # CPython rounds epoll's timeout up to the next millisecond (_PyTime_ROUND_TIMEOUT),
        # so the loop never wakes before a timer is due and never spins on a short wait.
        return wait

    def _run_calls(self) -> None:
        with self._calls_lock:
            calls, self._calls = self._calls, deque()
        for call in calls:
            try:
                call()
            except Exception:
                log.exception("queued call failed; the loop goes on")

    def _run_timers(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, handle = heapq.heappop(timers)
            if handle.cancelled:
                continue
            try:
                handle.callback()
            except Exception:
                log.exception("timer callback failed; the loop goes on")

    def close(self) -> None:
        for fd in list(self._handlers):
            self.remove(fd)
        self._epoll.close()
        os.close(self._wake_fd)
