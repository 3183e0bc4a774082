"""Logging by kind: what a hostile or broken peer repeats reaches the log bounded.

A guest can send a hundred thousand refused requests a second; one line each would
fill the disk (and cost more than the refusal). ``KindLog`` logs the first event of
each (source, reason) at once, with its detail, then counts: at most one summary line
per source per interval, with the count of each reason seen since ("vm1.0: 52311
requests refused in the last 10 s: host CPU 4 is not pinned to vm1 (52000); rate
limit (311)", or with one reason only, "vm1.0: 52311 requests refused in the last
10 s: host CPU 4 is not pinned to vm1"). Summaries of more than a few sources due
together are one line ("52311 requests refused in the last 10 s from 4000 sources:
vm1.0: host CPU 4 is not pinned to vm1 (52000); ...; and 3992 more sources"). A reason
is a *kind* from a small fixed set ("not pinned", "rate limit"); its detail, the latest
of the interval, says which.
Counters shown to the operator (``show_vm``) are kept elsewhere and stay exact; this
is only what goes to the log.

Owned by the monitor thread; the daemon drives ``run_due`` from the loop (it is a
``Ticker``). ``note`` is on the request path, so it is a dict update and no more.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Iterable

DEFAULT_INTERVAL_S = 10.0
# Sources remembered at once (channels, CPUs, clients). Past it, sources with nothing
# counted are forgotten (their next event is logged at once again): a peer that makes
# up new source names cannot grow this without bound.
MAX_SOURCES = 4096
# Summaries one run writes as lines of their own; past it, the run writes one line for all
# of them (the busiest this many named). 256 host CPUs first changed within one first
# contact had their summaries due together every interval: 256 lines at once, 8 ms of
# the loop (issue #16).
MAX_SUMMARY_LINES = 8
# A log that gathers its first events (gather_firsts) writes them at most this often:
# a first contact meets its 256 CPUs over ~100 turns, a few each.
FIRSTS_WINDOW_S = 0.1


class _Source:
    __slots__ = ("counts", "details", "seen", "window_end")

    def __init__(self) -> None:
        self.seen: set[str] = set()  # reasons already logged once
        self.counts: dict[str, int] = {}  # since the last summary
        self.details: dict[str, str] = {}  # the latest detail of each counted reason
        self.window_end = 0.0


class KindLog:
    """First event of each (source, reason) at once; then one summary per source per
    interval, in one line for all sources when more than MAX_SUMMARY_LINES are due.

    ``gather_firsts``: the first events are gathered and written by the log's ticker
    run (``write_due_firsts``) as one line, the first few named, at most once per
    FIRSTS_WINDOW_S (the first in the turn after it came; the rest when due):
    for a log whose sources come many at once in the normal course of things (256 host
    CPUs met in one first contact), not for one whose first line is a warning to read
    at once.
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
        one: str | None = None,
        gather_firsts: bool = False,
    ) -> None:
        self.logger = logger
        self.what = what  # "requests refused", "replies dropped", ...
        self.one = one or what  # the first event's line: "request refused"
        self.interval_s = interval_s
        self.level = level
        self.clock = clock
        self._sources: dict[str, _Source] = {}
        self._due: float | None = None  # earliest window end with counts waiting
        self.group: KindLogs | None = None  # the ticker driving this log with others
        self.gather_firsts = gather_firsts
        # The first events gathered (gather_firsts): the first few (source, detail), how
        # many more, and when the last were written (the next are due a window after).
        self._firsts: list[tuple[str, str]] = []
        self._firsts_more = 0
        self._firsts_last = float("-inf")

    def enabled(self) -> bool:
        """Whether this log's level reaches the logger (a caller may skip building a
        detail nobody will read)."""
        return self.logger.isEnabledFor(self.level)

    def note(self, source: str, reason: str, detail: str = "", count: int = 1) -> None:
        """``count`` events of kind ``reason`` from ``source``; ``detail`` says which."""
        entry = self._sources.get(source)
        if entry is None:
            if len(self._sources) >= MAX_SOURCES:
                self._prune()
            entry = self._sources[source] = _Source()
        if reason not in entry.seen:
            # The first of its kind from this source, at once and with its detail; the
            # rest of ``count`` goes to the summary.
            entry.seen.add(reason)
            now = self.clock()
            if entry.window_end <= now:
                entry.window_end = now + self.interval_s
            if not self.gather_firsts:
                self.logger.log(self.level, "%s: %s: %s", source, self.one, detail or reason)
            else:
                self._gather_first(source, detail or reason)
            count -= 1
            if count <= 0:
                return
        counts = entry.counts
        if not counts:  # the first counted event of a window: the only clock read
            now = self.clock()
            if entry.window_end <= now:
                entry.window_end = now + self.interval_s
            if self._due is None or entry.window_end < self._due:
                self._due = entry.window_end
                group = self.group
                if group is not None and (group.due is None or self._due < group.due):
                    group.due = self._due
        counts[reason] = counts.get(reason, 0) + count
        if detail:
            entry.details[reason] = detail

    def _gather_first(self, source: str, detail: str) -> None:
        if len(self._firsts) < MAX_SUMMARY_LINES:
            self._firsts.append((source, detail))
        else:
            self._firsts_more += 1
        if len(self._firsts) == 1 and not self._firsts_more:  # the ticker's next due
            due = self._firsts_last + FIRSTS_WINDOW_S
            group = self.group
            if group is not None and (group.due is None or due < group.due):
                group.due = due

    def write_due_firsts(self, now: float) -> int:
        """Write the first events gathered (``gather_firsts``) when they are due: one
        source's line as it would have been at once, or one line for them all; returns
        how many lines."""
        if not self._firsts or now < self._firsts_last + FIRSTS_WINDOW_S:
            return 0
        return self._write_firsts(now)

    def _write_firsts(self, now: float) -> int:
        firsts = self._firsts
        if not firsts:
            return 0
        if len(firsts) == 1:
            self.logger.log(self.level, "%s: %s: %s", firsts[0][0], self.one, firsts[0][1])
        else:
            self.logger.log(
                self.level,
                "%s on %d sources: %s%s",
                self.one,
                len(firsts) + self._firsts_more,
                "; ".join(f"{source}: {detail}" for source, detail in firsts),
                f"; and {self._firsts_more} more" if self._firsts_more else "",
            )
        self._firsts = []
        self._firsts_more = 0
        self._firsts_last = now
        return 1

    def flush(self) -> int:
        """Write every summary still counted now (at exit); returns how many lines."""
        now = self.clock()
        lines = self._write_firsts(now)
        ready = []
        for source, entry in self._sources.items():
            if entry.counts:
                ready.append((source, entry, now - (entry.window_end - self.interval_s)))
        lines += self._write(ready)
        for _, entry, _ in ready:
            entry.counts = {}
            entry.details = {}
        self._due = None
        return lines

    def _prune(self) -> None:
        for source in [s for s, e in self._sources.items() if not e.counts]:
            del self._sources[source]

    def forget(self, source: str) -> None:
        """``source`` is gone (channel closed): say what is still counted, then drop it."""
        entry = self._sources.pop(source, None)
        if entry is not None and entry.counts:
            self._summary(source, entry, self.interval_s)

    # -- Ticker ------------------------------------------------------------------------

    def next_due(self) -> float | None:
        if not self._firsts:
            return self._due
        firsts = self._firsts_last + FIRSTS_WINDOW_S
        return firsts if self._due is None or firsts < self._due else self._due

    def run_due(self) -> int:
        """Write the summaries whose interval has passed; returns how many lines.

        Sources due within half an interval are summarized with them, a little early:
        sources first noted over a few turns (256 CPUs met at first contact over 100 ms)
        would otherwise come due a few per turn, each run writing a line each. Their
        next intervals then end together. Still at most one summary per source per
        interval."""
        now = self.clock()
        firsts = self.write_due_firsts(now)
        if self._due is None or self._due > now:
            return firsts  # no summary due (the firsts were, or nothing)
        ready = []
        due: float | None = None
        soon = now + self.interval_s / 2
        for source, entry in self._sources.items():
            if not entry.counts:
                continue
            if entry.window_end <= soon:
                ready.append((source, entry, now - (entry.window_end - self.interval_s)))
            elif due is None or entry.window_end < due:
                due = entry.window_end
        lines = self._write(ready)
        for _, entry, _ in ready:
            entry.counts = {}
            entry.details = {}
            entry.window_end = now + self.interval_s
        self._due = due
        return firsts + lines

    def _write(self, ready: list[tuple[str, _Source, float]]) -> int:
        """The summaries of ``ready`` (source, entry, span): a line each, or one line for
        all past MAX_SUMMARY_LINES; returns how many lines."""
        if len(ready) <= MAX_SUMMARY_LINES:
            for source, entry, span_s in ready:
                self._summary(source, entry, span_s)
            return len(ready)
        totals = [(sum(entry.counts.values()), source, entry) for source, entry, _ in ready]
        busiest = heapq.nlargest(MAX_SUMMARY_LINES, totals, key=lambda item: item[0])
        self.logger.log(
            self.level,
            "%d %s in the last %.0f s from %d sources: %s; and %d more",
            sum(total for total, _, _ in totals),
            self.what,
            max(max(span_s for _, _, span_s in ready), 0.0),
            len(ready),
            "; ".join(f"{source}: {_parts(entry)} ({total})" for total, source, entry in busiest),
            len(ready) - len(busiest),
        )
        return 1

    def _summary(self, source: str, entry: _Source, span_s: float) -> None:
        self.logger.log(
            self.level,
            "%s: %d %s in the last %.0f s: %s",
            source,
            sum(entry.counts.values()),
            self.what,
            max(span_s, 0.0),
            _parts(entry),
        )


def _parts(entry: _Source) -> str:
    """What a source's summary says of its reasons: the detail of its only one, or each
    with its count, most frequent first."""
    counts = entry.counts
    if len(counts) == 1:
        reason = next(iter(counts))
        return entry.details.get(reason) or reason
    return "; ".join(
        f"{entry.details.get(reason) or reason} ({n})"
        for reason, n in sorted(counts.items(), key=lambda item: -item[1])
    )


class KindLogs:
    """Several KindLogs driven as one monitor ticker.

    The loop asks every ticker when it is due once a turn; a daemon has a log per kind
    of event (refusals, changes, failures, dropped replies, ...), and asking each was
    a tenth of a one-request turn. Each log tells the group when it has something due,
    so the group's answer is one attribute.
    """

    def __init__(self, logs: Iterable[KindLog]) -> None:
        self.logs = tuple(logs)
        self.due: float | None = None
        for kind_log in self.logs:
            kind_log.group = self
        self._recompute()

    def _recompute(self) -> None:
        dues = [d for d in (kind_log.next_due() for kind_log in self.logs) if d is not None]
        self.due = min(dues) if dues else None

    def next_due(self) -> float | None:
        return self.due

    def run_due(self) -> int:
        lines = 0
        for kind_log in self.logs:
            due = kind_log.next_due()
            if due is not None and due <= kind_log.clock():
                lines += kind_log.run_due()
        self._recompute()
        return lines
