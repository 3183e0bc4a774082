"""Test B: an unmodified DPDK guest (Debian's librte_power, KVM-VM mode) against vmpowerd.

The client (``dpdk_client.c``) uses DPDK's public API only: ``rte_power_set_env``,
``rte_power_init``, ``rte_power_freq_up/down/max/min/enable_turbo/disable_turbo``, and
``rte_power_guest_channel_send_msg/receive_msg`` for the queries. It runs first on the
host, where socat turns the channel socket into the PTY DPDK opens, then inside the
TCG guest through QEMU's real virtio-serial port. vmpowerd must act on the simulated
sysfs and answer every request in a form the library reads back.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from e2e.e2e_env import (
    POWER_PORT,
    QEMU_URI,
    E2eAgent,
    E2eHost,
    GuestVm,
    PtyBridge,
    median,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

# One client run: every CPU_POWER unit, each followed by a query of the frequency the
# host now holds for vCPU 0, then the list queries and timed round trips.
STEPS = (
    "min",
    "query_freq",
    "up",
    "query_freq",
    "max",
    "query_freq",
    "down",
    "query_freq",
    "enable_turbo",
    "query_freq",
    "disable_turbo",
    "query_freq",
    "query_freq_list",
    "query_caps_list",
    "query_caps",
)
RTT_COUNT = 30
HOST_VM = "dpdk-host"
HOST_PCPU = 2


def host_node_xml(channels_dir: Path) -> str:
    """A host for libvirt's test driver with one VM whose vCPU 0 is pinned to CPU 2."""
    return f"""<node>
  <cpu><mhz>2300</mhz><model>x86_64</model><active>8</active><nodes>1</nodes>
       <sockets>1</sockets><cores>8</cores><threads>1</threads></cpu>
  <memory>16777216</memory>
  <domain type='test'>
    <name>{HOST_VM}</name>
    <uuid>6a1c5a0e-00e2-4c1e-9a5e-0000000000e2</uuid>
    <memory unit='KiB'>1048576</memory>
    <vcpu placement='static'>2</vcpu>
    <cputune><vcpupin vcpu='0' cpuset='{HOST_PCPU}'/><vcpupin vcpu='1' cpuset='3'/></cputune>
    <os><type arch='x86_64'>hvm</type></os>
    <devices>
      <channel type='unix'>
        <source mode='bind' path='{channels_dir}/{HOST_VM}.0'/>
        <target type='virtio' name='virtio.serial.port.poweragent.0'/>
      </channel>
    </devices>
  </domain>
</node>
"""


def parse_steps(stdout: str) -> list[dict[str, str]]:
    """The client's ``key=value`` lines, one dict per step."""
    rows = []
    for line in stdout.splitlines():
        if line.startswith("step="):
            rows.append(dict(re.findall(r"(\w+)=(\S+)", line)))
    return rows


def check_sequence(rows: list[dict[str, str]], table_khz: list[int], vcpus: int) -> None:
    """Each unit acked and each following query shows DPDK's step semantics.

    acpi-cpufreq lists the turbo (boost) entry first, nominal + 1 MHz; a requester
    reaches it only while it has turbo enabled, as in DPDK's drivers.
    """
    by_step = [r for r in rows if r["step"] != "init"]
    assert [r["step"] for r in by_step][: len(STEPS)] == list(STEPS), rows
    turbo_khz, nominal_khz, lowest_khz = table_khz[0], table_khz[1], table_khz[-1]
    expected_after = {
        "min": lowest_khz,
        "up": table_khz[-2],
        "max": nominal_khz,
        "down": table_khz[2],
        "enable_turbo": turbo_khz,
        "disable_turbo": nominal_khz,
    }
    seen = {}
    for unit_row, query_row in zip(by_step[0:12:2], by_step[1:12:2], strict=True):
        assert unit_row.get("reply") == "ACK", unit_row
        assert query_row.get("reply") == "FREQ_LIST", query_row
        seen[unit_row["step"]] = int(query_row["freqs_khz"].split(",")[0])
    assert seen == expected_after
    freq_list, caps_list, caps_one = by_step[12], by_step[13], by_step[14]
    assert freq_list["reply"] == "FREQ_LIST" and int(freq_list["num_vcpu"]) == vcpus
    assert int(freq_list["freqs_khz"].split(",")[0]) == nominal_khz
    # The simulated CPUs have a turbo range; none is a priority core.
    assert caps_list["reply"] == "CAPS_LIST" and int(caps_list["num_vcpu"]) == vcpus
    assert caps_list["turbo"].split(",")[0] == "1"
    assert caps_list["priority"].split(",")[0] == "0"
    assert caps_one["reply"] == "CAPS_LIST"


def run_host_client(client: Path, *steps: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(client), "-t", "10000", "0", *steps],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_dpdk_client_on_host_through_pty_bridge(
    e2e_host: E2eHost, new_agent: Callable[..., E2eAgent], tmp_path: Path
) -> None:
    client = e2e_host.cache.dpdk_client()
    channels = tmp_path / "channels"
    channels.mkdir()
    node = tmp_path / "node.xml"
    node.write_text(host_node_xml(channels))
    agent = new_agent(f"test://{node}", channels)
    original = agent.snapshot()
    bridge = PtyBridge(Path(POWER_PORT.format(0)), channels / f"{HOST_VM}.0")

    def client_run(*steps: str) -> subprocess.CompletedProcess[str]:
        bridge.start()
        try:
            agent.wait_connected(HOST_VM, 1)
            return run_host_client(client, *steps)
        finally:
            bridge.stop()

    # Queries are refused until the operator allows them: the library still gets a
    # reply of the size it reads (an 88-byte NACK), so the stream stays in sync.
    done = client_run("query_freq", "max")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = parse_steps(done.stdout)
    assert rows[1]["step"] == "query_freq" and rows[1]["reply"] == "NACK", rows
    assert rows[2]["reply"] == "ACK"
    table = agent.table_khz(HOST_PCPU)
    assert agent.setspeed(HOST_PCPU) == str(table[1])

    agent.control("set_query", vm=HOST_VM, enable=True)
    done = client_run(*STEPS, f"rtt:{RTT_COUNT}")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = parse_steps(done.stdout)
    check_sequence(rows, table, vcpus=2)
    rtt = rows[-1]
    assert rtt["acks"] == str(RTT_COUNT), rtt
    # The last request (SCALE_MAX, turbo off) is what the host's file holds.
    assert agent.setspeed(HOST_PCPU) == str(table[1])
    assert agent.read(HOST_PCPU, "scaling_governor") == "userspace"
    e2e_host.timings.record(
        "dpdk_host_pty",
        rtt_median_ms=int(rtt["median_us"]) / 1000,
        rtt_max_ms=int(rtt["max_us"]) / 1000,
    )

    assert agent.stop() == 0
    assert agent.snapshot() == original, "vmpowerd did not restore the host's files"
    assert not Path(POWER_PORT.format(0)).exists()


def test_dpdk_client_inside_tcg_guest(
    e2e_host: E2eHost, guest_vm: GuestVm, new_agent: Callable[..., E2eAgent]
) -> None:
    agent = new_agent(QEMU_URI, guest_vm.channels_dir)
    original = agent.snapshot()
    agent.wait_connected(guest_vm.name, guest_vm.vcpus)
    pcpu = int(agent.vcpu_pcpus(guest_vm.name)[0])
    client = "/opt/dpdk/vmpower_dpdk_client"

    refused = guest_vm.control.run(client, "-t", "10000", "0", "query_freq_list", "max")
    assert refused.rc == 0, refused
    rows = parse_steps(refused.stdout)
    assert rows[1]["reply"] == "NACK" and rows[2]["reply"] == "ACK", refused
    table = agent.table_khz(pcpu)
    assert agent.setspeed(pcpu) == str(table[1])

    agent.control("set_query", vm=guest_vm.name, enable=True)
    done = guest_vm.control.run(
        client, "-t", "10000", "0", *STEPS, f"rtt:{RTT_COUNT}", timeout_s=180
    )
    assert done.rc == 0, done
    rows = parse_steps(done.stdout)
    check_sequence(rows, table, vcpus=guest_vm.vcpus)
    rtt = rows[-1]
    assert rtt["acks"] == str(RTT_COUNT), rtt
    assert agent.setspeed(pcpu) == str(table[1])

    # The same requests through vmpower's own codec, timed in the guest's Python.
    samples_s = guest_vm.control.round_trips(0, RTT_COUNT)
    e2e_host.timings.record(
        "dpdk_guest_qemu",
        rtt_median_ms=int(rtt["median_us"]) / 1000,
        rtt_max_ms=int(rtt["max_us"]) / 1000,
        python_rtt_median_ms=median(samples_s) * 1000,
        client_run_s=done.elapsed_s,
    )

    assert agent.stop() == 0
    assert agent.snapshot() == original, "vmpowerd did not restore the host's files"
