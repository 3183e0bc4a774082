"""Shared fixtures: simulated cpufreq sysfs trees (see ``vmpower.cpufreq.simulate``)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from vmpower.cpufreq.simulate import build_tree
from vmpower.cpuset import parse_cpu_list

SimSysfs = Callable[..., Path]


@pytest.fixture
def sim_sysfs(tmp_path: Path) -> SimSysfs:
    """Factory: ``sim_sysfs(driver="acpi-cpufreq", cpus=8, turbo=True, offline="")`` → root.

    Each call builds a fresh tree (a directory playing ``/sys``) under ``tmp_path``;
    extra keyword arguments (``governor``, ``priority_cpus``) go to ``build_tree``.
    """
    counter = itertools.count()

    def make(
        driver: str = "acpi-cpufreq",
        cpus: int = 8,
        turbo: bool = True,
        offline: str | Iterable[int] = "",
        **kwargs: object,
    ) -> Path:
        root = tmp_path / f"sys{next(counter)}"
        offline_set = parse_cpu_list(offline) if isinstance(offline, str) else frozenset(offline)
        build_tree(root, driver, cpus, turbo, offline_set, **kwargs)  # type: ignore[arg-type]
        return root

    return make
