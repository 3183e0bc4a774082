"""PowerManager in-process, on real parts: what the guest reads back and what the kernel sees.

Every part is the real one: libvirt's test driver (``test:///`` on a copy of
tests/data/node.xml) behind ``vmpower.hypervisor.Hypervisor``, a ``CpuFreq`` on a
simulated acpi-cpufreq tree whose writes obey the kernel's rules (``KernelSysfs``), a
``RestoreJournal`` attached to that sysfs, and ``VmChannel``s connected to AF_UNIX
sockets that ``devtools.ChannelHost`` binds as QEMU would. A test plays one monitor turn
as the daemon does: the channel's ``receive()`` goes to ``handle_vm_packets``, then
``flush()`` writes and queues the replies, then each channel sends them; the guest side
reads them from its socket.

Only the handler's public surface is used (``handle_vm_packets``, ``flush``,
``wishes``, ``stats``, ``cpu_report``, ``set_cpu_freq``, ``requester_gone``,
``pinning_changed``, ``reserved_cpus``, ``restore_all``): the packet and route caches
behind the fast path are not looked at, only required to give what the slow path gives.

The node (tests/data/node.xml): vm1's vCPUs 0, 1 run on host CPUs 2, 3; vm2's on 3, 4
(host CPU 3 is shared). The simulated CPUs run schedutil at 1.6 GHz; the table is
2301000 (the _PSS turbo entry), 2300000 … 1200000 kHz in 100 MHz steps.
"""

from __future__ import annotations

import os
import select
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from agent_support import NODE_XML, render_node

from vmpower import protocol
from vmpower.channels import ChannelState, TokenBucket, VmChannel
from vmpower.cpufreq import CpuFreq, open_cpufreq
from vmpower.cpufreq.simulate import UNSUPPORTED, KernelSysfs, build_tree, snapshot
from vmpower.devtools import ChannelHost, make_request
from vmpower.errors import VmpowerError
from vmpower.hypervisor import Hypervisor
from vmpower.power import PowerManager
from vmpower.protocol import Command, CoreType, ReplyCode, Unit
from vmpower.restore import RestoreJournal
from vmpower.sysfs import Sysfs

POLICY = "devices/system/cpu/cpufreq/policy"
BOOST = "devices/system/cpu/cpufreq/boost"  # acpi-cpufreq's global turbo switch
HOST_CPUS = 8

NOMINAL_KHZ = 2_300_000  # SCALE_MAX without turbo: DPDK stops below the turbo entry
START_KHZ = 1_600_000  # scaling_cur_freq of the simulated CPUs
MIN_KHZ = 1_200_000
STEP_KHZ = 100_000

BURST = 1000  # no test but the flood test comes near the channel's rate
RATE_PER_S = 1.0
SEND_QUEUE_MAX = 1024


class FakeClock:
    """The monitor's monotonic clock, moved by hand (rate limit, map refresh)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cpu_power(
    unit: Unit, resource_id: int, vm_name: str = "", core_type: CoreType = CoreType.VIRTUAL
) -> bytes:
    """A CPU_POWER request as a DPDK guest sends it."""
    return make_request(
        Command.CPU_POWER, unit, resource_id, vm_name=vm_name, core_type=int(core_type)
    )


def ack(packet: bytes) -> bytes:
    return protocol.echo_reply(packet, 0, ReplyCode.ACK)


def nack(packet: bytes) -> bytes:
    return protocol.echo_reply(packet, 0, ReplyCode.NACK)


class Guest:
    """One VM's power channel: QEMU's listening end and vmpower's connected ``VmChannel``."""

    def __init__(self, vm: str, path: str, bucket: TokenBucket) -> None:
        self.qemu = ChannelHost(path)
        self.channel = VmChannel(vm, 0, path, bucket, SEND_QUEUE_MAX)
        assert self.channel.connect() is ChannelState.CONNECTED
        self.qemu.accept()

    def send(self, packets: list[bytes]) -> bytes:
        """The guest writes ``packets`` at once; returns the whole packets the channel's
        reads give (one bytes, as the daemon hands them to the handler)."""
        self.qemu.send(b"".join(packets))
        received = b""
        while len(received) < len(packets) * protocol.PACKET_SIZE:
            ready, _, _ = select.select([self.channel.sock], [], [], 5.0)
            assert ready, f"{self.channel.path}: sent bytes never arrived"
            got = self.channel.receive()
            assert got is not None, f"{self.channel.path}: closed"
            received += got
        return received

    def replies(self, count: int) -> list[bytes]:
        """Read ``count`` 464-byte replies, and check nothing else was sent."""
        data = self.qemu.recv_exact(count * protocol.PACKET_SIZE) if count else b""
        assert self.qemu.nothing_to_read(0), "more replies than requests"
        size = protocol.PACKET_SIZE
        return [data[i : i + size] for i in range(0, len(data), size)]

    def close(self) -> None:
        self.channel.close()
        self.qemu.close()


@dataclass
class Rig:
    root: Path  # the simulated /sys
    clock: FakeClock
    hv: Hypervisor
    journal: RestoreJournal
    cpufreq: CpuFreq
    pm: PowerManager
    original: dict[str, str]  # the tree before any test step (see assert_restored)
    guests: dict[str, Guest] = field(default_factory=dict)

    def guest(self, vm: str, burst: int = BURST) -> Guest:
        """The guest end of ``vm``'s first channel (the path its domain XML gives)."""
        if vm not in self.guests:
            path = self.hv.vm(vm).channels[0].path
            self.guests[vm] = Guest(vm, path, TokenBucket(RATE_PER_S, burst, self.clock))
        return self.guests[vm]

    def read(self, vm: str, *packets: bytes) -> None:
        """One read's worth from ``vm``'s channel, handed to the handler as the daemon does."""
        guest = self.guest(vm)
        self.pm.handle_vm_packets(guest.channel, guest.send(list(packets)))

    def end_turn(self) -> None:
        """The end of the monitor turn: write, queue the replies, send them."""
        for channel in self.pm.flush():
            assert channel.flush(), "a reply did not fit the socket buffer"

    def exchange(self, vm: str, *packets: bytes) -> list[bytes]:
        """One read and one turn; the replies the guest reads back."""
        self.read(vm, *packets)
        self.end_turn()
        return self.guest(vm).replies(len(packets))

    def file(self, cpu: int, name: str) -> str:
        return (self.root / f"{POLICY}{cpu}" / name).read_text().strip()

    def setspeed(self, cpu: int) -> int:
        """The frequency vmpower set on ``cpu`` (the file must hold one)."""
        assert self.file(cpu, "scaling_governor") == "userspace"
        return int(self.file(cpu, "scaling_setspeed"))

    def untouched(self, cpu: int) -> bool:
        """``cpu``'s files are as the kernel had them before vmpower (schedutil)."""
        return (
            self.file(cpu, "scaling_governor") == "schedutil"
            and self.file(cpu, "scaling_setspeed") == UNSUPPORTED
        )

    def wish_khz(self, cpu: int) -> dict[str, int]:
        return {owner: wish.freq_khz for owner, wish in self.pm.wishes.get(cpu, {}).items()}

    def assert_restored(self) -> None:
        """After ``restore_all``: every file as it was, the journal empty.

        ``scaling_cur_freq`` is left out: the kernel moves it, nobody restores it.
        """
        assert self.journal.pending() == {}
        assert settings(self.root) == self.original


def settings(root: Path) -> dict[str, str]:
    """Every regular file of the simulated /sys but the current frequency (the kernel
    moves it)."""
    return {
        path: text.strip()
        for path, text in snapshot(root).items()
        if not path.endswith("scaling_cur_freq")
    }


RigFactory = Callable[..., Rig]


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[RigFactory]:
    """Factory (one call per test): ``make_rig(governor=None)`` → a ``Rig`` on fresh parts;
    ``boost``, when given, is written to the global boost switch before the rig starts."""
    rigs: list[Rig] = []

    def make(
        governor: str | None = None,
        kernel: bool = True,
        boost: str | None = None,
        cpus_per_policy: int = 1,
        node_source: Path = NODE_XML,
    ) -> Rig:
        channels = tmp_path / "channels"
        channels.mkdir()  # one rig per test
        node = render_node(tmp_path, channels, node_source)
        clock = FakeClock()
        hv = Hypervisor(f"test://{node}", channels, clock=clock, map_refresh_s=1.0)
        hv.connect()
        root = tmp_path / "sys"
        build_tree(
            root,
            "acpi-cpufreq",
            HOST_CPUS,
            turbo=True,
            governor=governor,
            cpus_per_policy=cpus_per_policy,
        )
        if boost is not None:
            KernelSysfs(root).write(BOOST, boost)
        # The journal restores through the simulated kernel too, so a restore the kernel
        # would refuse fails here as it would on a host.
        journal = RestoreJournal(tmp_path / "state", writer=KernelSysfs(root).write_path)
        # kernel=False: a plain Sysfs, for counting vmpower's own syscalls (the simulated
        # kernel reads files to apply its rules).
        cpufreq = open_cpufreq(KernelSysfs(root, journal) if kernel else Sysfs(root, journal))
        pm = PowerManager(cpufreq, hv, journal, clock=clock)
        rig = Rig(root, clock, hv, journal, cpufreq, pm, settings(root))
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        for guest in rig.guests.values():
            guest.close()
        rig.cpufreq.close()
        rig.hv.close()


@pytest.fixture
def rig(make_rig: RigFactory) -> Rig:
    return make_rig()


# -- 1. the fast path gives what the slow path gives --------------------------------------


def test_repeated_packets_step_the_cpu_as_the_first_one_did(rig: Rig) -> None:
    """vm1's vCPU 0 (host CPU 2): each packet, first seen or repeated, moves one step."""
    down = cpu_power(Unit.SCALE_DOWN, 0, "vm1")
    up = cpu_power(Unit.SCALE_UP, 0, "vm1")
    top = cpu_power(Unit.SCALE_MAX, 0, "vm1")
    bottom = cpu_power(Unit.SCALE_MIN, 0, "vm1")
    turns: list[tuple[list[bytes], int]] = [
        ([down], START_KHZ - STEP_KHZ),  # first seen
        ([down], START_KHZ - 2 * STEP_KHZ),  # repeated
        ([down, down, down], START_KHZ - 4 * STEP_KHZ),  # repeated within one read
        ([down], MIN_KHZ),  # at the bottom: stays
        ([up], MIN_KHZ + STEP_KHZ),
        ([up, up], MIN_KHZ + 3 * STEP_KHZ),
        ([top], NOMINAL_KHZ),
        ([top], NOMINAL_KHZ),  # same target: nothing to write, still ACK
        ([up], NOMINAL_KHZ),  # no turbo entry without ENABLE_TURBO
        ([bottom], MIN_KHZ),
        ([bottom, top, bottom], MIN_KHZ),  # one write per turn, at the last wish
        ([top], NOMINAL_KHZ),
    ]
    for packets, khz in turns:
        assert rig.exchange("vm1", *packets) == [ack(p) for p in packets]
        assert rig.setspeed(2) == khz
        assert rig.wish_khz(2) == {"vm1": khz}
    assert rig.untouched(3)  # vCPU 1's host CPU: never asked for
    requests = sum(len(packets) for packets, _ in turns)
    stats = rig.pm.stats
    assert (stats.requests, stats.acks, stats.nacks) == (requests, requests, 0)
    # one write per turn that moved the target; none for the four that did not
    assert (stats.writes, stats.writes_skipped, stats.write_failures) == (len(turns) - 4, 4, 0)
    rig.pm.restore_all()
    rig.assert_restored()


def test_a_read_of_steps_ends_where_the_steps_one_by_one_end(rig: Rig) -> None:
    """A flood's read of known UP/DOWN packets is applied at once (issue #16): it must
    end where stepping one packet after the other ends, held at the top (the nominal
    entry: no turbo without ENABLE_TURBO) and at the bottom of the table on the way."""
    up = cpu_power(Unit.SCALE_UP, 0, "vm1")  # vm1's vCPU 0: host CPU 2
    down = cpu_power(Unit.SCALE_DOWN, 0, "vm1")
    for packet in (up, down):
        assert rig.exchange("vm1", packet) == [ack(packet)]  # the routes are learnt
    table = rig.cpufreq.table_khz(2)
    top, bottom = table.index(NOMINAL_KHZ), len(table) - 1
    index = table.index(START_KHZ)
    reads = [
        [down, up] * 8,  # a flood's read: no bound met
        [up] * 12,  # the top after 7 steps: held there for the rest
        [down] * 3 + [up] * 2 + [down] * 20,  # on to the bottom, held
        [up, up, down, down, down, up],  # from the bottom: held at its first DOWN
        [up] * 3 + [down] * 16,  # down past where it started, to the bottom again
        [up] * 4 + [down, up] * 6,  # a walk within the table after a climb
    ]
    for read in reads:
        for packet in read:  # the reference: one step a packet, held at each end
            index = min(max(index + (-1 if packet == up else 1), top), bottom)
        assert rig.exchange("vm1", *read) == [ack(p) for p in read]
        assert rig.wish_khz(2) == {"vm1": table[index]}
        assert rig.setspeed(2) == table[index]
    stats = rig.pm.stats
    requests = 2 + sum(len(read) for read in reads)
    assert (stats.requests, stats.acks, stats.nacks) == (requests, requests, 0)

    # The map changes: a read of known packets is checked again as a whole, and
    # follows the new map (vCPU 0 on host CPU 5 now).
    rig.pm.pinning_changed(rig.hv.set_pcpu("vm1", 0, frozenset({5})))
    rig.end_turn()
    assert rig.exchange("vm1", down, down, down) == [ack(down)] * 3
    assert rig.untouched(2)
    assert rig.setspeed(5) == START_KHZ - 3 * STEP_KHZ
    rig.pm.restore_all()
    rig.assert_restored()


def test_a_read_like_a_remembered_one_acts_as_its_own_bytes_say(rig: Rig) -> None:
    """A read that went down the fast path as one run is remembered by its channel and
    units, and taken again at once when its bytes come again (issue #16). Another read
    with the same units is not it: these target vCPU 1 (host CPU 3), or name the VM,
    and must move that CPU and echo those bytes."""
    vcpu0 = cpu_power(Unit.SCALE_UP, 0)  # host CPU 2
    vcpu1 = cpu_power(Unit.SCALE_UP, 1)  # host CPU 3
    named = cpu_power(Unit.SCALE_UP, 0, "vm1")  # host CPU 2, vm_name set
    for packet in (vcpu0, vcpu1, named):
        assert rig.exchange("vm1", packet) == [ack(packet)]  # each route is learnt
    assert (rig.setspeed(2), rig.setspeed(3)) == (START_KHZ + 2 * STEP_KHZ, START_KHZ + STEP_KHZ)
    for _ in range(3):  # learnt, then remembered as a read, then taken as one
        assert rig.exchange("vm1", *[vcpu0] * 4) == [ack(vcpu0)] * 4
    assert rig.setspeed(2) == NOMINAL_KHZ  # 12 steps up: held at the top on the way

    assert rig.exchange("vm1", *[vcpu1] * 4) == [ack(vcpu1)] * 4
    assert rig.setspeed(3) == START_KHZ + 5 * STEP_KHZ
    assert rig.setspeed(2) == NOMINAL_KHZ
    assert rig.exchange("vm1", *[vcpu1] * 4) == [ack(vcpu1)] * 4  # both kept
    assert rig.exchange("vm1", *[vcpu0] * 4) == [ack(vcpu0)] * 4
    assert rig.setspeed(3) == NOMINAL_KHZ
    assert rig.exchange("vm1", *[named] * 4) == [ack(named)] * 4  # its name echoed
    assert rig.exchange("vm1", named, vcpu0, named, vcpu0) == [ack(named), ack(vcpu0)] * 2
    stats = rig.pm.stats
    assert (stats.requests, stats.acks, stats.nacks) == (35, 35, 0)
    rig.pm.restore_all()
    rig.assert_restored()


def test_a_remembered_read_is_checked_again_when_the_map_or_the_rate_says_no(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A remembered read (above) holds only under the map and CPU state it was checked
    against, within the channel's rate, on an enabled channel."""
    guest = rig.guest("vm1", burst=40)
    down, up = cpu_power(Unit.SCALE_DOWN, 0), cpu_power(Unit.SCALE_UP, 0)
    read = [down, down, up]  # one step down a read
    acks = [ack(p) for p in read]
    for _ in range(3):
        assert rig.exchange("vm1", *read) == acks
    assert rig.setspeed(2) == START_KHZ - 3 * STEP_KHZ

    # vCPU 0 moves to host CPU 5: the read acts there, CPU 2 gets its originals back.
    rig.pm.pinning_changed(rig.hv.set_pcpu("vm1", 0, frozenset({5})))
    rig.end_turn()
    for _ in range(3):
        assert rig.exchange("vm1", *read) == acks
    assert rig.untouched(2)
    assert rig.setspeed(5) == START_KHZ - 3 * STEP_KHZ

    # Host CPU 5 reserved by the operator: refused, and left alone.
    rig.pm.reserved_cpus = frozenset({5})
    assert rig.exchange("vm1", *read) == [nack(p) for p in read]
    assert rig.untouched(5)
    rig.pm.reserved_cpus = frozenset()
    for _ in range(6):  # 40 tokens at this instant: 39 taken now
        assert rig.exchange("vm1", *read) == acks
    assert rig.exchange("vm1", *read) == [ack(down), nack(down), nack(up)]
    assert guest.channel.rate_limited == 2
    rig.clock.now += 100.0  # tokens back

    guest.channel.enabled = False  # the operator's `channel disable`
    assert rig.exchange("vm1", *read) == [nack(p) for p in read]
    guest.channel.enabled = True
    assert rig.exchange("vm1", *read) == acks
    rig.pm.restore_all()
    rig.assert_restored()


def test_reads_remembered_stay_within_their_bound(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guest sending its known packets in ever new orders makes ever new reads: what
    is remembered of them is bounded (_READ_SHAPES_MAX_BYTES), and every read is still
    served as the packets say."""
    import tracemalloc

    from vmpower import power

    monkeypatch.setattr(power, "_READ_SHAPES_MAX_BYTES", 64 * 1024)
    rig.guest("vm1", burst=10_000)
    up, down = cpu_power(Unit.SCALE_UP, 0), cpu_power(Unit.SCALE_DOWN, 0)
    for packet in (up, down):
        assert rig.exchange("vm1", packet) == [ack(packet)]
    reads = [[up if (n >> bit) & 1 else down for bit in range(16)] for n in range(150)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for read in reads:
            for _ in range(2):  # the second time, it is remembered
                assert rig.exchange("vm1", *read) == [ack(p) for p in read]
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # 150 reads of 7 424 bytes and their ACKs would hold 2.2 MB: the bound keeps 64 KiB
    assert grown < 400_000
    assert rig.pm.stats.nacks == 0


def test_after_a_pinning_change_a_repeated_packet_follows_the_new_map(rig: Rig) -> None:
    vcpu0_max = cpu_power(Unit.SCALE_MAX, 0, "vm1")
    cpu2_min = cpu_power(Unit.SCALE_MIN, 2, "vm1", CoreType.PHYSICAL)
    for _ in range(2):  # the second time through the route learnt the first time
        assert rig.exchange("vm1", vcpu0_max) == [ack(vcpu0_max)]
        assert rig.setspeed(2) == NOMINAL_KHZ
        assert rig.exchange("vm1", cpu2_min) == [ack(cpu2_min)]
        assert rig.setspeed(2) == MIN_KHZ

    # vCPU 0 moves from host CPU 2 to 5: vm1 no longer owns CPU 2, which gets its
    # original settings back at the end of the turn.
    rig.pm.pinning_changed(rig.hv.set_pcpu("vm1", 0, frozenset({5})))
    rig.end_turn()
    assert rig.untouched(2)
    assert 2 not in rig.pm.wishes or rig.pm.wishes[2] == {}

    for _ in range(2):
        assert rig.exchange("vm1", cpu2_min) == [nack(cpu2_min)]  # not vm1's any more
        assert rig.untouched(2)
        assert rig.exchange("vm1", vcpu0_max) == [ack(vcpu0_max)]  # now acts on CPU 5
        assert rig.setspeed(5) == NOMINAL_KHZ
        assert rig.untouched(2)
    assert rig.wish_khz(5) == {"vm1": NOMINAL_KHZ}

    # vCPU 0 unpinned (every host CPU): it owns none, its requests are refused and
    # CPU 5 is given back.
    rig.pm.pinning_changed(rig.hv.set_pcpu("vm1", 0, frozenset(range(HOST_CPUS))))
    rig.end_turn()
    assert rig.untouched(5)
    for _ in range(2):
        assert rig.exchange("vm1", vcpu0_max) == [nack(vcpu0_max)]
    assert all(rig.untouched(cpu) for cpu in range(HOST_CPUS))
    assert rig.pm.stats.write_failures == 0
    rig.pm.restore_all()
    rig.assert_restored()


def test_a_repeated_packet_for_a_cpu_reserved_since_is_refused(rig: Rig) -> None:
    vcpu1_down = cpu_power(Unit.SCALE_DOWN, 1, "vm1")  # host CPU 3
    for step in (1, 2):
        assert rig.exchange("vm1", vcpu1_down) == [ack(vcpu1_down)]
        assert rig.setspeed(3) == START_KHZ - step * STEP_KHZ

    rig.pm.reserved_cpus = frozenset({3})  # the operator's SIGHUP
    for _ in range(2):
        assert rig.exchange("vm1", vcpu1_down) == [nack(vcpu1_down)]
        assert rig.untouched(3)  # newly reserved: restored, and never written again
    assert rig.pm.cpu_report(3)["reserved"] is True

    rig.pm.reserved_cpus = frozenset()
    # restored to schedutil: the simulated CPU stays where it was last set
    current_khz = int(rig.file(3, "scaling_cur_freq"))
    assert rig.exchange("vm1", vcpu1_down) == [ack(vcpu1_down)]  # served again
    assert rig.setspeed(3) == current_khz - STEP_KHZ  # vm1's wish starts anew from there
    stats = rig.pm.stats
    assert (stats.requests, stats.acks, stats.nacks) == (5, 3, 2)


# -- 2. identity is the channel, never the packet ----------------------------------------


def test_a_repeated_packet_naming_another_vm_is_refused_after_its_owner_was_served(
    rig: Rig,
) -> None:
    """Host CPU 3 is vm1's and vm2's: only the vm_name check tells these requests apart."""
    as_vm2 = cpu_power(Unit.SCALE_MIN, 3, "vm2", CoreType.PHYSICAL)
    as_vm1 = cpu_power(Unit.SCALE_MAX, 3, "vm1", CoreType.PHYSICAL)
    for _ in range(2):
        assert rig.exchange("vm2", as_vm2) == [ack(as_vm2)]
    assert rig.setspeed(3) == MIN_KHZ

    # vm1 sends vm2's exact bytes, the route of which was learnt on vm2's channel.
    for _ in range(3):
        assert rig.exchange("vm1", as_vm2) == [nack(as_vm2)]
    assert rig.wish_khz(3) == {"vm2": MIN_KHZ}

    # And the other way round, after vm1's own packet was served and learnt.
    for _ in range(2):
        assert rig.exchange("vm1", as_vm1) == [ack(as_vm1)]
    assert rig.setspeed(3) == NOMINAL_KHZ
    for _ in range(3):
        assert rig.exchange("vm2", as_vm1) == [nack(as_vm1)]
    assert rig.wish_khz(3) == {"vm1": NOMINAL_KHZ, "vm2": MIN_KHZ}
    assert rig.setspeed(3) == NOMINAL_KHZ
    stats = rig.pm.stats
    assert (stats.acks, stats.nacks) == (4, 6)


def test_vms_sending_the_same_bytes_each_keep_the_fast_path(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DPDK's guest library leaves vm_name empty, so every VM asking for its vCPU 0 sends
    the same bytes. Each VM's route is kept apart: turns alternating between two such
    VMs do not look the vCPU up in the map again (they did once per read, one in eight
    requests in the throughput bench, issue #16), and each VM still moves its own CPU."""
    down = cpu_power(Unit.SCALE_DOWN, 0)  # vm1: host CPU 2, vm2: host CPU 3
    for vm in ("vm1", "vm2"):
        assert rig.exchange(vm, down) == [ack(down)]
    lookups: list[str] = []
    real = rig.hv.host_cpu_count

    def counted() -> int:
        lookups.append("host_cpu_count")
        return real()

    monkeypatch.setattr(rig.hv, "host_cpu_count", counted)
    for _ in range(3):
        for vm in ("vm1", "vm2"):
            assert rig.exchange(vm, down) == [ack(down)]
    assert lookups == []
    assert rig.setspeed(2) == START_KHZ - 4 * STEP_KHZ
    assert rig.wish_khz(3) == {"vm2": START_KHZ - 4 * STEP_KHZ}


def test_a_run_over_cpus_sharing_a_policy_steps_as_one_packet_after_the_other(
    make_rig: RigFactory, tmp_path: Path
) -> None:
    """A read's fast-path packets are applied as one run; over CPUs of one policy, a
    CPU new to the requester starts from the policy's highest wish, which the run's
    earlier CPUs have moved: the run must give what handling the packets one by one
    gives (it had moved the first CPU by the whole run first: one step too far)."""
    source = tmp_path / "shared-node.xml"  # web.prod.1's vCPU 0 on host CPUs 6-7: policy6
    source.write_text(NODE_XML.read_text().replace("cpuset='5-6'", "cpuset='6-7'"))
    rig = make_rig(cpus_per_policy=2, node_source=source)
    up = cpu_power(Unit.SCALE_UP, 0)
    assert rig.exchange("web.prod.1", up) == [ack(up)]  # the route is learnt
    rig.pm.release("web.prod.1")  # the operator drops its wishes; the route stays good
    table = rig.cpufreq.table_khz(6)
    start = table.index(int(rig.file(6, "scaling_cur_freq")))
    assert rig.exchange("web.prod.1", up, up) == [ack(up), ack(up)]  # one read: a run
    # One by one: CPU 6 up from `start`, CPU 7 up from CPU 6's wish, twice.
    assert rig.wish_khz(6) == {"web.prod.1": table[start - 2]}
    assert rig.wish_khz(7) == {"web.prod.1": table[start - 3]}
    assert rig.setspeed(6) == table[start - 3]
    rig.pm.restore_all()
    rig.assert_restored()


# -- 3. the flood rule --------------------------------------------------------------------


def test_past_the_channel_rate_the_rest_of_a_read_is_refused_in_order(rig: Rig) -> None:
    guest = rig.guest("vm1", burst=3)
    vcpu0_down = cpu_power(Unit.SCALE_DOWN, 0, "vm1")  # host CPU 2
    vcpu1_down = cpu_power(Unit.SCALE_DOWN, 1, "vm1")  # host CPU 3
    vcpu0_up = cpu_power(Unit.SCALE_UP, 0, "vm1")
    read = [vcpu0_down, vcpu1_down, vcpu0_down, vcpu1_down, vcpu0_up]

    replies = rig.exchange("vm1", *read)
    assert replies == [ack(p) for p in read[:3]] + [nack(p) for p in read[3:]]
    decoded = [protocol.decode_packet(r) for r in replies]
    assert [(r.resource_id, r.unit) for r in decoded] == [
        (0, Unit.SCALE_DOWN),
        (1, Unit.SCALE_DOWN),
        (0, Unit.SCALE_DOWN),
        (1, Unit.SCALE_DOWN),
        (0, Unit.SCALE_UP),
    ]
    assert rig.setspeed(2) == START_KHZ - 2 * STEP_KHZ
    assert rig.setspeed(3) == START_KHZ - STEP_KHZ

    # The same packets again, every one learnt now, at the same instant: no token left.
    assert rig.exchange("vm1", *read) == [nack(p) for p in read]
    assert rig.setspeed(2) == START_KHZ - 2 * STEP_KHZ
    assert rig.setspeed(3) == START_KHZ - STEP_KHZ

    rig.clock.now += 2.0  # two tokens back
    assert rig.exchange("vm1", *read[:3]) == [ack(read[0]), ack(read[1]), nack(read[2])]
    assert rig.setspeed(2) == START_KHZ - 3 * STEP_KHZ
    assert rig.setspeed(3) == START_KHZ - 2 * STEP_KHZ
    stats = rig.pm.stats
    assert (stats.requests, stats.acks, stats.nacks) == (13, 5, 8)
    assert guest.channel.rate_limited == 8


def test_a_cpu_written_before_costs_one_write_and_no_read(
    make_rig: RigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The latency case (issue #16): one request, one turn. Once vmpower holds the CPU,
    a turn that moves it writes scaling_setspeed and reads nothing: the value to put
    back if the change failed is the one vmpower wrote last, not read again."""
    rig = make_rig(kernel=False)
    down = cpu_power(Unit.SCALE_DOWN, 0, "vm1")  # host CPU 2
    up = cpu_power(Unit.SCALE_UP, 0, "vm1")
    assert rig.exchange("vm1", down) == [ack(down)]  # takes the governor, journals
    calls: list[str] = []
    for name in ("pread", "read", "pwrite", "write", "open"):
        real = getattr(os, name)

        def counted(*args: object, _name: str = name, _real: object = real) -> object:
            calls.append(_name)
            return _real(*args)  # type: ignore[operator]

        monkeypatch.setattr(os, name, counted)
    for packet in (up, down, up, down):
        assert rig.exchange("vm1", packet) == [ack(packet)]
    monkeypatch.undo()
    # the guest side of the test reads its replies with socket calls, not these
    assert calls == ["pwrite"] * 4, calls
    assert rig.setspeed(2) == START_KHZ - STEP_KHZ
    rig.pm.restore_all()
    rig.assert_restored()


# -- 4. a failed write is a NACK and leaves the wishes as they were -------------------------


def test_a_write_the_kernel_refuses_is_a_nack_and_the_wishes_go_back(rig: Rig) -> None:
    vcpu0_min = cpu_power(Unit.SCALE_MIN, 0, "vm1")  # host CPU 2
    vcpu0_up = cpu_power(Unit.SCALE_UP, 0, "vm1")
    vcpu1_up = cpu_power(Unit.SCALE_UP, 1, "vm2")  # host CPU 4
    assert rig.exchange("vm1", vcpu0_min) == [ack(vcpu0_min)]
    assert rig.setspeed(2) == MIN_KHZ

    # Someone switches CPU 2 back to schedutil behind vmpower's back: the kernel now
    # refuses scaling_setspeed (EINVAL), root or not, whatever vmpower keeps open.
    KernelSysfs(rig.root).write(f"{POLICY}2/scaling_governor", "schedutil")

    rig.read("vm1", vcpu0_up, vcpu0_up)
    rig.read("vm2", vcpu1_up)  # same turn, another CPU: not concerned
    rig.end_turn()
    assert rig.guest("vm1").replies(2) == [nack(vcpu0_up), nack(vcpu0_up)]
    assert rig.guest("vm2").replies(1) == [ack(vcpu1_up)]
    assert rig.wish_khz(2) == {"vm1": MIN_KHZ}  # as before the turn, not two steps up
    assert rig.untouched(2)
    assert rig.setspeed(4) == START_KHZ + STEP_KHZ
    stats = rig.pm.stats
    assert stats.write_failures == 1
    assert (stats.requests, stats.acks, stats.nacks) == (4, 2, 2)

    # The next request takes the governor again and is served from the wish it had.
    assert rig.exchange("vm1", vcpu0_up) == [ack(vcpu0_up)]
    assert rig.setspeed(2) == MIN_KHZ + STEP_KHZ
    assert rig.wish_khz(2) == {"vm1": MIN_KHZ + STEP_KHZ}
    assert rig.pm.stats.write_failures == 1
    # the journal kept the governor vmpower found the first time
    original = rig.pm.cpu_report(2)["original"]
    assert isinstance(original, dict) and original["scaling_governor"] == "schedutil"
    rig.pm.restore_all()
    rig.assert_restored()


def test_the_journal_keeps_setspeed_as_it_was_before_the_governor_was_taken(
    rig: Rig,
) -> None:
    """A fresh journal learns file names from the first CPU's writes. scaling_setspeed
    was recorded only when it was first written, after the governor had gone to
    userspace: the journal held a frequency where the kernel had shown <unsupported>.
    Restored newest first, a frequency written back after an undone take-over (governor
    schedutil again) is refused by the kernel (EINVAL), and the entry stayed."""
    vcpu0_down = cpu_power(Unit.SCALE_DOWN, 0, "vm1")  # host CPU 2, the first written
    assert rig.exchange("vm1", vcpu0_down) == [ack(vcpu0_down)]
    by_name = {path.rsplit("/", 1)[1]: text for path, text in rig.journal.pending().items()}
    assert by_name == {"scaling_governor": "schedutil", "scaling_setspeed": UNSUPPORTED}

    # Someone puts schedutil back; the journal still restores everything.
    KernelSysfs(rig.root).write(f"{POLICY}2/scaling_governor", "schedutil")
    report = rig.journal.restore()
    assert report.failed == []
    assert rig.journal.pending() == {}
    assert rig.untouched(2)


def test_a_file_that_cannot_be_written_is_a_nack_until_it_is_fixed(
    make_rig: RigFactory,
) -> None:
    # Under userspace already, scaling_setspeed is the only file written. A directory
    # in its place fails as root too (EISDIR), before the journal records anything.
    rig = make_rig(governor="userspace")
    setspeed = rig.root / f"{POLICY}2" / "scaling_setspeed"
    original = setspeed.read_text()
    setspeed.unlink()
    setspeed.mkdir()
    vcpu0_max = cpu_power(Unit.SCALE_MAX, 0, "vm1")

    for failures in (1, 2):  # the first time and repeated
        assert rig.exchange("vm1", vcpu0_max) == [nack(vcpu0_max)]
        assert rig.wish_khz(2) == {}
        assert rig.pm.stats.write_failures == failures
    assert rig.journal.pending() == {}

    setspeed.rmdir()
    setspeed.write_text(original)
    assert rig.exchange("vm1", vcpu0_max) == [ack(vcpu0_max)]
    assert int(setspeed.read_text()) == NOMINAL_KHZ
    assert rig.wish_khz(2) == {"vm1": NOMINAL_KHZ}
    stats = rig.pm.stats
    assert (stats.requests, stats.acks, stats.nacks, stats.write_failures) == (3, 1, 2, 2)
    rig.pm.restore_all()
    assert int(setspeed.read_text()) == START_KHZ
    rig.assert_restored()


# -- 5. arbitration on a shared CPU ---------------------------------------------------------


def test_a_shared_cpu_runs_at_the_higher_wish_and_follows_whoever_stays(rig: Rig) -> None:
    vm1_max = cpu_power(Unit.SCALE_MAX, 1, "vm1")  # vm1's vCPU 1: host CPU 3
    vm2_min = cpu_power(Unit.SCALE_MIN, 0, "vm2")  # vm2's vCPU 0: host CPU 3
    vm2_down = cpu_power(Unit.SCALE_DOWN, 1, "vm2")  # vm2's vCPU 1: host CPU 4
    assert rig.exchange("vm1", vm1_max) == [ack(vm1_max)]
    assert rig.exchange("vm2", vm2_min, vm2_down) == [ack(vm2_min), ack(vm2_down)]
    assert rig.setspeed(3) == NOMINAL_KHZ  # vm1's wish is the higher
    assert rig.wish_khz(3) == {"vm1": NOMINAL_KHZ, "vm2": MIN_KHZ}
    report = rig.pm.cpu_report(3)
    assert report["desired_khz"] == NOMINAL_KHZ and report["target_khz"] == NOMINAL_KHZ
    # repeated, the lower wish still does not pull the CPU down
    assert rig.exchange("vm2", vm2_min) == [ack(vm2_min)]
    assert rig.setspeed(3) == NOMINAL_KHZ

    rig.pm.requester_gone("vm1")
    rig.end_turn()
    assert rig.setspeed(3) == MIN_KHZ  # vm2 alone now
    assert rig.wish_khz(3) == {"vm2": MIN_KHZ}
    assert rig.untouched(2)

    rig.pm.requester_gone("vm2")
    rig.end_turn()
    assert rig.untouched(3) and rig.untouched(4)  # the originals, from the journal
    assert rig.wish_khz(3) == {} and rig.wish_khz(4) == {}
    assert rig.pm.cpu_report(3)["original"] == {}
    rig.assert_restored()


# -- 6. the operator ----------------------------------------------------------------------


def test_an_operator_request_is_applied_at_once(rig: Rig) -> None:
    assert rig.pm.set_cpu_freq("operator", 4, Unit.SCALE_MAX) == NOMINAL_KHZ
    assert rig.setspeed(4) == NOMINAL_KHZ  # before any end of turn
    assert rig.pm.set_cpu_freq("operator", 4, Unit.SCALE_DOWN) == NOMINAL_KHZ - STEP_KHZ
    assert rig.setspeed(4) == NOMINAL_KHZ - STEP_KHZ
    assert rig.wish_khz(4) == {"operator": NOMINAL_KHZ - STEP_KHZ}
    assert rig.pm.flush() == set()  # nothing left for the end of the turn, no reply

    rig.pm.reserved_cpus = frozenset({6})
    with pytest.raises(VmpowerError, match="reserved"):
        rig.pm.set_cpu_freq("operator", 6, Unit.SCALE_MAX)
    assert rig.untouched(6)
    assert rig.pm.stats.write_failures == 0
    rig.pm.restore_all()
    rig.assert_restored()


def test_an_operator_wish_takes_part_in_the_arbitration(rig: Rig) -> None:
    vm2_min = cpu_power(Unit.SCALE_MIN, 1, "vm2")  # host CPU 4
    assert rig.exchange("vm2", vm2_min) == [ack(vm2_min)]
    assert rig.pm.set_cpu_freq("operator", 4, Unit.SCALE_MAX) == NOMINAL_KHZ
    assert rig.setspeed(4) == NOMINAL_KHZ
    assert rig.exchange("vm2", vm2_min) == [ack(vm2_min)]
    assert rig.setspeed(4) == NOMINAL_KHZ  # the operator's wish is the higher
    rig.pm.requester_gone("operator")
    rig.end_turn()
    assert rig.setspeed(4) == MIN_KHZ


def test_the_handler_keeps_few_enough_attributes_for_a_split_instance_dict(rig: Rig) -> None:
    """CPython 3.11 keeps an instance's attributes in a split (shared-keys) dict only up
    to about 30 of them; past that every ``self.`` look-up on the request path loses
    its specialization (+10 % instructions a request, issue #16). New state belongs in
    one of the handler's parts (as ``_Remembered``), not in another attribute."""
    rig.exchange("vm1", cpu_power(Unit.SCALE_DOWN, 0))
    assert len(vars(rig.pm)) <= 28
