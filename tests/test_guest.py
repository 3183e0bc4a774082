"""`vmpower-guest` against the real vmpowerd, with the test playing QEMU.

QEMU's part: the test binds a VM's channel socket (the agent connects to it) and
bridges it to a pseudo-terminal in raw mode, whose other end the guest tool opens as
its port: one open, a byte stream, no message boundaries, as a virtio port behaves.
The bridge can hold the host's replies back, to make a reply arrive late.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import RunningAgent

from vmpower.devtools import PtyChannelHost, wait_for
from vmpower.guest.ports import PortInfo, discover, port_for_vcpu, port_from_arg
from vmpower.guest.requests import OptionError, PolicyOptions, parse_hours, policy_request
from vmpower.protocol import FREQ_LIST_SIZE, PACKET_SIZE, PolicyType, decode_packet

GUEST = Path(sys.executable).with_name("vmpower-guest")
GUEST_CMD = [str(GUEST)] if GUEST.exists() else [sys.executable, "-m", "vmpower.guest.cli"]
SHELL_CMD = [sys.executable, "-m", "vmpower.shell"]


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    # vm1's channels are played by PtyChannelHost, not by RunningAgent's hosts.
    running = RunningAgent(tmp_path, channels=("vm2.0", "web.prod.1.0"))
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def ports(agent: RunningAgent) -> Iterator[dict[str, PtyChannelHost]]:
    made = {name: PtyChannelHost(agent.channels_dir / name) for name in ("vm1.0", "vm1.1")}
    try:
        agent.start()
        for port in made.values():
            port.accept()
        yield made
    finally:
        for port in made.values():
            port.close()


def guest(*args: str) -> subprocess.CompletedProcess[str]:
    # A reply timeout for a loaded 2-core machine; a test's own --timeout comes later
    # and wins.
    return subprocess.run(
        [*GUEST_CMD, "--timeout", "10", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def shell(agent: RunningAgent, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SHELL_CMD, "--socket", str(agent.socket), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_set_cpu_freq_moves_the_vcpus_own_host_cpu(
    agent: RunningAgent, ports: dict[str, PtyChannelHost]
) -> None:
    dev = ports["vm1.0"].device
    table = agent.table(2)  # vm1 vCPU0 → host CPU 2, vCPU1 → host CPU 3; table[0] is turbo
    run = guest("--device", dev, "set_cpu_freq", "0", "max")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "vCPU 0 max: ACK"
    assert agent.setspeed(2) == table[1]
    assert guest("--device", dev, "set_cpu_freq", "0", "enable_turbo").returncode == 0
    assert agent.setspeed(2) == table[0]
    # vCPU 1 has a port of its own in the VM, but only port 0 was named: it carries it.
    assert guest("--device", dev, "set_cpu_freq", "1", "min").returncode == 0
    assert agent.setspeed(3) == agent.table(3)[-1]
    assert agent.read(4, "scaling_governor") != "userspace"


def test_other_vcpus_and_other_vms_are_refused(
    agent: RunningAgent, ports: dict[str, PtyChannelHost]
) -> None:
    dev = ports["vm1.0"].device
    run = guest("--device", dev, "set_cpu_freq", "5", "max")  # vm1 has vCPUs 0 and 1
    assert run.returncode == 1
    assert "NACK" in run.stdout
    run = guest("--device", dev, "--vm-name", "vm2", "set_cpu_freq", "0", "max")
    assert run.returncode == 1 and "NACK" in run.stdout
    assert all(agent.read(cpu, "scaling_governor") != "userspace" for cpu in range(8))
    # Its own name is fine.
    assert guest("--device", dev, "--vm-name", "vm1", "set_cpu_freq", "0", "min").returncode == 0


def test_queries_read_frequencies_and_caps_once_allowed(
    agent: RunningAgent, ports: dict[str, PtyChannelHost]
) -> None:
    dev = ports["vm1.0"].device
    refused = guest("--device", dev, "query_cpu_freq", "all")
    assert refused.returncode == 1 and "set_query" in refused.stdout
    assert shell(agent, "set_query", "vm1", "enable").returncode == 0
    assert guest("--device", dev, "set_cpu_freq", "1", "min").returncode == 0
    run = guest("--device", dev, "query_cpu_freq", "all")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 2
    assert lines[1] == f"vCPU 1: {agent.table(3)[-1]} kHz"
    assert int(lines[0].split()[2]) in agent.table(2)
    one = guest("--device", dev, "query_cpu_freq", "1")
    assert one.stdout.splitlines() == [f"vCPU 1: {agent.table(3)[-1]} kHz"]
    caps = guest("--device", dev, "query_cpu_caps", "all")
    assert caps.returncode == 0
    assert caps.stdout.splitlines() == [
        "vCPU 0: turbo yes, priority core no",
        "vCPU 1: turbo yes, priority core no",
    ]
    beyond = guest("--device", dev, "query_cpu_freq", "5")  # vm1 has no vCPU 5
    assert beyond.returncode == 1 and "NACK" in beyond.stdout


def test_policy_is_installed_and_removed(
    agent: RunningAgent, ports: dict[str, PtyChannelHost]
) -> None:
    dev = ports["vm1.0"].device
    incomplete = guest("--device", dev, "--vcpu-list", "0-1", "send_policy", "now")
    assert incomplete.returncode == 2 and "--policy" in incomplete.stderr
    assert ports["vm1.0"].guest_bytes == 0  # nothing half-made was sent
    run = guest(
        "--device",
        dev,
        "--policy",
        "WORKLOAD",
        "--workload",
        "HIGH",
        "--vcpu-list",
        "0-1",
        "send_policy",
        "now",
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "WORKLOAD policy on vCPUs 0,1: ACK"
    shown = json.loads(shell(agent, "--json", "show_policies").stdout)
    assert [(p["owner"], p["type"], p["cpus"]) for p in shown] == [("vm1", "WORKLOAD", "2-3")]
    assert guest("--device", dev, "remove_policy").returncode == 0
    assert json.loads(shell(agent, "--json", "show_policies").stdout) == []
    again = guest("--device", dev, "remove_policy")  # nothing left to remove
    assert again.returncode == 1 and "NACK" in again.stdout


def test_late_reply_is_not_taken_for_the_next_commands_reply(
    agent: RunningAgent, ports: dict[str, PtyChannelHost]
) -> None:
    port = ports["vm1.0"]
    dev = port.device
    # The ACK of "vCPU 0 max" arrives after its command gave up; the next command (a
    # vCPU vm1 does not have) must report its own NACK, not that ACK.
    port.hold()
    late = guest("--device", dev, "--timeout", "0.5", "set_cpu_freq", "0", "max")
    assert late.returncode == 1 and "no reply" in late.stderr
    assert wait_for(lambda: port.held() == PACKET_SIZE)
    port.release()
    after = guest("--device", dev, "set_cpu_freq", "5", "max")
    assert (after.returncode, after.stdout.strip()) == (
        1,
        "vCPU 5 max: NACK (refused by the host; its log says why)",
    )
    # Worse: the late ACK arrives after the next request was sent, just before its NACK.
    port.hold()
    late = guest("--device", dev, "--timeout", "0.5", "set_cpu_freq", "0", "min")
    assert late.returncode == 1
    nxt = subprocess.Popen(
        [*GUEST_CMD, "--device", dev, "--timeout", "10", "set_cpu_freq", "7", "max"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: port.held() == 2 * PACKET_SIZE)
        port.release()
        out, _err = nxt.communicate(timeout=30)
    finally:
        nxt.kill()
    assert nxt.returncode == 1 and "vCPU 7 max: NACK" in out


def test_late_reply_in_one_session_is_skipped(
    agent: RunningAgent, ports: dict[str, PtyChannelHost]
) -> None:
    port = ports["vm1.0"]
    proc = subprocess.Popen(
        # The timeout bounds the second query too, whose held replies this test releases
        # (through the daemon and the pty pump): 3 s leaves a loaded machine room.
        [*GUEST_CMD, "--device", port.device, "--timeout", "3"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        # A query while queries are off: its NACK is held back until after the retry.
        port.hold()
        proc.stdin.write("query_cpu_freq all\n")
        proc.stdin.flush()
        assert "no reply" in proc.stdout.readline()
        assert shell(agent, "set_query", "vm1", "enable").returncode == 0
        proc.stdin.write("query_cpu_freq all\n")
        proc.stdin.flush()
        assert wait_for(lambda: port.held() == 2 * FREQ_LIST_SIZE)
        port.release()
        # The late NACK looks like any reply to a query: only the session's count of
        # what it is still owed tells it apart.
        first = proc.stdout.readline()
        assert first.startswith("vCPU 0: ") and first.strip().endswith(" kHz")
        assert proc.stdout.readline().startswith("vCPU 1: ")
        proc.stdin.write("set_cpu_freq 0 min\nquit\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "vCPU 0 min: ACK"
        assert proc.wait(30) == 1  # piped commands: one went unanswered, the script sees it
    finally:
        proc.kill()
        proc.wait()
    assert agent.setspeed(2) == agent.table(2)[-1]


def test_ports_are_discovered_and_port_n_serves_vcpu_n(
    agent: RunningAgent, ports: dict[str, PtyChannelHost], tmp_path: Path
) -> None:
    sysfs, dev = tmp_path / "guest-sys", tmp_path / "guest-dev"
    vports = sysfs / "class" / "virtio-ports"
    for vport, name in (
        ("vport0p1", "org.qemu.guest_agent.0"),
        ("vport0p2", "virtio.serial.port.poweragent.1"),
        ("vport0p3", "virtio.serial.port.poweragent.0"),
    ):
        (vports / vport).mkdir(parents=True)
        (vports / vport / "name").write_text(name + "\n")
        (vports / vport / "uevent").write_text(f"MAJOR=245\nMINOR=2\nDEVNAME={vport}\n")
    (dev / "virtio-ports").mkdir(parents=True)
    # udev's link for port 0; port 1 only has its kernel node name.
    (dev / "virtio-ports" / "virtio.serial.port.poweragent.0").symlink_to(ports["vm1.0"].device)
    (dev / "vport0p2").symlink_to(ports["vm1.1"].device)
    where = ["--sysfs-root", str(sysfs), "--dev-root", str(dev)]

    shown = guest(*where, "show_ports")
    assert shown.returncode == 0
    assert [line.split()[:2] for line in shown.stdout.splitlines()] == [
        ["0", str(dev / "virtio-ports" / "virtio.serial.port.poweragent.0")],
        ["1", str(dev / "vport0p2")],
    ]

    def requests_per_channel() -> list[int]:
        return [c["requests"] for c in agent.control("show_vm", vm="vm1")["channels"]]

    assert guest(*where, "set_cpu_freq", "1", "min").returncode == 0
    assert requests_per_channel() == [0, 1]  # vCPU 1's request went through port 1
    assert agent.setspeed(3) == agent.table(3)[-1]
    run = guest(
        *where, "--policy", "TIME", "--busy-hours", "9-17", "--vcpu-list", "1", "send_policy", "now"
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert requests_per_channel() == [1, 1]  # a policy goes through the first port
    assert agent.control("show_policies")[0]["type"] == "TIME"

    none = guest("--sysfs-root", str(tmp_path / "empty"), "set_cpu_freq", "0", "max")
    assert none.returncode == 1
    assert "no power port found" in none.stderr and "--device" in none.stderr


def test_silent_host_is_a_timeout_not_a_hang(tmp_path: Path) -> None:
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        run = guest("--device", os.ttyname(slave), "--timeout", "0.3", "query_cpu_caps", "0")
        assert run.returncode == 1
        assert run.stderr.strip() == (
            f"vmpower-guest: no reply from the host within 0.3 s on {os.ttyname(slave)}"
        )
        sent = b""
        while len(sent) < PACKET_SIZE and select.select([master], [], [], 5)[0]:
            sent += os.read(master, 4096)
        assert len(sent) == PACKET_SIZE  # the request itself went out whole
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["set_cpu_freq", "0", "fast"], "'fast' is not one of up, down"),
        (["set_cpu_freq", "zero", "max"], "vCPU 'zero' is not a number"),
        (["query_cpu_freq", "8"], "vCPU 8 is out of range (0-7)"),
        (["send_policy", "later"], "usage: send_policy now"),
        (["--busy-hours", "9-25", "help"], "--busy-hours: 25 is out of range (0-23)"),
        (["--busy-hours", "0", "help"], "hour 0 alone cannot be sent"),
        (["--busy-hours", "3", "--quiet-hours", "2-4", "help"], "3 is also a busy hour"),
        (["--mac-list", "52:54:00:00:01", "help"], "is not a MAC address"),
        (["--vm-name", "x" * 40, "help"], "at most 31 fit"),
        (["frobnicate"], "unknown command 'frobnicate'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    run = guest("--device", str(tmp_path / "no-such-port"), *args)
    assert run.returncode == 2
    assert len(run.stderr.splitlines()) == 1 and message in run.stderr
    assert run.stdout == ""


def test_guest_tool_imports_nothing_of_the_host_agent() -> None:
    code = (
        "import sys, vmpower.guest.cli; "
        "print(sorted(m for m in sys.modules if m.startswith(('vmpower', 'libvirt'))))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    loaded = set(eval(run.stdout))  # a printed list of module names
    host_side = {m for m in loaded if not m.startswith(("vmpower.guest", "vmpower.protocol."))} - {
        "vmpower",
        "vmpower.protocol",
        "vmpower.errors",
    }
    assert host_side == set()


# ---------------------------------------------------------------------------------------
# Pieces, without a daemon


def test_device_argument_names_its_port() -> None:
    assert port_from_arg("/dev/virtio-ports/virtio.serial.port.poweragent.3").index == 3
    assert port_from_arg("1=/dev/pts/7") == PortInfo(1, "7", Path("/dev/pts/7"))
    plain = port_from_arg("/dev/pts/7")
    assert plain.index is None
    ports = [plain, port_from_arg("1=/dev/pts/8")]
    assert port_for_vcpu(ports, 1).device == Path("/dev/pts/8")
    assert port_for_vcpu(ports, 0) is plain  # no port of its own: the first one


def test_discovery_without_power_ports_finds_none(tmp_path: Path) -> None:
    vport = tmp_path / "class" / "virtio-ports" / "vport1p1"
    vport.mkdir(parents=True)
    (vport / "name").write_text("org.qemu.guest_agent.0\n")
    assert discover(tmp_path, tmp_path / "dev") == []


def test_policy_packet_holds_only_what_the_options_say() -> None:
    options = PolicyOptions(
        policy=PolicyType.TIME,
        vcpus=(1, 3),
        busy_hours=(17, 18),
        quiet_hours=parse_hours("0,2", "--quiet-hours"),
    )
    packet = decode_packet(policy_request(options, ""))
    assert packet.control_list == (1, 3)
    assert packet.busy_hours[:3] == (17, 18, 0) and not any(packet.busy_hours[2:])
    assert packet.quiet_hours[:2] == (0, 2)  # hour 0 first, so a later hour keeps it
    assert packet.nb_mac_to_monitor == 0 and packet.vm_name == ""
    with pytest.raises(OptionError, match="--workload"):
        policy_request(PolicyOptions(policy=PolicyType.WORKLOAD, vcpus=(0,)), "")
    with pytest.raises(OptionError, match="packet-thresh"):
        policy_request(PolicyOptions(policy=PolicyType.TRAFFIC, vcpus=(0,)), "")
