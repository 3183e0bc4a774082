"""Event-to-restore latency: a VM stops → its host CPUs are back at their originals.

The real Agent and its monitor loop run in a thread of this process (libvirt's test
driver keeps its state per connection, so the VM is stopped through the agent's own
connection, as virsh would through libvirtd). Each round: vm1 asks for max on host
CPU 2 (its vCPU 0), then ``destroy()``; the clock runs from the libvirt call until the
simulated ``scaling_governor`` of CPU 2 reads its original again (polled every 0.2 ms).
Then vm1 is started again and its channel accepted. Target (issue #12): ≤ 50 ms.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from vmpower import protocol
from vmpower.config import config_from_dict
from vmpower.cpufreq.simulate import build_tree
from vmpower.daemon import Agent
from vmpower.devtools import ChannelHost, make_request
from vmpower.protocol import Command, ReplyCode, Unit

NODE_FILE = Path(__file__).resolve().parent.parent / "tests" / "data" / "node.xml"
ROUNDS = 30
TARGET_MS = 50.0


def run(rounds: int = ROUNDS) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        channels = base / "ch"
        channels.mkdir()
        node = base / "node.xml"
        node.write_text(NODE_FILE.read_text().replace("/tmp/powermonitor/", f"{channels}/"))
        sysfs = base / "sys"
        build_tree(sysfs, "acpi-cpufreq", 8, turbo=True)
        governor = sysfs / "devices/system/cpu/cpu2/cpufreq/scaling_governor"
        original = governor.read_text()
        hosts = {n: ChannelHost(channels / n) for n in ("vm1.0", "vm1.1", "vm2.0", "web.prod.1.0")}
        config = config_from_dict(
            {
                "libvirt": {"uri": f"test://{node}"},
                "channels": {"dir": str(channels)},
                "cpufreq": {"sysfs_root": str(sysfs)},
                "state": {"dir": str(base / "state")},
                "control": {"socket": str(base / "control.sock")},
                "log": {"level": "warning"},
            }
        )
        agent = Agent(config)
        agent.start()
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        latencies_ms: list[float] = []
        try:
            for host in hosts.values():
                host.accept()
            vm1 = hosts["vm1.0"]
            conn = agent.parts.hypervisor.conn
            assert conn is not None
            dom = conn.lookupByName("vm1")
            for _ in range(rounds):
                reply = vm1.request(make_request(Command.CPU_POWER, Unit.SCALE_MAX, 0))
                if protocol.peek_header(reply)[2] != int(ReplyCode.ACK):
                    raise RuntimeError("vm1's request was refused")
                if governor.read_text() == original:
                    raise RuntimeError("host CPU 2 was not set")
                t0 = time.perf_counter()
                dom.destroy()
                deadline = t0 + 10
                while governor.read_text() != original:
                    if time.perf_counter() > deadline:
                        raise RuntimeError("host CPU 2 not restored within 10 s")
                    time.sleep(0.0002)
                latencies_ms.append((time.perf_counter() - t0) * 1e3)
                dom.create()
                vm1.accept(timeout_s=10)
        finally:
            agent.request_stop()
            thread.join(30)
            agent.shutdown()
            for host in hosts.values():
                host.close()
    latencies_ms.sort()
    p95 = latencies_ms[max(int(len(latencies_ms) * 0.95) - 1, 0)]
    return {
        "stop_to_restore_ms_median": round(statistics.median(latencies_ms), 3),
        "stop_to_restore_ms_p95": round(p95, 3),
        "stop_to_restore_ms_max": round(latencies_ms[-1], 3),
        "rounds": len(latencies_ms),
        "target_ms": TARGET_MS,
        "meets_target": p95 <= TARGET_MS,
    }
