"""Tests of vmpower.barrier with real fork(): docs/telemetry.md section 1, rows 1-16.

The pytest process plays the parent role and forks the child role. The child runs a
script, writes its outcomes ("ok", "fail" or "timeout" per step) as JSON on a pipe and
leaves with os._exit; the parent asserts them. A row's "sleep N" is N * BASE_S. A
"must block" step is a wait with a timeout that must raise BarrierTimeout. Where a row
has one side stay alive ("sleep 2") while the other checks that it blocks, that side
also stays until the check is over (parent: it waits for the child's report; child: it
waits to be released), so a loaded machine cannot turn the timeout into an exit. Where
a row's "sleep" exists so that the other side acts first, the sleeper also waits to be
released after the other side has acted, for the same reason.
Every other wait is bounded by CAP_S so that a bug fails the test instead of hanging
it. The fixture kills and reaps any child still running when a test ends.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from vmpower.barrier import ABORTION, Barrier, BarrierFds, BarrierTimeout
from vmpower.errors import BarrierError, VmpowerError

BASE_S = 0.02
CAP_S = 10.0


def sleep(units: float) -> None:
    time.sleep(units * BASE_S)


def outcome(call: Callable[[], bool]) -> str:
    """One step's result: "ok" (True), "fail" (False) or "timeout" (BarrierTimeout)."""
    try:
        return "ok" if call() else "fail"
    except BarrierTimeout:
        return "timeout"


class Hold:
    """In the child: wait until the parent releases it (closes the hold pipe)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def wait(self) -> None:
        select.select([self.fd], [], [], CAP_S)


Script = Callable[[Barrier, Hold], list[str]]


class Child:
    """The parent's handle on a forked child."""

    def __init__(self, pid: int, result_fd: int, hold_fd: int) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.result_fd = result_fd
        self.hold_fd = hold_fd
        self.status: int | None = None

    def release(self) -> None:
        if self.hold_fd >= 0:
            os.close(self.hold_fd)
            self.hold_fd = -1

    def results(self) -> list[str]:
        """The child's outcomes (read until it closes the pipe, at most CAP_S)."""
        chunks: list[bytes] = []
        deadline_s = time.monotonic() + CAP_S
        while True:
            remaining_s = deadline_s - time.monotonic()
            readable, _, _ = select.select([self.result_fd], [], [], max(0.0, remaining_s))
            assert readable, "the child did not report in time"
            chunk = os.read(self.result_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        assert chunks, f"the child reported nothing (exit code {self.exit_code()})"
        results = json.loads(b"".join(chunks))
        assert isinstance(results, list)
        return results

    def exit_code(self) -> int:
        """Wait (at most CAP_S) for the child to exit; its exit code."""
        if self.status is None:
            readable, _, _ = select.select([self.pidfd], [], [], CAP_S)
            assert readable, "the child did not exit in time"
            _, status = os.waitpid(self.pid, 0)
            self.status = status
        return os.waitstatus_to_exitcode(self.status)

    def cleanup(self) -> None:
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)  # only reached when a test failed
            _, self.status = os.waitpid(self.pid, 0)
        self.release()
        for fd in (self.result_fd, self.pidfd):
            os.close(fd)


def _child_main(barrier: Barrier, script: Script, result_fd: int, hold_fd: int) -> None:
    code = 70
    try:
        barrier.set_role("child")
        results = script(barrier, Hold(hold_fd))
        os.write(result_fd, json.dumps(results).encode())  # < PIPE_BUF: one write
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)  # never return into pytest; exiting is what the other side sees


@pytest.fixture
def fork_child() -> Iterator[Callable[[Barrier, Script], Child]]:
    children: list[Child] = []
    barriers: list[Barrier] = []

    def start(barrier: Barrier, script: Script) -> Child:
        result_r, result_w = os.pipe()
        hold_r, hold_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(result_r)
            os.close(hold_w)
            _child_main(barrier, script, result_w, hold_r)
        os.close(result_w)
        os.close(hold_r)
        child = Child(pid, result_r, hold_w)
        children.append(child)
        barriers.append(barrier)
        barrier.set_role("parent")
        return child

    yield start
    for child in children:
        child.cleanup()
    for barrier in barriers:
        barrier.destroy()


def script(*steps: Callable[[Barrier, Hold], str | None]) -> Script:
    """A child script: run the steps in order, collecting the outcomes they return."""

    def run(barrier: Barrier, hold: Hold) -> list[str]:
        results: list[str] = []
        for step in steps:
            result = step(barrier, hold)
            if result is not None:
                results.append(result)
        return results

    return run


# Steps for child scripts. Waits that must not block are bounded by CAP_S; a step named
# *_blocks waits BLOCK units and is expected to time out.
BLOCK = 2


def place(b: Barrier, h: Hold) -> str:
    return outcome(b.place)


def abort(b: Barrier, h: Hold) -> str:
    return outcome(b.abort)


def wait_next(b: Barrier, h: Hold) -> str:
    return outcome(lambda: b.wait_next(CAP_S))


def wait_next_blocks(b: Barrier, h: Hold) -> str:
    return outcome(lambda: b.wait_next(BLOCK * BASE_S))


def sync_next(b: Barrier, h: Hold) -> str:
    return outcome(lambda: b.sync_next(CAP_S))


def sync_next_blocks(b: Barrier, h: Hold) -> str:
    return outcome(lambda: b.sync_next(BLOCK * BASE_S))


def sync(b: Barrier, h: Hold) -> str:
    return outcome(lambda: b.sync(CAP_S))


def wait_abortion(b: Barrier, h: Hold) -> str:
    return outcome(lambda: b.wait_abortion(CAP_S))


def wait_abortion_blocks(b: Barrier, h: Hold) -> str:
    return outcome(lambda: b.wait_abortion(BLOCK * BASE_S))


def sleep_units(units: float) -> Callable[[Barrier, Hold], None]:
    def step(b: Barrier, h: Hold) -> None:
        sleep(units)

    return step


def stay_until_released(b: Barrier, h: Hold) -> None:
    h.wait()


ChildFactory = Callable[[Barrier, Script], Child]


# -- the table, rows 1-16 ---------------------------------------------------------------


def test_row01_sync_succeeds_on_both_sides_though_the_parent_exits_first(
    fork_child: ChildFactory,
) -> None:
    barrier = Barrier()
    child = fork_child(barrier, script(place, sleep_units(2), sync))
    assert barrier.place()
    assert outcome(lambda: barrier.sync(CAP_S)) == "ok"
    barrier.destroy()  # the parent's exit: queued behind its barrier
    assert child.results() == ["ok", "ok"]
    assert child.exit_code() == 0


def test_row02_wait_next(fork_child: ChildFactory) -> None:
    barrier = Barrier()
    child = fork_child(barrier, script(sleep_units(1), wait_next, place, sync))
    assert barrier.place()
    assert outcome(lambda: barrier.sync(CAP_S)) == "ok"
    assert child.results() == ["ok", "ok", "ok"]


def test_row03_wait_next_takes_every_pending_barrier(fork_child: ChildFactory) -> None:
    barrier = Barrier()
    child = fork_child(
        barrier, script(sleep_units(1), stay_until_released, wait_next, wait_next_blocks)
    )
    assert barrier.place()
    assert barrier.place()
    child.release()  # both barriers are pending before the child's first wait_next
    # Parent "sleep 4": stays alive, placing nothing, until the child has reported.
    assert child.results() == ["ok", "timeout"]


def test_row04_wait_next_twice_with_local_barriers_between(fork_child: ChildFactory) -> None:
    barrier = Barrier()
    child = fork_child(
        barrier,
        script(sleep_units(1), stay_until_released, wait_next, place, place, wait_next_blocks),
    )
    assert barrier.place()
    assert barrier.place()
    child.release()
    assert child.results() == ["ok", "ok", "ok", "timeout"]


def test_row05_wait_next_then_sync_next(fork_child: ChildFactory) -> None:
    barrier = Barrier()
    child = fork_child(barrier, script(sleep_units(1), wait_next, sync_next))
    assert barrier.place()
    assert barrier.place()
    assert child.results() == ["ok", "ok"]


def test_row06_wait_next_then_sync_next_with_local_barriers(fork_child: ChildFactory) -> None:
    barrier = Barrier()
    child = fork_child(barrier, script(sleep_units(1), wait_next, place, place, sync_next))
    assert barrier.place()
    assert barrier.place()
    assert child.results() == ["ok", "ok", "ok", "ok"]


def test_row07_sync_next_and_sync_with_local_barriers_behind(fork_child: ChildFactory) -> None:
    barrier = Barrier()
    child = fork_child(barrier, script(sync_next, sync, place, place, sync_next, sync_next, sync))
    sleep(1)
    assert barrier.place()
    assert barrier.place()
    assert outcome(lambda: barrier.sync(CAP_S)) == "ok"
    assert child.results() == ["ok"] * 7


def test_row08_sync_next_with_only_local_barriers_blocks(fork_child: ChildFactory) -> None:
    barrier = Barrier()
    child = fork_child(barrier, script(place, sync_next_blocks))
    # Parent "sleep 2", no barriers: alive until the child has reported.
    assert child.results() == ["ok", "timeout"]


def test_row09_sync_next_fails_promptly_when_the_other_side_aborts(
    fork_child: ChildFactory,
) -> None:
    barrier = Barrier()
    child = fork_child(barrier, script(place, sync_next))
    assert barrier.abort()
    # "fail", not "timeout": the abortion woke the child long before its CAP_S bound.
    assert child.results() == ["ok", "fail"]


def test_row10_wait_abortion_matched(fork_child: ChildFactory) -> None:
    barrier = Barrier()
    child = fork_child(barrier, script(wait_abortion))
    assert barrier.abort()
    assert child.results() == ["ok"]


def test_row11_wait_abortion_unmatched_blocks(fork_child: ChildFactory) -> None:
    barrier = Barrier()
    child = fork_child(barrier, script(wait_abortion_blocks))
    assert child.results() == ["timeout"]


def test_row12_wait_abortion_fails_when_both_abort(fork_child: ChildFactory) -> None:
    barrier = Barrier()
    child = fork_child(barrier, script(abort, wait_abortion))
    # The parent has not read the child's abortion yet: its own abort succeeds.
    assert barrier.abort()
    assert child.results() == ["ok", "fail"]


def test_row13_wait_abortion_with_only_a_local_abort_blocks(fork_child: ChildFactory) -> None:
    barrier = Barrier()
    child = fork_child(barrier, script(abort, wait_abortion_blocks))
    assert child.results() == ["ok", "timeout"]
    assert not barrier.they_aborted()  # nothing read yet on this side


def test_row14_exit_wakes_the_other_side(fork_child: ChildFactory) -> None:
    barrier = Barrier()
    child = fork_child(barrier, script())  # exits at once
    assert barrier.place()
    assert outcome(lambda: barrier.sync(CAP_S)) == "fail"
    assert barrier.they_aborted() and not barrier.i_aborted()
    assert child.results() == []
    assert child.exit_code() == 0


def test_row15_no_exit_no_wake_and_the_barrier_stays_usable(fork_child: ChildFactory) -> None:
    barrier = Barrier()
    child = fork_child(barrier, script(sleep_units(2), stay_until_released))
    assert barrier.place()
    assert outcome(lambda: barrier.sync(1 * BASE_S)) == "timeout"
    assert not barrier.is_aborted()
    child.release()  # now it exits: the same barrier sees it
    assert outcome(lambda: barrier.sync(CAP_S)) == "fail"
    assert child.results() == []


def test_row16_pending_barriers_are_preferred_over_a_pending_exit(
    fork_child: ChildFactory,
) -> None:
    barrier = Barrier()
    child = fork_child(
        barrier,
        script(
            sleep_units(2),
            stay_until_released,
            wait_next,
            sync_next,
            place,
            sync_next,
            place,
            sync_next,
        ),
    )
    assert barrier.place()
    barrier.destroy()  # the parent's exit, behind one barrier
    child.release()  # both are pending before the child looks
    # wait_next takes the barrier; sync_next returns at once while the child is behind
    # or level; only when the child is ahead does the exit show.
    assert child.results() == ["ok", "ok", "ok", "ok", "ok", "fail"]


# -- real exits on the other side ---------------------------------------------------------


def test_real_exit_is_queued_behind_the_barriers_placed_before_it(
    fork_child: ChildFactory,
) -> None:
    # Row 16 mirrored: the child places one barrier and really exits; both are pending
    # by the time the parent looks.
    barrier = Barrier()
    child = fork_child(barrier, script(place))
    assert child.results() == ["ok"]
    assert child.exit_code() == 0
    assert outcome(lambda: barrier.wait_next(CAP_S)) == "ok"
    assert outcome(lambda: barrier.sync_next(CAP_S)) == "ok"
    assert barrier.place()
    assert outcome(lambda: barrier.sync_next(CAP_S)) == "ok"
    assert barrier.place()
    assert outcome(lambda: barrier.sync_next(CAP_S)) == "fail"


def test_real_exit_after_sync_still_lets_the_other_side_sync(fork_child: ChildFactory) -> None:
    # Row 1 mirrored: the child places, syncs and really exits before the parent syncs.
    barrier = Barrier()
    child = fork_child(barrier, script(place, sync))
    assert barrier.place()
    assert child.results() == ["ok", "ok"]
    assert child.exit_code() == 0
    assert outcome(lambda: barrier.sync(CAP_S)) == "ok"
    assert barrier.place()
    assert outcome(lambda: barrier.sync(CAP_S)) == "fail"  # now the exit shows


def test_abortion_supersedes_pending_barriers(fork_child: ChildFactory) -> None:
    barrier = Barrier()
    child = fork_child(barrier, script(place, place, abort))
    assert child.results() == ["ok", "ok", "ok"]
    # The two barriers and the abortion sit in one eventfd counter: one read gets them
    # all, and the abortion wins.
    assert outcome(lambda: barrier.wait_next(CAP_S)) == "fail"
    assert barrier.they_aborted()
    assert not barrier.place()


def test_after_exec_the_child_rebuilds_the_barrier_from_its_fds() -> None:
    barrier = Barrier()
    fds = barrier.fds("child")
    code = (
        "import sys\n"
        "from vmpower.barrier import Barrier, BarrierFds\n"
        "b = Barrier.from_fds(*BarrierFds.decode(sys.argv[1]))\n"
        "ok = b.wait_next(10) and b.place() and b.sync(10)\n"
        "sys.exit(0 if ok else 3)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, fds.encode()], pass_fds=fds)
    try:
        barrier.set_role("parent")
        assert barrier.place()
        assert outcome(lambda: barrier.sync(CAP_S)) == "ok"
        assert proc.wait(timeout=CAP_S) == 0
        assert barrier.place()
        assert outcome(lambda: barrier.sync(CAP_S)) == "fail"  # its exit shows
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        barrier.destroy()


def test_fds_do_not_leak_into_unrelated_exec() -> None:
    barrier = Barrier()
    # Started before set_role, while this process still holds the child's pipe end: a
    # program not given the fds must not keep it (close-on-exec), or the parent would
    # never see the hang-up.
    # close_fds=False: subprocess would otherwise close every fd itself and hide a leak.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], close_fds=False)
    try:
        barrier.set_role("parent")
        assert barrier.place()
        assert outcome(lambda: barrier.sync(CAP_S)) == "fail"
    finally:
        proc.kill()
        proc.wait()
        barrier.destroy()


# -- misuse and bad input -------------------------------------------------------------------


def test_operations_need_a_role() -> None:
    with Barrier() as barrier:
        for call in (barrier.place, barrier.abort, barrier.sync, barrier.wait_next):
            with pytest.raises(BarrierError, match="role not set"):
                call()


def test_role_is_checked_and_set_once() -> None:
    with Barrier() as barrier:
        with pytest.raises(BarrierError, match="'parent' or 'child'"):
            barrier.set_role("uncle")
        barrier.set_role("parent")
        with pytest.raises(BarrierError, match="already set"):
            barrier.set_role("child")
        with pytest.raises(BarrierError, match="closed here"):
            barrier.fds("child")


def test_destroyed_barrier_refuses_use_and_destroy_is_idempotent() -> None:
    barrier = Barrier()
    barrier.set_role("child")
    fds = barrier.fds()
    barrier.destroy()
    barrier.destroy()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)  # really closed
    with pytest.raises(BarrierError, match="destroyed"):
        barrier.place()
    with pytest.raises(BarrierError, match="destroyed"):
        barrier.fds()


def test_fds_before_role_name_each_side() -> None:
    with Barrier() as barrier:
        parent, child = barrier.fds("parent"), barrier.fds("child")
        # Each side writes to the eventfd the other reads; the pipe ends differ.
        assert (parent.me_fd, parent.them_fd) == (child.them_fd, child.me_fd)
        assert parent.pipe_fd != child.pipe_fd
        with pytest.raises(BarrierError, match="needs role"):
            barrier.fds()


@pytest.mark.parametrize("text", ["", "1,2", "1,2,3,4", "a,b,c", "1,-2,3", "1;2;3"])
def test_bad_encoded_fds_are_refused(text: str) -> None:
    with pytest.raises(BarrierError, match="three numbers") as caught:
        BarrierFds.decode(text)
    assert isinstance(caught.value, VmpowerError)


def test_encoded_fds_round_trip() -> None:
    assert BarrierFds.decode(BarrierFds(3, 4, 5).encode()) == BarrierFds(3, 4, 5)


def test_from_fds_refuses_closed_or_repeated_fds() -> None:
    read_fd, write_fd = os.pipe()
    os.close(write_fd)
    try:
        with pytest.raises(BarrierError, match="not open"):
            Barrier.from_fds(read_fd, write_fd, read_fd)
        with pytest.raises(BarrierError, match="different"):
            Barrier.from_fds(read_fd, read_fd, read_fd)
        with pytest.raises(BarrierError, match=">= 0"):
            Barrier.from_fds(-1, read_fd, read_fd)
    finally:
        os.close(read_fd)


@pytest.mark.parametrize("timeout_s", [-1.0, float("nan"), "1", True])
def test_bad_timeouts_are_refused(timeout_s: Any, fork_child: ChildFactory) -> None:
    barrier = Barrier()
    child = fork_child(barrier, script(stay_until_released))
    assert barrier.place()
    with pytest.raises(BarrierError, match="timeout_s"):
        barrier.sync(timeout_s)
    child.release()
    assert child.results() == []


def test_abort_is_placed_once_and_stops_new_barriers(fork_child: ChildFactory) -> None:
    barrier = Barrier()
    child = fork_child(barrier, script(wait_abortion))
    assert barrier.abort()
    assert barrier.abort()  # a second abort is a no-op
    assert not barrier.place()
    assert barrier.i_aborted() and barrier.is_aborted()
    assert outcome(lambda: barrier.sync(CAP_S)) == "fail"
    assert child.results() == ["ok"]
    assert ABORTION == 2**63 - 1
