"""The controller/worker channel, with real fork, real FIFOs and real /dev/shm.

Ports of CMSSW FWCore/SharedMemory's tests (docs/telemetry.md section 3): three transitions
with buffer records and an exact count (test_channels), a late worker that succeeds by
the flip rule (okTimeout), retries (test_channels_retry), start-up timeout
(startupTimeout), a worker dying mid-transition (transitionTimeout, which must fail and
not hang), and the buffer growth 4, 3, 6, 7 (test_catch2_buffer).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pytest_mock import MockerFixture

from vmpower.errors import TelemetryError
from vmpower.telemetry.channel import (
    STOP,
    TO_WORKER,
    BankReader,
    BankWriter,
    BufferRecord,
    ChannelError,
    ChannelTimeout,
    ControlBlock,
    ControllerChannel,
    ControllerGone,
    WorkerChannel,
    WorkerGone,
    WorkerStopped,
    channel_paths,
    create_channel_files,
)

SHM = Path("/dev/shm")


@pytest.fixture
def prefix() -> Iterator[str]:
    """A unique channel name; fails the test if any file of it is left in /dev/shm."""
    name = f"vmpower-test-{os.getpid()}-{time.monotonic_ns()}"
    yield name
    left = sorted(p.name for p in SHM.iterdir() if p.name.startswith(name))
    for leftover in left:
        (SHM / leftover).unlink()
    assert left == [], f"files left in /dev/shm: {left}"


def fork_worker(body: Callable[[], int]) -> int:
    """Run ``body`` in a child; its return value is the exit status (exceptions: 99)."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = body()
        except BaseException as exc:  # report anything, never return into pytest
            os.write(2, f"worker failed: {exc!r}\n".encode())
        finally:
            os._exit(code)
    return pid


def patient(total_s: float = 10.0) -> Callable[[], bool]:
    """A retry for a short-timeout controller's set-up: a fork on a loaded machine may
    take longer than the timeout the test is about; give up after ``total_s``."""
    give_up = time.monotonic() + total_s
    return lambda: time.monotonic() < give_up


def launch_worker(
    ctl: ControllerChannel, worker: Callable[[], int], retry: Callable[[], bool] | None = None
) -> int:
    """Fork ``worker`` as the controller's set-up launch and wait for its setup_done."""
    pid = 0

    def launch() -> None:
        nonlocal pid
        pid = fork_worker(worker)

    ctl.setup_worker(launch, retry)
    return pid


def reap(pid: int, timeout_s: float = 10.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError(f"worker {pid} did not exit within {timeout_s} s")


def test_three_transitions_with_records_and_exact_count(prefix: str) -> None:
    def worker() -> int:
        count = 0
        with WorkerChannel(SHM, prefix) as ch:
            ch.setup_done()

            def handle(code: str, transition_id: int) -> int:
                nonlocal count
                expected = [
                    ("e", 2, BufferRecord(0, 0)),
                    ("e", 3, BufferRecord(1, 1)),
                    ("l", 1, None),
                ]
                if count >= len(expected):
                    raise AssertionError("stop was not honoured")
                want_code, want_id, want_record = expected[count]
                assert (code, transition_id) == (want_code, want_id)
                if want_record is not None:
                    assert ch.to_worker == want_record
                result = 0
                if count == 0:
                    ch.from_worker = BufferRecord(1, 1)
                    result = 1  # CMSSW's shouldKeepEvent(true)
                elif count == 1:
                    ch.from_worker = BufferRecord(0, 2)
                count += 1
                return result

            ch.handle_transitions(handle)
        return 0 if count == 3 else 3

    with ControllerChannel(SHM, prefix, timeout_s=10) as ctl:
        pid = launch_worker(ctl, worker)
        seen: list[tuple[BufferRecord, int]] = []
        ctl.to_worker = BufferRecord(0, 0)
        ctl.do_transition("e", 2, on_done=lambda: seen.append((ctl.from_worker, ctl.result)))
        ctl.to_worker = BufferRecord(1, 1)
        ctl.do_transition("e", 3, on_done=lambda: seen.append((ctl.from_worker, ctl.result)))
        ctl.do_transition("l", 1)
        ctl.stop_worker()
        assert reap(pid) == 0, "the worker saw a wrong transition or count"
    assert seen == [(BufferRecord(1, 1), 1), (BufferRecord(0, 2), 0)]


def test_late_flip_without_wakeup_still_succeeds(prefix: str) -> None:
    # The worker flips the id but never writes the wake-up byte: only the flip rule
    # (a timed-out wait whose id flipped is a success) lets the controller return.
    def worker() -> int:
        with WorkerChannel(SHM, prefix) as ch:
            ch.setup_done()
            transition = ch.wait_transition(timeout_s=10)
            assert transition is not None and transition.code == "e"
            time.sleep(0.05)
            ch.finish(notify=False)
            return 0 if ch.wait_transition(timeout_s=10) is STOP else 4

    # Long enough that a loaded machine's worker flips before it runs out: the test is
    # that a flip with no wake-up counts, found when the wait ends.
    with ControllerChannel(SHM, prefix, timeout_s=1.0) as ctl:
        pid = launch_worker(ctl, worker, patient())
        asked: list[bool] = []
        ctl.do_transition("e", 7, retry=lambda: asked.append(True) or False)
        ctl.stop_worker()
        assert reap(pid) == 0
    assert asked == [], "a flipped id must count as done without asking to retry"


def test_timeout_without_flip_fails_and_channel_is_then_unusable(prefix: str) -> None:
    def worker() -> int:
        with WorkerChannel(SHM, prefix) as ch:
            ch.setup_done()
            first = ch.wait_transition(timeout_s=10)
            assert first is not None and first is not STOP
            # never finish it: wait for the stop instead
            while True:
                transition = ch.wait_transition(timeout_s=10)
                if transition is STOP:
                    return 0
                if transition is None:
                    return 5

    with ControllerChannel(SHM, prefix, timeout_s=0.2) as ctl:
        pid = launch_worker(ctl, worker, patient())
        with pytest.raises(ChannelTimeout, match=r"did not finish transition 'e' within 0\.2 s"):
            ctl.do_transition("e", 2)
        with pytest.raises(ChannelError, match="unusable"):
            ctl.do_transition("e", 3)
        ctl.stop_worker()
        assert reap(pid) == 0


def test_retry_until_the_slow_worker_finishes(prefix: str) -> None:
    def worker() -> int:
        time.sleep(0.3)  # slow set-up: the controller must retry its wait
        with WorkerChannel(SHM, prefix) as ch:
            ch.setup_done()
            count = 0

            def handle(code: str, transition_id: int) -> None:
                nonlocal count
                time.sleep(0.3)  # slower than the controller's timeout
                count += 1

            ch.handle_transitions(handle)
            return 0 if count == 2 else 6

    retries = {"setup": 0, "transition": 0}

    def retry(kind: str) -> Callable[[], bool]:
        def again() -> bool:
            retries[kind] += 1
            return True

        return again

    with ControllerChannel(SHM, prefix, timeout_s=0.05) as ctl:
        pid = launch_worker(ctl, worker, retry("setup"))
        ctl.do_transition("e", 2, retry=retry("transition"))
        ctl.do_transition("e", 3, retry=retry("transition"))
        ctl.stop_worker()
        assert reap(pid) == 0
    assert retries["setup"] >= 1 and retries["transition"] >= 1


class _Interrupt(Exception):
    """What the SIGUSR1 handler raises: a signal that lands mid-wait (Ctrl-C, SIGTERM)."""


def _worker_seeing(prefix: str, slow_code: str) -> Callable[[], int]:
    """A worker that, on ``slow_code``, signals its parent (SIGUSR1) and takes 0.5 s: the
    signal lands while the controller waits for that transition. Exit 0 if it ran "w"
    then "q", 7 otherwise."""

    def worker() -> int:
        with WorkerChannel(SHM, prefix) as ch:
            ch.setup_done()
            seen: list[str] = []

            def handle(code: str, transition_id: int) -> None:
                if code == slow_code:
                    os.kill(os.getppid(), signal.SIGUSR1)
                    time.sleep(0.5)  # still at it when the signal lands
                seen.append(code)

            ch.handle_transitions(handle)
            return 0 if seen == ["w", "q"] else 7

    return worker


@contextlib.contextmanager
def _usr1_raises() -> Iterator[None]:
    def on_usr1(_signum: int, _frame: object) -> None:
        raise _Interrupt

    previous = signal.signal(signal.SIGUSR1, on_usr1)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, previous)


def _run_w_then_q(
    prefix: str, worker: Callable[[], int], cut_w: Callable[[ControllerChannel], None]
) -> float:
    """Set up ``worker``, have ``cut_w`` start "w" and be cut short, then run "q": the
    seconds "q" took. Fails unless the worker ran "w" then "q"."""
    with ControllerChannel(SHM, prefix, timeout_s=5) as ctl:
        pid = launch_worker(ctl, worker)
        try:
            cut_w(ctl)
            started = time.monotonic()
            ctl.do_transition("q", 2)  # settles "w" first, then runs "q"
            waited_s = time.monotonic() - started
        finally:
            ctl.stop_worker()
            status = reap(pid)
        assert status == 0, "the worker did not run w then q"
    return waited_s


def test_a_transition_interrupted_mid_wait_is_finished_before_the_next(prefix: str) -> None:
    # A signal handler that raises (the CLI's SIGTERM, Ctrl-C) can leave do_transition
    # while the worker is still running that transition. The next transition must not
    # overwrite the id under it: the worker's late flip of the first id would then hide
    # the second, and the controller would wait its whole timeout for a lost "q".
    def cut_w(ctl: ControllerChannel) -> None:
        with pytest.raises(_Interrupt):
            ctl.do_transition("w", 1)

    with _usr1_raises():
        waited_s = _run_w_then_q(prefix, _worker_seeing(prefix, "w"), cut_w)
    assert waited_s < 5, "the second transition waited out its timeout: it was lost"


def test_a_transition_cut_short_before_its_wake_up_is_still_run(
    prefix: str, mocker: MockerFixture
) -> None:
    # The signal lands after the id is written, before the wake-up byte goes (here: at
    # the entry of _notify): the worker, asleep in poll, never looks. The next
    # transition must wake it for the first, not wait a timeout for a flip never coming.
    from vmpower.telemetry import channel

    real_notify = channel._notify

    calls = 0

    def notify_cut_once(fd: int, byte: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise _Interrupt
        real_notify(fd, byte)

    def cut_w(ctl: ControllerChannel) -> None:
        mocker.patch.object(channel, "_notify", notify_cut_once)
        with pytest.raises(_Interrupt):
            ctl.do_transition("w", 1)

    waited_s = _run_w_then_q(prefix, _worker_seeing(prefix, ""), cut_w)
    assert waited_s < 5, "the cut-short transition was never woken"


def test_startup_timeout_raises_and_stops_the_worker(prefix: str) -> None:
    def worker() -> int:
        with WorkerChannel(SHM, prefix) as ch:
            # never calls setup_done; only the controller's stop ends this wait
            return 0 if ch.wait_transition(timeout_s=10) is STOP else 7

    with ControllerChannel(SHM, prefix, timeout_s=0.2) as ctl:
        pid = 0

        def launch() -> None:
            nonlocal pid
            pid = fork_worker(worker)

        with pytest.raises(ChannelTimeout, match="did not finish set up"):
            ctl.setup_worker(launch)
        assert ctl.block.stop
        assert reap(pid) == 0, "the worker did not see the stop flag"


@pytest.mark.timeout(30)
def test_worker_crash_mid_transition_fails_without_deadlock(prefix: str) -> None:
    def worker() -> int:
        ch = WorkerChannel(SHM, prefix)
        ch.setup_done()
        ch.wait_transition(timeout_s=10)
        os._exit(3)  # dies with the transition half done

    # A long timeout: only the hang-up of the worker's FIFO can end this wait early.
    with ControllerChannel(SHM, prefix, timeout_s=60) as ctl:
        pid = launch_worker(ctl, worker)
        with pytest.raises(WorkerGone, match="exited before it finished transition 'e'"):
            ctl.do_transition("e", 2)
        assert reap(pid) == 3
        with pytest.raises(ChannelError, match="unusable"):
            ctl.do_transition("e", 3)


def test_worker_that_quits_wakes_a_waiting_controller(prefix: str) -> None:
    def worker() -> int:
        with WorkerChannel(SHM, prefix) as ch:
            ch.setup_done()
            ch.wait_transition(timeout_s=10)
            ch.quit()  # stopped by its owner while the controller waits
            time.sleep(0.5)  # still alive: the "q" itself must wake the controller
            return 0

    with ControllerChannel(SHM, prefix, timeout_s=60) as ctl:
        pid = launch_worker(ctl, worker)
        with pytest.raises(WorkerStopped):
            ctl.do_transition("r", 2)
        assert reap(pid) == 0


def test_controller_exit_is_seen_by_the_worker(prefix: str) -> None:
    paths = create_channel_files(SHM, prefix)
    try:
        with WorkerChannel(SHM, prefix) as worker_end:

            def controller() -> int:
                ctl = ControllerChannel(SHM, prefix, create=False)
                ctl.do_transition("r", 1)
                os._exit(0)  # leaves without stopping the worker

            pid = fork_worker(controller)
            transition = worker_end.wait_transition(timeout_s=10)
            assert transition is not None and transition.code == "r"
            worker_end.finish()
            assert reap(pid) == 0
            with pytest.raises(ControllerGone):
                worker_end.wait_transition(timeout_s=10)
    finally:
        for path in paths.all():
            path.unlink(missing_ok=True)


def test_buffer_growth_4_3_6_7(prefix: str) -> None:
    paths = create_channel_files(SHM, prefix)
    block = ControlBlock(paths.block)
    writer = BankWriter(paths, TO_WORKER, block, None)
    reader = BankReader(paths, TO_WORKER, block)
    try:
        writer.write(b"test")
        assert reader.must_remap()
        assert reader.read() == b"test"
        assert (reader.capacity, block.record(TO_WORKER)) == (4, BufferRecord(0, 1))

        writer.write(b"mes")  # smaller: same bank, no re-map
        assert not reader.must_remap()
        assert reader.read() == b"mes"
        assert (reader.capacity, block.record(TO_WORKER)) == (4, BufferRecord(0, 1))

        writer.write(b"larger")
        assert reader.must_remap()
        assert reader.read() == b"larger"
        assert (reader.capacity, block.record(TO_WORKER)) == (6, BufferRecord(1, 2))

        writer.write(b"largest")  # back to bank 0
        assert reader.must_remap()
        assert reader.read() == b"largest"
        assert (reader.capacity, block.record(TO_WORKER)) == (7, BufferRecord(0, 3))
    finally:
        writer.close()
        reader.close()
        block.close()
        for path in paths.all():
            path.unlink(missing_ok=True)


def test_two_growths_between_reads_are_not_missed(prefix: str) -> None:
    paths = create_channel_files(SHM, prefix)
    block = ControlBlock(paths.block)
    writer = BankWriter(paths, TO_WORKER, block, None)
    reader = BankReader(paths, TO_WORKER, block)
    try:
        writer.write(b"ab")
        assert reader.read() == b"ab"
        writer.write(b"abcd")  # bank 1
        writer.write(b"abcdef")  # bank 0 again: same index as the reader's, new identifier
        assert block.record(TO_WORKER).bank == 0
        assert reader.must_remap()
        assert reader.read() == b"abcdef"
    finally:
        writer.close()
        reader.close()
        block.close()
        for path in paths.all():
            path.unlink(missing_ok=True)


def test_payloads_grow_both_ways_across_processes(prefix: str) -> None:
    sizes = [0, 5, 3, 100, 4096, 10, 70_000]

    def worker() -> int:
        with WorkerChannel(SHM, prefix) as ch:
            ch.setup_done()

            def echo(code: str, transition_id: int) -> None:
                ch.send(ch.received()[::-1] + b"!")

            ch.handle_transitions(echo)
        return 0

    with ControllerChannel(SHM, prefix, timeout_s=10) as ctl:
        pid = launch_worker(ctl, worker)
        for i, size in enumerate(sizes):
            payload = bytes((i + k) % 251 for k in range(size))
            ctl.send(payload)
            ctl.do_transition("x", i + 1)
            assert ctl.received() == payload[::-1] + b"!"
        ctl.stop_worker()
        assert reap(pid) == 0
    # every grown bank was unlinked by its reader once mapped, the rest by close()
    assert not any(p.exists() for p in channel_paths(SHM, prefix).all())


def test_stale_files_of_a_crashed_run_are_replaced(prefix: str) -> None:
    paths = channel_paths(SHM, prefix)
    for path in paths.all():
        path.write_bytes(b"stale")
    with ControllerChannel(SHM, prefix, timeout_s=1) as ctl:
        assert ctl.block.transition_id == 0
        assert not paths.banks[(TO_WORKER, 0)].exists()
    assert not any(p.exists() for p in paths.all())


def test_bad_arguments_are_clear_errors(prefix: str) -> None:
    with pytest.raises(ChannelError, match="bad channel name"):
        channel_paths(SHM, "a/b")
    with pytest.raises(TelemetryError, match="does not exist"):
        ControllerChannel(SHM, prefix, create=False)
    with ControllerChannel(SHM, prefix, timeout_s=1) as ctl:
        with pytest.raises(ChannelError, match="one ASCII character"):
            ctl.do_transition("rw", 1)
        with pytest.raises(ChannelError, match="cannot be told"):
            ctl.do_transition("r", 0)  # the block's current id: looks already done
