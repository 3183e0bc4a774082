"""The periodic event queue (model: PCP's ``__pmAF``), without signal-handler limits.

This module owns *when* periodic and one-trip callbacks run; it does no I/O and starts
no thread. The owner (the monitor thread) asks :meth:`EventQueue.next_due` for its poll
timeout and calls :meth:`EventQueue.run_due` when the poll returns. Other threads may
register and unregister events at any time; ``wake()`` tells the owner to shorten its
poll when a new event is due earlier than everything already queued.

Rules (docs/telemetry.md section 4), with where they come from:

* Ids start at 32769 and are never reused (PCP: ``afid`` starts at 0x8000 and is
  pre-incremented), so a stale id can never unregister someone else's event.
* A periodic event runs on a fixed grid anchored at registration:
  ``anchor + n * delta``. The grid point is computed from ``n`` rather than by adding
  ``delta`` over and over, so floating-point error never accumulates into drift.
* After a late run, grid points older than one period are skipped and counted: when
  an event is dispatched, only its latest due grid point runs (a point is skipped as
  soon as its successor is also due, i.e. it is at least one period old). So at most
  one late point per event fires at once, and a run is never more than one period
  late. PCP keeps a point that is exactly one period old and then fires its successor
  at once; here that boundary point counts as skipped, so a callback that takes an
  exact multiple of its period resumes on time instead of running twice in a row.
* ``delta == 0`` makes a one-trip event: it runs once and is forgotten.
* Events run in the order they became due (the earliest grid point still pending),
  ties in registration order (PCP keeps its queue sorted and inserts behind equal
  times). Ordering by the point an event will run for instead would let a slow
  long-period event starve a short-period one that is always caught up to "now".
* Never early: an event runs only when ``clock() >= due``. PCP fires up to 10 ms early
  and arms a 100 us minimum timer; vmpower's owner computes the exact timeout instead.
  Note for owners: ``poll``/``epoll`` count timeouts in whole milliseconds (Python
  rounds up), so they add up to 1 ms of lateness; ``select`` counts microseconds.
* Callbacks never nest: ``run_due`` from inside a callback is a no-op.
* ``block``/``unblock`` defer dispatch; everything that fell due meanwhile runs once,
  in time order, at the owner's next ``run_due`` after ``unblock`` (which wakes it).
* Deliberate improvement over PCP: unregistering the event whose callback is running
  succeeds (returns 0) and it never runs again. PCP returns -1 there and reschedules
  it anyway (PCP QA 414 expects that quirk).
* A callback that raises is logged; the event stays scheduled.

Fairness: one ``run_due`` call runs each event at most once and does not run events
registered during the call; it returns early instead (``next_due`` is then already
past, so the owner's next poll does not wait). A callback slower than its own period
therefore cannot keep ``run_due`` from returning and starve the owner's I/O.
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vmpower.errors import VmpowerError

log = logging.getLogger(__name__)

FIRST_EVENT_ID = 32769
"""First id handed out (PCP: 0x8000 + 1); ids only grow."""

MIN_PERIOD_S = 1e-6
"""Smallest non-zero period: finer grids cannot be told apart on a float clock."""

EventCallback = Callable[[int, Any], None]
"""``func(event_id, data)``: what a registered event runs."""


class EventError(VmpowerError, ValueError):
    """A bad argument to the event queue: a negative or non-finite time, an unknown id."""


@dataclass(frozen=True)
class EventStats:
    """Counters of one registered event."""

    event_id: int
    delta_s: float
    next_due_s: float
    """Absolute clock time of the next grid point not yet run (may already be past)."""
    runs: int
    skipped: int
    errors: int
    max_lateness_s: float


@dataclass(frozen=True)
class QueueStats:
    """Counters of the whole queue, including events since unregistered."""

    events: int
    runs: int
    skipped: int
    errors: int
    max_lateness_s: float


def _no_wake() -> None:
    """Default ``wake``: an owner that never sleeps longer than ``next_due`` needs none."""


class _Event:
    """One registered event; mutated only under the queue's lock."""

    __slots__ = (
        "anchor_s",
        "data",
        "delta_s",
        "errors",
        "event_id",
        "func",
        "index",
        "live",
        "max_lateness_s",
        "pass_no",
        "queued",
        "runs",
        "skipped",
        "when_s",
    )

    def __init__(
        self, event_id: int, anchor_s: float, delta_s: float, func: EventCallback, data: Any
    ) -> None:
        self.event_id = event_id
        self.anchor_s = anchor_s
        self.delta_s = delta_s
        self.func = func
        self.data = data
        self.index = 0
        self.when_s = anchor_s
        self.live = True
        self.queued = False
        self.pass_no = 0
        self.runs = 0
        self.skipped = 0
        self.errors = 0
        self.max_lateness_s = 0.0


def _check_time(name: str, value_s: float, allow_zero_period: bool) -> float:
    """Validate a start offset or a period (seconds) and return it as a float."""
    if isinstance(value_s, bool) or not isinstance(value_s, int | float):
        raise EventError(f"{name} must be a number of seconds, not {value_s!r}")
    value = float(value_s)
    if not math.isfinite(value) or value < 0:
        raise EventError(f"{name} must be a finite number of seconds >= 0, not {value_s!r}")
    if allow_zero_period and 0 < value < MIN_PERIOD_S:
        raise EventError(f"{name} must be 0 (one-trip) or >= {MIN_PERIOD_S} s, not {value_s!r}")
    return value


class EventQueue:
    """Periodic and one-trip events on fixed grids; see the module docstring for the rules.

    ``clock`` returns seconds (monotonic in production, a fake in tests); ``wake`` is
    called, without the queue's lock held, when the earliest deadline moves earlier or
    dispatch is unblocked, so the owner's poll can shorten its timeout.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        wake: Callable[[], None] = _no_wake,
    ) -> None:
        self._clock = clock
        self._wake = wake
        self._lock = threading.Lock()
        # Heap of (due_s, event_id, event): the id breaks ties in registration order and,
        # being unique, keeps tuple comparison from ever reaching the event object.
        # Unregistered events stay in the heap as dead entries until popped or compacted.
        self._heap: list[tuple[float, int, _Event]] = []
        self._events: dict[int, _Event] = {}
        self._dead = 0
        self._next_id = FIRST_EVENT_ID
        self._blocked = False
        self._dispatching = False
        self._pass_no = 0
        self._current: _Event | None = None
        self._runs = 0
        self._skipped = 0
        self._errors = 0
        self._max_lateness_s = 0.0

    # -- registration (any thread) ---------------------------------------------------

    def register(self, delta_s: float, func: EventCallback, data: Any = None) -> int:
        """Run ``func(id, data)`` every ``delta_s`` seconds, first at now + ``delta_s``.

        ``delta_s == 0`` makes a one-trip event that runs at the next ``run_due``.
        Returns the event id.
        """
        delta = _check_time("delta_s", delta_s, allow_zero_period=True)
        return self._add(delta, delta, func, data)

    def setup(self, start_s: float, delta_s: float, func: EventCallback, data: Any = None) -> int:
        """Like :meth:`register` but the first run (the grid's anchor) is at now + ``start_s``."""
        start = _check_time("start_s", start_s, allow_zero_period=False)
        delta = _check_time("delta_s", delta_s, allow_zero_period=True)
        return self._add(start, delta, func, data)

    def _add(self, start_s: float, delta_s: float, func: EventCallback, data: Any) -> int:
        if not callable(func):
            raise EventError(f"func must be callable, not {func!r}")
        with self._lock:
            head_s = self._head_due_locked()
            event = _Event(self._next_id, self._clock() + start_s, delta_s, func, data)
            self._next_id += 1
            self._events[event.event_id] = event
            self._push_locked(event)
            moved_earlier = not self._blocked and (head_s is None or event.when_s < head_s)
        if moved_earlier:
            self._wake()
        return event.event_id

    def unregister(self, event_id: int) -> int:
        """Forget an event: 0 on success, -1 if the id is unknown (or already gone).

        Works from any callback, including the event's own: it will not run again.
        """
        with self._lock:
            event = self._events.pop(event_id, None)
            if event is None:
                return -1
            event.live = False
            if event.queued:
                self._dead += 1
                # Lazy deletion keeps unregister O(1); compact once dead entries dominate
                # so a register/unregister churn cannot grow the heap without bound.
                if self._dead > 32 and self._dead * 2 > len(self._heap):
                    self._heap = [entry for entry in self._heap if entry[2].live]
                    heapq.heapify(self._heap)
                    self._dead = 0
        return 0

    def block(self) -> None:
        """Defer dispatch: ``run_due`` runs nothing until :meth:`unblock` (not counted)."""
        with self._lock:
            self._blocked = True

    def unblock(self) -> None:
        """Resume dispatch; events that fell due meanwhile run once, at the next ``run_due``."""
        with self._lock:
            was_blocked = self._blocked
            self._blocked = False
            pending = self._head_due_locked() is not None
        if was_blocked and pending:
            self._wake()

    # -- queries -------------------------------------------------------------------

    def is_empty(self) -> bool:
        """True when no event is registered."""
        with self._lock:
            return not self._events

    def next_due(self) -> float | None:
        """Absolute clock time of the earliest pending run; None when empty or blocked.

        A time in the past means "call ``run_due`` now" (poll with a zero timeout).
        """
        if not self._heap:  # the loop asks every turn; a push from elsewhere wakes it
            return None
        with self._lock:
            if self._blocked:
                return None
            return self._head_due_locked()

    def current_due_s(self) -> float | None:
        """Grid time of the run in progress (for callbacks: a sample's nominal timestamp)."""
        with self._lock:
            return None if self._current is None else self._current.when_s

    def stats(self, event_id: int) -> EventStats:
        """Counters of one registered event; EventError if the id is not registered."""
        with self._lock:
            event = self._events.get(event_id)
            if event is None:
                raise EventError(f"no registered event with id {event_id!r}")
            return EventStats(
                event_id=event.event_id,
                delta_s=event.delta_s,
                next_due_s=event.when_s,
                runs=event.runs,
                skipped=event.skipped,
                errors=event.errors,
                max_lateness_s=event.max_lateness_s,
            )

    def counters(self) -> QueueStats:
        """Totals over the queue's life."""
        with self._lock:
            return QueueStats(
                events=len(self._events),
                runs=self._runs,
                skipped=self._skipped,
                errors=self._errors,
                max_lateness_s=self._max_lateness_s,
            )

    # -- dispatch (owner thread) -----------------------------------------------------

    def run_due(self) -> int:
        """Run every event whose time has come, serially and in order; return how many ran.

        A no-op (returns 0) while blocked or when called from inside a callback.
        """
        with self._lock:
            if self._dispatching or self._blocked:
                return 0
            self._dispatching = True
            self._pass_no += 1
            pass_no = self._pass_no
            id_limit = self._next_id
        ran = 0
        try:
            while True:
                with self._lock:
                    event = None if self._blocked else self._pop_due_locked(pass_no, id_limit)
                    if event is None:
                        break
                    self._current = event
                try:
                    event.func(event.event_id, event.data)
                except Exception:
                    log.exception(
                        "event %d: callback %r failed; the event stays scheduled",
                        event.event_id,
                        event.func,
                    )
                    with self._lock:
                        event.errors += 1
                        self._errors += 1
                finally:
                    with self._lock:
                        self._current = None
                        self._requeue_locked(event)
                ran += 1
        finally:
            with self._lock:
                self._dispatching = False
        return ran

    # -- internals (lock held) -------------------------------------------------------

    def _push_locked(self, event: _Event) -> None:
        event.queued = True
        heapq.heappush(self._heap, (event.when_s, event.event_id, event))

    def _head_due_locked(self) -> float | None:
        heap = self._heap
        while heap and not heap[0][2].live:
            heapq.heappop(heap)
            self._dead -= 1
        return heap[0][0] if heap else None

    def _pop_due_locked(self, pass_no: int, id_limit: int) -> _Event | None:
        """Pop the head if it is due and may run in this pass; catch it up to the grid."""
        due_s = self._head_due_locked()
        if due_s is None:
            return None
        now_s = self._clock()
        if due_s > now_s:
            return None
        event = self._heap[0][2]
        if event.pass_no == pass_no or event.event_id >= id_limit:
            return None
        heapq.heappop(self._heap)
        event.queued = False
        event.pass_no = pass_no
        delta_s = event.delta_s
        if delta_s > 0 and event.anchor_s + (event.index + 1) * delta_s <= now_s:
            # Skip every grid point whose successor is also due: only the latest runs.
            index = math.floor((now_s - event.anchor_s) / delta_s)
            # The division may round either way: settle on the exact latest point <= now.
            while index > event.index and event.anchor_s + index * delta_s > now_s:
                index -= 1
            while event.anchor_s + (index + 1) * delta_s <= now_s:
                index += 1
            event.skipped += index - event.index
            self._skipped += index - event.index
            event.index = index
            event.when_s = event.anchor_s + index * delta_s
        lateness_s = now_s - event.when_s
        event.runs += 1
        self._runs += 1
        if lateness_s > event.max_lateness_s:
            event.max_lateness_s = lateness_s
        if lateness_s > self._max_lateness_s:
            self._max_lateness_s = lateness_s
        return event

    def _requeue_locked(self, event: _Event) -> None:
        if not event.live:
            return  # unregistered while its callback ran
        if event.delta_s == 0:
            event.live = False
            del self._events[event.event_id]
            return
        event.index += 1
        event.when_s = event.anchor_s + event.index * event.delta_s
        self._push_locked(event)
