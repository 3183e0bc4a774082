"""vmpower.energy: the daemon's lifetime energy books, on simulated intel-rapl zones.

The vCPU samples are plain values (what the libvirt worker hands back); the last test
reads them from libvirt's test driver through the real Hypervisor and its worker job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vmpower.cpufreq.simulate import add_rapl_zone, build_tree
from vmpower.energy import EnergyAccount
from vmpower.hypervisor import Hypervisor, registry
from vmpower.hypervisor.model import CPU_NOT_REPORTED

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sample:
    vms: dict[str, tuple[tuple[float, int], ...]]
    read_at: float


@dataclass
class Reads:
    """Hands the account the samples a test queues (as the worker would, later)."""

    queued: list[Sample] = field(default_factory=list)
    asked: int = 0

    def __call__(self, done: Callable[[Sample | None], None]) -> bool:
        self.asked += 1
        if self.queued:
            done(self.queued.pop(0))
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def account(tmp_path: Path, packages: int = 2, max_uj: int = 10**12):
    root = tmp_path / "sys"
    build_tree(root, "acpi-cpufreq", 8, packages=packages)
    files = [add_rapl_zone(root, p, 0, max_uj) for p in range(packages)]
    reads, clock = Reads(), Clock()
    return EnergyAccount(root, reads, clock, period_s=1.0), files, reads, clock


def books_balance(acc: EnergyAccount) -> None:
    shared = sum(acc.vm_j.values()) + sum(acc.host_j.values()) + acc.departed_j
    assert shared == pytest.approx(sum(acc.package_j.values()), rel=1e-9, abs=1e-9)


def test_package_energy_is_shared_by_vcpu_time_and_the_rest_is_the_hosts(
    tmp_path: Path,
) -> None:
    acc, (pkg0, pkg1), reads, clock = account(tmp_path)
    assert acc.enabled and acc.packages() == [0, 1]
    # Package 0 is CPUs 0-3, package 1 CPUs 4-7. Over 1 s: vm a ran 2 s of CPU on
    # package 0 (half its capacity), vm b 1 s on package 0 and 1 s on package 1.
    reads.queued = [
        Sample({"a": ((0.0, 0), (0.0, 1)), "b": ((0.0, 2), (0.0, 5))}, 100.0),
        Sample({"a": ((1.0, 0), (1.0, 1)), "b": ((1.0, 2), (1.0, 5))}, 101.0),
    ]
    acc.tick()  # first sample: no shares yet
    clock.now = 101.0
    acc.tick()  # second: shares from now on
    pkg0.write_text("40000000\n")  # 40 J
    pkg1.write_text("8000000\n")  # 8 J
    clock.now = 102.0
    acc.update()
    assert acc.package_j == {0: pytest.approx(40.0), 1: pytest.approx(8.0)}
    assert acc.vm_j["a"] == pytest.approx(40.0 * 2 / 4)
    assert acc.vm_j["b"] == pytest.approx(40.0 * 1 / 4 + 8.0 * 1 / 4)
    assert acc.host_j == {0: pytest.approx(10.0), 1: pytest.approx(6.0)}
    books_balance(acc)
    assert acc.vm_energy_j("a") == acc.vm_j["a"] and acc.vm_energy_j("nobody") == 0.0


def test_wrap_around_is_corrected_with_max_energy_range(tmp_path: Path) -> None:
    acc, (pkg0,), _reads, _clock = account(tmp_path, packages=1, max_uj=99_999_999)
    pkg0.write_text("90000000\n")
    acc.update()
    pkg0.write_text("5000000\n")  # wrapped: 10 J to the top (incl. 0), then 5 J
    acc.update()
    assert acc.package_j[0] == pytest.approx(90.0 + 15.0)
    assert acc.host_j[0] == pytest.approx(105.0)  # no vCPU shares yet: all the host's
    books_balance(acc)


def test_shares_over_capacity_are_scaled_and_stale_shares_go_to_the_host(
    tmp_path: Path,
) -> None:
    acc, (pkg0,), reads, clock = account(tmp_path, packages=1)
    # 12 CPU-seconds in 1 s on 8 CPUs (clocks of two reads never line up): scaled to 1
    reads.queued = [
        Sample({"a": ((0.0, 0),), "b": ((0.0, 1),)}, 100.0),
        Sample({"a": ((6.0, 0),), "b": ((6.0, 1),)}, 101.0),
    ]
    acc.tick()
    clock.now = 101.0
    acc.tick()
    pkg0.write_text("10000000\n")
    acc.update()
    assert acc.vm_j == {"a": pytest.approx(5.0), "b": pytest.approx(5.0)}
    assert acc.host_j[0] == pytest.approx(0.0, abs=1e-9)
    # libvirt stops answering: after a few periods the shares are too old to use
    clock.now = 120.0
    pkg0.write_text("20000000\n")
    acc.update()
    assert acc.host_j[0] == pytest.approx(10.0)
    books_balance(acc)


def test_samples_further_apart_than_the_period_stay_in_force_between_them(
    tmp_path: Path,
) -> None:
    """A host with more VMs than the hypervisor reads a second (VCPU_READS_PER_S, issue
    #16) has a vCPU sample every 20 s, not every period: its shares are used until the
    next one comes (they went to the host 6 s after each), and only five intervals
    without one make them stale."""
    acc, (pkg0,), reads, clock = account(tmp_path, packages=1)
    reads.queued = [
        Sample({"a": ((0.0, 0),)}, 100.0),
        Sample({"a": ((40.0, 0),)}, 120.0),  # 2 of 8 CPUs' capacity: a quarter
    ]
    acc.tick()
    clock.now = 120.0
    acc.tick()
    pkg0.write_text("0\n")
    acc.update()
    clock.now = 139.0  # the next sample is under way
    pkg0.write_text("8000000\n")
    acc.update()
    assert acc.vm_j["a"] == pytest.approx(2.0) and acc.host_j[0] == pytest.approx(6.0)
    clock.now = 120.0 + 5 * 20 + 2  # five intervals and more without a sample
    pkg0.write_text("16000000\n")
    acc.update()
    assert acc.vm_j["a"] == pytest.approx(2.0) and acc.host_j[0] == pytest.approx(14.0)
    books_balance(acc)


def test_times_without_a_host_cpu_are_shared_by_the_vcpus_pins(tmp_path: Path) -> None:
    """The bulk statistics (one libvirt call for every VM: issue #16) name no host CPU
    (CPU_NOT_REPORTED): a vCPU's time goes to the packages of the CPUs it is pinned to,
    by their share of them, and by every CPU's where its pins are not known."""
    root = tmp_path / "sys"
    build_tree(root, "acpi-cpufreq", 8, packages=2)  # package 0: CPUs 0-3, 1: CPUs 4-7
    pkg0, pkg1 = (add_rapl_zone(root, p, 0) for p in range(2))
    reads, clock = Reads(), Clock()
    pins = {"a": (frozenset({5}), frozenset({3, 4})), "b": (frozenset({0, 1, 2, 6}),)}
    acc = EnergyAccount(root, reads, clock, period_s=1.0, vcpu_pins=pins.get)
    x = CPU_NOT_REPORTED
    reads.queued = [
        Sample({"a": ((0.0, x), (0.0, x)), "b": ((0.0, x),), "c": ((0.0, x),)}, 100.0),
        Sample({"a": ((1.0, x), (2.0, x)), "b": ((2.0, x),), "c": ((2.0, x),)}, 101.0),
    ]
    acc.tick()
    clock.now = 101.0
    acc.tick()
    pkg0.write_text("40000000\n")  # 40 J
    pkg1.write_text("40000000\n")
    acc.update()
    # Each package has 4 CPU-seconds a second. a: vCPU 0's 1 s on package 1, vCPU 1's
    # 2 s half and half; b: 2 s, 3/4 on package 0; c (not tracked: every CPU) 2 s, half
    # and half. Package 0: a 1 s, b 1.5, c 1; package 1: a 2, b 0.5, c 1.
    assert acc.vm_j["a"] == pytest.approx(40.0 * 1 / 4 + 40.0 * 2 / 4)
    assert acc.vm_j["b"] == pytest.approx(40.0 * 1.5 / 4 + 40.0 * 0.5 / 4)
    assert acc.vm_j["c"] == pytest.approx(40.0 * 1 / 4 + 40.0 * 1 / 4)
    assert acc.host_j == {0: pytest.approx(5.0), 1: pytest.approx(5.0)}
    books_balance(acc)


def test_no_rapl_zone_no_books(tmp_path: Path) -> None:
    root = tmp_path / "sys"
    build_tree(root, "acpi-cpufreq", 4)
    acc = EnergyAccount(root, Reads(), Clock())
    assert not acc.enabled and acc.vm_energy_j("a") is None


@pytest.mark.parametrize("slice_vms", [2, 16])
def test_vcpu_times_come_from_libvirt_through_the_worker_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slice_vms: int
) -> None:
    """Read a slice of VMs a worker job (registry.VCPU_TIMES_SLICE); one sample of all."""
    monkeypatch.setattr(registry, "VCPU_TIMES_SLICE", slice_vms)
    hypervisor = Hypervisor(f"test://{REPO / 'tests/data/node.xml'}", tmp_path)
    hypervisor.connect()
    got = []
    try:
        assert hypervisor.read_vcpu_times(got.append)  # inline (no post): done at once
    finally:
        hypervisor.close()
    (sample,) = got
    assert sample is not None
    assert set(sample.vms) == {"vm1", "vm2", "web.prod.1", "free", "sleepy"}
    # vm1's vCPUs run on host CPUs 2 and 3 (its pinning), with some CPU time used
    assert [cpu for _t, cpu in sample.vms["vm1"]] == [2, 3]
    assert all(t > 0 for t, _cpu in sample.vms["vm1"])
