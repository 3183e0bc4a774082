"""Request handling: authorize, arbitrate, apply, reply (docs/protocol.md, "Host rules").

``PowerManager`` turns decoded channel messages into frequency wishes and replies:

* identity is the channel's owner (a VM, or ``fifo<N>``), never the packet's vm_name;
* a VM controls only host CPUs its vCPUs are pinned to; reserved, offline and
  unpinned targets are refused; queries need the VM's query permission;
* every requester's wish is kept per host CPU and the CPU runs at the highest wish
  among the requesters sharing it (arbitration, rule 5); CPUs sharing one cpufreq
  policy (``vmpower.cpufreq.topology``) run at the highest wish of all of them, and
  the policy is written, journaled and restored as one: restored only when none of its
  CPUs is wished for any more;
* CPU hotplug (``cpus_changed``, from kernel uevents: ``vmpower.hotplug``): an offline
  CPU's requests are refused, its wishes kept and applied again when it comes back;
* writes are coalesced: requests only move wishes, and once per monitor turn
  ``finish_turn()`` writes each changed CPU once (through the restore journal, which
  ``Sysfs`` consults before a file's first write), only then queues the replies and
  hands them to the channels to send, so an ACK always means "applied" and a failed
  write turns into a NACK;
* a write that fails half-way is undone (``CpuFreq.undo_change``): a NACK means the
  CPU is as it was, an ACK that it is as asked (rule 2);
* every request gets its reply whatever fails while handling it (rule 2): a failure
  is that one request's NACK, and the rest of the read goes on;
* when a requester leaves (VM stopped, channel removed, pinning changed), its wishes
  go; a CPU nobody wishes for any more gets its original settings back;
* telemetry sessions' frequency limits (owner ``session:<key>``) are wishes too, the
  one way a session changes a cpufreq file: they bound the target the frequency wishes
  choose, and alone set ``scaling_min/max_freq`` (docs/telemetry.md section 5);
* the operator's wishes stay until released (``release``).

What repeats is logged by kind (``vmpower.logbook``), never one line per request: a
guest sending 100 000 refused requests a second must not fill the disk. ``PowerLogs``
holds those logs; the counters (``stats``, each channel's) stay exact.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Protocol

from vmpower import protocol
from vmpower.cpufreq import CpuFreq
from vmpower.errors import ProtocolError, UnknownVmError, VmpowerError
from vmpower.logbook import DEFAULT_INTERVAL_S, KindLog
from vmpower.policies import PolicyRecord, PolicySpec
from vmpower.protocol import Command, CoreType, ReplyCode, Unit, Workload

if TYPE_CHECKING:
    from vmpower.channels import Endpoint, FifoChannel, VmChannel
    from vmpower.hypervisor import VmInfo
    from vmpower.restore import RestoreJournal

log = logging.getLogger("vmpower.power")

ACK = int(ReplyCode.ACK)
NACK = int(ReplyCode.NACK)
# Commands and units are compared as plain ints on the request path: an enum member
# look-up per request costs more than the comparison itself.
_CPU_POWER = int(Command.CPU_POWER)
_CONNECT = int(Command.CONNECT)
_PKT_POLICY = int(Command.PKT_POLICY)
_PKT_POLICY_REMOVE = int(Command.PKT_POLICY_REMOVE)
_PHYSICAL = int(CoreType.PHYSICAL)
_QUERIES = {
    int(Command.QUERY_FREQ_LIST),
    int(Command.QUERY_FREQ),
    int(Command.QUERY_CAPS_LIST),
    int(Command.QUERY_CAPS),
}
_FREQ_QUERIES = {int(Command.QUERY_FREQ_LIST), int(Command.QUERY_FREQ)}
_UNITS = frozenset(int(u) for u in Unit)
_SCALE_UP = int(Unit.SCALE_UP)
_SCALE_DOWN = int(Unit.SCALE_DOWN)
_SCALE_MAX = int(Unit.SCALE_MAX)
_SCALE_MIN = int(Unit.SCALE_MIN)
_ENABLE_TURBO = int(Unit.ENABLE_TURBO)
_DISABLE_TURBO = int(Unit.DISABLE_TURBO)
_LEVELS = frozenset(Workload)
_COMMAND_NAMES = {int(c): c.name for c in Command}


class VmDirectory(Protocol):
    """What the handler needs of the hypervisor layer."""

    def ensure_fresh(self, name: str) -> VmInfo: ...

    def host_cpu_count(self) -> int: ...


class Refused(VmpowerError):
    """A request refused by a host rule: NACK.

    ``kind`` is what the log counts refusals by, one of a small fixed set ("not
    pinned", "reserved", "rate limit", ...); the message says which CPU, VM or value.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class PowerLogs:
    """The request path's logs by kind; the daemon drives them as monitor tickers."""

    refusals: KindLog  # per channel: requests refused, by reason (WARNING)
    changes: KindLog  # per host CPU: frequency changes and restores (INFO; each at DEBUG)
    failures: KindLog  # per host CPU: changes that could not be applied (ERROR)
    policies: KindLog  # per requester: policies installed and removed (INFO)

    @classmethod
    def build(
        cls, interval_s: float = DEFAULT_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> PowerLogs:
        def kind_log(what: str, one: str, level: int, gather_firsts: bool = False) -> KindLog:
            return KindLog(
                log,
                what,
                one=one,
                level=level,
                interval_s=interval_s,
                clock=clock,
                gather_firsts=gather_firsts,
            )

        return cls(
            refusals=kind_log("requests refused", "request refused", logging.WARNING),
            # A first contact meets every CPU at once (256 INFO lines, 55 us each, while
            # the loop was busiest): one line per 0.1 s, written by the log's ticker.
            changes=kind_log("frequency changes", "frequency change", logging.INFO, True),
            failures=kind_log("changes failed", "change failed", logging.ERROR),
            policies=kind_log("policy requests", "policy request", logging.INFO),
        )

    def all(self) -> tuple[KindLog, ...]:
        return (self.refusals, self.changes, self.failures, self.policies)


@dataclass
class Wish:
    """One requester's wish for one host CPU."""

    freq_khz: int
    turbo: bool = False


# Replies waiting for the end-of-turn flush: (channel, request packets, CPUs they acted
# on, their replies, conditional). One entry holds one request, or a run of requests of
# one read that acted on the same CPUs (the fast path's). The replies are chunks of
# whole replies, one reply a packet in all (a remembered read's ACKs are one chunk). A
# conditional reply is the ACK, sent unless one of its CPUs failed to apply (then
# NACK); None replies (a FIFO message) are no reply.
_Pending = tuple["Endpoint", list[bytes], frozenset[int], list[bytes] | None, bool]
# Distinct packets remembered, over all VMs (a VM sending ever new bytes only makes the
# cache start over: it costs the slow path, never memory).
_PACKET_CACHE_MAX = 4096


_NO_CPUS: frozenset[int] = frozenset()
_PACKET_SIZE = protocol.PACKET_SIZE

# A read's units (the u32 at byte 8 of each 464-byte packet), unpacked in one call: the
# read's key among the reads its channel sent before (_ReadShape). One format per
# number of packets a read holds, made when first needed (at most RECV_CHUNK's worth).
_UNITS_OF_READ: dict[int, struct.Struct] = {}
# Bytes of reads remembered (_ReadShape.size: a read and its ACKs), over all channels;
# past it, they start over
_READ_SHAPES_MAX_BYTES = 4 << 20
_UNIT_OF = attrgetter("unit")
_PACKET_OF = attrgetter("packet")
_ACK_OF = attrgetter("ack")
# Step walks remembered (_move): (start index, turbo, nominal index, lowest index,
# units) → (end index, turbo). A guest's reads repeat; started over when full.
_WALKS_MAX = 4096


class _KnownPacket:
    """What the handler learnt of one distinct packet: its header, its ACK, its route.

    Guests repeat the same bytes, so the header is decoded and the ACK built once. The
    route (the host CPUs the packet acts on) is remembered with the ``VmInfo`` and the
    CPU-state generation it was checked against: while both are unchanged, every rule of
    the slow path would say "allowed" again for these exact bytes. Entries are kept per
    VM: DPDK's guest library leaves vm_name empty, so VMs send identical bytes, and one
    route shared by them was re-checked each time the sender changed.
    """

    __slots__ = (
        "ack",
        "command",
        "core_type",
        "packet",
        "resource_id",
        "route_cpus",
        "route_generation",
        "route_vm",
        "unit",
        "vm_name",
    )

    def __init__(self, packet: bytes) -> None:
        self.resource_id, self.unit, self.command, self.vm_name, self.core_type = (
            protocol.peek_routing(packet)
        )
        self.ack = protocol.echo_reply(packet, 0, ACK)
        self.packet = packet  # the cache's key: the bytes themselves, not a copy
        self.route_vm: VmInfo | None = None
        self.route_generation = -1
        self.route_cpus = _NO_CPUS


class _ReadShape:
    """A whole read that went down the fast path as one run: its bytes, and what they did.

    Guests repeat their reads too (a flood of UP/DOWN, the same few packets). A read
    with the same units, from the same channel, whose bytes equal ``data`` is the same
    run again, while the VM's map (``vm``, its identity) and the CPU state
    (``generation``) are the ones every packet was checked under: the handler then
    skips cutting it into packets and looking each one up.
    """

    __slots__ = ("acks", "cpus", "data", "generation", "packets", "size", "units", "vm")

    def __init__(
        self,
        data: bytes,
        run: tuple[tuple[int, ...], list[bytes], list[bytes]],
        cpus: frozenset[int],
        vm: VmInfo,
        generation: int,
    ) -> None:
        self.data = data
        self.units, self.packets, acks = run
        self.acks = [b"".join(acks)]  # one chunk: flush() queues it as it is
        self.size = len(data) + len(self.acks[0])  # bytes held (_READ_SHAPES_MAX_BYTES)
        self.cpus = cpus
        self.vm = vm
        self.generation = generation


class _Remembered:
    """What the fast paths remember, each bounded: the distinct packets each VM sent
    (_KnownPacket), the whole reads each channel sent (_ReadShape) and the step walks
    (_walk). One object: PowerManager's instance attributes stay few enough for
    CPython 3.11 to keep its instance dict split (over about 30 it is not, and every
    ``self.`` look-up on the request path loses its specialization)."""

    __slots__ = ("packet_count", "packets", "read_bytes", "reads", "walks")

    def __init__(self) -> None:
        # VM → its distinct packets; packet_count entries in all
        self.packets: dict[str, dict[bytes, _KnownPacket]] = {}
        self.packet_count = 0
        # VM → (channel, the read's units) → the read it was last; read_bytes of reads
        self.reads: dict[str, dict[tuple[VmChannel, tuple[int, ...]], _ReadShape]] = {}
        self.read_bytes = 0
        self.walks: dict[tuple[int, bool, int, int, tuple[int, ...]], tuple[int, bool]] = {}

    def learn(self, owner: str, packet: bytes) -> tuple[_KnownPacket, dict[bytes, _KnownPacket]]:
        """Remember a new distinct packet of ``owner``: the entry, and ``owner``'s cache
        now (the cache is bounded over all VMs: full, it starts over)."""
        if self.packet_count >= _PACKET_CACHE_MAX:
            self.packets.clear()
            self.packet_count = 0
        cache = self.packets.get(owner)
        if cache is None:
            cache = self.packets[owner] = {}
        known = cache[packet] = _KnownPacket(packet)
        self.packet_count += 1
        return known, cache

    def read(self, owner: str, key: tuple[VmChannel, tuple[int, ...]], shape: _ReadShape) -> None:
        """Keep a read that was one fast run (their bytes and their ACKs' at most
        _READ_SHAPES_MAX_BYTES over all channels: past it they start over)."""
        if self.read_bytes + shape.size > _READ_SHAPES_MAX_BYTES:
            self.reads.clear()
            self.read_bytes = 0
        shapes = self.reads.get(owner)
        if shapes is None:
            shapes = self.reads[owner] = {}
        old = shapes.get(key)
        if old is not None:
            self.read_bytes -= old.size
        shapes[key] = shape
        self.read_bytes += shape.size

    def walk(
        self, index: int, turbo: bool, nominal: int, lowest: int, units: Sequence[int]
    ) -> tuple[int, bool]:
        """_walk's answer, remembered (a read's worth of steps repeats)."""
        key = (index, turbo, nominal, lowest, tuple(units))
        walked = self.walks.get(key)
        if walked is None:
            if len(self.walks) >= _WALKS_MAX:
                self.walks.clear()
            walked = self.walks[key] = _walk(index, turbo, nominal, lowest, units)
        return walked

    def forget(self, owner: str) -> None:
        """A VM left: what it sent goes."""
        self.packet_count -= len(self.packets.pop(owner, {}))
        shapes = self.reads.pop(owner, {})
        self.read_bytes -= sum(shape.size for shape in shapes.values())


@dataclass
class Stats:
    requests: int = 0
    acks: int = 0
    nacks: int = 0
    writes: int = 0
    writes_skipped: int = 0
    write_failures: int = 0


class PowerManager:
    """Authorizes, arbitrates and applies power requests; owned by the monitor thread."""

    def __init__(
        self,
        cpufreq: CpuFreq,
        vms: VmDirectory,
        journal: RestoreJournal | None,
        reserved_cpus: frozenset[int] = frozenset(),
        clock: Callable[[], float] = time.monotonic,
        send_replies: Callable[[set[Endpoint]], None] | None = None,
        logs: PowerLogs | None = None,
    ) -> None:
        self.cpufreq = cpufreq
        self.vms = vms
        self.journal = journal
        self._reserved_cpus = reserved_cpus
        self.clock = clock
        self.send_replies = send_replies
        # Called when a policy is installed (the daemon: the policy engine wakes, its
        # evaluation sleeps while none is): _put_policy calls it.
        self.policy_installed: Callable[[], None] | None = None
        self.query_allowed: set[str] = set()
        self.wishes: dict[int, dict[str, Wish]] = {}
        self.policies: dict[str, PolicyRecord] = {}
        self.stats = Stats()
        # Exact replies per requester, for the metrics (vmpower.metrics):
        # (endpoint kind, owner) → ACKs; (endpoint kind, owner, refusal kind) → NACKs.
        self.acks_by: dict[tuple[str, str], int] = {}
        self.nacks_by: dict[tuple[str, str, str], int] = {}
        self._dirty: set[int] = set()
        self._pending: list[_Pending] = []
        # Each CPU's wishes as they were before this turn first touched them, so a failed
        # write puts them back (and its requests get NACK).
        # cpu → its wishes as (freq_khz, turbo) before this turn's first move (_revert)
        self._snapshot: dict[int, dict[str, tuple[int, bool]]] = {}
        self._remembered = _Remembered()
        self._table_cache: dict[int, tuple[tuple[int, ...], dict[int, int], int]] = {}
        # Whether each host CPU may be controlled (online, cpufreq, not reserved): reading
        # sysfs per request would cost more than the request; cpus_changed() (kernel
        # uevents) re-reads it for the CPUs hotplug moved. No periodic re-read.
        self._managed: dict[int, bool] = {}
        # CPUs that went offline with wishes or journal entries: nothing is written for a
        # policy all of whose CPUs are here; their wishes wait for the CPU to come back.
        self._offline: set[int] = {c for c in cpufreq.cpus() if not cpufreq.online(c)}
        self._cpu_generation = 0
        # Telemetry sessions' limit wishes (issue #12, point 5): per host CPU, owner
        # ("session:<key>") → (minimum kHz or None, maximum kHz or None).
        self.limits: dict[int, dict[str, tuple[int | None, int | None]]] = {}
        # How each CPU was last set: "freq" (a target, the backend's way) or "limits"
        # (scaling_min/max_freq only); a CPU changing mode is restored first.
        self._mode: dict[int, str] = {}
        self.logs = logs if logs is not None else PowerLogs.build(clock=clock)
        self._cpu_names: dict[int, str] = {}  # "host CPU 3": the changes logs' sources
        self._tracebacks: set[type] = set()  # unexpected errors whose traceback was logged

    @property
    def reserved_cpus(self) -> frozenset[int]:
        return self._reserved_cpus

    @reserved_cpus.setter
    def reserved_cpus(self, cpus: frozenset[int]) -> None:
        """New reserved CPUs (reload): a newly reserved CPU loses every wish and limit and
        gets its originals back at the end of this turn; an un-reserved one is served."""
        added = cpus - self._reserved_cpus
        self._reserved_cpus = cpus
        self.cpufreq.set_reserved(cpus)
        self._managed.clear()
        self._cpu_generation += 1
        # A CPU sharing a policy with a reserved one is not touched either (CpuFreq).
        for cpu in sorted(set().union(*(self.cpufreq.policy_cpus(c) for c in added))):
            if self.wishes.get(cpu) or self.limits.get(cpu):
                self._touch(cpu).clear()
                self.limits.pop(cpu, None)
                log.info("host CPU %d is reserved now: its wishes are dropped", cpu)

    def cpus_changed(self, cpus: Iterable[int]) -> list[tuple[int, bool]]:
        """CPU hotplug: the kernel said ``cpus`` went offline or came back (a uevent,
        ``vmpower.hotplug``); their ``online`` files say which. Returns (cpu, online) for
        each CPU whose state changed.

        Offline: requests for it are refused from now on (the fast path's routes are
        stale: new generation), its wishes are kept; a policy shared with online CPUs
        is set again from their wishes alone. Online: its cpufreq state is read afresh
        (the kernel starts the policy again with its own governor and frequency) and
        the wishes its policy carries are written at the end of this turn; with none
        left, the journal's originals still held for it are restored.
        """
        cpufreq = self.cpufreq
        present = set(cpufreq.cpus())
        done: list[tuple[int, bool]] = []
        for cpu in sorted(set(cpus) & present):
            cpufreq.refresh(cpu)
            online = cpufreq.online(cpu)
            members = cpufreq.policy_cpus(cpu)
            for c in members | {cpu}:
                self._managed.pop(c, None)
                self._table_cache.pop(c, None)
            was_online = cpu not in self._offline
            if online:
                self._offline.discard(cpu)
            else:
                self._offline.add(cpu)
            self._cpu_generation += 1
            # Everything its policy carries is set again (or restored) at the end of
            # this turn, through the usual flush.
            for c in members | {cpu}:
                if c == cpu or self.wishes.get(c) or self.limits.get(c):
                    self._touch(c)
            if online != was_online:
                done.append((cpu, online))
        return done

    def _read_managed(self, cpu: int) -> bool:
        return cpu not in self._reserved_cpus and self.cpufreq.managed(cpu)

    def warm(self, cpus: Iterable[int]) -> int:
        """Read ahead what a CPU's first request needs and no request changes: whether it
        may be controlled, its cpufreq probe and frequency table, and where its
        directories lie (the journal's check of its files). Reads only, nothing is
        written. The daemon warms every CPU a few per turn after start: at first contact
        on 256 CPUs these reads were about half of each CPU's first-time cost (issue #16).
        Returns how many CPUs were read (those already known are skipped)."""
        read = 0
        for cpu in cpus:
            if cpu in self._managed and cpu in self._table_cache:
                continue
            read += 1
            try:
                self._check_cpu(cpu)
                self._table(cpu)
                if self.journal is not None:
                    self.journal.resolve_ahead((self.cpufreq.policy_path_prefix(cpu),))
            except VmpowerError:
                continue  # refused or unreadable: the first request says why
        return read

    # -- entry points ------------------------------------------------------------------

    def handle_vm_packets(self, channel: VmChannel, data: bytes) -> None:
        """Handle a read's whole 464-byte packets (``data``: one bytes of them, as
        ``VmChannel.receive`` gives)."""
        count = len(data) // _PACKET_SIZE
        self.stats.requests += count
        channel.requests += count
        # The flood rule, for the whole read at once: the first `allowed` packets are
        # within the channel's rate, the rest get NACK (a CONNECT probe takes a token too,
        # and gets no reply either way).
        allowed = channel.bucket.take_many(self.clock(), count)
        owner = channel.owner
        vm: VmInfo | None
        vm_error: VmpowerError | None = None
        try:
            vm = self.vms.ensure_fresh(owner)  # one map look-up per read
        except VmpowerError as exc:  # unknown VM, or libvirt failing: asked once per read
            vm, vm_error = None, exc  # every request below that needs it is refused
        generation = self._cpu_generation
        # The fast path needs a known VM and an enabled channel for the whole read.
        fast = vm is not None and channel.enabled
        shape_key = None
        if fast and allowed >= count > 1:
            # The same read as before, the same run (_ReadShape): nothing to look up. Not
            # for a read of one packet: its look-up costs what one packet's does, and
            # remembering every channel's single requests (thousands of channels at a few
            # requests a second) only fed the collector, whose full passes held the loop.
            units_of = _UNITS_OF_READ.get(count) or _units_format(count)
            shape_key = (channel, units_of.unpack(data))
            shapes = self._remembered.reads.get(owner)
            shape = shapes.get(shape_key) if shapes is not None else None
            if (
                shape is not None
                and shape.vm is vm
                and shape.generation == generation
                and shape.data == data
            ):
                self._apply_run(channel, owner, shape.units, shape.packets, shape.acks, shape.cpus)
                return
        cache = self._remembered.packets.get(owner) or {}  # learn() stores a new one
        # The fast path's run: consecutive packets acting on the same CPUs, whose moves
        # are applied together when the run ends (a guest's read is one run, mostly).
        run: list[_KnownPacket] = []
        run_cpus = _NO_CPUS
        whole = True  # the read is one fast run so far
        # One packet: the read itself (no call on the latency case's path).
        for packet in (data,) if count == 1 else protocol.split_packets(data):
            known = cache.get(packet)
            if known is None:
                known, cache = self._remembered.learn(owner, packet)
            allowed -= 1
            # Fast path: a CPU_POWER packet this VM sent before, under the same map
            # and CPU state, within its rate: every check of the slow path gave
            # "allowed" for these exact bytes, so only the wish moves (its CPUs'
            # tables are cached, so nothing here reads sysfs or can fail).
            if (
                fast
                and known.route_vm is vm
                and known.route_generation == generation
                and allowed >= 0
            ):
                cpus = known.route_cpus
                if cpus is not run_cpus and cpus != run_cpus:
                    if run:
                        self._end_run(channel, owner, run, run_cpus)
                        run = []
                        whole = False
                    run_cpus = cpus
                run.append(known)
                continue
            whole = False
            if run:  # the slow path's moves and replies come after the run's, in order
                self._end_run(channel, owner, run, run_cpus)
                run = []
            self._slow_path(channel, packet, known, allowed, vm, vm_error, generation)
        if run:
            done = self._end_run(channel, owner, run, run_cpus)
            if whole and shape_key is not None and vm is not None:
                shape = _ReadShape(data, done, run_cpus, vm, generation)
                self._remembered.read(owner, shape_key, shape)

    def _end_run(
        self, channel: VmChannel, owner: str, run: list[_KnownPacket], cpus: frozenset[int]
    ) -> tuple[tuple[int, ...], list[bytes], list[bytes]]:
        """Apply a fast-path run of packets (``_apply_run``); its units, requests and ACKs."""
        if len(run) == 1:  # the latency case: one request a read
            known = run[0]
            units: tuple[int, ...] = (known.unit,)
            packets, acks = [known.packet], [known.ack]
        else:  # a read's worth, listed in C
            units = tuple(map(_UNIT_OF, run))
            packets, acks = list(map(_PACKET_OF, run)), list(map(_ACK_OF, run))
        self._apply_run(channel, owner, units, packets, acks, cpus)
        return units, packets, acks

    def _apply_run(
        self,
        channel: VmChannel,
        owner: str,
        units: Sequence[int],
        packets: list[bytes],
        acks: list[bytes],
        cpus: frozenset[int],
    ) -> None:
        """Apply a fast-path run: each CPU's wish takes the run's steps in order, what
        one packet after the other does, and the run's ACKs wait for the flush as one
        entry. A CPU's wish depends on another's only when it is created: a requester
        new to a CPU of a shared policy starts from the policy's highest wish. So over
        several CPUs the first step is taken on every CPU first; the rest of each
        CPU's steps then depend on that CPU's wish alone."""
        if len(units) > 1 and len(cpus) > 1:
            for cpu in cpus:
                self._move(owner, cpu, units[:1])
            units = units[1:]
        for cpu in cpus:
            self._move(owner, cpu, units)
        self._pending.append((channel, packets, cpus, acks, True))

    def _slow_path(
        self,
        channel: VmChannel,
        packet: bytes,
        known: _KnownPacket,
        allowed: int,
        vm: VmInfo | None,
        vm_error: VmpowerError | None,
        generation: int,
    ) -> None:
        """Every rule, for a packet the fast path could not vouch for.

        Whatever fails while handling the packet is its NACK, and nothing else (rule 2):
        the rest of the read is handled as if it had not come.
        """
        command = known.command
        unit = known.unit
        if command == _CONNECT:
            return  # the guest library never reads a reply to its probe
        if allowed < 0:
            channel.rate_limited += 1
            self._refuse(
                channel,
                packet,
                command,
                "rate limit",
                f"more than {channel.bucket.rate_per_s:g} requests/s (channels.rate_per_s)",
            )
            return
        owner = channel.owner
        try:
            if not channel.enabled:
                raise Refused("channel disabled", "channel disabled by the operator")
            name = known.vm_name
            if name and name != owner.encode()[: protocol.MAX_VM_NAME_BYTES]:
                raise Refused(
                    "spoofed name",
                    f"vm_name {name.decode(errors='replace')!r} is not this channel's VM",
                )
            if command == _CPU_POWER:
                if unit not in _UNITS:
                    raise Refused("unknown unit", f"unknown unit {unit}")
                vm = _known_vm(owner, vm, vm_error)
                cpus = self._targets(vm, known.resource_id, known.core_type)
                # Every table first (each may be read from sysfs now, and fail): no wish
                # moves for a request that is then refused.
                for cpu in cpus:
                    if not self._table(cpu)[2] and unit == _ENABLE_TURBO:
                        raise Refused("no turbo", f"host CPU {cpu} has no turbo")
                if unit != _ENABLE_TURBO:
                    # These bytes from this VM are allowed under this map: next time the
                    # fast path may skip the checks (the name check depends only on the
                    # owner, which the VmInfo identity pins down).
                    known.route_vm = vm
                    known.route_generation = generation
                    known.route_cpus = cpus
                self._end_run(channel, owner, [known], cpus)
            elif command in _QUERIES:
                self._query(channel, packet, known.resource_id, command, vm, vm_error)
            elif command == _PKT_POLICY:
                self._install_policy(channel, packet, _known_vm(owner, vm, vm_error))
            elif command == _PKT_POLICY_REMOVE:
                self._remove_policy(channel, packet)
            else:
                raise Refused("unknown command", f"unknown command {command}")
        except Refused as exc:
            self._refuse(channel, packet, command, exc.kind, str(exc))
        except UnknownVmError as exc:
            self._refuse(channel, packet, command, "vm unknown", f"VM unknown: {exc}")
        except Exception as exc:  # rule 2: whatever failed, this packet gets its NACK
            self._refuse(channel, packet, command, *self._failure(exc))

    def handle_fifo_messages(self, channel: FifoChannel, messages: Iterable[object]) -> None:
        """Handle decoded JSON messages (or ProtocolErrors) from a host CPU's FIFO."""
        now = self.clock()
        refusals = self.logs.refusals
        for message in messages:
            if isinstance(message, ProtocolError):
                channel.protocol_errors += 1
                refusals.note(channel.path, "malformed", f"message rejected: {message.reason}")
                continue
            self.stats.requests += 1
            channel.requests += 1
            try:
                if not channel.enabled:
                    raise Refused("channel disabled", "channel disabled by the operator")
                if not channel.bucket.take(now):
                    channel.rate_limited += 1
                    raise Refused(
                        "rate limit",
                        f"more than {channel.bucket.rate_per_s:g} messages/s (channels.rate_per_s)",
                    )
                self._check_cpu(channel.cpu)
                if isinstance(message, protocol.FifoInstruction):
                    self._table(channel.cpu)  # may read sysfs, and fail: before any wish moves
                    self._move(channel.owner, channel.cpu, (message.unit,))
                    self._pending.append((channel, [b""], frozenset({channel.cpu}), None, True))
                elif isinstance(message, protocol.FifoPolicy):
                    if message.command == "destroy":
                        if self.policies.pop(channel.owner, None) is None:
                            raise Refused("no policy", "no policy to destroy")
                        self._drop_wishes(channel.owner)
                        self.logs.policies.note(channel.owner, "removed", "policy destroyed")
                    else:
                        try:
                            spec = PolicySpec.from_fifo(message)
                        except ValueError as exc:
                            raise Refused("bad policy", str(exc)) from None
                        record = PolicyRecord(
                            channel.owner, spec, cpus=frozenset({channel.cpu}), installed_at=now
                        )
                        self._put_policy(record, f"{spec.type.name} policy installed")
            except Refused as exc:
                kind, detail = exc.kind, str(exc)
            except Exception as exc:  # one message's failure stops only that message
                kind, detail = self._failure(exc)
            else:
                continue
            self._count_nack(channel, kind)
            refusals.note(channel.path, kind, f"message refused: {detail}")

    # -- CPU_POWER ---------------------------------------------------------------------

    def _targets(self, vm: VmInfo, resource_id: int, core_type: int) -> frozenset[int]:
        """The host CPUs a request may act on (rule 4), or Refused.

        Run on the slow path only: the fast path reuses the result for the same packet
        bytes under the same VM map and CPU state.
        """
        if core_type == _PHYSICAL:
            if resource_id not in vm.pcpus():
                raise Refused("not pinned", f"host CPU {resource_id} is not pinned to {vm.name}")
            cpus = frozenset({resource_id})
        elif core_type == 0:
            if resource_id >= vm.vcpu_count or resource_id >= len(vm.vcpu_pcpus):
                raise Refused(
                    "no such vCPU",
                    f"vCPU {resource_id} out of range ({vm.name} has {vm.vcpu_count})",
                )
            cpus = vm.pinned_pcpus(resource_id, self.vms.host_cpu_count())
            if not cpus:
                raise Refused("not pinned", f"vCPU {resource_id} of {vm.name} is not pinned")
        else:
            raise Refused("unknown core type", f"unknown core_type {core_type}")
        for cpu in cpus:
            self._check_cpu(cpu)
        return cpus

    def _check_cpu(self, cpu: int) -> None:
        managed = self._managed.get(cpu)
        if managed is None:
            managed = self._managed[cpu] = self._read_managed(cpu)
        if not managed:
            if cpu in self._reserved_cpus:
                raise Refused("reserved", f"host CPU {cpu} is reserved")
            if not self._reserved_cpus.isdisjoint(self.cpufreq.policy_cpus(cpu)):
                raise Refused(
                    "reserved",
                    f"host CPU {cpu} shares {self.cpufreq.policy_name(cpu)} with a reserved CPU",
                )
            raise Refused("offline", f"host CPU {cpu} is offline or has no cpufreq")

    def _touch(self, cpu: int) -> dict[str, Wish]:
        """``cpu``'s wishes, about to change: remember them as they were this turn."""
        per_cpu = self.wishes.get(cpu)
        if per_cpu is None:
            per_cpu = self.wishes[cpu] = {}
        if cpu not in self._dirty:
            self._dirty.add(cpu)
            # A loop, not a comprehension (a frame of its own): this runs once per
            # written CPU and turn, mostly for one requester.
            snapshot = self._snapshot[cpu] = {}
            for owner, wish in per_cpu.items():
                snapshot[owner] = (wish.freq_khz, wish.turbo)
        return per_cpu

    def _table(self, cpu: int) -> tuple[tuple[int, ...], dict[int, int], int]:
        """(table high→low, index of each entry, index of the highest non-turbo entry).

        On acpi-cpufreq the turbo range is one entry; on intel_pstate, amd-pstate and
        cppc it is every step above the nominal frequency.
        """
        cached = self._table_cache.get(cpu)
        if cached is None:
            table = self.cpufreq.table_khz(cpu)
            index_of = {f: i for i, f in enumerate(table)}
            nominal = 0
            if self.cpufreq.capabilities(cpu).turbo:
                nominal = index_of.get(self.cpufreq.nominal_khz(cpu), 0)
            cached = (table, index_of, nominal)
            self._table_cache[cpu] = cached
        return cached

    def _move(self, owner: str, cpu: int, units: Sequence[int]) -> None:
        """Move ``owner``'s wish for ``cpu`` as ``units`` say, one after the other
        (DPDK's step semantics).

        Units are Unit values, compared as plain ints: this runs for every request (an
        enum member look-up costs more than the comparison).
        """
        table, index_of, nominal = self._table_cache.get(cpu) or self._table(cpu)
        if not nominal and _ENABLE_TURBO in units:
            raise Refused("no turbo", f"host CPU {cpu} has no turbo")
        per_cpu = self.wishes.get(cpu)
        if per_cpu is None or cpu not in self._dirty:
            per_cpu = self._touch(cpu)
        wish = per_cpu.get(owner)
        if wish is None:
            wish = per_cpu[owner] = Wish(self._current_khz(cpu, table, index_of))
        turbo = wish.turbo
        index = index_of.get(wish.freq_khz)
        if index is None:
            index = _nearest_index(table, wish.freq_khz)
        lowest = len(table) - 1
        if len(units) > 2:  # a read's worth: its walk is likely one seen before
            index, turbo = self._remembered.walk(index, turbo, nominal, lowest, units)
        else:
            index, turbo = _walk(index, turbo, nominal, lowest, units)
        wish.turbo = turbo
        wish.freq_khz = table[index]

    def _current_khz(self, cpu: int, table: tuple[int, ...], index_of: dict[int, int]) -> int:
        """Where a requester new to ``cpu`` starts from: the CPU's frequency in force
        (its policy's highest wish, where several CPUs share one)."""
        per_cpu = self.wishes.get(cpu)
        members = self.cpufreq.policy_cpus(cpu)
        if len(members) > 1:
            per_cpu = self._policy_wishes(cpu)
        if per_cpu:
            return max(w.freq_khz for w in per_cpu.values())
        try:
            current = self.cpufreq.requested_khz(cpu)
        except VmpowerError:
            current = table[-1]
        return current if current in index_of else table[_nearest_index(table, current)]

    # -- queries -----------------------------------------------------------------------

    def _query(
        self,
        channel: VmChannel,
        packet: bytes,
        resource_id: int,
        command: int,
        vm: VmInfo | None,
        vm_error: VmpowerError | None,
    ) -> None:
        vm_name = channel.owner
        if vm_name not in self.query_allowed:
            raise Refused(
                "queries disabled",
                f"queries not enabled for {vm_name} (set_query {vm_name} enable)",
            )
        vm = _known_vm(vm_name, vm, vm_error)
        count = min(vm.vcpu_count, len(vm.vcpu_pcpus), protocol.MAX_VCPU_PER_VM)
        listing = command in (Command.QUERY_FREQ_LIST, Command.QUERY_CAPS_LIST)
        if listing:
            vcpus = range(count)
        else:
            if resource_id >= count:
                raise Refused("no such vCPU", f"vCPU {resource_id} out of range for a query")
            vcpus = range(resource_id, resource_id + 1)
        values: list[int] = [0] * protocol.MAX_VCPU_PER_VM
        priority: list[int] = [0] * protocol.MAX_VCPU_PER_VM
        host_cpus = self.vms.host_cpu_count()
        for vcpu in vcpus:
            cpus = vm.pinned_pcpus(vcpu, host_cpus)
            if not cpus:
                continue  # unpinned: nothing of the host to report (0)
            cpu = min(cpus)
            try:
                self._check_cpu(cpu)
            except Refused:
                continue
            if command in _FREQ_QUERIES:
                table, index_of, _ = self._table(cpu)
                values[vcpu] = self._current_khz(cpu, table, index_of)
            else:
                caps = self.cpufreq.capabilities(cpu)
                values[vcpu] = int(caps.turbo)
                priority[vcpu] = int(caps.priority)
        unit = protocol.peek_header(packet)[1]
        if command in _FREQ_QUERIES:
            reply = protocol.encode_freq_list(resource_id, unit, vm_name, values, count)
        else:
            reply = protocol.encode_caps_list(resource_id, unit, vm_name, values, priority, count)
        self.stats.acks += 1
        key = (channel.kind, channel.owner)
        self.acks_by[key] = self.acks_by.get(key, 0) + 1
        self._pending.append((channel, [packet], _NO_CPUS, [reply], False))

    # -- policies (stored here, evaluated by vmpower.policies) ---------------------------

    def _install_policy(self, channel: VmChannel, packet: bytes, vm: VmInfo) -> None:
        decoded = protocol.decode_packet(packet)
        try:
            spec = PolicySpec.from_packet(decoded)  # refuses what could never decide
        except ValueError as exc:
            raise Refused("bad policy", str(exc)) from None
        if decoded.core_type == _PHYSICAL:
            cpus = frozenset(decoded.control_list)
            if not cpus <= vm.pcpus():
                raise Refused("not pinned", f"policy names host CPUs not pinned to {channel.owner}")
        else:
            cpus_set: set[int] = set()
            for vcpu in decoded.control_list:
                cpus_set |= self._targets(vm, vcpu, 0)
            cpus = frozenset(cpus_set)
        for cpu in cpus:
            self._check_cpu(cpu)
        vcpus = None if decoded.core_type == _PHYSICAL else decoded.control_list
        self._put_policy(
            PolicyRecord(channel.owner, spec, cpus=cpus, vcpus=vcpus, installed_at=self.clock()),
            f"{spec.type.name} policy installed on host CPUs {sorted(cpus)}",
        )
        self._ack(channel, packet)

    def _remove_policy(self, channel: VmChannel, packet: bytes) -> None:
        if self.policies.pop(channel.owner, None) is None:
            raise Refused("no policy", "no policy to remove")
        self._drop_wishes(channel.owner)
        self.logs.policies.note(channel.owner, "removed", "policy removed")
        self._ack(channel, packet)

    # -- replies and the end-of-turn flush -----------------------------------------------

    def _ack(self, channel: Endpoint, packet: bytes) -> None:
        reply = protocol.echo_reply(packet, 0, ACK)
        self._pending.append((channel, [packet], _NO_CPUS, [reply], True))

    def _refuse(
        self, channel: Endpoint, packet: bytes, command: int, kind: str, message: str
    ) -> None:
        self._count_nack(channel, kind)
        # Counted by kind: the first of each kind on this channel is logged at once,
        # the rest in one summary line per interval.
        self.logs.refusals.note(channel.path, kind, f"{_command_name(command)}: {message}")
        # Replies leave in request order, after this turn's writes (see flush()).
        self._pending.append((channel, [packet], _NO_CPUS, [protocol.nack_reply(packet)], False))

    def _count_nack(self, channel: Endpoint, kind: str) -> None:
        """One NACK of ``kind`` on ``channel``: the totals, the channel's and the
        metrics' per-requester count."""
        self.stats.nacks += 1
        channel.nacks += 1
        key = (channel.kind, channel.owner, kind)
        self.nacks_by[key] = self.nacks_by.get(key, 0) + 1

    def forget_counts(self, keep: Callable[[str, str], bool]) -> None:
        """Drop the reply counts of requesters ``keep(kind, owner)`` says are gone."""
        self.acks_by = {k: n for k, n in self.acks_by.items() if keep(*k)}
        self.nacks_by = {k: n for k, n in self.nacks_by.items() if keep(k[0], k[1])}

    def _failure(self, exc: Exception) -> tuple[str, str]:
        """(kind, message) of an error met while handling one request (rule 2: its NACK).

        A VmpowerError or OSError is a fact of the host (a cpufreq file unreadable,
        libvirt failing); anything else is a bug, whose traceback is logged once per
        exception type.
        """
        if isinstance(exc, VmpowerError | OSError):
            return f"failed: {type(exc).__name__}", str(exc)
        if type(exc) not in self._tracebacks and len(self._tracebacks) < 64:
            self._tracebacks.add(type(exc))
            log.error("internal error while handling a request", exc_info=exc)
        return "internal error", f"{type(exc).__name__}: {exc}"

    def finish_turn(self) -> None:
        """The end of a monitor turn: apply the changed wishes, then send the replies."""
        channels = self.flush()
        if channels and self.send_replies is not None:
            self.send_replies(channels)

    def flush(self) -> set[Endpoint]:
        """Apply this turn's changed wishes, then queue the replies; returns channels to send on."""
        failed: set[int] = set()
        if self._dirty:
            dirty, self._dirty = self._dirty, set()
            journal = self.journal
            if journal is not None:
                # The originals of this turn's first writes share one append (restore:
                # begin_turn, which answers at once for directories it holds whole);
                # one that cannot be saved fails its CPU in _apply, as before. Map and
                # filter: no comprehension frames on the latency case's turn.
                wished = filter(self.wishes.get, dirty)
                try:
                    journal.begin_turn(map(self.cpufreq.policy_path_prefix, wished))
                except VmpowerError as exc:
                    log.debug("journal ahead of the turn's writes: %s", exc)
            try:
                # One write per policy: CPUs sharing one are applied together (a turn
                # with one CPU, the latency case, has nothing to group).
                if len(dirty) > 1:
                    policy_of = self.cpufreq.policy
                    dirty = sorted({policy_of(c): c for c in sorted(dirty)}.values())
                for cpu in dirty:
                    try:
                        applied = self._apply(cpu)
                    except Exception as exc:  # a bug: this CPU's requests get NACK, not silence
                        self._failure(exc)
                        self.cpufreq.undo_change(cpu)
                        applied = False
                    if not applied:
                        failed.update(self.cpufreq.policy_cpus(cpu))
            finally:
                if journal is not None:
                    journal.end_turn()
        if failed:
            self._revert(failed)
        self._snapshot.clear()
        pending = self._pending
        if len(pending) == 1 and not failed:
            # The latency case, one read's replies in the turn: the loop below without its
            # runs and per-channel tallies.
            channel, packets, _, replies, conditional = pending[0]
            pending.clear()
            if conditional:
                key = (channel.kind, channel.owner)
                self.acks_by[key] = self.acks_by.get(key, 0) + len(packets)
                self.stats.acks += len(packets)
            if replies is None:
                return set()  # FIFO messages have no reply
            channel.queue_replies(replies, len(packets))
            return {channel}
        channels: set[Endpoint] = set()
        stats = self.stats
        acks_by = self.acks_by
        # Pending items come in runs per channel (one read's worth each): queue each
        # run's replies as one chunk.
        run_channel: Endpoint | None = None
        run: list[bytes] = []
        run_count = 0  # replies in run's chunks
        # ACKs per channel, added to the metrics' per-requester counters once per turn
        acks: dict[Endpoint, int] = {}
        for channel, packets, cpus, replies, conditional in self._pending:
            if conditional:
                if failed and cpus & failed:
                    replies = self._nack_unapplied(channel, packets, cpus & failed)
                else:
                    acks[channel] = acks.get(channel, 0) + len(packets)
            if replies is None:
                continue  # FIFO messages have no reply
            if channel is not run_channel:
                if run:
                    run_channel.queue_replies(run, run_count)  # type: ignore[union-attr]
                    run = []
                    run_count = 0
                run_channel = channel
                channels.add(channel)
            run += replies
            run_count += len(packets)
        if run:
            run_channel.queue_replies(run, run_count)  # type: ignore[union-attr]
        for channel, count in acks.items():
            key = (channel.kind, channel.owner)
            acks_by[key] = acks_by.get(key, 0) + count
            stats.acks += count
        self._pending.clear()
        return channels

    def _put_policy(self, record: PolicyRecord, detail: str) -> None:
        """Install ``record`` as its owner's policy: the policy engine is woken, the
        installation logged."""
        self.policies[record.owner] = record
        if self.policy_installed is not None:
            self.policy_installed()
        self.logs.policies.note(record.owner, "installed", detail)

    def _policy_wishes(self, cpu: int) -> dict[str, Wish] | None:
        """The wishes that set ``cpu``'s policy: its own CPU's, or, for a policy shared
        by several CPUs, those of every one of them online ("owner@cpu" → wish); None
        when every CPU of the policy is offline (nothing can be written now)."""
        members = self.cpufreq.policy_cpus(cpu)
        offline = self._offline
        if len(members) == 1:
            return None if offline and cpu in offline else self.wishes.get(cpu) or {}
        live = [c for c in sorted(members) if c not in offline]
        if not live:
            return None
        return {f"{o}@{c}": w for c in live for o, w in self.wishes.get(c, {}).items()}

    def _apply(self, cpu: int) -> bool:
        per_cpu = self._policy_wishes(cpu)
        if per_cpu is None:
            return True  # its policy is offline: the wishes and originals wait for it
        bounds = self._bounds(cpu) if self.limits else None
        if not per_cpu:
            if bounds is None:
                self._restore_cpu(cpu)
                return True
            return self._apply_limits(cpu, bounds)
        target = 0
        want_turbo = False
        for wish in per_cpu.values():  # one pass: this runs once per written CPU per turn
            if wish.freq_khz > target:
                target = wish.freq_khz
            if wish.turbo:
                want_turbo = True
        if bounds is not None:
            target = self._clamp(cpu, target, bounds)
        cpufreq = self.cpufreq
        policy = cpufreq.policy(cpu)
        mode = self._mode.get(policy)
        if mode != "freq":
            if mode == "limits":
                self._restore_cpu(cpu, keep_wishes=True)  # the session's files go back first
            self._mode[policy] = "freq"
        # One change, all or nothing: when a write fails, the ones before it in this
        # change are written back (rule 2: a NACK means the CPU is as it was).
        cpufreq.begin_change()
        try:
            # Turbo is switched on before asking for the turbo frequency (intel_pstate
            # clamps to the base frequency while no_turbo=1). It is never switched off
            # here: on acpi-cpufreq and intel_pstate the switch is global, and a CPU
            # leaves turbo by running below the turbo entry; the journal restores it.
            if want_turbo and not cpufreq.turbo_enabled(cpu):
                cpufreq.set_turbo(cpu, True)
            changed = cpufreq.set_khz(cpu, target)
        except (VmpowerError, OSError) as exc:
            self.stats.write_failures += 1
            unrestored = cpufreq.undo_change(cpu)
            source = self._cpu_name(cpu)
            self.logs.failures.note(source, "write failed", f"cannot apply {target} kHz: {exc}")
            for what in unrestored:
                self.logs.failures.note(source, "not put back", f"cannot put back {what}")
            return False
        cpufreq.end_change()
        if not changed:
            self.stats.writes_skipped += 1
            return True
        self.stats.writes += 1
        changes = self.logs.changes
        if changes.enabled():
            # Who wished what is DEBUG's (a join per write costs more than the write's
            # Python path); the summary says where the CPU is, and show_cpus who wishes.
            if log.isEnabledFor(logging.DEBUG):
                wishes = ", ".join(f"{o} {w.freq_khz}" for o, w in sorted(per_cpu.items()))
                log.debug("host CPU %d: now %d kHz (wished by %s)", cpu, target, wishes)
            changes.note(self._cpu_name(cpu), "set", f"now {target} kHz")
        return True

    # -- telemetry sessions' limits ------------------------------------------------------

    def _bounds(self, cpu: int) -> tuple[int | None, int | None] | None:
        """The sessions' limits on ``cpu``'s policy: (highest minimum, lowest maximum),
        or None."""
        limits = self.limits
        if not limits:
            return None
        bounds = [b for c in self.cpufreq.policy_cpus(cpu) for b in limits.get(c, {}).values()]
        if not bounds:
            return None
        mins = [lo for lo, _ in bounds if lo is not None]
        maxs = [hi for _, hi in bounds if hi is not None]
        return (max(mins) if mins else None, min(maxs) if maxs else None)

    def _clamp(self, cpu: int, target: int, bounds: tuple[int | None, int | None]) -> int:
        """``target`` moved inside the sessions' limits, onto the CPU's table."""
        lo, hi = bounds
        table = self._table(cpu)[0]
        inside = [f for f in table if (lo is None or f >= lo) and (hi is None or f <= hi)]
        if target in inside:
            return target
        if not inside:  # limits between two table entries: the nearest to the maximum
            return table[_nearest_index(table, hi if hi is not None else target)]
        below = [f for f in inside if f <= target]
        return below[0] if below else inside[-1]

    def _apply_limits(self, cpu: int, bounds: tuple[int | None, int | None]) -> bool:
        """Only sessions' limits on ``cpu``: scaling_min/max_freq get them (a side no
        session asked for keeps its original), in the order the kernel needs."""
        cpufreq = self.cpufreq
        policy = cpufreq.policy(cpu)
        if self._mode.get(policy) == "freq":
            self._restore_cpu(cpu, keep_wishes=True)  # the frequency's files go back first
        self._mode[policy] = "limits"
        originals = (
            self.journal.originals_in(cpufreq.policy_path_prefix(cpu))
            if self.journal is not None
            else {}
        )
        try:
            written = cpufreq.set_limits(cpu, *bounds, originals)
        except (VmpowerError, OSError) as exc:
            self.stats.write_failures += 1
            self.logs.failures.note(self._cpu_name(cpu), "write failed", str(exc))
            return False
        self._forget_tables(cpu)  # written beside the backend: its tables are re-read
        if written:
            self.stats.writes += 1
            lo, hi = bounds
            self.logs.changes.note(self._cpu_name(cpu), "limits", f"limits {lo}-{hi} kHz")
        else:
            self.stats.writes_skipped += 1
        return True

    def set_limits(self, owner: str, wanted: dict[int, tuple[int | None, int | None]]) -> None:
        """``owner``'s (a telemetry session's) limits, replacing its previous ones; applied
        now, all checked first. A CPU it no longer names is released.

        Refused (``Refused``, nothing changed): a reserved, offline or unmanaged CPU; a
        limit off the CPU's range (cpuinfo_min_freq..cpuinfo_max_freq); a minimum above
        a maximum, the session's own or another session's on the same CPU.
        """
        for cpu, (lo, hi) in sorted(wanted.items()):
            self._check_cpu(cpu)
            table = self._table(cpu)[0]
            for value in (lo, hi):
                if value is not None and not table[-1] <= value <= table[0]:
                    raise Refused(
                        "limit",
                        f"host CPU {cpu}: {value} kHz is outside {table[-1]}-{table[0]} kHz"
                        " (cpuinfo_min_freq-cpuinfo_max_freq)",
                    )
            others = {o: b for o, b in self.limits.get(cpu, {}).items() if o != owner}
            mins = [b[0] for b in others.values() if b[0] is not None]
            maxs = [b[1] for b in others.values() if b[1] is not None]
            eff_lo = max([*mins, *([lo] if lo is not None else [])], default=None)
            eff_hi = min([*maxs, *([hi] if hi is not None else [])], default=None)
            if eff_lo is not None and eff_hi is not None and eff_lo > eff_hi:
                raise Refused(
                    "limit",
                    f"host CPU {cpu}: minimum {eff_lo} kHz would be above maximum {eff_hi} kHz"
                    + (f" (with {', '.join(sorted(others))})" if others else ""),
                )
        changed = [c for c, per_cpu in self.limits.items() if owner in per_cpu]
        for cpu in changed:
            if cpu not in wanted:
                del self.limits[cpu][owner]
        for cpu, bounds in wanted.items():
            self.limits.setdefault(cpu, {})[owner] = bounds
        self._apply_each_now(sorted(set(changed) | set(wanted)), self._touch)

    def drop_limits(self, owner: str) -> None:
        """A session ended: its limits go, at the end of this turn (CPUs left with no
        wish at all get their originals back)."""
        for cpu in [c for c, per_cpu in self.limits.items() if owner in per_cpu]:
            del self.limits[cpu][owner]
            self._touch(cpu)

    def _cpu_name(self, cpu: int) -> str:
        name = self._cpu_names.get(cpu)
        if name is None:
            name = self._cpu_names[cpu] = f"host CPU {cpu}"
        return name

    def _note_unapplied(self, channel: Endpoint, cpus: frozenset[int]) -> None:
        listed = ", ".join(str(c) for c in sorted(cpus))
        self.logs.refusals.note(
            channel.path, "write failed", f"host CPU {listed} could not be set: nothing changed"
        )

    def _revert(self, failed: set[int]) -> None:
        """Put back the wishes of CPUs whose write failed (their requests get NACK).

        Their files were put back by ``_apply``; a CPU nobody wished for before this
        turn also gets its journal entries restored (and dropped), as if never touched.
        """
        for cpu in sorted(failed):
            before = self._snapshot.get(cpu)
            if before is None:
                continue
            self.wishes[cpu] = {o: Wish(freq_khz, turbo) for o, (freq_khz, turbo) in before.items()}
            if not before:
                self._restore_cpu(cpu)  # restores its policy only when nobody else wishes

    # -- requesters leaving ------------------------------------------------------------

    def requester_gone(self, owner: str) -> None:
        """A VM stopped or left: drop its wishes and policy; free CPUs get their originals."""
        self.policies.pop(owner, None)
        self._drop_wishes(owner)
        self._remembered.forget(owner)

    def pinning_changed(self, vm: VmInfo) -> None:
        """Drop wishes a VM holds on host CPUs it is no longer pinned to; re-map its policy."""
        owned = vm.pcpus()
        policy = self.policies.get(vm.name)
        if policy is not None:
            if policy.vcpus is not None:
                host_cpus = self.vms.host_cpu_count()
                policy.cpus = frozenset().union(
                    *(vm.pinned_pcpus(v, host_cpus) for v in policy.vcpus)
                )
            else:
                policy.cpus = policy.cpus & owned
        for cpu in [c for c, per_cpu in self.wishes.items() if vm.name in per_cpu]:
            if cpu not in owned:
                del self._touch(cpu)[vm.name]
                log.info(
                    "%s no longer pinned to host CPU %d: its wish there is dropped", vm.name, cpu
                )

    def _drop_wishes(self, owner: str) -> None:
        for cpu in [c for c, per_cpu in self.wishes.items() if owner in per_cpu]:
            del self._touch(cpu)[owner]

    def _restore_cpu(self, cpu: int, keep_wishes: bool = False) -> None:
        """Nobody wishes for ``cpu`` any more: its files go back to their originals.

        ``keep_wishes``: the CPU changes how it is set (limits ↔ frequency) and is
        restored before the new way is applied.

        A policy shared by several CPUs is restored only when none of them is wished
        for or limited any more: its files are theirs too.
        """
        cpufreq = self.cpufreq
        members = cpufreq.policy_cpus(cpu)
        if not keep_wishes:
            self.wishes.pop(cpu, None)
            if len(members) > 1 and any(
                self.wishes.get(c) or self.limits.get(c) for c in members if c != cpu
            ):
                return  # another CPU of the policy still wants it: its flush sets it
            self._mode.pop(cpufreq.policy(cpu), None)
        if self.journal is None:
            return
        prefixes = cpufreq.policy_path_prefixes(cpu)
        report = self.journal.restore(lambda path: path.startswith(prefixes))
        # Written outside the request path: nothing cached about the CPU holds any more
        # (CpuFreq's "already set" value and its backend's limits, this table).
        cpufreq.forget(cpu)
        self._forget_tables(cpu)
        if report.restored:
            self.logs.changes.note(
                self._cpu_name(cpu),
                "restored",
                f"original settings restored ({len(report.restored)} files)",
            )

    def _forget_tables(self, cpu: int) -> None:
        for c in self.cpufreq.policy_cpus(cpu):
            self._table_cache.pop(c, None)
        self._table_cache.pop(cpu, None)

    def restore_all(self) -> None:
        """Drop every wish and restore every file vmpower changed (shutdown)."""
        self.wishes.clear()
        self.limits.clear()
        self._mode.clear()
        self.policies.clear()
        self._dirty.clear()
        self._snapshot.clear()
        if self.journal is not None:
            report = self.journal.restore()
            for cpu in self.cpufreq.cpus():
                self.cpufreq.forget(cpu)
            log.info("restored %d files; %d failed", len(report.restored), len(report.failed))
        for kind_log in self.logs.all():  # what was still counted, before the daemon exits
            kind_log.flush()

    def set_level(self, owner: str, cpus: Iterable[int], level: Workload) -> None:
        """A policy's decision: ``owner`` wishes HIGH (max), MEDIUM or LOW (min) on ``cpus``.

        The levels are the protocol's workload levels (docs/protocol.md, "Policies").
        The turbo entries are reachable only when the owner asked for turbo itself, so
        MAX is the top of the range the owner may reach and MEDIUM the middle of it.
        Applied at the end of the turn like requests.
        """
        if level not in _LEVELS:
            raise ValueError(f"unknown level {level!r}: one of HIGH, MEDIUM, LOW")
        for cpu in cpus:
            try:
                self._check_cpu(cpu)
                table, _, nominal = self._table(cpu)
            except Refused:
                continue
            except (VmpowerError, OSError) as exc:  # evaluated every period: logged by kind
                self.logs.failures.note(
                    self._cpu_name(cpu), "policy", f"{owner}'s policy cannot move it: {exc}"
                )
                continue
            wish = self.wishes.get(cpu, {}).get(owner)
            top = 0 if (wish is not None and wish.turbo) else nominal
            last = len(table) - 1
            if level == Workload.HIGH:
                index = top
            elif level == Workload.LOW:
                index = last
            else:
                index = (top + last) // 2
            freq_khz = table[index]
            if wish is None:
                self._touch(cpu)[owner] = Wish(freq_khz)
            elif wish.freq_khz != freq_khz:
                self._touch(cpu)
                wish.freq_khz = freq_khz

    # -- reporting ---------------------------------------------------------------------

    def set_cpu_freq(self, owner: str, cpu: int, unit: Unit) -> int:
        """An operator's request (control socket): same rules as a requester, applied now."""
        self._check_cpu(cpu)
        self._move(owner, cpu, (unit,))
        self._apply_now(cpu)
        return self.wishes[cpu][owner].freq_khz

    def release(self, owner: str, cpus: Iterable[int] | None = None) -> list[int]:
        """``owner`` withdraws its wishes on ``cpus`` (None: on every CPU), applied now.

        Each CPU then follows the wishes left, or gets its originals back when none is
        left. Returns the CPUs where ``owner`` had a wish. A CPU whose write fails keeps
        the wish (VmpowerError names it), so what ``show_cpus`` says stays true.
        """
        held = sorted(c for c, per_cpu in self.wishes.items() if owner in per_cpu)
        if cpus is not None:
            wanted = set(cpus)
            held = [c for c in held if c in wanted]
        self._apply_each_now(held, lambda cpu: self._touch(cpu).pop(owner))
        return held

    def _apply_each_now(self, cpus: Iterable[int], change: Callable[[int], object]) -> None:
        """For each CPU in turn: ``change(cpu)``, then apply it at once (operator and
        session commands); VmpowerError naming every CPU whose write failed."""
        failed = []
        for cpu in cpus:
            change(cpu)
            try:
                self._apply_now(cpu)
            except VmpowerError:
                failed.append(cpu)
        if failed:
            listed = ", ".join(str(c) for c in failed)
            raise VmpowerError(f"host CPU {listed}: write failed (see the daemon's log)")

    def _apply_now(self, cpu: int) -> None:
        """Apply ``cpu``'s wishes at once (operator commands); VmpowerError if it failed."""
        ok = self._apply(cpu)
        self._dirty.discard(cpu)
        if not ok:
            # The CPU's wishes go back to before this turn, guests' moves of this turn
            # included: their replies, waiting for the end of the turn, become NACK.
            # So do those of the CPUs sharing its policy.
            members = self.cpufreq.policy_cpus(cpu) | {cpu}
            self._revert(set(members))
            for c in sorted(members):
                self._unapplied(c)
        self._snapshot.pop(cpu, None)
        if not ok:
            raise VmpowerError(f"host CPU {cpu}: write failed (see the daemon's log)")

    def _unapplied(self, cpu: int) -> None:
        """This turn's conditional replies involving ``cpu`` become NACK now."""
        pending = self._pending
        for i, (channel, packets, cpus, _replies, conditional) in enumerate(pending):
            if conditional and cpu in cpus:
                replies = self._nack_unapplied(channel, packets, frozenset({cpu}))
                pending[i] = (channel, packets, cpus, replies, False)

    def _nack_unapplied(
        self, channel: Endpoint, packets: list[bytes], cpus: frozenset[int]
    ) -> list[bytes] | None:
        """Conditional ACKs whose ``cpus`` were not written: counted and noted, and their
        NACKs (None for a FIFO message, which has no reply)."""
        for _ in packets:
            self._count_nack(channel, "write failed")
            self._note_unapplied(channel, cpus)
        if not packets[0]:
            return None
        return [protocol.nack_reply(packet) for packet in packets]

    def cpu_report(self, cpu: int) -> dict[str, object]:
        state = self.cpufreq.state(cpu)
        per_cpu = self.wishes.get(cpu, {})
        original: dict[str, str] = {}
        if self.journal is not None:
            # Only this CPU's policy directory: the whole journal per CPU was 0.1-0.5 s
            # of show_cpus at 256 CPUs (issue #16).
            original = self.journal.originals_in(self.cpufreq.policy_path_prefix(cpu))
        policy_wishes = self._policy_wishes(cpu) or {}
        return {
            "cpu": cpu,
            "policy": self.cpufreq.policy_name(cpu),
            "policy_cpus": sorted(self.cpufreq.policy_cpus(cpu)),
            # what the policy runs at: the highest wish of all its CPUs (rule 5)
            "policy_khz": max((w.freq_khz for w in policy_wishes.values()), default=None),
            "driver": state.driver,
            "governor": state.governor,
            "online": state.online,
            "reserved": cpu in self.reserved_cpus,
            "cur_khz": state.cur_khz,
            "target_khz": state.target_khz,
            "min_khz": state.min_khz,
            "max_khz": state.max_khz,
            "turbo_enabled": state.turbo_enabled,
            "desired_khz": max((w.freq_khz for w in per_cpu.values()), default=None),
            "wishes": {
                owner: {"freq_khz": w.freq_khz, "turbo": w.turbo}
                for owner, w in sorted(per_cpu.items())
            },
            "limits": {
                owner: {"min_khz": lo, "max_khz": hi}
                for owner, (lo, hi) in sorted(self.limits.get(cpu, {}).items())
            },
            "original": original,
        }


def _units_format(count: int) -> struct.Struct:
    """The format that unpacks the units of a read of ``count`` packets."""
    fmt = _UNITS_OF_READ[count] = struct.Struct("<" + f"8xI{_PACKET_SIZE - 12}x" * count)
    return fmt


def _walk(
    index: int, turbo: bool, nominal: int, lowest: int, units: Sequence[int]
) -> tuple[int, bool]:
    """Where ``units`` take a wish at table ``index`` (0 the highest entry, ``lowest`` the
    last, ``nominal`` the first without turbo), one after the other: (index, turbo)."""
    for unit in units:
        if unit == _SCALE_UP:
            index -= 1
        elif unit == _SCALE_DOWN:
            index += 1
        elif unit == _SCALE_MAX:
            index = 0  # then the clamp: the turbo entry only with turbo on
        elif unit == _SCALE_MIN:
            index = lowest
        elif unit == _ENABLE_TURBO:
            turbo = True
            index = 0  # DPDK: enabling turbo also goes to the turbo frequency
        elif unit == _DISABLE_TURBO:
            turbo = False
        # The turbo range (above nominal) is reachable only while this requester
        # has turbo enabled, as in DPDK's drivers.
        top = 0 if turbo else nominal
        if index < top:
            index = top
        elif index > lowest:
            index = lowest
    return index, turbo


def _nearest_index(table: tuple[int, ...], freq_khz: int) -> int:
    return min(range(len(table)), key=lambda i: abs(table[i] - freq_khz))


def _command_name(command: int) -> str:
    return _COMMAND_NAMES.get(command) or f"command {command}"


def _known_vm(owner: str, vm: VmInfo | None, error: VmpowerError | None) -> VmInfo:
    """The read's VM, or the refusal its look-up gave (asked once per read)."""
    if vm is not None:
        return vm
    if error is None or isinstance(error, UnknownVmError):
        raise Refused("vm unknown", f"VM unknown: {error or owner}")
    raise Refused("vm unknown", f"{owner}: {error}")
