"""Running the real vmpowerd for integration tests.

``RunningAgent`` renders tests/data/node.xml with a private channel directory, builds
a simulated cpufreq tree, binds the VMs' channel sockets as QEMU would, starts
``vmpowerd`` as a subprocess and accepts its connections. Tests then speak the
binary protocol through ``agent.hosts[...]`` and the admin API through
``agent.control(...)``. ``stop()`` sends SIGTERM and returns the exit code.

``AgentThread`` runs the real Agent and its monitor loop in a thread of the test process
instead: libvirt's test driver keeps its state per connection, so lifecycle changes must
go through the agent's own connection (``AgentThread.domain``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import libvirt
import pytest

from vmpower import control, protocol
from vmpower.config import config_from_dict
from vmpower.cpufreq.simulate import build_tree
from vmpower.daemon import Agent
from vmpower.devtools import ChannelHost, make_request, wait_for
from vmpower.hypervisor.session import LibvirtSession
from vmpower.protocol import Command, Unit

REPO = Path(__file__).resolve().parents[1]
NODE_XML = REPO / "tests" / "data" / "node.xml"
# Channels of the running VMs in tests/data/node.xml (sleepy is paused: QEMU keeps its
# socket, but the agent serves running VMs only).
DEFAULT_CHANNELS = ("vm1.0", "vm1.1", "vm2.0", "web.prod.1.0")


def render_node(tmp_path: Path, channels_dir: Path, source: Path = NODE_XML) -> Path:
    text = source.read_text().replace("/tmp/powermonitor/", f"{channels_dir}/")
    path = tmp_path / "node.xml"
    path.write_text(text)
    return path


class RunningAgent:
    def __init__(
        self,
        tmp_path: Path,
        *,
        driver: str = "acpi-cpufreq",
        turbo: bool = True,
        offline: frozenset[int] = frozenset(),
        settings: dict[str, dict[str, Any]] | None = None,
        channels: tuple[str, ...] = DEFAULT_CHANNELS,
    ) -> None:
        self.tmp_path = tmp_path
        self.channels_dir = tmp_path / "channels"
        self.channels_dir.mkdir()
        self.sysfs_root = tmp_path / "sysfs"
        build_tree(self.sysfs_root, driver, 8, turbo=turbo, offline=offline)
        self.node = render_node(tmp_path, self.channels_dir)
        self.state_dir = tmp_path / "state"
        self.socket = tmp_path / "control.sock"
        self.config_path = tmp_path / "vmpowerd.toml"
        sections: dict[str, dict[str, Any]] = {
            "libvirt": {"uri": f"test://{self.node}"},
            "channels": {"dir": str(self.channels_dir)},
            "cpufreq": {"sysfs_root": str(self.sysfs_root)},
            "state": {"dir": str(self.state_dir)},
            "control": {"socket": str(self.socket)},
            "log": {"level": "debug"},
        }
        for section, values in (settings or {}).items():
            sections.setdefault(section, {}).update(values)
        self.config_path.write_text(to_toml(sections))
        self.hosts = {name: ChannelHost(self.channels_dir / name) for name in channels}
        self.log_path = tmp_path / "vmpowerd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def originals(self) -> dict[str, str]:
        """Every file of the simulated tree and its content (to compare after restore)."""
        result = {}
        for path in sorted(self.sysfs_root.rglob("*")):
            if path.is_file():
                result[str(path.relative_to(self.sysfs_root))] = path.read_text()
        return result

    def start(self, accept: bool = True, env: dict[str, str] | None = None) -> RunningAgent:
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmpower.daemon", "--config", str(self.config_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env} if env else None,
            )
        proc = self.proc
        ok = wait_for(lambda: self.socket.exists() or proc.poll() is not None, 30)
        if not ok or proc.poll() is not None:
            raise RuntimeError(f"vmpowerd did not start:\n{self.log()}")
        if accept:
            for host in self.hosts.values():
                host.accept()
        return self

    def control(self, cmd: str, **args: Any) -> Any:
        return control.request(self.socket, cmd, **args)

    def read(self, cpu: int, name: str) -> str:
        return read_attr(self.sysfs_root / f"devices/system/cpu/cpu{cpu}/cpufreq/{name}")

    def setspeed(self, cpu: int) -> int:
        return int(self.read(cpu, "scaling_setspeed"))

    def table(self, cpu: int) -> list[int]:
        return [int(x) for x in self.read(cpu, "scaling_available_frequencies").split()]

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        assert self.proc is not None
        return stop_daemon(self.proc, sig, timeout_s)

    def close(self) -> None:
        kill_daemon(self.proc)
        for host in self.hosts.values():
            host.close()


class AgentThread:
    """The real Agent and monitor loop in a thread of this process; ``libvirt`` holds
    settings of the [libvirt] section besides its uri."""

    def __init__(self, tmp_path: Path, **libvirt: object) -> None:
        channels_dir = tmp_path / "channels"
        channels_dir.mkdir()
        self.sysfs_root = tmp_path / "sysfs"
        build_tree(self.sysfs_root, "acpi-cpufreq", 8, turbo=True)
        node = render_node(tmp_path, channels_dir)
        self.hosts = {n: ChannelHost(channels_dir / n) for n in DEFAULT_CHANNELS}
        config = config_from_dict(
            {
                "libvirt": {"uri": f"test://{node}", **libvirt},
                "channels": {"dir": str(channels_dir)},
                "cpufreq": {"sysfs_root": str(self.sysfs_root)},
                "state": {"dir": str(tmp_path / "state")},
                "control": {"socket": str(tmp_path / "control.sock")},
            }
        )
        self.agent = Agent(config)
        self.agent.start()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        for host in self.hosts.values():
            host.accept()

    def _run(self) -> None:
        try:
            self.agent.run()
        finally:
            self.agent.shutdown()

    def read(self, cpu: int, name: str) -> str:
        return read_attr(self.sysfs_root / f"devices/system/cpu/cpu{cpu}/cpufreq/{name}")

    def table(self, cpu: int) -> list[int]:
        return [int(x) for x in self.read(cpu, "scaling_available_frequencies").split()]

    def power(self, channel: str, unit: Unit, resource_id: int) -> int:
        reply = self.hosts[channel].request(make_request(Command.CPU_POWER, unit, resource_id))
        return protocol.peek_header(reply)[2]

    def domain(self, name: str):  # type: ignore[no-untyped-def]
        conn = self.agent.parts.hypervisor.conn
        assert conn is not None
        return conn.lookupByName(name)

    def stop(self) -> None:
        self.agent.request_stop()
        self.thread.join(30)
        for host in self.hosts.values():
            host.close()


def stop_daemon(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = 30
) -> int:
    """Signal vmpowerd (SIGTERM: it restores what it changed) and return its exit status;
    killed if it does not exit within ``timeout_s`` (then TimeoutExpired is raised)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        kill_daemon(proc)
        raise


def kill_daemon(proc: subprocess.Popen[bytes] | None) -> None:
    """Make sure no daemon outlives its test."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def read_attr(path: Path) -> str:
    """A simulated sysfs attribute's value, as a reader in another process sees it.

    A simulated attribute is a regular file the agent rewrites (truncate, write): a read
    racing that write can see it empty, which real sysfs never shows, so retry briefly.
    """
    text = ""
    for _ in range(100):
        text = path.read_text().strip()
        if text:
            return text
        time.sleep(0.001)
    return text


def to_toml(sections: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, int | float):
                text = repr(value)
            else:
                text = '"' + str(value).replace('"', '\\"') + '"'
            lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class LibvirtCalls:
    """Spies on the libvirt calls that are round trips to libvirtd (each still made):
    ``counts`` per call, ``names(call)`` the VMs a domain call was made for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: dict[str, int] = {}
        self.domains: list[tuple[str, str]] = []
        for cls, name in (
            (libvirt.virDomain, "vcpuPinInfo"),
            (libvirt.virDomain, "info"),
            (libvirt.virDomain, "XMLDesc"),
            (libvirt.virConnect, "getCPUMap"),
        ):
            monkeypatch.setattr(cls, name, self._counting(name, getattr(cls, name)))

    def names(self, call: str) -> list[str]:
        return [vm for made, vm in self.domains if made == call]

    def _counting(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(target: Any, *args: Any, **kwargs: Any) -> Any:
            self.counts[name] = self.counts.get(name, 0) + 1
            if isinstance(target, libvirt.virDomain):
                self.domains.append((name, target.name()))
            return real(target, *args, **kwargs)

        return call


def session_calls(
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    into: list[list[str]] | None = None,
    tag: str | None = None,
) -> list[list[str]]:
    """Spies on a ``LibvirtSession`` method whose first argument is VM names (a worker
    job's, still made): the list each call's names are appended to. ``into``: a list
    shared with another method's calls; ``tag``: a first item telling them apart
    (``["read", "vm2"]``). ``LibvirtCalls`` counts the bindings' calls under them."""
    calls: list[list[str]] = [] if into is None else into
    real = getattr(LibvirtSession, method)

    def recorded(self: LibvirtSession, names: Iterable[str], *args: Any) -> Any:
        names = list(names)
        calls.append([tag, *names] if tag else names)
        return real(self, names, *args)

    monkeypatch.setattr(LibvirtSession, method, recorded)
    return calls
