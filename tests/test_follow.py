"""`vmpower simulate-sysfs DIR --follow` plays the hardware (issue #14 point 6).

vmpowerd writes its simulated tree as plain files and does not know it is simulated;
the follower, a separate process, moves each policy's scaling_cur_freq where the
governor and limits put it, so show_cpus' CUR follows what was set.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import RunningAgent

from vmpower import protocol
from vmpower.devtools import make_request, wait_for
from vmpower.protocol import Command, ReplyCode, Unit

FOLLOW = [sys.executable, "-m", "vmpower.cpufreq.simulate"]


@pytest.fixture
def follower_and_agent(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], RunningAgent]]:
    agent = RunningAgent(tmp_path)
    follower = subprocess.Popen(
        [*FOLLOW, str(agent.sysfs_root), "--follow"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline().startswith("following ")
        yield follower, agent.start()
    finally:
        agent.close()
        follower.kill()
        follower.wait()
        assert follower.stdout is not None
        follower.stdout.close()


def cpu2(agent: RunningAgent) -> dict:
    [row] = agent.control("show_cpus", cpu=2)
    return row


@pytest.mark.parametrize("unit", [Unit.SCALE_MAX, Unit.SCALE_MIN, Unit.DISABLE_TURBO])
def test_cur_follows_what_a_guest_asked(follower_and_agent, unit: Unit) -> None:
    follower, agent = follower_and_agent
    reply = agent.hosts["vm1.0"].request(make_request(Command.CPU_POWER, unit, 0))
    assert protocol.peek_header(reply)[2] == int(ReplyCode.ACK)
    row = cpu2(agent)
    assert row["target_khz"] == agent.setspeed(2)
    assert wait_for(lambda: cpu2(agent)["cur_khz"] == agent.setspeed(2), 10), cpu2(agent)
    assert agent.stop() == 0  # restored: the governor is back, cur where it puts it
    follower.send_signal(signal.SIGTERM)
    assert follower.wait(10) == 0


def test_follow_needs_a_tree(tmp_path: Path) -> None:
    run = subprocess.run(
        [*FOLLOW, str(tmp_path), "--follow"], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 2 and "holds no simulated cpufreq tree" in run.stderr
