"""acpi-cpufreq: userspace governor + scaling_setspeed, the _PSS turbo entry, boost."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from vmpower.cpufreq import CpuFreq, open_cpufreq
from vmpower.cpufreq.simulate import KernelSysfs, build_tree
from vmpower.errors import CpufreqError, UnsupportedError
from vmpower.restore import RestoreJournal
from vmpower.sysfs import Sysfs

CPU = "devices/system/cpu"
POLICY = f"{CPU}/cpufreq/policy"


def read(root: Path, rel: str) -> str:
    return (root / rel).read_text().strip()


def journaled(root: Path, tmp_path: Path) -> tuple[CpuFreq, RestoreJournal]:
    journal = RestoreJournal(tmp_path / "state", writer=KernelSysfs(root).write_path)
    return open_cpufreq(KernelSysfs(root, journal)), journal


def test_first_control_switches_the_governor_to_userspace_journaled_first(sim_sysfs, tmp_path):
    root = sim_sysfs("acpi-cpufreq", cpus=2)
    cf, journal = journaled(root, tmp_path)
    assert cf.requested_khz(1) == 1_600_000  # not controlled: the current frequency
    assert cf.set_khz(1, 1_700_000)
    assert read(root, f"{POLICY}1/scaling_governor") == "userspace"
    assert read(root, f"{POLICY}1/scaling_setspeed") == "1700000"
    assert read(root, f"{POLICY}0/scaling_governor") == "schedutil"  # only that CPU
    pending = list(journal.pending().items())
    # setspeed as the kernel showed it before the governor was taken: journaled first
    assert [(Path(p).name, t) for p, t in pending] == [
        ("scaling_setspeed", "<unsupported>"),
        ("scaling_governor", "schedutil"),
    ]
    # restore, newest first: the governor back; setspeed's placeholder needs no write
    assert journal.restore().failed == []
    assert read(root, f"{POLICY}1/scaling_governor") == "schedutil"
    assert read(root, f"{POLICY}1/scaling_setspeed") == "<unsupported>"


def test_a_cpu_already_under_userspace_keeps_its_governor_untouched(sim_sysfs, tmp_path):
    root = sim_sysfs("acpi-cpufreq", cpus=1, governor="userspace")
    cf, journal = journaled(root, tmp_path)
    assert cf.requested_khz(0) == 1_600_000  # read from scaling_setspeed
    assert cf.state(0).target_khz == 1_600_000
    assert cf.set_khz(0, 1_200_000)
    assert [Path(p).name for p in journal.pending()] == ["scaling_setspeed"]


def test_after_forget_the_governor_is_taken_again(sim_sysfs, tmp_path):
    root = sim_sysfs("acpi-cpufreq", cpus=1)
    cf, journal = journaled(root, tmp_path)
    assert cf.set_khz(0, 2_301_000)
    journal.restore()
    cf.forget(0)
    assert cf.set_khz(0, 1_200_000)
    assert read(root, f"{POLICY}0/scaling_governor") == "userspace"
    assert read(root, f"{POLICY}0/scaling_setspeed") == "1200000"


def test_current_frequency_off_the_table_rounds_to_the_nearest_entry(sim_sysfs):
    root = sim_sysfs("acpi-cpufreq", cpus=1)
    (root / f"{POLICY}0/scaling_cur_freq").write_text("1641000\n")
    cf = open_cpufreq(Sysfs(root))
    assert cf.requested_khz(0) == 1_600_000
    (root / f"{POLICY}0/scaling_cur_freq").write_text("1651000\n")
    assert cf.requested_khz(0) == 1_700_000  # nearer the entry above


def test_turbo_is_the_pss_entry_1000_khz_above(sim_sysfs):
    cf = open_cpufreq(Sysfs(sim_sysfs("acpi-cpufreq", cpus=1)))
    assert cf.table_khz(0)[:2] == (2_301_000, 2_300_000)
    assert cf.capabilities(0).turbo
    # a table whose top two entries are 100 MHz apart has no turbo entry
    plain = open_cpufreq(Sysfs(sim_sysfs("acpi-cpufreq", cpus=1, turbo=False)))
    assert plain.table_khz(0)[:2] == (2_300_000, 2_200_000)
    assert not plain.capabilities(0).turbo


def test_boost_off_caps_every_cpu_and_set_turbo_switches_it_on_journaled(
    sim_sysfs, tmp_path, caplog
):
    root = sim_sysfs("acpi-cpufreq", cpus=2)
    (root / f"{CPU}/cpufreq/boost").write_text("0\n")
    cf, journal = journaled(root, tmp_path)
    assert not cf.turbo_enabled(0) and not cf.turbo_enabled(1)
    with pytest.raises(CpufreqError, match="turbo is disabled"):
        cf.set_khz(0, 2_301_000)
    assert cf.set_khz(0, 2_300_000)
    with caplog.at_level(logging.WARNING, logger="vmpower.cpufreq"):
        cf.set_turbo(0, True)
    assert read(root, f"{CPU}/cpufreq/boost") == "1"
    assert "system-wide" in caplog.text
    assert cf.turbo_enabled(0) and cf.turbo_enabled(1)  # the switch is global
    assert read(root, f"{POLICY}0/scaling_setspeed") == "2300000"  # not moved by the switch
    assert cf.set_khz(0, 2_301_000)
    assert read(root, f"{POLICY}0/scaling_setspeed") == "2301000"
    journal.restore()
    assert read(root, f"{CPU}/cpufreq/boost") == "0"


def test_turbo_off_is_refused_and_never_touches_the_global_switch(sim_sysfs):
    root = sim_sysfs("acpi-cpufreq", cpus=2)
    cf = open_cpufreq(KernelSysfs(root))
    with pytest.raises(CpufreqError, match="never switches turbo off"):
        cf.set_turbo(0, False)
    assert read(root, f"{CPU}/cpufreq/boost") == "1"
    assert cf.turbo_enabled(0) and cf.turbo_enabled(1)


def test_no_userspace_governor_is_unsupported_reported_once(sim_sysfs, caplog):
    root = sim_sysfs("acpi-cpufreq", cpus=2)
    for cpu in (0, 1):
        (root / f"{POLICY}{cpu}/scaling_available_governors").write_text("ondemand performance\n")
    cf = open_cpufreq(KernelSysfs(root))
    with caplog.at_level(logging.WARNING, logger="vmpower.cpufreq"):
        for cpu in (0, 1, 0):
            with pytest.raises(UnsupportedError, match="userspace governor is not available"):
                cf.set_khz(cpu, 2_300_000)
    assert caplog.text.count("userspace governor is not available") == 1
    assert read(root, f"{POLICY}0/scaling_governor") == "schedutil"
    assert cf.unsupported() == [
        r.getMessage().removeprefix("unsupported: ") for r in caplog.records
    ]


def test_epp_is_unsupported_on_acpi(sim_sysfs, caplog):
    cf = open_cpufreq(Sysfs(sim_sysfs("acpi-cpufreq", cpus=1)))
    with caplog.at_level(logging.WARNING, logger="vmpower.cpufreq"):
        for _ in range(3):
            with pytest.raises(UnsupportedError, match="energy_performance_preference"):
                cf.set_epp(0, "power")
    assert caplog.text.count("energy_performance_preference") == 1


def test_unknown_driver_with_a_table_works_through_setspeed(tmp_path):
    root = tmp_path / "sys"
    build_tree(root, "acpi-cpufreq", 2, turbo=True)
    for cpu in (0, 1):
        (root / f"{POLICY}{cpu}/scaling_driver").write_text("cpufreq-dt\n")
    cf = open_cpufreq(KernelSysfs(root))
    assert cf.driver(0) == "cpufreq-dt"
    assert cf.managed(0)
    # the 1000 kHz turbo convention is ACPI's: another driver's top entry is plain
    assert not cf.capabilities(0).turbo
    assert cf.set_khz(0, 2_301_000)  # no turbo range: the top entry needs no switch
    assert read(root, f"{POLICY}0/scaling_setspeed") == "2301000"


def test_unknown_driver_without_a_table_is_unsupported(tmp_path, caplog):
    root = tmp_path / "sys"
    build_tree(root, "intel_pstate", 2)
    for cpu in (0, 1):
        (root / f"{POLICY}{cpu}/scaling_driver").write_text("mystery\n")
    with caplog.at_level(logging.WARNING, logger="vmpower.cpufreq"):
        cf = open_cpufreq(Sysfs(root))
        assert not cf.managed(0)
        for _ in range(2):
            with pytest.raises(UnsupportedError, match="mystery"):
                cf.set_khz(0, 2_000_000)
    assert caplog.text.count("'mystery' is not supported") == 1


def test_a_host_without_cpufreq(tmp_path):
    root = tmp_path / "sys"
    for cpu in range(3):
        (root / f"{CPU}/cpu{cpu}").mkdir(parents=True)
    cf = open_cpufreq(Sysfs(root))
    assert cf.cpus() == [0, 1, 2]  # no present list: the cpuN directories
    assert not any(cf.managed(c) for c in cf.cpus())
    assert cf.driver(0) == ""
    with pytest.raises(CpufreqError, match="no cpufreq"):
        cf.set_khz(1, 1_000_000)
    assert cf.state(1).governor is None
