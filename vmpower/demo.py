"""`make run`: vmpowerd on its embedded default, with guest traffic, shown step by step.

The embedded default is libvirt's built-in test driver with ``demo-node.xml`` and
``demo.toml`` (package data, ``vmpower/data``: the demo runs from an installed wheel
too; ``config/`` in the source tree is a link to that directory) and a simulated
acpi-cpufreq tree (8 CPUs, turbo) in a temporary state directory.
No QEMU runs, so the demo plays QEMU's part: it binds the VMs' channel sockets
before the agent starts, then a scripted guest sends requests (some of them refused
on purpose) and the demo prints each request, its reply, and the CPU frequencies
before and after. Finally it stops the agent (SIGTERM) and shows every CPU restored.
Nothing is written outside the temporary directory, which is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

from vmpower import control, protocol
from vmpower.cpufreq import open_cpufreq
from vmpower.cpufreq.simulate import build_tree
from vmpower.devtools import ChannelHost, PtyChannelHost, make_request, wait_for
from vmpower.protocol import Command, CoreType, ReplyCode, Unit
from vmpower.sysfs import Sysfs

CPUS = 8


def data_text(name: str) -> str:
    """A file shipped in the package's data (vmpower/data), by name."""
    return resources.files("vmpower").joinpath("data", name).read_text(encoding="utf-8")


def render(demo_dir: Path) -> Path:
    """Copy the demo config and node file into ``demo_dir``; returns the config path."""
    node = data_text("demo-node.xml")
    (demo_dir / "demo-node.xml").write_text(
        node.replace("/tmp/powermonitor/", f"{demo_dir}/channels/")
    )
    text = data_text("demo.toml").replace("@DEMO_DIR@", str(demo_dir))
    path = demo_dir / "vmpowerd.toml"
    path.write_text(text)
    return path


def freq_table(sysfs_root: Path) -> dict[int, tuple[str, str]]:
    """(governor, requested kHz) per CPU, read straight from the simulated sysfs."""
    cpufreq = open_cpufreq(Sysfs(sysfs_root))
    rows = {}
    for cpu in cpufreq.cpus():
        state = cpufreq.state(cpu)
        # a dynamic governor (schedutil) requests nothing: the current frequency is the
        # (simulated) hardware's reading, which the follower moves, not a setting
        rows[cpu] = (state.governor or "-", str(state.target_khz or "-"))
    return rows


def print_table(
    title: str, before: dict[int, tuple[str, str]], after: dict[int, tuple[str, str]] | None = None
) -> None:
    print(f"\n{title}")
    header = f"  {'cpu':>3}  {'governor':<10} {'kHz':>9}"
    if after is not None:
        header += f"   {'governor':<10} {'kHz':>9}"
    print(header)
    for cpu in sorted(before):
        line = f"  {cpu:>3}  {before[cpu][0]:<10} {before[cpu][1]:>9}"
        if after is not None:
            changed = "  *" if after[cpu] != before[cpu] else ""
            line += f"   {after[cpu][0]:<10} {after[cpu][1]:>9}{changed}"
        print(line)


def describe_reply(reply: bytes) -> str:
    code = protocol.peek_header(reply)[2]
    if len(reply) == protocol.FREQ_LIST_SIZE and code == ReplyCode.FREQ_LIST:
        decoded = protocol.FreqListReply.decode(reply)
        freqs = list(decoded.freq_list_khz[: decoded.num_vcpu])
        return f"FREQ_LIST {freqs} kHz"
    if len(reply) == protocol.CAPS_LIST_SIZE and code == ReplyCode.CAPS_LIST:
        decoded_caps = protocol.CapsListReply.decode(reply)
        n = decoded_caps.num_vcpu
        turbo, priority = list(decoded_caps.turbo[:n]), list(decoded_caps.priority[:n])
        return f"CAPS_LIST turbo={turbo} priority={priority}"
    return ReplyCode(code).name if code in (1, 2) else f"code {code}"


def run_tool(shown: list[str], command: list[str]) -> None:
    """Run one of vmpower's commands and print it with its output, indented."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    status = "" if result.returncode == 0 else f"   [exit {result.returncode}]"
    print(f"  $ {' '.join(shown)}{status}")
    for line in (result.stdout + result.stderr).rstrip().splitlines():
        print(f"    {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmpower-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)

    demo_dir = Path(tempfile.mkdtemp(prefix="vmpower-demo-"))
    agent: subprocess.Popen[bytes] | None = None
    follower: subprocess.Popen[bytes] | None = None
    hosts: dict[str, ChannelHost] = {}
    guest_port: PtyChannelHost | None = None
    try:
        config_path = render(demo_dir)
        sysfs_root = demo_dir / "sysfs"
        build_tree(sysfs_root, "acpi-cpufreq", CPUS, turbo=True)
        print(f"vmpower demo in {demo_dir}")
        print("  libvirt: test:/// driver with demo-node.xml (vm1, vm2, batch)")
        print(f"  cpufreq: simulated acpi-cpufreq, {CPUS} CPUs with turbo; CPUs 0-1 reserved")
        # QEMU's part: bind every channel socket before the agent starts.
        for name in ("vm1.0", "vm2.0", "batch.0"):
            hosts[name] = ChannelHost(demo_dir / "channels" / name)
        # vm1's port 1 is a pseudo-terminal, as a virtio port looks from inside the guest,
        # for the guest tool (vmpower-guest --device) to open.
        guest_port = PtyChannelHost(demo_dir / "channels" / "vm1.1")
        before = freq_table(sysfs_root)
        print_table("Host CPUs before the agent starts:", before)

        log_path = demo_dir / "vmpowerd.log"
        # The hardware's part: scaling_cur_freq follows what the agent sets (the agent
        # writes plain files and does not know they are simulated).
        follower = subprocess.Popen(
            [sys.executable, "-m", "vmpower.cpufreq.simulate", str(sysfs_root), "--follow"],
            stdout=subprocess.DEVNULL,
        )
        with open(log_path, "wb") as log_file:
            agent = subprocess.Popen(
                [sys.executable, "-m", "vmpower.daemon", "--config", str(config_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        socket_path = demo_dir / "control.sock"
        if not wait_for(lambda: socket_path.exists() or agent.poll() is not None, 30):
            raise RuntimeError("vmpowerd did not start")
        if agent.poll() is not None:
            raise RuntimeError(f"vmpowerd exited: {log_path.read_text()}")
        for host in hosts.values():
            host.accept()
        guest_port.accept()
        print(f"\nvmpowerd (pid {agent.pid}) connected to {len(hosts) + 1} channels.")

        script = [
            ("vm1.0", "vm1 vCPU0 → max", make_request(Command.CPU_POWER, Unit.SCALE_MAX, 0)),
            ("vm1.0", "vm1 vCPU1 → down", make_request(Command.CPU_POWER, Unit.SCALE_DOWN, 1)),
            ("vm1.0", "vm1 vCPU1 → down", make_request(Command.CPU_POWER, Unit.SCALE_DOWN, 1)),
            (
                "vm2.0",
                "vm2 vCPU0 (shares host CPU 3 with vm1 vCPU1) → min",
                make_request(Command.CPU_POWER, Unit.SCALE_MIN, 0),
            ),
            (
                "vm1.0",
                "vm1 vCPU0 → enable turbo",
                make_request(Command.CPU_POWER, Unit.ENABLE_TURBO, 0),
            ),
            ("vm2.0", "vm2 vCPU1 → min", make_request(Command.CPU_POWER, Unit.SCALE_MIN, 1)),
            (
                "vm1.0",
                "vm1 vCPU 5 (it has 2) → max",
                make_request(Command.CPU_POWER, Unit.SCALE_MAX, 5),
            ),
            (
                "vm1.0",
                "vm1 host CPU 4 (vm2's) as PHYSICAL → max",
                make_request(Command.CPU_POWER, Unit.SCALE_MAX, 4, core_type=CoreType.PHYSICAL),
            ),
            (
                "vm1.0",
                "vm1 pretending to be vm2 → max",
                make_request(Command.CPU_POWER, Unit.SCALE_MAX, 0, vm_name="vm2"),
            ),
            (
                "batch.0",
                "batch vCPU0 (not pinned) → max",
                make_request(Command.CPU_POWER, Unit.SCALE_MAX, 0),
            ),
            (
                "vm1.0",
                "vm1 query frequency list (queries not enabled yet)",
                make_request(Command.QUERY_FREQ_LIST),
            ),
        ]
        print("\nGuest requests (channel: request → reply):")
        for channel, what, packet in script:
            reply = hosts[channel].request(packet)
            print(f"  {channel:<8} {what:<58} → {describe_reply(reply)}")

        print("\nOperator: vmpower set_query vm1 enable")
        control.request(socket_path, "set_query", vm="vm1", enable=True)
        for channel, what, packet in [
            ("vm1.0", "vm1 query frequency list", make_request(Command.QUERY_FREQ_LIST)),
            ("vm1.0", "vm1 query capabilities", make_request(Command.QUERY_CAPS_LIST)),
        ]:
            reply = hosts[channel].request(packet)
            print(f"  {channel:<8} {what:<58} → {describe_reply(reply)}")

        flood = make_request(Command.CPU_POWER, Unit.SCALE_UP, 1)
        hosts["vm2.0"].send(flood * 40)
        codes = [
            protocol.peek_header(hosts["vm2.0"].recv_exact(protocol.PACKET_SIZE))[2]
            for _ in range(40)
        ]
        what = "vm2 flood: 40 requests at once (rate limit: burst 20, 50/s)"
        print(f"  vm2.0    {what:<58} → {codes.count(1)} ACK, {codes.count(2)} NACK")

        print("\nInside vm1, the guest tool on its virtio port (a pseudo-terminal here):")
        device = f"1={guest_port.device}"
        for words in (
            ["set_cpu_freq", "1", "up"],
            ["set_cpu_freq", "1", "max"],
            ["set_cpu_freq", "0", "min"],
            ["query_cpu_freq", "all"],
            ["query_cpu_caps", "all"],
        ):
            run_tool(
                ["vmpower-guest", "--device", "1=/dev/virtio-ports/…poweragent.1", *words],
                [sys.executable, "-m", "vmpower.guest.cli", "--device", device, *words],
            )

        print("\nThe operator's shell (one-shot commands):")
        shell = [sys.executable, "-m", "vmpower.shell", "--socket", str(socket_path)]
        for words in (
            ["list_vms"],
            ["show_vm", "vm1"],
            ["show_cpus"],
            ["set_cpu_freq", "7", "min"],
            ["set_cpu_freq", "0", "max"],
        ):
            run_tool(["vmpower", *words], [*shell, *words])

        during = freq_table(sysfs_root)
        print_table("Host CPUs: before the agent | while serving (* = changed):", before, during)
        status = control.request(socket_path, "status")
        print(
            f"\nAgent status: {status['requests']} requests, {status['acks']} ACK, "
            f"{status['nacks']} NACK, {status['writes']} sysfs writes "
            f"({status['writes_skipped']} skipped as no-ops), "
            f"{status['pending_restore']} files to restore"
        )

        print("\nStopping the agent (SIGTERM)...")
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(30)
        after = freq_table(sysfs_root)
        print_table("Host CPUs: before the agent | after it stopped:", before, after)
        restored = after == before
        print(f"\nvmpowerd exited with {code}; every CPU restored: {'yes' if restored else 'NO'}")
        print("\nThe agent's log:")
        for line in log_path.read_text().splitlines():
            print("  " + line.split(" ", 2)[-1])
        return 0 if restored and code == 0 else 1
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait()
        if follower is not None:
            follower.terminate()
            follower.wait()
        for host in hosts.values():
            host.close()
        if guest_port is not None:
            guest_port.close()
        if args.keep:
            print(f"(kept {demo_dir})")
        else:
            shutil.rmtree(demo_dir, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
