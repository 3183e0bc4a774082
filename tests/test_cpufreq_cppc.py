"""amd-pstate(-epp) and cppc_cpufreq: CPPC figures (MHz!), boost switches, prefcore, EPP."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from vmpower.cpufreq import open_cpufreq
from vmpower.cpufreq.simulate import KernelSysfs
from vmpower.errors import CpufreqError, UnsupportedError
from vmpower.restore import RestoreJournal
from vmpower.sysfs import Sysfs

CPU = "devices/system/cpu"
POLICY = f"{CPU}/cpufreq/policy"


def read(root: Path, rel: str) -> str:
    return (root / rel).read_text().strip()


def put(root: Path, rel: str, value: object) -> None:
    (root / rel).write_text(f"{value}\n")


@pytest.mark.parametrize("driver", ["amd-pstate", "amd-pstate-epp"])
def test_amd_table_uses_the_cppc_nominal_frequency_in_mhz(sim_sysfs, driver):
    root = sim_sysfs(driver, cpus=1)
    put(root, f"{CPU}/cpu0/acpi_cppc/nominal_freq", 3500)  # MHz, per cppc_sysfs.rst
    cf = open_cpufreq(Sysfs(root))
    table = cf.table_khz(0)
    assert table[:3] == (4_680_000, 3_500_000, 3_400_000)
    assert table[-1] == 400_000
    assert cf.nominal_khz(0) == 3_500_000


def test_amd_keeps_its_turbo_entry_while_boost_is_off(sim_sysfs):
    root = sim_sysfs("amd-pstate-epp", cpus=1)
    # boost off: the kernel lowers cpuinfo_max_freq to nominal, amd_pstate_max_freq stays
    put(root, f"{POLICY}0/boost", 0)
    put(root, f"{POLICY}0/cpuinfo_max_freq", 3_300_000)
    cf = open_cpufreq(KernelSysfs(root))
    assert cf.table_khz(0)[0] == 4_680_000
    assert not cf.turbo_enabled(0)
    with pytest.raises(CpufreqError, match="turbo is disabled"):
        cf.set_khz(0, 4_680_000)
    assert cf.set_khz(0, 3_300_000)
    assert cf.state(0).target_khz == 3_300_000


def test_amd_per_policy_boost_is_switched_for_that_cpu_only(sim_sysfs, tmp_path, caplog):
    root = sim_sysfs("amd-pstate-epp", cpus=2)
    put(root, f"{POLICY}1/boost", 0)
    journal = RestoreJournal(tmp_path / "state", writer=KernelSysfs(root).write_path)
    cf = open_cpufreq(KernelSysfs(root, journal))
    assert cf.turbo_enabled(0) and not cf.turbo_enabled(1)
    assert cf.set_khz(1, 3_300_000)
    with caplog.at_level(logging.WARNING, logger="vmpower.cpufreq"):
        cf.set_turbo(1, True)
    assert "system-wide" not in caplog.text
    assert read(root, f"{POLICY}1/boost") == "1"
    assert read(root, f"{CPU}/cpufreq/boost") == "1"  # the global switch untouched
    assert [Path(p).name for p in journal.pending()] == [
        "scaling_max_freq",
        "scaling_min_freq",
        "boost",
    ]
    assert cf.set_khz(1, 4_680_000)
    assert cf.state(1).target_khz == 4_680_000
    journal.restore()
    assert read(root, f"{POLICY}1/boost") == "0"


def test_amd_global_boost_when_there_is_no_per_policy_file(sim_sysfs):
    root = sim_sysfs("amd-pstate", cpus=2)
    for cpu in (0, 1):
        (root / f"{POLICY}{cpu}/boost").unlink()
    put(root, f"{CPU}/cpufreq/boost", 0)
    cf = open_cpufreq(KernelSysfs(root))
    assert not cf.turbo_enabled(0)
    cf.set_turbo(0, True)
    assert read(root, f"{CPU}/cpufreq/boost") == "1"
    assert cf.turbo_enabled(1)


def test_amd_preferred_cores_follow_the_ranking_only_while_prefcore_is_enabled(sim_sysfs):
    root = sim_sysfs("amd-pstate-epp", cpus=4, priority_cpus={0, 3})
    cf = open_cpufreq(Sysfs(root))
    assert [cf.capabilities(c).priority for c in range(4)] == [True, False, False, True]
    put(root, f"{CPU}/amd_pstate/prefcore", "disabled")  # amd_prefcore=disable
    cf = open_cpufreq(Sysfs(root))
    assert not any(cf.capabilities(c).priority for c in range(4))


def test_amd_ranking_falls_back_to_cppc_highest_perf(sim_sysfs):
    root = sim_sysfs("amd-pstate", cpus=3, priority_cpus={2})
    for cpu in range(3):
        (root / f"{POLICY}{cpu}/amd_pstate_prefcore_ranking").unlink()  # kernels before 6.9
    cf = open_cpufreq(Sysfs(root))
    assert [cf.capabilities(c).priority for c in range(3)] == [False, False, True]


def test_amd_epp(sim_sysfs):
    root = sim_sysfs("amd-pstate-epp", cpus=1)
    cf = open_cpufreq(KernelSysfs(root))
    cf.set_epp(0, "balance_power")
    assert read(root, f"{POLICY}0/energy_performance_preference") == "balance_power"
    put(root, f"{POLICY}0/scaling_governor", "performance")
    with pytest.raises(CpufreqError, match="performance governor"):
        cf.set_epp(0, "power")


def test_amd_passive_mode_has_no_epp(sim_sysfs, caplog):
    cf = open_cpufreq(Sysfs(sim_sysfs("amd-pstate", cpus=1)))
    with caplog.at_level(logging.WARNING, logger="vmpower.cpufreq"):
        for _ in range(2):
            with pytest.raises(UnsupportedError, match="amd-pstate has no energy_perf"):
                cf.set_epp(0, "power")
    assert caplog.text.count("has no energy_performance_preference") == 1


def test_cppc_turbo_from_highest_above_nominal(sim_sysfs):
    cf = open_cpufreq(Sysfs(sim_sysfs("cppc_cpufreq", cpus=1)))
    assert cf.table_khz(0)[:2] == (3_300_000, 3_000_000)
    assert cf.capabilities(0).turbo
    plain = open_cpufreq(Sysfs(sim_sysfs("cppc_cpufreq", cpus=1, turbo=False)))
    assert plain.table_khz(0)[0] == 3_000_000
    assert not plain.capabilities(0).turbo


def test_cppc_turbo_entry_computed_while_boost_is_off(sim_sysfs):
    root = sim_sysfs("cppc_cpufreq", cpus=1)
    put(root, f"{CPU}/cpufreq/boost", 0)
    put(root, f"{POLICY}0/cpuinfo_max_freq", 3_000_000)
    put(root, f"{POLICY}0/scaling_max_freq", 3_000_000)
    cf = open_cpufreq(KernelSysfs(root))
    # highest 3300 / nominal 3000 of a 3000 MHz nominal: 3.3 GHz
    assert cf.table_khz(0)[0] == 3_300_000
    with pytest.raises(CpufreqError, match="turbo is disabled"):
        cf.set_khz(0, 3_300_000)
    assert cf.set_khz(0, 3_000_000)
    cf.set_turbo(0, True)
    assert read(root, f"{CPU}/cpufreq/boost") == "1"


def test_cppc_priority_from_highest_perf(sim_sysfs):
    cf = open_cpufreq(Sysfs(sim_sysfs("cppc_cpufreq", cpus=4, priority_cpus={1})))
    assert [cf.capabilities(c).priority for c in range(4)] == [False, True, False, False]
    assert cf.table_khz(1)[0] == 3_500_000


def test_cppc_without_acpi_cppc_is_non_turbo_reported_once(sim_sysfs, caplog):
    root = sim_sysfs("cppc_cpufreq", cpus=2)
    for cpu in (0, 1):
        (root / f"{CPU}/cpu{cpu}/acpi_cppc/nominal_freq").unlink()
    with caplog.at_level(logging.WARNING, logger="vmpower.cpufreq"):
        cf = open_cpufreq(Sysfs(root))
        assert cf.nominal_khz(0) == cf.nominal_khz(1) == 3_300_000
    assert not cf.capabilities(1).turbo
    assert caplog.text.count("acpi_cppc/ lacks") == 1
    assert cf.set_khz(0, 3_300_000)  # the top entry counts as non-turbo
    assert cf.state(0).target_khz == 3_300_000
