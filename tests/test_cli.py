"""One CLI grammar: `vmpower`'s global options before or after any subcommand,
--json everywhere (errors included), --version, and shell completion from the parser.

Everything runs the real executables against the real daemon.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import RunningAgent

VMPOWER = [sys.executable, "-m", "vmpower.shell"]


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    running = RunningAgent(tmp_path_factory.mktemp("cli"))
    try:
        yield running.start()
    finally:
        running.close()


def vmpower(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VMPOWER, *args], capture_output=True, text=True, timeout=60)


def test_global_options_before_or_after_the_command(agent: RunningAgent) -> None:
    sock = ["--socket", str(agent.socket)]
    # The telemetry commands, which argv-picking used to hide from the global options.
    before = vmpower(*sock, "signals")
    after = vmpower("signals", *sock)
    assert before.returncode == after.returncode == 0, before.stderr
    assert before.stdout == after.stdout and "CPU_FREQUENCY_MAX_CONTROL" in before.stdout
    for words in (
        ["--json", *sock, "read", "CPU_FREQUENCY_MAX_AVAIL", "cpu", "0"],
        ["read", "--json", "CPU_FREQUENCY_MAX_AVAIL", "cpu", "0", *sock],
        ["read", "CPU_FREQUENCY_MAX_AVAIL", *sock, "cpu", "0", "--json"],
    ):
        run = vmpower(*words)
        assert run.returncode == 0, (words, run.stderr)
        assert json.loads(run.stdout) == {
            "request": ["CPU_FREQUENCY_MAX_AVAIL", "cpu", 0],
            "value": 2301000000.0,
        }
    # The shell's commands, and --config in place of --socket.
    shown = [
        vmpower("--json", *sock, "show_vm", "vm1"),
        vmpower("show_vm", "vm1", "--json", *sock),
        vmpower("show_vm", *sock, "--json", "vm1"),
        vmpower("--config", str(agent.config_path), "show_vm", "--json", "vm1"),
    ]
    assert all(run.returncode == 0 for run in shown), [run.stderr for run in shown]
    assert len({run.stdout for run in shown}) == 1
    assert json.loads(shown[0].stdout)["name"] == "vm1"
    listed = json.loads(vmpower("--json", "signals", *sock).stdout)
    assert {"name", "domain", "units", "access"} <= set(listed[0])


def test_json_errors_are_one_object_on_stdout(agent: RunningAgent, tmp_path: Path) -> None:
    sock = ["--socket", str(agent.socket)]
    cases = [
        (["show_vm", "nope", "--json", *sock], 1, "unknown VM 'nope'"),
        (["--json", *sock, "read", "NOPE", "cpu", "0"], 1, "unknown signal or control 'NOPE'"),
        (["--json", "--socket", str(tmp_path / "none.sock"), "status"], 1, "not running"),
        (["--json", "show_vm"], 2, "usage: show_vm <vm>"),
        (["frobnicate", "--json"], 2, "unknown command 'frobnicate'"),
        (["set_cpu_freq", "2", "fast", "--json", *sock], 2, "'fast' is not one of"),
    ]
    for words, status, message in cases:
        run = vmpower(*words)
        assert (run.returncode, run.stderr) == (status, ""), words
        error = json.loads(run.stdout)
        assert error["exit_status"] == status and message in error["error"], words
    # Without --json: one line on stderr, nothing on stdout.
    run = vmpower("show_vm", *sock, "nope")
    assert (run.returncode, run.stdout) == (1, "")
    assert run.stderr.startswith("vmpower: error: unknown VM 'nope'")
    assert run.stderr.count("\n") == 1


def test_version_of_the_tools() -> None:
    run = vmpower("--version")
    assert (run.returncode, run.stdout.split()[0]) == (0, "vmpower")
    guest = subprocess.run(
        [sys.executable, "-m", "vmpower.guest.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert guest.returncode == 0 and guest.stdout.startswith("vmpower-guest 0.")


def test_completion_scripts_come_from_the_parser(tmp_path: Path) -> None:
    bash = vmpower("completion", "bash")
    assert bash.returncode == 0, bash.stderr
    for word in ("show_vm", "set_cpu_freq", "signals", "restore", "--socket", "--json"):
        assert word in bash.stdout
    script = tmp_path / "vmpower.bash"
    script.write_text(bash.stdout)
    # It loads in bash and registers a completion for vmpower.
    loaded = subprocess.run(
        ["bash", "-c", f"source {script} && complete -p vmpower"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert "vmpower" in loaded.stdout
    zsh = vmpower("completion", "zsh")
    assert zsh.returncode == 0 and zsh.stdout.startswith("#compdef vmpower")
    if shutil.which("zsh"):
        (tmp_path / "_vmpower").write_text(zsh.stdout)
        checked = subprocess.run(["zsh", "-n", str(tmp_path / "_vmpower")], timeout=60)
        assert checked.returncode == 0
