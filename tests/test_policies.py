"""Policies decide on scripted inputs and move the simulated sysfs; removal restores.

Real parts: the request handler, cpufreq on a simulated acpi-cpufreq tree, the restore
journal, libvirt's test driver for the VM map, the event queue. Scripted: the wall
clock (TIME), packet counters (TRAFFIC) and MSR files (BRANCH_RATIO: sparse regular
files with the counters at the MSR offsets, as /dev/cpu/<n>/msr reads them).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from agent_support import render_node

from vmpower.cpufreq import open_cpufreq
from vmpower.cpufreq.simulate import build_tree
from vmpower.events import EventQueue
from vmpower.hypervisor import Hypervisor
from vmpower.policies import (
    IA32_PERFEVTSEL0,
    IA32_PMC0,
    IA32_PMC1,
    PolicyEngine,
    PolicyRecord,
    PolicySpec,
    given_hours,
)
from vmpower.power import PowerManager
from vmpower.protocol import FifoPolicy, Packet, PolicyType, Workload
from vmpower.restore import RestoreJournal
from vmpower.sysfs import Sysfs

# A regular file cannot hold the msr device's overlapping 8-byte registers at
# consecutive offsets: the simulated files space them 8 bytes apart.
STRIDE = 8


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "sysfs"
        build_tree(self.root, "acpi-cpufreq", 8, turbo=True)
        self.original = self.snapshot()
        self.journal = RestoreJournal(tmp_path / "state")
        self.cpufreq = open_cpufreq(Sysfs(self.root, journal=self.journal))
        (tmp_path / "channels").mkdir()
        node = render_node(tmp_path, tmp_path / "channels")
        self.clock = Clock()
        self.hypervisor = Hypervisor(f"test://{node}", tmp_path / "channels", clock=self.clock)
        self.hypervisor.connect()
        self.power = PowerManager(self.cpufreq, self.hypervisor, self.journal, clock=self.clock)
        self.events = EventQueue(clock=self.clock)
        self.wall = datetime(2026, 11, 23, 12, 30)
        self.packets = [0, 0]
        self.msr_root = tmp_path / "msr"
        self.engine = PolicyEngine(
            self.power,
            self.events,
            period_s=0.1,
            branch_period_s=0.001,
            msr_root=self.msr_root,
            msr_stride=STRIDE,
            traffic=lambda vm: (self.packets[0], self.packets[1]),
            wall_clock=lambda: self.wall,
        )
        self.engine.start()

    def snapshot(self) -> dict[str, str]:
        return {str(p): p.read_text() for p in self.root.rglob("*") if p.is_file()}

    def read(self, cpu: int, name: str) -> str:
        return (self.root / f"devices/system/cpu/cpu{cpu}/cpufreq/{name}").read_text().strip()

    def table(self, cpu: int) -> list[int]:
        return [int(x) for x in self.read(cpu, "scaling_available_frequencies").split()]

    def install(self, owner: str, cpus: set[int], **packet: object) -> PolicyRecord:
        spec = PolicySpec.from_packet(Packet(**packet))  # type: ignore[arg-type]
        record = PolicyRecord(owner, spec, cpus=frozenset(cpus))
        self.power.policies[owner] = record
        return record

    def tick(self, seconds: float = 0.1) -> None:
        """Advance time and run what is due, then the end-of-turn flush."""
        self.clock.now += seconds
        self.events.run_due()
        self.engine.ensure_running()  # the daemon's hook on PowerManager.policy_installed
        self.power.flush()

    def close(self) -> None:
        self.engine.stop()
        self.hypervisor.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.close()


def test_given_hours_ignores_zero_padding() -> None:
    assert given_hours((17, 18, 19) + (0,) * 21) == {17, 18, 19}
    assert given_hours((0,) * 24) == set()
    assert given_hours((0, 5) + (0,) * 22) == {0, 5}  # hour 0 counts when others follow


@pytest.mark.parametrize(
    ("workload", "index"), [(Workload.HIGH, 1), (Workload.MEDIUM, None), (Workload.LOW, -1)]
)
def test_workload(rig: Rig, workload: Workload, index: int | None) -> None:
    rig.install("vm1", {2, 3}, policy_to_use=PolicyType.WORKLOAD, workload=workload)
    rig.tick()
    table = rig.table(2)
    expected = table[(1 + len(table) - 1) // 2] if index is None else table[index]
    assert rig.read(2, "scaling_setspeed") == rig.read(3, "scaling_setspeed") == str(expected)
    assert rig.power.policies["vm1"].last_decision.startswith(
        {Workload.HIGH: "MAX", Workload.MEDIUM: "MEDIUM", Workload.LOW: "MIN"}[workload]
    )


def test_time_busy_quiet_and_unlisted_hours(rig: Rig) -> None:
    busy = (17, 18, 19) + (0,) * 21
    quiet = (2, 3, 4) + (0,) * 21
    rig.install("vm1", {2}, policy_to_use=PolicyType.TIME, busy_hours=busy, quiet_hours=quiet)
    table = rig.table(2)
    rig.wall = datetime(2026, 11, 23, 18, 5)
    rig.tick()
    assert rig.read(2, "scaling_setspeed") == str(table[1])
    rig.wall = datetime(2026, 11, 23, 3, 0)
    rig.tick()
    assert rig.read(2, "scaling_setspeed") == str(table[-1])
    rig.wall = datetime(2026, 11, 23, 0, 30)  # hour 0 is only padding here: no change
    rig.tick()
    assert rig.read(2, "scaling_setspeed") == str(table[-1])
    assert "not listed" in rig.power.policies["vm1"].last_decision


def test_time_traffic_hours_follow_traffic(rig: Rig) -> None:
    rig.install(
        "vm1",
        {2},
        policy_to_use=PolicyType.TIME,
        hours_to_use_traffic_profile=(8, 10) + (0,) * 22,
        avg_max_packet_thresh=1000,
        max_max_packet_thresh=5000,
    )
    rig.wall = datetime(2026, 11, 23, 10, 0)
    rig.tick()  # first sample: no rate yet
    rig.packets = [400, 400]  # 800 packets in 0.1 s = 8000 pkt/s
    rig.tick()
    assert rig.read(2, "scaling_setspeed") == str(rig.table(2)[1])


def test_traffic_thresholds(rig: Rig) -> None:
    rig.install(
        "vm2",
        {4},
        policy_to_use=PolicyType.TRAFFIC,
        avg_max_packet_thresh=1000,
        max_max_packet_thresh=5000,
    )
    table = rig.table(4)
    rig.tick()
    for added, expected in (
        (600, table[1]),
        (200, table[(1 + len(table) - 1) // 2]),
        (10, table[-1]),
    ):
        rig.packets[0] += added  # per 0.1 s: 6000, 2000 and 100 packets/s
        rig.tick()
        assert rig.read(4, "scaling_setspeed") == str(expected), added


def write_msr(root: Path, cpu: int, branches: int, misses: int) -> None:
    path = root / str(cpu) / "msr"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab"):
        pass
    with open(path, "r+b") as f:
        f.seek(IA32_PMC0 * STRIDE)
        f.write(struct.pack("<Q", branches))
        f.seek(IA32_PMC1 * STRIDE)
        f.write(struct.pack("<Q", misses))


def test_branch_ratio_window(rig: Rig) -> None:
    write_msr(rig.msr_root, 3, 0, 0)
    rig.install("vm1", {3}, policy_to_use=PolicyType.BRANCH_RATIO)
    rig.tick(0.1)  # evaluation starts the 1 ms sampling
    rig.tick(0.001)  # the first sample programs the event selects
    with open(rig.msr_root / "3" / "msr", "rb") as f:
        f.seek(IA32_PERFEVTSEL0 * STRIDE)
        assert struct.unpack("<Q", f.read(8))[0] == 0x53 << 16 | 0xC4  # event programmed
    table = rig.table(3)
    branches = misses = 0
    for _ in range(40):  # 40 samples of 1 M branches, 0.01 % misses: all below 0.1 %
        branches += 1_000_000
        misses += 100
        write_msr(rig.msr_root, 3, branches, misses)
        rig.tick(0.001)
    rig.tick(0.1)
    assert rig.read(3, "scaling_setspeed") == str(table[-1])
    branches += 1_000_000
    misses += 5_000  # 0.5 %: above the threshold
    write_msr(rig.msr_root, 3, branches, misses)
    rig.tick(0.001)
    rig.tick(0.1)
    assert rig.read(3, "scaling_setspeed") == str(table[1])


def test_branch_ratio_without_msr_access_is_reported_not_fatal(rig: Rig) -> None:
    rig.install("vm1", {2}, policy_to_use=PolicyType.BRANCH_RATIO)
    rig.tick(0.1)
    rig.tick(0.001)
    rig.tick(0.1)
    assert "no MSR access" in rig.power.policies["vm1"].last_decision
    assert rig.read(2, "scaling_governor") != "userspace"


def test_shared_cpu_policy_follows_arbitration(rig: Rig) -> None:
    rig.install("vm1", {3}, policy_to_use=PolicyType.WORKLOAD, workload=Workload.LOW)
    rig.install("vm2", {3}, policy_to_use=PolicyType.WORKLOAD, workload=Workload.HIGH)
    rig.tick()
    assert rig.read(3, "scaling_setspeed") == str(rig.table(3)[1])


def test_removal_restores_the_policys_cpus(rig: Rig) -> None:
    rig.install("vm1", {2, 3}, policy_to_use=PolicyType.WORKLOAD, workload=Workload.HIGH)
    rig.tick()
    assert rig.snapshot() != rig.original
    rig.power.requester_gone("vm1")
    rig.power.flush()
    assert rig.snapshot() == rig.original
    rig.tick()  # nothing re-applies it
    assert rig.snapshot() == rig.original


def test_fifo_time_policy(rig: Rig) -> None:
    policy = FifoPolicy(
        command="create",
        policy_type=PolicyType.TIME,
        workload=None,
        busy_hours=(0, 1),
        quiet_hours=(),
        mac_list=(),
        avg_packet_thresh=None,
        max_packet_thresh=None,
    )
    rig.power.policies["fifo6"] = PolicyRecord(
        "fifo6", PolicySpec.from_fifo(policy), cpus=frozenset({6})
    )
    rig.wall = datetime(2026, 11, 23, 0, 15)  # from JSON, hour 0 is a real hour
    rig.tick()
    assert rig.read(6, "scaling_setspeed") == str(rig.table(6)[1])


def test_with_no_policy_the_evaluation_sleeps_and_a_new_policy_wakes_it(rig: Rig) -> None:
    """An idle daemon is not woken ten times a second to evaluate nothing."""
    rig.tick()  # nothing installed: the evaluation unregisters itself
    assert rig.events.is_empty()
    rig.tick()
    assert rig.events.is_empty()
    rig.install("vm1", {3}, policy_to_use=PolicyType.WORKLOAD, workload=Workload.HIGH)
    rig.tick()  # the turn that saw it registers the evaluation again
    assert not rig.events.is_empty()
    rig.tick()
    assert rig.read(3, "scaling_setspeed") == str(rig.table(3)[1])  # HIGH: nominal
