"""`vmpower show_cpus` shows who wishes what on each CPU (issue #12 point 4, #18 point 6).

The real shell's one-shot command against the real daemon: the WISHERS column names
the operator, the VMs and a telemetry session; the session's limits and a CPU's note
(hybrid LP E-cores without a usable base frequency) each get an indented line under
the CPU's row.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import RunningAgent

from vmpower.cpufreq.simulate import build_from_fixture
from vmpower.telemetry import BatchClient

SHELL_CMD = [sys.executable, "-m", "vmpower.shell"]
MAX = "CPU_FREQUENCY_MAX_CONTROL"
FIXTURES = Path(__file__).resolve().parent / "data" / "real-hosts"


def show_cpus(agent: RunningAgent, *args: str) -> list[str]:
    run = subprocess.run(
        [*SHELL_CMD, "--socket", str(agent.socket), "show_cpus", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


def row_of(lines: list[str], cpu: int) -> tuple[str, list[str]]:
    """CPU ``cpu``'s row and the indented lines under it."""
    for i, line in enumerate(lines):
        if line.split()[:1] == [str(cpu)]:
            under = []
            for extra in lines[i + 1 :]:
                if not extra.startswith("    "):
                    break
                under.append(extra.strip())
            return line, under
    raise AssertionError(f"no row for CPU {cpu} in:\n" + "\n".join(lines))


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    running = RunningAgent(
        tmp_path,
        settings={
            "telemetry": {
                "proc_root": str(tmp_path / "proc"),
                "powercap_root": str(tmp_path / "powercap"),
                "access_dir": str(tmp_path / "access"),
                "start_timeout_s": 20.0,
            }
        },
    )
    try:
        yield running
    finally:
        running.close()


def test_wishers_column_and_the_sessions_limits(agent: RunningAgent) -> None:
    agent.start()
    assert agent.control("set_cpu_freq", cpu=3, op="max")
    lines = show_cpus(agent)
    assert lines[0].split()[-1] == "WISHERS"
    assert all(len(line) <= 100 for line in lines), lines
    row3, under3 = row_of(lines, 3)
    assert row3.split()[-1] == "operator"  # the shell's wish; VMs asked nothing yet
    assert under3 == []
    with BatchClient(agent.socket, controls=[(MAX, "cpu", 1)]) as batch:
        batch.write([2.0e9])
        row1, under1 = row_of(show_cpus(agent, "1"), 1)
        owner = f"session:{batch.server_key}"
        assert row1.split()[-1] == owner
        assert under1 == [f"limits {owner}: -..2000000 kHz"]
    row1, under1 = row_of(show_cpus(agent, "1"), 1)
    assert row1.split()[-1] == "-" and under1 == []
    assert agent.stop() == 0


def test_a_cpu_without_a_usable_base_says_so_under_its_row(agent: RunningAgent) -> None:
    shutil.rmtree(agent.sysfs_root)
    build_from_fixture(agent.sysfs_root, FIXTURES / "mtl-m-2.json", max_cpus=14)
    agent.start()
    lines = show_cpus(agent)
    _, under12 = row_of(lines, 12)  # an LP E-core: base_frequency = its minimum
    assert len(under12) >= 1 and under12[0].startswith("note: ")
    assert "no usable base" in " ".join(under12)
    _, under2 = row_of(lines, 2)  # a P-core
    assert under2 == []
    assert all(len(line) <= 100 for line in lines), lines
    assert agent.stop() == 0
