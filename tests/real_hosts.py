"""The recorded real hosts' cpufreq sysfs (``tests/data/real-hosts/<host>.json``).

One directory, one format (``vmpower-real-host/1``; format and provenance in that
directory's README.md, ``distill.py`` there regenerates the hosts pepc recorded). The
loader and the builder are ``vmpower.cpufreq.simulate``'s (``load_fixture``,
``build_from_fixture``: the same code ``vmpower simulate-sysfs --fixture`` runs); this
module only finds the files and names the families.
"""

from __future__ import annotations

from pathlib import Path

from vmpower.cpufreq.simulate import (
    CPU_DIR,
    FIXTURE_FORMAT,
    build_from_fixture,
    fixture_cpu_list,
    fixture_policies,
    fixture_shape,
    kept_policies,
    load_fixture,
    nonturbo_candidates_khz,
)

DATA = Path(__file__).parent / "data" / "real-hosts"
FORMAT = FIXTURE_FORMAT
FAMILIES = (
    "intel_pstate-hwp",
    "intel_pstate-hwp-hybrid",
    "intel_cpufreq",
    "acpi-cpufreq-intel",
    "acpi-cpufreq-amd",
    "amd-pstate-epp",
)
__all__ = [
    "CPU_DIR",
    "DATA",
    "FAMILIES",
    "FORMAT",
    "build_tree",
    "by_family",
    "cpu_list_value",
    "kept_policies",
    "load",
    "names",
    "nonturbo_max_khz",
    "path",
    "policies",
    "shape_of",
]
policies = fixture_policies
shape_of = fixture_shape
cpu_list_value = fixture_cpu_list
nonturbo_max_khz = nonturbo_candidates_khz


def names() -> list[str]:
    """Every fixture's host name, sorted."""
    return sorted(p.stem for p in DATA.glob("*.json"))


def path(name: str) -> Path:
    """The fixture file of host ``name`` (what ``--fixture`` takes)."""
    found = DATA / f"{name}.json"
    if not found.is_file():
        raise FileNotFoundError(f"no real-host fixture {name!r} (have: {', '.join(names())})")
    return found


def load(name: str) -> dict:
    """The fixture of host ``name`` (e.g. "spr1"), checked."""
    return load_fixture(path(name))


def by_family(family: str) -> list[str]:
    """The hosts of one family (see FAMILIES; also "cpufreq-dt"), sorted."""
    return [n for n in names() if load(n)["family"] == family]


def build_tree(fixture: dict, root: Path, cpus: int | None = None) -> Path:
    """Write ``fixture`` as a sysfs-like tree under ``root`` (which plays /sys), keeping
    the policies of the first ``cpus`` CPUs, whole. Returns ``root``."""
    build_from_fixture(root, fixture, max_cpus=cpus)
    return Path(root)
