"""`vmpower signals | read | write | session` against the real daemon."""

from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import RunningAgent, to_toml

from vmpower import shell
from vmpower.telemetry.catalog import CATALOG
from vmpower.telemetry.cli import main

VMPOWER = [sys.executable, "-m", "vmpower.shell"]
MAX_FILE = "devices/system/cpu/cpu{}/cpufreq/scaling_max_freq"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    running = RunningAgent(tmp_path_factory.mktemp("cli"))
    try:
        running.start()
        yield running
        assert running.stop() == 0
    finally:
        running.close()


def run(argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_signals_lists_the_catalogue_with_access(agent: RunningAgent) -> None:
    code, out, err = run(["signals", "--socket", str(agent.socket)])
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["NAME", "DOMAIN", "UNITS", "ACCESS", "DESCRIPTION"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == set(CATALOG)
    assert rows["CPU_FREQUENCY_MAX_CONTROL"][1:4] == ["cpu", "Hz", "rw"]  # root: read/write
    assert rows["CPU_ENERGY"][1:4] == ["package", "J", "r"]


def test_read_prints_one_value(agent: RunningAgent) -> None:
    code, out, err = run(
        ["--socket", str(agent.socket), "read", "CPU_FREQUENCY_MAX_AVAIL", "cpu", "0"]
    )
    assert (code, out, err) == (0, "2301000000\n", "")


def test_read_through_the_shell_with_the_socket_from_the_environment(
    agent: RunningAgent, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VMPOWER_SOCKET", str(agent.socket))
    assert shell.main(["read", "CPU_FREQUENCY_MIN_AVAIL", "package", "0"]) == 0
    assert capsys.readouterr().out == "1200000000\n"


def test_socket_from_the_config_file(agent: RunningAgent, tmp_path: Path) -> None:
    config = tmp_path / "vmpowerd.toml"
    config.write_text(to_toml({"control": {"socket": str(agent.socket)}}))
    code, out, _ = run(["read", "TIME", "board", "0", "--config", str(config)])
    assert code == 0 and float(out) >= 0


def test_errors_are_one_line_with_exit_codes(agent: RunningAgent, tmp_path: Path) -> None:
    sock = ["--socket", str(agent.socket)]
    code, out, err = run(["read", "NOPE", "cpu", "0", *sock])
    assert (code, out) == (1, "")
    assert err.startswith("vmpower: unknown signal or control 'NOPE'") and err.count("\n") == 1
    code, _, err = run(["read", "TIME", "board", "x", *sock])
    assert code == 2 and "index must be an integer" in err
    code, _, err = run(["read", "TIME", "board", "0", "--socket", str(tmp_path / "none.sock")])
    assert code == 1 and "vmpowerd is not running" in err
    code, _, _ = run(["read", "TIME", "galaxy", "0", *sock])
    assert code == 2  # argparse: not a domain


def test_write_holds_until_sigterm_then_restores(agent: RunningAgent) -> None:
    limit = agent.sysfs_root / MAX_FILE.format(4)
    original = limit.read_text()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vmpower.telemetry.cli",
            "write",
            "CPU_FREQUENCY_MAX_CONTROL",
            "cpu",
            "4",
            "1.9e9",
            "--socket",
            str(agent.socket),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # The value is held once the command says so (the file changes a little before:
        # the daemon writes it, then the answer travels back).
        assert proc.stderr is not None
        assert select.select([proc.stderr], [], [], 30)[0], "no word from vmpower write"
        held = proc.stderr.readline()
        assert b"held until interrupted" in held
        assert limit.read_text().strip() == "1900000"
        assert proc.poll() is None  # still holding it
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert limit.read_text() == original


class _TermOnHeld(io.StringIO):
    """stderr that sends this process SIGTERM as the "held" line is written: the signal
    lands before the hold's wait, where nothing used to catch it."""

    def write(self, text: str) -> int:
        written = super().write(text)
        if "held until interrupted" in text:
            os.kill(os.getpid(), signal.SIGTERM)
        return written


def test_write_interrupted_before_its_hold_still_restores_and_exits_0(
    agent: RunningAgent,
) -> None:
    limit = agent.sysfs_root / MAX_FILE.format(3)
    original = limit.read_text()
    handler_before = signal.getsignal(signal.SIGTERM)
    err = _TermOnHeld()
    code = main(
        ["write", "CPU_FREQUENCY_MAX_CONTROL", "cpu", "3", "1.8e9", "--socket", str(agent.socket)],
        stdin=io.StringIO(),
        stdout=io.StringIO(),
        stderr=err,
    )
    assert code == 0, err.getvalue()
    assert "held until interrupted" in err.getvalue()
    assert limit.read_text() == original
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the handler is put back


def test_write_with_a_hold_time(agent: RunningAgent) -> None:
    limit = agent.sysfs_root / MAX_FILE.format(5)
    original = limit.read_text()
    code, _, err = run(
        [
            "write",
            "CPU_FREQUENCY_MAX_CONTROL",
            "cpu",
            "5",
            "2000000000",
            "--hold-s",
            "0",
            "--socket",
            str(agent.socket),
        ]
    )
    assert code == 0 and "held for 0 s, then restored" in err
    assert limit.read_text() == original
    code, _, err = run(
        [
            "write",
            "CPU_FREQUENCY_MAX_CONTROL",
            "cpu",
            "5",
            "9e9",
            "--hold-s",
            "0",
            "--socket",
            str(agent.socket),
        ]
    )
    assert code == 1 and "9000000000 Hz is outside cpu 5's" in err


def test_session_csv_rows_on_a_grid(agent: RunningAgent) -> None:
    requests = "# what to sample\nTIME board 0\n\nCPU_FREQUENCY_MAX_AVAIL cpu 1  # static\n"
    code, out, err = run(
        ["session", "-t", "0.3", "-p", "0.1", "--socket", str(agent.socket)], stdin=requests
    )
    assert (code, err) == (0, "")
    header, *rows = out.splitlines()
    assert header == "TIME@board-0,CPU_FREQUENCY_MAX_AVAIL@cpu-1"
    assert len(rows) == 3
    times = [float(r.split(",")[0]) for r in rows]
    assert times == sorted(times)
    assert all(r.split(",")[1] == "2301000000" for r in rows)


def test_session_ctrl_c_stops_it_quietly_with_status_130(agent: RunningAgent) -> None:
    proc = subprocess.Popen(
        [*VMPOWER, "session", "-t", "60", "-p", "0.05", "--socket", str(agent.socket)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("TIME board 0\n")
        proc.stdin.close()
        assert proc.stdout.readline() == "TIME@board-0\n"
        assert proc.stdout.readline()  # a first row: the session is sampling
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)  # a stop settles an interrupted read first: 2 waits at most
        assert proc.stderr is not None
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    assert proc.returncode == 130, err
    assert err == ""  # no traceback: Ctrl-C is how a long session is ended early


def test_session_json_and_one_row_for_time_zero(agent: RunningAgent) -> None:
    code, out, _ = run(
        ["session", "-t", "0", "-p", "1", "--format", "json", "--socket", str(agent.socket)],
        stdin="CPU_FREQUENCY_MIN_AVAIL cpu 0\nVM_VCPU_TIME vm vm1\n",
    )
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 1
    assert rows[0]["CPU_FREQUENCY_MIN_AVAIL@cpu-0"] == 1.2e9
    assert rows[0]["VM_VCPU_TIME@vm-vm1"] > 0


def test_session_input_errors(agent: RunningAgent) -> None:
    sock = ["--socket", str(agent.socket)]
    code, _, err = run(["session", "-t", "1", "-p", "0.5", *sock], stdin="TIME board\n")
    assert code == 2 and "stdin line 1: expected NAME DOMAIN INDEX" in err
    code, _, err = run(["session", "-t", "1", "-p", "0.5", *sock], stdin="# nothing\n")
    assert code == 2 and "no requests on stdin" in err
    code, _, err = run(["session", "-t", "1", "-p", "0", *sock], stdin="TIME board 0\n")
    assert code == 2 and "-p must be > 0" in err
