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
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vmpower.cpuset import format_cpu_list, parse_cpu_list
from vmpower.errors import CpuListError, SysfsError
from vmpower.sysfs import Sysfs

DRIVERS = ("acpi-cpufreq", "intel_pstate", "amd-pstate-epp", "amd-pstate", "cppc_cpufreq")

CPU_DIR = "devices/system/cpu"
UNSUPPORTED = "<unsupported>"  # what scaling_setspeed reads unless the governor is userspace

_GENERIC_GOVERNORS = "conservative ondemand userspace powersave performance schedutil"
# intel_pstate (active) and amd-pstate-epp offer only their own two algorithms.
_SETPOLICY_GOVERNORS = "performance powersave"
_EPP_CHOICES = "default performance balance_performance balance_power power"
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
) -> None:
    """Write a simulated sysfs for ``driver`` with ``cpus`` CPUs under ``root``.

    ``turbo``: the CPUs have a turbo (boost) range and it is switched on.
    ``offline``: CPUs that are present but offline (online=0, no ``cpuN/cpufreq`` link).
    ``governor``: the initial scaling governor (default: the driver's usual one).
    ``priority_cpus``: CPUs that can run faster than the others (Intel SST-BF: higher
    ``base_frequency``; AMD preferred cores: higher ``amd_pstate_prefcore_ranking``;
    CPPC: higher ``highest_perf``).
    """
    root_path = Path(root)
    offline_set = frozenset(offline)
    priority = frozenset(priority_cpus)
    _check_args(root_path, driver, cpus, offline_set, priority)
    policies = [_policy(driver, cpu, turbo, governor, priority) for cpu in range(cpus)]
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
        policy_dir = cpu_dir / "cpufreq" / f"policy{cpu}"
        policy_dir.mkdir(parents=True, exist_ok=True)
        for name, value in policy.files.items():
            _put(policy_dir / name, value)
        if policy.cppc is not None:
            (base / "acpi_cppc").mkdir(exist_ok=True)
            for name, value in policy.cppc.items():
                _put(base / "acpi_cppc" / name, value)
        _link_policy(root_path, cpu, cpu not in offline_set)
    _global_files(root_path, driver, turbo, priority)


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
    _link_policy(Path(root), cpu, online)


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
    driver: str, cpu: int, turbo: bool, governor: str | None, priority: frozenset[int]
) -> _Policy:
    common = {"affected_cpus": str(cpu), "related_cpus": str(cpu)}
    if driver == "acpi-cpufreq":
        # _PSS convention: the whole turbo range is one entry 1 MHz above the highest
        # non-turbo P-state (intel_pstate.rst, "intel_pstate vs acpi-cpufreq").
        table = list(range(2_300_000, 1_100_000, -100_000))
        if turbo:
            table.insert(0, table[0] + 1000)
        gov = governor or "schedutil"
        cur = 1_600_000
        files = {
            **common,
            "cpuinfo_min_freq": str(table[-1]),
            "cpuinfo_max_freq": str(table[0]),
            "cpuinfo_cur_freq": str(cur),
            "cpuinfo_transition_latency": "10000",
            "bios_limit": str(table[0]),
            "freqdomain_cpus": str(cpu),
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
            "energy_performance_available_preferences": _EPP_CHOICES,
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
            files["energy_performance_available_preferences"] = _EPP_CHOICES
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
    if driver == "intel_pstate":
        glob = cpu_dir / "intel_pstate"
        glob.mkdir(exist_ok=True)
        top = 47 if turbo else 30
        _put(glob / "status", "active")
        # no_turbo reads 1 when the processor has no turbo range at all
        _put(glob / "no_turbo", "0" if turbo else "1")
        _put(glob / "max_perf_pct", "100")
        _put(glob / "min_perf_pct", str(round(8 * 100 / top)))
        _put(glob / "num_pstates", str(top - 8 + 1))
        _put(glob / "turbo_pct", str(round((top - 30) * 100 / (top - 8 + 1))))
        _put(glob / "hwp_dynamic_boost", "0")
    elif driver.startswith("amd-pstate"):
        glob = cpu_dir / "amd_pstate"
        glob.mkdir(exist_ok=True)
        _put(glob / "status", "active" if driver == "amd-pstate-epp" else "passive")
        _put(glob / "prefcore", "enabled" if priority else "disabled")
    if turbo and driver in ("acpi-cpufreq", "amd-pstate", "amd-pstate-epp", "cppc_cpufreq"):
        # the cpufreq core's global switch, present when the driver can boost
        _put(cpu_dir / "cpufreq" / "boost", "1")


def _link_policy(root: Path, cpu: int, present: bool) -> None:
    # The kernel removes cpuN/cpufreq when the CPU goes offline (the policy directory
    # stays, inactive) and adds it back when it returns (cpufreq.rst, "Policy Objects").
    link = root / CPU_DIR / f"cpu{cpu}" / "cpufreq"
    if present and not link.is_symlink():
        link.symlink_to(f"../cpufreq/policy{cpu}")
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
            choices = self.read(f"{pol}/energy_performance_available_preferences").split()
            if text not in choices and not (text.isdigit() and int(text) <= 255):
                self._refuse(rel, text, f"EINVAL: not one of {' '.join(choices)} or 0-255")
            # intel_pstate.rst (HWP + performance) and amd-pstate: only EPP 0 is
            # accepted under the performance governor, anything else is -EBUSY.
            if self.read(f"{pol}/scaling_governor") == "performance" and text not in (
                "performance",
                "0",
            ):
                self._refuse(rel, text, "device busy (EBUSY): governor is performance")
            super().write(rel, text)
            return
        if name == "boost":
            self._need_bool(rel, text)
            super().write(rel, text)
            return
        super().write(rel, text)

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
        policies = self.path(f"{CPU_DIR}/cpufreq")
        names = sorted(os.listdir(policies)) if os.path.isdir(policies) else []
        bases = [self.read_int(f"{CPU_DIR}/cpufreq/{n}/base_frequency") for n in names]
        tops = [self.read_int(f"{CPU_DIR}/cpufreq/{n}/cpuinfo_max_freq") for n in names]
        if text == "0" and all(t <= b for t, b in zip(tops, bases, strict=True)):
            self._refuse(rel, text, "operation not permitted (EPERM): no turbo range")
        super().write(rel, text)
        if text == "1":
            # intel_pstate.rst: setting no_turbo brings scaling_max/min_freq down to
            # the maximum non-turbo frequency when they were above it.
            for name, base in zip(names, bases, strict=True):
                for limit in ("scaling_max_freq", "scaling_min_freq", "scaling_cur_freq"):
                    rel_limit = f"{CPU_DIR}/cpufreq/{name}/{limit}"
                    if self.read_int(rel_limit) > base:
                        self._raw(rel_limit, str(base))

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


# -- command line ---------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """``vmpower simulate-sysfs DIR --driver D --cpus N [--turbo] [--offline LIST]``."""
    parser = argparse.ArgumentParser(
        prog="vmpower simulate-sysfs",
        description="Write a simulated cpufreq sysfs tree (DIR plays /sys) for tests and demos.",
    )
    parser.add_argument("dir", type=Path, metavar="DIR", help="root of the tree (plays /sys)")
    parser.add_argument("--driver", required=True, choices=DRIVERS, help="scaling driver")
    parser.add_argument("--cpus", required=True, type=int, help="number of CPUs (1-8192)")
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
    parser.add_argument("--force", action="store_true", help="write into a non-empty DIR")
    args = parser.parse_args(argv)
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
    try:
        if args.force and (target / CPU_DIR).exists():
            shutil.rmtree(target / CPU_DIR)
        build_tree(
            target,
            args.driver,
            args.cpus,
            args.turbo,
            offline,
            governor=args.governor,
            priority_cpus=priority,
        )
    except ValueError as exc:
        parser.error(str(exc))
    except OSError as exc:
        print(f"vmpower simulate-sysfs: cannot write {target}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"simulated {args.driver} sysfs with {args.cpus} CPUs in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
