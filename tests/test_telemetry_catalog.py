"""The catalogue, its readers and controls, and the access lists, on real files.

Readers run against simulated sysfs trees (``sim_sysfs``), a /proc/stat written by the
test, a powercap tree mirroring intel-rapl's files, and libvirt's test driver; the
frequency controls are applied through ``KernelSysfs``, which refuses what the kernel
would, so an ordering mistake fails here.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import SimSysfs

from vmpower.errors import TelemetryError
from vmpower.sysfs import Sysfs
from vmpower.telemetry.access import AccessLists
from vmpower.telemetry.catalog import CATALOG, Request, Topology, parse_request
from vmpower.telemetry.sources import ControlApplier, LibvirtVmTimes, Sampler, Sources

REPO = Path(__file__).resolve().parents[1]
POLICY = "devices/system/cpu/cpu{}/cpufreq/{}"


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def write_stat(proc: Path, per_cpu: dict[int, tuple[int, ...]]) -> None:
    """A /proc/stat: summary line, cpuN lines (10 fields), then the other lines."""
    proc.mkdir(exist_ok=True)
    total = [sum(col) for col in zip(*per_cpu.values(), strict=True)]
    lines = ["cpu  " + " ".join(map(str, total))]
    lines += [f"cpu{n} " + " ".join(map(str, f)) for n, f in sorted(per_cpu.items())]
    lines += ["intr 12345 " + " ".join("0" for _ in range(3000)), "ctxt 999", "btime 1"]
    (proc / "stat").write_text("\n".join(lines) + "\n")


def rapl_zone(root: Path, zone: int, package: int, energy_uj: int, max_uj: int) -> Path:
    """An intel-rapl package zone as /sys/class/powercap shows it (plus a core subzone)."""
    base = root / f"intel-rapl:{zone}"
    base.mkdir(parents=True, exist_ok=True)
    (base / "name").write_text(f"package-{package}\n")
    (base / "energy_uj").write_text(f"{energy_uj}\n")
    (base / "max_energy_range_uj").write_text(f"{max_uj}\n")
    sub = root / f"intel-rapl:{zone}:0"
    sub.mkdir(exist_ok=True)
    (sub / "name").write_text("core\n")
    (sub / "energy_uj").write_text("5\n")
    (sub / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return base / "energy_uj"


def sources_for(root: Path, tmp_path: Path, clock: Clock | None = None, **kw: object) -> Sources:
    sysfs = Sysfs(root)
    topology = Topology.discover(sysfs, vms=kw.pop("vms", ()))  # type: ignore[arg-type]
    return Sources(
        kw.pop("write_sysfs", sysfs),  # type: ignore[arg-type]
        Sysfs(tmp_path / "powercap"),
        tmp_path / "proc",
        topology,
        kw.pop("vm_times", None),  # type: ignore[arg-type]
        clock or Clock(),
    )


# -- requests and domains -------------------------------------------------------------------


def test_parse_request_forms_and_errors() -> None:
    assert parse_request(["CPU_FREQUENCY_STATUS", "cpu", "3"]) == Request(
        "CPU_FREQUENCY_STATUS", "cpu", 3
    )
    assert parse_request({"name": "VM_ENERGY", "domain": "vm", "index": "vm1"}).index == "vm1"
    with pytest.raises(TelemetryError, match="domain must be one of board, package, cpu, vm"):
        parse_request(["TIME", "socket", 0])
    with pytest.raises(TelemetryError, match="index must be an integer"):
        parse_request(["TIME", "board", "zero"])
    with pytest.raises(TelemetryError, match=r"\[name, domain, index\]"):
        parse_request(["TIME", "board"])


def test_resolve_checks_names_domains_and_indices(sim_sysfs: SimSysfs) -> None:
    topo = Topology.discover(Sysfs(sim_sysfs(cpus=4)), vms=["vm2", "vm1"])
    assert topo.packages == {0: (0, 1, 2, 3)}
    assert topo.resolve(Request("VM_VCPU_TIME", "vm", 1)) == Request("VM_VCPU_TIME", "vm", "vm2")
    assert topo.resolve(Request("CPU_ENERGY", "board", 0)).domain == "board"
    cases = [
        (Request("NOPE", "cpu", 0), False, "unknown signal or control 'NOPE'"),
        (Request("CPU_FREQUENCY_STATUS", "cpu", 4), False, r"no CPU 4 \(present: 0-3\)"),
        (Request("CPU_ENERGY", "cpu", 0), False, "cannot be asked at domain 'cpu'"),
        (Request("CPU_FREQUENCY_STATUS", "vm", "vm1"), False, "cannot be asked at domain 'vm'"),
        (Request("TIME", "board", 1), False, "board domain has only index 0"),
        (Request("CPU_POWER", "package", 2), False, r"no package 2 \(packages: 0\)"),
        (Request("VM_ENERGY", "vm", "ghost"), False, "unknown VM 'ghost'"),
        (Request("VM_ENERGY", "vm", 5), False, "no VM number 5"),
        (Request("CPU_FREQUENCY_STATUS", "cpu", 0), True, "is a signal, not a control"),
    ]
    for request, write, message in cases:
        with pytest.raises(TelemetryError, match=message):
            topo.resolve(request, write=write)


def test_topology_reads_packages(sim_sysfs: SimSysfs) -> None:
    root = sim_sysfs(cpus=4)
    for cpu in range(4):
        topo_dir = root / f"devices/system/cpu/cpu{cpu}/topology"
        topo_dir.mkdir()
        (topo_dir / "physical_package_id").write_text(f"{cpu // 2}\n")
    topo = Topology.discover(Sysfs(root))
    assert topo.packages == {0: (0, 1), 1: (2, 3)}
    assert topo.cpus_of("package", 1) == (2, 3)
    assert topo.package_of(3) == 1


# -- readers ---------------------------------------------------------------------------------


def test_cpufreq_signals_in_hz_and_aggregated(sim_sysfs: SimSysfs, tmp_path: Path) -> None:
    root = sim_sysfs(cpus=2)
    (root / POLICY.format(1, "scaling_cur_freq")).write_text("2000000\n")
    sources = sources_for(root, tmp_path)
    sampler = Sampler(
        sources,
        [
            Request("CPU_FREQUENCY_STATUS", "cpu", 0),
            Request("CPU_FREQUENCY_STATUS", "board", 0),
            Request("CPU_FREQUENCY_MIN_AVAIL", "cpu", 1),
            Request("CPU_FREQUENCY_MAX_AVAIL", "cpu", 1),
            Request("CPU_FREQUENCY_MAX_CONTROL", "package", 0),
        ],
    )
    assert sampler.sample() == [1.6e9, 1.8e9, 1.2e9, 2.301e9, 2.301e9]
    # the files stay open: a new value is seen by the next sample, no reopen
    (root / POLICY.format(0, "scaling_cur_freq")).write_text("1400000\n")
    assert sampler.sample()[:2] == [1.4e9, 1.7e9]
    sources.close()


def test_a_signal_that_goes_away_reads_nan(sim_sysfs: SimSysfs, tmp_path: Path) -> None:
    root = sim_sysfs(cpus=2)
    sources = sources_for(root, tmp_path)
    sampler = Sampler(
        sources, [Request("CPU_FREQUENCY_STATUS", "cpu", 1), Request("TIME", "board", 0)]
    )
    (root / POLICY.format(1, "scaling_cur_freq")).write_text("garbage\n")
    values = sampler.sample()
    assert math.isnan(values[0]) and values[1] == 0.0
    sources.close()


def test_missing_cpufreq_file_is_a_clear_error(sim_sysfs: SimSysfs, tmp_path: Path) -> None:
    root = sim_sysfs(cpus=2, offline="1")
    sources = sources_for(root, tmp_path)
    with pytest.raises(TelemetryError, match=r"CPU_FREQUENCY_STATUS cpu 1: cannot read .*no such"):
        sources.signal(Request("CPU_FREQUENCY_STATUS", "cpu", 1))
    # at board level the offline CPU is left out instead
    read = sources.signal(Request("CPU_FREQUENCY_STATUS", "board", 0))
    assert read() == 1.6e9
    sources.close()


def test_time_counts_from_the_session_start(sim_sysfs: SimSysfs, tmp_path: Path) -> None:
    clock = Clock()
    sources = sources_for(sim_sysfs(cpus=1), tmp_path, clock)
    read = sources.signal(Request("TIME", "board", 0))
    clock.now_s += 2.5
    assert read() == 2.5


def test_utilization_from_proc_stat_deltas(sim_sysfs: SimSysfs, tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    #            user nice system idle iowait irq softirq steal guest guest_nice
    write_stat(proc, {0: (10, 0, 10, 70, 10, 0, 0, 0, 5, 0), 1: (0, 0, 0, 100, 0, 0, 0, 0, 0, 0)})
    sources = sources_for(sim_sysfs(cpus=2), tmp_path)
    sampler = Sampler(
        sources, [Request("CPU_UTILIZATION", "cpu", 0), Request("CPU_UTILIZATION", "board", 0)]
    )
    # first read: since boot; guest (5) is already inside user and is not counted twice
    assert sampler.sample() == [0.2, 0.1]
    write_stat(proc, {0: (40, 0, 20, 100, 10, 0, 0, 0, 5, 0), 1: (30, 0, 0, 170, 0, 0, 0, 0, 0, 0)})
    cpu0, board = sampler.sample()
    assert cpu0 == pytest.approx(40 / 70)  # busy +40 of +70 ticks
    assert board == pytest.approx(70 / 170)
    # no tick elapsed: the previous value stands (no division by zero)
    assert sampler.sample() == [cpu0, board]
    sources.close()


def test_energy_with_wrap_around_and_power(sim_sysfs: SimSysfs, tmp_path: Path) -> None:
    clock = Clock()
    counter = rapl_zone(tmp_path / "powercap", 0, 0, 999_000_000, 999_999_999)
    sources = sources_for(sim_sysfs(cpus=2), tmp_path, clock)
    sampler = Sampler(
        sources,
        [
            Request("CPU_ENERGY", "package", 0),
            Request("CPU_POWER", "package", 0),
            Request("CPU_ENERGY", "board", 0),
        ],
    )
    # 1.5 J more, but the counter wrapped past max_energy_range_uj to 499999
    counter.write_text("499999\n")
    clock.now_s += 0.5
    energy, power, board = sampler.sample()
    assert energy == pytest.approx(999.0 + 1.5)
    assert power == pytest.approx(1.5 / 0.5)
    assert board == energy
    counter.write_text("2499999\n")
    clock.now_s += 1.0
    energy, power, _ = sampler.sample()
    assert energy == pytest.approx(1002.5)
    assert power == pytest.approx(2.0)
    sources.close()


def test_energy_without_a_rapl_zone_is_a_clear_error(sim_sysfs: SimSysfs, tmp_path: Path) -> None:
    sources = sources_for(sim_sysfs(cpus=1), tmp_path)
    with pytest.raises(TelemetryError, match="no readable intel-rapl zone named package-0"):
        sources.signal(Request("CPU_ENERGY", "package", 0))


class ScriptedVmTimes:
    """vCPU times a test sets by hand (libvirt's test driver ties them to the wall clock)."""

    def __init__(self) -> None:
        self.times: dict[str, list[tuple[float, int]]] = {}

    def vcpu_times(self) -> dict[str, list[tuple[float, int]]]:
        return {vm: list(v) for vm, v in self.times.items()}


def test_vm_energy_is_shared_by_vcpu_time_per_package(sim_sysfs: SimSysfs, tmp_path: Path) -> None:
    root = sim_sysfs(cpus=4)
    for cpu in range(4):
        topo_dir = root / f"devices/system/cpu/cpu{cpu}/topology"
        topo_dir.mkdir()
        (topo_dir / "physical_package_id").write_text(f"{cpu // 2}\n")
    pkg0 = rapl_zone(tmp_path / "powercap", 0, 0, 0, 2**40)
    pkg1 = rapl_zone(tmp_path / "powercap", 1, 1, 0, 2**40)
    vms = ScriptedVmTimes()
    vms.times = {"a": [(10.0, 0), (10.0, 2)], "b": [(5.0, 1)]}
    sources = sources_for(root, tmp_path, vms=["a", "b"], vm_times=lambda: vms)
    sampler = Sampler(
        sources,
        [
            Request("VM_ENERGY", "vm", "a"),
            Request("VM_ENERGY", "vm", "b"),
            Request("VM_VCPU_TIME", "vm", "a"),
        ],
    )
    # package 0: a used 3 s (cpu 0), b used 1 s (cpu 1) of its 8 J; package 1: only a, 6 J
    vms.times = {"a": [(13.0, 0), (12.0, 2)], "b": [(6.0, 1)]}
    pkg0.write_text("8000000\n")
    pkg1.write_text("6000000\n")
    energy_a, energy_b, vcpu_a = sampler.sample()
    assert energy_a == pytest.approx(8 * 3 / 4 + 6)
    assert energy_b == pytest.approx(8 * 1 / 4)
    assert vcpu_a == 25.0
    # an interval in which no VM ran on package 1: its energy goes to nobody
    vms.times = {"a": [(13.0, 0), (12.0, 2)], "b": [(7.0, 1)]}
    pkg0.write_text("10000000\n")
    pkg1.write_text("9000000\n")
    energy_a, energy_b, _ = sampler.sample()
    assert energy_a == pytest.approx(12.0)
    assert energy_b == pytest.approx(4.0)
    sources.close()


def test_vm_vcpu_time_from_libvirt_test_driver(sim_sysfs: SimSysfs, tmp_path: Path) -> None:
    uri = f"test://{REPO / 'tests/data/node.xml'}"
    sources = sources_for(
        sim_sysfs(cpus=8), tmp_path, vms=["vm1", "off"], vm_times=lambda: LibvirtVmTimes(uri)
    )
    sampler = Sampler(
        sources, [Request("VM_VCPU_TIME", "vm", "vm1"), Request("VM_VCPU_TIME", "vm", "off")]
    )
    running, shut_off = sampler.sample()
    assert running > 0
    assert math.isnan(shut_off)  # a VM that is not running has no vCPU time to read
    sources.close()


# -- controls ---------------------------------------------------------------------------------


def applier_for(
    root: Path, tmp_path: Path, controls: list[Request]
) -> tuple[ControlApplier, list[dict[int, tuple[int | None, int | None]]]]:
    """An applier whose sends are recorded (the daemon applies them: tests/test_state.py)."""
    sources = sources_for(root, tmp_path)
    sent: list[dict[int, tuple[int | None, int | None]]] = []
    return ControlApplier(sources, controls, lambda limits: sent.append(dict(limits))), sent


def test_controls_send_the_sessions_limits_and_never_write(
    sim_sysfs: SimSysfs, tmp_path: Path
) -> None:
    root = sim_sysfs(cpus=2)
    before = {p: p.read_text() for p in root.rglob("*") if p.is_file()}
    applier, sent = applier_for(
        root,
        tmp_path,
        [
            Request("CPU_FREQUENCY_MIN_CONTROL", "cpu", 0),
            Request("CPU_FREQUENCY_MAX_CONTROL", "cpu", 0),
        ],
    )
    applier.apply([1.5e9, 1.6e9])
    assert sent[-1] == {0: (1_500_000, 1_600_000)}
    # NaN leaves a control as the session held it
    applier.apply([math.nan, 2.3e9])
    assert sent[-1] == {0: (1_500_000, 2_300_000)}
    applier.apply([math.nan, math.nan])  # nothing to say: nothing sent
    assert len(sent) == 2
    applier.release()
    assert sent[-1] == {}
    # The batch server writes no cpufreq file: the daemon does (issue #12, point 5).
    assert {p: p.read_text() for p in root.rglob("*") if p.is_file()} == before


def test_controls_refuse_what_the_kernel_would_before_sending(
    sim_sysfs: SimSysfs, tmp_path: Path
) -> None:
    root = sim_sysfs(cpus=2)
    applier, sent = applier_for(
        root,
        tmp_path,
        [
            Request("CPU_FREQUENCY_MAX_CONTROL", "board", 0),
            Request("CPU_FREQUENCY_MIN_CONTROL", "cpu", 1),
        ],
    )
    with pytest.raises(
        TelemetryError, match=r"3000000000 Hz is outside cpu 0's 1200000000-2301000000"
    ):
        applier.apply([3e9, math.nan])
    with pytest.raises(TelemetryError, match="cpu 1: minimum 2000000000 Hz would be above maximum"):
        applier.apply([1.5e9, 2.0e9])
    with pytest.raises(TelemetryError, match="not a frequency"):
        applier.apply([-1.0, math.nan])
    assert sent == []  # all checks come first
    applier.apply([2.0e9, 1.3e9])  # board: every CPU's maximum
    assert sent == [{0: (None, 2_000_000), 1: (1_300_000, 2_000_000)}]


# -- access lists -------------------------------------------------------------------------------


def write_list(access: Path, group: str, kind: str, text: str) -> None:
    (access / group).mkdir(parents=True, exist_ok=True)
    (access / group / f"allowed_{kind}").write_text(text)


def test_access_defaults_without_lists(tmp_path: Path) -> None:
    lists = AccessLists(tmp_path / "none", groups_of=lambda uid, gid: [])
    rights = lists.rights(1000, 1000)
    assert rights.may_read("CPU_FREQUENCY_STATUS")
    assert not rights.may_read("CPU_ENERGY")  # sensitive: root-only by default
    assert not any(rights.may_write(n) for n in CATALOG)
    root = lists.rights(0, 0)
    assert all(root.may_read(n) and root.may_write(n) for n in CATALOG)


def test_access_default_plus_groups(tmp_path: Path) -> None:
    access = tmp_path / "access"
    write_list(
        access, "0.DEFAULT_ACCESS", "signals", "# everyone\nTIME\n\nCPU_FREQUENCY_STATUS  # cur\n"
    )
    write_list(access, "power", "controls", "CPU_FREQUENCY_MAX_CONTROL\n")
    write_list(access, "energy", "signals", "CPU_ENERGY\n")
    groups = {1000: ["users", "power"], 1001: ["users", "energy"]}
    lists = AccessLists(access, groups_of=lambda uid, gid: groups[uid])
    alice = lists.rights(1000, 100)
    assert alice.may_read("TIME") and not alice.may_read("CPU_UTILIZATION")
    assert alice.may_write("CPU_FREQUENCY_MAX_CONTROL")
    assert alice.may_read("CPU_FREQUENCY_MAX_CONTROL")  # a writable control is readable
    assert not alice.may_write("CPU_FREQUENCY_MIN_CONTROL")
    bob = lists.rights(1001, 100)
    assert bob.may_read("CPU_ENERGY") and not bob.may_write("CPU_FREQUENCY_MAX_CONTROL")
    with pytest.raises(TelemetryError, match="uid 1001 may not write CPU_FREQUENCY_MAX_CONTROL"):
        lists.check(1001, 100, [], [Request("CPU_FREQUENCY_MAX_CONTROL", "cpu", 0)])
    with pytest.raises(TelemetryError, match="uid 1000 may not read CPU_ENERGY"):
        lists.check(1000, 100, [Request("CPU_ENERGY", "board", 0)], [])


def test_access_list_typo_names_file_and_line(tmp_path: Path) -> None:
    access = tmp_path / "access"
    write_list(access, "0.DEFAULT_ACCESS", "signals", "TIME\nCPU_FREQ\n")
    lists = AccessLists(access, groups_of=lambda uid, gid: [])
    with pytest.raises(
        TelemetryError, match=r"allowed_signals:2: unknown signal or control 'CPU_FREQ'"
    ):
        lists.rights(1000, 1000)
