"""The libvirt side of the agent: connection, events, VM registry, vCPU→pCPU map, channels.

This module owns:

* the one libvirt connection of the agent, with reconnection (exponential backoff) when
  libvirtd goes away, and the process-wide libvirt event loop thread;
* the VM registry: every tracked domain's state, vCPU count, live vCPU→host-CPU affinity
  (the "map", PROTOCOL.md rule 6) and power channels;
* channel discovery: from each domain's XML, merged with a scan of the channels directory;
* the few per-VM libvirt calls other modules need (pinning, NIC counters, vCPU time).

Threads: libvirt calls our event callbacks on its own event loop thread; they only put a
record on a queue and call ``wake()``. The owner thread (the daemon's monitor loop) calls
``process_events()`` to apply them; it is the only writer of the registry (DESIGN.md,
"the monitor thread is the only writer of agent state"). A lock still guards the registry
so that readers on other threads (telemetry, policies) see whole snapshots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import os
import queue
import re
import stat
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import libvirt

from vmpower.cpuset import format_cpu_list
from vmpower.errors import HypervisorError, UnknownVmError

log = logging.getLogger(__name__)

# The guest side of a power channel is /dev/virtio-ports/virtio.serial.port.poweragent.<n>
# (PROTOCOL.md, Transport); <n> is the guest lcore the port serves.
_PORT_NAME = re.compile(r"virtio\.serial\.port\.poweragent\.(\d+)")
# Host-side socket names in the channels directory: "<vm>.<n>", split at the LAST dot because
# VM names may contain dots (PROTOCOL.md, Transport, vmpower rule).
_SOCKET_NAME = re.compile(r"(.+)\.(\d+)")


class VmState(enum.Enum):
    """A domain's run state, folded from libvirt's virDomainState."""

    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    OTHER = "other"


_STATES: dict[int, VmState] = {
    libvirt.VIR_DOMAIN_RUNNING: VmState.RUNNING,
    # BLOCKED: a running domain whose vCPUs wait on a resource; still running and pinned.
    libvirt.VIR_DOMAIN_BLOCKED: VmState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: VmState.PAUSED,
    # PMSUSPENDED: the guest suspended itself to RAM; the vCPU threads exist but do not run.
    libvirt.VIR_DOMAIN_PMSUSPENDED: VmState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTOFF: VmState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: VmState.CRASHED,
}


@dataclass(frozen=True)
class ChannelInfo:
    """One host-side power channel socket of a VM.

    ``source`` is ``"xml"`` when the domain's XML lists it, ``"dir"`` when only the
    channels directory scan found it.
    """

    vm: str
    index: int
    path: str
    source: str


@dataclass(frozen=True)
class VmInfo:
    """What the agent knows of one VM, as of ``map_read_at`` (the owner's clock).

    ``vcpu_pcpus[i]`` is the full set of host CPUs vCPU ``i`` may run on. It and
    ``channels`` are empty while the domain is not active (shut off, or crashed and gone):
    a VM that is not running owns no CPU and has no socket to connect to.
    ``host_cpus`` is the host CPU count the map was read against (0: unknown); it tells a
    pinned vCPU from an unpinned one (affinity = every host CPU).
    """

    name: str
    uuid: str
    state: VmState
    vcpu_count: int
    vcpu_pcpus: tuple[frozenset[int], ...]
    channels: tuple[ChannelInfo, ...]
    map_read_at: float
    host_cpus: int = 0

    @property
    def active(self) -> bool:
        """True while the domain has live vCPUs (running or paused)."""
        return bool(self.vcpu_pcpus)

    def pcpus(self, host_cpus: int | frozenset[int] | None = None) -> frozenset[int]:
        """Union of the affinity sets of the VM's pinned vCPUs: the host CPUs it owns.

        Unpinned vCPUs (affinity = every host CPU) are left out: an unpinned VM owns no host
        CPU, it merely may run anywhere (PROTOCOL.md rule 4). ``host_cpus`` (a count, or the
        set of every host CPU) overrides the field; when neither is known every vCPU counts.
        """
        known = host_cpus if host_cpus is not None else (self.host_cpus or None)
        result: set[int] = set()
        for vcpu, cpus in enumerate(self.vcpu_pcpus):
            if known is None or self.is_pinned(vcpu, known):
                result |= cpus
        return frozenset(result)

    def is_pinned(self, vcpu: int, host_cpus: int | frozenset[int] | None = None) -> bool:
        """Whether ``vcpu`` is pinned: its affinity is not every host CPU.

        ``host_cpus`` is the host CPU count or the set of every host CPU (default: the
        field). A vCPU index the VM does not have (or any vCPU of a VM that is not running)
        is not pinned.
        """
        if host_cpus is None:
            if not self.host_cpus:
                raise HypervisorError(f"{self.name}: host CPU count unknown")
            host_cpus = self.host_cpus
        if not 0 <= vcpu < len(self.vcpu_pcpus):
            return False
        every = frozenset(range(host_cpus)) if isinstance(host_cpus, int) else host_cpus
        affinity = self.vcpu_pcpus[vcpu]
        return bool(affinity) and not every <= affinity


EventKind = Literal[
    "defined",
    "undefined",
    "started",
    "stopped",
    "paused",
    "resumed",
    "pinning",
    "connection_lost",
    "connection_restored",
]


@dataclass(frozen=True)
class VmEvent:
    """Something that happened, as returned by ``Hypervisor.process_events()``.

    ``vm`` is None for the connection events. ``detail`` is libvirt's reason in words
    ("booted", "destroyed", ...) or where vmpower learnt it ("refresh", "set_pcpu",
    "add_vm", "while disconnected", ...).
    """

    kind: EventKind
    vm: str | None
    detail: str


# libvirt lifecycle event → (our kind, names of libvirt's detail codes in order).
# SHUTDOWN (the guest finished shutting down) maps to None: STOPPED follows it.
_LIFECYCLE: dict[int, tuple[EventKind | None, tuple[str, ...]]] = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: (
        "defined",
        ("added", "updated", "renamed", "from_snapshot"),
    ),
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: ("undefined", ("removed", "renamed")),
    libvirt.VIR_DOMAIN_EVENT_STARTED: (
        "started",
        ("booted", "migrated", "restored", "from_snapshot", "wakeup"),
    ),
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: (
        "paused",
        (
            "paused",
            "migrated",
            "ioerror",
            "watchdog",
            "restored",
            "from_snapshot",
            "api_error",
            "postcopy",
            "postcopy_failed",
        ),
    ),
    libvirt.VIR_DOMAIN_EVENT_RESUMED: (
        "resumed",
        ("unpaused", "migrated", "from_snapshot", "postcopy"),
    ),
    libvirt.VIR_DOMAIN_EVENT_STOPPED: (
        "stopped",
        ("shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from_snapshot"),
    ),
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: (None, ("finished", "guest", "host")),
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: ("paused", ("pmsuspended_memory", "pmsuspended_disk")),
    libvirt.VIR_DOMAIN_EVENT_CRASHED: ("stopped", ("panicked", "crashloaded")),
}

_CLOSE_REASONS = ("error", "eof", "keepalive timeout", "client")


def _lifecycle_kind(event: int, detail: int) -> tuple[EventKind | None, str]:
    kind, names = _LIFECYCLE.get(event, (None, ()))
    return kind, names[detail] if 0 <= detail < len(names) else f"detail {detail}"


class _Raw(NamedTuple):
    """A libvirt callback's record, queued for the owner thread."""

    generation: int  # which connection it came from; older ones are ignored
    kind: Literal["lifecycle", "tunable", "close"]
    vm: str | None
    code: int  # lifecycle event, or close reason
    detail: int
    pinning: bool  # tunable event that carries cputune.vcpupin<N>


class _ConnectionLost(Exception):
    """Internal: a libvirt call failed and the connection turned out to be dead."""


class _EventLoop:
    """libvirt's default event loop implementation, run in one daemon thread.

    The event implementation is process-wide by libvirt's design: it must be registered once,
    before any connection that wants events is opened, and run by exactly one thread. That is
    why this is class state rather than per-Hypervisor state.
    """

    _lock = threading.Lock()
    _thread: threading.Thread | None = None

    @classmethod
    def ensure_running(cls) -> None:
        with cls._lock:
            if cls._thread is not None:
                return
            libvirt.virEventRegisterDefaultImpl()
            # libvirt's default error handler prints every error to stderr, including the
            # ones we expect and handle (a domain gone, a connection lost); the same message
            # reaches us in the libvirtError, so the printout is only noise.
            libvirt.registerErrorHandler(_ignore_libvirt_error, None)
            thread = threading.Thread(target=cls._run, name="libvirt-events", daemon=True)
            thread.start()
            cls._thread = thread

    @staticmethod
    def _run() -> None:
        while True:
            try:
                libvirt.virEventRunDefaultImpl()
            except libvirt.libvirtError as exc:
                log.warning("libvirt event loop: %s", exc)
                time.sleep(0.1)  # do not spin if the loop keeps failing


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    return None


def _code(exc: libvirt.libvirtError) -> int | None:
    return exc.get_error_code()


def _message(exc: libvirt.libvirtError) -> str:
    return exc.get_error_message() or str(exc)


def _cpumap_to_set(cpumap: Iterable[bool]) -> frozenset[int]:
    return frozenset(i for i, on in enumerate(cpumap) if on)


class Hypervisor:
    """The agent's view of libvirt: one connection, its events, and the VM registry.

    ``wake`` is called (from libvirt's thread too) whenever ``process_events()`` has
    something to do. ``clock`` is the owner's monotonic clock in seconds; every time this
    class reports (``map_read_at``, ``next_deadline()``) is on that clock.
    ``track_all`` False serves only the VMs named with ``add_vm()``.
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
        self._channels_dir = Path(channels_dir)
        self._wake = wake
        self._clock = clock
        self._reconnect_min_s = reconnect_min_s
        self._reconnect_max_s = reconnect_max_s
        self._map_refresh_s = map_refresh_s
        self._track_all = track_all

        self._lock = threading.RLock()
        self._queue: queue.SimpleQueue[_Raw] = queue.SimpleQueue()
        self._conn: libvirt.virConnect | None = None
        self._generation = 0
        self._callback_ids: list[int] = []
        self._vms: dict[str, VmInfo] = {}
        self._doms: dict[str, libvirt.virDomain] = {}
        self._ifaces: dict[str, tuple[str, ...]] = {}
        self._ignored: set[str] = set()
        self._added: set[str] = set()
        self._pending: list[VmEvent] = []
        self._host_cpus: int | None = None
        self._closed = False
        self._last_error: str | None = None
        self._reconnect_attempts = 0
        self._reconnects = 0
        self._retry_delay_s = reconnect_min_s
        self._next_retry_at: float | None = None

    # ------------------------------------------------------------------ connection

    @property
    def conn(self) -> libvirt.virConnect | None:
        """The live libvirt connection (None while disconnected)."""
        return self._conn

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def connect(self) -> None:
        """Open the connection, register event callbacks and read every VM.

        On failure raises HypervisorError with libvirt's message and leaves a retry
        scheduled: an owner that keeps calling ``poll()`` connects when libvirtd comes up.
        """
        with self._lock:
            if self._closed:
                raise HypervisorError("this Hypervisor was closed")
            if self._conn is not None:
                return
            _EventLoop.ensure_running()
            try:
                self._open()
            except HypervisorError as exc:
                self._last_error = str(exc)
                self._retry_delay_s = self._reconnect_min_s
                self._next_retry_at = self._clock() + self._retry_delay_s
                raise

    def close(self) -> None:
        """Drop the connection and stop reconnecting; the registry stays readable."""
        with self._lock:
            self._closed = True
            self._next_retry_at = None
            self._teardown()

    def _open(self) -> dict[str, VmInfo]:
        """Connect, register callbacks, read every VM; returns the registry it replaced."""
        try:
            conn = libvirt.open(self._uri)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot connect to {self._uri}: {_message(exc)}") from None
        self._generation += 1
        generation = self._generation
        ids: list[int] = []
        try:
            ids.append(
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, generation
                )
            )
            ids.append(
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_TUNABLE, self._on_tunable, generation
                )
            )
            try:
                conn.registerCloseCallback(self._on_close, generation)
            except libvirt.libvirtError as exc:
                # Only remote connections can be closed under us; others may refuse.
                if _code(exc) != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
            # Set before reading: every VmInfo records the host CPU count it was read with.
            self._host_cpus = conn.getCPUMap()[0]
            vms, doms, ifaces = self._read_all(conn)
        except libvirt.libvirtError as exc:
            self._teardown_conn(conn, ids)
            raise HypervisorError(f"{self._uri}: {_message(exc)}") from None
        old = self._vms
        self._conn = conn
        self._callback_ids = ids
        self._vms, self._doms, self._ifaces = vms, doms, ifaces
        self._next_retry_at = None
        log.info("connected to %s: %d VM(s) tracked", self._uri, len(vms))
        return old

    def _teardown(self) -> None:
        conn, ids = self._conn, self._callback_ids
        self._conn = None
        self._callback_ids = []
        self._doms = {}
        if conn is not None:
            self._teardown_conn(conn, ids)

    @staticmethod
    def _teardown_conn(conn: libvirt.virConnect, ids: list[int]) -> None:
        # Every step may fail on a dead connection (or one closed under us, whose handle is
        # gone); there is nothing left to undo then, so failures are ignored.
        for callback_id in ids:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(callback_id)
        with contextlib.suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    def _alive(self) -> bool:
        conn = self._conn
        if conn is None:
            return False
        try:
            return conn.isAlive() == 1
        except libvirt.libvirtError:
            return False

    def _check_lost(self, exc: libvirt.libvirtError) -> None:
        """After a failed call: raise _ConnectionLost if the connection died under it."""
        if not self._alive():
            raise _ConnectionLost(_message(exc))

    def _lose(self, reason: str) -> list[VmEvent]:
        """Mark the connection lost; the registry stays as last known; schedule a retry."""
        log.warning("lost libvirt connection %s: %s", self._uri, reason)
        self._teardown()
        self._last_error = reason
        self._reconnect_attempts = 0
        self._retry_delay_s = self._reconnect_min_s
        self._next_retry_at = self._clock() + self._retry_delay_s
        return [VmEvent("connection_lost", None, reason)]

    def _note_lost(self, reason: str) -> None:
        """Connection loss found outside process_events(): report it on the next call."""
        if self._conn is not None:
            self._pending.extend(self._lose(reason))
            self._wake()

    def _require_connection(self) -> libvirt.virConnect:
        """The connection, checked alive first (a local check, no round trip)."""
        if self._conn is not None and not self._alive():
            self._note_lost("connection is no longer alive")
        if self._conn is None:
            raise HypervisorError(
                f"not connected to {self._uri}"
                + (f" (last error: {self._last_error})" if self._last_error else "")
            )
        return self._conn

    def _try_reconnect(self) -> list[VmEvent]:
        attempt = self._reconnect_attempts + 1
        try:
            old = self._open()
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
            return []
        self._reconnects += 1
        self._reconnect_attempts = 0
        self._retry_delay_s = self._reconnect_min_s
        events = [VmEvent("connection_restored", None, f"after {attempt} attempt(s)")]
        # Lifecycle events that happened while disconnected are lost; tell what changed.
        return events + _diff(old, self._vms, "while disconnected")

    def next_deadline(self) -> float | None:
        """When (on the owner's clock) ``poll()`` should next be called; None: on wake only."""
        with self._lock:
            return None if self._closed else self._next_retry_at

    # ------------------------------------------------------------------ callbacks
    # These run on libvirt's event thread: they only enqueue and wake, never touch state.

    def _on_lifecycle(
        self,
        _conn: libvirt.virConnect,
        dom: libvirt.virDomain,
        event: int,
        detail: int,
        generation: int,
    ) -> None:
        try:
            self._queue.put(_Raw(generation, "lifecycle", dom.name(), event, detail, False))
            self._wake()
        except Exception:  # an exception here would be lost in libvirt's C code
            log.exception("libvirt lifecycle callback")

    def _on_tunable(
        self,
        _conn: libvirt.virConnect,
        dom: libvirt.virDomain,
        params: dict[str, Any],
        generation: int,
    ) -> None:
        try:
            # VIR_DOMAIN_TUNABLE_CPU_VCPUPIN is "cputune.vcpupin%u"; other tunables (shares,
            # emulator/iothread pinning, block I/O) do not move vCPUs.
            pinning = any(str(key).startswith("cputune.vcpupin") for key in params)
            self._queue.put(_Raw(generation, "tunable", dom.name(), 0, 0, pinning))
            self._wake()
        except Exception:
            log.exception("libvirt tunable callback")

    def _on_close(self, _conn: libvirt.virConnect, reason: int, generation: int) -> None:
        try:
            self._queue.put(_Raw(generation, "close", None, reason, 0, False))
            self._wake()
        except Exception:
            log.exception("libvirt close callback")

    # ------------------------------------------------------------------ event processing

    def process_events(self) -> list[VmEvent]:
        """Apply what libvirt reported since the last call; reconnect when due.

        Called by the owner thread, on wake and at ``next_deadline()``. Never raises: a
        failure is logged and kept in ``status()["last_error"]``.
        """
        out: list[VmEvent] = []
        try:
            with self._lock:
                self._process(out)
        except Exception as exc:  # the monitor loop must survive anything libvirt does
            log.exception("processing libvirt events")
            self._last_error = f"processing events: {exc}"
        return out

    poll = process_events

    def _process(self, out: list[VmEvent]) -> None:
        """Append to ``out`` as it goes, so that a failure keeps what was already done."""
        out += self._pending
        self._pending = []
        raws: list[_Raw] = []
        while True:
            try:
                raws.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if self._closed:
            return
        if self._conn is not None:
            current = [r for r in raws if r.generation == self._generation]
            closed = [r for r in current if r.kind == "close"]
            if closed:
                reason = closed[0].code
                words = _CLOSE_REASONS[reason] if 0 <= reason < len(_CLOSE_REASONS) else reason
                out += self._lose(f"connection closed by libvirt ({words})")
            elif not self._alive():
                out += self._lose("connection is no longer alive")
            else:
                try:
                    out += self._apply(current)
                except _ConnectionLost as exc:
                    out += self._lose(str(exc))
        if (
            self._conn is None
            and self._next_retry_at is not None
            and self._clock() >= self._next_retry_at
        ):
            out += self._try_reconnect()

    def _apply(self, raws: list[_Raw]) -> list[VmEvent]:
        events: list[VmEvent] = []
        touched: dict[str, None] = {}  # ordered set
        for raw in raws:
            name = raw.vm
            if name is None or not self._wants(name):
                continue
            if raw.kind == "lifecycle":
                kind, detail = _lifecycle_kind(raw.code, raw.detail)
                if kind is not None:
                    events.append(VmEvent(kind, name, detail))
            elif raw.kind == "tunable" and raw.pinning:
                events.append(VmEvent("pinning", name, "libvirt"))
            touched[name] = None
        for name in touched:
            before = self._vms.get(name)
            mine = [e.kind for e in events if e.vm == name]
            if not self._reread(name, announce=False):
                # A transient domain vanishes when it stops, with no UNDEFINED event.
                if not mine or mine[-1] != "undefined":
                    events.append(VmEvent("undefined", name, "gone"))
                continue
            after = self._vms[name]
            if (
                before is not None
                and before.active
                and after.active
                and before.vcpu_pcpus != after.vcpu_pcpus
                and "pinning" not in mine
            ):
                events.append(VmEvent("pinning", name, "refresh"))
        return events

    # ------------------------------------------------------------------ reading libvirt

    def _wants(self, name: str) -> bool:
        if name in self._ignored:
            return False
        return self._track_all or name in self._added

    def _read_all(
        self, conn: libvirt.virConnect
    ) -> tuple[dict[str, VmInfo], dict[str, libvirt.virDomain], dict[str, tuple[str, ...]]]:
        vms: dict[str, VmInfo] = {}
        doms: dict[str, libvirt.virDomain] = {}
        ifaces: dict[str, tuple[str, ...]] = {}
        sockets = self._scan_dir()
        for dom in conn.listAllDomains(0):
            name = dom.name()
            if not self._wants(name):
                continue
            try:
                info, nics = self._read_domain(dom, name, sockets.get(name, {}))
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                    continue  # undefined while we were listing
                raise
            vms[name], doms[name], ifaces[name] = info, dom, nics
        return vms, doms, ifaces

    def _reread(self, name: str, *, announce: bool = True) -> bool:
        """Re-read one VM into the registry; False (and dropped) when libvirt lost it.

        ``announce``: queue a "pinning" event for the next process_events() when the map
        changed (process_events() itself reports such changes inline instead).
        """
        conn = self._conn
        assert conn is not None
        try:
            dom = conn.lookupByName(name)
            info, nics = self._read_domain(dom, name, self._scan_dir().get(name, {}))
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                self._drop(name)
                return False
            self._check_lost(exc)
            log.warning("re-reading VM %s: %s", name, _message(exc))
            self._last_error = f"{name}: {_message(exc)}"
            return name in self._vms
        self._store(info, dom, nics, announce=announce)
        return True

    def _store(
        self, info: VmInfo, dom: libvirt.virDomain, nics: tuple[str, ...], *, announce: bool
    ) -> None:
        old = self._vms.get(info.name)
        self._vms[info.name] = info
        self._doms[info.name] = dom
        self._ifaces[info.name] = nics
        if (
            announce
            and old is not None
            and old.active
            and info.active
            and old.vcpu_pcpus != info.vcpu_pcpus
        ):
            self._queue_pinning(info.name, "refresh")

    def _queue_pinning(self, name: str, detail: str) -> None:
        self._pending.append(VmEvent("pinning", name, detail))
        self._wake()

    def _drop(self, name: str) -> None:
        self._vms.pop(name, None)
        self._doms.pop(name, None)
        self._ifaces.pop(name, None)

    def _read_domain(
        self, dom: libvirt.virDomain, name: str, dir_sockets: dict[int, str]
    ) -> tuple[VmInfo, tuple[str, ...]]:
        state_code, _max_mem, _mem, vcpu_count, _cpu_time = dom.info()
        state = _STATES.get(state_code, VmState.OTHER)
        pcpus: tuple[frozenset[int], ...] = ()
        channels: tuple[ChannelInfo, ...] = ()
        nics: tuple[str, ...] = ()
        if state is not VmState.SHUTOFF:
            try:
                pcpus = self._read_map(dom, vcpu_count)
            except libvirt.libvirtError as exc:
                # Not active (e.g. crashed and not preserved): no live map to read.
                if _code(exc) != libvirt.VIR_ERR_OPERATION_INVALID:
                    raise
        if pcpus:
            channels, nics = _parse_devices(name, dom.XMLDesc(0), dir_sockets)
        info = VmInfo(
            name=name,
            uuid=dom.UUIDString(),
            state=state,
            vcpu_count=vcpu_count,
            vcpu_pcpus=pcpus,
            channels=channels,
            map_read_at=self._clock(),
            host_cpus=self._host_cpus or 0,
        )
        return info, nics

    @staticmethod
    def _read_map(dom: libvirt.virDomain, vcpu_count: int) -> tuple[frozenset[int], ...]:
        # The live pinning as libvirt keeps it; an unpinned vCPU shows every host CPU.
        # QEMU answers for every possible vCPU (maxvcpus); the guest's online vCPUs are the
        # first vcpu_count of them when hot-plugged in order.
        maps = dom.vcpuPinInfo(libvirt.VIR_DOMAIN_AFFECT_LIVE)
        return tuple(_cpumap_to_set(m) for m in maps[:vcpu_count])

    def _scan_dir(self) -> dict[str, dict[int, str]]:
        """Sockets ``<vm>.<n>`` in the channels directory, as {vm: {n: path}}."""
        found: dict[str, dict[int, str]] = {}
        try:
            entries = list(os.scandir(self._channels_dir))
        except OSError:
            return found  # no directory yet: no channel there
        for entry in entries:
            match = _SOCKET_NAME.fullmatch(entry.name)
            if match is None:
                continue  # e.g. the host FIFOs fifo<N>: not VM channels
            try:
                if not stat.S_ISSOCK(os.stat(entry.path).st_mode):
                    continue
            except OSError:
                continue
            found.setdefault(match.group(1), {})[int(match.group(2))] = entry.path
        return found

    # ------------------------------------------------------------------ registry API

    def vms(self) -> dict[str, VmInfo]:
        """Every tracked VM (the last known state while disconnected)."""
        with self._lock:
            return dict(self._vms)

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

    def refresh(self, name: str | None = None) -> None:
        """Re-read the map and channels of one VM (or of every VM) now."""
        with self._lock:
            conn = self._require_connection()
            try:
                if name is None:
                    vms, doms, ifaces = self._read_all(conn)
                    for gone in set(self._vms) - set(vms):
                        self._drop(gone)
                    for vm_name, info in vms.items():
                        self._store(info, doms[vm_name], ifaces[vm_name], announce=True)
                    return
                self._get(name)
                if not self._reread(name):
                    raise UnknownVmError(f"VM {name!r} no longer exists")
            except libvirt.libvirtError as exc:
                raise self._failure(exc, "refresh") from None
            except _ConnectionLost as exc:
                self._note_lost(str(exc))
                raise HypervisorError(f"lost connection to {self._uri}: {exc}") from None

    def ensure_fresh(self, name: str) -> VmInfo:
        """The VM's info, its map re-read first if older than ``map_refresh_s``.

        The request path calls this: when fresh it is a dictionary look-up. While
        disconnected it returns the last known info.
        """
        with self._lock:
            info = self._get(name)
            now = self._clock()
            if self._conn is None or now - info.map_read_at < self._map_refresh_s:
                return info
            # Domain handles keep their connection's C object referenced, so calls on them
            # can still answer after the connection itself was closed: check it first.
            if not self._alive():
                self._note_lost("connection is no longer alive")
                return info
            try:
                return self._refresh_map(info)
            except _ConnectionLost as exc:
                self._note_lost(str(exc))
                return self._vms.get(name, info)

    def _refresh_map(self, info: VmInfo) -> VmInfo:
        name = info.name
        dom = self._doms.get(name)
        if info.active and dom is not None:
            try:
                pcpus = self._read_map(dom, info.vcpu_count)
            except libvirt.libvirtError as exc:
                if _code(exc) not in (
                    libvirt.VIR_ERR_OPERATION_INVALID,  # stopped; its event is on the way
                    libvirt.VIR_ERR_NO_DOMAIN,
                ):
                    self._check_lost(exc)
                    self._last_error = f"{name}: {_message(exc)}"
                    log.warning("re-reading the vCPU map of %s: %s", name, _message(exc))
                    return info
            else:
                if pcpus:
                    new = dataclasses.replace(info, vcpu_pcpus=pcpus, map_read_at=self._clock())
                    self._vms[name] = new
                    if pcpus != info.vcpu_pcpus:
                        self._queue_pinning(name, "refresh")
                    return new
        # Not active (or no longer): read the whole VM, its state has changed or may have.
        if not self._reread(name):
            raise UnknownVmError(f"VM {name!r} no longer exists")
        return self._vms[name]

    def _failure(self, exc: libvirt.libvirtError, what: str) -> HypervisorError:
        """The error to raise for a failed call; notes a connection loss if that was it."""
        if not self._alive():
            self._note_lost(_message(exc))
            return HypervisorError(f"lost connection to {self._uri}: {_message(exc)}")
        return HypervisorError(f"{what}: {_message(exc)}")

    def add_vm(self, name: str) -> VmInfo:
        """Track ``name`` again (after ``remove_vm``, or with track_all off)."""
        with self._lock:
            conn = self._require_connection()
            if name in self._vms:
                return self._vms[name]
            try:
                conn.lookupByName(name)
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                    raise UnknownVmError(f"libvirt knows no VM named {name!r}") from None
                raise self._failure(exc, f"add_vm {name}") from None
            self._ignored.discard(name)
            self._added.add(name)
            try:
                if not self._reread(name):
                    raise UnknownVmError(f"libvirt knows no VM named {name!r}")
            except _ConnectionLost as exc:
                self._note_lost(str(exc))
                raise HypervisorError(f"lost connection to {self._uri}: {exc}") from None
            self._pending.append(VmEvent("defined", name, "add_vm"))
            self._wake()
            return self._vms[name]

    def remove_vm(self, name: str) -> None:
        """Ignore ``name`` (no map, no channels, no events) until ``add_vm(name)``."""
        with self._lock:
            self._get(name)
            self._ignored.add(name)
            self._added.discard(name)
            self._drop(name)
            self._pending.append(VmEvent("undefined", name, "remove_vm"))
            self._wake()

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
            self._require_connection()
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
            dom = self._doms[vm]
            cpumap = tuple(cpu in wanted for cpu in range(host_cpus))
            try:
                dom.pinVcpu(vcpu, cpumap)
                try:
                    pcpus = self._read_map(dom, info.vcpu_count)
                except libvirt.libvirtError:
                    pcpus = ()
            except libvirt.libvirtError as exc:
                raise self._failure(
                    exc, f"pinning {vm} vCPU {vcpu} to {format_cpu_list(wanted)}"
                ) from None
            if not pcpus:  # could not read it back: trust what libvirt accepted
                pcpus = tuple(wanted if i == vcpu else s for i, s in enumerate(info.vcpu_pcpus))
            new = dataclasses.replace(info, vcpu_pcpus=pcpus, map_read_at=self._clock())
            self._vms[vm] = new
            self._queue_pinning(vm, "set_pcpu")
            return new

    def _live_domain(self, vm: str) -> libvirt.virDomain:
        with self._lock:
            info = self._get(vm)
            self._require_connection()
            if not info.active:
                raise HypervisorError(f"{vm} is not running ({info.state.value})")
            return self._doms[vm]

    def interface_stats(self, vm: str) -> tuple[int, int]:
        """(rx_packets, tx_packets) summed over every NIC of the VM (0, 0 without NICs)."""
        dom = self._live_domain(vm)
        with self._lock:
            nics = self._ifaces.get(vm, ())
        rx_packets = tx_packets = 0
        for nic in nics:
            try:
                stats = dom.interfaceStats(nic)
            except libvirt.libvirtError as exc:
                with self._lock:
                    raise self._failure(exc, f"{vm} NIC {nic} statistics") from None
            # virDomainInterfaceStats: a counter the hypervisor does not keep reads -1.
            rx_packets += max(stats[1], 0)
            tx_packets += max(stats[5], 0)
        return rx_packets, tx_packets

    def vcpu_time_s(self, vm: str) -> float:
        """CPU time all vCPUs of the VM have used, in seconds."""
        dom = self._live_domain(vm)
        try:
            infos, _maps = dom.vcpus()
        except libvirt.libvirtError as exc:
            with self._lock:
                raise self._failure(exc, f"{vm} vCPU times") from None
        # virVcpuInfo.cpuTime is in nanoseconds.
        return sum(cpu_time_ns for _n, _state, cpu_time_ns, _cpu in infos) / 1e9

    def status(self) -> dict[str, Any]:
        """What the operator sees of the libvirt side."""
        with self._lock:
            last_read = max((i.map_read_at for i in self._vms.values()), default=None)
            return {
                "uri": self._uri,
                "connected": self._conn is not None,
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


def _parse_devices(
    name: str, xml: str, dir_sockets: dict[int, str]
) -> tuple[tuple[ChannelInfo, ...], tuple[str, ...]]:
    """Power channels and NICs from a domain's live XML, channels merged with the dir scan."""
    by_index: dict[int, ChannelInfo] = {}
    nics: list[str] = []
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        log.warning(
            "VM %s: unreadable domain XML (%s); only the channels directory used", name, exc
        )
        root = None
    if root is not None:
        for channel in root.iterfind("./devices/channel"):
            target, source = channel.find("target"), channel.find("source")
            if channel.get("type") != "unix" or target is None or source is None:
                continue
            match = _PORT_NAME.fullmatch(target.get("name", ""))
            if target.get("type") != "virtio" or match is None:
                continue
            path = source.get("path")
            # QEMU must be the socket's server (mode='bind', libvirt's default): the agent
            # is the client (PROTOCOL.md, Transport).
            if not path or source.get("mode", "bind") != "bind":
                continue
            index = int(match.group(1))
            if index in by_index:
                log.warning(
                    "VM %s lists power channel %d twice; using %s",
                    name,
                    index,
                    by_index[index].path,
                )
                continue
            by_index[index] = ChannelInfo(name, index, path, "xml")
        for nic in root.iterfind("./devices/interface"):
            target, mac = nic.find("target"), nic.find("mac")
            # interfaceStats takes the host-side device name, or the MAC address for NICs
            # that have none (vhost-user).
            if target is not None and target.get("dev"):
                nics.append(target.get("dev", ""))
            elif mac is not None and mac.get("address"):
                nics.append(mac.get("address", ""))
    xml_paths = {c.path for c in by_index.values()}
    for index, path in dir_sockets.items():
        if index not in by_index and path not in xml_paths:
            by_index[index] = ChannelInfo(name, index, path, "dir")
    return tuple(by_index[i] for i in sorted(by_index)), tuple(nics)


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
