"""Cost of one frequency step through CpuFreq.set_khz, per scaling driver.

Each step alternates between two table entries on one CPU of a simulated tree (on
tmpfs ``/dev/shm`` when there is one, so the figure is vmpower's cost plus the write
syscalls, not a disk's), with and without a restore journal attached. With the journal
only the first write of each file is recorded (an fsync'd JSON update); every later step
pays a dictionary lookup. Figures: µs per step (p50, mean) and steps per second, and
the floor: one bare ``Sysfs.write`` (acpi-cpufreq writes one file per step, the
min/max drivers two).

``hosts``: the same on trees of recorded real hosts (tests/data/real-hosts/), stepping
between the turbo ceiling and the non-turbo maximum with turbo on: on an AMD
acpi-cpufreq host (milan0) each such step also switches the policy's ``boost``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from vmpower.cpufreq import open_cpufreq
from vmpower.cpufreq.simulate import DRIVERS, build_from_fixture, build_tree
from vmpower.restore import RestoreJournal
from vmpower.sysfs import Sysfs

STEPS = 4000
WARMUP = 200
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "data" / "real-hosts"
HOSTS = ("spr1", "bdwep0", "icxd0", "milan0", "turin0")


def _scratch() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _measure(root: Path, state: Path | None, turbo_step: bool = False) -> dict[str, float]:
    journal = RestoreJournal(state) if state is not None else None
    cf = open_cpufreq(Sysfs(root, journal))
    table = cf.table_khz(1)
    # two entries under the nominal frequency: valid whatever the turbo state
    low, high = table[-1], table[-2]
    if turbo_step:  # the turbo ceiling and the non-turbo maximum, turbo on
        cf.set_turbo(1, True)
        low, high = cf.nominal_khz(1), table[0]
    set_khz = cf.set_khz
    if turbo_step:
        # as the daemon does (PowerManager._apply): the turbo switch is switched on
        # before a turbo step when a lower step switched it off (a policy's boost)
        def step(cpu: int, khz: int) -> None:
            if khz > cf.nominal_khz(cpu) and not cf.turbo_enabled(cpu):
                cf.set_turbo(cpu, True)
            cf.set_khz(cpu, khz)

        set_khz = step  # type: ignore[assignment]
    clock = time.perf_counter_ns
    for i in range(WARMUP):
        set_khz(1, high if i % 2 else low)
    samples: list[int] = []
    for i in range(STEPS):
        target = low if i % 2 else high
        t0 = clock()
        set_khz(1, target)
        samples.append(clock() - t0)
    if journal is not None:
        journal.restore()
    mean_us = statistics.fmean(samples) / 1000
    return {
        "p50_us": round(statistics.median(samples) / 1000, 2),
        "mean_us": round(mean_us, 2),
        "steps_per_s": round(1e6 / mean_us),
    }


def _baseline(root: Path) -> dict[str, float]:
    """One bare Sysfs.write of a frequency: the syscall floor under every step."""
    sysfs = Sysfs(root)
    rel = "devices/system/cpu/cpu1/cpufreq/scaling_setspeed"
    clock = time.perf_counter_ns
    samples: list[int] = []
    for i in range(STEPS):
        t0 = clock()
        sysfs.write(rel, 1_000_000 + i % 2)
        samples.append(clock() - t0)
    return {
        "p50_us": round(statistics.median(samples) / 1000, 2),
        "mean_us": round(statistics.fmean(samples) / 1000, 2),
    }


def run() -> dict:
    figures: dict[str, object] = {"steps": STEPS, "tmpfs": _scratch() is not None}
    with tempfile.TemporaryDirectory(prefix="vmpower-bench-", dir=_scratch()) as tmp:
        floor = Path(tmp) / "floor"
        build_tree(floor, "acpi-cpufreq", 2)
        figures["one_sysfs_write"] = _baseline(floor)
        for driver in DRIVERS:
            root = Path(tmp) / driver
            build_tree(root, driver, 2, turbo=True)
            figures[driver] = {
                "no_journal": _measure(root, None),
                "journal": _measure(root, Path(tmp) / f"state-{driver}"),
            }
        hosts: dict[str, object] = {}
        for host in HOSTS:
            root = Path(tmp) / f"host-{host}"
            build_from_fixture(root, FIXTURES / f"{host}.json", max_cpus=4)
            hosts[host] = _measure(root, Path(tmp) / f"state-{host}", turbo_step=True)
        figures["hosts"] = hosts
    return figures


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
