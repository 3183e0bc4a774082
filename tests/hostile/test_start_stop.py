"""Starting and stopping vmpowerd when things go wrong (issue #11, point 10).

* A state directory that cannot be used (a regular file, a path under one, a read-only
  or full file system) stops the start with one line naming the path and the cause,
  exit 1, no traceback.
* SIGTERM at any moment of the start exits cleanly: the signal handlers are installed
  before anything can change, so the files are restored and the journal is empty.
* A setting that cannot be restored at exit is named, kept in the journal, and the exit
  status is 1; the next start restores it.
* A FIFO where a sysfs attribute should be is an error for that CPU, never a hang.

Real parts: vmpowerd as a subprocess (tests/agent_support.py), real signals, a real
tmpfs mount for the read-only and full cases (skipped where ``mount`` is refused).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agent_support import RunningAgent, kill_daemon, read_attr

from vmpower import protocol
from vmpower.devtools import make_request, wait_for
from vmpower.protocol import Command, ReplyCode, Unit

EXIT_TIMEOUT_S = 60.0  # generous: the machine is shared and loaded
CPU2 = "devices/system/cpu/cpu2/cpufreq"  # vm1's vCPU 0 is pinned to host CPU 2


def daemon_command(agent: RunningAgent) -> list[str]:
    return [sys.executable, "-m", "vmpower.daemon", "--config", str(agent.config_path)]


def reply_code(agent: RunningAgent, channel: str, unit: Unit, vcpu: int) -> int:
    reply = agent.hosts[channel].request(make_request(Command.CPU_POWER, unit, vcpu), timeout_s=30)
    return protocol.peek_header(reply)[2]


def journal_text(agent: RunningAgent) -> str:
    path = agent.state_dir / "restore-journal.json"
    return path.read_text() if path.exists() else ""


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A private tmpfs at ``where`` (skips the test where mounting is not allowed)."""
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


# -- an unusable state directory ---------------------------------------------------------


def _regular_file(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    path = tmp_path / "state-file"
    path.write_text("not a directory\n")
    yield path, "not a directory"


def _under_a_regular_file(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    (tmp_path / "plain").write_text("")
    yield tmp_path / "plain" / "state", "not a directory"


def _read_only(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    with tmpfs(tmp_path / "ro", "size=1m,mode=0755") as mnt:
        (mnt / "state").mkdir(mode=0o700)
        remount = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only: {remount.stderr.decode().strip()}")
        yield mnt / "state", "read-only file system"


def _full(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    with tmpfs(tmp_path / "full", "size=64k,mode=0755") as mnt:
        (mnt / "state").mkdir(mode=0o700)
        with open(mnt / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        yield mnt / "state", "no space left on device"


STATE_DIRS: dict[str, Callable[[Path], Iterator[tuple[Path, str]]]] = {
    "a regular file": _regular_file,
    "a path under a regular file": _under_a_regular_file,
    "on a read-only file system": _read_only,
    "on a full file system": _full,
}


@pytest.mark.parametrize("case", STATE_DIRS)
def test_an_unusable_state_dir_is_one_line_and_exit_1(tmp_path: Path, case: str) -> None:
    (tmp_path / "agent").mkdir()
    with contextlib.contextmanager(STATE_DIRS[case])(tmp_path) as (state_dir, cause):
        agent = RunningAgent(tmp_path / "agent", settings={"state": {"dir": str(state_dir)}})
        try:
            before = agent.originals()
            done = subprocess.run(
                daemon_command(agent), capture_output=True, text=True, timeout=EXIT_TIMEOUT_S
            )
            assert done.returncode == 1, done.stderr
            assert "Traceback" not in done.stderr, done.stderr
            errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
            assert len(errors) == 1, done.stderr
            assert str(state_dir) in errors[0] and cause in errors[0].lower(), errors[0]
            assert agent.originals() == before  # nothing was touched
        finally:
            agent.close()


# -- SIGTERM during the start --------------------------------------------------------------


def crashed_run(agent: RunningAgent) -> dict[str, str]:
    """A run killed with SIGKILL after changing CPU 2: the journal holds its originals."""
    agent.start()
    assert reply_code(agent, "vm1.0", Unit.SCALE_MIN, 0) == ReplyCode.ACK
    assert agent.proc is not None
    agent.proc.kill()
    agent.proc.wait(EXIT_TIMEOUT_S)
    assert journal_text(agent)
    # What it left besides (its FIFO): gone, so that the next run creating it shows.
    (agent.channels_dir / "fifo6").unlink()
    return agent.originals()


# When SIGTERM is sent: right away, or as soon as the new run has taken the lock, has
# restored what the crashed run left, has created its FIFO (each polled every 1 ms), or
# after a delay.
TIMINGS = ["at once", "lock taken", "crash recovered", "fifo created", "0.3 s", "1 s"]


def _reached(
    agent: RunningAgent, proc: subprocess.Popen[bytes], timing: str, original_governor: str
) -> Callable[[], bool]:
    lock = agent.state_dir / "vmpowerd.lock"
    governor = agent.sysfs_root / CPU2 / "scaling_governor"
    stages: dict[str, Callable[[], bool]] = {
        "lock taken": lambda: lock.exists() and lock.read_text().strip() == str(proc.pid),
        "crash recovered": lambda: governor.read_text().strip() == original_governor,
        "fifo created": lambda: (agent.channels_dir / "fifo6").exists(),
    }
    return stages[timing]


@pytest.mark.parametrize("timing", TIMINGS)
def test_sigterm_at_any_moment_of_the_start_exits_cleanly(tmp_path: Path, timing: str) -> None:
    agent = RunningAgent(tmp_path, settings={"channels": {"fifo_cpus": "6"}})
    try:
        originals = agent.originals()
        crashed = crashed_run(agent)
        crashed_journal = journal_text(agent)
        assert crashed != originals
        with open(agent.log_path, "ab") as log_file:
            proc = subprocess.Popen(daemon_command(agent), stdout=log_file, stderr=log_file)
        try:
            if timing in ("at once", "0.3 s", "1 s"):
                delay_s = 0.0 if timing == "at once" else float(timing.split()[0])
                wait_for(lambda: proc.poll() is not None, delay_s)
            else:
                governor = originals["devices/system/cpu/cpufreq/policy2/scaling_governor"].strip()
                reached = _reached(agent, proc, timing, governor)
                assert wait_for(reached, EXIT_TIMEOUT_S, 0.001)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(EXIT_TIMEOUT_S)
        finally:
            kill_daemon(proc)
        if code == -signal.SIGTERM:
            # Only before the handlers exist, and nothing had changed yet.
            assert agent.originals() == crashed, "killed by SIGTERM after changing files"
            assert journal_text(agent) == crashed_journal
            assert not (agent.channels_dir / "fifo6").exists()
        else:
            assert code == 0, agent.log()
            assert agent.originals() == originals
            assert journal_text(agent) == ""
            assert not (agent.channels_dir / "fifo6").exists()
    finally:
        agent.close()


# -- a setting that cannot be restored at exit -----------------------------------------------


def test_a_setting_left_unrestored_is_named_kept_and_exit_1(tmp_path: Path) -> None:
    agent = RunningAgent(tmp_path)
    governor = agent.sysfs_root / CPU2 / "scaling_governor"
    try:
        original = read_attr(governor)
        agent.start()
        assert reply_code(agent, "vm1.0", Unit.SCALE_MIN, 0) == ReplyCode.ACK
        assert read_attr(governor) == "userspace"
        # The file becomes a directory: restoring it fails (Sysfs's fd kept open for
        # writes still points at the old file; the journal writes by path).
        governor.unlink()
        governor.mkdir()
        code = agent.stop(timeout_s=EXIT_TIMEOUT_S)
        log = agent.log()
        assert code == 1, log
        assert "every setting restored" not in log
        unrestored = [line for line in log.splitlines() if str(governor) in line]
        assert any("ERROR" in line for line in unrestored), log
        assert str(governor) in journal_text(agent)
        # The next start restores it once it can be written again.
        governor.rmdir()
        governor.write_text("userspace\n")
        agent.start()
        assert wait_for(lambda: read_attr(governor) == original, EXIT_TIMEOUT_S)
        assert agent.stop(timeout_s=EXIT_TIMEOUT_S) == 0
        assert journal_text(agent) == ""
        assert read_attr(governor) == original
    finally:
        agent.close()
        if governor.is_dir():
            shutil.rmtree(governor)


# -- a FIFO where an attribute should be -----------------------------------------------------


@pytest.mark.parametrize("attribute", ["scaling_setspeed", "scaling_available_frequencies"])
def test_a_fifo_in_place_of_an_attribute_refuses_that_cpu_only(
    tmp_path: Path, attribute: str
) -> None:
    agent = RunningAgent(tmp_path)
    path = agent.sysfs_root / CPU2 / attribute
    path.unlink()
    os.mkfifo(path)
    try:
        originals = agent.originals()
        agent.start()
        assert reply_code(agent, "vm1.0", Unit.SCALE_MIN, 0) == ReplyCode.NACK  # host CPU 2
        assert reply_code(agent, "vm2.0", Unit.SCALE_MIN, 1) == ReplyCode.ACK  # host CPU 4
        assert "a FIFO, not an attribute" in agent.log()  # the reason, not a hang
        assert agent.stop(timeout_s=EXIT_TIMEOUT_S) == 0, agent.log()
        assert agent.originals() == originals
    finally:
        agent.close()
