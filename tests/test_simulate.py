"""The simulated sysfs builder, its CLI, and KernelSysfs (the kernel's rules on the tree)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmpower.cpufreq.simulate import (
    DRIVERS,
    KernelSysfs,
    build_tree,
    main,
    set_cpu_online,
    snapshot,
)
from vmpower.errors import SysfsError

CPU = "devices/system/cpu"


def read(root: Path, rel: str) -> str:
    return (root / rel).read_text().strip()


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("turbo", [True, False])
def test_tree_has_the_kernel_files_with_consistent_values(sim_sysfs, driver, turbo):
    root = sim_sysfs(driver, cpus=4, turbo=turbo)
    assert read(root, f"{CPU}/present") == "0-3"
    assert read(root, f"{CPU}/possible") == "0-3"
    assert read(root, f"{CPU}/online") == "0-3"
    assert read(root, f"{CPU}/offline") == ""
    assert not (root / CPU / "cpu0/online").exists()  # the boot CPU cannot be unplugged
    for cpu in range(4):
        d = f"{CPU}/cpu{cpu}/cpufreq"
        assert (root / CPU / f"cpu{cpu}/cpufreq").is_symlink()
        assert read(root, f"{d}/scaling_driver") == driver
        assert read(root, f"{d}/affected_cpus") == str(cpu)
        lo, hi = (int(read(root, f"{d}/cpuinfo_{x}_freq")) for x in ("min", "max"))
        smin, smax = (int(read(root, f"{d}/scaling_{x}_freq")) for x in ("min", "max"))
        cur = int(read(root, f"{d}/scaling_cur_freq"))
        assert 100_000 <= lo <= smin <= cur <= smax <= hi <= 10_000_000  # kHz, plausible
        governor = read(root, f"{d}/scaling_governor")
        assert governor in read(root, f"{d}/scaling_available_governors").split()
        assert read(root, f"{d}/scaling_setspeed") == "<unsupported>"
        if cpu > 0:
            assert read(root, f"{CPU}/cpu{cpu}/online") == "1"


def test_acpi_table_puts_the_turbo_entry_1mhz_above_first(sim_sysfs):
    root = sim_sysfs("acpi-cpufreq", cpus=1, turbo=True)
    text = (root / CPU / "cpu0/cpufreq/scaling_available_frequencies").read_text()
    assert text.endswith(" \n")  # the kernel prints "%u " per entry
    table = [int(v) for v in text.split()]
    assert table == sorted(table, reverse=True)
    assert table[0] - table[1] == 1000
    assert table[0] == int(read(root, f"{CPU}/cpu0/cpufreq/cpuinfo_max_freq"))
    assert read(root, f"{CPU}/cpufreq/boost") == "1"
    no_turbo = sim_sysfs("acpi-cpufreq", cpus=1, turbo=False)
    table = [
        int(v) for v in read(no_turbo, f"{CPU}/cpu0/cpufreq/scaling_available_frequencies").split()
    ]
    assert table[0] - table[1] == 100_000
    assert not (no_turbo / CPU / "cpufreq/boost").exists()


def test_intel_pstate_tree(sim_sysfs):
    root = sim_sysfs("intel_pstate", cpus=4, turbo=True, priority_cpus={2})
    d = f"{CPU}/cpu0/cpufreq"
    assert read(root, f"{d}/scaling_available_governors") == "performance powersave"
    assert int(read(root, f"{d}/base_frequency")) < int(read(root, f"{d}/cpuinfo_max_freq"))
    assert int(read(root, f"{CPU}/cpu2/cpufreq/base_frequency")) > int(
        read(root, f"{d}/base_frequency")
    )
    epp = read(root, f"{d}/energy_performance_preference")
    assert epp in read(root, f"{d}/energy_performance_available_preferences").split()
    for name, value in {"status": "active", "no_turbo": "0", "max_perf_pct": "100"}.items():
        assert read(root, f"{CPU}/intel_pstate/{name}") == value
    assert not (root / CPU / "cpufreq/boost").exists()  # intel_pstate has no boost file
    no_turbo_hw = sim_sysfs("intel_pstate", cpus=1, turbo=False)
    assert read(no_turbo_hw, f"{CPU}/intel_pstate/no_turbo") == "1"


@pytest.mark.parametrize("driver", ["amd-pstate", "amd-pstate-epp"])
def test_amd_pstate_tree(sim_sysfs, driver):
    root = sim_sysfs(driver, cpus=2, turbo=True, priority_cpus={1})
    d = f"{CPU}/cpu0/cpufreq"
    cppc = f"{CPU}/cpu0/acpi_cppc"
    assert int(read(root, f"{cppc}/highest_perf")) > int(read(root, f"{cppc}/nominal_perf"))
    # cppc_sysfs.rst: nominal_freq is in MHz
    assert int(read(root, f"{cppc}/nominal_freq")) * 1000 < int(read(root, f"{d}/cpuinfo_max_freq"))
    assert read(root, f"{d}/amd_pstate_max_freq") == read(root, f"{d}/cpuinfo_max_freq")
    assert read(root, f"{d}/boost") == "1"
    assert int(read(root, f"{CPU}/cpu1/cpufreq/amd_pstate_prefcore_ranking")) > int(
        read(root, f"{d}/amd_pstate_prefcore_ranking")
    )
    status = "active" if driver == "amd-pstate-epp" else "passive"
    assert read(root, f"{CPU}/amd_pstate/status") == status
    assert read(root, f"{CPU}/amd_pstate/prefcore") == "enabled"
    assert (root / d / "energy_performance_preference").exists() == (driver == "amd-pstate-epp")


def test_cppc_tree(sim_sysfs):
    root = sim_sysfs("cppc_cpufreq", cpus=2, turbo=False)
    cppc = f"{CPU}/cpu1/acpi_cppc"
    assert read(root, f"{cppc}/highest_perf") == read(root, f"{cppc}/nominal_perf")
    assert int(read(root, f"{cppc}/nominal_freq")) * 1000 == int(
        read(root, f"{CPU}/cpu1/cpufreq/cpuinfo_max_freq")
    )


def test_offline_cpus_have_online_0_and_no_cpufreq(sim_sysfs):
    root = sim_sysfs("intel_pstate", cpus=8, offline="2,5-6")
    assert read(root, f"{CPU}/online") == "0-1,3-4,7"
    assert read(root, f"{CPU}/offline") == "2,5-6"
    for cpu in (2, 5, 6):
        assert read(root, f"{CPU}/cpu{cpu}/online") == "0"
        assert not (root / CPU / f"cpu{cpu}/cpufreq").exists()
    assert (root / CPU / "cpu3/cpufreq/scaling_driver").exists()


def test_hotplug_helper_moves_the_policy_link_and_lists(sim_sysfs):
    root = sim_sysfs(cpus=4)
    set_cpu_online(root, 3, False)
    assert not (root / CPU / "cpu3/cpufreq").exists()
    assert read(root, f"{CPU}/offline") == "3"
    set_cpu_online(root, 3, True)
    assert (root / CPU / "cpu3/cpufreq/scaling_driver").exists()
    assert read(root, f"{CPU}/online") == "0-3"
    with pytest.raises(SysfsError, match="cannot be unplugged"):
        set_cpu_online(root, 0, False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"driver": "speedstep"}, "unknown driver"),
        ({"cpus": 0}, "cpus must be"),
        ({"offline": {0}}, "cpu0 cannot be offline"),
        ({"offline": {9}}, "CPU 9 is not among"),
        ({"governor": "ondemand", "driver": "intel_pstate"}, "no governor 'ondemand'"),
    ],
)
def test_build_tree_rejects_bad_arguments(tmp_path, kwargs, message):
    args = {"driver": "acpi-cpufreq", "cpus": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        build_tree(tmp_path / "sys", **args)
    assert not (tmp_path / "sys").exists()  # nothing half-written


def test_build_tree_refuses_the_real_sysfs():
    with pytest.raises(ValueError, match="refusing"):
        build_tree("/sys", "acpi-cpufreq", 2)


# -- the CLI ---------------------------------------------------------------------------


def test_cli_builds_a_tree(tmp_path, capsys):
    target = tmp_path / "tree"
    assert (
        main(
            [str(target), "--driver", "amd-pstate-epp", "--cpus", "4", "--turbo", "--offline", "3"]
        )
        == 0
    )
    assert "simulated amd-pstate-epp" in capsys.readouterr().out
    assert read(target, f"{CPU}/cpu0/cpufreq/scaling_driver") == "amd-pstate-epp"
    assert read(target, f"{CPU}/offline") == "3"


def test_cli_help_exits_0(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--driver" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--offline", "1-x"], "bad item"),
        (["--offline", "0"], "cpu0 cannot be offline"),
        (["--cpus", "0"], "cpus must be"),
    ],
)
def test_cli_reports_bad_input(tmp_path, capsys, extra, message):
    argv = [str(tmp_path / "t"), "--driver", "acpi-cpufreq", "--cpus", "4", *extra]
    # argparse allows repeated options: the last --cpus wins
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_a_non_empty_directory_without_force(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--driver", "cppc_cpufreq", "--cpus", "2"])
    assert "not empty" in capsys.readouterr().err
    assert main([str(tmp_path), "--driver", "cppc_cpufreq", "--cpus", "2", "--force"]) == 0
    assert (tmp_path / "keep.txt").read_text() == "mine"
    # --force over an existing tree replaces it (fewer CPUs now)
    assert main([str(tmp_path), "--driver", "cppc_cpufreq", "--cpus", "1", "--force"]) == 0
    assert read(tmp_path, f"{CPU}/present") == "0"
    assert not (tmp_path / CPU / "cpu1").exists()


# -- KernelSysfs: what the kernel would refuse ------------------------------------------


def test_kernel_refuses_setspeed_unless_userspace(sim_sysfs):
    sysfs = KernelSysfs(sim_sysfs("acpi-cpufreq", cpus=1))
    d = f"{CPU}/cpu0/cpufreq"
    with pytest.raises(SysfsError, match="not userspace"):
        sysfs.write(f"{d}/scaling_setspeed", 2_000_000)
    sysfs.write(f"{d}/scaling_governor", "userspace")
    assert sysfs.read(f"{d}/scaling_setspeed") == sysfs.read(f"{d}/scaling_cur_freq")
    sysfs.write(f"{d}/scaling_setspeed", 2_000_000)
    assert sysfs.read(f"{d}/scaling_cur_freq") == "2000000"
    sysfs.write(f"{d}/scaling_governor", "ondemand")
    assert sysfs.read(f"{d}/scaling_setspeed") == "<unsupported>"


def test_kernel_refuses_min_above_max_and_clamps_to_hardware(sim_sysfs):
    sysfs = KernelSysfs(sim_sysfs("intel_pstate", cpus=1))
    d = f"{CPU}/cpu0/cpufreq"
    sysfs.write(f"{d}/scaling_max_freq", 2_000_000)
    with pytest.raises(SysfsError, match="above scaling_max_freq"):
        sysfs.write(f"{d}/scaling_min_freq", 2_500_000)
    sysfs.write(f"{d}/scaling_min_freq", 1_500_000)
    with pytest.raises(SysfsError, match="below scaling_min_freq"):
        sysfs.write(f"{d}/scaling_max_freq", 1_000_000)
    sysfs.write(f"{d}/scaling_max_freq", 9_000_000)
    assert sysfs.read(f"{d}/scaling_max_freq") == sysfs.read(f"{d}/cpuinfo_max_freq")


def test_kernel_no_turbo_caps_the_limits_at_base(sim_sysfs):
    sysfs = KernelSysfs(sim_sysfs("intel_pstate", cpus=2))
    sysfs.write(f"{CPU}/intel_pstate/no_turbo", 1)
    base = sysfs.read(f"{CPU}/cpu1/cpufreq/base_frequency")
    assert sysfs.read(f"{CPU}/cpu1/cpufreq/scaling_max_freq") == base
    sysfs.write(f"{CPU}/cpu1/cpufreq/scaling_max_freq", 4_700_000)
    assert sysfs.read(f"{CPU}/cpu1/cpufreq/scaling_max_freq") == base
    no_hw_turbo = KernelSysfs(sim_sysfs("intel_pstate", cpus=1, turbo=False))
    with pytest.raises(SysfsError, match="EPERM"):
        no_hw_turbo.write(f"{CPU}/intel_pstate/no_turbo", 0)


def test_kernel_epp_rules(sim_sysfs):
    sysfs = KernelSysfs(sim_sysfs("amd-pstate-epp", cpus=1))
    d = f"{CPU}/cpu0/cpufreq"
    with pytest.raises(SysfsError, match="EINVAL"):
        sysfs.write(f"{d}/energy_performance_preference", "turbo-please")
    sysfs.write(f"{d}/energy_performance_preference", "power")
    sysfs.write(f"{d}/scaling_governor", "performance")
    with pytest.raises(SysfsError, match="EBUSY"):
        sysfs.write(f"{d}/energy_performance_preference", "balance_power")
    sysfs.write(f"{d}/energy_performance_preference", "performance")
    with pytest.raises(SysfsError, match="not one of"):
        sysfs.write(f"{d}/scaling_governor", "userspace")  # amd-pstate-epp has two


@pytest.mark.parametrize(
    "rel",
    [
        f"{CPU}/cpu0/cpufreq/cpuinfo_max_freq",
        f"{CPU}/cpu0/cpufreq/scaling_cur_freq",
        f"{CPU}/cpu0/cpufreq/scaling_available_frequencies",
        f"{CPU}/online",
    ],
)
def test_kernel_read_only_attributes(sim_sysfs, rel):
    root = sim_sysfs(cpus=1)
    before = read(root, rel)
    with pytest.raises(SysfsError, match="EACCES"):
        KernelSysfs(root).write(rel, "1")
    assert read(root, rel) == before


def test_kernel_hotplug_through_online_file(sim_sysfs):
    root = sim_sysfs(cpus=4)
    sysfs = KernelSysfs(root)
    sysfs.write(f"{CPU}/cpu2/online", 0)
    assert not (root / CPU / "cpu2/cpufreq").exists()
    with pytest.raises(SysfsError, match=r"offline|no such file"):
        sysfs.write(f"{CPU}/cpu2/cpufreq/scaling_max_freq", 2_000_000)
    with pytest.raises(SysfsError, match="expected 0 or 1"):
        sysfs.write(f"{CPU}/cpu2/online", "yes")
    sysfs.write(f"{CPU}/cpu2/online", 1)
    assert read(root, f"{CPU}/cpu2/cpufreq/scaling_driver") == "acpi-cpufreq"


def test_kernel_boost_takes_only_0_or_1(sim_sysfs):
    sysfs = KernelSysfs(sim_sysfs(cpus=1))
    with pytest.raises(SysfsError, match="expected 0 or 1"):
        sysfs.write(f"{CPU}/cpufreq/boost", "on")
    sysfs.write(f"{CPU}/cpufreq/boost", 0)
    assert sysfs.read(f"{CPU}/cpufreq/boost") == "0"


def test_write_path_stays_inside_the_root(sim_sysfs, tmp_path):
    root = sim_sysfs(cpus=1)
    sysfs = KernelSysfs(root)
    sysfs.write_path(os.path.join(root, f"{CPU}/cpufreq/boost"), "0")
    assert read(root, f"{CPU}/cpufreq/boost") == "0"
    with pytest.raises(SysfsError, match="outside"):
        sysfs.write_path(str(tmp_path / "elsewhere"), "1")


def test_snapshot_lists_each_file_once(sim_sysfs):
    root = sim_sysfs(cpus=2)
    files = snapshot(root)
    # policy files appear under cpufreq/policyN only (cpuN/cpufreq is a link)
    assert f"{CPU}/cpufreq/policy1/scaling_governor" in files
    assert not any(p.startswith(f"{CPU}/cpu1/cpufreq/") for p in files)
    assert files[f"{CPU}/present"] == "0-1\n"
