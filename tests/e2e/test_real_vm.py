"""Test A: a real TCG guest on the real libvirtd runs vmpower's own guest tool.

vmpowerd connects to ``qemu:///system`` and a simulated cpufreq tree; inside the guest,
``vmpower-guest`` one-shots go through QEMU's virtio-serial ports (found by the tool's
own discovery, as on a real VM) and print the host's replies. The test checks both
sides: what the guest printed and the host's files. While vmpowerd runs, the operator
re-pins a vCPU with ``virsh vcpupin`` (the next request acts on the new host CPU) and
restarts the VM (its channels come back without anyone telling vmpowerd).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest

from e2e.e2e_env import (
    POWER_PORT,
    QEMU_URI,
    E2eAgent,
    E2eHost,
    GuestResult,
    GuestVm,
    median,
    virsh,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

RTT_COUNT = 30


def guest_tool(vm: GuestVm, *args: str) -> GuestResult:
    # A generous reply timeout: TCG and a shared 2-core host, not vmpowerd, set the pace.
    return vm.control.run("vmpower-guest", "--timeout", "20", *args, timeout_s=90)


def printed_freqs(result: GuestResult) -> dict[int, int]:
    """``vCPU <n>: <kHz> kHz`` lines of query_cpu_freq."""
    return {int(v): int(k) for v, k in re.findall(r"vCPU (\d+): (\d+) kHz", result.stdout)}


def test_guest_tool_through_real_virtio_serial(
    e2e_host: E2eHost, guest_vm: GuestVm, new_agent: Callable[..., E2eAgent]
) -> None:
    vm = guest_vm.name
    agent = new_agent(QEMU_URI, guest_vm.channels_dir)
    original = agent.snapshot()
    agent.wait_connected(vm, guest_vm.vcpus)
    assert agent.vcpu_pcpus(vm) == {0: "0", 1: "1"}
    table = agent.table_khz(0)
    nominal_khz, lowest_khz = table[1], table[-1]  # acpi-cpufreq: boost entry first
    governor, setspeed = agent.read(0, "scaling_governor"), agent.setspeed(0)

    # vCPU 0 → host CPU 0, through the port named on the command line.
    done = guest_tool(guest_vm, "--device", f"0={POWER_PORT.format(0)}", "set_cpu_freq", "0", "min")
    assert done.rc == 0 and "vCPU 0 min: ACK" in done.stdout, done
    assert agent.setspeed(0) == str(lowest_khz)
    assert agent.read(0, "scaling_governor") == "userspace"
    assert agent.read(1, "scaling_governor") == governor  # vCPU 1's host CPU untouched

    # Queries need the operator's permission; refused ones still get their answer.
    done = guest_tool(guest_vm, "query_cpu_freq", "all")
    assert done.rc == 1 and "NACK" in done.stdout, done
    agent.control("set_query", vm=vm, enable=True)
    done = guest_tool(guest_vm, "query_cpu_freq", "all")
    assert done.rc == 0, done
    freqs = printed_freqs(done)
    assert freqs[0] == lowest_khz and set(freqs) == {0, 1}, done

    # The operator moves vCPU 0 to host CPU 1 while vmpowerd runs: the live map follows,
    # and host CPU 0 (no longer vCPU 0's) gets its original settings back.
    virsh("vcpupin", vm, "0", "1")
    done = guest_tool(guest_vm, "set_cpu_freq", "0", "max")
    assert done.rc == 0 and "vCPU 0 max: ACK" in done.stdout, done
    assert agent.setspeed(1) == str(nominal_khz)
    assert agent.vcpu_pcpus(vm)[0] == "1"
    wait_until(
        lambda: agent.read(0, "scaling_governor") == governor,
        10,
        "host CPU 0 restored after vCPU 0 left it",
    )
    assert agent.setspeed(0) == setspeed

    samples_s = guest_vm.control.round_trips(0, RTT_COUNT)

    # Restart the VM: QEMU closes and re-binds the channel sockets; vmpowerd restores
    # the host CPUs the VM had changed, then reconnects by itself when it is back.
    old_boot = guest_vm.control.hello["boot"]
    virsh("destroy", vm)
    wait_until(
        lambda: agent.read(1, "scaling_governor") == governor,
        20,
        "host CPU 1 restored after the VM stopped",
    )
    started = time.monotonic()
    boot_s = guest_vm.start()
    assert guest_vm.control.hello["boot"] != old_boot
    agent.wait_connected(vm, guest_vm.vcpus)
    # The restart re-applies the domain's pinning (vCPU 0 on host CPU 0 again).
    assert agent.vcpu_pcpus(vm) == {0: "0", 1: "1"}
    done = guest_tool(guest_vm, "set_cpu_freq", "1", "min")
    first_request_s = time.monotonic() - started
    assert done.rc == 0 and "vCPU 1 min: ACK" in done.stdout, done
    assert agent.setspeed(1) == str(lowest_khz)
    done = guest_tool(guest_vm, "query_cpu_freq", "1")
    assert printed_freqs(done) == {1: lowest_khz}, done

    e2e_host.timings.record(
        "guest_tool_qemu",
        restart_boot_s=boot_s,
        first_request_after_start_s=first_request_s,
        oneshot_in_guest_s=done.elapsed_s,
        rtt_median_ms=median(samples_s) * 1000,
        rtt_max_ms=max(samples_s) * 1000,
    )

    assert agent.stop() == 0
    assert agent.snapshot() == original, "vmpowerd did not restore the host's files"
