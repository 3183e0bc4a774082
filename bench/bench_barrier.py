"""Benchmark of vmpower.barrier against raw eventfds, in the same run.

Two loops, each timed per round in the parent, each compared with raw eventfd code
doing the same exchange (blocking reads, no poll: the least two processes can do):

* place+sync (the brief's loop): both sides place one barrier and sync, over and over.
  Neither side waits for the other's *sync*, so the child may run one round ahead and
  a parent round sometimes finds the child's barrier already there. The raw twin
  writes its eventfd, then reads the other until it has caught up.
* ping-pong: a strict round trip. Barrier: parent ``place; wait_next``, child
  ``wait_next; place``. Raw: parent writes ping and reads pong; the child mirrors it.

Rounds run in alternating blocks (a fresh child per block, fork not timed) so drifting
load or CPU placement hits all variants alike. Target: barrier within 2x of raw. The
headline ``ratio_p50`` is the brief's comparison (barrier place+sync against the raw
ping-pong); the like-for-like ratios are reported beside it.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from vmpower.barrier import Barrier

ROUNDS = 20_000
BLOCKS = 10
WARMUP = 50  # per block: the first rounds pay for page faults and wake-up placement
TARGET_RATIO = 2.0

Side = Callable[[], None]


def _fork(body: Side) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    return pid


def _reap(pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"bench child failed: status {status}")


def _timed(
    rounds: int, child_round: Side, parent_round: Side, setup: Callable[[str], None], done: Side
) -> list[float]:
    """Fork a child running ``child_round`` ``rounds`` times; time each parent round.

    ``setup(side)`` runs in each process right after the fork, before any round.
    """

    def child() -> None:
        setup("child")
        for _ in range(rounds):
            child_round()

    pid = _fork(child)
    samples: list[float] = []
    clock = time.perf_counter
    try:
        setup("parent")
        for _ in range(rounds):
            start = clock()
            parent_round()
            samples.append(clock() - start)
    finally:
        done()
        _reap(pid)
    return samples


def _check(ok: bool) -> None:
    if not ok:
        raise RuntimeError("barrier aborted during the benchmark")


def _barrier(rounds: int, ping_pong: bool) -> list[float]:
    barrier = Barrier()
    if ping_pong:

        def child_round() -> None:
            _check(barrier.wait_next())
            barrier.place()

        def parent_round() -> None:
            barrier.place()
            _check(barrier.wait_next())

    else:

        def child_round() -> None:
            barrier.place()
            _check(barrier.sync())

        parent_round = child_round

    return _timed(rounds, child_round, parent_round, barrier.set_role, barrier.destroy)


def _raw(rounds: int, ping_pong: bool) -> list[float]:
    ping = os.eventfd(0, os.EFD_CLOEXEC)
    pong = os.eventfd(0, os.EFD_CLOEXEC)
    read, write = os.eventfd_read, os.eventfd_write
    if ping_pong:

        def child_round() -> None:
            read(ping)
            write(pong, 1)

        def parent_round() -> None:
            write(ping, 1)
            read(pong)

    else:
        ahead = [0]

        def side(mine: int, theirs: int) -> Side:
            def one_round() -> None:
                write(mine, 1)
                ahead[0] += 1
                while ahead[0] > 0:
                    ahead[0] -= read(theirs)

            return one_round

        child_round = side(pong, ping)
        parent_round = side(ping, pong)

    def done() -> None:
        os.close(ping)
        os.close(pong)

    return _timed(rounds, child_round, parent_round, lambda side: None, done)


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_us": round(statistics.median(ordered) * 1e6, 2),
        "mean_us": round(statistics.fmean(ordered) * 1e6, 2),
        "p99_us": round(ordered[int(0.99 * (len(ordered) - 1))] * 1e6, 2),
    }


def run(rounds: int = ROUNDS, blocks: int = BLOCKS) -> dict[str, Any]:
    per_block = rounds // blocks
    variants: dict[str, Callable[[int], list[float]]] = {
        "raw_ping_pong": lambda n: _raw(n, ping_pong=True),
        "barrier_ping_pong": lambda n: _barrier(n, ping_pong=True),
        "raw_place_sync": lambda n: _raw(n, ping_pong=False),
        "barrier_place_sync": lambda n: _barrier(n, ping_pong=False),
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(blocks):
        for name, measure in variants.items():
            samples[name] += measure(per_block + WARMUP)[WARMUP:]
    figures: dict[str, Any] = {"rounds": per_block * blocks, "blocks": blocks}
    summary = {name: _summary(values) for name, values in samples.items()}
    figures.update(summary)

    def ratio(a: str, b: str, key: str) -> float:
        return round(summary[a][key] / summary[b][key], 2)

    figures["ratio_p50"] = ratio("barrier_place_sync", "raw_ping_pong", "p50_us")
    figures["ratio_mean"] = ratio("barrier_place_sync", "raw_ping_pong", "mean_us")
    figures["ratio_p50_place_sync_like_for_like"] = ratio(
        "barrier_place_sync", "raw_place_sync", "p50_us"
    )
    figures["ratio_p50_ping_pong_like_for_like"] = ratio(
        "barrier_ping_pong", "raw_ping_pong", "p50_us"
    )
    figures["target_ratio"] = TARGET_RATIO
    figures["target_met"] = all(
        figures[key] <= TARGET_RATIO
        for key in (
            "ratio_p50",
            "ratio_p50_place_sync_like_for_like",
            "ratio_p50_ping_pong_like_for_like",
        )
    )
    return figures


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
