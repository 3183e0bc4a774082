"""KindLog: what a peer repeats reaches the log bounded, and every kind still reaches it."""

from __future__ import annotations

import logging

import pytest

from vmpower import logbook
from vmpower.logbook import KindLog

LOGGER = "vmpower.test_logbook"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def refusals(clock: FakeClock) -> KindLog:
    return KindLog(
        logging.getLogger(LOGGER),
        "requests refused",
        one="request refused",
        interval_s=10.0,
        clock=clock,
    )


def changes_log(clock: FakeClock, gather_firsts: bool = False) -> KindLog:
    """The daemon's frequency-changes log: INFO, 10 s summaries."""
    return KindLog(
        logging.getLogger(LOGGER),
        "frequency changes",
        one="frequency change",
        level=logging.INFO,
        interval_s=10.0,
        clock=clock,
        gather_firsts=gather_firsts,
    )


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    got = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    caplog.clear()
    return got


def test_the_first_of_each_kind_is_logged_at_once_with_its_detail(
    refusals: KindLog, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    refusals.note("vm1.0", "not pinned", "host CPU 4 is not pinned to vm1")
    refusals.note("vm1.0", "not pinned", "host CPU 5 is not pinned to vm1")
    refusals.note("vm1.0", "rate limit", "more than 10 requests/s")
    refusals.note("vm2.0", "not pinned", "host CPU 2 is not pinned to vm2")
    assert {r.levelno for r in caplog.records} == {logging.WARNING}  # the default level
    assert lines(caplog) == [
        "vm1.0: request refused: host CPU 4 is not pinned to vm1",
        "vm1.0: request refused: more than 10 requests/s",
        "vm2.0: request refused: host CPU 2 is not pinned to vm2",
    ]


def test_repeats_come_out_as_one_summary_per_source_per_interval(
    refusals: KindLog, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    refusals.note("vm1.0", "not pinned", "host CPU 4 is not pinned to vm1")
    lines(caplog)
    for _ in range(52_000):
        refusals.note("vm1.0", "not pinned", "host CPU 4 is not pinned to vm1")
    assert lines(caplog) == []
    assert refusals.next_due() == 110.0
    clock.now = 109.9
    assert refusals.run_due() == 0
    clock.now = 110.0
    assert refusals.run_due() == 1
    assert lines(caplog) == [
        "vm1.0: 52000 requests refused in the last 10 s: host CPU 4 is not pinned to vm1"
    ]
    assert refusals.next_due() is None  # nothing counted: nothing to wake for
    # several kinds in a window: each with its count, most frequent first
    refusals.note("vm1.0", "not pinned", "host CPU 5 is not pinned to vm1", count=3)
    refusals.note("vm1.0", "rate limit", "more than 10 requests/s")  # new: logged at once
    refusals.note("vm1.0", "rate limit", "more than 10 requests/s", count=4)
    assert lines(caplog) == ["vm1.0: request refused: more than 10 requests/s"]
    clock.now = 125.0
    assert refusals.run_due() == 1
    assert lines(caplog) == [
        "vm1.0: 7 requests refused in the last 15 s: more than 10 requests/s (4);"
        " host CPU 5 is not pinned to vm1 (3)"
    ]


def test_a_first_event_counted_many_times_is_logged_once_and_the_rest_summarized(
    refusals: KindLog, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    refusals.note("vm1.0", "not reading", "guest is not reading its replies", count=64)
    assert lines(caplog) == ["vm1.0: request refused: guest is not reading its replies"]
    clock.now += 10
    refusals.run_due()
    assert lines(caplog) == [
        "vm1.0: 63 requests refused in the last 10 s: guest is not reading its replies"
    ]


def test_flush_and_forget_say_what_is_still_counted(
    refusals: KindLog, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    for source in ("vm1.0", "vm2.0"):
        refusals.note(source, "reserved", "host CPU 0 is reserved", count=3)
    lines(caplog)
    clock.now += 2
    refusals.forget("vm1.0")
    assert lines(caplog) == ["vm1.0: 2 requests refused in the last 10 s: host CPU 0 is reserved"]
    assert refusals.flush() == 1
    assert lines(caplog) == ["vm2.0: 2 requests refused in the last 2 s: host CPU 0 is reserved"]
    assert refusals.flush() == 0 and refusals.next_due() is None
    # a forgotten source is new again: its next event is logged at once
    refusals.note("vm1.0", "reserved", "host CPU 0 is reserved")
    assert lines(caplog) == ["vm1.0: request refused: host CPU 0 is reserved"]


def test_a_flood_from_many_sources_stays_bounded(
    refusals: KindLog, clock: FakeClock, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(logbook, "MAX_SOURCES", 8)
    caplog.set_level(logging.INFO, LOGGER)
    for i in range(100):  # made-up source names, one event each
        refusals.note(f"client{i}", "malformed", "not JSON")
    assert len(refusals._sources) <= 8
    assert len(lines(caplog)) == 100  # each new source's first event, at once
    # one busy source: 100 000 events over 30 s give three summaries
    for _second in range(30):
        clock.now += 1
        for _ in range(3_333):
            refusals.note("vm1.0", "not pinned", "host CPU 4 is not pinned to vm1")
        refusals.run_due()
    refusals.flush()
    got = lines(caplog)
    assert len(got) <= 5, got
    total = sum(int(line.split(": ")[1].split()[0]) for line in got[1:])
    assert total + 1 == 30 * 3_333  # every event counted, the first on its own line


def test_the_level_is_the_logs(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    changes = KindLog(
        logging.getLogger(LOGGER), "frequency changes", level=logging.INFO, clock=clock
    )
    caplog.set_level(logging.WARNING, LOGGER)
    changes.note("host CPU 3", "set", "now 2300000 kHz")
    assert lines(caplog) == []  # below the configured level: nothing written
    caplog.set_level(logging.INFO, LOGGER)
    changes.note("host CPU 3", "set", "now 2200000 kHz")
    clock.now += 10
    changes.run_due()
    records = [r for r in caplog.records if r.name == LOGGER]
    assert [r.levelno for r in records] == [logging.INFO]
    assert records[0].getMessage() == (
        "host CPU 3: 1 frequency changes in the last 10 s: now 2200000 kHz"
    )


def test_logs_driven_as_one_ticker_are_each_summarized_when_due(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    logger = logging.getLogger(LOGGER)
    changes = KindLog(logger, "frequency changes", interval_s=10.0, clock=clock)
    drops = KindLog(logger, "replies dropped", interval_s=30.0, clock=clock)
    group = logbook.KindLogs((changes, drops))
    assert group.next_due() is None  # nothing counted: the loop may sleep
    changes.note("host CPU 2", "set", "now 2400000 kHz")  # logged at once
    drops.note("vm1.0", "not reading")
    assert group.next_due() is None
    changes.note("host CPU 2", "set", "now 2300000 kHz")  # counted
    assert group.next_due() == 110.0
    drops.note("vm1.0", "not reading")
    assert group.next_due() == 110.0  # the earlier of the two
    clock.now = 110.0
    assert group.run_due() == 1  # only the changes' window has ended
    assert lines(caplog)[-1] == (
        "host CPU 2: 1 frequency changes in the last 10 s: now 2300000 kHz"
    )
    assert group.next_due() == 130.0
    clock.now = 130.0
    assert group.run_due() == 1
    assert group.next_due() is None


def test_summaries_due_together_from_many_sources_are_one_line(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """256 host CPUs first changed within one first contact have their summaries due
    together every interval: 256 lines at once, 8 ms of the loop. Past a few sources a
    run writes one line: the total, the busiest sources with their details, the rest
    counted."""
    caplog.set_level(logging.INFO, LOGGER)
    changes = changes_log(clock)
    for cpu in range(256):
        changes.note(f"host CPU {cpu}", "change", "now 1700000 kHz")  # at once, each
    assert len(lines(caplog)) == 256
    for cpu in range(256):
        changes.note(f"host CPU {cpu}", "change", f"now {1800000 + cpu} kHz", count=1 + cpu)
    clock.now += 10
    assert changes.run_due() == 1
    assert lines(caplog) == [
        "32896 frequency changes in the last 10 s from 256 sources: host CPU 255: now"
        " 1800255 kHz (256); host CPU 254: now 1800254 kHz (255); host CPU 253: now"
        " 1800253 kHz (254); host CPU 252: now 1800252 kHz (253); host CPU 251: now"
        " 1800251 kHz (252); host CPU 250: now 1800250 kHz (251); host CPU 249: now"
        " 1800249 kHz (250); host CPU 248: now 1800248 kHz (249); and 248 more"
    ]
    # A few sources due together keep a line each, as before.
    for cpu in range(3):
        changes.note(f"host CPU {cpu}", "change", "now 1700000 kHz")
    clock.now += 10
    assert changes.run_due() == 3
    assert len(lines(caplog)) == 3
    # flush (exit) writes what is counted the same way.
    for cpu in range(100):
        changes.note(f"host CPU {cpu}", "change", "now 1700000 kHz", count=2)
    assert changes.flush() == 1
    assert lines(caplog)[0].startswith("200 frequency changes in the last ")


def test_sources_first_noted_over_many_turns_are_summarized_together(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """On the daemon's clock the 256 CPUs of a first contact are met over ~100 ms of
    turns, so their intervals end a few per turn; the ticker runs every turn. They are
    summarized in one line all the same, and their next intervals end together."""
    caplog.set_level(logging.INFO, LOGGER)
    changes = KindLog(
        logging.getLogger(LOGGER), "frequency changes", level=logging.INFO, clock=clock
    )
    for cpu in range(256):  # one CPU met every 0.4 ms, the ticker run each turn
        changes.note(f"host CPU {cpu}", "change", "now 1700000 kHz", count=2)
        if changes.next_due() is not None and changes.next_due() <= clock.now:
            changes.run_due()
        clock.now += 0.0004
    assert len(lines(caplog)) == 256  # each CPU's first change, at once
    runs = []
    for _turn in range(2 * 25_000):  # 20 s of 0.4 ms turns
        clock.now += 0.0004
        due = changes.next_due()
        if due is not None and due <= clock.now:
            runs.append(changes.run_due())
        if _turn % 100 == 0:
            for cpu in range(256):
                changes.note(f"host CPU {cpu}", "change", "now 1800000 kHz")
    got = lines(caplog)
    assert runs == [1, 1], runs
    assert len(got) == 2 and all(" from 256 sources: " in line for line in got), got
    assert " frequency changes in the last 10 s from 256 sources: " in got[0]


def test_firsts_of_one_turn_are_one_line_where_the_log_batches_them(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A first contact meets 256 host CPUs in ~100 ms: their first frequency changes
    were 256 INFO lines, 55 us each on the loop (14 ms while it was busiest). A log
    that gathers its firsts writes them as one line from its ticker run, at most every
    0.1 s, with the first few named: the first in the turn after, the rest when due."""
    caplog.set_level(logging.INFO, LOGGER)
    changes = changes_log(clock, gather_firsts=True)
    for cpu in range(36):
        changes.note(f"host CPU {cpu}", "set", f"now {1700000 + cpu} kHz", count=2)
    assert lines(caplog) == []  # until the turn ends
    assert changes.write_due_firsts(clock.now) == 1
    assert lines(caplog) == [
        "frequency change on 36 sources: host CPU 0: now 1700000 kHz; host CPU 1: now"
        " 1700001 kHz; host CPU 2: now 1700002 kHz; host CPU 3: now 1700003 kHz; host CPU"
        " 4: now 1700004 kHz; host CPU 5: now 1700005 kHz; host CPU 6: now 1700006 kHz;"
        " host CPU 7: now 1700007 kHz; and 28 more"
    ]
    assert changes.write_due_firsts(clock.now) == 0
    changes.note("host CPU 40", "set", "now 1800000 kHz")  # one source: its usual line
    changes.note("host CPU 0", "set", "now 1800000 kHz")  # not a first: counted
    assert changes.next_due() == pytest.approx(100.1)  # the ticker wakes the loop then
    clock.now += 0.05
    assert changes.write_due_firsts(clock.now) == 0  # within 0.1 s of the last
    assert lines(caplog) == []
    clock.now += 0.05
    assert changes.run_due() == 1  # no turn came: the ticker's run writes them
    assert lines(caplog) == ["host CPU 40: frequency change: now 1800000 kHz"]
    assert changes.next_due() == pytest.approx(110.0)  # the summaries' turn
    changes.note("host CPU 41", "restored", "original settings restored (2 files)")
    assert changes.flush() == 2  # at exit: the pending first, then the summary
    got = lines(caplog)
    assert got[0] == "host CPU 41: frequency change: original settings restored (2 files)"
    assert got[1].startswith("37 frequency changes in the last 0 s from 36 sources: ")
