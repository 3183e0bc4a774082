"""A session's limits on a VM's host CPUs need the access lists' grant (issue #12 point 5).

The real daemon, real batch sessions of a non-root client (uid nobody, forked and
setuid like test_telemetry_batch.py's), and the access list files the daemon reads:
``allowed_controls`` lets the client write a control at all; only
``allowed_controls_on_vm_cpus`` lets it write one on a host CPU a running VM is pinned
to (vm1's vCPU 0 is on CPU 2, no VM is on CPU 1).
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_support import RunningAgent
from test_telemetry_batch import MAX, NOBODY, batch_files, in_child, khz, make_agent, reap

from vmpower.devtools import wait_for
from vmpower.errors import TelemetryError
from vmpower.telemetry import BatchClient


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    running = make_agent(tmp_path)
    try:
        yield running.start()
        assert running.stop() == 0
    finally:
        running.close()
        shutil.rmtree(running.socket.parent, ignore_errors=True)
    wait_for(lambda: not batch_files(), 30)


def grant(agent: RunningAgent, name: str, *controls: str) -> None:
    path = agent.tmp_path / "access" / "0.DEFAULT_ACCESS" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{c}\n" for c in controls))


def write_as_nobody(agent: RunningAgent, cpu: int, hz: float) -> dict[str, Any]:
    """A session of uid nobody on ``cpu``'s maximum: its write's refusal (None: accepted)
    and the file while the session lives; then the client is killed and the session's
    end restores the file."""
    before = khz(agent, cpu, "scaling_max_freq")

    def body() -> str | None:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        batch = BatchClient(agent.socket, controls=[(MAX, "cpu", cpu)]).start()
        try:
            batch.write([hz])
        except TelemetryError as exc:
            return str(exc)
        return None

    pid, refusal = in_child(body, linger=True)  # the session lives as long as the child
    try:
        held = khz(agent, cpu, "scaling_max_freq")
    finally:
        os.kill(pid, signal.SIGKILL)
        reap(pid)
    assert wait_for(lambda: khz(agent, cpu, "scaling_max_freq") == before, 10)
    return {"refusal": refusal, "held": held}


def test_a_vm_cpu_is_refused_without_the_grant_and_written_with_it(agent: RunningAgent) -> None:
    originals = {cpu: khz(agent, cpu, "scaling_max_freq") for cpu in (1, 2)}
    grant(agent, "allowed_controls", MAX)
    # a CPU no VM is pinned to: allowed_controls is enough
    assert write_as_nobody(agent, 1, 2.0e9) == {"refusal": None, "held": 2_000_000}
    # vm1's CPU: refused, the file untouched
    out = write_as_nobody(agent, 2, 2.0e9)
    assert out == {
        "refusal": (
            f"host CPU 2 belongs to VM vm1: uid {NOBODY} may not write {MAX} there"
            f" (allowed_controls_on_vm_cpus in {agent.tmp_path / 'access'} grants it)"
        ),
        "held": originals[2],
    }
    # granted: the limit goes on vm1's CPU (the VM has asked for nothing)
    grant(agent, "allowed_controls_on_vm_cpus", MAX)
    assert write_as_nobody(agent, 2, 2.0e9) == {"refusal": None, "held": 2_000_000}
    # each session's end put the CPUs back
    assert {cpu: khz(agent, cpu, "scaling_max_freq") for cpu in (1, 2)} == originals


def test_the_grant_alone_lets_a_client_write_the_control(agent: RunningAgent) -> None:
    """allowed_controls_on_vm_cpus implies allowed_controls (as every allowed control is
    a readable signal): one line grants both."""
    grant(agent, "allowed_controls_on_vm_cpus", MAX)
    assert write_as_nobody(agent, 2, 2.0e9) == {"refusal": None, "held": 2_000_000}
