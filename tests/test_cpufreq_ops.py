"""The CpuFreq facade on every driver: operations, turbo, exact sets, refusals, state.

Most tests run on KernelSysfs, which refuses what the kernel would refuse, so a
passing test also shows vmpower never asked the kernel for something invalid.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmpower.cpufreq import Capabilities, CpuFreq, FreqOp, open_cpufreq
from vmpower.cpufreq.simulate import DRIVERS, KernelSysfs, build_tree, set_cpu_online, snapshot
from vmpower.errors import CpufreqError, UnsupportedError
from vmpower.restore import RestoreJournal

CPU = "devices/system/cpu"

# What build_tree makes, per driver (turbo on): table top, nominal, bottom, length.
EXPECTED = {
    "acpi-cpufreq": (2_301_000, 2_300_000, 1_200_000, 13),
    "intel_pstate": (4_700_000, 3_000_000, 800_000, 40),
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
def test_every_operation_lands_on_the_table_and_in_the_files(sim_sysfs, driver):
    cf = kernel(sim_sysfs(driver, cpus=2))
    table = cf.table_khz(1)
    expected = [
        (FreqOp.MIN, table[-1]),
        (FreqOp.UP, table[-2]),
        (FreqOp.MAX, table[0]),
        (FreqOp.DOWN, table[1]),
        (FreqOp.UP, table[0]),
        (FreqOp.UP, table[0]),  # nothing above the top
        (FreqOp.MEDIUM, table[len(table) // 2]),
        (FreqOp.MIN, table[-1]),
        (FreqOp.DOWN, table[-1]),  # nothing below the bottom
    ]
    for op, khz in expected:
        assert cf.apply(1, op) == khz, op
        assert cf.requested_khz(1) == khz
        assert cf.state(1).target_khz == khz  # what the kernel's files now ask for
    assert cf.state(0).target_khz is None  # the other CPU was not touched


@pytest.mark.parametrize("driver", DRIVERS)
def test_turbo_off_caps_the_cpu_at_nominal_and_on_lifts_it(sim_sysfs, driver):
    cf = kernel(sim_sysfs(driver, cpus=2))
    top, nominal, _, _ = EXPECTED[driver]
    assert cf.apply(1, FreqOp.MAX) == top
    assert cf.turbo_enabled(1)
    cf.set_turbo(1, False)
    assert not cf.turbo_enabled(1)
    assert cf.state(1).target_khz == nominal  # moved out of the turbo range at once
    assert cf.state(1).turbo_enabled is False
    assert cf.apply(1, FreqOp.MAX) == nominal
    assert cf.apply(1, FreqOp.UP) == nominal
    with pytest.raises(CpufreqError, match="turbo is disabled"):
        cf.set_khz(1, top)
    assert cf.turbo_enabled(0)  # per CPU: the other one keeps its turbo
    cf.set_turbo(1, True)
    assert cf.turbo_enabled(1)
    assert cf.state(1).target_khz == nominal  # enabling does not move the CPU by itself
    assert cf.apply(1, FreqOp.MAX) == top


@pytest.mark.parametrize("driver", DRIVERS)
def test_disabling_turbo_takes_control_of_an_uncontrolled_cpu(sim_sysfs, driver):
    cf = kernel(sim_sysfs(driver, cpus=1))
    cf.set_turbo(0, False)
    target = cf.state(0).target_khz
    assert target is not None and target <= cf.nominal_khz(0)


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
    with pytest.raises(CpufreqError, match="reserved"):
        cf.set_turbo(2, False)
    with pytest.raises(CpufreqError, match="unknown frequency operation"):
        cf.target_khz(0, "up")  # type: ignore[arg-type]
    with pytest.raises(CpufreqError, match="positive kHz"):
        cf.target_khz(0, FreqOp.UP, from_khz=-5)
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
    cf.apply(1, FreqOp.MIN)
    set_cpu_online(root, 1, False)
    assert not cf.managed(1)
    with pytest.raises(CpufreqError, match="offline"):
        cf.apply(1, FreqOp.MAX)
    set_cpu_online(root, 1, True)
    assert cf.managed(1)
    assert cf.apply(1, FreqOp.MAX) == cf.table_khz(1)[0]
    assert cf.state(1).target_khz == cf.table_khz(1)[0]


@pytest.mark.parametrize("driver", DRIVERS)
def test_no_turbo_hardware(sim_sysfs, driver, caplog):
    cf = kernel(sim_sysfs(driver, cpus=2, turbo=False))
    table = cf.table_khz(0)
    assert cf.nominal_khz(0) == table[0]
    assert cf.capabilities(0) == Capabilities(turbo=False, priority=False)
    assert not cf.turbo_enabled(0)
    assert cf.state(0).turbo_enabled is None
    assert cf.apply(0, FreqOp.MAX) == table[0]
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


# -- properties --------------------------------------------------------------------------

SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

ACTIONS = st.lists(
    st.one_of(
        st.sampled_from(list(FreqOp)),
        st.tuples(st.just("turbo"), st.booleans()),
        st.tuples(st.just("set"), st.integers(0, 60)),
        st.tuples(st.just("epp"), st.sampled_from(["power", "performance", "default", "bogus"])),
    ),
    min_size=1,
    max_size=25,
)


@pytest.mark.parametrize("driver", DRIVERS)
@SETTINGS
@given(actions=ACTIONS)
def test_any_sequence_is_valid_for_the_kernel_and_fully_restored(driver, actions):
    """Whatever the requests, the kernel never refuses a write, every request lands on
    the table under the turbo cap, and the journal brings back every original file."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "sys"
        build_tree(root, driver, 2, turbo=True)
        before = snapshot(root)
        writer = KernelSysfs(root)
        journal = RestoreJournal(Path(tmp) / "state", writer=writer.write_path)
        cf = kernel(root, journal)
        controlled = False  # once vmpower sets a frequency, the files pin it
        for action in actions:
            if isinstance(action, FreqOp):
                khz = cf.apply(1, action)
                assert khz in cf.table_khz(1)
                controlled = True
            elif action[0] == "turbo":
                cf.set_turbo(1, action[1])
                controlled = controlled or not action[1]
            elif action[0] == "set":
                table = cf.table_khz(1)
                khz = table[action[1] % len(table)]
                cap = cf.table_khz(1)[0] if cf.turbo_enabled(1) else cf.nominal_khz(1)
                if khz > cap:
                    with pytest.raises(CpufreqError, match="turbo"):
                        cf.set_khz(1, khz)
                    continue
                cf.set_khz(1, khz)
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
                assert cf.state(1).epp == action[1]
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


@pytest.mark.parametrize("driver", DRIVERS)
@SETTINGS
@given(data=st.data())
def test_stepping_rules(sim_sysfs, driver, data):
    cf = kernel(sim_sysfs(driver, cpus=1))
    table = cf.table_khz(0)
    turbo = data.draw(st.booleans(), label="turbo")
    cf.set_turbo(0, turbo)
    cap = table[0] if turbo else cf.nominal_khz(0)
    start = data.draw(st.integers(table[-1] - 50_000, table[0] + 50_000), label="from_khz")
    up = cf.target_khz(0, FreqOp.UP, start)
    down = cf.target_khz(0, FreqOp.DOWN, start)
    for khz in (up, down):
        assert khz in table and khz <= cap
    assert down <= max(min(start, cap), table[-1])
    if start < cap:
        assert start < up or up == cap
        # UP moves to the very next entry: nothing of the table lies in between
        assert not [f for f in table if start < f < up]
    if table[-1] < start <= cap:
        assert down < start and not [f for f in table if down < f < start]
        assert cf.target_khz(0, FreqOp.UP, down) == (start if start in table else up)
    assert cf.target_khz(0, FreqOp.MAX, start) == cap
    assert cf.target_khz(0, FreqOp.MIN, start) == table[-1]
