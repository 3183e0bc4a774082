"""`vmpowerd --check-config` reports every problem; the default config path; levels."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from agent_support import RunningAgent, kill_daemon

from vmpower.devtools import wait_for

DAEMON = [sys.executable, "-m", "vmpower.daemon"]


def vmpowerd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DAEMON, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def test_check_config_reports_every_problem(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    loose.chmod(0o777)  # writable by anyone: not a channel directory to trust
    config = tmp_path / "vmpowerd.toml"
    config.write_text(
        "[libvirt]\nreconnect_min_s = 9.0\nreconnect_max_s = 1.0\nbogus = 1\n"
        f'[channels]\ndir = "{loose}"\nburst = "many"\n'
        '[control]\nmode = 0o17777\ngroup = "no-such-group-vmpower"\n'
        '[policies]\ntimezone = "Mars/Olympus_Mons"\n'
        '[log]\nlevel = "INFO"\n'
    )
    run = vmpowerd("--check-config", str(config))
    assert run.returncode == 2 and run.stdout == ""
    lines = run.stderr.splitlines()
    for key in (
        "libvirt.bogus: unknown key",
        "channels.burst: must be an integer",
        "libvirt.reconnect_min_s: 9 is above libvirt.reconnect_max_s 1",
        "control.mode: 0o17777 is not a file mode",
        "control.group: no group named 'no-such-group-vmpower'",
        "policies.timezone: unknown time zone 'Mars/Olympus_Mons'",
        f"channels.dir: {loose}",
    ):
        assert any(f"{config}: {key}" in line for line in lines), (key, lines)
    assert lines[-1] == "vmpowerd: 7 problems"


def test_log_levels_in_any_case(tmp_path: Path) -> None:
    config = tmp_path / "vmpowerd.toml"
    config.write_text('[log]\nlevel = "Debug"\n')
    run = vmpowerd("--check-config", str(config))
    assert run.returncode == 0, run.stderr
    assert 'level = "debug"' in run.stdout
    assert vmpowerd("--log-level", "WARNING", "--version").returncode == 0


def test_without_config_the_default_file_is_read(tmp_path: Path) -> None:
    agent = RunningAgent(tmp_path)
    env = {**os.environ, "VMPOWER_CONFIG": str(agent.config_path)}
    # --check-config without FILE checks the default file.
    run = vmpowerd("--check-config", env=env)
    assert run.returncode == 0 and f'socket = "{agent.socket}"' in run.stdout
    proc = subprocess.Popen(
        DAEMON, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        assert wait_for(lambda: agent.socket.exists() or proc.poll() is not None, 30)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        kill_daemon(proc)  # type: ignore[arg-type]
        agent.close()


def test_help_lists_signals_exit_codes_and_the_default_path() -> None:
    run = vmpowerd("--help")
    assert run.returncode == 0
    for text in ("SIGHUP", "SIGTERM", "exit status", "2  bad configuration", "/etc/vmpower/"):
        assert text in run.stdout
