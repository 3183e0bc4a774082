"""Scale costs that must not grow with the number of VMs (issue #16), per component:

* the restore journal at first contact: 512 new files (256 CPUs x governor and
  setspeed of a simulated acpi-cpufreq tree) recorded one file at a time (one sync
  each) and in turns of 32 CPUs (``begin_turn``: one sync per turn); bytes handed to
  write(2) per new file at the start and at the end;
* one VM's sockets in a channels directory of 1000 and 4000 VMs x 4 sockets (what
  ``add_vm`` and a one-VM re-read look up), against one listing of the whole directory
  (what reading every domain at start does).

Not covered yet (issue #16's daemon-level scale case): start-up to all channels
served, RSS and idle CPU with a C stand-in for QEMU, list_vms and add_vm through the
control socket under traffic, guests' latency at first contact.
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from vmpower.cpufreq import open_cpufreq
from vmpower.cpufreq.simulate import build_tree
from vmpower.hypervisor.domain_xml import scan_channels_dir
from vmpower.restore import RestoreJournal
from vmpower.sysfs import Sysfs

CPUS = 256
TURN_CPUS = 32


def _wchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def _journal_case(tmp: Path, batched: bool) -> dict[str, Any]:
    root = tmp / ("sys-b" if batched else "sys-1")
    build_tree(root, "acpi-cpufreq", CPUS)
    journal = RestoreJournal(tmp / ("state-b" if batched else "state-1"))
    cpufreq = open_cpufreq(Sysfs(root, journal))
    turn_ms: list[float] = []
    first_bytes = last_bytes = 0
    start = time.perf_counter()
    for base in range(0, CPUS, TURN_CPUS):
        cpus = range(base, base + TURN_CPUS)
        t0 = time.perf_counter()
        w0 = _wchar()
        if batched:
            journal.begin_turn([cpufreq.cpufreq_path_prefix(c) for c in cpus])
        for cpu in cpus:
            cpufreq.set_khz(cpu, min(cpufreq.table_khz(cpu)))
        if batched:
            journal.end_turn()
        per_file = (_wchar() - w0) / (2 * TURN_CPUS)
        if base == 0:
            first_bytes = round(per_file)
        last_bytes = round(per_file)
        turn_ms.append((time.perf_counter() - t0) * 1e3)
    total_s = time.perf_counter() - start
    files = journal.pending_count()
    journal.restore()
    cpufreq.close()
    journal.close()
    return {
        "files": files,
        "total_s": round(total_s, 3),
        "turn_ms_median": round(statistics.median(turn_ms), 2),
        "turn_ms_max": round(max(turn_ms), 2),
        "bytes_written_per_new_file_first_turn": first_bytes,
        "bytes_written_per_new_file_last_turn": last_bytes,
    }


def _channels_case(tmp: Path, vms: int) -> dict[str, Any]:
    where = tmp / f"ch{vms}"
    where.mkdir()
    for vm in range(vms):
        for n in range(4):
            # A closed bound socket leaves its socket file, as a QEMU's would: no fd kept.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.bind(str(where / f"vm{vm}.{n}"))
    one: list[float] = []
    for i in range(200):
        t0 = time.perf_counter()
        found = scan_channels_dir(where).get(f"vm{(i * 37) % vms}", {})
        one.append((time.perf_counter() - t0) * 1e3)
        assert len(found) == 4
    every: list[float] = []
    for _ in range(5):
        t0 = time.perf_counter()
        sockets = scan_channels_dir(where)
        assert all(len(sockets.get(f"vm{vm}", {})) == 4 for vm in range(vms))
        every.append((time.perf_counter() - t0) * 1e3)
    one.sort()
    return {
        "one_vm_ms_p50": round(one[len(one) // 2], 3),
        "one_vm_ms_p99": round(one[int(len(one) * 0.99)], 3),
        "every_vm_ms_median": round(statistics.median(every), 1),
    }


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("VMPOWER_BENCH_TMP")) as name:
        tmp = Path(name)
        return {
            "journal_first_contact_256_cpus": {
                "one_sync_per_file": _journal_case(tmp, batched=False),
                "one_sync_per_turn": _journal_case(tmp, batched=True),
            },
            "channels_dir_1000_vms": _channels_case(tmp, 1000),
            "channels_dir_4000_vms": _channels_case(tmp, 4000),
            "targets": {
                "add_vm_p99_ms_at_1000_vms": 2.0,
                "first_contact_p99_ms": 2.0,
                "first_contact_max_ms": 50.0,
            },
        }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=1))
