"""Simulated cpufreq sysfs trees, and the kernel's rules on them.

This module owns two things used by tests, the demo and ``vmpower simulate-sysfs``:

* ``build_tree(root, driver, cpus, ...)`` writes, under ``root`` (which plays ``/sys``),
  the files the kernel exposes for one scaling driver, with realistic values in kHz:
  ``devices/system/cpu/{online,offline,present,possible}``, ``cpuN/online`` (not for
  cpu0, which cannot be unplugged on x86), ``cpufreq/policyN/`` with the driver's
  attributes and ``cpuN/cpufreq`` as a symlink to it (as the cpufreq core does), plus
  the driver's global directory (``intel_pstate/``, ``amd_pstate/``, ``cpufreq/boost``)
  and ``cpuN/acpi_cppc/`` where the platform has CPPC. The files are described in the
  kernel's Documentation/admin-guide/pm/{cpufreq,intel_pstate,amd-pstate}.rst and
  Documentation/admin-guide/acpi/cppc_sysfs.rst.
* ``KernelSysfs``: a ``Sysfs`` whose writes obey what the kernel would do on such a
  tree (refusals with EINVAL/EBUSY/EACCES, and side effects such as
  ``scaling_setspeed`` reading ``<unsupported>`` unless the governor is userspace).
  Plain files accept any write; this class is how tests prove vmpower never asks the
  kernel for something it would refuse.
* ``build_from_fixture(root, fixture)`` writes the tree of a real host from a fixture
  distilled from a recording (``tests/data/real-hosts/*.json``), so tests and the demo run
  on real hosts' shapes: hybrid cores, per-policy ``boost``, policies spanning several
  CPUs, a boost range above the ACPI ``_PSS`` table.

What the kernel knows but sysfs does not show (the turbo ceiling while ``no_turbo=1``,
the non-turbo maximum, the firmware's EPP default, whether the firmware disabled
turbo) is written once under ``<root>/.kernel/``, which vmpower never reads; only
``KernelSysfs`` uses it, as the kernel would.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmpower.cpuset import format_cpu_list, parse_cpu_list
from vmpower.errors import CpuListError, SysfsError
from vmpower.sysfs import Sysfs

DRIVERS = (
    "acpi-cpufreq",
    "intel_pstate",
    "intel_cpufreq",
    "amd-pstate-epp",
    "amd-pstate",
    "cppc_cpufreq",
)

CPU_DIR = "devices/system/cpu"
UNSUPPORTED = "<unsupported>"  # what scaling_setspeed reads unless the governor is userspace

# cpufreq.c show_scaling_available_governors() prints each name followed by a space; the
# drivers with their own algorithms print exactly "performance powersave".
_GENERIC_GOVERNORS = "conservative ondemand userspace powersave performance schedutil "
# intel_pstate (active) and amd-pstate-epp offer only their own two algorithms.
_SETPOLICY_GOVERNORS = "performance powersave"
_EPP_CHOICES = "default performance balance_performance balance_power power"
# what energy_performance_available_preferences shows: each name followed by a space
_EPP_SHOWN = _EPP_CHOICES + " "
# amd-pstate-epp lists only this under the performance governor (amd-pstate.c,
# show_energy_performance_available_preferences)
_EPP_PERFORMANCE_ONLY = "performance"
# intel_pstate.c / amd-pstate.c energy_perf_strings[]: the names either driver accepts
_EPP_NAMES = frozenset(_EPP_CHOICES.split())
KERNEL_DIR = ".kernel"  # kernel-internal facts of a simulated tree (see the docstring)
_U64_MAX = "18446744073709551615"


@dataclass(frozen=True)
class _Policy:
    """What one CPU's policy directory holds: file name → content (without newline)."""

    files: dict[str, str]
    cppc: dict[str, str] | None  # cpuN/acpi_cppc/ files, when the platform has CPPC


def build_tree(
    root: str | os.PathLike[str],
    driver: str,
    cpus: int,
    turbo: bool = False,
    offline: frozenset[int] | Iterable[int] = frozenset(),
    *,
    governor: str | None = None,
    priority_cpus: frozenset[int] | Iterable[int] = frozenset(),
    no_turbo: bool = False,
    vendor: str = "intel",
    packages: int | None = None,
    cpus_per_policy: int = 1,
) -> None:
    """Write a simulated sysfs for ``driver`` with ``cpus`` CPUs under ``root``.

    ``cpus_per_policy``: CPUs sharing one cpufreq policy, in consecutive runs (policyM
    for CPUs M to M+N-1, as on hosts whose cores share a clock domain): the policy's
    files once under ``cpufreq/policyM/``, ``related_cpus`` listing the run,
    ``affected_cpus`` its online CPUs, and each online CPU's ``cpufreq`` linking there.

    ``packages``: the CPUs are split in this many consecutive runs, one per package
    (``cpuN/topology/physical_package_id``; None: no topology files, as before, which
    readers take as one package 0); intel-rapl zones: ``add_rapl_zone``.
    ``turbo``: the CPUs have a turbo (boost) range and it is switched on.
    ``offline``: CPUs that are present but offline (online=0, no ``cpuN/cpufreq`` link).
    ``governor``: the initial scaling governor (default: the driver's usual one).
    ``priority_cpus``: CPUs that can run faster than the others (Intel SST-BF: higher
    ``base_frequency``; AMD preferred cores: higher ``amd_pstate_prefcore_ranking``;
    CPPC: higher ``highest_perf``).
    ``no_turbo``: intel_pstate / intel_cpufreq booted with ``no_turbo=1`` on a CPU that
    has turbo (``turbo=True``): since the 2024 ``store_no_turbo()`` rework the kernel
    shows ``cpuinfo_max_freq`` = the non-turbo maximum until turbo is allowed again.
    ``vendor``: "amd" gives acpi-cpufreq the shape of an EPYC host: a short ``_PSS``
    table and, with ``turbo``, ``cpuinfo_max_freq`` above its top entry (the kernel's
    ``get_max_boost_ratio``) instead of Intel's one turbo entry 1 MHz above the rest.
    """
    root_path = Path(root)
    offline_set = frozenset(offline)
    priority = frozenset(priority_cpus)
    _check_args(root_path, driver, cpus, offline_set, priority)
    if no_turbo and (driver not in ("intel_pstate", "intel_cpufreq") or not turbo):
        raise ValueError("no_turbo needs intel_pstate or intel_cpufreq with turbo")
    if vendor not in ("intel", "amd") or (vendor == "amd" and driver != "acpi-cpufreq"):
        raise ValueError(f"vendor {vendor!r}: 'intel', or 'amd' with acpi-cpufreq")
    if isinstance(cpus_per_policy, bool) or not isinstance(cpus_per_policy, int):
        raise ValueError(f"cpus_per_policy must be an integer, got {cpus_per_policy!r}")
    if not 1 <= cpus_per_policy <= cpus:
        raise ValueError(f"cpus_per_policy must be from 1 to {cpus}, got {cpus_per_policy}")
    policies = [_policy(driver, cpu, turbo, governor, priority, vendor) for cpu in range(cpus)]
    leaders = range(0, cpus, cpus_per_policy)
    for first in leaders:
        run = range(first, min(first + cpus_per_policy, cpus))
        files = policies[first].files
        files["related_cpus"] = " ".join(map(str, run))
        files["affected_cpus"] = " ".join(str(c) for c in run if c not in offline_set)
    if driver == "acpi-cpufreq" and cpus % 2 == 0:
        # _PSD HW_ALL domains of SMT siblings (CPU n and n + cpus/2), as on the recorded
        # hosts: freqdomain_cpus lists them, each CPU keeps its own policy.
        half = cpus // 2
        for cpu, policy in enumerate(policies):
            policy.files["freqdomain_cpus"] = " ".join(map(str, sorted({cpu, (cpu + half) % cpus})))
    governors = policies[0].files["scaling_available_governors"].split()
    if policies[0].files["scaling_governor"] not in governors:
        raise ValueError(f"{driver} has no governor {governor!r} (it has: {' '.join(governors)})")
    cpu_dir = root_path / CPU_DIR
    cpu_dir.mkdir(parents=True, exist_ok=True)
    everything = format_cpu_list(range(cpus))
    online = [c for c in range(cpus) if c not in offline_set]
    _put(cpu_dir / "present", everything)
    _put(cpu_dir / "possible", everything)
    _put(cpu_dir / "online", format_cpu_list(online))
    _put(cpu_dir / "offline", format_cpu_list(offline_set))
    _put(cpu_dir / "kernel_max", "8191")
    for cpu, policy in enumerate(policies):
        base = cpu_dir / f"cpu{cpu}"
        base.mkdir(exist_ok=True)
        if cpu != 0:  # x86 cannot unplug the boot CPU: cpu0 has no online file
            _put(base / "online", "0" if cpu in offline_set else "1")
        if packages and cpu not in offline_set:  # an offline CPU has no topology/
            (base / "topology").mkdir(exist_ok=True)
            _put(base / "topology" / "physical_package_id", str(cpu * packages // cpus))
        leader = cpu - cpu % cpus_per_policy
        if cpu == leader:
            policy_dir = cpu_dir / "cpufreq" / f"policy{cpu}"
            policy_dir.mkdir(parents=True, exist_ok=True)
            for name, value in policy.files.items():
                _put(policy_dir / name, value)
            _kernel_facts(root_path, driver, cpu, policy, turbo)
        if policy.cppc is not None:
            (base / "acpi_cppc").mkdir(exist_ok=True)
            for name, value in policy.cppc.items():
                _put(base / "acpi_cppc" / name, value)
        _link_policy(root_path, cpu, cpu not in offline_set, leader)
    _global_files(root_path, driver, turbo, priority)
    _put_kernel(root_path, "turbo_disabled", "0" if turbo else "1")
    if no_turbo:
        _boot_no_turbo(root_path, leaders)


def _kernel_facts(root: Path, driver: str, cpu: int, policy: _Policy, turbo: bool) -> None:
    """The hidden per-policy facts of a synthetic tree (see KERNEL_DIR)."""
    files = policy.files
    top = int(files["cpuinfo_max_freq"])
    if driver in ("intel_pstate", "intel_cpufreq"):
        nonturbo = 3_300_000 if files.get("base_frequency") == "3300000" else 3_000_000
        _put_kernel(root, f"policy{cpu}/nonturbo_max_freq", str(nonturbo))
        _put_kernel(root, f"policy{cpu}/turbo_max_freq", str(top))
    elif driver.startswith("amd-pstate"):
        _put_kernel(root, f"policy{cpu}/nonturbo_max_freq", "3300000")
        _put_kernel(root, f"policy{cpu}/turbo_max_freq", files["amd_pstate_max_freq"])
    if "energy_performance_preference" in files:
        _put_kernel(root, f"policy{cpu}/epp_default", "balance_performance")


def _boot_no_turbo(root: Path, policies: Iterable[int]) -> None:
    """As if booted with no_turbo=1: cpuinfo_max_freq and the limits at the non-turbo max."""
    cpu_dir = root / CPU_DIR
    _put(cpu_dir / "intel_pstate" / "no_turbo", "1")
    for num in policies:
        pol = cpu_dir / "cpufreq" / f"policy{num}"
        nonturbo = int(_get(root / KERNEL_DIR / f"policy{num}" / "nonturbo_max_freq"))
        _put(pol / "cpuinfo_max_freq", str(nonturbo))
        for name in ("scaling_max_freq", "scaling_min_freq", "scaling_cur_freq"):
            if (pol / name).exists() and int(_get(pol / name)) > nonturbo:
                _put(pol / name, str(nonturbo))


def _put_kernel(root: Path, name: str, value: str) -> None:
    path = root / KERNEL_DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    _put(path, value)


RAPL_DIR = "devices/virtual/powercap/intel-rapl"
RAPL_MAX_RANGE_UJ = 262143328850  # a common max_energy_range_uj (2^38 * 61 uJ / 64)


def add_rapl_zone(
    root: str | os.PathLike[str],
    package: int,
    energy_uj: int = 0,
    max_energy_range_uj: int = RAPL_MAX_RANGE_UJ,
) -> Path:
    """An intel-rapl package zone under ``root`` as the powercap class shows it
    (Documentation/power/powercap/powercap.rst): ``intel-rapl:<package>/`` with
    ``name`` = ``package-<package>``, ``max_energy_range_uj`` and ``energy_uj``, plus
    a core subzone ``intel-rapl:<package>:0``. Returns the ``energy_uj`` path (write
    it to make energy flow; it wraps to 0 past ``max_energy_range_uj``)."""
    zone = Path(root) / RAPL_DIR / f"intel-rapl:{package}"
    zone.mkdir(parents=True, exist_ok=True)
    _put(zone / "name", f"package-{package}")
    _put(zone / "max_energy_range_uj", str(max_energy_range_uj))
    _put(zone / "energy_uj", str(energy_uj))
    sub = zone / f"intel-rapl:{package}:0"
    sub.mkdir(exist_ok=True)
    _put(sub / "name", "core")
    _put(sub / "max_energy_range_uj", str(max_energy_range_uj))
    _put(sub / "energy_uj", "0")
    return zone / "energy_uj"


def set_cpu_online(root: str | os.PathLike[str], cpu: int, online: bool) -> None:
    """Hot-(un)plug ``cpu`` the way the kernel shows it: online file, lists, policy link."""
    cpu_dir = Path(root) / CPU_DIR
    online_file = cpu_dir / f"cpu{cpu}" / "online"
    if not online_file.exists():
        raise SysfsError(str(online_file), "no such file (this CPU cannot be unplugged)")
    _put(online_file, "1" if online else "0")
    present = parse_cpu_list(_get(cpu_dir / "present"))
    now_online = set(parse_cpu_list(_get(cpu_dir / "online")))
    if online:
        now_online.add(cpu)
    else:
        now_online.discard(cpu)
    _put(cpu_dir / "online", format_cpu_list(now_online))
    _put(cpu_dir / "offline", format_cpu_list(present - now_online))
    leader = cpu
    for pol in sorted((cpu_dir / "cpufreq").glob("policy*")):
        related = pol / "related_cpus"
        if related.is_file() and str(cpu) in _get(related).split():
            leader = int(pol.name[len("policy") :])
            # the policy's online CPUs (cpufreq.c: policy->cpus)
            affected = [int(c) for c in _get(related).split() if int(c) in now_online]
            _put(pol / "affected_cpus", " ".join(map(str, affected)))
            break
    _link_policy(Path(root), cpu, online, leader)


def snapshot(root: str | os.PathLike[str]) -> dict[str, str]:
    """Every regular file of a simulated tree: path relative to ``root`` → content."""
    base = Path(root)
    files: dict[str, str] = {}
    for dirpath, _dirs, names in os.walk(base):  # symlinks are not followed: no duplicates
        for name in names:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                files[str(path.relative_to(base))] = path.read_text()
    return files


def _check_args(
    root: Path, driver: str, cpus: int, offline: frozenset[int], priority: frozenset[int]
) -> None:
    if driver not in DRIVERS:
        raise ValueError(f"unknown driver {driver!r} (known: {', '.join(DRIVERS)})")
    if isinstance(cpus, bool) or not isinstance(cpus, int) or not 1 <= cpus <= 8192:
        raise ValueError(f"cpus must be an integer from 1 to 8192, got {cpus!r}")
    if 0 in offline:
        raise ValueError("cpu0 cannot be offline (the kernel gives it no online file)")
    outside = sorted(c for c in offline | priority if c >= cpus)
    if outside:
        raise ValueError(f"CPU {outside[0]} is not among the {cpus} CPUs")
    resolved = root.resolve()
    if resolved == Path("/") or resolved == Path("/sys") or Path("/sys") in resolved.parents:
        raise ValueError(f"refusing to build a simulated tree in {resolved}")


def _policy(
    driver: str,
    cpu: int,
    turbo: bool,
    governor: str | None,
    priority: frozenset[int],
    vendor: str = "intel",
) -> _Policy:
    # cpuinfo_avg_freq: kernels >= 6.13 where APERF/MPERF are usable (every recorded host
    # but one has it)
    common = {"affected_cpus": str(cpu), "related_cpus": str(cpu), "cpuinfo_avg_freq": "0"}
    if driver == "acpi-cpufreq":
        if vendor == "amd":
            # An EPYC 7543 (tests/data/real-hosts/milan0.json): three _PSS entries, and the
            # boost range above P0 shows only in cpuinfo_max_freq (get_max_boost_ratio).
            table = [2_800_000, 2_100_000, 1_500_000]
            top = 3_739_225 if turbo else table[0]
        else:
            # _PSS convention: the whole turbo range is one entry 1 MHz above the highest
            # non-turbo P-state (intel_pstate.rst, "intel_pstate vs acpi-cpufreq").
            table = list(range(2_300_000, 1_100_000, -100_000))
            if turbo:
                table.insert(0, table[0] + 1000)
            top = table[0]
        gov = governor or "schedutil"
        cur = table[-1] if vendor == "amd" else 1_600_000
        files = {
            **common,
            "cpuinfo_min_freq": str(table[-1]),
            "cpuinfo_max_freq": str(top),
            "cpuinfo_cur_freq": str(cur),
            "cpuinfo_transition_latency": "10000",
            "bios_limit": str(table[0]),
            "freqdomain_cpus": str(cpu),
            "scaling_boost_frequencies": "",
            "scaling_driver": driver,
            "scaling_available_governors": _GENERIC_GOVERNORS,
            "scaling_governor": gov,
            "scaling_min_freq": str(table[-1]),
            "scaling_max_freq": str(table[0]),
            "scaling_cur_freq": str(cur),
            "scaling_setspeed": str(cur) if gov == "userspace" else UNSUPPORTED,
            # the kernel prints each entry followed by a space (show_available_freqs)
            "scaling_available_frequencies": " ".join(str(f) for f in table) + " ",
        }
        if turbo:
            files["boost"] = "1"  # per-policy boost (cpufreq.c, show_local_boost)
        if vendor == "amd":
            files["cpb"] = "1"  # acpi-cpufreq's legacy AMD boost attribute
        return _Policy(files, None)
    if driver == "intel_cpufreq":
        # intel_pstate in passive mode without HWP (tests/data/real-hosts/bdwep0.json): no
        # base_frequency and no EPP; generic governors; the P-state grid is 100 MHz.
        max_khz = 4_700_000 if turbo else 3_000_000
        gov = governor or "schedutil"
        files = {
            **common,
            "cpuinfo_min_freq": "800000",
            "cpuinfo_max_freq": str(max_khz),
            "cpuinfo_transition_latency": "20000",
            "scaling_driver": driver,
            "scaling_available_governors": _GENERIC_GOVERNORS,
            "scaling_governor": gov,
            "scaling_min_freq": "800000",
            "scaling_max_freq": str(max_khz),
            "scaling_cur_freq": "800000",
            "scaling_setspeed": "800000" if gov == "userspace" else UNSUPPORTED,
        }
        return _Policy(files, None)
    if driver == "intel_pstate":
        base = 3_300_000 if cpu in priority else 3_000_000
        max_khz = 4_700_000 if turbo else base
        gov = governor or "powersave"
        files = {
            **common,
            "cpuinfo_min_freq": "800000",
            "cpuinfo_max_freq": str(max_khz),
            "cpuinfo_transition_latency": "0",
            "base_frequency": str(base),
            "scaling_driver": driver,
            "scaling_available_governors": _SETPOLICY_GOVERNORS,
            "scaling_governor": gov,
            "scaling_min_freq": "800000",
            "scaling_max_freq": str(max_khz),
            "scaling_cur_freq": "1200000",
            "scaling_setspeed": UNSUPPORTED,
            "energy_performance_available_preferences": _EPP_SHOWN,
            # HWP + performance forces EPP 0 (intel_pstate.rst, "HWP + performance")
            "energy_performance_preference": (
                "performance" if gov == "performance" else "balance_performance"
            ),
        }
        return _Policy(files, None)
    if driver in ("amd-pstate", "amd-pstate-epp"):
        # Values of the amd-pstate.rst example: highest 166 (4.68 GHz), nominal 117
        # (3.30 GHz), lowest non-linear 39 (1.10 GHz), lowest 15 (400 MHz).
        nominal_perf = 117
        ranking = (236 if cpu in priority else 196) if turbo else nominal_perf
        max_khz = 4_680_000 if turbo else 3_300_000
        epp = driver == "amd-pstate-epp"
        gov = governor or ("powersave" if epp else "schedutil")
        files = {
            **common,
            "cpuinfo_min_freq": "400000",
            "cpuinfo_max_freq": str(max_khz),
            "cpuinfo_transition_latency": "0" if epp else "20000",
            "scaling_driver": driver,
            "scaling_available_governors": _SETPOLICY_GOVERNORS if epp else _GENERIC_GOVERNORS,
            "scaling_governor": gov,
            # amd-pstate-epp starts at the lowest non-linear frequency
            "scaling_min_freq": "1100000" if epp else "400000",
            "scaling_max_freq": str(max_khz),
            "scaling_cur_freq": "1100000",
            "scaling_setspeed": UNSUPPORTED,
            "amd_pstate_highest_perf": "166" if turbo else str(nominal_perf),
            "amd_pstate_max_freq": str(max_khz),
            "amd_pstate_lowest_nonlinear_freq": "1100000",
            "amd_pstate_hw_prefcore": "enabled" if priority else "disabled",
            "amd_pstate_prefcore_ranking": str(ranking),
        }
        if turbo:
            files["boost"] = "1"
        if epp:
            files["energy_performance_available_preferences"] = (
                _EPP_PERFORMANCE_ONLY if gov == "performance" else _EPP_SHOWN
            )
            files["energy_performance_preference"] = (
                "performance" if gov == "performance" else "balance_performance"
            )
        cppc = _cppc(
            highest=ranking if turbo else nominal_perf,
            nominal=nominal_perf,
            lowest_nonlinear=39,
            lowest=15,
            nominal_mhz=3300,
            lowest_mhz=400,
        )
        return _Policy(files, cppc)
    # cppc_cpufreq (arm64 servers): the perf scale is MHz on this platform.
    highest = (3300 if turbo else 3000) + (200 if cpu in priority else 0)
    gov = governor or "schedutil"
    cur = 2_000_000
    files = {
        **common,
        "cpuinfo_min_freq": "1000000",
        "cpuinfo_max_freq": str(highest * 1000),
        "cpuinfo_cur_freq": str(cur),
        "cpuinfo_transition_latency": "10000",
        "freqdomain_cpus": str(cpu),
        "scaling_driver": driver,
        "scaling_available_governors": _GENERIC_GOVERNORS,
        "scaling_governor": gov,
        "scaling_min_freq": "1000000",
        "scaling_max_freq": str(highest * 1000),
        "scaling_cur_freq": str(cur),
        "scaling_setspeed": str(cur) if gov == "userspace" else UNSUPPORTED,
    }
    cppc = _cppc(
        highest=highest,
        nominal=3000,
        lowest_nonlinear=1000,
        lowest=1000,
        nominal_mhz=3000,
        lowest_mhz=1000,
    )
    return _Policy(files, cppc)


def _cppc(
    *,
    highest: int,
    nominal: int,
    lowest_nonlinear: int,
    lowest: int,
    nominal_mhz: int,
    lowest_mhz: int,
) -> dict[str, str]:
    # cppc_sysfs.rst: *_perf are on an abstract scale; nominal_freq/lowest_freq are MHz.
    return {
        "highest_perf": str(highest),
        "nominal_perf": str(nominal),
        "lowest_nonlinear_perf": str(lowest_nonlinear),
        "lowest_perf": str(lowest),
        "nominal_freq": str(nominal_mhz),
        "lowest_freq": str(lowest_mhz),
        "reference_perf": str(nominal),
        "wraparound_time": _U64_MAX,
        "feedback_ctrs": "ref:0 del:0",
    }


def _global_files(root: Path, driver: str, turbo: bool, priority: frozenset[int]) -> None:
    cpu_dir = root / CPU_DIR
    if driver in ("intel_pstate", "intel_cpufreq"):
        glob = cpu_dir / "intel_pstate"
        glob.mkdir(exist_ok=True)
        top = 47 if turbo else 30
        _put(glob / "status", "active" if driver == "intel_pstate" else "passive")
        # no_turbo reads 1 when the processor has no turbo range at all
        _put(glob / "no_turbo", "0" if turbo else "1")
        _put(glob / "max_perf_pct", "100")
        _put(glob / "min_perf_pct", str(round(8 * 100 / top)))
        _put(glob / "num_pstates", str(top - 8 + 1))
        _put(glob / "turbo_pct", str(turbo_pct(8, 30, top)))
        if driver == "intel_pstate":  # HWP only
            _put(glob / "hwp_dynamic_boost", "0")
    elif driver.startswith("amd-pstate"):
        glob = cpu_dir / "amd_pstate"
        glob.mkdir(exist_ok=True)
        _put(glob / "status", "active" if driver == "amd-pstate-epp" else "passive")
        _put(glob / "prefcore", "enabled" if priority else "disabled")
    if turbo and driver in ("acpi-cpufreq", "amd-pstate", "amd-pstate-epp", "cppc_cpufreq"):
        # the cpufreq core's global switch, present when the driver can boost
        _put(cpu_dir / "cpufreq" / "boost", "1")


def turbo_pct(min_pstate: int, max_pstate: int, turbo_pstate: int) -> int:
    """``intel_pstate/turbo_pct`` as intel_pstate.c's show_turbo_pct() computes it, in
    its 8-bit fixed point (FRAC_BITS 8): 100 - the non-turbo share of all P-states."""
    total = turbo_pstate - min_pstate + 1
    no_turbo = max_pstate - min_pstate + 1
    turbo_fp = (no_turbo << 8) // total
    return 100 - ((turbo_fp * (100 << 8)) >> 8 >> 8)


def _link_policy(root: Path, cpu: int, present: bool, policy: int | None = None) -> None:
    # The kernel removes cpuN/cpufreq when the CPU goes offline (the policy directory
    # stays, inactive) and adds it back when it returns (cpufreq.rst, "Policy Objects").
    link = root / CPU_DIR / f"cpu{cpu}" / "cpufreq"
    if present and not link.is_symlink():
        link.symlink_to(f"../cpufreq/policy{cpu if policy is None else policy}")
    elif not present and link.is_symlink():
        link.unlink()


def _put(path: Path, value: str) -> None:
    path.write_text(value + "\n")


def _get(path: Path) -> str:
    return path.read_text().strip()


# -- the kernel's rules -------------------------------------------------------------

_POLICY_FILE = re.compile(r"^devices/system/cpu/(?:cpu(\d+)/cpufreq|cpufreq/policy(\d+))/(\w+)$")
_READ_ONLY = frozenset(
    {
        "affected_cpus",
        "related_cpus",
        "freqdomain_cpus",
        "bios_limit",
        "base_frequency",
        "cpuinfo_min_freq",
        "cpuinfo_max_freq",
        "cpuinfo_cur_freq",
        "cpuinfo_transition_latency",
        "scaling_driver",
        "scaling_available_governors",
        "scaling_available_frequencies",
        "scaling_cur_freq",
        "energy_performance_available_preferences",
        "amd_pstate_highest_perf",
        "amd_pstate_max_freq",
        "amd_pstate_lowest_nonlinear_freq",
        "amd_pstate_hw_prefcore",
        "amd_pstate_prefcore_ranking",
    }
)
_READ_ONLY_GLOBAL = re.compile(
    r"^devices/system/cpu/(?:online|offline|present|possible|kernel_max|cpu\d+/acpi_cppc/\w+"
    r"|intel_pstate/(?:num_pstates|turbo_pct)|amd_pstate/prefcore)$"
)


class KernelSysfs(Sysfs):
    """A Sysfs on a simulated tree that refuses and reacts as the kernel would.

    Refusals raise ``SysfsError`` naming the errno and the rule. Side effects (the
    current frequency following a new limit, ``scaling_setspeed`` following the
    governor, hotplug) are written without going through the journal, since the
    kernel makes them, not the writer.
    """

    def write_path(self, path: str, value: str | int) -> None:
        """Write an absolute path under the root (the restore journal's writer)."""
        rel = os.path.relpath(path, self.root)
        if rel.startswith(".."):
            raise SysfsError(path, f"outside the simulated root {self.root}")
        self.write(rel, value)

    def write(self, rel: str, value: str | int) -> None:
        rel = os.path.normpath(rel)
        text = str(value).strip()
        policy = _POLICY_FILE.match(rel)
        if policy is not None:
            cpu = int(policy.group(1) or policy.group(2))
            self._write_policy(rel, cpu, policy.group(3), text)
            return
        if _READ_ONLY_GLOBAL.match(rel):
            self._refuse(rel, text, "permission denied (EACCES): read-only attribute")
        if rel == f"{CPU_DIR}/cpufreq/boost":
            self._need_bool(rel, text)
            super().write(rel, text)
            # cpufreq.c, cpufreq_boost_trigger_state(): every policy follows the switch
            for num in self._policies():
                pol = f"{CPU_DIR}/cpufreq/policy{num}"
                if self.exists(f"{pol}/boost"):
                    self._raw(f"{pol}/boost", text)
                    self._boost_changed(pol)
            return
        if rel == f"{CPU_DIR}/intel_pstate/no_turbo":
            self._write_no_turbo(rel, text)
            return
        if rel in (f"{CPU_DIR}/intel_pstate/max_perf_pct", f"{CPU_DIR}/intel_pstate/min_perf_pct"):
            if not text.isdigit() or int(text) > 100:
                self._refuse(rel, text, "EINVAL: a percentage from 0 to 100")
            super().write(rel, text)
            return
        if rel == f"{CPU_DIR}/intel_pstate/status":
            if text not in ("active", "passive", "off"):
                self._refuse(rel, text, "EINVAL: one of active, passive, off")
            super().write(rel, text)
            return
        online = re.match(r"^devices/system/cpu/cpu(\d+)/online$", rel)
        if online is not None:
            self._need_bool(rel, text)
            super().write(rel, text)
            set_cpu_online(self.root, int(online.group(1)), text == "1")
            return
        super().write(rel, value)

    # -- per-policy attributes ------------------------------------------------------

    def _write_policy(self, rel: str, cpu: int, name: str, text: str) -> None:
        pol = f"{CPU_DIR}/cpufreq/policy{cpu}"
        if not os.path.isdir(self.path(os.path.dirname(rel))):
            self._refuse(rel, text, "no such file (the CPU is offline)")
        if name in _READ_ONLY:
            self._refuse(rel, text, "permission denied (EACCES): read-only attribute")
        if name == "scaling_governor":
            available = self.read(f"{pol}/scaling_available_governors").split()
            if text not in available:
                self._refuse(rel, text, f"EINVAL: not one of {' '.join(available)}")
            super().write(rel, text)
            if text == "userspace":
                self._raw(f"{pol}/scaling_setspeed", self.read(f"{pol}/scaling_cur_freq"))
            else:
                self._raw(f"{pol}/scaling_setspeed", UNSUPPORTED)
            if self.read(f"{pol}/scaling_driver") == "amd-pstate-epp":
                self._amd_epp_governor(pol, text)
            return
        if name == "scaling_setspeed":
            if self.read(f"{pol}/scaling_governor") != "userspace":
                self._refuse(rel, text, "EINVAL: the governor is not userspace")
            khz = self._need_int(rel, text)
            super().write(rel, str(khz))
            lo = self.read_int(f"{pol}/scaling_min_freq")
            hi = self.read_int(f"{pol}/scaling_max_freq")
            self._raw(f"{pol}/scaling_cur_freq", str(min(max(khz, lo), hi)))
            return
        if name in ("scaling_min_freq", "scaling_max_freq"):
            self._write_limit(rel, pol, name, text)
            return
        if name == "energy_performance_preference":
            self._write_epp(rel, pol, text)
            return
        if name == "boost":
            self._need_bool(rel, text)
            # cpufreq.c, store_local_boost(): -EINVAL while the global switch is off
            glob = f"{CPU_DIR}/cpufreq/boost"
            if self.exists(glob) and self.read(glob) == "0":
                self._refuse(rel, text, "EINVAL: the global cpufreq/boost is 0")
            super().write(rel, text)
            self._boost_changed(pol)
            return
        super().write(rel, text)

    def settle_cur(self, num: int) -> bool:
        """Set policy ``num``'s scaling_cur_freq where the hardware would settle under
        its governor and limits (a hardware stand-in calls it after other writers, such
        as vmpowerd on plain files); True if it changed. userspace: scaling_setspeed;
        the generic performance/powersave: the maximum/minimum; any other algorithm
        (schedutil, ondemand, intel_pstate's and amd-pstate-epp's own): the current
        reading, clamped into scaling_min_freq..scaling_max_freq (cpufreq.rst)."""
        pol = f"{CPU_DIR}/cpufreq/policy{num}"
        try:
            lo = self.read_int(f"{pol}/scaling_min_freq")
            hi = self.read_int(f"{pol}/scaling_max_freq")
            cur = self.read_int(f"{pol}/scaling_cur_freq")
            governor = self.read(f"{pol}/scaling_governor")
            generic = self.read(f"{pol}/scaling_available_governors").split()
        except (SysfsError, ValueError):
            return False  # mid-write by another process, or no such policy: next time
        want = cur
        if governor == "userspace":
            setspeed = self.read(f"{pol}/scaling_setspeed")
            want = int(setspeed) if setspeed.isdigit() else cur
        elif governor == "performance" and "userspace" in generic:
            want = hi
        elif governor == "powersave" and "userspace" in generic:
            want = lo
        want = min(max(want, lo), hi)
        if want == cur:
            return False
        self._raw(f"{pol}/scaling_cur_freq", str(want))
        return True

    def _write_limit(self, rel: str, pol: str, name: str, text: str) -> None:
        khz = self._need_int(rel, text)
        lo_hw = self.read_int(f"{pol}/cpuinfo_min_freq")
        hi_hw = self.read_int(f"{pol}/cpuinfo_max_freq")
        if self._no_turbo(pol):
            hi_hw = min(hi_hw, self.read_int(f"{pol}/base_frequency"))
        cur_min = self.read_int(f"{pol}/scaling_min_freq")
        cur_max = self.read_int(f"{pol}/scaling_max_freq")
        # Kernels before 5.3 refuse a minimum above the maximum (and the other way
        # round) with EINVAL; later ones keep the request and clamp. Writers must
        # order the two writes; this simulation holds them to the strict rule.
        if name == "scaling_min_freq" and khz > cur_max:
            self._refuse(rel, text, f"EINVAL: above scaling_max_freq {cur_max}")
        if name == "scaling_max_freq" and khz < cur_min:
            self._refuse(rel, text, f"EINVAL: below scaling_min_freq {cur_min}")
        # cpufreq_verify_within_cpu_limits(): silently clamped to the hardware range
        khz = min(max(khz, lo_hw), hi_hw)
        super().write(rel, str(khz))
        lo = khz if name == "scaling_min_freq" else cur_min
        hi = khz if name == "scaling_max_freq" else cur_max
        cur = self.read_int(f"{pol}/scaling_cur_freq")
        self._raw(f"{pol}/scaling_cur_freq", str(min(max(cur, lo), hi)))

    def _write_no_turbo(self, rel: str, text: str) -> None:
        self._need_bool(rel, text)
        # intel_pstate.c, store_no_turbo(): allowing turbo is -EPERM only when the
        # firmware disabled it (MSR_IA32_MISC_ENABLE), whatever cpuinfo_max_freq shows.
        if text == "0" and self._kernel("turbo_disabled") == "1":
            self._refuse(rel, text, "operation not permitted (EPERM): turbo disabled by firmware")
        super().write(rel, text)
        # Since the 2024 rework (intel_pstate_update_max_freq) every policy's
        # cpuinfo_max_freq is the turbo maximum or, with no_turbo=1, the non-turbo
        # maximum, and the limits in force are clamped to it again.
        for num in self._policies():
            pol = f"{CPU_DIR}/cpufreq/policy{num}"
            top = self._kernel(f"policy{num}/turbo_max_freq")
            nonturbo = self._kernel(f"policy{num}/nonturbo_max_freq")
            if top is None or nonturbo is None:
                continue
            self._set_cpuinfo_max(pol, int(nonturbo if text == "1" else top))

    def _set_cpuinfo_max(self, pol: str, top: int, follow: bool = False) -> None:
        """cpuinfo_max_freq changed: the limits in force follow (refresh_frequency_limits).

        The kernel keeps the user's scaling_max_freq request and clamps it to the new
        cpuinfo_max_freq; this simulation keeps no request, so a limit that stood at the
        old maximum (the default request, or one above it) follows to the new one, and a
        lower one stays (``follow``: the limit goes to the new maximum whatever it was).
        """
        old_top = self.read_int(f"{pol}/cpuinfo_max_freq")
        self._raw(f"{pol}/cpuinfo_max_freq", str(top))
        hi = self.read_int(f"{pol}/scaling_max_freq")
        hi = top if follow or hi >= old_top else min(hi, top)
        lo = min(self.read_int(f"{pol}/scaling_min_freq"), hi)
        self._raw(f"{pol}/scaling_max_freq", str(hi))
        self._raw(f"{pol}/scaling_min_freq", str(lo))
        cur = self.read_int(f"{pol}/scaling_cur_freq")
        self._raw(f"{pol}/scaling_cur_freq", str(min(max(cur, lo), hi)))

    def _boost_changed(self, pol: str) -> None:
        """amd-pstate: boost off brings cpuinfo_max_freq to nominal (amd_pstate_set_boost)."""
        if not self.read(f"{pol}/scaling_driver").startswith("amd-pstate"):
            return
        num = pol.rsplit("policy", 1)[1]
        top = self._kernel(f"policy{num}/turbo_max_freq")
        nominal = self._kernel(f"policy{num}/nonturbo_max_freq")
        if top is None or nominal is None:
            return
        on = self.read(f"{pol}/boost") == "1"
        # amd_pstate_cpu_boost_update(): policy->max = the new cpuinfo.max_freq, so a
        # limit written before does not survive a boost change
        self._set_cpuinfo_max(pol, int(top if on else nominal), follow=True)

    def _write_epp(self, rel: str, pol: str, text: str) -> None:
        driver = self.read(f"{pol}/scaling_driver")
        performance = self.read(f"{pol}/scaling_governor") == "performance"
        if driver.startswith("amd-pstate"):
            # amd-pstate.c store_energy_performance_preference(): match_string() on
            # its names, so raw numbers and unknown names are -EINVAL; under the
            # performance policy only "performance" is accepted (-EBUSY otherwise).
            if text not in _EPP_NAMES:
                self._refuse(rel, text, f"EINVAL: not one of {_EPP_CHOICES}")
        else:
            # intel_pstate.c: a listed name or a raw EPP value 0-255
            if text not in _EPP_NAMES and not (text.isdigit() and int(text) <= 255):
                self._refuse(rel, text, f"EINVAL: not one of {_EPP_CHOICES} or 0-255")
        # intel_pstate.rst (HWP + performance) and amd-pstate: only EPP 0 is accepted
        # under the performance governor, anything else is -EBUSY.
        if performance and text not in ("performance", "0"):
            self._refuse(rel, text, "device busy (EBUSY): governor is performance")
        if text == "default":
            # Both drivers write the firmware's default EPP; reading back shows its name
            # (or, on intel_pstate, the raw value when it matches no name): never
            # "default".
            text = self._kernel(f"{pol.rsplit('/', 1)[1]}/epp_default") or "balance_performance"
        elif text == "0":
            text = "performance"
        super().write(rel, text)

    def _amd_epp_governor(self, pol: str, governor: str) -> None:
        """amd-pstate-epp: the performance policy forces EPP 0 and lists only it; leaving
        it brings back every name and the firmware's default."""
        choices = f"{pol}/energy_performance_available_preferences"
        epp = f"{pol}/energy_performance_preference"
        if governor == "performance":
            self._raw(choices, _EPP_PERFORMANCE_ONLY)
            self._raw(epp, "performance")
        else:
            self._raw(choices, _EPP_SHOWN)
            default = self._kernel(f"{pol.rsplit('/', 1)[1]}/epp_default")
            self._raw(epp, default or "balance_performance")

    def _policies(self) -> list[int]:
        policies = self.path(f"{CPU_DIR}/cpufreq")
        names = os.listdir(policies) if os.path.isdir(policies) else []
        return sorted(int(n[6:]) for n in names if re.fullmatch(r"policy\d+", n))

    def _kernel(self, name: str) -> str | None:
        """A kernel-internal fact of the simulated tree (None: not known)."""
        try:
            with open(os.path.join(self.root, KERNEL_DIR, name)) as f:
                return f.read().strip()
        except OSError:
            return None

    def _no_turbo(self, pol: str) -> bool:
        flag = f"{CPU_DIR}/intel_pstate/no_turbo"
        return self.exists(flag) and self.exists(f"{pol}/base_frequency") and self.read(flag) == "1"

    # -- helpers --------------------------------------------------------------------

    def _need_int(self, rel: str, text: str) -> int:
        if not text.isdigit():
            self._refuse(rel, text, "EINVAL: expected a frequency in kHz")
        return int(text)

    def _need_bool(self, rel: str, text: str) -> None:
        if text not in ("0", "1"):
            self._refuse(rel, text, "EINVAL: expected 0 or 1")

    def _refuse(self, rel: str, text: str, why: str) -> None:
        raise SysfsError(self.path(rel), f"write {text!r}: refused by the kernel: {why}")

    def _raw(self, rel: str, text: str) -> None:
        """A side effect the kernel makes; a tree that cannot take it fails as sysfs does."""
        path = self.path(rel)
        try:
            with open(path, "w") as f:
                f.write(text + "\n")
        except OSError as exc:
            raise SysfsError(path, f"write {text!r}: {exc.strerror or exc}") from exc


# -- trees of real hosts ------------------------------------------------------------

FIXTURE_FORMAT = "vmpower-real-host/1"  # tests/data/real-hosts/README.md describes it
_FIXTURE_KEYS = (
    "host",
    "provenance",
    "driver",
    "global",
    "core_types",
    "present_cpus",
    "cpu_online_files",
    "policy_map",
    "cpu_lists",
    "shapes",
    "volatile_sample",
)
_CPU_LIST_FILES = ("related_cpus", "affected_cpus", "freqdomain_cpus")
# amd-pstate-epp under the performance governor shows only "performance": the firmware's
# EPP default is then not in the recording; this is the one both drivers usually start at
_ASSUMED_EPP_DEFAULT = "balance_performance"


def load_fixture(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A recorded host's fixture (``tests/data/real-hosts/<host>.json``), checked."""
    try:
        fixture = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable fixture: {exc}") from None
    if not isinstance(fixture, dict) or fixture.get("format") != FIXTURE_FORMAT:
        found = fixture.get("format") if isinstance(fixture, dict) else None
        raise ValueError(f"{path}: format {found!r}, expected {FIXTURE_FORMAT!r}")
    for key in _FIXTURE_KEYS:
        if key not in fixture:
            raise ValueError(f"{path}: fixture lacks {key!r}")
    _check_fixture(fixture)
    return fixture


def fixture_policies(fixture: Mapping[str, Any]) -> dict[int, list[int]]:
    """Policy number → its CPUs (related_cpus), in policy order."""
    pmap = fixture["policy_map"]
    if pmap["form"] == "one-per-cpu":
        pols = sorted(p for shape in fixture["shapes"] for p in parse_cpu_list(shape["policies"]))
        return {p: [p] for p in pols}
    return {
        int(p): sorted(parse_cpu_list(cpus))
        for p, cpus in sorted(pmap["policies"].items(), key=lambda kv: int(kv[0]))
    }


def fixture_shape(fixture: Mapping[str, Any], policy: int) -> dict[str, Any]:
    """The shape (files, acpi_cppc, volatile_files, stats) of one policy."""
    for shape in fixture["shapes"]:
        if policy in parse_cpu_list(shape["policies"]):
            return dict(shape)
    raise KeyError(f"{fixture['host']}: no policy{policy}")


def fixture_cpu_list(fixture: Mapping[str, Any], name: str, policy: int) -> str | None:
    """What ``policyM/<name>`` (related_cpus, affected_cpus, freqdomain_cpus) reads."""
    pattern = fixture["cpu_lists"].get(name)
    if pattern is None:
        return None
    if pattern["form"] == "self":
        return str(policy)
    if pattern["form"] == "groups":
        for value in pattern["values"]:
            if str(policy) in value.split():
                return str(value)
        raise KeyError(f"{fixture['host']}: {name} has no group for policy{policy}")
    return str(pattern["values"][str(policy)])


def kept_policies(fixture: Mapping[str, Any], max_cpus: int | None) -> dict[int, list[int]]:
    """The policies a tree of the first ``max_cpus`` CPUs keeps: every policy with a CPU
    below it, whole (so the tree may hold a few more CPUs than asked)."""
    pols = fixture_policies(fixture)
    if max_cpus is None:
        return pols
    if max_cpus < 1:
        raise ValueError(f"cpus must be at least 1, got {max_cpus}")
    return {p: c for p, c in pols.items() if min(c) < max_cpus}


def nonturbo_candidates_khz(fixture: Mapping[str, Any], policy: int = 0) -> list[int]:
    """The highest non-turbo frequencies consistent with ``intel_pstate/turbo_pct`` and
    ``num_pstates`` (100 MHz P-states from ``cpuinfo_min_freq``; intel_pstate.c
    show_turbo_pct); [] where the host lacks them (hybrid hosts, other drivers)."""
    glob = fixture["global"]
    if "intel_pstate/turbo_pct" not in glob or "intel_pstate/num_pstates" not in glob:
        return []
    pct = int(glob["intel_pstate/turbo_pct"])
    total = int(glob["intel_pstate/num_pstates"])
    low = int(fixture_shape(fixture, policy)["files"]["cpuinfo_min_freq"])
    return [
        low + (n - 1) * 100_000
        for n in range(1, total + 1)
        if turbo_pct(1, n, total) == pct  # P-states 1..n of 1..total are non-turbo
    ]


def build_from_fixture(
    root: str | os.PathLike[str],
    fixture: Mapping[str, Any] | str | os.PathLike[str],
    *,
    max_cpus: int | None = None,
    no_turbo: bool = False,
) -> dict[str, Any]:
    """Write the sysfs of a recorded host under ``root`` (which plays /sys); returns the
    fixture (a path is loaded with ``load_fixture``).

    Written: the recorded global files (``online``/``present`` shrunk to the kept CPUs),
    the hybrid core types' ``devices/cpu_*/cpus``, ``cpufreq/policyM/`` with the
    policy's recorded files (values followed by a newline as the kernel prints them,
    trailing spaces kept), its CPU lists, its volatile readings (policy 0's recorded
    sample clamped into the policy's limits), ``cpuN/online`` where the host has one,
    ``cpuN/acpi_cppc/*`` where recorded, and ``cpuN/cpufreq`` as a relative symlink to
    the policy for every online CPU (cpufreq.c, ``cpufreq_add_dev_interface``). Files
    the recording lacks (``possible``, ``offline``, ``kernel_max``, ``stats/``) are not
    invented. ``max_cpus``: keep only the policies with a CPU below it, whole.
    ``no_turbo``: an intel_pstate host booted with ``no_turbo=1`` (see build_tree).
    """
    if not isinstance(fixture, Mapping):
        fixture = load_fixture(fixture)
    else:
        _check_fixture(fixture)
    host = fixture["host"]
    root_path = Path(root)
    pols = kept_policies(fixture, max_cpus)
    kept = sorted(c for cs in pols.values() for c in cs)
    if not kept:
        raise ValueError(f"{host}: no CPU left below {max_cpus}")
    _check_args(root_path, "acpi-cpufreq", max(kept) + 1, frozenset(), frozenset())
    if no_turbo and fixture["driver"] not in ("intel_pstate", "intel_cpufreq"):
        raise ValueError(f"{host}: no_turbo is an intel_pstate setting")
    glob = fixture["global"]
    present = parse_cpu_list(fixture["present_cpus"]) & set(kept)
    online = parse_cpu_list(glob.get("online", fixture["present_cpus"])) & set(kept)
    cpu_dir = root_path / CPU_DIR
    cpu_dir.mkdir(parents=True, exist_ok=True)
    for rel, value in glob.items():
        if rel == "online":
            value = format_cpu_list(online)
        elif rel == "present":
            value = format_cpu_list(present)
        (cpu_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        _put(cpu_dir / rel, value)
    for core_type, listed in fixture["core_types"].items():
        (root_path / "devices" / core_type).mkdir(parents=True, exist_ok=True)
        _put(
            root_path / "devices" / core_type / "cpus",
            format_cpu_list(parse_cpu_list(listed) & set(kept)),
        )
    online_files = {
        cpu: value
        for value, listed in fixture["cpu_online_files"].items()
        for cpu in parse_cpu_list(listed)
    }
    sample = fixture["volatile_sample"].get("files", {})
    for pol, pol_cpus in pols.items():
        shape = fixture_shape(fixture, pol)
        pdir = cpu_dir / "cpufreq" / f"policy{pol}"
        pdir.mkdir(parents=True, exist_ok=True)
        for name, value in shape["files"].items():
            _put(pdir / name, value)
        for name in _CPU_LIST_FILES:
            listed = fixture_cpu_list(fixture, name, pol)
            if listed is not None:
                _put(pdir / name, listed)
        for name in shape["volatile_files"]:
            _put(pdir / name, _clamped_sample(shape["files"], sample.get(name)))
        for cpu in pol_cpus:
            base = cpu_dir / f"cpu{cpu}"
            base.mkdir(exist_ok=True)
            if cpu in online_files:
                _put(base / "online", online_files[cpu])
            if shape.get("acpi_cppc"):
                (base / "acpi_cppc").mkdir(exist_ok=True)
                for name, value in shape["acpi_cppc"].items():
                    _put(base / "acpi_cppc" / name, value)
            if cpu in online:
                (base / "cpufreq").symlink_to(f"../cpufreq/policy{pol}")
        _fixture_facts(root_path, fixture, pol, shape)
    _put_kernel(root_path, "turbo_disabled", "0")
    if no_turbo:
        _boot_no_turbo(root_path, pols)
    return dict(fixture)


def _clamped_sample(files: Mapping[str, str], sample: str | None) -> str:
    lo = int(files["scaling_min_freq"])
    hi = int(files["scaling_max_freq"])
    value = int(sample) if isinstance(sample, str) and sample.isdigit() else lo
    return str(min(max(value, lo), hi))


_FIXTURE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_FIXTURE_GLOBAL = re.compile(
    r"^(?:online|present|cpufreq/boost|cpufreq/[a-z]{1,32}/[a-z][a-z0-9_]{0,63}"
    r"|(?:intel_pstate|amd_pstate)/[a-z][a-z0-9_]{0,63})$"
)
_FIXTURE_CORE_TYPE = re.compile(r"^cpu_[a-z]{1,32}$")
_FIXTURE_VALUE_MAX = 4096


def _check_fixture(fixture: Mapping[str, Any]) -> None:
    """A fixture names only files of a cpufreq tree (no path of its choosing: every name
    is one plain component, every global file one of the drivers' directories), with
    one-line values and CPU lists of numbers; else ValueError naming what is wrong."""
    host = fixture.get("host", "?")

    def bad(where: str, why: str) -> ValueError:
        return ValueError(f"fixture {host}: {where}: {why}")

    def value(where: str, text: object) -> None:
        if not isinstance(text, str) or len(text) > _FIXTURE_VALUE_MAX or "\n" in text:
            raise bad(where, "not a one-line string")
        if "\0" in text:
            raise bad(where, "contains NUL")

    def cpus(where: str, text: object) -> None:
        value(where, text)
        try:
            parse_cpu_list(str(text))
        except CpuListError as exc:
            raise bad(where, str(exc)) from None

    def words(where: str, text: object) -> None:
        value(where, text)
        if not all(w.isdigit() for w in str(text).split()):
            raise bad(where, "not a list of CPU numbers")

    def mapping(where: str, obj: object) -> Mapping[str, Any]:
        if not isinstance(obj, Mapping):
            raise bad(where, "wrong type")
        return obj

    for rel, text in mapping("global", fixture.get("global")).items():
        if not isinstance(rel, str) or not _FIXTURE_GLOBAL.match(rel):
            raise bad(f"global {rel!r}", "not a cpufreq, intel_pstate or amd_pstate file")
        (cpus if rel in ("online", "present") else value)(f"global {rel}", text)
    for name, text in mapping("core_types", fixture.get("core_types")).items():
        if not isinstance(name, str) or not _FIXTURE_CORE_TYPE.match(name):
            raise bad(f"core_types {name!r}", "not a cpu_<type> directory")
        cpus(f"core_types {name}", text)
    cpus("present_cpus", fixture.get("present_cpus"))
    for flag, text in mapping("cpu_online_files", fixture.get("cpu_online_files")).items():
        if flag not in ("0", "1"):
            raise bad(f"cpu_online_files {flag!r}", "not 0 or 1")
        cpus(f"cpu_online_files {flag}", text)
    pmap = mapping("policy_map", fixture.get("policy_map"))
    if pmap.get("form") != "one-per-cpu":
        for num, text in mapping("policy_map policies", pmap.get("policies")).items():
            if not str(num).isdigit():
                raise bad(f"policy_map {num!r}", "not a policy number")
            cpus(f"policy_map {num}", text)
    for name, pattern in mapping("cpu_lists", fixture.get("cpu_lists")).items():
        if name not in _CPU_LIST_FILES:
            raise bad(f"cpu_lists {name!r}", "not a CPU list attribute")
        form = mapping(f"cpu_lists {name}", pattern).get("form")
        listed = pattern.get("values")
        if form == "groups" and isinstance(listed, list):
            for text in listed:
                words(f"cpu_lists {name}", text)
        elif form == "explicit" and isinstance(listed, Mapping):
            for num, text in listed.items():
                if not str(num).isdigit():
                    raise bad(f"cpu_lists {name} {num!r}", "not a policy number")
                words(f"cpu_lists {name}[{num}]", text)
        elif form != "self":
            raise bad(f"cpu_lists {name}", f"unknown form {form!r}")
    shapes = fixture.get("shapes")
    if not isinstance(shapes, list) or not shapes:
        raise bad("shapes", "needs a list of shapes")
    for n, shape in enumerate(shapes):
        shape = mapping(f"shape {n}", shape)
        cpus(f"shape {n} policies", shape.get("policies"))
        files = mapping(f"shape {n} files", shape.get("files"))
        for name, text in files.items():
            if not isinstance(name, str) or not _FIXTURE_NAME.match(name):
                raise bad(f"shape {n} file {name!r}", "not a plain attribute name")
            value(f"shape {n} {name}", text)
        for name in ("scaling_min_freq", "scaling_max_freq", "cpuinfo_max_freq"):
            if not str(files.get(name, "")).isdigit():
                raise bad(f"shape {n}", f"needs {name} in kHz")
        for name, text in mapping(f"shape {n} acpi_cppc", shape.get("acpi_cppc") or {}).items():
            if not isinstance(name, str) or not _FIXTURE_NAME.match(name):
                raise bad(f"shape {n} acpi_cppc {name!r}", "not a plain attribute name")
            value(f"shape {n} acpi_cppc {name}", text)
        volatile = shape.get("volatile_files")
        if not isinstance(volatile, list) or not all(
            isinstance(v, str) and _FIXTURE_NAME.match(v) for v in volatile
        ):
            raise bad(f"shape {n} volatile_files", "not a list of attribute names")
    # volatile_sample: only its plain numbers are ever written (_clamped_sample)
    sample = mapping("volatile_sample", fixture.get("volatile_sample"))
    mapping("volatile_sample files", sample.get("files", {}))


def _fixture_facts(
    root: Path, fixture: Mapping[str, Any], num: int, shape: Mapping[str, Any]
) -> None:
    """What the kernel knows of one recorded policy but sysfs does not show (see
    KERNEL_DIR), from the recording: the non-turbo maximum is ``base_frequency`` (HWP),
    else the one ``turbo_pct``/``num_pstates`` give (intel_cpufreq), else the top
    ``_PSS`` entry (acpi-cpufreq), else CPPC's ``nominal_freq``."""
    files = shape["files"]
    cppc = shape.get("acpi_cppc") or {}
    top = int(files["cpuinfo_max_freq"])
    nonturbo: int | None = None
    if files.get("base_frequency"):
        nonturbo = int(files["base_frequency"])
    if nonturbo is None:
        candidates = nonturbo_candidates_khz(fixture, num)
        nonturbo = candidates[0] if len(candidates) == 1 else None
    if nonturbo is None and files.get("scaling_available_frequencies"):
        nonturbo = max(int(f) for f in files["scaling_available_frequencies"].split())
    if nonturbo is None and cppc.get("nominal_freq", "0") != "0":
        nonturbo = int(cppc["nominal_freq"]) * 1000
    _put_kernel(root, f"policy{num}/turbo_max_freq", str(top))
    _put_kernel(root, f"policy{num}/nonturbo_max_freq", str(nonturbo or top))
    if "energy_performance_preference" in files:
        default = files["energy_performance_preference"]
        if files.get("scaling_governor") == "performance":
            default = _ASSUMED_EPP_DEFAULT  # the recording shows the governor's forced EPP
        _put_kernel(root, f"policy{num}/epp_default", default)


# -- a stand-in for the hardware ------------------------------------------------------

FOLLOW_PERIOD_S = 0.05


def follow(
    root: str | os.PathLike[str],
    period_s: float = FOLLOW_PERIOD_S,
    keep_going: Callable[[], bool] = lambda: True,
) -> None:
    """Play the hardware of a simulated tree that other processes write as plain files
    (vmpowerd does not know its tree is simulated): every ``period_s``, each policy's
    scaling_cur_freq goes where its governor and limits put it (``settle_cur``).
    Returns when ``keep_going`` says so."""
    sysfs = KernelSysfs(root)
    while keep_going():
        for num in sysfs._policies():
            sysfs.settle_cur(num)
        time.sleep(period_s)


# -- command line ---------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """``vmpower simulate-sysfs DIR --driver D --cpus N [--turbo] [--offline LIST]`` or
    ``vmpower simulate-sysfs DIR --fixture FILE [--cpus N]``."""
    parser = argparse.ArgumentParser(
        prog="vmpower simulate-sysfs",
        description="Write a simulated cpufreq sysfs tree (DIR plays /sys) for tests and demos.",
    )
    parser.add_argument("dir", type=Path, metavar="DIR", help="root of the tree (plays /sys)")
    parser.add_argument("--driver", choices=DRIVERS, help="scaling driver")
    parser.add_argument("--cpus", type=int, help="number of CPUs (1-8192)")
    parser.add_argument(
        "--fixture",
        type=Path,
        metavar="FILE",
        help="build a recorded host's tree (tests/data/real-hosts/*.json) instead of"
        " --driver/--cpus; --cpus then keeps only the policies of the CPUs below it",
    )
    parser.add_argument(
        "--no-turbo-at-boot",
        action="store_true",
        help="intel_pstate/intel_cpufreq booted with no_turbo=1 (needs turbo)",
    )
    parser.add_argument(
        "--vendor", choices=("intel", "amd"), default="intel", help="acpi-cpufreq's shape"
    )
    parser.add_argument("--turbo", action="store_true", help="CPUs have a turbo range, on")
    parser.add_argument(
        "--offline", default="", metavar="LIST", help='offline CPUs, e.g. "2,5-6" (never 0)'
    )
    parser.add_argument(
        "--priority",
        default="",
        metavar="LIST",
        help="CPUs that can run faster than the others (priority cores)",
    )
    parser.add_argument("--governor", default=None, help="initial scaling governor")
    parser.add_argument(
        "--cpus-per-policy",
        type=int,
        default=1,
        metavar="N",
        help="CPUs sharing one cpufreq policy, in consecutive runs (policyM for CPUs M"
        " to M+N-1, cpuN/cpufreq linking to it), as the kernel lays them out",
    )
    parser.add_argument("--force", action="store_true", help="write into a non-empty DIR")
    parser.add_argument(
        "--follow",
        action="store_true",
        help="alone: play the hardware of the tree in DIR until SIGTERM/SIGINT, each"
        " policy's scaling_cur_freq following its governor, setspeed and limits",
    )
    args = parser.parse_args(argv)
    if args.follow:
        if args.driver or args.fixture or args.cpus:
            parser.error("--follow follows an existing tree: build it first")
        if not (args.dir / CPU_DIR / "cpufreq").is_dir():
            parser.error(f"{args.dir} holds no simulated cpufreq tree")
        return _follow_until_signalled(args.dir)
    try:
        offline = parse_cpu_list(args.offline)
        priority = parse_cpu_list(args.priority)
    except CpuListError as exc:
        parser.error(str(exc))
    target: Path = args.dir
    if target.exists() and not target.is_dir():
        parser.error(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not args.force:
        parser.error(f"{target} is not empty (use --force to write into it)")
    if args.fixture is None and (args.driver is None or args.cpus is None):
        parser.error("give --driver and --cpus, or --fixture")
    if args.fixture is not None and (args.driver or args.turbo or offline or priority):
        parser.error("--fixture takes the driver and CPUs from the recording")
    try:
        if args.force:
            for sub in (CPU_DIR, KERNEL_DIR):
                if (target / sub).exists():
                    shutil.rmtree(target / sub)
        if args.fixture is not None:
            fixture = build_from_fixture(
                target, args.fixture, max_cpus=args.cpus, no_turbo=args.no_turbo_at_boot
            )
            print(
                f"simulated {fixture['host']} ({fixture['driver']},"
                f" {fixture.get('cpu', {}).get('model_name', '?')}) in {target}"
            )
            return 0
        build_tree(
            target,
            args.driver,
            args.cpus,
            args.turbo,
            offline,
            governor=args.governor,
            priority_cpus=priority,
            no_turbo=args.no_turbo_at_boot,
            vendor=args.vendor,
            cpus_per_policy=args.cpus_per_policy,
        )
    except ValueError as exc:
        parser.error(str(exc))
    except OSError as exc:
        print(f"vmpower simulate-sysfs: cannot write {target}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"simulated {args.driver} sysfs with {args.cpus} CPUs in {target}")
    return 0


def _follow_until_signalled(root: Path) -> int:
    stop: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    print(f"following {root}: scaling_cur_freq follows what is set", flush=True)
    follow(root, keep_going=lambda: not stop)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
