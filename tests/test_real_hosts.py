"""vmpower on the cpufreq trees of real hosts (tests/data/real-hosts/*.json).

The fixtures are distilled from sysfs recorded on real machines (intel/pepc's
emulation data, a linux-pm mailing-list dump; provenance in each file). The trees are
built with ``build_from_fixture`` and written through ``KernelSysfs``, so these tests
show what vmpower concludes and does on each real shape: the turbo range it finds, the
non-turbo cap, the turbo ceiling, EPP writes, and (with the real daemon, through the
guest protocol) that every file is restored at exit.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import RunningAgent

from vmpower import protocol
from vmpower.cpufreq import CpuFreq, open_cpufreq
from vmpower.cpufreq.simulate import KernelSysfs, build_from_fixture, snapshot
from vmpower.devtools import ChannelHost, make_request
from vmpower.errors import CpufreqError
from vmpower.protocol import Command, ReplyCode, Unit

FIXTURES = Path(__file__).resolve().parent / "data" / "real-hosts"
CPU = "devices/system/cpu"
ACK = int(ReplyCode.ACK)

# host -> {cpu: (has turbo, nominal kHz, turbo ceiling kHz)}: the facts of each recorded
# host, from its files or (bdwep0) the model name; see each fixture's provenance.
FACTS: dict[str, dict[int, tuple[bool, int, int]]] = {
    "spr1": {2: (True, 2_200_000, 3_800_000)},  # Xeon 8460H: HWP, base_frequency
    # Core Ultra 7 164U: P-core, E-core, and an LP E-core whose base_frequency is its
    # minimum (400 MHz): acpi_cppc/nominal_freq says 2.1 GHz = its maximum: no turbo
    "mtl-m-2": {
        2: (True, 1_100_000, 4_800_000),
        4: (True, 700_000, 3_800_000),
        12: (False, 2_100_000, 2_100_000),
    },
    # Xeon E5-2699A v4 @ 2.40GHz, passive mode, no HWP: turbo_pct/num_pstates
    "bdwep0": {2: (True, 2_400_000, 3_600_000)},
    "icxd0": {2: (True, 2_000_000, 2_001_000)},  # Xeon D, acpi-cpufreq: _PSS turbo entry
    "milan0": {2: (True, 2_800_000, 3_739_225)},  # EPYC 7543: boost above _PSS P0
    "turin0": {2: (True, 3_200_000, 4_410_811)},  # EPYC 9555, amd-pstate-epp
    "imx8qxp-mek": {2: (False, 1_200_000, 1_200_000)},  # cpufreq-dt, no boost
}
BOOTED_NO_TURBO = ("spr1", "bdwep0")  # intel hosts with num_pstates, booted no_turbo=1


def host_tree(tmp_path: Path, host: str, no_turbo: bool = False, max_cpus: int = 16) -> Path:
    root = tmp_path / host
    build_from_fixture(root, FIXTURES / f"{host}.json", max_cpus=max_cpus, no_turbo=no_turbo)
    return root


def kernel(root: Path) -> CpuFreq:
    return open_cpufreq(KernelSysfs(root))


def settings_of(root: Path) -> dict[str, str]:
    """What the kernel shows, less scaling_cur_freq (the hardware's view, not a setting)."""
    return {k: v for k, v in snapshot(root).items() if not k.endswith("scaling_cur_freq")}


@pytest.mark.parametrize(
    ("host", "no_turbo"),
    [(h, False) for h in FACTS] + [(h, True) for h in BOOTED_NO_TURBO],
)
def test_turbo_range_and_cap_are_found_on_each_host(tmp_path: Path, host: str, no_turbo: bool):
    cf = kernel(host_tree(tmp_path, host, no_turbo))
    for cpu, (turbo, nominal, ceiling) in FACTS[host].items():
        assert cf.capabilities(cpu).turbo is turbo, cpu
        assert cf.nominal_khz(cpu) == nominal, cpu
        assert cf.table_khz(cpu)[0] == ceiling, cpu


def test_hybrid_lp_ecores_are_named_and_never_capped_at_their_minimum(tmp_path: Path):
    cf = kernel(host_tree(tmp_path, "mtl-m-2"))
    assert "no usable base" in cf.note(12)
    assert "400000" in cf.note(12)
    assert cf.note(2) == "" and cf.note(4) == ""
    assert cf.set_khz(12, 2_100_000)  # the whole LP E-core range is non-turbo
    assert cf.state(12).target_khz == 2_100_000


@pytest.mark.parametrize("host", BOOTED_NO_TURBO)
def test_booted_with_no_turbo_turbo_can_be_switched_on_and_reached(tmp_path: Path, host: str):
    root = host_tree(tmp_path, host, no_turbo=True)
    cf = kernel(root)
    _, nominal, ceiling = FACTS[host][2]
    assert not cf.turbo_enabled(2)
    with pytest.raises(CpufreqError, match="turbo is disabled"):
        cf.set_khz(2, ceiling)
    cf.set_turbo(2, True)
    assert (root / f"{CPU}/intel_pstate/no_turbo").read_text().strip() == "0"
    assert cf.set_khz(2, ceiling)
    assert cf.state(2).target_khz == ceiling
    assert cf.set_khz(2, nominal)
    assert cf.state(2).max_khz == nominal


@pytest.mark.parametrize("host", ["spr1", "mtl-m-2"])
def test_epp_writes_are_accepted_and_default_reads_back_as_a_name(tmp_path: Path, host: str):
    root = host_tree(tmp_path, host)
    cf = kernel(root)
    cf.set_epp(2, "power")
    assert cf.state(2).epp == "power"
    cf.set_epp(2, "default")  # the kernel shows the firmware's value, never "default"
    assert cf.state(2).epp == "balance_performance"


def test_amd_pstate_epp_choices_follow_the_governor(tmp_path: Path):
    root = host_tree(tmp_path, "turin0")
    cf = kernel(root)
    # the recorded host runs the performance governor: "performance" is the only choice
    with pytest.raises(CpufreqError, match="available: performance"):
        cf.set_epp(2, "power")
    cf.set_epp(2, "performance")
    KernelSysfs(root).write(f"{CPU}/cpufreq/policy2/scaling_governor", "powersave")
    cf.set_epp(2, "power")  # not refused from a list cached under the old governor
    assert cf.state(2).epp == "power"
    cf.set_epp(2, "default")
    assert cf.state(2).epp not in ("default", "power")


def test_amd_acpi_cpufreq_caps_by_the_policys_boost(tmp_path: Path):
    root = host_tree(tmp_path, "milan0")
    cf = kernel(root)
    pol = root / f"{CPU}/cpufreq/policy2"
    assert cf.set_khz(2, 2_800_000)  # P0, turbo not asked: the policy stops boosting
    assert (pol / "boost").read_text().strip() == "0"
    assert (pol / "scaling_setspeed").read_text().strip() == "2800000"
    assert not cf.turbo_enabled(2)
    cf.set_turbo(2, True)
    assert cf.set_khz(2, 3_739_225)  # the boost range: P0 with the policy's boost on
    assert (pol / "boost").read_text().strip() == "1"
    assert (pol / "scaling_setspeed").read_text().strip() == "2800000"
    assert (root / f"{CPU}/cpufreq/policy3/boost").read_text().strip() == "1"  # untouched


def test_per_policy_boost_off_means_no_turbo_there(tmp_path: Path):
    root = host_tree(tmp_path, "icxd0")
    KernelSysfs(root).write(f"{CPU}/cpufreq/policy2/boost", "0")
    cf = kernel(root)
    assert not cf.turbo_enabled(2)  # cpufreq/boost is 1, but not for this policy
    assert cf.turbo_enabled(3)
    with pytest.raises(CpufreqError, match="turbo is disabled"):
        cf.set_khz(2, 2_001_000)
    cf.set_turbo(2, True)
    assert (root / f"{CPU}/cpufreq/policy2/boost").read_text().strip() == "1"
    assert cf.set_khz(2, 2_001_000)


# -- the real daemon, through the guest protocol ------------------------------------------


def power(host: ChannelHost, unit: Unit) -> int:
    reply = host.request(make_request(Command.CPU_POWER, unit, 0))
    return protocol.peek_header(reply)[2]


@pytest.fixture
def agent_on(tmp_path: Path) -> Iterator:
    made: list[RunningAgent] = []

    def start(host: str, no_turbo: bool = False, max_cpus: int = 8) -> RunningAgent:
        agent = RunningAgent(tmp_path)
        made.append(agent)
        shutil.rmtree(agent.sysfs_root)
        # the test driver's node has 8 host CPUs; vm1's vCPU 0 is pinned to CPU 2
        build_from_fixture(
            agent.sysfs_root, FIXTURES / f"{host}.json", max_cpus=max_cpus, no_turbo=no_turbo
        )
        return agent

    yield start
    for agent in made:
        agent.close()


def limits(agent: RunningAgent) -> tuple[int, int]:
    return int(agent.read(2, "scaling_min_freq")), int(agent.read(2, "scaling_max_freq"))


DAEMON_HOSTS = [("spr1", False), ("spr1", True), ("mtl-m-2", False), ("bdwep0", False)]
DAEMON_HOSTS += [("bdwep0", True), ("icxd0", False), ("milan0", False), ("turin0", False)]


@pytest.mark.parametrize(("host", "no_turbo"), DAEMON_HOSTS)
def test_daemon_turbo_on_off_and_every_file_restored(agent_on, host: str, no_turbo: bool):
    agent = agent_on(host, no_turbo)
    before = settings_of(agent.sysfs_root)
    agent.start()
    vm1 = agent.hosts["vm1.0"]
    _, nominal, ceiling = FACTS[host][2]
    driver = agent.read(2, "scaling_driver")

    def running_at() -> int:
        if driver != "acpi-cpufreq":
            lo, hi = limits(agent)
            assert lo == hi, (lo, hi)
            return hi
        setspeed = agent.setspeed(2)
        boost = agent.sysfs_root / f"{CPU}/cpufreq/policy2/boost"
        p0 = max(agent.table(2))
        if setspeed == p0 and ceiling > p0 and boost.read_text().strip() == "1":
            return ceiling  # boosting above P0
        return setspeed

    assert power(vm1, Unit.ENABLE_TURBO) == ACK  # turbo found: DPDK goes to the top
    assert running_at() == ceiling
    assert power(vm1, Unit.DISABLE_TURBO) == ACK  # capped at the non-turbo maximum
    assert running_at() == nominal
    assert power(vm1, Unit.SCALE_MAX) == ACK
    assert running_at() == nominal
    assert agent.stop() == 0
    assert settings_of(agent.sysfs_root) == before


def test_show_cpus_names_the_cpus_without_a_usable_base(agent_on):
    agent = agent_on("mtl-m-2", max_cpus=14).start()
    [lp_ecore] = agent.control("show_cpus", cpu=12)
    assert "no usable base" in lp_ecore["note"]
    [pcore] = agent.control("show_cpus", cpu=2)
    assert "note" not in pcore
    assert agent.stop() == 0


# Every intel_cpufreq (passive, no HWP) host pepc recorded: cpuinfo_min_freq,
# cpuinfo_max_freq, intel_pstate/num_pstates and turbo_pct, and the base frequency in
# the model name ("@ 2.40GHz"), an independent source of the non-turbo maximum.
PASSIVE_HOSTS = [
    ("bdw0", 1_200_000, 3_600_000, 25, 49, 2_400_000),
    ("bdwde0", 800_000, 2_700_000, 20, 31, 2_100_000),
    ("bdwex0-nocpuidle", 1_200_000, 3_400_000, 23, 53, 2_200_000),
    ("bdwup0", 800_000, 3_800_000, 31, 14, 3_400_000),
    ("hswep0", 1_200_000, 3_600_000, 25, 41, 2_600_000),
    ("hswex0", 1_200_000, 3_300_000, 22, 37, 2_500_000),
    ("ivbep1", 1_200_000, 3_500_000, 24, 34, 2_700_000),
    ("knl0", 1_000_000, 1_600_000, 7, 29, 1_400_000),
    ("knm0-n0", 1_000_000, 1_600_000, 7, 15, 1_500_000),
    ("skld0", 1_000_000, 3_000_000, 21, 34, 2_300_000),
]


@pytest.mark.parametrize(("host", "low", "top", "num", "pct", "base"), PASSIVE_HOSTS)
def test_passive_mode_nominal_matches_the_model_names_base(
    tmp_path: Path, host: str, low: int, top: int, num: int, pct: int, base: int
):
    root = tmp_path / host
    build_from_fixture(root, FIXTURES / "bdwep0.json", max_cpus=2)  # the shape
    for name, value in (("cpuinfo_min_freq", low), ("cpuinfo_max_freq", top)):
        (root / f"{CPU}/cpufreq/policy1/{name}").write_text(f"{value}\n")
    (root / f"{CPU}/intel_pstate/num_pstates").write_text(f"{num}\n")
    (root / f"{CPU}/intel_pstate/turbo_pct").write_text(f"{pct}\n")
    cf = kernel(root)
    assert cf.nominal_khz(1) == base
    assert cf.table_khz(1)[0] == top
