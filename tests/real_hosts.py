"""Real hosts' cpufreq sysfs, distilled from intel/pepc's recordings: load and rebuild.

The fixtures live in ``tests/data/real-hosts/<host>.json`` (format and provenance in
that directory's README.md; ``distill.py`` there regenerates them). ``build_tree``
writes one as a sysfs-like tree of plain files under a root that plays ``/sys``, the
way ``vmpower.cpufreq.simulate.build_tree`` writes its simulated trees, so the same
code (``Sysfs(root)``, ``KernelSysfs(root)``) runs on both:

* ``devices/system/cpu/{online,present}`` and the recorded global files
  (``cpufreq/boost``, ``intel_pstate/*``, ``cpufreq/<governor>/*``);
* ``devices/system/cpu/cpufreq/policyM/`` with the policy's recorded files, each
  value followed by a newline as the kernel prints it (trailing spaces kept:
  ``scaling_available_frequencies`` ends with "``<freq> ``" on acpi-cpufreq);
* ``devices/system/cpu/cpuN/cpufreq``: a symlink to ``../cpufreq/policyM`` for every
  online CPU N of policy M (cpufreq.c, ``cpufreq_add_dev_interface``);
* ``cpuN/online`` where the host has one, ``cpuN/acpi_cppc/*`` where recorded;
* hybrid hosts: ``devices/cpu_core/cpus``, ``devices/cpu_atom/cpus``,
  ``devices/cpu_lowpower/cpus``.

Volatile readings (``scaling_cur_freq``, ``cpuinfo_cur_freq``, ``cpuinfo_avg_freq``)
are written from policy 0's recorded sample, clamped into each policy's
``scaling_min_freq``..``scaling_max_freq``; ``stats/`` is not written. Files pepc did
not record (``possible``, ``offline``, ``kernel_max``, ``amd_pstate/*``,
``acpi_cppc/feedback_ctrs``) are not invented.
"""

from __future__ import annotations

import json
from pathlib import Path

from vmpower.cpuset import format_cpu_list, parse_cpu_list

DATA = Path(__file__).parent / "data" / "real-hosts"
CPU_DIR = "devices/system/cpu"
FORMAT = "vmpower-real-host/1"
FAMILIES = (
    "intel_pstate-hwp",
    "intel_pstate-hwp-hybrid",
    "intel_cpufreq",
    "acpi-cpufreq-intel",
    "acpi-cpufreq-amd",
    "amd-pstate-epp",
)
_CPU_LIST_FILES = ("related_cpus", "affected_cpus", "freqdomain_cpus")


def names() -> list[str]:
    """Every fixture's host name, sorted."""
    return sorted(p.stem for p in DATA.glob("*.json"))


def load(name: str) -> dict:
    """The fixture of host ``name`` (e.g. "spr1"), checked for the known format."""
    path = DATA / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no real-host fixture {name!r} (have: {', '.join(names())})")
    fixture = json.loads(path.read_text())
    if fixture.get("format") != FORMAT:
        raise ValueError(f"{path}: format {fixture.get('format')!r}, expected {FORMAT!r}")
    return fixture


def by_family(family: str) -> list[str]:
    """The hosts of one family (see FAMILIES), sorted."""
    return [n for n in names() if load(n)["family"] == family]


def policies(fixture: dict) -> dict[int, list[int]]:
    """Policy number → its CPUs (related_cpus), in policy order."""
    pmap = fixture["policy_map"]
    if pmap["form"] == "one-per-cpu":
        pols = sorted(p for shape in fixture["shapes"] for p in parse_cpu_list(shape["policies"]))
        return {p: [p] for p in pols}
    return {
        int(p): sorted(parse_cpu_list(cpus))
        for p, cpus in sorted(pmap["policies"].items(), key=lambda kv: int(kv[0]))
    }


def shape_of(fixture: dict, policy: int) -> dict:
    """The shape (files, acpi_cppc, ...) of one policy."""
    for shape in fixture["shapes"]:
        if policy in parse_cpu_list(shape["policies"]):
            return shape
    raise KeyError(f"{fixture['host']}: no policy{policy}")


def cpu_list_value(fixture: dict, name: str, policy: int) -> str | None:
    """What ``policyM/<name>`` (related_cpus, affected_cpus, freqdomain_cpus) reads."""
    pattern = fixture["cpu_lists"].get(name)
    if pattern is None:
        return None
    if pattern["form"] == "self":
        return str(policy)
    if pattern["form"] == "groups":
        for value in pattern["values"]:
            if str(policy) in value.split():
                return value
        raise KeyError(f"{fixture['host']}: {name} has no group for policy{policy}")
    return pattern["values"][str(policy)]


def kept_policies(fixture: dict, cpus: int | None) -> dict[int, list[int]]:
    """The policies a tree of the first ``cpus`` CPUs keeps: every policy with a CPU
    below ``cpus``, whole (so the tree may hold a few more CPUs than asked)."""
    pols = policies(fixture)
    if cpus is None:
        return pols
    if cpus < 1:
        raise ValueError(f"cpus must be at least 1, got {cpus}")
    return {p: c for p, c in pols.items() if min(c) < cpus}


def build_tree(fixture: dict, root: Path, cpus: int | None = None) -> Path:
    """Write ``fixture`` as a sysfs-like tree under ``root`` (which plays /sys).

    ``cpus``: keep only the policies of the first ``cpus`` CPUs (whole policies; the
    ``online``/``present`` lists shrink to match, the CPU-list files keep the recorded
    values). Returns ``root``.
    """
    root = Path(root)
    cpu_dir = root / CPU_DIR
    pols = kept_policies(fixture, cpus)
    kept_cpus = sorted(c for cs in pols.values() for c in cs)
    present = parse_cpu_list(fixture["present_cpus"]) & set(kept_cpus)
    online = parse_cpu_list(fixture["global"].get("online", fixture["present_cpus"]))
    online &= set(kept_cpus)
    cpu_dir.mkdir(parents=True, exist_ok=True)
    for rel, value in fixture["global"].items():
        if rel == "online":
            value = format_cpu_list(online)
        elif rel == "present":
            value = format_cpu_list(present)
        _put(cpu_dir / rel, value)
    for core_type, listed in fixture["core_types"].items():
        kept = parse_cpu_list(listed) & set(kept_cpus)
        _put(root / "devices" / core_type / "cpus", format_cpu_list(kept))
    online_files = {
        cpu: value
        for value, listed in fixture["cpu_online_files"].items()
        for cpu in parse_cpu_list(listed)
    }
    sample = fixture["volatile_sample"]["files"]
    for pol, pol_cpus in pols.items():
        shape = shape_of(fixture, pol)
        pdir = cpu_dir / "cpufreq" / f"policy{pol}"
        for name, value in shape["files"].items():
            _put(pdir / name, value)
        for name in _CPU_LIST_FILES:
            value = cpu_list_value(fixture, name, pol)
            if value is not None:
                _put(pdir / name, value)
        for name in shape["volatile_files"]:
            _put(pdir / name, _clamped_sample(shape["files"], sample.get(name)))
        for cpu in pol_cpus:
            base = cpu_dir / f"cpu{cpu}"
            base.mkdir(exist_ok=True)
            if cpu in online_files:
                _put(base / "online", online_files[cpu])
            for name, value in (shape.get("acpi_cppc") or {}).items():
                _put(base / "acpi_cppc" / name, value)
            if cpu in online:
                (base / "cpufreq").symlink_to(f"../cpufreq/policy{pol}")
    return root


def _clamped_sample(files: dict[str, str], sample: str | None) -> str:
    lo = int(files["scaling_min_freq"])
    hi = int(files["scaling_max_freq"])
    value = int(sample) if sample is not None and sample.isdigit() else lo
    return str(min(max(value, lo), hi))


def _put(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n")


def turbo_pct(nonturbo_pstates: int, num_pstates: int) -> int:
    """What ``intel_pstate/turbo_pct`` reads (intel_pstate.c, ``show_turbo_pct``): 8-bit
    fixed point, ``100 - 100 * (max_pstate - min_pstate + 1) / num_pstates``, truncated."""
    frac = (nonturbo_pstates << 8) // num_pstates  # div_fp
    return 100 - ((frac * (100 << 8)) >> 8 >> 8)  # mul_fp, then fp_toint


def nonturbo_max_khz(fixture: dict, policy: int = 0) -> list[int]:
    """The highest non-turbo frequencies consistent with ``turbo_pct`` and ``num_pstates``
    (100 MHz P-states from ``cpuinfo_min_freq``); [] when the host lacks the files (hybrid
    hosts, other drivers). On every recorded host exactly one candidate fits."""
    glob = fixture["global"]
    if "intel_pstate/turbo_pct" not in glob or "intel_pstate/num_pstates" not in glob:
        return []
    pct = int(glob["intel_pstate/turbo_pct"])
    total = int(glob["intel_pstate/num_pstates"])
    low = int(shape_of(fixture, policy)["files"]["cpuinfo_min_freq"])
    return [low + (n - 1) * 100_000 for n in range(1, total + 1) if turbo_pct(n, total) == pct]
