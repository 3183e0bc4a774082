"""The simulated sysfs builder, its CLI, and KernelSysfs (the kernel's rules on the tree)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from vmpower.cpufreq.simulate import (
    DRIVERS,
    KernelSysfs,
    build_from_fixture,
    build_tree,
    load_fixture,
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


# -- the simulation against real hosts (tests/data/real-hosts/*.json) --------------------

FIXTURES = Path(__file__).resolve().parent / "data" / "real-hosts"
# Each recorded host and the build_tree arguments that simulate its driver.
SHAPES = {
    "spr1": ("intel_pstate", {}),
    "mtl-m-2": ("intel_pstate", {}),
    "bdwep0": ("intel_cpufreq", {}),
    "icxd0": ("acpi-cpufreq", {}),
    "milan0": ("acpi-cpufreq", {"vendor": "amd"}),
    "turin0": ("amd-pstate-epp", {"governor": "performance"}),
}
# Policy files the kernel shows on some hosts only: cpuinfo_avg_freq (kernels >= 6.13,
# where APERF/MPERF serve; spr1 lacks it).
OPTIONAL_FILES = {"cpuinfo_avg_freq"}
# Global files the simulation has and a recording may lack: pepc records only what it
# reads (amd_pstate/), and hybrid parts have no num_pstates/turbo_pct (intel_pstate.c
# hides them when hybrid).
UNRECORDED_GLOBALS = {"amd_pstate/status", "amd_pstate/prefcore"}
HYBRID_GLOBALS = {"intel_pstate/num_pstates", "intel_pstate/turbo_pct"}


def trees(tmp_path: Path, host: str) -> tuple[Path, Path]:
    """(the recorded host's tree, the simulation's tree of the same driver)."""
    driver, kwargs = SHAPES[host]
    real, sim = tmp_path / "real", tmp_path / "sim"
    build_from_fixture(real, FIXTURES / f"{host}.json", max_cpus=4)
    build_tree(sim, driver, 4, turbo=True, **kwargs)
    return real, sim


def policy_files(root: Path, num: int = 1) -> dict[str, str]:
    pol = root / CPU / "cpufreq" / f"policy{num}"
    return {p.name: p.read_text() for p in pol.iterdir()}


def global_files(root: Path) -> set[str]:
    found = set()
    for sub in ("intel_pstate", "amd_pstate"):
        if (root / CPU / sub).is_dir():
            found |= {f"{sub}/{p.name}" for p in (root / CPU / sub).iterdir()}
    if (root / CPU / "cpufreq" / "boost").exists():
        found.add("cpufreq/boost")
    return found


def shape(text: str) -> str:
    """A value's format: what a parser of the file has to cope with."""
    body = text.rstrip("\n")
    words = body.split()
    if not words:
        return "empty"
    kind = "ints" if all(w.isdigit() for w in words) else "words"
    if len(words) == 1:
        kind = "int" if words[0].isdigit() else "word"
    return kind + (" +trailing space" if body.endswith(" ") else "")


def test_every_fixture_names_its_source_and_builds(tmp_path):
    for path in sorted(FIXTURES.glob("*.json")):
        fixture = load_fixture(path)
        assert fixture["provenance"].get("repo") or fixture["provenance"].get("source")
        build_from_fixture(tmp_path / path.stem, path, max_cpus=4)
        assert (tmp_path / path.stem / CPU / "cpu0" / "cpufreq" / "scaling_driver").exists()


@pytest.mark.parametrize("host", SHAPES)
def test_simulation_has_the_recorded_files(tmp_path, host):
    real, sim = trees(tmp_path, host)
    assert set(policy_files(real)) - OPTIONAL_FILES == set(policy_files(sim)) - OPTIONAL_FILES
    allowed = UNRECORDED_GLOBALS | (HYBRID_GLOBALS if host == "mtl-m-2" else set())
    assert global_files(real) <= global_files(sim)
    assert global_files(sim) - global_files(real) <= allowed


@pytest.mark.parametrize("host", SHAPES)
def test_simulation_writes_the_recorded_formats(tmp_path, host):
    real_root, sim_root = trees(tmp_path, host)
    real, sim = policy_files(real_root), policy_files(sim_root)
    for name in sorted(set(real) & set(sim)):
        assert shape(sim[name]) == shape(real[name]), name


def probe_rules(root: Path) -> list[tuple[str, str]]:
    """The same writes on any tree, and what the kernel (KernelSysfs) made of each."""
    ks = KernelSysfs(root)
    pol = f"{CPU}/cpufreq/policy1"
    out: list[tuple[str, str]] = []

    def attempt(step: str, rel: str, value: str) -> None:
        try:
            ks.write(rel, value)
            out.append((step, "ok"))
        except SysfsError as exc:
            errno = re.search(r"\b(E[A-Z]+)\b", exc.reason)
            out.append((step, errno.group(1) if errno else exc.reason))

    def observe(step: str, fact: bool) -> None:
        out.append((step, str(fact)))

    attempt("cpuinfo_max_freq is read-only", f"{pol}/cpuinfo_max_freq", "1")
    attempt(
        "setspeed outside userspace",
        f"{pol}/scaling_setspeed",
        read(root, f"{pol}/cpuinfo_min_freq"),
    )
    attempt("unknown governor", f"{pol}/scaling_governor", "bogus")
    above = int(read(root, f"{pol}/scaling_max_freq")) + 1
    attempt("min above max", f"{pol}/scaling_min_freq", str(above))
    if (root / pol / "energy_performance_preference").exists():
        attempt("EPP default", f"{pol}/energy_performance_preference", "default")
        observe(
            "EPP never reads default",
            read(root, f"{pol}/energy_performance_preference") != "default",
        )
        attempt("EPP raw number", f"{pol}/energy_performance_preference", "128")
    top = int(read(root, f"{pol}/cpuinfo_max_freq"))
    if (root / CPU / "intel_pstate" / "no_turbo").exists():
        attempt("no_turbo=1", f"{CPU}/intel_pstate/no_turbo", "1")
        observe("cpuinfo_max_freq drops", int(read(root, f"{pol}/cpuinfo_max_freq")) < top)
        attempt("no_turbo=0", f"{CPU}/intel_pstate/no_turbo", "0")
        observe("and comes back", int(read(root, f"{pol}/cpuinfo_max_freq")) == top)
    if (root / CPU / "cpufreq" / "boost").exists():
        attempt("global boost off", f"{CPU}/cpufreq/boost", "0")
        observe("the policy follows", read(root, f"{pol}/boost") == "0")
        observe("cpuinfo_max_freq drops", int(read(root, f"{pol}/cpuinfo_max_freq")) < top)
        attempt("policy boost while global off", f"{pol}/boost", "1")
        attempt("global boost on", f"{CPU}/cpufreq/boost", "1")
        observe("the policy follows", read(root, f"{pol}/boost") == "1")
    return out


@pytest.mark.parametrize("host", SHAPES)
def test_simulation_obeys_the_same_write_rules_on_the_recorded_shape(tmp_path, host):
    real, sim = trees(tmp_path, host)
    assert probe_rules(sim) == probe_rules(real)


def test_cli_builds_a_recorded_host(tmp_path, capsys):
    target = tmp_path / "sys"
    assert main([str(target), "--fixture", str(FIXTURES / "milan0.json"), "--cpus", "8"]) == 0
    assert "milan0" in capsys.readouterr().out
    assert read(target, f"{CPU}/present") == "0-7"
    assert (
        read(target, f"{CPU}/cpu3/cpufreq/scaling_available_frequencies")
        == "2800000 2100000 1500000"
    )
    with pytest.raises(SystemExit):
        main(
            [
                str(tmp_path / "x"),
                "--fixture",
                str(FIXTURES / "milan0.json"),
                "--driver",
                "intel_pstate",
            ]
        )


def test_a_policy_spanning_several_cpus_is_linked_from_each(tmp_path):
    root = tmp_path / "sys"
    build_from_fixture(root, FIXTURES / "imx8qxp-mek.json")
    for cpu in range(4):
        assert os.readlink(root / CPU / f"cpu{cpu}" / "cpufreq") == "../cpufreq/policy0"
    assert read(root, f"{CPU}/cpu3/cpufreq/related_cpus") == "0 1 2 3"
    assert not (root / CPU / "cpufreq" / "policy3").exists()


def test_firmware_disabled_turbo_refuses_only_switching_it_on(tmp_path):
    root = tmp_path / "sys"
    build_tree(root, "intel_pstate", 2, turbo=False)
    ks = KernelSysfs(root)
    ks.write(f"{CPU}/intel_pstate/no_turbo", "1")
    with pytest.raises(SysfsError, match="EPERM"):
        ks.write(f"{CPU}/intel_pstate/no_turbo", "0")


def test_booted_no_turbo_shows_the_base_and_accepts_turbo_back(tmp_path):
    root = tmp_path / "sys"
    build_tree(root, "intel_pstate", 2, turbo=True, no_turbo=True)
    assert read(root, f"{CPU}/cpufreq/policy1/cpuinfo_max_freq") == "3000000"
    KernelSysfs(root).write(f"{CPU}/intel_pstate/no_turbo", "0")
    assert read(root, f"{CPU}/cpufreq/policy1/cpuinfo_max_freq") == "4700000"
    assert read(root, f"{CPU}/cpufreq/policy1/scaling_max_freq") == "4700000"


@pytest.mark.parametrize(
    ("where", "evil"),
    [
        ("global", {"../../../etc/x": "1"}),
        ("core_types", {"../../x": "0"}),
        ("files", {"../escape": "1"}),
        ("files", {"scaling_governor": "a\nb"}),
        ("cpu_lists", {"related_cpus": {"form": "explicit", "values": {"0": "0 ../1"}}}),
        ("acpi_cppc", {"../x": "1"}),
        ("volatile_files", ["../x"]),
    ],
)
def test_a_fixture_cannot_name_a_path_of_its_choosing(tmp_path, where, evil):
    fixture = load_fixture(FIXTURES / "milan0.json")
    if where in ("global", "core_types", "cpu_lists"):
        fixture[where] = evil
    elif where == "volatile_files":
        fixture["shapes"][0][where] = evil
    else:
        fixture["shapes"][0][where].update(evil)
    with pytest.raises(ValueError, match="fixture milan0"):
        build_from_fixture(tmp_path / "sys", fixture, max_cpus=2)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "x").exists()
