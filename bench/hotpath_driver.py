"""The request path in process, for instruction counts (callgrind) old vs new.

``python bench/hotpath_driver.py N [PER_READ]`` builds real parts (libvirt's test driver with
tests/data/node.xml, a simulated acpi-cpufreq tree, the restore journal, a VmChannel)
and pushes N CPU_POWER requests (UP/DOWN alternating, PER_READ per read, one flush per
read: 16 by default, the throughput shape; 1 is the latency shape, one packet per turn)
through ``PowerManager.handle_vm_packets`` + ``flush``. Each read is a fresh bytes
object, as ``recv`` gives (a reused one would keep its hash cached). Run it under
``valgrind --tool=callgrind`` for two values of N: the difference divided by the
difference in N is the instructions per request, whatever the machine's load.
It uses only the API that both sides of a refactoring keep, so the same file measures
any two checkouts (put the other one first on PYTHONPATH): a checkout whose handler
takes a read's packets as a list (before ``protocol.split_packets``) gets one.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from vmpower import protocol
from vmpower.channels import TokenBucket, VmChannel
from vmpower.cpufreq import open_cpufreq
from vmpower.cpufreq.simulate import build_tree
from vmpower.devtools import make_request
from vmpower.hypervisor import Hypervisor
from vmpower.power import PowerManager
from vmpower.protocol import Command, Unit
from vmpower.restore import RestoreJournal
from vmpower.sysfs import Sysfs

REPO = Path(__file__).resolve().parents[1]
PER_READ = 16


def main(count: int, per_read: int = PER_READ) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        channels_dir = root / "channels"
        channels_dir.mkdir()
        node = root / "node.xml"
        node.write_text(
            (REPO / "tests/data/node.xml")
            .read_text()
            .replace("/tmp/powermonitor/", f"{channels_dir}/")
        )
        build_tree(root / "sys", "acpi-cpufreq", 8, True, frozenset())
        journal = RestoreJournal(root / "state")
        cpufreq = open_cpufreq(Sysfs(root / "sys", journal=journal))
        hypervisor = Hypervisor(f"test://{node}", channels_dir, wake=lambda: None)
        hypervisor.connect()
        power = PowerManager(cpufreq, hypervisor, journal)
        bucket = TokenBucket(1e12, 10**9, time.monotonic)
        channel = VmChannel("vm1", 0, str(channels_dir / "vm1.0"), bucket, 1 << 30)
        up = make_request(Command.CPU_POWER, Unit.SCALE_UP, 0)
        down = make_request(Command.CPU_POWER, Unit.SCALE_DOWN, 0)
        read = ([up, down] * per_read)[:per_read]
        # one per read alternates UP and DOWN across reads, so every flush writes
        reads = [[up], [down]] * (count // 2) if per_read == 1 else [read] * (count // per_read)
        as_bytes = hasattr(protocol, "split_packets")  # the handler takes one bytes a read
        blobs = {id(r): bytearray(b"".join(r)) for r in reads}
        for read in reads:
            blob = bytes(blobs[id(read)])  # fresh, as recv gives it
            if as_bytes:
                power.handle_vm_packets(channel, blob)
            else:
                size = protocol.PACKET_SIZE
                power.handle_vm_packets(
                    channel, [blob[i : i + size] for i in range(0, len(blob), size)]
                )
            power.flush()
            channel._tx.clear()  # nobody reads: keep the queue from growing
            channel._tx_count = 0
        power.restore_all()
        hypervisor.close()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else PER_READ)
