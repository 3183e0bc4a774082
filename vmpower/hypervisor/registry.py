"""class Hypervisor: the agent's one libvirt connection and the VM registry read through it.

This module owns:

* the connection, with reconnection (exponential backoff on the owner's clock) when
  libvirtd goes away, and the diff of the registry across a reconnect;
* the VM registry: every tracked domain's state, vCPU count, live vCPU→host-CPU affinity
  (the "map", docs/protocol.md, host rule 6) and power channels; ``refresh()``, ``ensure_fresh()``,
  ``add_vm()``/``remove_vm()``;
* the few per-VM libvirt calls other modules need (pinning, NIC counters).

The owner thread (the daemon's monitor loop) calls ``process_events()`` to apply what
libvirt's thread queued (libvirt_events.py); it is the only writer of the registry. A lock
still guards the registry so that readers on other threads (telemetry, policies) see whole
snapshots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import libvirt

from vmpower.cpuset import format_cpu_list
from vmpower.errors import HypervisorError, UnknownVmError
from vmpower.hypervisor.domain_xml import parse_devices, scan_channels_dir
from vmpower.hypervisor.libvirt_events import (
    EventInbox,
    EventLoop,
    RawEvent,
    close_reason,
    lifecycle_kind,
)
from vmpower.hypervisor.model import ChannelInfo, VmEvent, VmInfo, VmState

log = logging.getLogger(__name__)

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


class _ConnectionLost(Exception):
    """Internal: a libvirt call failed and the connection turned out to be dead."""


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
        self._events = EventInbox(wake)
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

    def connect(self) -> None:
        """Open the connection, register event callbacks and read every VM.

        On failure raises HypervisorError with libvirt's message and leaves a retry
        scheduled: an owner that keeps calling ``process_events()`` connects when libvirtd comes up.
        """
        with self._lock:
            if self._closed:
                raise HypervisorError("this Hypervisor was closed")
            if self._conn is not None:
                return
            EventLoop.ensure_running()
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
            self._events.register(conn, generation, ids)
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
        EventInbox.unregister(conn, ids)
        # Fails only on a connection already dead or closed under us: nothing to undo then.
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
        """When (on the owner's clock) ``process_events()`` should next be called.

        None: on wake only.
        """
        with self._lock:
            return None if self._closed else self._next_retry_at

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

    def _process(self, out: list[VmEvent]) -> None:
        """Append to ``out`` as it goes, so that a failure keeps what was already done."""
        out += self._pending
        self._pending = []
        raws = self._events.drain()
        if self._closed:
            return
        if self._conn is not None:
            current = [r for r in raws if r.generation == self._generation]
            closed = [r for r in current if r.kind == "close"]
            if closed:
                words = close_reason(closed[0].code)
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

    def _apply(self, raws: list[RawEvent]) -> list[VmEvent]:
        events: list[VmEvent] = []
        touched: dict[str, None] = {}  # ordered set
        for raw in raws:
            name = raw.vm
            if name is None or not self._wants(name):
                continue
            if raw.kind == "lifecycle":
                kind, detail = lifecycle_kind(raw.code, raw.detail)
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
        sockets = scan_channels_dir(self._channels_dir)
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
            sockets = scan_channels_dir(self._channels_dir).get(name, {})
            info, nics = self._read_domain(dom, name, sockets)
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
            channels, nics = parse_devices(name, dom.XMLDesc(0), dir_sockets)
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
