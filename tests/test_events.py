"""Tests of vmpower.events: the periodic event queue (docs/telemetry.md section 4).

Almost every test drives the queue with an injected fake clock, so times are exact; the
clock advances inside callbacks to model slow work. One test runs on time.monotonic
with tolerant bounds.
"""

from __future__ import annotations

import logging
import math
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from vmpower.errors import VmpowerError
from vmpower.events import FIRST_EVENT_ID, EventError, EventQueue


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, now_s: float = 0.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


Run = tuple[int, float, float]
"""(event id, grid time it ran for, clock when it ran)."""


def drive(queue: EventQueue, clock: FakeClock, until_s: float, max_calls: int = 10_000) -> int:
    """Act as the owner: sleep (jump the clock) to next_due, run_due; stop after ``until_s``."""
    calls = 0
    while True:
        due_s = queue.next_due()
        if due_s is None or due_s > until_s:
            return calls
        clock.now_s = max(clock.now_s, due_s)
        queue.run_due()
        calls += 1
        assert calls < max_calls, "the queue never settles"


def recorder(
    queue: EventQueue,
    clock: FakeClock,
    log: list[Run],
    work_s: Callable[[int], float] = lambda n: 0,
) -> Callable[[int, Any], None]:
    """A callback that logs its run and then "works" for work_s(n) seconds (n = its run #)."""
    count = [0]

    def callback(event_id: int, data: Any) -> None:
        due_s = queue.current_due_s()
        assert due_s is not None
        log.append((event_id, due_s, clock.now_s))
        clock.now_s += work_s(count[0])
        count[0] += 1

    return callback


def test_qa414_scenario_one_trip_first_skips_counted_grid_never_drifts() -> None:
    # PCP qa/src/slow_af.c (QA 414): 2.5 s and 1.5 s periodic events, a zero-delta
    # one-trip and a 60 s event are registered while blocked; the shared callback sleeps
    # 1 s longer each call (after four free calls) and, on its 11th call, unregisters
    # all four events.
    clock = FakeClock(100.0)
    queue = EventQueue(clock=clock)
    log: list[Run] = []
    ids: list[int] = []
    unregistered: list[int] = []
    delay = [-3]

    def onevent(event_id: int, data: Any) -> None:
        log.append((event_id, queue.current_due_s() or -1.0, clock.now_s))
        if delay[0] > 6:
            unregistered.extend(queue.unregister(i) for i in ids)
            return
        if delay[0] > 0:
            clock.now_s += delay[0]
        delay[0] += 1

    queue.block()
    ids.append(queue.register(2.5, onevent))
    ids.append(queue.register(1.5, onevent))
    ids.append(queue.register(0, onevent))
    ids.append(queue.register(60, onevent))
    queue.unblock()
    slow, fast, once, never = ids
    assert ids == [32769, 32770, 32771, 32772]

    drive(queue, clock, until_s=200.0)

    t0 = 100.0
    assert log == [
        (once, t0, t0),  # the one-trip runs first
        (fast, t0 + 1.5, t0 + 1.5),
        (slow, t0 + 2.5, t0 + 2.5),
        (fast, t0 + 3.0, t0 + 3.0),
        (fast, t0 + 4.5, t0 + 4.5),  # works 1 s: until 5.5
        (slow, t0 + 5.0, t0 + 5.5),  # late, within a period: fires at once; works until 7.5
        (fast, t0 + 7.5, t0 + 7.5),  # 6.0 skipped; works until 10.5
        (slow, t0 + 10.0, t0 + 10.5),  # 7.5 skipped; works until 14.5
        (fast, t0 + 13.5, t0 + 14.5),  # 9.0, 10.5, 12.0 skipped; works until 19.5
        (slow, t0 + 17.5, t0 + 19.5),  # 12.5, 15.0 skipped; works until 25.5
        (fast, t0 + 25.5, t0 + 25.5),  # 15.0 .. 24.0 skipped (7); unregisters all
    ]
    # Every run was for a point of its own grid (anchored at registration): no drift.
    for event_id, due_s, ran_s in log:
        assert ran_s >= due_s
        if event_id in (slow, fast):
            delta_s = 2.5 if event_id == slow else 1.5
            assert (due_s - t0) / delta_s == round((due_s - t0) / delta_s)
            assert ran_s - due_s < delta_s
    assert never not in {entry[0] for entry in log}
    # vmpower's deliberate difference: the running event (fast) unregisters fine; the
    # finished one-trip is unknown.
    assert unregistered == [0, 0, -1, 0]
    assert queue.is_empty()
    assert queue.next_due() is None
    totals = queue.counters()
    assert (totals.runs, totals.skipped, totals.max_lateness_s) == (11, 3 + 11, 2.0)


def test_grid_alignment_callbacks_shorter_than_period_do_not_drift() -> None:
    clock = FakeClock(10.0)
    queue = EventQueue(clock=clock)
    log: list[Run] = []
    event_id = queue.register(0.25, recorder(queue, clock, log, work_s=lambda n: 0.0625 * (n % 4)))

    drive(queue, clock, until_s=12.0)

    assert [due for _, due, _ in log] == [10.0 + 0.25 * k for k in range(1, 9)]
    assert all(ran == due for _, due, ran in log)  # work never shifts the next run
    stats = queue.stats(event_id)
    assert (stats.runs, stats.skipped, stats.max_lateness_s) == (8, 0, 0.0)
    assert stats.next_due_s == 12.25


def test_setup_anchors_grid_at_start_offset() -> None:
    clock = FakeClock(5.0)
    queue = EventQueue(clock=clock)
    log: list[Run] = []
    queue.setup(0.5, 2.0, recorder(queue, clock, log))
    assert queue.next_due() == 5.5
    drive(queue, clock, until_s=12.0)
    assert [due for _, due, _ in log] == [5.5, 7.5, 9.5, 11.5]


def test_late_callback_next_point_fires_at_once_then_back_on_grid() -> None:
    clock = FakeClock()
    queue = EventQueue(clock=clock)
    log: list[Run] = []
    event_id = queue.register(1.0, recorder(queue, clock, log, lambda n: 1.5 if n == 2 else 0))

    drive(queue, clock, until_s=6.0)

    assert [(due, ran) for _, due, ran in log] == [
        (1.0, 1.0),
        (2.0, 2.0),
        (3.0, 3.0),  # works until 4.5
        (4.0, 4.5),  # late by half a period: runs at once, not skipped
        (5.0, 5.0),
        (6.0, 6.0),
    ]
    stats = queue.stats(event_id)
    assert (stats.skipped, stats.max_lateness_s) == (0, 0.5)


def test_points_older_than_a_period_are_skipped_and_counted() -> None:
    clock = FakeClock()
    queue = EventQueue(clock=clock)
    log: list[Run] = []
    event_id = queue.register(1.0, recorder(queue, clock, log, lambda n: 3.5 if n == 1 else 0))

    drive(queue, clock, until_s=7.0)

    # Point 2 works until 5.5: points 3 and 4 are more than a period old and skipped;
    # only the latest due point (5) fires, late by 0.5.
    assert [(due, ran) for _, due, ran in log] == [
        (1.0, 1.0),
        (2.0, 2.0),
        (5.0, 5.5),
        (6.0, 6.0),
        (7.0, 7.0),
    ]
    stats = queue.stats(event_id)
    assert (stats.runs, stats.skipped, stats.max_lateness_s) == (5, 2, 0.5)


def test_point_exactly_one_period_old_is_skipped_so_run_is_on_time() -> None:
    clock = FakeClock()
    queue = EventQueue(clock=clock)
    log: list[Run] = []
    event_id = queue.register(1.0, recorder(queue, clock, log, lambda n: 2.0 if n == 0 else 0))

    drive(queue, clock, until_s=4.0)

    # Point 1 works until exactly 3.0: point 2 is one period old (its successor is
    # due), so it is skipped and point 3 runs on time instead of 2 and 3 back to back.
    assert [(due, ran) for _, due, ran in log] == [(1.0, 1.0), (3.0, 3.0), (4.0, 4.0)]
    assert queue.stats(event_id).skipped == 1


def test_owner_stalled_for_many_periods_runs_once() -> None:
    clock = FakeClock()
    queue = EventQueue(clock=clock)
    log: list[Run] = []
    event_id = queue.register(1.0, recorder(queue, clock, log))

    clock.now_s = 10.25  # the owner did not call run_due for ten periods
    assert queue.run_due() == 1
    assert queue.run_due() == 0

    assert log == [(event_id, 10.0, 10.25)]
    stats = queue.stats(event_id)
    assert (stats.runs, stats.skipped, stats.next_due_s) == (1, 9, 11.0)
    assert stats.max_lateness_s == pytest.approx(0.25)


def test_never_early() -> None:
    clock = FakeClock()
    queue = EventQueue(clock=clock)
    log: list[Run] = []
    queue.register(1.0, recorder(queue, clock, log))

    clock.now_s = 0.999999
    assert queue.run_due() == 0
    clock.now_s = 1.0
    assert queue.run_due() == 1
    assert log == [(FIRST_EVENT_ID, 1.0, 1.0)]


def test_one_trip_events_run_once_and_are_forgotten() -> None:
    clock = FakeClock(3.0)
    queue = EventQueue(clock=clock)
    log: list[Run] = []
    now_id = queue.register(0, recorder(queue, clock, log))
    later_id = queue.setup(2.0, 0, recorder(queue, clock, log))

    assert queue.next_due() == 3.0
    drive(queue, clock, until_s=100.0)

    assert log == [(now_id, 3.0, 3.0), (later_id, 5.0, 5.0)]
    assert queue.is_empty()
    assert queue.unregister(now_id) == -1
    with pytest.raises(EventError):
        queue.stats(later_id)


def test_block_defers_dispatch_then_each_due_event_runs_once_in_time_order() -> None:
    clock = FakeClock()
    wakes: list[float] = []
    queue = EventQueue(clock=clock, wake=lambda: wakes.append(clock.now_s))
    log: list[Run] = []
    a = queue.register(1.0, recorder(queue, clock, log))
    b = queue.register(1.5, recorder(queue, clock, log))
    c = queue.setup(0.25, 0, recorder(queue, clock, log))
    wakes.clear()

    queue.block()
    assert queue.next_due() is None  # nothing to wait for while blocked
    clock.now_s = 3.25
    assert queue.run_due() == 0
    assert log == []

    queue.unblock()
    assert wakes == [3.25]  # the owner is told to come back
    assert queue.next_due() == 0.25
    assert queue.run_due() == 3

    # In the order they fell due: c (0.25), a (since 1.0), b (since 1.5); each once,
    # for its latest grid point.
    assert log == [(c, 0.25, 3.25), (a, 3.0, 3.25), (b, 3.0, 3.25)]
    assert (queue.stats(a).skipped, queue.stats(b).skipped) == (2, 1)


def test_unblock_without_pending_events_does_not_wake() -> None:
    wakes: list[int] = []
    queue = EventQueue(clock=FakeClock(), wake=lambda: wakes.append(1))
    queue.block()
    queue.unblock()
    assert wakes == []


def test_unregister_own_event_inside_callback_stops_it() -> None:
    clock = FakeClock()
    queue = EventQueue(clock=clock)
    runs: list[float] = []
    results: list[int] = []

    def callback(event_id: int, data: Any) -> None:
        runs.append(clock.now_s)
        if len(runs) == 2:
            results.append(queue.unregister(event_id))

    event_id = queue.register(1.0, callback)
    drive(queue, clock, until_s=10.0)

    assert results == [0]  # PCP returns -1 here and reschedules it; vmpower stops it
    assert runs == [1.0, 2.0]
    assert queue.is_empty()
    assert queue.unregister(event_id) == -1


def test_unregister_other_due_event_inside_callback_prevents_its_run() -> None:
    clock = FakeClock()
    queue = EventQueue(clock=clock)
    log: list[Run] = []
    ids: dict[str, int] = {}
    results: list[int] = []

    def killer(event_id: int, data: Any) -> None:
        log.append((event_id, clock.now_s, clock.now_s))
        results.append(queue.unregister(ids["victim"]))

    ids["killer"] = queue.setup(1.0, 0, killer)
    ids["victim"] = queue.register(1.0, recorder(queue, clock, log))  # due at 1.0 too
    drive(queue, clock, until_s=10.0)

    assert results == [0]
    assert log == [(ids["killer"], 1.0, 1.0)]
    assert queue.is_empty()


def test_unregister_one_trip_inside_its_own_callback() -> None:
    clock = FakeClock()
    queue = EventQueue(clock=clock)
    results: list[int] = []
    queue.register(0, lambda event_id, data: results.append(queue.unregister(event_id)))
    assert queue.run_due() == 1
    assert results == [0]
    assert queue.is_empty()


def test_many_events_of_mixed_periods_run_in_exact_order() -> None:
    clock = FakeClock(50.0)
    queue = EventQueue(clock=clock)
    log: list[Run] = []
    # Binary-exact periods and offsets so that ties are real ties.
    periods = [0.125, 0.25, 0.375, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0]
    starts = [0.0, 0.125, 0.5, 1.0]
    expected: list[tuple[float, int, float]] = []
    end_s = 56.0
    for k in range(60):
        delta_s = periods[k % len(periods)]
        start_s = starts[k % len(starts)] if k % 5 else delta_s
        event_id = queue.setup(start_s, delta_s, recorder(queue, clock, log))
        due_s = 50.0 + start_s
        while due_s <= end_s:
            expected.append((due_s, event_id, due_s))
            due_s += delta_s  # binary-exact: repeated addition is exact here
    drive(queue, clock, until_s=end_s)

    expected.sort(key=lambda run: (run[0], run[1]))  # time, then registration order
    assert [(due, event_id, ran) for event_id, due, ran in log] == expected
    assert queue.counters().skipped == 0


def test_ids_start_at_32769_and_are_never_reused() -> None:
    queue = EventQueue(clock=FakeClock())
    first = queue.register(1.0, lambda event_id, data: None)
    assert first == FIRST_EVENT_ID == 32769
    assert queue.unregister(first) == 0
    second = queue.register(1.0, lambda event_id, data: None)
    assert second == 32770
    assert queue.unregister(first) == -1  # a stale id cannot touch the new event
    assert queue.stats(second).event_id == second


def test_callback_receives_its_id_and_data() -> None:
    clock = FakeClock()
    queue = EventQueue(clock=clock)
    seen: list[tuple[int, Any]] = []
    payload = {"vm": "vm1"}
    event_id = queue.register(0, lambda i, data: seen.append((i, data)), payload)
    queue.run_due()
    assert seen == [(event_id, payload)]


def test_failing_callback_is_logged_and_event_stays(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    queue = EventQueue(clock=clock)
    calls: list[float] = []

    def flaky(event_id: int, data: Any) -> None:
        calls.append(clock.now_s)
        if len(calls) == 1:
            raise RuntimeError("sensor gone")

    event_id = queue.register(1.0, flaky)
    with caplog.at_level(logging.ERROR, logger="vmpower.events"):
        drive(queue, clock, until_s=3.0)

    assert calls == [1.0, 2.0, 3.0]
    assert "sensor gone" in caplog.text
    assert f"event {event_id}" in caplog.text
    assert queue.stats(event_id).errors == 1
    assert queue.counters().errors == 1


def test_run_due_inside_callback_is_a_no_op_and_callbacks_never_nest() -> None:
    clock = FakeClock()
    queue = EventQueue(clock=clock)
    trace: list[str] = []
    nested: list[int] = []

    def outer(event_id: int, data: Any) -> None:
        trace.append("outer-start")
        nested.append(queue.run_due())  # "inner" is due too, but must not run in here
        trace.append("outer-end")

    queue.register(1.0, outer)
    queue.register(1.0, lambda event_id, data: trace.append("inner"))
    clock.now_s = 1.0
    assert queue.run_due() == 2
    assert nested == [0]
    assert trace == ["outer-start", "outer-end", "inner"]


def test_slow_callback_cannot_keep_run_due_from_returning() -> None:
    clock = FakeClock()
    queue = EventQueue(clock=clock)
    log: list[Run] = []
    hog = queue.register(1.0, recorder(queue, clock, log, lambda n: 2.5))
    other = queue.setup(1.5, 2.0, recorder(queue, clock, log))

    clock.now_s = 1.0
    # The hog is always due again when its callback returns, yet each call runs every
    # event at most once and returns, so the owner gets back to its I/O.
    assert [queue.run_due() for _ in range(4)] == [2, 1, 2, 1]
    due_s = queue.next_due()
    assert due_s is not None and due_s <= clock.now_s  # the owner will not sleep
    assert log == [
        (hog, 1.0, 1.0),  # works until 3.5
        (other, 3.5, 3.5),  # 1.5 skipped
        (hog, 3.0, 3.5),  # 2nd call; works until 6.0; it is due again: the call returns
        (hog, 6.0, 6.0),  # 3rd call; 4.0, 5.0 skipped; works until 8.5
        (other, 7.5, 8.5),  # 5.5 skipped
        (hog, 8.0, 8.5),  # 4th call; 7.0 skipped; works until 11.0
    ]


def test_event_registered_by_a_callback_runs_at_the_next_call() -> None:
    clock = FakeClock()
    queue = EventQueue(clock=clock)
    order: list[str] = []

    def parent(event_id: int, data: Any) -> None:
        order.append("parent")
        queue.register(0, lambda i, d: order.append("child"))

    queue.register(0, parent)
    assert queue.run_due() == 1
    assert order == ["parent"]
    assert queue.next_due() == 0.0
    assert queue.run_due() == 1
    assert order == ["parent", "child"]


def test_next_due_is_absolute_earliest_and_empty_queue_has_none() -> None:
    clock = FakeClock(7.0)
    queue = EventQueue(clock=clock)
    assert queue.is_empty() and queue.next_due() is None
    late = queue.register(5.0, lambda event_id, data: None)
    early = queue.register(2.0, lambda event_id, data: None)
    assert queue.next_due() == 9.0
    assert queue.unregister(early) == 0
    assert queue.next_due() == 12.0
    assert not queue.is_empty()
    assert queue.unregister(late) == 0
    assert queue.next_due() is None and queue.is_empty()


def test_wake_only_when_earliest_deadline_moves_earlier() -> None:
    clock = FakeClock()
    wakes: list[int] = []
    queue = EventQueue(clock=clock, wake=lambda: wakes.append(1))
    noop: Callable[[int, Any], None] = lambda event_id, data: None  # noqa: E731
    queue.register(100.0, noop)  # first deadline: wake
    queue.register(200.0, noop)  # later than the head: no wake
    queue.register(50.0, noop)  # earlier: wake
    queue.register(50.0, noop)  # tie, not earlier: no wake
    assert len(wakes) == 2


def test_unregister_churn_keeps_the_heap_bounded() -> None:
    queue = EventQueue(clock=FakeClock())
    keep = queue.register(1000.0, lambda event_id, data: None)
    for _ in range(5000):
        queue.unregister(queue.register(1.0, lambda event_id, data: None))
    assert len(queue._heap) < 100  # dead entries are compacted away
    assert queue.next_due() == 1000.0
    assert queue.stats(keep).runs == 0


@pytest.mark.parametrize(
    ("start_s", "delta_s"),
    [(0, -1.0), (0, float("nan")), (0, float("inf")), (-0.5, 1.0), (0, "1"), (0, True), (0, 1e-9)],
)
def test_bad_times_are_refused(start_s: Any, delta_s: Any) -> None:
    queue = EventQueue(clock=FakeClock())
    with pytest.raises(EventError) as caught:
        queue.setup(start_s, delta_s, lambda event_id, data: None)
    assert isinstance(caught.value, VmpowerError)
    assert "_s must be" in str(caught.value)
    assert queue.is_empty()


def test_bad_callback_and_unknown_ids_are_refused() -> None:
    queue = EventQueue(clock=FakeClock())
    with pytest.raises(EventError, match="callable"):
        queue.register(1.0, "not a function")  # type: ignore[arg-type]
    with pytest.raises(EventError, match="no registered event"):
        queue.stats(12345)
    assert queue.unregister(12345) == -1
    assert queue.is_empty()


def test_registration_from_another_thread_wakes_a_sleeping_owner() -> None:
    clock = FakeClock()
    wake_r, wake_w = os.pipe()
    queue = EventQueue(clock=clock, wake=lambda: os.write(wake_w, b"!"))
    ran = threading.Event()
    stop = threading.Event()
    errors: list[BaseException] = []

    def owner() -> None:
        try:
            while not stop.is_set():
                due_s = queue.next_due()
                timeout_s = None if due_s is None else max(0.0, due_s - clock())
                readable, _, _ = select.select([wake_r], [], [], timeout_s)
                if readable:
                    os.read(wake_r, 4096)
                queue.run_due()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=owner, daemon=True)
    thread.start()
    try:
        # The owner sleeps with no timeout (empty queue, frozen clock): only wake()
        # can get it to run this event.
        queue.register(0, lambda event_id, data: ran.set())
        assert ran.wait(timeout=10.0), "the owner was not woken"
    finally:
        stop.set()
        os.write(wake_w, b"!")
        thread.join(timeout=10.0)
        os.close(wake_r)
        os.close(wake_w)
    assert not thread.is_alive()
    assert errors == []


def test_concurrent_registration_and_unregistration_from_threads() -> None:
    clock = FakeClock()
    queue = EventQueue(clock=clock)
    per_thread = 300
    ids: list[list[int]] = [[] for _ in range(4)]
    unregistered_ok: list[int] = []  # list.append is atomic under the GIL
    ran: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def worker(slot: int) -> None:
        try:
            mine = ids[slot]
            for k in range(per_thread):
                # k % 3 == 0: a one-trip, which may run (and vanish) at any moment.
                mine.append(queue.register(0.5 * (k % 3), lambda i, d: ran.append(i)))
                if k % 2 and queue.unregister(mine[-2]) == 0:
                    unregistered_ok.append(mine[-2])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def owner() -> None:
        while not stop.is_set():
            clock.now_s += 0.25
            queue.run_due()

    owner_thread = threading.Thread(target=owner, daemon=True)
    owner_thread.start()
    workers = [threading.Thread(target=worker, args=(slot,)) for slot in range(4)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=30.0)
    stop.set()
    owner_thread.join(timeout=30.0)
    assert errors == []

    every_id = [event_id for mine in ids for event_id in mine]
    assert sorted(every_id) == list(range(FIRST_EVENT_ID, FIRST_EVENT_ID + 4 * per_thread))
    assert all(sorted(mine) == mine for mine in ids)  # ids only grow
    unregistered_ok.extend(i for i in every_id if queue.unregister(i) == 0)
    assert queue.is_empty()
    assert queue.next_due() is None
    one_trips = {mine[k] for mine in ids for k in range(0, per_thread, 3)}
    for event_id in every_id:
        successes = unregistered_ok.count(event_id)
        if event_id in one_trips:
            # Gone on its own after its single run, or unregistered: never both lost.
            assert successes == 1 or (successes == 0 and ran.count(event_id) == 1)
            assert ran.count(event_id) <= 1
        else:
            assert successes == 1


def test_real_clock_runs_on_the_registration_grid_and_never_early() -> None:
    queue = EventQueue()  # time.monotonic
    period_s = 0.02
    seen: list[tuple[float, float]] = []

    def callback(event_id: int, data: Any) -> None:
        due_s = queue.current_due_s()
        assert due_s is not None
        seen.append((due_s, time.monotonic()))

    before_s = time.monotonic()
    event_id = queue.register(period_s, callback)
    after_s = time.monotonic()
    while len(seen) < 8:
        due_s = queue.next_due()
        assert due_s is not None
        time.sleep(max(0.0, due_s - time.monotonic()))
        queue.run_due()

    stats = queue.stats(event_id)
    # Grid points are registration time + k periods; the queue read its clock somewhere
    # between before_s and after_s. The first due point's index is the one that puts
    # that origin at or after before_s (floor, not round: a stall of half a period
    # between before_s and the queue's clock read must not shift it); the rest are
    # whole periods after it.
    first_due_s = seen[0][0]
    first_index = math.floor((first_due_s - before_s) / period_s + 1e-9)
    indexes = []
    for due_s, ran_s in seen:
        periods = (due_s - first_due_s) / period_s
        assert periods == pytest.approx(round(periods), abs=1e-6)  # exactly on the grid
        index = first_index + round(periods)
        indexes.append(index)
        assert ran_s >= due_s  # never early, whatever the load
        assert before_s - 1e-9 <= due_s - index * period_s <= after_s + 1e-9
        assert ran_s - due_s < period_s + 0.5  # only a stalled machine could break this
    assert indexes == sorted(set(indexes))
    assert stats.runs == len(seen)
    assert stats.skipped == indexes[-1] - len(seen)  # every grid point ran or was skipped
