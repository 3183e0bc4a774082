"""Power policies (docs/protocol.md, "Policies"): WORKLOAD, TIME, TRAFFIC, BRANCH_RATIO.

Policies are installed by PKT_POLICY (VM channels) or a FIFO's ``create`` message;
either becomes one ``PolicySpec`` when installed, so evaluation never asks where a
policy came from. ``power.PowerManager`` stores the ``PolicyRecord`` keyed by the
requesting channel's owner; this module evaluates them on the periodic event queue
(never in a busy loop) and turns each decision, a workload level (HIGH, MEDIUM, LOW),
into that owner's wish for the policy's CPUs, which the request handler arbitrates
and applies like any other wish at the end of the monitor turn.

Inputs are passed in so tests can script them: the wall clock and time zone (TIME),
packet counters (TRAFFIC: libvirt interface statistics of the domain, any NIC) and
the msr device root (BRANCH_RATIO).
"""

from __future__ import annotations

import logging
import os
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING

from vmpower.errors import VmpowerError
from vmpower.protocol import FifoPolicy, Packet, PolicyType, Workload

if TYPE_CHECKING:
    from vmpower.events import EventQueue
    from vmpower.power import PowerManager
    from vmpower.restore import RestoreJournal

log = logging.getLogger("vmpower.policies")

# Intel SDM vol. 3B, architectural performance monitoring: IA32_PERFEVTSELx select the
# event counted by IA32_PMCx. DPDK's BRANCH_RATIO programs PMC0 with branch instructions
# retired (0xC4) and PMC1 with branch misses retired (0xC5), flags 0x53 (USR|OS|INT|EN
# in bits 16-23), and reads the counters as 8-byte values at the MSR's offset.
IA32_PERFEVTSEL0 = 0x186
IA32_PERFEVTSEL1 = 0x187
IA32_PMC0 = 0xC1
IA32_PMC1 = 0xC2
EVENT_BRANCHES = 0xC4
EVENT_BRANCH_MISSES = 0xC5
EVENT_FLAGS = 0x53
BRANCH_WINDOW = 32  # samples in DPDK's window
IDLE_BRANCHES = 10_000  # fewer branches in a sample: the core is idle
_U64 = struct.Struct("<Q")
_COUNTER_MASK = (1 << 48) - 1  # general-purpose counters are 48 bits wide on current cores
# What a WORKLOAD policy may ask for, as refusals name it: "HIGH (0), MEDIUM (1) or LOW (2)".
_WORKLOAD_CHOICES = ", ".join(f"{w.name} ({w.value})" for w in Workload).replace(", LOW", " or LOW")


@dataclass(frozen=True)
class PolicySpec:
    """A policy as installed, whatever carried it (a PKT_POLICY packet or FIFO JSON)."""

    type: PolicyType
    workload: Workload | None = None  # WORKLOAD: the level asked for
    busy_hours: frozenset[int] = frozenset()  # TIME: hours at max
    quiet_hours: frozenset[int] = frozenset()  # TIME: hours at min
    traffic_hours: frozenset[int] = frozenset()  # TIME: hours decided by TRAFFIC
    avg_packet_thresh: int = 0  # TRAFFIC: packets/s for MEDIUM (0: none)
    max_packet_thresh: int = 0  # TRAFFIC: packets/s for HIGH (0: none)

    @classmethod
    def from_packet(cls, packet: Packet) -> PolicySpec:
        kind = packet.policy_enum
        if kind is None:
            raise ValueError(f"unknown policy_to_use {packet.policy_to_use}")
        workload = packet.workload_enum
        if kind is PolicyType.WORKLOAD and workload is None:
            # It could never decide anything: refused (NACK), not installed to do nothing.
            raise ValueError(f"workload {packet.workload} is not {_WORKLOAD_CHOICES}")
        return cls(
            type=kind,
            workload=workload,
            busy_hours=given_hours(packet.busy_hours),
            quiet_hours=given_hours(packet.quiet_hours),
            traffic_hours=given_hours(packet.hours_to_use_traffic_profile),
            avg_packet_thresh=packet.avg_max_packet_thresh,
            max_packet_thresh=packet.max_max_packet_thresh,
        )

    @classmethod
    def from_fifo(cls, message: FifoPolicy) -> PolicySpec:
        if message.policy_type is None:
            raise ValueError("policy without a policy type")
        if message.policy_type is PolicyType.WORKLOAD and message.workload is None:
            raise ValueError(f"a WORKLOAD policy needs a workload, {_WORKLOAD_CHOICES}")
        return cls(
            type=message.policy_type,
            workload=message.workload,
            busy_hours=frozenset(message.busy_hours),
            quiet_hours=frozenset(message.quiet_hours),
            avg_packet_thresh=message.avg_packet_thresh or 0,
            max_packet_thresh=message.max_packet_thresh or 0,
        )


@dataclass
class PolicyRecord:
    """A policy one requester installed, on the host CPUs it applies to."""

    owner: str
    spec: PolicySpec
    cpus: frozenset[int] = frozenset()
    vcpus: tuple[int, ...] | None = None  # VIRTUAL policies: re-mapped when pinning changes
    installed_at: float = 0.0
    last_decision: str = ""
    last_decision_at: float | None = None


def given_hours(hours: tuple[int, ...]) -> frozenset[int]:
    """The hours a binary packet actually lists.

    The 24-entry arrays are zero-padded by the guest; the reference host treats every
    padding zero as "hour 0". vmpower drops the trailing zeros: hour 0 counts only when a
    non-zero hour follows it (a list that is hour 0 alone cannot be told from "none").
    """
    last = max((i for i, h in enumerate(hours) if h != 0), default=-1)
    return frozenset(h for h in hours[: last + 1] if 0 <= h <= 23)


class MsrReader:
    """Branch counters of host CPUs through ``<root>/<cpu>/msr`` (the msr driver).

    The msr driver's file offset is the MSR number and each read returns that MSR's
    8 bytes (arch/x86/kernel/msr.c), so consecutive MSRs sit at consecutive offsets.
    A regular file cannot hold overlapping 8-byte values; simulated trees therefore
    space them ``stride`` bytes apart (tests use 8; the real device needs 1).

    The event selects' original bytes go to the restore ``journal`` (synced, before
    the first write) when there is one, so that a crash does not leave the PMU
    programmed: the next start's ``recover()`` writes them back. Without a journal
    (unit tests) they are kept in memory only.
    """

    def __init__(self, root: Path, stride: int = 1, journal: RestoreJournal | None = None) -> None:
        self.root = root
        self.stride = stride
        self.journal = journal
        self._fds: dict[int, int] = {}
        self._saved: dict[tuple[int, int], bytes] = {}
        self.unavailable: dict[int, str] = {}

    def _path(self, cpu: int) -> str:
        return str(self.root / str(cpu) / "msr")

    def _fd(self, cpu: int) -> int | None:
        if cpu in self.unavailable:
            return None
        fd = self._fds.get(cpu)
        if fd is None:
            path = self._path(cpu)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                reason = f"{path}: {exc.strerror} (load the msr module, run as root)"
                self.unavailable[cpu] = reason
                log.warning("BRANCH_RATIO unavailable on host CPU %d: %s", cpu, reason)
                return None
            try:
                self._program(cpu, fd)
            except (OSError, VmpowerError) as exc:  # RestoreError: the original not recorded
                os.close(fd)
                self.unavailable[cpu] = f"cannot program the event selects: {exc}"
                log.warning("BRANCH_RATIO unavailable on host CPU %d: %s", cpu, exc)
                return None
            self._fds[cpu] = fd
        return fd

    def _program(self, cpu: int, fd: int) -> None:
        selects = ((IA32_PERFEVTSEL0, EVENT_BRANCHES), (IA32_PERFEVTSEL1, EVENT_BRANCH_MISSES))
        # Every original is read and journaled before the first write: on the real device
        # the two selects are distinct registers, but in a stride-1 file they overlap.
        for msr, _ in selects:
            original = os.pread(fd, 8, msr * self.stride)
            if self.journal is not None:
                self.journal.remember_msr(self._path(cpu), msr * self.stride, original)
            self._saved[(cpu, msr)] = original
        for msr, event in selects:
            os.pwrite(fd, _U64.pack(EVENT_FLAGS << 16 | event), msr * self.stride)

    def read(self, cpu: int) -> tuple[int, int] | None:
        """(branches, misses) counters of ``cpu``, or None when it has no MSR access."""
        fd = self._fd(cpu)
        if fd is None:
            return None
        try:
            branches = _U64.unpack(os.pread(fd, 8, IA32_PMC0 * self.stride))[0]
            misses = _U64.unpack(os.pread(fd, 8, IA32_PMC1 * self.stride))[0]
        except (OSError, struct.error) as exc:
            self.unavailable[cpu] = str(exc)
            log.warning("BRANCH_RATIO: reading MSRs of host CPU %d failed: %s", cpu, exc)
            return None
        return branches & _COUNTER_MASK, misses & _COUNTER_MASK

    def release(self, cpu: int | None = None) -> None:
        """Put the event selects back as they were and close (one CPU, or all).

        Through the journal when there is one: it writes the originals and forgets them
        only once written (a failure stays there for the next attempt or start).
        """
        for one in [cpu] if cpu is not None else list(self._fds):
            fd = self._fds.pop(one, None)
            if fd is None:
                continue
            if self.journal is not None:
                path = self._path(one)
                self._saved.pop((one, IA32_PERFEVTSEL0), None)
                self._saved.pop((one, IA32_PERFEVTSEL1), None)
                self.journal.restore(lambda p, path=path: p == path)  # logs what failed
                os.close(fd)
                continue
            for msr in (IA32_PERFEVTSEL0, IA32_PERFEVTSEL1):
                saved = self._saved.pop((one, msr), None)
                if saved is not None:
                    try:
                        os.pwrite(fd, saved, msr * self.stride)
                    except OSError as exc:
                        log.error("host CPU %d: cannot restore MSR %#x: %s", one, msr, exc)
            os.close(fd)


class PolicyEngine:
    """Evaluates installed policies on the event queue and moves their owners' wishes."""

    def __init__(
        self,
        power: PowerManager,
        events: EventQueue,
        *,
        period_s: float = 0.1,
        branch_period_s: float = 0.001,
        branch_threshold: float = 0.1,
        msr_root: Path = Path("/dev/cpu"),
        msr_stride: int = 1,
        traffic: Callable[[str], tuple[int, int]] | None = None,
        wall_clock: Callable[[], datetime] | None = None,
        timezone: tzinfo | None = None,
    ) -> None:
        self.power = power
        self.events = events
        self.period_s = period_s
        self.branch_period_s = branch_period_s
        self.branch_threshold = branch_threshold
        self.msr = MsrReader(msr_root, msr_stride, journal=power.journal)
        self.traffic = traffic
        self.timezone = timezone
        self.wall_clock = wall_clock or (lambda: datetime.now(self.timezone))
        self._last_traffic: dict[str, tuple[int, float]] = {}
        self._branch_last: dict[int, tuple[int, int]] = {}
        self._branch_window: dict[int, deque[bool]] = {}
        self._branch_cpus: set[int] = set()
        self._event_id: int | None = None
        self._branch_event_id: int | None = None
        self._running = False

    def start(self) -> None:
        self._running = True
        self._event_id = self.events.register(self.period_s, self._evaluate_all)

    def ensure_running(self) -> None:
        """A policy was installed (``PowerManager.policy_installed``): if the evaluation
        slept (no policy left, see ``_evaluate_all``), it starts again."""
        if self._event_id is None and self._running and self.power.policies:
            self._event_id = self.events.register(self.period_s, self._evaluate_all)

    def reconfigure(
        self,
        *,
        period_s: float,
        branch_period_s: float,
        branch_threshold: float,
        timezone: tzinfo | None,
    ) -> None:
        """New settings (SIGHUP reload): periods re-registered, the rest used from now on."""
        self.branch_threshold = branch_threshold
        self.timezone = timezone
        if period_s != self.period_s:
            self.period_s = period_s
            if self._event_id is not None:
                self.events.unregister(self._event_id)
                self._event_id = self.events.register(period_s, self._evaluate_all)
        if branch_period_s != self.branch_period_s:
            self.branch_period_s = branch_period_s
            if self._branch_event_id is not None:
                self.events.unregister(self._branch_event_id)
                self._branch_event_id = self.events.register(branch_period_s, self._sample_branches)

    def stop(self) -> None:
        self._running = False
        for event_id in (self._event_id, self._branch_event_id):
            if event_id is not None:
                self.events.unregister(event_id)
        self._event_id = self._branch_event_id = None
        self.msr.release()

    # -- evaluation --------------------------------------------------------------------

    def _evaluate_all(self, _event_id: int = 0, _data: object = None) -> None:
        if not self.power.policies and self._event_id is not None:
            # Nothing to evaluate: the event sleeps (an idle daemon was woken ten times
            # a second for it) until a policy is installed (ensure_running).
            self.events.unregister(self._event_id)
            self._event_id = None
            self._release_unused_msrs()
            return
        now_mono = self.power.clock()
        for owner, record in list(self.power.policies.items()):
            try:
                self.evaluate(record, now_mono)
            except Exception:
                log.exception("policy of %s failed to evaluate; it stays installed", owner)
        self._release_unused_msrs()

    def evaluate(self, record: PolicyRecord, now_mono: float) -> Workload | None:
        """Decide one policy now and move its owner's wishes; returns the decision."""
        spec = record.spec
        kind = spec.type
        level: Workload | None
        why: str
        if kind is PolicyType.WORKLOAD:
            level = spec.workload
            why = f"workload {level.name if level is not None else '?'}"
        elif kind is PolicyType.TIME:
            level, why = self._time(record, now_mono)
        elif kind is PolicyType.TRAFFIC:
            level, why = self._traffic(record, now_mono)
        elif kind is PolicyType.BRANCH_RATIO:
            self._branch_cpus |= record.cpus
            if self._branch_event_id is None:  # sample only while such a policy exists
                self._branch_event_id = self.events.register(
                    self.branch_period_s, self._sample_branches
                )
            level, why = self._branch_decision(record)
        else:
            return None
        if level is not None:
            self.power.set_level(record.owner, record.cpus, level)
        decision = f"{_LEVEL_NAMES[level]} ({why})"
        if decision != record.last_decision:
            log.info("policy of %s on CPUs %s: %s", record.owner, sorted(record.cpus), decision)
        record.last_decision = decision
        record.last_decision_at = self.wall_clock().timestamp()
        return level

    def _time(self, record: PolicyRecord, now_mono: float) -> tuple[Workload | None, str]:
        hour = self.wall_clock().hour
        spec = record.spec
        if hour in spec.busy_hours:
            return Workload.HIGH, f"busy hour {hour}"
        if hour in spec.quiet_hours:
            return Workload.LOW, f"quiet hour {hour}"
        if hour in spec.traffic_hours:
            level, why = self._traffic(record, now_mono)
            return level, f"traffic hour {hour}: {why}"
        return None, f"hour {hour} not listed"

    def _traffic(self, record: PolicyRecord, now_mono: float) -> tuple[Workload | None, str]:
        if self.traffic is None:
            return None, "no traffic source"
        try:
            rx, tx = self.traffic(record.owner)
        except Exception as exc:
            return None, f"interface statistics unavailable: {exc}"
        packets = rx + tx
        last = self._last_traffic.get(record.owner)
        self._last_traffic[record.owner] = (packets, now_mono)
        if last is None or now_mono <= last[1]:
            return None, "first sample"
        rate = max(0, packets - last[0]) / (now_mono - last[1])
        avg, high = record.spec.avg_packet_thresh, record.spec.max_packet_thresh
        if high and rate >= high:
            return Workload.HIGH, f"{rate:.0f} pkt/s ≥ {high}"
        if avg and rate >= avg:
            return Workload.MEDIUM, f"{rate:.0f} pkt/s ≥ {avg}"
        return Workload.LOW, f"{rate:.0f} pkt/s"

    # -- branch ratio ------------------------------------------------------------------

    def _sample_branches(self, _event_id: int = 0, _data: object = None) -> None:
        for cpu in sorted(self._branch_cpus):
            counters = self.msr.read(cpu)
            if counters is None:
                continue
            last = self._branch_last.get(cpu)
            self._branch_last[cpu] = counters
            if last is None:
                continue
            branches = (counters[0] - last[0]) & _COUNTER_MASK
            misses = (counters[1] - last[1]) & _COUNTER_MASK
            high = branches >= IDLE_BRANCHES and misses * 100 / branches > self.branch_threshold
            window = self._branch_window.setdefault(cpu, deque(maxlen=BRANCH_WINDOW))
            window.append(high)

    def _branch_decision(self, record: PolicyRecord) -> tuple[Workload | None, str]:
        unavailable = [cpu for cpu in record.cpus if cpu in self.msr.unavailable]
        if unavailable:
            return None, f"no MSR access on CPUs {sorted(unavailable)}"
        windows = [self._branch_window.get(cpu) for cpu in record.cpus]
        if any(w is not None and any(w) for w in windows):
            return Workload.HIGH, "branch-miss ratio above threshold"
        if windows and all(w is not None and len(w) == BRANCH_WINDOW for w in windows):
            return Workload.LOW, f"{BRANCH_WINDOW} samples below threshold"
        return None, "window filling"

    def _release_unused_msrs(self) -> None:
        wanted: set[int] = set()
        for record in self.power.policies.values():
            if record.spec.type is PolicyType.BRANCH_RATIO:
                wanted |= record.cpus
        for cpu in self._branch_cpus - wanted:
            self.msr.release(cpu)
            self._branch_last.pop(cpu, None)
            self._branch_window.pop(cpu, None)
        self._branch_cpus &= wanted
        if not self._branch_cpus and self._branch_event_id is not None:
            self.events.unregister(self._branch_event_id)
            self._branch_event_id = None
        for owner in set(self._last_traffic) - set(self.power.policies):
            del self._last_traffic[owner]


# How a decision reads in the log and show_policies (the level each workload sets).
_LEVEL_NAMES = {
    Workload.HIGH: "MAX",
    Workload.MEDIUM: "MEDIUM",
    Workload.LOW: "MIN",
    None: "no change",
}
