"""`vmpower restore`: after vmpowerd was killed with SIGKILL, put its settings back."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import RunningAgent


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    running = RunningAgent(tmp_path)
    try:
        yield running
    finally:
        running.close()


def restore(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmpower.shell", "restore", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_restore_after_kill_9_puts_every_setting_back(agent: RunningAgent) -> None:
    originals = agent.originals()
    agent.start()
    # Refused while the daemon runs: it holds the instance lock.
    running = restore("--config", str(agent.config_path))
    assert running.returncode == 1 and "is running" in running.stderr
    agent.control("set_cpu_freq", cpu=6, op="min")
    agent.control("set_cpu_freq", cpu=7, op="max")
    assert agent.setspeed(6) == agent.table(6)[-1]
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    assert agent.originals() != originals  # the crash left CPUs 6 and 7 changed

    done = restore("--config", str(agent.config_path))
    assert done.returncode == 0, done.stderr
    assert agent.originals() == originals
    lines = done.stdout.splitlines()
    governor = f"{agent.sysfs_root}/devices/system/cpu/cpu6/cpufreq/scaling_governor"
    assert any(line.startswith(f"restored {governor} = ") for line in lines), lines
    assert lines[-1].startswith(f"{len(lines) - 1} settings restored, 0 not restored")

    # Nothing left: a second run says so; --json reports the same as an object.
    again = restore("--json", "--config", str(agent.config_path))
    assert again.returncode == 0
    assert json.loads(again.stdout)["restored"] == []
