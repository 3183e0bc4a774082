"""The Prometheus endpoint of the real daemon: families, exact counts, energy, hostile clients.

vmpowerd runs as a subprocess on libvirt's test driver and a simulated sysfs with an
intel-rapl zone (vmpower.cpufreq.simulate.add_rapl_zone); the test plays QEMU and the
guests, scrapes GET /metrics over TCP and reads it with prometheus_client's parser.
"""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from agent_support import RunningAgent
from prometheus_client.parser import text_string_to_metric_families

from vmpower import protocol
from vmpower.channels import ChannelState
from vmpower.config import config_from_dict
from vmpower.cpufreq.simulate import RAPL_DIR, add_rapl_zone
from vmpower.devtools import ChannelHost, make_request, wait_for
from vmpower.errors import ConfigError
from vmpower.metrics import REFRESH_S, REFRESH_WAIT_S, Renderer, Snapshot, render
from vmpower.protocol import Command, CoreType, ReplyCode, Unit

ACK, NACK = int(ReplyCode.ACK), int(ReplyCode.NACK)
FAMILIES = {
    "vmpower_requests": ("counter", {"vm", "result"}),
    "vmpower_refusals": ("counter", {"vm", "reason"}),
    "vmpower_cpu_frequency_hertz": ("gauge", {"cpu"}),
    "vmpower_cpu_target_frequency_hertz": ("gauge", {"cpu"}),
    "vmpower_libvirt_connected": ("gauge", set()),
    "vmpower_restore_pending_files": ("gauge", set()),
    "vmpower_channels": ("gauge", {"vm", "state"}),
    "vmpower_vm_info": ("gauge", {"vm", "uuid"}),
    "vmpower_package_energy_joules": ("counter", {"package"}),
    "vmpower_vm_energy_joules": ("counter", {"vm"}),
    "vmpower_host_energy_joules": ("counter", {"package"}),
}


VMPOWER = [sys.executable, "-m", "vmpower.shell"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def power(host: ChannelHost, unit: Unit, resource_id: int = 0, **fields: object) -> int:
    reply = host.request(make_request(Command.CPU_POWER, unit, resource_id, **fields))
    return protocol.peek_header(reply)[2]


def scrape(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name → [(labels, value)], from prometheus_client's parser."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def value(found: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    matches = [
        v for lab, v in found.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    ]
    assert len(matches) == 1, f"{name}{labels}: {matches}"
    return matches[0]


def snapshot_began(found: dict[str, list[tuple[dict[str, str], float]]]) -> float:
    """When the served snapshot's build began: its stamp is taken as the build ends."""
    return value(found, "vmpower_snapshot_timestamp_seconds") - value(
        found, "vmpower_snapshot_build_seconds"
    )


class MetricsAgent(RunningAgent):
    def __init__(self, tmp_path: Path, **kw: object) -> None:
        self.port = free_port()
        settings = {
            "metrics": {"listen": f"127.0.0.1:{self.port}"},
            # batch sessions read the same simulated zone
            "telemetry": {"powercap_root": str(tmp_path / "sysfs" / RAPL_DIR)},
        }
        super().__init__(tmp_path, settings=settings)
        # A package zone that wraps at 2000 J: a 100 W test crosses it.
        self.max_uj = 2_000_000_000
        self.energy_file = add_rapl_zone(
            self.sysfs_root, 0, energy_uj=self.max_uj - 300_000_000, max_energy_range_uj=self.max_uj
        )

    def start(self, accept: bool = True, env: dict[str, str] | None = None) -> MetricsAgent:
        super().start(accept, env)
        # The endpoint is bound right after the control socket: wait for it too.
        assert wait_for(self._listening, 30), self.log()
        return self

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
        except OSError:
            return False
        return True

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        status, text = scrape(self.port)
        assert status == 200, text
        return samples(text)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[MetricsAgent]:
    running = MetricsAgent(tmp_path)
    try:
        yield running.start()
    finally:
        running.close()


def test_every_family_with_its_labels_and_the_exact_counts(agent: MetricsAgent) -> None:
    vm1, vm2 = agent.hosts["vm1.0"], agent.hosts["vm2.0"]
    sent = {"ack": 0, "nack": 0}
    for unit in (Unit.SCALE_MAX, Unit.SCALE_DOWN, Unit.SCALE_MIN):
        assert power(vm1, unit, 0) == ACK
        sent["ack"] += 1
    assert power(agent.hosts["vm1.1"], Unit.SCALE_MAX, 1) == ACK
    sent["ack"] += 1
    assert power(vm1, Unit.SCALE_MAX, 2) == NACK  # vm1 has vCPUs 0 and 1 only
    assert power(vm1, Unit.SCALE_MAX, 4, core_type=CoreType.PHYSICAL) == NACK  # vm2's CPU
    assert power(vm1, Unit.SCALE_MIN, 0, vm_name="vm2") == NACK  # speaks for another VM
    assert power(vm1, 99, 0) == NACK  # no such unit
    sent["nack"] += 4
    assert power(vm2, Unit.SCALE_MAX, 1) == ACK

    # A scrape may be served a snapshot up to REFRESH_S old (the start-up one, here):
    # within a bounded wait the counts are exactly what was sent.
    def counted() -> bool:
        found = agent.metrics()
        return ("vm2", "ack", 1.0) in [
            (lab.get("vm"), lab.get("result"), v) for lab, v in found["vmpower_requests_total"]
        ]

    assert wait_for(counted, 30)
    found = agent.metrics()
    for family, (kind, labels) in FAMILIES.items():
        name = f"{family}_total" if kind == "counter" else family
        assert name in found, f"{name} missing"
        for sample_labels, _value in found[name]:
            assert set(sample_labels) == labels, (name, sample_labels)
    assert value(found, "vmpower_requests_total", vm="vm1", result="ack") == sent["ack"]
    assert value(found, "vmpower_requests_total", vm="vm1", result="nack") == sent["nack"]
    assert value(found, "vmpower_requests_total", vm="vm2", result="ack") == 1
    assert value(found, "vmpower_requests_total", vm="vm2", result="nack") == 0
    assert value(found, "vmpower_refusals_total", vm="vm1", reason="not_permitted") == 3
    assert value(found, "vmpower_refusals_total", vm="vm1", reason="invalid") == 1
    assert value(found, "vmpower_channels", vm="vm1", state="connected") == 2
    assert value(found, "vmpower_channels", vm="vm1", state="disconnected") == 0
    uuid = agent.control("show_vm", vm="vm1")["uuid"]
    assert value(found, "vmpower_vm_info", vm="vm1", uuid=uuid) == 1
    assert value(found, "vmpower_libvirt_connected") == 1
    assert value(found, "vmpower_restore_pending_files") > 0  # vm1's and vm2's CPUs changed
    for cpu in range(8):
        hz = value(found, "vmpower_cpu_frequency_hertz", cpu=str(cpu))
        assert hz == int(agent.read(cpu, "scaling_cur_freq")) * 1000
    # vm1's vCPU 0 → host CPU 2, at its minimum; vm2's vCPU 1 → CPU 4, at its maximum (no turbo)
    assert value(found, "vmpower_cpu_target_frequency_hertz", cpu="2") == agent.setspeed(2) * 1000
    assert value(found, "vmpower_cpu_target_frequency_hertz", cpu="4") == agent.setspeed(4) * 1000
    assert not [s for s in found["vmpower_cpu_target_frequency_hertz"] if s[0]["cpu"] == "0"]


def test_energy_across_a_wrap_is_booked_exactly_with_balanced_books(
    agent: MetricsAgent,
) -> None:
    # The test plays the hardware: 64 steps of 12.5 J carry the package counter 800 J
    # on, past max_energy_range_uj. It writes them itself, so no scheduling delay can
    # skew what the daemon must book: exactly the 800 J between the two snapshots (a
    # rate against the snapshots' wall-clock stamps failed when the writer was starved
    # or the clock stepped). Steps over 3 s let libvirt's vCPU times give VMs shares.
    start_uj = agent.max_uj - 300_000_000
    step_uj, steps = 12_500_000, 64
    assert int(agent.energy_file.read_text()) == start_uj
    first = agent.metrics()
    counter_uj = start_uj
    for _ in range(steps):
        counter_uj = (counter_uj + step_uj) % (agent.max_uj + 1)
        # In place, as the kernel's file: the daemon keeps it open. A read that lands
        # between the truncation and the write finds it empty and is booked later.
        agent.energy_file.write_text(f"{counter_uj}\n")
        time.sleep(0.05)
    written_at = time.time()
    assert counter_uj < start_uj  # it wrapped
    time.sleep(REFRESH_S + 0.1)  # a snapshot begun before the last step is too old to serve
    second = agent.metrics()

    def fresh() -> bool:
        # A loop too busy to build within REFRESH_WAIT_S serves an older snapshot: ask
        # again until one begun after the last step is served.
        nonlocal second
        if snapshot_began(second) >= written_at:
            return True
        second = agent.metrics()
        return False

    assert wait_for(fresh, 30, REFRESH_S), "no snapshot newer than the last step"

    def books(found: dict[str, list[tuple[dict[str, str], float]]]) -> tuple[float, float]:
        package = sum(v for _l, v in found["vmpower_package_energy_joules_total"])
        shared = (
            sum(v for _l, v in found["vmpower_vm_energy_joules_total"])
            + sum(v for _l, v in found["vmpower_host_energy_joules_total"])
            + value(found, "vmpower_departed_vm_energy_joules_total")
        )
        return package, shared

    for found in (first, second):
        package, shared = books(found)
        assert shared == pytest.approx(package, rel=0.01, abs=1e-6)
    assert books(second)[0] - books(first)[0] == pytest.approx(steps * step_uj / 1e6, abs=1e-7)
    # libvirt's test driver advances every running vCPU's time: each VM got a share
    vm_energy = {lab["vm"]: v for lab, v in second["vmpower_vm_energy_joules_total"]}
    assert vm_energy.get("vm1", 0) > 0 and vm_energy.get("vm2", 0) > 0
    shown = agent.control("show_vm", vm="vm1")["energy_j"]
    assert shown >= vm_energy["vm1"]


def test_only_get_metrics_and_hostile_clients_do_not_hold_the_guests(
    agent: MetricsAgent,
) -> None:
    assert scrape(agent.port, "/")[0] == 404
    assert scrape(agent.port, "/metrics", method="POST")[0] == 405
    assert scrape(agent.port, "/metrics", method="HEAD")[0] == 200
    # Clients that connect and say nothing take every slot...
    idle = [socket.create_connection(("127.0.0.1", agent.port)) for _ in range(8)]
    try:
        assert wait_for(lambda: scrape(agent.port)[0] == 503, 10)
        # ...and guests are served all the same: the loop never waits on the endpoint
        for _ in range(20):
            assert power(agent.hosts["vm1.0"], Unit.SCALE_MAX, 0) == ACK
    finally:
        for conn in idle:
            conn.close()
    assert wait_for(lambda: scrape(agent.port)[0] == 200, 30)


def test_scrapes_close_together_share_one_snapshot_and_later_ones_see_new_counts(
    agent: MetricsAgent,
) -> None:
    """A scrape within REFRESH_S of a snapshot is served it (no wait for the loop); one
    later gets a fresh one with the replies sent meanwhile."""
    assert wait_for(lambda: agent.metrics() is not None, 10)
    first = agent.metrics()
    second = agent.metrics()
    stamps = [value(f, "vmpower_snapshot_timestamp_seconds") for f in (first, second)]
    # Both in one REFRESH_S (0.5 s) unless the machine stalled between them: then two
    # snapshots, each newer; never a second one begun within REFRESH_S of the first. The
    # stamp is taken as a build ends: a build's start is its stamp less its duration.
    began = [snapshot_began(f) for f in (first, second)]
    assert stamps[1] == stamps[0] or began[1] - began[0] >= REFRESH_S * 0.9
    assert 0 < value(first, "vmpower_snapshot_build_seconds") < REFRESH_WAIT_S
    assert power(agent.hosts["vm1.0"], Unit.SCALE_MAX, 0) == ACK

    def seen() -> bool:
        return value(agent.metrics(), "vmpower_requests_total", vm="vm1", result="ack") == 1

    assert wait_for(seen, 30)


def _fleet_snapshot(vms: int, **changes: object) -> Snapshot:
    """A snapshot as SnapshotBuilder makes it: VMs vm0..vmN-1, 4 channels each."""
    names = [f"vm{i}" for i in range(vms)]
    keys = tuple((vm, index) for vm in names for index in range(4))
    snap = Snapshot(
        taken_at=1.0,
        libvirt_connected=True,
        restore_pending=0,
        cpus_driven=0,
        acks_by={("vm", vm): 10 for vm in names} | {("fifo", "fifo0"): 5},
        nacks_by={("vm", vm, "not pinned"): 1 for vm in names},
        channel_keys=keys,
        channel_states=tuple(ChannelState.CONNECTED for _ in keys),
        vm_uuids={vm: f"6a1c5a0e-00c0-4c1e-9a5e-{i:012d}" for i, vm in enumerate(names)},
        cpu_hz=((0, 2_000_000_000),),
        target_hz=(),
        package_j=((0, 10.0),),
        host_j=((0, 10.0),),
        vm_j={},
        departed_j=0.0,
    )
    return replace(snap, **changes)  # type: ignore[arg-type]


def test_a_scrape_formats_only_the_lines_of_vms_that_changed() -> None:
    """Issue #15 point 3: most VMs are idle between two scrapes; their lines are kept, so a
    scrape at 1000 VMs formats a handful of lines, and the text is what a fresh render
    of the same snapshot gives."""
    renderer = Renderer()
    snap = _fleet_snapshot(1000)
    text = renderer.render(snap)
    # requests (2) + refusals (1) + channels (4) + vm_info (1) + energy (1) per VM
    assert renderer.vm_lines_formatted == 9 * 1000
    assert text == render(snap)
    found = samples(text)
    assert value(found, "vmpower_requests_total", vm="vm7", result="ack") == 10

    # Nothing changed (new copies, equal values): nothing formatted.
    same = _fleet_snapshot(1000, taken_at=2.0)
    assert renderer.render(same) == render(same)
    assert renderer.vm_lines_formatted == 0

    # vm7 answered once more: its two request lines, nothing else.
    acks = dict(same.acks_by)
    acks[("vm", "vm7")] = 11
    one = replace(same, acks_by=acks)
    text = renderer.render(one)
    assert renderer.vm_lines_formatted == 2
    assert text == render(one)
    assert value(samples(text), "vmpower_requests_total", vm="vm7", result="ack") == 11

    # vm8 refused for a new reason: its request lines and its refusal lines (2 reasons).
    nacks = dict(one.nacks_by)
    nacks[("vm", "vm8", "rate limit")] = 1
    two = replace(one, nacks_by=nacks)
    assert renderer.render(two) == render(two)
    assert renderer.vm_lines_formatted == 2 + 2

    # One of vm9's channels disconnected: its four channel lines.
    states = list(two.channel_states)
    states[9 * 4 + 1] = ChannelState.DISCONNECTED
    three = replace(two, channel_states=tuple(states))
    text = renderer.render(three)
    assert renderer.vm_lines_formatted == 4
    assert text == render(three)
    assert value(samples(text), "vmpower_channels", vm="vm9", state="disconnected") == 1

    # vm5 used energy: one line.
    four = replace(three, vm_j={"vm5": 1.5})
    assert renderer.render(four) == render(four)
    assert renderer.vm_lines_formatted == 1

    # vm8's rate-limit count forgotten (PowerManager.forget_counts): its lines again.
    forgot = replace(
        four, nacks_by={k: n for k, n in four.nacks_by.items() if k != ("vm", "vm8", "rate limit")}
    )
    assert renderer.render(forgot) == render(forgot)
    assert renderer.vm_lines_formatted == 2 + 1

    # vm3 left libvirt and its channels: its lines go, nothing is formatted.
    gone = replace(
        forgot,
        acks_by={k: n for k, n in forgot.acks_by.items() if k[1] != "vm3"},
        nacks_by={k: n for k, n in forgot.nacks_by.items() if k[1] != "vm3"},
        channel_keys=tuple(k for k in forgot.channel_keys if k[0] != "vm3"),
        channel_states=tuple(
            s
            for k, s in zip(forgot.channel_keys, forgot.channel_states, strict=True)
            if k[0] != "vm3"
        ),
        vm_uuids={vm: u for vm, u in forgot.vm_uuids.items() if vm != "vm3"},
    )
    text = renderer.render(gone)
    assert renderer.vm_lines_formatted == 0
    assert text == render(gone)
    assert 'vm="vm3"' not in text


def test_one_shot_read_of_an_interval_signal_prints_nan(agent: MetricsAgent) -> None:
    for signal, domain, index in (("CPU_POWER", "package", "0"), ("VM_ENERGY", "vm", "vm1")):
        done = subprocess.run(
            [*VMPOWER, "--socket", str(agent.socket), "read", signal, domain, index],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (done.returncode, done.stdout, done.stderr) == (0, "nan\n", ""), signal


def test_metrics_off_by_default_and_listen_is_checked() -> None:
    assert config_from_dict({}).metrics.listen == ""
    assert config_from_dict({"metrics": {"listen": "[::1]:9814"}}).metrics.listen == "[::1]:9814"
    for bad, reason in [
        ("9814", "host:port"),
        ("::1:9814", "in brackets"),
        ("127.0.0.1:70000", "1-65535"),
        (9814, "host:port"),
    ]:
        with pytest.raises(ConfigError, match=reason) as info:
            config_from_dict({"metrics": {"listen": bad}}, "f.toml")
        assert "metrics.listen" in str(info.value)
