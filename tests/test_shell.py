"""`vmpower`, the operator shell, against the real vmpowerd on libvirt's test driver.

The interactive shell runs on a real pseudo-terminal: the test types keys (Tab
included) and reads the screen back. One-shot commands run as a user runs them, and
their exit status, output and --json are checked.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import RunningAgent

from vmpower.shell import COMMANDS, render_table

SHELL_CMD = [sys.executable, "-m", "vmpower.shell"]
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|[\r\x07]")


class Terminal:
    """A program on a pseudo-terminal of 80 columns: type keys, read the screen."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        self.seen = ""  # everything read so far, escape sequences removed
        self._pos = 0  # how far expect() has consumed

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def expect(self, text: str, timeout_s: float = 15.0) -> str:
        """Wait until ``text`` is on screen; returns the output up to and including it."""
        deadline = time.monotonic() + timeout_s
        while text not in self.seen[self._pos :]:
            remaining = deadline - time.monotonic()
            ready = select.select([self.master], [], [], max(0.0, remaining))[0]
            if not ready:
                raise AssertionError(f"{text!r} not shown; the screen has:\n{self.seen}")
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the program exited and closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"{text!r} not shown before exit:\n{self.seen}")
            self.seen += _ANSI.sub("", chunk.decode(errors="replace"))
        end = self.seen.index(text, self._pos) + len(text)
        shown, self._pos = self.seen[self._pos : end], end
        return shown

    def wait(self, timeout_s: float = 15.0) -> int:
        return self.proc.wait(timeout_s)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    running = RunningAgent(tmp_path)
    try:
        yield running.start()
    finally:
        running.close()


@pytest.fixture(scope="module")
def shared_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    """One daemon for the tests that only read, or refuse: they leave nothing behind
    that another of them looks at."""
    running = RunningAgent(tmp_path_factory.mktemp("shared"))
    try:
        yield running.start()
    finally:
        running.close()


def user_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    # A plain terminal and no personal readline settings, so the screen is predictable;
    # the history goes to a file of the test's own.
    env.update(TERM="dumb", INPUTRC="/dev/null", VMPOWER_HISTORY=str(tmp_path / "history"))
    env.pop("VMPOWER_SOCKET", None)
    return env


def open_shell(agent: RunningAgent, tmp_path: Path) -> Terminal:
    term = Terminal([*SHELL_CMD, "--socket", str(agent.socket)], user_env(tmp_path))
    term.expect("vmpower> ")
    return term


def vmpower(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SHELL_CMD, *args], capture_output=True, text=True, timeout=30, env=env, check=False
    )


def test_interactive_shell_completes_and_runs_commands(agent: RunningAgent, tmp_path: Path) -> None:
    term = Terminal([*SHELL_CMD, "--socket", str(agent.socket)], user_env(tmp_path))
    try:
        assert "vmpowerd 0.1.0" in term.expect("vmpower> ")
        term.type("sho\t")
        term.expect("show_")  # the common part of show_vm, show_cpus, ...
        term.type("v\t")
        term.expect("vm ")  # show_vm, the only command starting so
        term.type("\t\t")  # VM names, fetched from the daemon
        listing = term.expect("vmpower> show_vm ")
        assert {"vm1", "vm2", "web.prod.1", "sleepy"} <= set(listing.split())
        term.type("web\t")
        term.expect("web.prod.1 ")  # a dotted name completes whole
        term.type("\n")
        shown = term.expect("vmpower> ")
        assert "web.prod.1: running, served, 1 vCPU," in shown
        assert re.search(r"^ +0 +5-6 +yes$", shown, re.M)

        term.type("add_channels vm1 \t\t")  # channel numbers of vm1
        listing = term.expect("vmpower> add_channels vm1 ")
        assert listing.splitlines()[-2].split() == ["0", "1", "all"]
        term.type("al\t\n")
        assert "vm1: channels 0-1 open" in term.expect("vmpower> ")

        term.type("set_cpu_freq 2 ma\t")
        term.expect("max ")
        term.type("\n")
        done = term.expect("vmpower> ")
        assert f"host CPU 2: {agent.setspeed(2)} kHz" in done
        assert agent.setspeed(2) == agent.table(2)[1]

        term.type("show_vm nope\n")
        refused = term.expect("vmpower> ")
        lines = [line for line in refused.splitlines() if line.strip()]
        assert lines == [
            "show_vm nope",
            "error: unknown VM 'nope' (list_vms shows the known ones)",
            "vmpower> ",
        ]
        term.type("set_pcpu vm1 0\n")
        assert "usage: set_pcpu <vm> <vcpu> <cpus>" in term.expect("vmpower> ")
        term.type("quit\n")
        assert term.wait() == 0
    finally:
        term.close()


def test_history_is_kept_across_sessions(agent: RunningAgent, tmp_path: Path) -> None:
    first = open_shell(agent, tmp_path)
    try:
        first.type("list_vms\n")
        first.expect("vmpower> ")
        first.type("quit\n")
        assert first.wait() == 0
    finally:
        first.close()
    second = open_shell(agent, tmp_path)
    try:
        second.type("\x1b[A")  # Up: the last command of the previous session
        second.expect("list_vms")
        second.type("\n")
        assert "NAME        STATE" in second.expect("vmpower> ")
        second.type("\x04")  # Ctrl-D leaves too
        assert second.wait() == 0
    finally:
        second.close()
    # quit is not kept: Up should bring back work, not the way out.
    assert (tmp_path / "history").read_text().splitlines() == ["list_vms", "list_vms"]


def test_one_shot_commands_change_what_the_daemon_does(agent: RunningAgent) -> None:
    sock = ["--socket", str(agent.socket)]
    run = vmpower(*sock, "set_query", "vm2", "enable")
    assert (run.returncode, run.stdout) == (0, "vm2: queries enabled\n")
    run = vmpower(*sock, "set_pcpu", "vm2", "1", "4-5")
    assert (run.returncode, run.stdout) == (0, "vm2: vCPU 1 pinned to host CPUs 4-5\n")
    run = vmpower(*sock, "set_channel_status", "vm1", "all", "disabled")
    assert (run.returncode, run.stdout) == (0, "vm1: channels 0-1 disabled\n")
    run = vmpower(*sock, "set_cpu_freq", "6", "min")
    assert (run.returncode, run.stdout) == (0, f"host CPU 6: {agent.table(6)[-1]} kHz\n")
    assert agent.setspeed(6) == agent.table(6)[-1]

    vm2 = json.loads(vmpower(*sock, "--json", "show_vm", "vm2").stdout)
    assert vm2["query"] is True and vm2["vcpus"][1]["pcpus"] == "4-5"
    shown = vmpower(*sock, "show_vm", "vm1").stdout
    assert re.search(r"^ 0  connected  no ", shown, re.M)  # channel 0 disabled

    run = vmpower(*sock, "rm_vm", "vm2")
    assert (run.returncode, run.stdout) == (0, "vm2: no longer served\n")
    vms = {v["name"] for v in json.loads(vmpower(*sock, "--json", "list_vms").stdout)}
    assert "vm2" not in vms and "vm1" in vms
    run = vmpower(*sock, "add_vm", "vm2")
    assert run.returncode == 0 and run.stdout.startswith("vm2: served; channels opened: 0")


def test_json_output_of_every_read_command_parses(shared_agent: RunningAgent) -> None:
    sock = ["--socket", str(shared_agent.socket)]
    results = {}
    for words in (
        ["status"],
        ["list_vms"],
        ["show_vm", "vm1"],
        ["show_cpus"],
        ["show_cpus", "3"],
        ["show_cpu_freq", "all"],
        ["show_cpu_freq", "2"],
        ["show_policies"],
    ):
        run = vmpower(*sock, "--json", *words)
        assert run.returncode == 0, run.stderr
        results[" ".join(words)] = json.loads(run.stdout)
    assert results["status"]["channels_connected"] == 4
    assert {v["name"] for v in results["list_vms"]} >= {"vm1", "vm2", "web.prod.1"}
    assert [v["pcpus"] for v in results["show_vm vm1"]["vcpus"]] == ["2", "3"]
    assert [r["cpu"] for r in results["show_cpus"]] == list(range(8))
    assert results["show_cpus 3"][0]["vms"] == ["vm1", "vm2"]
    assert len(results["show_cpu_freq all"]) == 8
    assert results["show_cpu_freq 2"][0]["cpu"] == 2
    assert results["show_policies"] == []
    # --json may follow the command, as users type it.
    assert json.loads(vmpower(*sock, "list_vms", "--json").stdout) == results["list_vms"]


@pytest.mark.parametrize(
    ("words", "status", "message"),
    [
        (["show_vm", "nope"], 1, "error: unknown VM 'nope'"),
        (["set_cpu_freq", "99", "max"], 1, "error: host CPU 99 out of range (0-7)"),
        (["show_cpu_freq", "42"], 1, "error: host CPU 42 out of range"),
        (["add_channels", "vm1", "5"], 1, "error: vm1 has no channel 5"),
        (["set_pcpu", "vm1", "7", "2"], 1, "error: vCPU must be 0-1 for vm1"),
        (["set_pcpu", "vm1", "0", "12"], 1, "error: host CPU 12 out of range"),
        (["add_channels", "off", "all"], 1, "error: off is not running"),
        (["show_vm"], 2, "usage: show_vm <vm>"),
        (["set_cpu_freq", "2", "fast"], 2, "'fast' is not one of up, down, min, max"),
        (["set_pcpu", "vm1", "0", "2-x"], 2, "bad host CPU list '2-x'"),
        (["set_query", "vm1", "yes"], 2, "say enable or disable"),
        (["set_channel_status", "vm1", "0", "off"], 2, "status must be enabled or disabled"),
        (["frobnicate"], 2, "unknown command 'frobnicate'"),
    ],
)
def test_refusals_are_one_clear_line(
    shared_agent: RunningAgent, words: list[str], status: int, message: str
) -> None:
    run = vmpower("--socket", str(shared_agent.socket), *words)
    assert run.returncode == status
    assert run.stdout == ""
    assert len(run.stderr.splitlines()) == 1
    assert run.stderr.startswith("vmpower: ") and message in run.stderr


def test_daemon_not_running_says_how_to_start_it(tmp_path: Path) -> None:
    env = user_env(tmp_path)
    missing = tmp_path / "nothing.sock"
    run = vmpower("--socket", str(missing), "status", env=env)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.splitlines() == [
        f"vmpower: error: vmpowerd is not running (no control socket at {missing}); start it"
        " with `systemctl start vmpowerd` or `vmpowerd --config FILE`"
    ]
    # The interactive shell says so at once, and still starts.
    term = Terminal([*SHELL_CMD, "--socket", str(missing)], env)
    try:
        assert "vmpowerd is not running" in term.expect("vmpower> ")
        term.type("list_vms\n")
        assert "error: vmpowerd is not running" in term.expect("vmpower> ")
        term.type("quit\n")
        assert term.wait() == 0
    finally:
        term.close()


def test_socket_comes_from_config_then_environment(
    shared_agent: RunningAgent, tmp_path: Path
) -> None:
    env = user_env(tmp_path)
    run = vmpower("--config", str(shared_agent.config_path), "status", env=env)
    assert run.returncode == 0 and run.stdout.startswith("vmpowerd 0.1.0")
    env["VMPOWER_SOCKET"] = str(shared_agent.socket)
    assert vmpower("list_vms", env=env).returncode == 0
    # An explicit --socket wins over the environment.
    run = vmpower("--socket", str(tmp_path / "other.sock"), "list_vms", env=env)
    assert run.returncode == 1 and "no control socket at" in run.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[control]\nsocket = 3\n")
    run = vmpower("--config", str(bad), "status", env=env)
    assert run.returncode == 2 and len(run.stderr.splitlines()) == 1
    assert str(bad) in run.stderr


def test_tables_fit_80_columns(shared_agent: RunningAgent) -> None:
    sock = ["--socket", str(shared_agent.socket)]
    vmpower(*sock, "set_cpu_freq", "3", "max")
    for words in (
        ["status"],
        ["list_vms"],
        ["show_vm", "web.prod.1"],
        ["show_cpus"],
        ["show_cpu_freq", "all"],
        ["help"],
        ["--help"],
    ):
        run = vmpower(*sock, *words)
        assert run.returncode == 0, run.stderr
        # show_cpus has nine columns (WISHERS among them): it is allowed 100.
        width = 100 if words == ["show_cpus"] else 80
        too_wide = [line for line in run.stdout.splitlines() if len(line) > width]
        assert too_wide == [], words
    cpus = vmpower(*sock, "show_cpus").stdout.splitlines()
    header = cpus[0]
    # Numbers are right-aligned under their header; CPU 3's row shows the change and
    # what the agent will restore.
    end = header.index("WANT kHz") + len("WANT kHz")
    row3 = cpus[4]
    assert row3[:end].endswith(str(shared_agent.setspeed(3)))
    assert row3.split()[-3:-1] == ["schedutil", "vm1,vm2"]
    # The channel path of a long tmp directory is cut at its start, keeping the name.
    shown = vmpower(*sock, "show_vm", "web.prod.1").stdout
    assert shown.splitlines()[-1].endswith("/channels/web.prod.1.0")


def test_help_explains_every_command() -> None:
    run = vmpower("--help")
    assert run.returncode == 0
    for name in [*COMMANDS, "signals", "read", "write", "session", "restore", "completion"]:
        assert name in run.stdout
    # A testing command: out of the operator's main help, in its own group.
    assert "simulate-sysfs" not in run.stdout
    testing = vmpower("help", "testing")
    assert testing.returncode == 0 and "simulate-sysfs DIR --driver NAME" in testing.stdout
    one = vmpower("help", "set_channel_status")
    assert one.returncode == 0
    assert one.stdout.startswith("usage: set_channel_status <vm> <list>|all enabled|disabled")
    assert "still read" in one.stdout


def test_simulate_sysfs_is_handed_on(tmp_path: Path) -> None:
    run = vmpower(
        "simulate-sysfs", str(tmp_path / "sys"), "--driver", "acpi-cpufreq", "--cpus", "2"
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "sys/devices/system/cpu/cpu1/cpufreq/scaling_governor").exists()
    helped = vmpower("simulate-sysfs", "--help")  # its own parser's help, not vmpower's
    assert helped.returncode == 0 and "--driver" in helped.stdout


def test_render_table_cuts_the_widest_column_to_fit() -> None:
    rows = [(1, "short", "x" * 100), (22, "a bit longer", "/very/long/path/" * 8 + "end")]
    text = render_table(("N", "NAME", "WHAT"), rows, right=(0,), width=60)
    lines = text.splitlines()
    assert all(len(line) <= 60 for line in lines)
    assert lines[1].startswith(" 1  short ") and lines[1].endswith("…")
    assert "…" in lines[2] and lines[2].endswith("/path/end")  # a path keeps its end
