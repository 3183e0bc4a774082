"""class Hypervisor: the VM registry, kept by the owner thread from what libvirt says.

This module owns:

* the VM registry: every tracked domain's state, vCPU count, live vCPU→host-CPU affinity
  (the "map", docs/protocol.md, host rule 6) and power channels; ``ensure_fresh()``,
  ``refresh()``, ``add_vm()``/``remove_vm()``;
* the connection's life as the owner sees it: connected or not, reconnection with
  exponential backoff on the owner's clock, the diff of the registry across a reconnect,
  and whether libvirt answers at all (``status()["responsive"]``);
* the few per-VM operations other modules need (pinning, NIC counters).

Threads (issue #11, point 4): no libvirt call runs on the owner thread (the daemon's
monitor loop). The calls themselves are ``LibvirtSession``'s (session.py) and run on the
``LibvirtWorker`` thread (worker.py), which hands each outcome back; the ``_after_*``
methods here apply it, on the owner thread, the only writer of the registry. The request
path never waits for libvirt: ``ensure_fresh()`` returns the last known map at once and
asks the worker for a fresh one. An operator command that needs libvirt waits at most
``CALL_WAIT_S`` and is refused at once while libvirt is not responding. A lock still
guards the registry so that readers on other threads (telemetry) see whole snapshots.
Without ``post`` every call runs inline on the caller's thread (tests, benchmarks).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt

from vmpower.errors import HypervisorError, UnknownVmError
from vmpower.hypervisor.channels_index import ChannelsIndex, Listing, list_channels
from vmpower.hypervisor.libvirt_events import (
    EventInbox,
    EventLoop,
    RawEvent,
    close_reason,
    lifecycle_kind,
)
from vmpower.hypervisor.model import VmEvent, VmInfo, VmState
from vmpower.hypervisor.session import (
    ConnectionLost,
    LibvirtSession,
    Opened,
    VcpuTimes,
    VmRead,
)
from vmpower.hypervisor.worker import Job, LibvirtWorker, Post
from vmpower.tokenbucket import TokenBucket

log = logging.getLogger(__name__)
# A libvirt job that failed (its error handled by Hypervisor._result).
_FAILED: Any = object()

# A libvirt call waiting longer than this means libvirt is not responding (status, and
# operator commands are refused at once). Local libvirtd calls take milliseconds.
STALL_S = 1.0
# The longest an operator command waits for libvirt on the owner thread. Only at the
# onset of a hang (before STALL_S has passed) does a command wait at all.
CALL_WAIT_S = 1.0
# At exit: how long to wait for libvirt to close the connection before leaving it.
CLOSE_WAIT_S = 2.0
# Background map re-reads (rule 6's "older than map_refresh_s") across all VMs: at most
# this many a second, MAP_REREAD_BURST at once. 1000 busy VMs with a 1 s refresh were
# 1000 libvirt calls a second on the worker, all due in the same second at first
# contact, competing with the loop for the interpreter (issue #16). Events (lifecycle,
# cputune) still re-read at once; past the cap a VM keeps its last known map longer.
MAP_REREADS_PER_S = 200.0
MAP_REREAD_BURST = 32.0
# Every running VM's vCPU times (the energy books, each metrics.energy_period_s) come
# from one statistics call where the driver has one (LibvirtSession.vcpu_stats: QEMU's);
# else they are read a VM at a time, this many VMs a worker job, the next slice asked
# for when one lands. As one job for all they held the worker 20-30 ms at 1000 VMs in
# process (a libvirtd round trip a VM on a real host), and an add_vm arriving meanwhile
# waited for all of it: p99 4.7 ms, max 30.7 (issue #16). Between slices the worker
# takes the calls queued ahead.
VCPU_TIMES_SLICE = 16
# ... and at most this many VMs a second: each VM's read is a libvirt call (three round
# trips to libvirtd in the bindings' vcpus()), about 16 µs of the daemon's CPU in process
# and 350 µs behind libvirtd. Every VM each second cost an idle daemon 1.65 % of a CPU
# at 1000 VMs in process, 35 % behind libvirtd (issue #16, the scale bench's energy
# books cases). A host with more VMs gets a sample every VMs / VCPU_READS_PER_S s
# (1000 VMs: 20 s), and its energy books share each package by that longer window.
VCPU_READS_PER_S = 50.0
# The VMs libvirt's events touched are re-read this many a worker job (the next batch
# when one lands): one job for all held the worker for every read (a host starting its
# 1000 VMs) with an add_vm waiting behind them, and applying them held one loop turn
# for all their channels (issue #16).
READ_BATCH = 16


def _ignore(_job: Job) -> None:
    return None


@dataclasses.dataclass
class _VcpuRead:
    """One ``read_vcpu_times`` in progress: its VMs, how far it got, what it has."""

    generation: int
    names: list[str]
    done: Callable[[VcpuTimes | None], None]
    next: int = 0
    due_at: float | None = None  # its next slice waits for the read budget until then
    vms: dict[str, tuple[tuple[float, int], ...]] = dataclasses.field(default_factory=dict)


class Hypervisor:
    """The agent's view of libvirt: the VM registry, kept from one connection's answers.

    ``wake`` is called (from libvirt's threads too) whenever ``process_events()`` has
    something to do. ``post`` hands a callable to the owner thread (the monitor's
    ``call_soon_threadsafe``): with it, libvirt calls run on a worker thread; without
    it, inline. ``clock`` is the owner's monotonic clock in seconds; every time this class
    reports (``map_read_at``, ``next_deadline()``) is on that clock. ``track_all`` False
    serves only the VMs named with ``add_vm()``.
    """

    def __init__(
        self,
        uri: str,
        channels_dir: Path,
        *,
        wake: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        map_refresh_s: float = 1.0,
        track_all: bool = True,
        post: Post | None = None,
    ) -> None:
        if not reconnect_min_s > 0:
            raise HypervisorError(f"reconnect_min_s must be > 0, got {reconnect_min_s!r}")
        if not reconnect_max_s >= reconnect_min_s:
            raise HypervisorError(
                f"reconnect_max_s ({reconnect_max_s!r}) must be ≥ reconnect_min_s "
                f"({reconnect_min_s!r})"
            )
        if not map_refresh_s >= 0:
            raise HypervisorError(f"map_refresh_s must be ≥ 0, got {map_refresh_s!r}")
        self._uri = uri
        self._wake = wake
        self._clock = clock
        self._reconnect_min_s = reconnect_min_s
        self._reconnect_max_s = reconnect_max_s
        self._map_refresh_s = map_refresh_s
        self._track_all = track_all

        self._lock = threading.RLock()
        self._events = EventInbox(wake)
        self._session = LibvirtSession(uri, Path(channels_dir), self._events, clock)
        self._channels_index = ChannelsIndex(Path(channels_dir), clock)
        self._worker = LibvirtWorker(post, clock)
        self._post = post
        # The live connection's generation (its events carry it); None while disconnected.
        self._generation: int | None = None
        self._vms: dict[str, VmInfo] = {}
        self._ifaces: dict[str, tuple[str, ...]] = {}
        self._stats: dict[str, tuple[int, int] | HypervisorError] = {}
        self._ignored: set[str] = set()
        self._added: set[str] = set()
        # Events for the next process_events(), each with its VM's registration when it
        # was queued: an event of a registration since replaced is dropped (rm_vm then
        # add_vm: the removal's "undefined" must not act on the new channels).
        self._pending: list[tuple[VmEvent, int]] = []
        self._registration: dict[str, int] = {}  # VM → its registration number
        self._registrations = 0
        # Lifecycle news waiting for its VMs to be re-read; one batch in flight at a time.
        self._lifecycle: list[VmEvent] = []
        self._touched: dict[str, None] = {}  # ordered set
        self._reading = False
        self._opening = False
        self._stalled_since: float | None = None  # when libvirt stopped answering
        self._host_cpus: int | None = None
        self._closed = False
        self._last_error: str | None = None
        self._reconnect_attempts = 0
        self._reconnects = 0
        self._retry_delay_s = reconnect_min_s
        self._next_retry_at: float | None = None
        self._reread_tokens = MAP_REREAD_BURST  # background map re-reads (ensure_fresh)
        self._reread_at = clock()
        self._vcpu_read: _VcpuRead | None = None  # read_vcpu_times in progress (owner's)
        # One call for every VM's vCPU times (LibvirtSession.vcpu_stats) until the driver
        # says it has none; then a call a VM, in slices, within the budget.
        self._vcpu_bulk = True
        self._vcpu_budget: TokenBucket | None = None  # made for the first call a VM

    # ------------------------------------------------------------------ connection

    @property
    def conn(self) -> libvirt.virConnect | None:
        """The live libvirt connection (None while disconnected); for tests and tools."""
        return self._session.conn if self._generation is not None else None

    def connect(self) -> None:
        """Open the connection, register event callbacks and read every VM; waits for it.

        For start-up, before the loop runs. On failure raises HypervisorError with
        libvirt's message and leaves a retry scheduled: an owner that keeps calling
        ``process_events()`` connects when libvirtd comes up.
        """
        with self._lock:
            if self._closed:
                raise HypervisorError("this Hypervisor was closed")
            if self._generation is not None:
                return
            wants = self._wants_snapshot()
        # The loop's thread starts after the first read of every domain, which it would
        # slow (EventLoop); events received meanwhile wait in libvirt's queue.
        EventLoop.register()
        try:
            job = self._worker.submit(
                functools.partial(self._session.open, wants), self._after_connect
            )
            if job is None:
                raise HypervisorError(
                    f"cannot connect to {self._uri}: a connection is being opened"
                )
            job.wait(None)
        finally:
            EventLoop.ensure_running()
        job.apply()
        if self._generation is None:
            raise HypervisorError(self._last_error or f"cannot connect to {self._uri}")
        # The channels directory's index, listed here, inline, while no loop turn runs
        # (about 10 ms at 4000 VMs): built at the first add_vm instead, its listing
        # thread took the interpreter lock from the loop serving guests and from that
        # add_vm's read, which took 3-4 ms at 1000 VMs under 1000 req/s (1.0-1.5 for
        # the next ones; issue #16). No directory yet: built at the first add_vm.
        self._index_channels_dir(inline=True)

    def _after_connect(self, job: Job) -> None:
        with self._lock:
            try:
                opened = job.outcome()
            except HypervisorError as exc:
                self._last_error = str(exc)
                self._retry_delay_s = self._reconnect_min_s
                self._next_retry_at = self._clock() + self._retry_delay_s
                return
            self._install(opened)

    def close(self) -> None:
        """Drop the connection and stop reconnecting; the registry stays readable."""
        with self._lock:
            self._closed = True
            self._next_retry_at = None
            self._generation = None
            self._worker.submit(self._session.close, _ignore)
        if not self._worker.close(CLOSE_WAIT_S):
            log.warning(
                "libvirt did not answer within %.3g s: its connection is left as it is",
                CLOSE_WAIT_S,
            )
        self._channels_index.close()

    def _install(self, opened: Opened) -> dict[str, VmInfo]:
        """A new connection's registry replaces the old one; returns the old one."""
        old = self._vms
        self._generation = opened.generation
        self._host_cpus = opened.host_cpus
        self._vms = {name: read.info for name, read in opened.vms.items()}
        self._ifaces = {name: read.nics for name, read in opened.vms.items()}
        self._stats = {}
        self._next_retry_at = None
        self._vcpu_bulk = True  # a new libvirtd may have what the last one had not
        log.info("connected to %s: %d VM(s) tracked", self._uri, len(self._vms))
        return old

    def _lose(self, reason: str) -> None:
        """Mark the connection lost; the registry stays as last known; schedule a retry."""
        if self._generation is None:
            return
        log.warning("lost libvirt connection %s: %s", self._uri, reason)
        self._generation = None
        # News of that connection waiting for a re-read: the reconnect's diff covers them.
        self._touched, self._lifecycle = {}, []
        self._worker.submit(self._session.close, _ignore)
        self._last_error = reason
        self._reconnect_attempts = 0
        self._retry_delay_s = self._reconnect_min_s
        self._next_retry_at = self._clock() + self._retry_delay_s
        self._emit([VmEvent("connection_lost", None, reason)])

    def _emit(self, events: list[VmEvent]) -> None:
        """Events for the next ``process_events()``."""
        if events:
            registration = self._registration
            self._pending.extend((e, registration.get(e.vm or "", 0)) for e in events)
            self._wake()

    def _register(self, name: str) -> None:
        """``name`` is registered anew (add_vm, remove_vm): its queued events go stale."""
        self._registrations += 1
        self._registration[name] = self._registrations

    def _require_connected(self) -> int:
        if self._generation is None:
            raise HypervisorError(
                f"not connected to {self._uri}"
                + (f" (last error: {self._last_error})" if self._last_error else "")
            )
        return self._generation

    def _call_now(self, call: Callable[[], Any], done: Callable[[Job], None]) -> Job:
        """Run an operator's libvirt call and apply it before returning, or refuse.

        The owner thread waits for it at most CALL_WAIT_S; while libvirt is known not to
        answer, it does not wait at all. A call that outlives the wait still runs, and its
        outcome is applied when it comes (the registry follows libvirt either way).
        """
        job = self._submit_now(call, done)
        job.wait(CALL_WAIT_S)
        return self._finished(job)

    def _finished(self, job: Job) -> Job:
        """``job`` applied, or refused when it has not finished yet (the caller waited
        up to CALL_WAIT_S for it)."""
        if not job.wait(0):
            raise HypervisorError(
                f"libvirt is not responding (no answer for {CALL_WAIT_S:.1f} s); try again"
            )
        self._worker.apply_through(job)  # after the outcomes of the calls before it
        return job

    def _submit_now(self, call: Callable[[], Any], done: Callable[[Job], None]) -> Job:
        """Queue an operator's libvirt call ahead of the background ones, or refuse at
        once while libvirt is not responding."""
        stalled_s = self._worker.stalled_s()
        if stalled_s >= STALL_S:
            raise HypervisorError(
                f"libvirt is not responding (no answer for {stalled_s:.1f} s); try again"
            )
        job = self._worker.submit(call, done, urgent=True)
        if job is None:
            raise HypervisorError(
                f"libvirt is not responding ({self._worker.queued()} calls waiting); try again"
            )
        return job

    def _outcome(self, job: Job) -> Any:
        """The job's value for an operator; a lost connection is said as such."""
        try:
            return job.outcome()
        except ConnectionLost as exc:
            raise HypervisorError(f"lost connection to {self._uri}: {exc}") from None

    def next_deadline(self) -> float | None:
        """When (on the owner's clock) ``process_events()`` should next be called.

        None: on wake only. Now, when news are waiting to be reported.
        """
        with self._lock:
            if self._closed:
                return None
            if self._pending:
                return self._clock()
            retry_at = None if self._opening else self._next_retry_at
            read = self._vcpu_read
            if read is None or read.due_at is None:
                return retry_at
            return read.due_at if retry_at is None else min(retry_at, read.due_at)

    def set_map_refresh(self, map_refresh_s: float) -> None:
        """A new ``libvirt.map_refresh_s`` (SIGHUP reload): maps older are re-read."""
        if not map_refresh_s >= 0:
            raise HypervisorError(f"map_refresh_s must be ≥ 0, got {map_refresh_s!r}")
        with self._lock:
            self._map_refresh_s = map_refresh_s

    # ------------------------------------------------------------------ event processing

    def process_events(self) -> list[VmEvent]:
        """Report what happened since the last call; start re-reads and reconnects.

        Called by the owner thread, on wake and at ``next_deadline()``. Never raises: a
        failure is logged and kept in ``status()["last_error"]``. Re-reads run on the
        worker: what they find is reported by a later call (inline: by this one).
        """
        try:
            with self._lock:
                self._process()
        except Exception as exc:  # the monitor loop must survive anything libvirt does
            log.exception("processing libvirt events")
            self._last_error = f"processing events: {exc}"
        with self._lock:
            pending, self._pending = self._pending, []
            registration = self._registration
            return [
                event
                for event, number in pending
                if event.vm is None or registration.get(event.vm, 0) == number
            ]

    def _process(self) -> None:
        raws = self._events.drain()
        if self._closed:
            return
        read = self._vcpu_read
        if read is not None and read.due_at is not None and self._clock() >= read.due_at:
            read.due_at = None
            # Given up: the connection was lost or replaced meanwhile, or the worker's
            # queue is full (a hung libvirtd); the next period asks again.
            if read.generation != self._generation or not self._read_vcpu_slice(read):
                self._end_vcpu_read(read, None)
        self._note_stall()
        generation = self._generation
        if generation is not None:
            current = [r for r in raws if r.generation == generation]
            closed = [r for r in current if r.kind == "close"]
            if closed:
                self._lose(f"connection closed by libvirt ({close_reason(closed[0].code)})")
            else:
                self._note(current)
                if not self._read_touched() and self._worker.idle():
                    # Nothing to read: one round trip tells a dead or hung connection.
                    self._worker.submit(
                        self._session.ping,
                        functools.partial(self._after_ping, generation),
                        key="ping",
                    )
        if (
            self._generation is None
            and not self._opening
            and self._next_retry_at is not None
            and self._clock() >= self._next_retry_at
        ):
            self._opening = True
            job = self._worker.submit(
                functools.partial(self._session.open, self._wants_snapshot()),
                self._after_reconnect,
                key="open",
            )
            if job is None:
                self._opening = False

    def _note_stall(self) -> None:
        """One line when libvirt stops answering, one when it answers again."""
        stalled_s = self._worker.stalled_s()
        if stalled_s >= STALL_S and self._stalled_since is None:
            self._stalled_since = self._clock() - stalled_s
            log.warning(
                "libvirt has not answered for %.1f s: guests are served on the last known "
                "vCPU maps; commands that need libvirt are refused until it answers",
                stalled_s,
            )
        elif stalled_s < STALL_S and self._stalled_since is not None:
            log.warning("libvirt answers again after %.1f s", self._clock() - self._stalled_since)
            self._stalled_since = None

    def _note(self, raws: list[RawEvent]) -> None:
        """libvirt's records → lifecycle events, and the VMs to re-read before reporting."""
        for raw in raws:
            name = raw.vm
            if name is None or not self._wants(name):
                continue
            if raw.kind == "lifecycle":
                kind, detail = lifecycle_kind(raw.code, raw.detail)
                if kind is not None:
                    self._lifecycle.append(VmEvent(kind, name, detail))
            elif raw.kind == "tunable" and raw.pinning:
                self._lifecycle.append(VmEvent("pinning", name, "libvirt"))
            self._touched[name] = None

    def _read_touched(self) -> bool:
        """Start re-reading the touched VMs (one batch at a time); True if one is running."""
        if self._reading:
            return True
        if not self._touched or self._generation is None:
            return False
        # READ_BATCH at most; the rest when this batch lands (its events with it).
        names = list(itertools.islice(self._touched, READ_BATCH))
        for name in names:
            del self._touched[name]
        batch = set(names)
        lifecycle = [e for e in self._lifecycle if e.vm in batch]
        self._lifecycle = [e for e in self._lifecycle if e.vm not in batch]
        self._reading = True
        job = self._worker.submit(
            functools.partial(self._session.read_vms, names),
            functools.partial(self._after_reads, self._generation, names, lifecycle),
        )
        if job is None:  # queue full behind a hung call: keep them for the next turn
            self._reading = False
            self._touched = dict.fromkeys(names) | self._touched
            self._lifecycle = lifecycle + self._lifecycle
            return True
        return True

    def _after_reads(
        self, generation: int, names: list[str], lifecycle: list[VmEvent], job: Job
    ) -> None:
        with self._lock:
            self._reading = False
            if generation != self._generation:
                return  # that connection is gone; the reconnect's diff reports what changed
            reads = self._result(job)
            if reads is _FAILED:
                return
            events = [e for e in lifecycle if e.vm is not None and self._wants(e.vm)]
            for name in names:
                if not self._wants(name):
                    continue  # removed meanwhile
                before = self._vms.get(name)
                mine = [e.kind for e in events if e.vm == name]
                read = reads.get(name)
                if isinstance(read, str):
                    self._last_error = read
                if read is None or (isinstance(read, str) and before is None):
                    # A transient domain vanishes when it stops, with no UNDEFINED event.
                    self._drop(name)
                    if not mine or mine[-1] != "undefined":
                        events.append(VmEvent("undefined", name, "gone"))
                    continue
                if isinstance(read, str):
                    continue  # keep the last known state
                self._store(read, announce=False)
                after = read.info
                if (
                    before is not None
                    and before.active
                    and after.active
                    and before.vcpu_pcpus != after.vcpu_pcpus
                    and "pinning" not in mine
                ):
                    events.append(VmEvent("pinning", name, "refresh"))
            self._emit(events)
            self._read_touched()  # what libvirt said meanwhile

    def _after_ping(self, generation: int, job: Job) -> None:
        with self._lock:
            if generation != self._generation:
                return
            self._result(job)

    def _after_reconnect(self, job: Job) -> None:
        with self._lock:
            self._opening = False
            if self._closed:
                return
            attempt = self._reconnect_attempts + 1
            try:
                opened = job.outcome()
            except HypervisorError as exc:
                self._reconnect_attempts = attempt
                self._last_error = str(exc)
                self._retry_delay_s = min(self._retry_delay_s * 2, self._reconnect_max_s)
                self._next_retry_at = self._clock() + self._retry_delay_s
                log.info(
                    "reconnect attempt %d failed (%s); next in %.3g s",
                    attempt,
                    exc,
                    self._retry_delay_s,
                )
                return
            old = self._install(opened)
            self._reconnects += 1
            self._reconnect_attempts = 0
            self._retry_delay_s = self._reconnect_min_s
            events = [VmEvent("connection_restored", None, f"after {attempt} attempt(s)")]
            # Lifecycle events that happened while disconnected are lost; tell what changed.
            self._emit(events + _diff(old, self._vms, "while disconnected"))

    # ------------------------------------------------------------------ registry

    def _wants(self, name: str) -> bool:
        if name in self._ignored:
            return False
        return self._track_all or name in self._added

    def _wants_snapshot(self) -> Callable[[str], bool]:
        """``_wants`` frozen now, for a read on the worker (which never reads our state)."""
        track_all, added = self._track_all, frozenset(self._added)
        ignored = frozenset(self._ignored)
        return lambda name: name not in ignored and (track_all or name in added)

    def _store(self, read: VmRead, *, announce: bool) -> None:
        """Put a VM as read into the registry.

        ``announce``: queue a "pinning" event for the next process_events() when the map
        changed (process_events() reports the changes it finds itself).
        """
        info = read.info
        old = self._vms.get(info.name)
        self._vms[info.name] = info
        self._ifaces[info.name] = read.nics
        if (
            announce
            and old is not None
            and old.active
            and info.active
            and old.vcpu_pcpus != info.vcpu_pcpus
        ):
            self._queue_pinning(info.name, "refresh")

    def _queue_pinning(self, name: str, detail: str) -> None:
        self._emit([VmEvent("pinning", name, detail)])

    def _drop(self, name: str) -> None:
        self._vms.pop(name, None)
        self._ifaces.pop(name, None)
        self._stats.pop(name, None)

    def vms(self) -> dict[str, VmInfo]:
        """Every tracked VM (the last known state while disconnected)."""
        with self._lock:
            return dict(self._vms)

    def vm_count(self) -> int:
        """How many VMs are tracked (``len(vms())`` without copying the registry)."""
        return len(self._vms)

    def vm(self, name: str) -> VmInfo:
        with self._lock:
            return self._get(name)

    def _get(self, name: str) -> VmInfo:
        info = self._vms.get(name)
        if info is None:
            raise UnknownVmError(f"no VM named {name!r} is tracked")
        return info

    def tracked(self, name: str) -> bool:
        with self._lock:
            return name in self._vms

    # ------------------------------------------------------------------ the live map

    def ensure_fresh(self, name: str) -> VmInfo:
        """The VM's info; when its map is older than ``map_refresh_s``, a re-read is asked.

        The request path calls this: it never waits for libvirt. The last known info is
        returned (inline, the re-read is done first); the fresh map serves once it came.
        Raises UnknownVmError for a VM not tracked (or, inline, gone).
        """
        with self._lock:
            info = self._vms.get(name)  # _get's look-up inline: this runs every read
            if info is None:
                info = self._get(name)  # raises
            generation = self._generation
            now = self._clock()
            if generation is None or now - info.map_read_at < self._map_refresh_s:
                return info
            tokens = self._reread_tokens + (now - self._reread_at) * MAP_REREADS_PER_S
            self._reread_tokens = min(MAP_REREAD_BURST, tokens)
            self._reread_at = now
            if self._reread_tokens < 1.0:
                return info  # over the cap: asked again by a later request
            queued = self._worker.submit(
                functools.partial(self._session.read_map, info),
                functools.partial(self._after_map, generation, name),
                key=f"map\0{name}",
            )
            if queued is not None:
                self._reread_tokens -= 1.0
            info_now = self._vms.get(name)
            if info_now is None:
                raise UnknownVmError(f"VM {name!r} no longer exists")
            return info_now

    def _result(self, job: Job, *, note_error: bool = True) -> Any:
        """A finished libvirt job's result, or _FAILED (the lock held).

        A lost connection is handled here (every VM's state is then re-read on the
        reconnect); any other libvirt error is kept for ``status`` unless the caller
        reports it itself (an operator's command raises it to the operator).
        """
        try:
            return job.outcome()
        except ConnectionLost as exc:
            self._lose(str(exc))
        except HypervisorError as exc:
            if note_error:
                self._last_error = str(exc)
        return _FAILED

    def _after_map(self, generation: int, name: str, job: Job) -> None:
        with self._lock:
            info = self._vms.get(name)
            if generation != self._generation or info is None:
                return
            result = self._result(job)
            if result is _FAILED:
                return
            if isinstance(result, str):
                self._last_error = result
            elif result is None:
                self._drop(name)  # libvirt no longer has it; its event says so too
            elif isinstance(result, VmRead):
                self._store(result, announce=True)
            else:
                self._vms[name] = dataclasses.replace(
                    info, vcpu_pcpus=result, map_read_at=self._clock()
                )
                if result != info.vcpu_pcpus:
                    self._queue_pinning(name, "refresh")

    def refresh(self, name: str | None = None) -> None:
        """Re-read the map and channels of one VM (or of every VM) now (operator)."""
        with self._lock:
            generation = self._require_connected()
            if name is None:
                call = functools.partial(self._session.refresh_all, self._wants_snapshot())
                done = functools.partial(self._after_refresh_all, generation)
            else:
                self._get(name)
                call = functools.partial(self._session.read_vms, [name])
                done = functools.partial(self._after_refresh_one, generation, name)
        self._outcome(self._call_now(call, done))
        if name is not None and not self.tracked(name):
            raise UnknownVmError(f"VM {name!r} no longer exists")

    def _after_refresh_all(self, generation: int, job: Job) -> None:
        with self._lock:
            if generation != self._generation:
                return
            vms = self._result(job)
            if vms is _FAILED:
                return
            for gone in set(self._vms) - set(vms):
                self._drop(gone)
            for read in vms.values():
                self._store(read, announce=True)

    def _after_refresh_one(self, generation: int, name: str, job: Job) -> None:
        with self._lock:
            if generation != self._generation or not self._wants(name):
                return
            outcome = self._result(job)
            if outcome is _FAILED:
                return
            read = outcome[name]
            if read is None:
                self._drop(name)
            elif isinstance(read, str):
                self._last_error = read
            else:
                self._store(read, announce=True)

    # ------------------------------------------------------------------ manual tracking

    def add_vm(self, name: str) -> VmInfo:
        """Track ``name`` again (after ``remove_vm``, or with track_all off)."""
        job = self.add_vm_start(name)
        if job is None:
            return self.vm(name)
        job.wait(CALL_WAIT_S)
        return self.add_vm_finish(name, job)

    def add_vm_start(self, name: str) -> Job | None:
        """``add_vm`` without waiting on the owner thread (issue #16: add_vm held the
        monitor loop while its libvirt call ran): the VM's read is queued ahead of the
        background re-reads and its Job returned; None when ``name`` is tracked already.
        Refused at once (HypervisorError) while libvirt is not responding.

        The outcome is posted to the owner thread when the call ends (which wakes the
        loop); once ``job.wait(0)`` is true, ``add_vm_finish(name, job)`` gives add_vm's
        answer. A caller that gives up (after CALL_WAIT_S, as add_vm does) leaves the
        job's outcome to be applied when it comes.
        """
        with self._lock:
            generation = self._require_connected()
            if name in self._vms:
                return None
        # The VM's sockets in the channels directory are looked up here, on the owner
        # thread, and handed to the worker's read. Each of the 64 candidates' access(2)
        # gives up the interpreter lock; in the worker, under guest traffic, the loop
        # took it at each one and the read waited for the loop's turn to end, 64 times:
        # at 1000 VMs under 1000 req/s the read took 1.0-1.3 ms (median), 0.4-0.5 ms
        # without them, and add_vm's median inside the daemon went from 2.0-2.7 ms to
        # 1.6-2.5. Here the look-up comes from the directory's index (channels_index),
        # and probes the 64 (0.13 ms of the loop, 0.6 under that traffic) only until
        # the index is whole.
        dir_sockets = self._dir_sockets(name)
        job = self._submit_now(
            functools.partial(self._session.read_vms, [name], dir_sockets),
            functools.partial(self._after_add, generation, name),
        )
        # The index was built at connect; again after it was dropped (or had no
        # directory to watch then).
        self._index_channels_dir()
        return job

    def _dir_sockets(self, name: str) -> dict[str, dict[int, str]]:
        """``name``'s sockets in the channels directory: from its index when that is
        whole, else probed."""
        found = self._channels_index.lookup(name)
        if found is not None:
            return {name: found}
        return self._session.dir_sockets(name)

    def _index_channels_dir(self, inline: bool = False) -> None:
        """Have the listing the channels directory's index is built on made, when one is
        wanted (about 10 ms at 4000 VMs): on a thread of its own (on the worker it held
        up the libvirt reads queued behind it, the next add_vm's among them), its
        outcome posted to the owner thread; inline when asked or without ``post``."""
        index = self._channels_index
        epoch = index.begin_listing()
        if epoch is None:
            return
        post = None if inline else self._post
        deliver = post or (lambda call: call())
        directory = Path(index.channels_dir)

        def make() -> None:
            try:
                listing: Listing | None = list_channels(directory)
            except OSError as exc:  # probe meanwhile; a listing is asked for again later
                log.info("channels directory %s not indexed: %s", directory, exc)
                listing = None
            deliver(functools.partial(index.listed, epoch, listing))

        if post is None:
            make()
            return
        try:
            threading.Thread(target=make, name="channels-listing", daemon=True).start()
        except RuntimeError:  # no thread to be had now: later
            index.listed(epoch, None)

    def add_vm_finish(self, name: str, job: Job) -> VmInfo:
        """add_vm's answer from a finished ``add_vm_start`` job (applied now if its posted
        outcome has not been yet): the VM's info, or why libvirt would not give it; refused
        when the job has not finished (the caller waited up to CALL_WAIT_S for it)."""
        read = self._outcome(self._finished(job))[name]
        with self._lock:
            if name in self._vms:
                return self._vms[name]
        if isinstance(read, str):
            raise HypervisorError(f"add_vm {read}")
        raise UnknownVmError(f"libvirt knows no VM named {name!r}")

    def _after_add(self, generation: int, name: str, job: Job) -> None:
        with self._lock:
            if generation != self._generation:
                return
            outcome = self._result(job, note_error=False)
            if outcome is _FAILED:
                return
            read = outcome[name]
            if not isinstance(read, VmRead):
                return
            self._ignored.discard(name)
            self._added.add(name)
            self._register(name)
            self._store(read, announce=False)
            self._emit([VmEvent("defined", name, "add_vm")])

    def remove_vm(self, name: str) -> None:
        """Ignore ``name`` (no map, no channels, no events) until ``add_vm(name)``."""
        with self._lock:
            self._get(name)
            self._ignored.add(name)
            self._added.discard(name)
            self._drop(name)
            self._register(name)
            self._emit([VmEvent("undefined", name, "remove_vm")])

    # ------------------------------------------------------------------ per-VM operations

    def host_cpu_count(self) -> int:
        """Number of host CPUs libvirt reports (the length of its CPU maps)."""
        with self._lock:
            if self._host_cpus is None:
                raise HypervisorError(f"never connected to {self._uri}")
            return self._host_cpus

    def set_pcpu(self, vm: str, vcpu: int, cpus: frozenset[int]) -> VmInfo:
        """Pin ``vcpu`` of ``vm`` to ``cpus`` (live) through libvirt; returns the new info."""
        with self._lock:
            info = self._get(vm)
            generation = self._require_connected()
            host_cpus = self._host_cpus or 0
            if not info.active:
                raise HypervisorError(f"{vm} is not running ({info.state.value})")
            if isinstance(vcpu, bool) or not isinstance(vcpu, int):
                raise HypervisorError(f"vCPU must be an integer, got {vcpu!r}")
            if not 0 <= vcpu < info.vcpu_count:
                raise HypervisorError(f"{vm} has no vCPU {vcpu} (it has {info.vcpu_count})")
            wanted = frozenset(cpus)
            if not wanted:
                # libvirt's test driver accepts an empty map; QEMU would refuse it.
                raise HypervisorError(f"cannot pin {vm} vCPU {vcpu} to no CPU")
            bad = sorted(
                (c for c in wanted if not isinstance(c, int) or not 0 <= c < host_cpus), key=str
            )
            if bad:
                raise HypervisorError(
                    f"cannot pin {vm} vCPU {vcpu}: no host CPU {bad} (host CPUs: 0-{host_cpus - 1})"
                )
        job = self._call_now(
            functools.partial(self._session.pin, info, vcpu, wanted),
            functools.partial(self._after_pin, generation, vm),
        )
        self._outcome(job)
        return self.vm(vm)

    def _after_pin(self, generation: int, vm: str, job: Job) -> None:
        with self._lock:
            info = self._vms.get(vm)
            if generation != self._generation or info is None:
                return
            pcpus = self._result(job, note_error=False)
            if pcpus is _FAILED:
                return
            self._vms[vm] = dataclasses.replace(info, vcpu_pcpus=pcpus, map_read_at=self._clock())
            self._queue_pinning(vm, "set_pcpu")

    def interface_stats(self, vm: str) -> tuple[int, int]:
        """(rx_packets, tx_packets) summed over every NIC of the VM (0, 0 without NICs).

        The counters last read: each call asks for a fresh reading (inline: made first).
        """
        with self._lock:
            info = self._get(vm)
            generation = self._require_connected()
            if not info.active:
                raise HypervisorError(f"{vm} is not running ({info.state.value})")
            nics = self._ifaces.get(vm, ())
            if not nics:
                return 0, 0
            self._worker.submit(
                functools.partial(self._session.interface_stats, vm, nics),
                functools.partial(self._after_stats, generation, vm),
                key=f"stats\0{vm}",
            )
            stats = self._stats.get(vm)
            if stats is None:
                raise HypervisorError(f"{vm}: NIC statistics not read yet")
            if isinstance(stats, HypervisorError):
                raise stats
            return stats

    def read_vcpu_times(self, done: Callable[[VcpuTimes | None], None]) -> bool:
        """Ask for every running VM's vCPU times and placement, off the owner's thread.

        ``done`` gets the ``VcpuTimes`` (None when the read failed) on the owner thread.
        False when nothing was asked: disconnected, or the previous read still queued
        (one at a time: a slow libvirtd never gets a backlog of these).
        """
        with self._lock:
            if self._generation is None or self._vcpu_read is not None:
                return False
            read = _VcpuRead(self._generation, [], done)
        self._vcpu_read = read
        if self._vcpu_bulk:
            job = self._worker.submit(
                self._session.vcpu_stats, functools.partial(self._after_vcpu_stats, read)
            )
            asked = job is not None
        else:
            asked = self._read_vcpu_slices(read)
        if not asked and self._vcpu_read is read:
            self._vcpu_read = None
        return asked

    def _read_vcpu_slices(self, read: _VcpuRead) -> bool:
        """One call a VM, in slices (VCPU_TIMES_SLICE): each lands on the owner thread,
        which asks for the next, so what was queued meanwhile (an operator's add_vm)
        runs in between."""
        with self._lock:
            read.names = [name for name, info in self._vms.items() if info.active]
        if self._vcpu_budget is None:
            burst = max(VCPU_TIMES_SLICE, int(VCPU_READS_PER_S))  # a slice fits in it
            self._vcpu_budget = TokenBucket(VCPU_READS_PER_S, burst, self._clock)
        return self._read_vcpu_slice(read)

    def _vcpu_outcome(self, read: _VcpuRead, job: Job) -> Any:
        """A vCPU read job's value, or _FAILED: it failed (a lost connection handled as
        ``_result`` does), or the read began on a connection since replaced."""
        with self._lock:
            if read.generation == self._generation:
                return self._result(job, note_error=False)
        return _FAILED

    def _after_vcpu_stats(self, read: _VcpuRead, job: Job) -> None:
        times = self._vcpu_outcome(read, job)
        if times is None:
            log.info(
                "%s reports no vCPU statistics: vCPU times are read a VM at a time, %g a "
                "second at most",
                self._uri,
                VCPU_READS_PER_S,
            )
            self._vcpu_bulk = False
            if self._read_vcpu_slices(read):
                return
            times = _FAILED
        if times is _FAILED:
            self._end_vcpu_read(read, None)
            return
        # The tracked VMs only, as a call a VM reads them (the statistics name them all).
        with self._lock:
            vms = self._vms
            tracked = {n: t for n, t in times.vms.items() if n in vms and vms[n].active}
        self._end_vcpu_read(read, VcpuTimes(tracked, times.read_at))

    def vcpu_pins(self, name: str) -> tuple[frozenset[int], ...] | None:
        """Each vCPU's host CPUs of a tracked VM (its live map); None when not tracked."""
        with self._lock:
            info = self._vms.get(name)
            return None if info is None else info.vcpu_pcpus

    def _read_vcpu_slice(self, read: _VcpuRead) -> bool:
        """Ask for the read's next slice, now or (past the budget) when ``due_at`` comes,
        through ``process_events``; False when the worker would not take it."""
        names = read.names[read.next : read.next + VCPU_TIMES_SLICE]
        assert self._vcpu_budget is not None
        now = self._clock()
        wait_s = self._vcpu_budget.take_or_wait(now, len(names))
        if wait_s > 0:
            read.due_at = now + wait_s
            return True
        read.next += len(names)
        job = self._worker.submit(
            functools.partial(self._session.vcpu_times, names),
            functools.partial(self._after_vcpu_times, read),
        )
        return job is not None

    def _after_vcpu_times(self, read: _VcpuRead, job: Job) -> None:
        times = self._vcpu_outcome(read, job)
        if times is _FAILED:
            self._end_vcpu_read(read, None)
            return
        read.vms.update(times.vms)
        if read.next < len(read.names):
            # No room in the worker's queue (a hung libvirtd): this sample is given up,
            # the next is asked for at the next period.
            if not self._read_vcpu_slice(read):
                self._end_vcpu_read(read, None)
            return
        self._end_vcpu_read(read, VcpuTimes(read.vms, times.read_at))  # the last slice's

    def _end_vcpu_read(self, read: _VcpuRead, times: VcpuTimes | None) -> None:
        self._vcpu_read = None
        read.done(times)

    def _after_stats(self, generation: int, vm: str, job: Job) -> None:
        with self._lock:
            if generation != self._generation or vm not in self._vms:
                return
            try:
                self._stats[vm] = job.outcome()
            except ConnectionLost as exc:
                self._lose(str(exc))
                self._stats[vm] = HypervisorError(f"lost connection to {self._uri}: {exc}")
            except HypervisorError as exc:
                self._stats[vm] = exc

    def status(self) -> dict[str, Any]:
        """What the operator sees of the libvirt side."""
        stalled_s = self._worker.stalled_s()
        with self._lock:
            last_read = max((i.map_read_at for i in self._vms.values()), default=None)
            return {
                "uri": self._uri,
                "connected": self._generation is not None,
                # False while a libvirt call has been waiting STALL_S or more: the last
                # known map serves meanwhile, operator commands needing libvirt are refused.
                "responsive": stalled_s < STALL_S,
                "stalled_s": round(stalled_s, 1),
                "calls_waiting": self._worker.queued(),
                "closed": self._closed,
                "last_error": self._last_error,
                "reconnect_attempts": self._reconnect_attempts,
                "reconnects": self._reconnects,
                "next_retry_at": self._next_retry_at,
                "last_map_read": last_read,
                "last_map_read_age_s": None if last_read is None else self._clock() - last_read,
                "vms": len(self._vms),
                "ignored": sorted(self._ignored),
                "host_cpus": self._host_cpus,
            }


def _diff(old: dict[str, VmInfo], new: dict[str, VmInfo], detail: str) -> list[VmEvent]:
    """The events that turn registry ``old`` into ``new`` (after a reconnect)."""
    events: list[VmEvent] = []
    for name in sorted(old.keys() - new.keys()):
        if old[name].active:
            events.append(VmEvent("stopped", name, detail))
        events.append(VmEvent("undefined", name, detail))
    for name in sorted(new.keys()):
        after = new[name]
        before = old.get(name)
        if before is not None and before.uuid != after.uuid:
            events += _diff({name: before}, {}, detail)
            before = None
        if before is None:
            events.append(VmEvent("defined", name, detail))
            if after.active:
                events.append(VmEvent("started", name, detail))
            if after.state is VmState.PAUSED:
                events.append(VmEvent("paused", name, detail))
            continue
        if before.active and not after.active:
            events.append(VmEvent("stopped", name, detail))
        elif not before.active and after.active:
            events.append(VmEvent("started", name, detail))
            if after.state is VmState.PAUSED:
                events.append(VmEvent("paused", name, detail))
        elif before.active and after.active:
            if before.state is VmState.RUNNING and after.state is VmState.PAUSED:
                events.append(VmEvent("paused", name, detail))
            elif before.state is VmState.PAUSED and after.state is VmState.RUNNING:
                events.append(VmEvent("resumed", name, detail))
            if before.vcpu_pcpus != after.vcpu_pcpus:
                events.append(VmEvent("pinning", name, detail))
    return events
