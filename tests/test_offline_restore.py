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


def test_a_journal_of_an_earlier_boot_is_set_aside_not_restored(agent: RunningAgent) -> None:
    """A host that rebooted since vmpowerd was killed: the kernel reset every setting the
    journal recorded, and this boot's (here: what the crash left, standing in for what
    this boot set up) must stay. The host cannot reboot here: the journal is made to name
    another boot, as it would after one."""
    agent.start()
    agent.control("set_cpu_freq", cpu=6, op="min")
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    this_boot = agent.originals()
    journal = agent.state_dir / "restore-journal.json"
    text = journal.read_text()
    kernel_boot = json.loads(text)["boot_id"]
    earlier = "0" * 8 + kernel_boot[8:]
    journal.write_text(text.replace(kernel_boot, earlier, 1))

    done = restore("--config", str(agent.config_path))
    assert done.returncode == 0, done.stderr
    assert agent.originals() == this_boot
    kept = agent.state_dir / f"restore-journal.json.boot-{earlier}"
    assert kept.read_text() == text.replace(kernel_boot, earlier, 1)
    assert done.stdout.splitlines() == [
        "not restored: the journal was written in an earlier boot, whose settings the"
        f" kernel reset when it booted; kept as {kept}"
    ]
    assert "restore journal" in done.stderr and "earlier boot" in done.stderr


def test_an_earlier_boots_msrs_are_counted_beside_its_note(tmp_path: Path) -> None:
    """An earlier boot's journal still gets its MSRs back (kexec keeps them): the
    summary counts them, and the earlier-boot line says what was left."""
    from vmpower.restore import RestoreJournal

    state, msr_dir = tmp_path / "state", tmp_path / "msr"
    msr_dir.mkdir()
    msr = msr_dir / "msr"
    msr.write_bytes(bytes(16))
    journal = RestoreJournal(state, boot_id=lambda: "boot-a")
    journal.remember("/sys/a", "1")
    journal.remember_msr(str(msr), 8, bytes(range(1, 9)))
    journal.close()
    config = tmp_path / "vmpowerd.toml"
    config.write_text(
        f'[state]\ndir = "{state}"\n[cpufreq]\nsysfs_root = "{tmp_path}"\n'
        f'[policies]\nmsr_root = "{msr_dir}"\n'
    )
    done = restore("--config", str(config))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"restored {msr}@0x8 = ")
    assert lines[1].startswith("not restored: the journal was written in an earlier boot")
    assert lines[2] == "1 settings restored, 0 not restored"
    assert msr.read_bytes() == bytes(8) + bytes(range(1, 9))
