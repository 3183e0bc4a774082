"""Bench only: libvirt's test driver presenting a large host (bench/bench_scale.py).

The test driver reports 8 host CPUs whatever its node XML says, and keeps vCPU pins
within them. bench_scale puts this directory first on the daemon's PYTHONPATH, so
Python imports this module at start-up; it wraps four libvirt calls, each still made
for real underneath (their cost stays in the figures):

* ``virConnect.getCPUMap``: the CPU count is $VMPOWER_BENCH_HOST_CPUS;
* ``virDomain.vcpuPinInfo``: each vCPU's pins from $VMPOWER_BENCH_PINS (a JSON file,
  VM name -> one host CPU per vCPU);
* ``virDomain.XMLDesc``: the same pins in the live XML's ``<vcpupin>`` elements (vmpowerd
  reads a running VM's pins from there);
* ``libvirt.open``: its duration (the test driver parsing the node XML, a cost a real
  libvirtd does not have at connect) and the resident memory it added (the test
  driver's domains live in this process; libvirtd keeps them in its own) appended to
  $VMPOWER_BENCH_OPEN_LOG: start, end (monotonic s), RSS before, after (KiB).

Nothing happens unless $VMPOWER_BENCH_HOST_CPUS is set.
"""

from __future__ import annotations

import json
import os
import re
import time


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _install() -> None:
    cpus = int(os.environ["VMPOWER_BENCH_HOST_CPUS"])
    with open(os.environ["VMPOWER_BENCH_PINS"]) as f:
        pins: dict[str, list[int]] = json.load(f)
    open_log = os.environ.get("VMPOWER_BENCH_OPEN_LOG")

    import libvirt

    rows = {c: tuple(i == c for i in range(cpus)) for c in range(cpus)}
    real_map = libvirt.virConnect.getCPUMap
    real_pins = libvirt.virDomain.vcpuPinInfo
    real_open = libvirt.open
    real_xml = libvirt.virDomain.XMLDesc
    vcpupin = re.compile(r"<vcpupin vcpu='(\d+)' cpuset='[^']*'/>")

    def get_cpu_map(self, flags=0):
        real_map(self, flags)
        return (cpus, tuple(True for _ in range(cpus)), cpus)

    def vcpu_pin_info(self, flags):
        real = real_pins(self, flags)
        mine = pins.get(self.name())
        if mine is None:
            return real
        return [rows[c] for c in mine]

    def xml_desc(self, flags=0):
        xml = real_xml(self, flags)
        mine = pins.get(self.name())
        if mine is None:
            return xml
        return vcpupin.sub(
            lambda m: f"<vcpupin vcpu='{m.group(1)}' cpuset='{mine[int(m.group(1))]}'/>", xml
        )

    def open_(name=None):
        rss0 = _rss_kib()
        t0 = time.monotonic()
        conn = real_open(name)
        t1 = time.monotonic()
        if open_log:
            with open(open_log, "a") as f:
                f.write(f"{t0:.6f} {t1:.6f} {rss0} {_rss_kib()}\n")
        return conn

    libvirt.virConnect.getCPUMap = get_cpu_map
    libvirt.virDomain.vcpuPinInfo = vcpu_pin_info
    libvirt.virDomain.XMLDesc = xml_desc
    libvirt.open = open_


if os.environ.get("VMPOWER_BENCH_HOST_CPUS"):
    _install()
