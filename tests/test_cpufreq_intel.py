"""intel_pstate: min/max pinning and its write order, the 100 MHz table, no_turbo, EPP.

The write order of the two limits is ``vmpower.cpufreq.limits.write_limits``, shared
with the telemetry controls; its rule is checked here against KernelSysfs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmpower.cpufreq import open_cpufreq
from vmpower.cpufreq.limits import write_limits
from vmpower.cpufreq.simulate import KernelSysfs
from vmpower.errors import CpufreqError, SysfsError
from vmpower.restore import RestoreJournal
from vmpower.sysfs import Sysfs

CPU = "devices/system/cpu"
POLICY = f"{CPU}/cpufreq/policy"


def read(root: Path, rel: str) -> str:
    return (root / rel).read_text().strip()


def pin(root: Path, cpu: int, khz: int) -> None:
    for name in ("scaling_min_freq", "scaling_max_freq"):
        (root / f"{POLICY}{cpu}/{name}").write_text(f"{khz}\n")


def first_writes(journal: RestoreJournal) -> list[str]:
    return [Path(p).name for p in journal.pending()]


def test_table_is_the_100mhz_grid_with_turbo_above_base(sim_sysfs):
    cf = open_cpufreq(Sysfs(sim_sysfs("intel_pstate", cpus=1)))
    table = cf.table_khz(0)
    assert table == tuple(range(4_700_000, 700_000, -100_000))
    assert cf.nominal_khz(0) == 3_000_000  # base_frequency
    assert cf.capabilities(0).turbo


def test_going_up_raises_max_first(sim_sysfs, tmp_path):
    root = sim_sysfs("intel_pstate", cpus=1)
    pin(root, 0, 1_000_000)
    journal = RestoreJournal(tmp_path / "state")
    cf = open_cpufreq(KernelSysfs(root, journal))
    assert cf.set_khz(0, 4_000_000)
    assert first_writes(journal) == ["scaling_max_freq", "scaling_min_freq"]
    assert (
        read(root, f"{POLICY}0/scaling_min_freq"),
        read(root, f"{POLICY}0/scaling_max_freq"),
    ) == ("4000000", "4000000")


def test_going_down_lowers_min_first(sim_sysfs, tmp_path):
    root = sim_sysfs("intel_pstate", cpus=1)
    pin(root, 0, 4_000_000)
    journal = RestoreJournal(tmp_path / "state")
    cf = open_cpufreq(KernelSysfs(root, journal))
    assert cf.set_khz(0, 1_000_000)
    assert first_writes(journal) == ["scaling_min_freq", "scaling_max_freq"]
    assert cf.state(0).target_khz == 1_000_000


def test_long_walks_up_and_down_never_cross_the_limits(sim_sysfs):
    """KernelSysfs refuses min > max at any instant: a wrong order would raise here."""
    root = sim_sysfs("intel_pstate", cpus=1)
    cf = open_cpufreq(KernelSysfs(root))
    for khz in (800_000, 4_700_000, 800_000, 3_000_000, 2_900_000, 3_100_000, 1_000_000):
        assert cf.set_khz(0, khz)
        assert cf.state(0).target_khz == khz


def test_a_value_within_the_limits_moves_the_maximum_first(sim_sysfs, tmp_path):
    root = sim_sysfs("intel_pstate", cpus=1)  # limits 800000-4700000
    journal = RestoreJournal(tmp_path / "state")
    cf = open_cpufreq(KernelSysfs(root, journal))
    assert cf.set_khz(0, 2_000_000)
    assert first_writes(journal) == ["scaling_max_freq", "scaling_min_freq"]


KHZ = st.integers(8, 47).map(lambda n: n * 100_000)  # intel_pstate's range, 100 MHz grid


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(current=st.tuples(KHZ, KHZ).map(sorted), new=st.tuples(KHZ, KHZ).map(sorted))
def test_write_limits_never_holds_min_above_max(sim_sysfs, current, new):
    """Any pair of limits to any other: KernelSysfs refuses min > max at every write,
    so a wrong order raises here; a limit already at its value is not written."""
    root = sim_sysfs("intel_pstate", cpus=1)
    pin(root, 0, current[0])
    (root / f"{POLICY}0/scaling_max_freq").write_text(f"{current[1]}\n")
    written = write_limits(KernelSysfs(root), 0, new[0], new[1], current[0], current[1])
    assert written == (new[0] != current[0]) + (new[1] != current[1])
    assert (
        int(read(root, f"{POLICY}0/scaling_min_freq")),
        int(read(root, f"{POLICY}0/scaling_max_freq")),
    ) == tuple(new)


def test_write_limits_refuses_a_crossed_pair(sim_sysfs):
    root = sim_sysfs("intel_pstate", cpus=1)
    with pytest.raises(ValueError, match="above maximum"):
        write_limits(KernelSysfs(root), 0, 2_000_000, 1_000_000, 800_000, 4_700_000)


def test_the_limits_are_re_read_after_someone_else_changed_them(sim_sysfs):
    root = sim_sysfs("intel_pstate", cpus=1)
    cf = open_cpufreq(KernelSysfs(root))
    cf.set_khz(0, 2_000_000)
    pin(root, 0, 4_500_000)  # an administrator pins it elsewhere
    cf.forget(0)
    assert cf.set_khz(0, 1_000_000)  # min first again (1 GHz < the new min)
    assert cf.state(0).target_khz == 1_000_000


def test_no_turbo_caps_at_base_and_set_turbo_clears_it_journaled(sim_sysfs, tmp_path, caplog):
    root = sim_sysfs("intel_pstate", cpus=2)
    (root / f"{CPU}/intel_pstate/no_turbo").write_text("1\n")
    journal = RestoreJournal(tmp_path / "state", writer=KernelSysfs(root).write_path)
    cf = open_cpufreq(KernelSysfs(root, journal))
    assert not cf.turbo_enabled(0)
    assert cf.set_khz(0, 3_000_000)
    with pytest.raises(CpufreqError, match="turbo is disabled"):
        cf.set_khz(0, 3_100_000)
    with caplog.at_level(logging.WARNING, logger="vmpower.cpufreq"):
        cf.set_turbo(0, True)
    assert read(root, f"{CPU}/intel_pstate/no_turbo") == "0"
    assert "system-wide" in caplog.text
    assert cf.set_khz(0, 4_700_000)
    assert cf.state(0).target_khz == 4_700_000
    assert journal.restore().failed == []
    assert read(root, f"{CPU}/intel_pstate/no_turbo") == "1"


class FirmwareTurboOff(KernelSysfs):
    """intel_pstate when the firmware disabled turbo: no_turbo stays 1, writes get EPERM."""

    def write(self, rel: str, value: str | int) -> None:
        if rel.endswith("intel_pstate/no_turbo"):
            raise SysfsError(self.path(rel), "write: operation not permitted (EPERM)")
        super().write(rel, value)


def test_a_refused_no_turbo_write_is_a_clear_error(sim_sysfs):
    root = sim_sysfs("intel_pstate", cpus=1)
    (root / f"{CPU}/intel_pstate/no_turbo").write_text("1\n")
    cf = open_cpufreq(FirmwareTurboOff(root))
    with pytest.raises(CpufreqError, match=r"cannot switch turbo on.*EPERM"):
        cf.set_turbo(0, True)
    assert not cf.turbo_enabled(0)
    with pytest.raises(CpufreqError, match="turbo is disabled"):
        cf.set_khz(0, 4_700_000)
    assert cf.set_khz(0, 3_000_000)


def test_epp_is_checked_against_the_available_list(sim_sysfs):
    root = sim_sysfs("intel_pstate", cpus=2)
    cf = open_cpufreq(KernelSysfs(root))
    cf.set_epp(1, "power")
    assert read(root, f"{POLICY}1/energy_performance_preference") == "power"
    assert cf.state(1).epp == "power"
    with pytest.raises(CpufreqError, match="available: default performance"):
        cf.set_epp(1, "turbo")
    assert read(root, f"{POLICY}1/energy_performance_preference") == "power"


def test_epp_refused_under_the_performance_governor(sim_sysfs):
    root = sim_sysfs("intel_pstate", cpus=1, governor="performance")
    cf = open_cpufreq(KernelSysfs(root))
    with pytest.raises(CpufreqError, match="performance governor"):
        cf.set_epp(0, "balance_power")
    cf.set_epp(0, "performance")  # the one value the kernel accepts then
    assert read(root, f"{POLICY}0/energy_performance_preference") == "performance"


def test_reserved_cpu_epp_is_refused(sim_sysfs):
    cf = open_cpufreq(Sysfs(sim_sysfs("intel_pstate", cpus=2)), frozenset({1}))
    with pytest.raises(CpufreqError, match="reserved"):
        cf.set_epp(1, "power")


def test_priority_cores_from_base_frequency(sim_sysfs):
    cf = open_cpufreq(Sysfs(sim_sysfs("intel_pstate", cpus=4, priority_cpus={3})))
    assert [cf.capabilities(c).priority for c in range(4)] == [False, False, False, True]
    assert cf.nominal_khz(3) == 3_300_000


def test_without_base_frequency_nominal_comes_from_turbo_pct(sim_sysfs, caplog):
    """No HWP: intel_pstate/turbo_pct and num_pstates still give the non-turbo maximum."""
    root = sim_sysfs("intel_pstate", cpus=2)
    for cpu in (0, 1):
        (root / f"{POLICY}{cpu}/base_frequency").unlink()
    with caplog.at_level(logging.WARNING, logger="vmpower.cpufreq"):
        cf = open_cpufreq(Sysfs(root))
        assert cf.nominal_khz(0) == cf.nominal_khz(1) == 3_000_000
    assert cf.capabilities(0).turbo
    assert cf.note(0) == ""
    assert cf.unsupported() == []


def test_without_any_base_the_range_is_non_turbo_reported_once(sim_sysfs, caplog):
    root = sim_sysfs("intel_pstate", cpus=2)
    for cpu in (0, 1):
        (root / f"{POLICY}{cpu}/base_frequency").unlink()
    (root / f"{CPU}/intel_pstate/turbo_pct").unlink()
    with caplog.at_level(logging.WARNING, logger="vmpower.cpufreq"):
        cf = open_cpufreq(Sysfs(root))
        assert cf.nominal_khz(0) == cf.nominal_khz(1) == 4_700_000
    assert not cf.capabilities(0).turbo
    assert "no usable base" in cf.note(1)
    assert caplog.text.count("no usable base frequency") == 1
    assert len(cf.unsupported()) == 1


def test_passive_mode_intel_cpufreq_is_driven_the_same_way(sim_sysfs):
    root = sim_sysfs("intel_pstate", cpus=1)
    (root / f"{POLICY}0/scaling_driver").write_text("intel_cpufreq\n")
    cf = open_cpufreq(KernelSysfs(root))
    assert cf.driver(0) == "intel_cpufreq"
    assert cf.set_khz(0, 800_000)
    assert cf.state(0).target_khz == 800_000
