"""Distil a compact cpufreq fixture from one of intel/pepc's recorded hosts.

pepc (https://github.com/intel/pepc, BSD-3-Clause) keeps sysfs recorded on real machines
under ``tests/emul-data/<host>/sys/inlinefiles.txt`` (lines ``ro|rw|<path>|<value>``).
This keeps the hardware facts vmpower's cpufreq code reads, grouped so that CPUs whose
files are identical are stored once:

* every file of ``cpufreq/policyN/`` except statistics (``stats``, ``time_in_state``,
  ``total_trans``, ``trans_table``); measured values (``scaling_cur_freq``,
  ``cpuinfo_cur_freq``, ``cpuinfo_avg_freq``) are kept as ``null`` (the file exists,
  its reading is not a fact);
* ``cpuN/acpi_cppc/`` (performance levels; the feedback counters are dropped);
* the global ``cpufreq/boost``, ``intel_pstate/`` and ``amd_pstate/`` files.

The ro/rw marks in pepc's recordings are the emulator's, not the kernel's, so they are
not kept. Usage (from a pepc checkout)::

    python tests/data/cpufreq/distill.py PEPC_DIR HOST [COMMIT] > tests/data/cpufreq/HOST.json
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from vmpower.cpuset import format_cpu_list

STATS = {"stats", "time_in_state", "total_trans", "trans_table", "reset"}
MEASURED = {"scaling_cur_freq", "cpuinfo_cur_freq", "cpuinfo_avg_freq"}
PER_CPU = {"affected_cpus", "related_cpus", "freqdomain_cpus"}
CPPC_KEEP = {
    "highest_perf",
    "nominal_perf",
    "lowest_nonlinear_perf",
    "lowest_perf",
    "guaranteed_perf",
    "reference_perf",
    "nominal_freq",
    "lowest_freq",
}
GLOBAL = re.compile(r"^(cpufreq/boost|intel_pstate/\w+|amd_pstate/\w+)$")
POLICY = re.compile(r"^cpufreq/policy(\d+)/(\w+)$")
CPPC = re.compile(r"^cpu(\d+)/acpi_cppc/(\w+)$")


def git_show(repo: str, commit: str, path: str) -> str:
    return subprocess.run(
        ["git", "-C", repo, "show", f"{commit}:{path}"], capture_output=True, text=True, check=True
    ).stdout


def distil(repo: str, host: str, commit: str = "HEAD") -> dict:
    base = f"tests/emul-data/{host}"
    sha = subprocess.run(
        ["git", "-C", repo, "rev-parse", commit], capture_output=True, text=True, check=True
    ).stdout.strip()
    files: dict[str, str] = {}
    for line in git_show(repo, sha, f"{base}/sys/inlinefiles.txt").splitlines():
        if line.startswith("#") or line.count("|") < 2:
            continue
        _mode, path, value = line.split("|", 2)
        prefix = "/sys/devices/system/cpu/"
        if path.startswith(prefix):
            files[path[len(prefix) :]] = value
    policies: dict[int, dict[str, str | None]] = defaultdict(dict)
    cppc: dict[int, dict[str, str]] = defaultdict(dict)
    glob: dict[str, str] = {}
    for rel, value in files.items():
        if m := POLICY.match(rel):
            name = m.group(2)
            if name not in STATS:
                policies[int(m.group(1))][name] = None if name in MEASURED else value
        elif m := CPPC.match(rel):
            if m.group(2) in CPPC_KEEP:
                cppc[int(m.group(1))][m.group(2)] = value
        elif GLOBAL.match(rel):
            glob[rel] = value
    groups: dict[str, dict] = {}
    for num in sorted(policies):
        pol = policies[num]
        shared = {k: v for k, v in sorted(pol.items()) if k not in PER_CPU}
        key = json.dumps([shared, cppc.get(num)], sort_keys=True)
        group = groups.setdefault(
            key, {"policies": [], "files": shared, "acpi_cppc": cppc.get(num), "per_policy": {}}
        )
        group["policies"].append(num)
        # Per-policy CPU lists: the file exists; only values other than the policy's
        # own number are kept.
        for name in sorted(PER_CPU & pol.keys()):
            values = group["per_policy"].setdefault(name, {})
            if pol[name] != str(num):
                values[str(num)] = pol[name]
    cpuinfo = git_show(repo, sha, f"{base}/proc/cpuinfo")
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    version = git_show(repo, sha, f"{base}/proc/version").split(" (")[0]
    out_groups = []
    for g in groups.values():
        g["policies"] = format_cpu_list(g["policies"])
        if g["acpi_cppc"] is None:
            del g["acpi_cppc"]
        out_groups.append(g)
    return {
        "host": host,
        "provenance": (
            f"distilled by tests/data/cpufreq/distill.py from intel/pepc"
            f" {base}/sys/inlinefiles.txt at commit {sha} (https://github.com/intel/pepc,"
            " BSD-3-Clause): a sysfs recorded on a real machine"
        ),
        "cpu_model": model.group(1) if model else None,
        "kernel": version,
        "driver": next(iter(policies.values()))["scaling_driver"],
        "present": format_cpu_list(policies),
        "global": dict(sorted(glob.items())),
        "groups": out_groups,
    }


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(distil(*args), indent=1, sort_keys=False))
