"""Distil intel/pepc's recorded sysfs trees into vmpower's compact real-host fixtures.

pepc (https://github.com/intel/pepc, BSD-3-Clause) keeps, per recorded host,
``tests/emul-data/<host>/sys/inlinefiles.txt``: lines ``ro|/sys/...path...|value`` or
``rw|...`` (the first field is pepc's emulation mode, not the file's permission; a file
with several lines of content has one line per content line). This script keeps only
the hardware facts vmpower's cpufreq code depends on, in the form ``vmpower.cpufreq.simulate``
reads (see README.md beside this file):

* the global files under ``devices/system/cpu/`` (online, present, ``cpufreq/boost``,
  ``intel_pstate/*``, ``amd_pstate/*``, ``cpufreq/<governor>/*``);
* the per-policy files, grouped into "shapes": each distinct set of (file, value) is
  listed once with the policies and CPUs that have it; per-CPU ``acpi_cppc/*`` files
  are part of their policy's shape;
* the CPU-list files (related_cpus, affected_cpus, freqdomain_cpus) as patterns;
* volatile readings (scaling_cur_freq, cpuinfo_cur_freq, cpuinfo_avg_freq, stats/) are
  not hardware facts: only policy 0's are kept, as ``volatile_sample``;
* from ``proc/cpuinfo``: vendor, family, model, model name, the power-related flags;
  from ``proc/version``: the kernel release; hybrid core types from
  ``/sys/devices/cpu_{core,atom,lowpower}/cpus``.

Run (regenerates every fixture; the output is deterministic)::

    python tests/data/real-hosts/distill.py /tmp/pepc-src/tests/emul-data --commit 5be60112
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from vmpower.cpuset import format_cpu_list

REPO = "https://github.com/intel/pepc"
SYS_CPU = "/sys/devices/system/cpu/"
VOLATILE = frozenset({"scaling_cur_freq", "cpuinfo_cur_freq", "cpuinfo_avg_freq"})
CPU_LISTS = ("related_cpus", "affected_cpus", "freqdomain_cpus")
POWER_FLAGS = frozenset(
    {
        "aperfmperf",
        "ida",
        "hwp",
        "hwp_notify",
        "hwp_act_window",
        "hwp_epp",
        "hwp_pkg_req",
        "hwp_highest_perf_change",
        "cpb",
        "hw_pstate",
        "cppc",
    }
)
_POLICY = re.compile(r"^cpufreq/policy(\d+)/(.+)$")
_CPU_FILE = re.compile(r"^cpu(\d+)/(.+)$")


def parse_inline(path: Path) -> dict[str, str]:
    """``inlinefiles.txt`` → absolute sysfs path → content (lines joined by newlines).

    pepc records some files twice in a row (the EPP files on every HWP host); a
    repeated line of a one-line file is that, not a second content line.
    """
    files: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        _mode, sysfs_path, value = line.split("|", 2)
        lines = files.setdefault(sysfs_path, [])
        if "/stats/" not in sysfs_path and lines:
            if value != lines[0]:
                raise ValueError(f"{sysfs_path}: two different one-line values")
            continue
        lines.append(value)
    return {p: "\n".join(v) for p, v in files.items()}


def _cpuinfo(proc: Path) -> dict[str, object]:
    first = (proc / "cpuinfo").read_text().split("\n\n")[0]
    fields = {}
    for line in first.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = [f for f in fields.get("flags", "").split() if f in POWER_FLAGS]
    return {
        "vendor": fields.get("vendor_id"),
        "family": int(fields["cpu family"]),
        "model": int(fields["model"]),
        "model_name": fields.get("model name"),
        "power_flags": flags,
    }


def _cpu_list_pattern(name: str, per_policy: dict[int, str]) -> dict[str, object] | None:
    """A compact, exact description of one CPU-list file across the policies."""
    if not per_policy:
        return None
    if all(v.split() == [str(p)] for p, v in per_policy.items()):
        return {"form": "self"}  # policyM reads "M"
    groups = sorted(set(per_policy.values()), key=lambda v: int(v.split()[0]))
    rebuilt: dict[int, str] = {}
    for value in groups:
        for cpu in value.split():
            if int(cpu) in per_policy:
                rebuilt[int(cpu)] = value
    if rebuilt == per_policy:
        # every policy whose number the value lists reads that value
        return {"form": "groups", "values": groups}
    return {"form": "explicit", "values": {str(p): v for p, v in sorted(per_policy.items())}}


def family(driver: str, vendor: str, core_types: dict[str, str], shapes: list[dict]) -> str:
    """The fixture family: which driver, and on what kind of CPU."""
    if driver == "intel_pstate":
        if not all("base_frequency" in s["files"] for s in shapes):
            return "intel_pstate-nohwp"
        return "intel_pstate-hwp-hybrid" if core_types else "intel_pstate-hwp"
    if driver == "acpi-cpufreq":
        return "acpi-cpufreq-amd" if vendor == "AuthenticAMD" else "acpi-cpufreq-intel"
    return driver


def distill(host_dir: Path, commit: str) -> dict[str, object]:
    host = host_dir.name
    raw = parse_inline(host_dir / "sys" / "inlinefiles.txt")
    glob: dict[str, str] = {}
    policy_files: dict[int, dict[str, str]] = {}
    cpu_files: dict[int, dict[str, str]] = {}
    core_types: dict[str, str] = {}
    for path, value in raw.items():
        m = re.match(r"^/sys/devices/(cpu_\w+)/cpus$", path)
        if m:
            core_types[m.group(1)] = value
            continue
        if not path.startswith(SYS_CPU):
            continue
        rel = path[len(SYS_CPU) :]
        pm = _POLICY.match(rel)
        cm = _CPU_FILE.match(rel)
        if pm:
            policy_files.setdefault(int(pm.group(1)), {})[pm.group(2)] = value
        elif cm:
            cpu_files.setdefault(int(cm.group(1)), {})[cm.group(2)] = value
        elif rel.startswith(("cpufreq/", "intel_pstate/", "amd_pstate/")) or "/" not in rel:
            glob[rel] = value

    # policy → its CPUs, from related_cpus (cpufreq.c: the CPUs the policy covers)
    policy_cpus = {p: [int(c) for c in f["related_cpus"].split()] for p, f in policy_files.items()}
    cpu_policy = {c: p for p, cpus in policy_cpus.items() for c in cpus}
    for cpu, files in cpu_files.items():
        # pepc also reads bios_limit through the cpuN/cpufreq link: the same file
        if "cpufreq/bios_limit" in files:
            assert files["cpufreq/bios_limit"] == policy_files[cpu_policy[cpu]]["bios_limit"]

    shapes: dict[str, dict[str, object]] = {}
    lists: dict[str, dict[int, str]] = {n: {} for n in CPU_LISTS}
    volatile_sample: dict[str, str] = {}
    for pol in sorted(policy_files):
        files = policy_files[pol]
        kept: dict[str, str] = {}
        volatile: list[str] = []
        stats = False
        for name, value in sorted(files.items()):
            if name in CPU_LISTS:
                lists[name][pol] = value
            elif name.startswith("stats/"):
                stats = True
                if pol == min(policy_files):
                    volatile_sample[name] = value
            elif name in VOLATILE:
                volatile.append(name)
                if pol == min(policy_files):
                    volatile_sample[name] = value
            else:
                kept[name] = value
        cppc_sets = [
            {
                k[len("acpi_cppc/") :]: v
                for k, v in cpu_files.get(c, {}).items()
                if "acpi_cppc/" in k
            }
            for c in policy_cpus[pol]
        ]
        if any(s != cppc_sets[0] for s in cppc_sets):
            raise ValueError(f"{host}: policy{pol}'s CPUs disagree on acpi_cppc")
        shape = {
            "files": kept,
            "acpi_cppc": dict(sorted(cppc_sets[0].items())) if cppc_sets[0] else None,
            "volatile_files": volatile,
            "stats": stats,
        }
        key = json.dumps(shape, sort_keys=True)
        entry = shapes.setdefault(key, {"policies": [], "cpus": [], **shape})
        entry["policies"].append(pol)
        entry["cpus"].extend(policy_cpus[pol])

    shape_list = []
    for entry in sorted(shapes.values(), key=lambda e: min(e["policies"])):
        entry["policies"] = format_cpu_list(entry["policies"])
        entry["cpus"] = format_cpu_list(entry["cpus"])
        if entry["acpi_cppc"] is None:
            del entry["acpi_cppc"]
        shape_list.append(entry)

    one_per_cpu = all(cpus == [p] for p, cpus in policy_cpus.items())
    online_files = {c: f["online"] for c, f in cpu_files.items() if "online" in f}
    online_groups: dict[str, list[int]] = {}
    for cpu, value in online_files.items():
        online_groups.setdefault(value, []).append(cpu)
    present = set(cpu_policy) | set(cpu_files)
    drivers = sorted({str(s["files"].get("scaling_driver")) for s in shape_list})
    cpuinfo = _cpuinfo(host_dir / "proc")
    driver = drivers[0] if len(drivers) == 1 else "mixed"
    return {
        "format": "vmpower-real-host/1",
        "host": host,
        "provenance": {
            "repo": REPO,
            "commit": commit,
            "path": f"tests/emul-data/{host}/sys/inlinefiles.txt",
            "also": [
                f"tests/emul-data/{host}/proc/cpuinfo",
                f"tests/emul-data/{host}/proc/version",
            ],
            "license": "pepc is BSD-3-Clause; only hardware facts are kept here",
            "kept": (
                "global files under devices/system/cpu (online, present, cpufreq/*,"
                " intel_pstate/*, amd_pstate/*); every per-policy cpufreq file except the"
                " volatile readings, grouped into shapes; cpuN/acpi_cppc/*; which CPUs have"
                " a cpuN/online file and its value; hybrid core types"
            ),
            "left_out": (
                "volatile readings (scaling_cur_freq, cpuinfo_cur_freq, cpuinfo_avg_freq,"
                " stats/*) except policy 0's sample; cpuidle, topology, caches, uncore,"
                " energy_perf_bias, MSRs; pepc's ro/rw emulation flags"
            ),
            "not_recorded": (
                "possible, offline, kernel_max, the cpuN/cpufreq symlinks (derived from"
                " related_cpus), amd_pstate/* and cpuN/acpi_cppc/feedback_ctrs"
            ),
        },
        "kernel": (host_dir / "proc" / "version").read_text().split()[2],
        "cpu": cpuinfo,
        "driver": driver,
        "family": family(driver, str(cpuinfo["vendor"]), core_types, shape_list),
        "global": dict(sorted(glob.items())),
        "core_types": dict(sorted(core_types.items())),
        "present_cpus": format_cpu_list(present),
        "cpu_online_files": {v: format_cpu_list(c) for v, c in sorted(online_groups.items())},
        "policy_map": (
            {"form": "one-per-cpu"}
            if one_per_cpu
            else {
                "form": "explicit",
                "policies": {str(p): format_cpu_list(c) for p, c in sorted(policy_cpus.items())},
            }
        ),
        "cpu_lists": {n: pat for n in CPU_LISTS if (pat := _cpu_list_pattern(n, lists[n]))},
        "shapes": shape_list,
        "volatile_sample": {
            "note": "policy 0's readings at recording time: not hardware facts",
            "policy": min(policy_files),
            "files": volatile_sample,
        },
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("emul_data", type=Path, help="pepc's tests/emul-data directory")
    parser.add_argument("hosts", nargs="*", help="host names (default: every host)")
    parser.add_argument("--commit", required=True, help="the pepc commit the data is from")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args(argv)
    hosts = args.hosts or sorted(p.name for p in args.emul_data.iterdir() if p.is_dir())
    for host in hosts:
        fixture = distill(args.emul_data / host, args.commit)
        text = json.dumps(fixture, indent=1) + "\n"
        (args.out / f"{host}.json").write_text(text)
        print(f"{host}: {len(fixture['shapes'])} shapes, {len(text)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
