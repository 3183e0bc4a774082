"""A turn's replies are its last step, and the loop never yields its CPU.

Real parts: AF_UNIX listeners as QEMU binds them, a real ``Monitor`` (epoll) and
``ChannelRegistry`` connecting to them. Only ``os.sched_yield`` is wrapped, to see
whether the loop gives up its CPU: the scheduler's choice itself cannot be seen here
(the agent bench's busy-CPU case measures it).
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmpower.channels import ChannelRegistry, ChannelState, VmChannel
from vmpower.monitor import Monitor
from vmpower.protocol import PACKET_SIZE


@pytest.fixture
def connected(
    tmp_path: Path,
) -> Iterator[tuple[Monitor, ChannelRegistry, list[VmChannel], list[socket.socket]]]:
    """Two channels of a VM, connected to listeners as QEMU binds them."""
    listeners = []
    for n in range(2):
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(tmp_path / f"vm.{n}"))
        listener.listen(1)
        listeners.append(listener)
    monitor = Monitor()
    registry = ChannelRegistry(
        monitor, tmp_path, lambda c, p: None, lambda c, m: None,
        rate_per_s=100.0, burst=100, send_queue_max=64, clock=time.monotonic,
    )  # fmt: skip
    peers: list[socket.socket] = []
    try:
        registry.open_vm("vm", [(n, str(tmp_path / f"vm.{n}")) for n in range(2)])
        peers = [listener.accept()[0] for listener in listeners]
        channels = sorted(registry.vm_channels.values(), key=lambda c: c.index)
        for _ in range(20):
            if all(c.state is ChannelState.CONNECTED for c in channels):
                break
            monitor.run_once(0.05)
        assert all(c.state is ChannelState.CONNECTED for c in channels)
        yield monitor, registry, channels, peers
    finally:
        registry.close_all()
        monitor.close()
        for sock in (*peers, *listeners):
            sock.close()


def _readable(peers: list[socket.socket]) -> list[bool]:
    return [bool(select.select([p], [], [], 0)[0]) for p in peers]


def test_a_turns_replies_leave_after_its_other_work_and_the_loop_does_not_yield(
    connected: tuple[Monitor, ChannelRegistry, list[VmChannel], list[socket.socket]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """QEMU's main loop carries a reply to its guest and shares the daemon's CPU: it runs
    when the loop blocks, so the replies go last (issue #16, the guest bench). A yield
    after them had the same aim, and handed a busy process on that CPU a whole slice."""
    monitor, registry, channels, peers = connected
    yields: list[None] = []
    monkeypatch.setattr(os, "sched_yield", lambda: yields.append(None))
    seen_by_hooks: list[list[bool]] = []

    def replies() -> None:  # the request handler's end of turn (power.finish_turn)
        for n, channel in enumerate(channels):
            channel.queue_replies([bytes([n]) * PACKET_SIZE], 1)
        registry.send(channels)

    monitor.add_end_of_turn(replies)
    monitor.add_end_of_turn(lambda: seen_by_hooks.append(_readable(peers)))
    monitor.run_once(0.0)
    assert seen_by_hooks == [[False, False]]  # queued, not sent, while the turn goes on
    assert _readable(peers) == [True, True]  # sent by the time the turn is over
    assert [p.recv(PACKET_SIZE) for p in peers] == [bytes([n]) * PACKET_SIZE for n in (0, 1)]
    assert yields == []


def test_run_computes_the_next_wait_before_the_replies_and_again_for_a_timer_they_set() -> None:
    """run() computes a turn's wait ahead, at the end of the turn before: a timer set by
    a last step (a send that fails may schedule a reconnect) must not wait for the next
    fd to wake the loop."""
    monitor = Monitor()
    fired = threading.Event()
    armed: list[bool] = []

    def arm_once() -> None:
        if not armed:
            armed.append(True)
            monitor.call_later(0.0, fired.set)

    monitor.add_last(arm_once)
    thread = threading.Thread(target=monitor.run, daemon=True)
    thread.start()
    try:
        monitor.wake()  # a turn ends: its last step sets the timer
        # No fd is ready and no other timer is set: the loop would wait forever.
        assert fired.wait(5.0), "a timer set by the turn's last step waited for a wake-up"
    finally:
        monitor.stop()
        thread.join(5.0)
        monitor.close()
    assert not thread.is_alive()
