"""Other power managers (issue #13, point 3): found under /proc, warned about, in status.

The acceptance test starts a real process named ``tuned`` (a copy of ``sleep``: the
kernel's comm is the executable's name) before the real daemon and reads its log and
``status``. The /proc root is injectable for the cases a real process cannot show
cheaply (a Python-script daemon, the 15-character comm).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import RunningAgent

from vmpower.conflicts import ConflictWatch, scan_processes
from vmpower.devtools import wait_for
from vmpower.monitor import Monitor

UNIT = Path(__file__).resolve().parents[1] / "vmpower" / "data" / "vmpowerd.service"


@pytest.fixture
def tuned(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    program = tmp_path / "bin" / "tuned"
    program.parent.mkdir()
    shutil.copy(shutil.which("sleep") or "/bin/sleep", program)
    proc = subprocess.Popen([str(program), "600"])
    try:
        assert wait_for(lambda: Path(f"/proc/{proc.pid}/comm").read_text().strip() == "tuned")
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_real_daemon_warns_about_a_running_tuned_and_lists_it(
    tmp_path: Path, tuned: subprocess.Popen[bytes]
) -> None:
    agent = RunningAgent(tmp_path)
    try:
        agent.start()
        assert wait_for(lambda: "another power manager is running: tuned" in agent.log(), 10)
        line = next(x for x in agent.log().splitlines() if "power manager is running" in x)
        assert "WARNING" in line and f"pid {tuned.pid}" in line, line
        conflicts = agent.control("status")["conflicts"]
        mine = [c for c in conflicts if c["name"] == "tuned"]
        assert mine and tuned.pid in mine[0]["pids"], conflicts
        # The operator's plain `vmpower status` says it too.
        shown = subprocess.run(
            [sys.executable, "-m", "vmpower.shell", "--socket", str(agent.socket), "status"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert any(
            x.startswith("CONFLICT") and f"tuned runs (pid {tuned.pid}" in x
            for x in shown.splitlines()
        ), shown
        assert agent.stop() == 0
    finally:
        agent.close()


def _process(proc: Path, pid: int, comm: str, argv: list[str]) -> None:
    d = proc / str(pid)
    d.mkdir(parents=True)
    (d / "comm").write_text(comm + "\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")


def test_truncated_comm_and_python_scripts_are_recognised(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    _process(proc, 1, "init", ["/sbin/init"])
    _process(proc, 10, "power-profiles-", ["/usr/libexec/power-profiles-daemon"])
    _process(proc, 11, "python3", ["/usr/bin/python3", "-Es", "/usr/sbin/tuned", "-l"])
    _process(proc, 12, "python3", ["/usr/bin/python3", "/usr/bin/auto-cpufreq", "--daemon"])
    _process(proc, 13, "python3", ["/usr/bin/python3", "-c", "print('tuned')"])
    _process(proc, 14, "bash", ["bash"])
    assert scan_processes(str(proc)) == {
        "power-profiles-daemon": [10],
        "tuned": [11],
        "auto-cpufreq": [12],
    }


def test_each_appearance_is_warned_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    monitor = Monitor()
    active: set[str] = set()
    watch = ConflictWatch(monitor, str(proc), units=lambda units: set(units) & active)
    try:
        caplog.set_level("INFO", logger="vmpower.conflicts")
        assert watch.check() == []
        active.add("tlp.service")
        _process(proc, 42, "tuned", ["/usr/sbin/tuned"])
        for _ in range(3):  # three periods: one warning each
            found = watch.check()
        assert [(c["name"], c["pids"], c["unit"]) for c in found] == [
            ("tlp", [], "tlp.service"),
            ("tuned", [42], None),
        ]
        warnings = [r for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 2
        shutil.rmtree(proc / "42")
        assert [c["name"] for c in watch.check()] == ["tlp"]
        assert "power manager tuned is gone" in caplog.text
    finally:
        monitor.close()


def test_unit_file_conflicts_with_the_managers_that_cannot_run_beside_it() -> None:
    lines = [x for x in UNIT.read_text().splitlines() if x.startswith("Conflicts=")]
    named = {u for x in lines for u in x.split("=", 1)[1].split()}
    assert {
        "tuned.service",
        "power-profiles-daemon.service",
        "auto-cpufreq.service",
        "tlp.service",
    } <= named
