"""vmpowerd under systemd's notify protocol: the test plays systemd's notify socket.

The real daemon runs with NOTIFY_SOCKET naming an AF_UNIX datagram socket the test
bound, and WATCHDOG_USEC set, as systemd starts a Type=notify service with
WatchdogSec=. The test reads what systemd would read.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import RunningAgent

from vmpower.notify import Notifier


class NotifySocket:
    """systemd's end: a datagram socket; each message is a dict of its KEY=value lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def expect(self, key: str, value: str | None = None, timeout_s: float = 30) -> dict[str, str]:
        """The next message holding ``key`` (= ``value``); earlier ones are kept in order."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {key}={value or '*'}; got {self.messages}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            message = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append(message)
            if key in message and (value is None or message[key] == value):
                return message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    running = RunningAgent(tmp_path)
    try:
        yield running
    finally:
        running.close()


def test_ready_status_watchdog_reload_and_stopping(
    agent: RunningAgent, notify: NotifySocket
) -> None:
    # WatchdogSec=1s: systemd expects a ping within 1 s; vmpowerd pings every 0.5 s.
    agent.start(env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"})
    ready = notify.expect("READY")
    assert ready["READY"] == "1"
    assert ready["STATUS"].startswith("serving ")  # what is served, from the start
    notify.expect("WATCHDOG", "1")
    notify.expect("WATCHDOG", "1")  # again: from a timer, not once

    # SIGHUP: RELOADING=1 with the monotonic time, then READY=1 saying it was applied.
    before_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    reloading = notify.expect("RELOADING", "1")
    assert before_us <= int(reloading["MONOTONIC_USEC"])
    after = notify.expect("READY", "1")
    assert "reloaded" in after["STATUS"]
    assert notify.messages.index(reloading) < notify.messages.index(after)

    # A configuration broken on disk: the reload is refused, and STATUS says so.
    agent.config_path.write_text("[log]\nlevel = 3\n")
    agent.proc.send_signal(signal.SIGHUP)
    notify.expect("RELOADING", "1")
    refused = notify.expect("READY", "1")
    assert "NOT applied" in refused["STATUS"]
    notify.expect("WATCHDOG", "1")  # still serving

    assert agent.stop() == 0
    stopping = notify.expect("STOPPING", "1")
    assert "restoring" in stopping["STATUS"]


def test_status_follows_the_channels_served(agent: RunningAgent, notify: NotifySocket) -> None:
    agent.start(env={"NOTIFY_SOCKET": str(notify.path)})
    first = notify.expect("READY")["STATUS"]
    assert first == "serving 3 VMs on 4 channels (4 connected)"
    agent.control("rm_vm", vm="vm2")
    assert notify.expect("STATUS", "serving 2 VMs on 3 channels (3 connected)")
    # No watchdog was asked for: no WATCHDOG=1 ever.
    assert agent.stop() == 0
    notify.expect("STOPPING", "1")
    assert not any("WATCHDOG" in m for m in notify.messages)


def test_a_watchdog_meant_for_another_process_is_not_fed() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "4000000"}
    assert Notifier(env, pid=42).watchdog_period_s() == 2.0
    assert Notifier({**env, "WATCHDOG_PID": "42"}, pid=42).watchdog_period_s() == 2.0
    assert Notifier({**env, "WATCHDOG_PID": "41"}, pid=42).watchdog_period_s() is None
    assert Notifier({"WATCHDOG_USEC": "4000000"}, pid=42).watchdog_period_s() is None
    assert Notifier({}, pid=os.getpid()).enabled is False
