"""A turn's replies leave, then the loop yields its CPU to the peers they woke.

Real parts: AF_UNIX listeners as QEMU binds them, a real ``Monitor`` (epoll) and
``ChannelRegistry`` connecting to them. Only ``os.sched_yield`` is wrapped, to see when
the loop gives up its CPU: the scheduler's choice itself cannot be observed here.
"""

from __future__ import annotations

import os
import select
import socket
import time
from pathlib import Path

import pytest

from vmpower.channels import ChannelRegistry, ChannelState
from vmpower.monitor import Monitor
from vmpower.protocol import PACKET_SIZE


def test_the_loop_yields_once_after_a_turns_replies_are_in_the_peers_sockets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU's main loop carries a reply to its guest; on a shared CPU it ran only once
    the daemon's turn was over (issue #16, the guest bench). When the loop yields, every
    reply of the turn is already readable by its peer; a turn with no reply to send does
    not yield."""
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

        seen: list[list[bool]] = []
        real_yield = os.sched_yield

        def watched_yield() -> None:
            seen.append([bool(select.select([p], [], [], 0)[0]) for p in peers])
            real_yield()

        monkeypatch.setattr(os, "sched_yield", watched_yield)
        for n, channel in enumerate(channels):
            channel.queue_replies([bytes([n]) * PACKET_SIZE], 1)
        registry.send(channels)
        assert seen == [[True, True]]  # once, after both replies were sent
        assert [p.recv(PACKET_SIZE) for p in peers] == [bytes([n]) * PACKET_SIZE for n in (0, 1)]

        registry.send([])  # nothing to send: no yield
        assert len(seen) == 1
    finally:
        registry.close_all()
        monitor.close()
        for sock in (*peers, *listeners):
            sock.close()
