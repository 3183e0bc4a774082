"""CPU hotplug latency: kernel uevent → offline CPU refused / online CPU set again.

In process, on the real parts: the kernel's CPU uevents through pyudev
(``KernelCpuEvents``) in a ``Monitor``'s epoll set, a ``PowerManager`` over a simulated
acpi-cpufreq tree with the restore journal, libvirt's test driver. The operator wishes
max on host CPU 1. Each round: cpu1 is flipped offline in the tree and ``offline`` is
written to the REAL /sys/devices/system/cpu/cpu1/uevent (root: the kernel emits the
uevent, the CPU is not touched); the clock runs from that write until the loop turn
that read it ends with CPU 1 refused. Then the tree's policy is reset as
cpufreq_online() leaves it (its own governor), cpu1 flipped online, ``online`` written;
the clock runs until the turn ends with ``scaling_setspeed`` back at the wish.
Target (issue #13): each ≤ 10 ms.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from vmpower.cpufreq import open_cpufreq
from vmpower.cpufreq.simulate import build_tree, set_cpu_online
from vmpower.hotplug import CpuHotplug, KernelCpuEvents
from vmpower.hypervisor import Hypervisor
from vmpower.monitor import Monitor
from vmpower.power import PowerManager, Refused
from vmpower.protocol import Unit
from vmpower.restore import RestoreJournal
from vmpower.sysfs import Sysfs

NODE_FILE = Path(__file__).resolve().parent.parent / "tests" / "data" / "node.xml"
UEVENT = Path("/sys/devices/system/cpu/cpu1/uevent")
ROUNDS = 50
TARGET_MS = 10.0


def _refused(pm: PowerManager, cpu: int) -> bool:
    try:
        pm._check_cpu(cpu)  # the rule every request goes through
    except Refused:
        return True
    return False


def _turns_until(monitor: Monitor, done: Any, limit_s: float = 2.0) -> float:
    deadline = time.perf_counter() + limit_s
    while not done():
        if time.perf_counter() > deadline:
            raise TimeoutError("no uevent seen")
        monitor.run_once(0.5)
    return time.perf_counter()


def run(rounds: int = ROUNDS) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        channels = base / "ch"
        channels.mkdir()
        node = base / "node.xml"
        node.write_text(NODE_FILE.read_text().replace("/tmp/powermonitor/", f"{channels}/"))
        root = base / "sys"
        build_tree(root, "acpi-cpufreq", 8, turbo=True)
        journal = RestoreJournal(base / "state")
        cpufreq = open_cpufreq(Sysfs(root, journal))
        hv = Hypervisor(f"test://{node}", channels)
        hv.connect()
        pm = PowerManager(cpufreq, hv, journal)
        monitor = Monitor()
        monitor.add_end_of_turn(pm.finish_turn)
        hotplug = CpuHotplug(monitor, KernelCpuEvents(), pm.cpus_changed, cpufreq.cpus)
        policy = root / "devices/system/cpu/cpufreq/policy1"
        offline_ms: list[float] = []
        online_ms: list[float] = []
        try:
            wish = pm.set_cpu_freq("operator", 1, Unit.SCALE_MAX)
            for _ in range(rounds):
                set_cpu_online(root, 1, False)
                t0 = time.perf_counter()
                UEVENT.write_text("offline")
                t1 = _turns_until(monitor, lambda: _refused(pm, 1))
                offline_ms.append((t1 - t0) * 1000)
                (policy / "scaling_governor").write_text("schedutil\n")
                (policy / "scaling_setspeed").write_text("<unsupported>\n")
                set_cpu_online(root, 1, True)
                t0 = time.perf_counter()
                UEVENT.write_text("online")
                t1 = _turns_until(
                    monitor,
                    lambda: (policy / "scaling_setspeed").read_text().strip() == str(wish),
                )
                online_ms.append((t1 - t0) * 1000)
        finally:
            hotplug.close()
            pm.restore_all()
            monitor.close()
            hv.close()
            cpufreq.close()

    def figures(ms: list[float]) -> dict[str, float]:
        ordered = sorted(ms)
        return {
            "p50_ms": round(statistics.median(ordered), 3),
            "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))], 3),
            "max_ms": round(ordered[-1], 3),
        }

    off, on = figures(offline_ms), figures(online_ms)
    return {
        "rounds": rounds,
        "offline_to_refused": off,
        "online_to_reapplied": on,
        "target_ms": TARGET_MS,
        "met": off["p95_ms"] <= TARGET_MS and on["p95_ms"] <= TARGET_MS,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
