"""The CpuFreq facade on every driver: sets, the turbo switch, refusals, state, files.

Most tests run on KernelSysfs, which refuses what the kernel would refuse, so a
passing test also shows vmpower never asked the kernel for something invalid.
"""

from __future__ import annotations

import gc
import logging
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmpower.cpufreq import Capabilities, CpuFreq, open_cpufreq
from vmpower.cpufreq.simulate import DRIVERS, KernelSysfs, build_tree, set_cpu_online, snapshot
from vmpower.errors import CpufreqError, UnsupportedError
from vmpower.restore import RestoreJournal

CPU = "devices/system/cpu"

# What build_tree makes, per driver (turbo on): table top, nominal, bottom, length.
EXPECTED = {
    "acpi-cpufreq": (2_301_000, 2_300_000, 1_200_000, 13),
    "intel_pstate": (4_700_000, 3_000_000, 800_000, 40),
    # no base_frequency: nominal from intel_pstate/turbo_pct and num_pstates
    "intel_cpufreq": (4_700_000, 3_000_000, 800_000, 40),
    "amd-pstate-epp": (4_680_000, 3_300_000, 400_000, 31),
    "amd-pstate": (4_680_000, 3_300_000, 400_000, 31),
    "cppc_cpufreq": (3_300_000, 3_000_000, 1_000_000, 22),
}


def kernel(
    root: Path, journal: RestoreJournal | None = None, reserved: frozenset[int] = frozenset()
) -> CpuFreq:
    return open_cpufreq(KernelSysfs(root, journal), reserved)


def raw(root: Path, rel: str, value: object) -> None:
    """Change a file behind vmpower's back (as an administrator would)."""
    (root / rel).write_text(f"{value}\n")


# Each driver's turbo switch (relative path, value meaning "off"); amd-pstate has one
# per policy, the others one for the whole system.
SWITCHES = {
    "acpi-cpufreq": [(f"{CPU}/cpufreq/boost", "0")],
    "intel_pstate": [(f"{CPU}/intel_pstate/no_turbo", "1")],
    "intel_cpufreq": [(f"{CPU}/intel_pstate/no_turbo", "1")],
    "amd-pstate-epp": [(f"{CPU}/cpu{c}/cpufreq/boost", "0") for c in range(2)],
    "amd-pstate": [(f"{CPU}/cpu{c}/cpufreq/boost", "0") for c in range(2)],
    "cppc_cpufreq": [(f"{CPU}/cpufreq/boost", "0")],
}


def switch_turbo_off(root: Path, driver: str) -> list[str]:
    """Switch turbo off as an administrator would (through the kernel's rules: on
    intel_pstate no_turbo=1 also lowers the limits above base); returns the files."""
    kernel_writer = KernelSysfs(root)
    for rel, off in SWITCHES[driver]:
        kernel_writer.write(rel, off)
    return [rel for rel, _ in SWITCHES[driver]]


@pytest.mark.parametrize("driver", DRIVERS)
def test_table_is_high_to_low_with_turbo_first(sim_sysfs, driver):
    cf = kernel(sim_sysfs(driver, cpus=2))
    top, nominal, bottom, length = EXPECTED[driver]
    table = cf.table_khz(1)
    assert table == tuple(sorted(table, reverse=True))
    assert (table[0], table[-1], len(table)) == (top, bottom, length)
    assert cf.nominal_khz(1) == nominal
    assert table[table.index(nominal) - 1] > nominal  # the turbo range sits above nominal
    assert cf.capabilities(1) == Capabilities(turbo=True, priority=False)


@pytest.mark.parametrize("driver", DRIVERS)
def test_every_set_lands_in_the_files(sim_sysfs, driver):
    cf = kernel(sim_sysfs(driver, cpus=2))
    table = cf.table_khz(1)
    # down to the bottom, up one entry, to the top (turbo), down, the middle, repeats
    for khz in (table[-1], table[-2], table[0], table[1], table[len(table) // 2], table[-1]):
        assert cf.set_khz(1, khz)
        assert cf.requested_khz(1) == khz
        assert cf.state(1).target_khz == khz  # what the kernel's files now ask for
    assert cf.state(0).target_khz is None  # the other CPU was not touched


@pytest.mark.parametrize("driver", DRIVERS)
def test_turbo_switch_off_caps_at_nominal_and_set_turbo_switches_it_on_journaled(
    sim_sysfs, tmp_path, driver
):
    root = sim_sysfs(driver, cpus=2)
    switches = switch_turbo_off(root, driver)
    originals = {rel: (root / rel).read_text() for rel in switches}
    journal = RestoreJournal(tmp_path / "state", writer=KernelSysfs(root).write_path)
    cf = kernel(root, journal)
    top, nominal, _, _ = EXPECTED[driver]
    assert not cf.turbo_enabled(1)
    assert cf.state(1).turbo_enabled is False
    with pytest.raises(CpufreqError, match="turbo is disabled"):
        cf.set_khz(1, top)
    assert cf.set_khz(1, nominal)
    cf.set_turbo(1, True)
    assert cf.turbo_enabled(1)
    # only CPU 1's switch: the system-wide one, or its own policy's on amd-pstate
    switched = [rel for rel in switches if (root / rel).read_text() != originals[rel]]
    assert switched == [s for s in switches if "cpu0/" not in s]
    assert set(map(str, (root / rel for rel in switched))) <= set(journal.pending())
    # The kernel may raise the limit then (intel_pstate brings back the maximum
    # request, amd-pstate sets it to the new maximum): vmpower pins the CPU again.
    assert cf.state(1).target_khz == nominal  # switching on does not move the CPU
    assert cf.set_khz(1, top)
    assert cf.state(1).target_khz == top
    assert journal.restore().failed == []
    assert {rel: (root / rel).read_text() for rel in switches} == originals


@pytest.mark.parametrize("driver", DRIVERS)
def test_turbo_is_never_switched_off(sim_sysfs, driver):
    root = sim_sysfs(driver, cpus=2)
    cf = kernel(root)
    assert cf.set_khz(1, EXPECTED[driver][0])
    before = snapshot(root)
    with pytest.raises(CpufreqError, match="never switches turbo off"):
        cf.set_turbo(1, False)
    assert snapshot(root) == before
    assert cf.turbo_enabled(1) and cf.turbo_enabled(0)


@pytest.mark.parametrize("driver", DRIVERS)
def test_set_exact_and_a_repeat_writes_nothing(sim_sysfs, driver):
    root = sim_sysfs(driver, cpus=2)
    cf = kernel(root)
    table = cf.table_khz(0)
    khz = table[3]
    assert cf.set_khz(0, khz) is True
    assert cf.state(0).target_khz == khz
    # An administrator moves the limits behind vmpower's back; a repeat of the same
    # request must not write (it is the value vmpower last set).
    policy = f"{CPU}/cpufreq/policy0"
    if driver == "acpi-cpufreq":
        raw(root, f"{policy}/scaling_setspeed", table[-1])
    else:
        raw(root, f"{policy}/scaling_min_freq", table[-1])
        raw(root, f"{policy}/scaling_max_freq", table[-1])
    assert cf.set_khz(0, khz) is False
    assert cf.state(0).target_khz == table[-1]
    cf.forget(0)  # e.g. after the journal restored the CPU: the next set writes again
    assert cf.set_khz(0, khz) is True
    assert cf.state(0).target_khz == khz


@pytest.mark.parametrize("driver", DRIVERS)
def test_refusals_are_clear_and_write_nothing(sim_sysfs, driver):
    root = sim_sysfs(driver, cpus=4, offline="3")
    cf = kernel(root, reserved=frozenset({2}))
    table = cf.table_khz(0)
    before = snapshot(root)
    cases = [
        (0, table[-1] - 100_000, "outside|not in the frequency table"),
        (0, table[0] + 100_000, "outside|not in the frequency table"),
        (0, True, "integer kHz"),
        (0, "2000000", "integer kHz"),
        (2, table[-1], "reserved"),
        (3, table[-1], "offline"),
        (99, table[-1], "no CPU 99"),
    ]
    for cpu, khz, message in cases:
        with pytest.raises(CpufreqError, match=message):
            cf.set_khz(cpu, khz)  # type: ignore[arg-type]
    for enabled in (True, False):
        with pytest.raises(CpufreqError, match="reserved"):
            cf.set_turbo(2, enabled)
    with pytest.raises(CpufreqError, match="offline"):
        cf.set_turbo(3, True)
    assert snapshot(root) == before


def test_a_value_between_entries_is_refused_only_where_the_table_is_discrete(sim_sysfs):
    acpi = kernel(sim_sysfs("acpi-cpufreq", cpus=1))
    with pytest.raises(CpufreqError, match="not in the frequency table"):
        acpi.set_khz(0, 1_650_000)
    intel = kernel(sim_sysfs("intel_pstate", cpus=1))
    assert intel.set_khz(0, 1_650_000)  # HWP takes any kHz within the bounds
    assert intel.state(0).target_khz == 1_650_000


@pytest.mark.parametrize("driver", DRIVERS)
def test_cpus_online_managed_and_state(sim_sysfs, driver):
    root = sim_sysfs(driver, cpus=4, offline="2")
    cf = kernel(root, reserved=frozenset({1}))
    assert cf.cpus() == [0, 1, 2, 3]
    assert [cf.online(c) for c in range(5)] == [True, True, False, True, False]
    assert [cf.managed(c) for c in range(4)] == [True, False, False, True]
    assert cf.driver(3) == driver
    offline = cf.state(2)
    assert (offline.online, offline.governor, offline.cur_khz) == (False, None, None)
    state = cf.state(0)
    assert state.driver == driver and state.online
    assert state.cur_khz is not None and state.min_khz is not None and state.max_khz is not None
    assert state.turbo_enabled is True
    assert (state.epp is not None) == (driver in ("intel_pstate", "amd-pstate-epp"))
    with pytest.raises(CpufreqError, match="offline"):
        cf.table_khz(2)


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_cpu_unplugged_after_start_is_refused_then_usable_again(sim_sysfs, driver):
    root = sim_sysfs(driver, cpus=2)
    cf = kernel(root)
    table = cf.table_khz(1)
    assert cf.set_khz(1, table[-1])
    set_cpu_online(root, 1, False)
    assert not cf.managed(1)
    with pytest.raises(CpufreqError, match="offline"):
        cf.set_khz(1, table[0])
    set_cpu_online(root, 1, True)
    assert cf.managed(1)
    assert cf.set_khz(1, table[0])
    assert cf.state(1).target_khz == table[0]


@pytest.mark.parametrize("driver", DRIVERS)
def test_no_turbo_hardware(sim_sysfs, driver, caplog):
    cf = kernel(sim_sysfs(driver, cpus=2, turbo=False))
    table = cf.table_khz(0)
    assert cf.nominal_khz(0) == table[0]
    assert cf.capabilities(0) == Capabilities(turbo=False, priority=False)
    assert not cf.turbo_enabled(0)
    assert cf.state(0).turbo_enabled is None
    assert cf.set_khz(0, table[0])  # the top entry is plain: no switch needed
    assert cf.state(0).target_khz == table[0]
    with caplog.at_level(logging.WARNING, logger="vmpower.cpufreq"):
        for cpu in (0, 1, 0):
            with pytest.raises(UnsupportedError, match=f"cpu {cpu} has no turbo range"):
                cf.set_turbo(cpu, True)
    # reported once to the log, with its reason, however often it is asked
    assert len([r for r in caplog.records if "no turbo range" in r.getMessage()]) == 1
    assert len(cf.unsupported()) == 1


@pytest.mark.parametrize("driver", ["intel_pstate", "amd-pstate", "amd-pstate-epp", "cppc_cpufreq"])
def test_priority_cores_are_reported(sim_sysfs, driver):
    cf = kernel(sim_sysfs(driver, cpus=4, priority_cpus={1, 2}))
    assert [cf.capabilities(c).priority for c in range(4)] == [False, True, True, False]
    plain = kernel(sim_sysfs(driver, cpus=4))
    assert not any(plain.capabilities(c).priority for c in range(4))


def test_acpi_has_no_priority_notion(sim_sysfs):
    cf = kernel(sim_sysfs("acpi-cpufreq", cpus=4, priority_cpus={1}))
    assert not any(cf.capabilities(c).priority for c in range(4))


@pytest.mark.parametrize("driver", DRIVERS)
def test_the_path_prefixes_pick_out_one_cpus_journal_entries(sim_sysfs, tmp_path, driver):
    root = sim_sysfs(driver, cpus=12)
    journal = RestoreJournal(tmp_path / "state")
    cf = kernel(root, journal)
    for cpu in (1, 11):
        assert cf.set_khz(cpu, cf.table_khz(cpu)[-1])
    cpu_prefix, cpufreq_prefix = cf.cpu_path_prefix(1), cf.policy_path_prefix(1)
    assert cpu_prefix == f"{root}/{CPU}/cpu1/"
    assert cpufreq_prefix == f"{root}/{CPU}/cpu1/cpufreq/"
    ours = [p for p in journal.pending() if p.startswith(cpu_prefix)]
    assert ours and all(p.startswith(cpufreq_prefix) for p in ours)
    assert not any(p.startswith(cf.cpu_path_prefix(11)) for p in ours)  # cpu1/ is not cpu11/
    assert len(journal.pending()) == 2 * len(ours)


def test_close_releases_the_kept_open_files_and_writes_reopen_them(sim_sysfs):
    cf = kernel(sim_sysfs("intel_pstate", cpus=2))

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    # Earlier tests' unreachable Sysfs objects close their fds when collected: collect
    # them now, not in the middle of the count.
    gc.collect()
    before = open_fds()
    assert cf.set_khz(1, 2_000_000)
    # scaling_min_freq and scaling_max_freq kept open, scaling_cur_freq kept for reads
    assert open_fds() == before + 3
    cf.close()
    assert open_fds() == before
    assert cf.set_khz(1, 1_000_000)  # usable after close: files are opened again
    assert cf.state(1).target_khz == 1_000_000
    cf.close()


# -- properties --------------------------------------------------------------------------

SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("turbo"), st.booleans()),
        st.tuples(st.just("set"), st.integers(0, 60)),
        st.tuples(st.just("epp"), st.sampled_from(["power", "performance", "default", "bogus"])),
    ),
    min_size=1,
    max_size=25,
)


@pytest.mark.parametrize("driver", DRIVERS)
@SETTINGS
@given(switch_on=st.booleans(), actions=ACTIONS)
def test_any_sequence_is_valid_for_the_kernel_and_fully_restored(driver, switch_on, actions):
    """Whatever the requests, the kernel never refuses a write, every request lands on
    the table under the turbo switch's cap, and the journal brings back every original."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "sys"
        build_tree(root, driver, 2, turbo=True)
        if not switch_on:
            switch_turbo_off(root, driver)
        before = snapshot(root)
        writer = KernelSysfs(root)
        journal = RestoreJournal(Path(tmp) / "state", writer=writer.write_path)
        cf = kernel(root, journal)
        controlled = False  # once vmpower sets a frequency, the files pin it
        for action in actions:
            if action[0] == "turbo":
                if action[1]:
                    cf.set_turbo(1, True)
                    assert cf.turbo_enabled(1)
                else:
                    with pytest.raises(CpufreqError, match="never switches turbo off"):
                        cf.set_turbo(1, False)
            elif action[0] == "set":
                table = cf.table_khz(1)
                khz = table[action[1] % len(table)]
                cap = cf.table_khz(1)[0] if cf.turbo_enabled(1) else cf.nominal_khz(1)
                if khz > cap:
                    with pytest.raises(CpufreqError, match="turbo"):
                        cf.set_khz(1, khz)
                    continue
                cf.set_khz(1, khz)
                assert cf.requested_khz(1) == khz
                controlled = True
            else:
                try:
                    cf.set_epp(1, action[1])
                except UnsupportedError:
                    assert driver not in ("intel_pstate", "amd-pstate-epp")
                    continue
                except CpufreqError:
                    assert action[1] == "bogus"
                    continue
                epp = cf.state(1).epp
                # "default" selects the firmware's value: shown by name, never "default"
                assert epp == action[1] if action[1] != "default" else epp != "default"
            requested = cf.requested_khz(1)
            assert requested <= (cf.table_khz(1)[0] if cf.turbo_enabled(1) else cf.nominal_khz(1))
            assert cf.state(1).target_khz == (requested if controlled else None)
        report = journal.restore()
        assert report.failed == []
        assert settings_of(snapshot(root)) == settings_of(before)


def settings_of(files: dict[str, str]) -> dict[str, str]:
    """File contents as the kernel shows them (newline-terminated, so stripped), less
    scaling_cur_freq: the hardware's view, not a setting, so nothing restores it."""
    return {k: v.strip() for k, v in files.items() if not k.endswith("scaling_cur_freq")}
