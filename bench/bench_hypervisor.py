"""Costs of the libvirt side on the test driver: the request path's map look-up, a map
re-read, a full refresh of many VMs, and lifecycle event latency (libvirt call → wake →
process_events() has applied it).

The test driver answers in-process, so these figures are vmpower's own overhead plus
libvirt's client library, without the RPC to libvirtd a real host adds.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmpower.hypervisor import Hypervisor

NODE_FILE = Path(__file__).resolve().parent.parent / "tests" / "data" / "node.xml"
EXTRA_VMS = 100
EVENT_ROUNDS = 50

_VM_XML = """
<domain type='test'>
  <name>bench{i}</name>
  <memory unit='KiB'>524288</memory>
  <vcpu placement='static'>2</vcpu>
  <cputune><vcpupin vcpu='0' cpuset='{a}'/><vcpupin vcpu='1' cpuset='{b}'/></cputune>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <channel type='unix'>
      <source mode='bind' path='{channels}/bench{i}.0'/>
      <target type='virtio' name='virtio.serial.port.poweragent.0'/>
    </channel>
  </devices>
</domain>
"""


def _rate(fn: Callable[[], object], seconds: float = 0.5) -> float:
    """Calls per second of ``fn`` over about ``seconds``."""
    n = 0
    start = time.perf_counter()
    end = start + seconds
    while True:
        for _ in range(100):
            fn()
        n += 100
        now = time.perf_counter()
        if now >= end:
            return n / (now - start)


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        channels = Path(tmp) / "ch"
        channels.mkdir()
        node = Path(tmp) / "node.xml"
        node.write_text(NODE_FILE.read_text().replace("/tmp/powermonitor/", f"{channels}/"))
        woke = threading.Event()
        hv = Hypervisor(f"test://{node}", channels, wake=woke.set, map_refresh_s=1.0)
        hv.connect()
        try:
            fresh_per_s = _rate(lambda: hv.ensure_fresh("vm1"))
            stale = Hypervisor(f"test://{node}", channels, map_refresh_s=0.0)
            stale.connect()
            try:
                reread_per_s = _rate(lambda: stale.ensure_fresh("vm1"))
            finally:
                stale.close()

            conn = hv.conn
            assert conn is not None
            for i in range(EXTRA_VMS):
                conn.createXML(_VM_XML.format(i=i, a=i % 8, b=(i + 1) % 8, channels=channels), 0)
            _drain(hv, woke, lambda: all(hv.tracked(f"bench{i}") for i in range(EXTRA_VMS)))
            vm_count = len(hv.vms())
            t0 = time.perf_counter()
            rounds = 5
            for _ in range(rounds):
                hv.refresh()
            refresh_ms = (time.perf_counter() - t0) / rounds * 1e3

            latencies_ms = []
            dom = conn.lookupByName("vm2")
            for _ in range(EVENT_ROUNDS):
                for action, want in ((dom.suspend, "paused"), (dom.resume, "running")):
                    t0 = time.perf_counter()
                    action()
                    _drain(hv, woke, lambda want=want: hv.vm("vm2").state.value == want)
                    latencies_ms.append((time.perf_counter() - t0) * 1e3)
        finally:
            hv.close()
    latencies_ms.sort()
    return {
        "ensure_fresh_fresh_per_s": round(fresh_per_s),
        "ensure_fresh_reread_per_s": round(reread_per_s),
        "refresh_all_ms": round(refresh_ms, 3),
        "refresh_all_vms": vm_count,
        "event_latency_ms_median": round(statistics.median(latencies_ms), 3),
        "event_latency_ms_p95": round(latencies_ms[int(len(latencies_ms) * 0.95) - 1], 3),
        "event_rounds": len(latencies_ms),
    }


def _drain(
    hv: Hypervisor, woke: threading.Event, done: Callable[[], bool], timeout_s: float = 10.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if not woke.wait(max(deadline - time.monotonic(), 0)):
            raise RuntimeError("libvirt event not delivered in time")
        woke.clear()
        hv.process_events()
