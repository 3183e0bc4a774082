"""CPU lists as the kernel and libvirt write them ("0-3,8,^2") and back.

Standard library only. ``^N`` excludes a CPU from what the earlier items added,
as in libvirt's cpuset syntax.
"""

from __future__ import annotations

from collections.abc import Iterable

from vmpower.errors import CpuListError

MAX_CPUS = 8192  # the kernel's NR_CPUS ceiling; anything larger is a typo


def parse_cpu_list(text: str) -> frozenset[int]:
    """Parse ``"0-3,8,^2"`` into a set of CPU numbers; an empty string is no CPU."""
    if not isinstance(text, str):
        raise CpuListError(f"CPU list must be a string, not {type(text).__name__}")
    cpus: set[int] = set()
    excluded: set[int] = set()
    stripped = text.strip()
    if not stripped:
        return frozenset()
    for raw_item in stripped.split(","):
        item = raw_item.strip()
        if not item:
            raise CpuListError(f"empty item in CPU list {text!r}")
        target = cpus
        if item.startswith("^"):
            target = excluded
            item = item[1:].strip()
        first, sep, last = item.partition("-")
        try:
            lo = int(first)
            hi = int(last) if sep else lo
        except ValueError:
            raise CpuListError(f"bad item {raw_item.strip()!r} in CPU list {text!r}") from None
        if lo < 0 or hi < 0:
            raise CpuListError(f"negative CPU in CPU list {text!r}")
        if hi < lo:
            raise CpuListError(f"descending range {item!r} in CPU list {text!r}")
        if hi >= MAX_CPUS:
            raise CpuListError(f"CPU {hi} out of range (max {MAX_CPUS - 1}) in {text!r}")
        target.update(range(lo, hi + 1))
    return frozenset(cpus - excluded)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """Format CPUs as the shortest ascending list of ranges: ``{0,1,2,3,8}`` → ``"0-3,8"``."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)
