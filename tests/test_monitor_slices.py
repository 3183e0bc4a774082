"""The monitor loop hands out ready fds in slices: a burst cannot make one long turn.

When thousands of guests send their first request at once, a turn that read them all
before writing and replying held every reply for the whole burst (issue #16: 80 ms at
4000 channels). A turn takes at most MAX_READY_PER_TURN ready fds; the rest come first
in the next turn, so every fd is served once before any is served twice.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from vmpower.monitor import MAX_READY_PER_TURN, Monitor


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made = [socket.socketpair() for _ in range(3 * MAX_READY_PER_TURN + 5)]
    yield made
    for a, b in made:
        a.close()
        b.close()


def test_a_burst_on_every_fd_is_served_in_slices_each_fd_once_per_round(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    monitor = Monitor()
    served: list[int] = []
    ends: list[int] = []

    def reader(fd: int) -> None:
        served.append(fd)

    try:
        for ours, _theirs in pairs:
            monitor.add_reader(ours.fileno(), reader)
        monitor.add_end_of_turn(lambda: ends.append(len(served)))
        for _ours, theirs in pairs:
            theirs.send(b"x")  # never read: level-triggered, every fd stays ready
        everyone = {ours.fileno() for ours, _ in pairs}
        for _ in range(4):
            monitor.run_once(0.0)
        # each turn ended (writes, replies) after at most one slice of reads
        assert ends == [MAX_READY_PER_TURN * n for n in range(1, 5)]
        first_round = served[: len(pairs)]
        assert sorted(first_round) == sorted(everyone)  # nobody twice before all once
    finally:
        monitor.close()
