"""class LibvirtSession: the libvirt connection and every call made on it.

Threads: the session's methods run on the libvirt worker thread only (worker.py), one at
a time, never on the monitor thread: a libvirt call can hang for as long as libvirtd
does (SIGSTOPped, deadlocked, swapping), and the monitor thread must keep serving guests
meanwhile (issue #11, point 4). They return plain data (``VmRead``, CPU sets, counters)
that the owner applies to the registry (registry.py); nothing here touches the registry.
The connection and the domain handles are this object's own state.

Errors: a failed call raises ``HypervisorError`` with libvirt's message, or
``ConnectionLost`` when the connection turned out to be dead (the owner then reconnects).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import libvirt

from vmpower.cpuset import format_cpu_list
from vmpower.errors import HypervisorError, UnknownVmError
from vmpower.hypervisor.domain_xml import (
    DomainXml,
    every_cpu,
    parse_domain,
    pins_from_xml,
    scan_channels_dir,
)
from vmpower.hypervisor.libvirt_events import EventInbox
from vmpower.hypervisor.model import CPU_NOT_REPORTED, ChannelInfo, VmInfo, VmState

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


# Reading every domain (start-up, reconnect, refresh): the live XMLs are asked this many
# at a time. Behind libvirtd a call is mostly waiting (its worker threads, five by
# default, answer them in parallel): measured at 1000 domains on 2 CPUs, 330 us a
# domain one at a time, 140 us four at a time (issue #16). Below _XML_READERS_FROM
# domains, threads cost more than they save.
_XML_READERS = 4
_XML_READERS_FROM = 16


class ConnectionLost(HypervisorError):
    """A libvirt call failed and the connection turned out to be dead."""


@dataclass(frozen=True)
class VmRead:
    """One domain as read from libvirt: its info and its NICs' target devices."""

    info: VmInfo
    nics: tuple[str, ...]


@dataclass(frozen=True)
class VcpuTimes:
    """Per running VM, per vCPU: (CPU time used in s, host CPU, or CPU_NOT_REPORTED);
    read at ``read_at`` s."""

    vms: dict[str, tuple[tuple[float, int], ...]]
    read_at: float


@dataclass(frozen=True)
class Opened:
    """What a successful ``open()`` read: the connection's generation, host size, VMs."""

    generation: int
    host_cpus: int
    vms: dict[str, VmRead]


def _code(exc: libvirt.libvirtError) -> int | None:
    return exc.get_error_code()


def _message(exc: libvirt.libvirtError) -> str:
    return exc.get_error_message() or str(exc)


def _cpumap_to_set(cpumap: Iterable[bool]) -> frozenset[int]:
    # itertools.compress: at C speed (a generator was ~11 us per vCPU on a 256-CPU
    # host, 0.2 s of start-up at 4000 VMs and a cost of every map re-read: issue #16).
    flags = tuple(cpumap)
    return frozenset(itertools.compress(range(len(flags)), flags))


# What a live XML's pins were parsed from (``_xml_key``). The same key gives the same pins.
_XmlKey = tuple[bytes, int]
# A live XML read ahead by ``_describe_all``: when, what it gave (or the exception its
# read raised), and the parse's ``_XmlKey`` (None with an exception).
_Described = tuple[float, DomainXml | Exception, _XmlKey | None]


def _xml_key(xml: str, host_cpus: int) -> _XmlKey:
    """A live XML parsed for a host of ``host_cpus`` CPUs (pins are cut to them), as
    ``_live_map`` compares it: 128 bits of BLAKE2b of the text (~3 us for a domain's
    XML, against ~50-140 us to parse it) and the count."""
    return hashlib.blake2b(xml.encode(), digest_size=16).digest(), host_cpus


class LibvirtSession:
    """The one libvirt connection; every method runs on the worker thread."""

    def __init__(
        self,
        uri: str,
        channels_dir: Path,
        events: EventInbox,
        clock: Callable[[], float],
    ) -> None:
        self.uri = uri
        self._channels_dir = channels_dir
        self._events = events
        self._clock = clock
        self._conn: libvirt.virConnect | None = None
        self._callback_ids: list[int] = []
        self._doms: dict[str, libvirt.virDomain] = {}
        # Per VM, for ``_live_map``: the last live XML parsed (by a full read or a map
        # re-read) as its ``_XmlKey``, and the pins that parse gave.
        self._map_xml: dict[str, tuple[_XmlKey, tuple[frozenset[int], ...] | None]] = {}
        self._generation = 0
        self._host_cpus = 0
        self._online_cpus: frozenset[int] = frozenset()
        self.state_listings_unsupported = 0  # getAllDomainStats refused: info() per VM

    @property
    def conn(self) -> libvirt.virConnect | None:
        """The live connection (tests drive lifecycles through it; libvirt is thread-safe)."""
        return self._conn

    # -- connection ----------------------------------------------------------------------

    def open(self, wants: Callable[[str], bool]) -> Opened:
        """Connect, register the event callbacks, read every VM ``wants``."""
        self.close()
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot connect to {self.uri}: {_message(exc)}") from None
        self._generation += 1
        ids: list[int] = []
        try:
            self._events.register(conn, self._generation, ids)
            # Set before reading: every VmInfo records the host CPU count it was read with.
            self._read_host_cpus(conn)
            self._conn, self._callback_ids, self._doms = conn, ids, {}
            self._map_xml = {}
            vms = self.read_all(wants)
        except libvirt.libvirtError as exc:
            self._conn = None
            self._teardown(conn, ids)
            raise HypervisorError(f"{self.uri}: {_message(exc)}") from None
        return Opened(self._generation, self._host_cpus, vms)

    def close(self) -> None:
        """Drop the connection (unregister callbacks, close); never raises."""
        conn, ids = self._conn, self._callback_ids
        self._conn, self._callback_ids, self._doms = None, [], {}
        self._map_xml = {}
        if conn is not None:
            self._teardown(conn, ids)

    @staticmethod
    def _teardown(conn: libvirt.virConnect, ids: list[int]) -> None:
        EventInbox.unregister(conn, ids)
        # Fails only on a connection already dead or closed under us: nothing to undo then.
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    def alive(self) -> bool:
        conn = self._conn
        if conn is None:
            return False
        try:
            return conn.isAlive() == 1
        except libvirt.libvirtError:
            return False

    def ping(self) -> None:
        """One round trip to libvirtd: raises ConnectionLost when the connection is dead.

        isAlive() is a local check; getLibVersion() is answered by the daemon on a remote
        connection, so a hung libvirtd shows as a ping that does not return.
        """
        conn = self._require()
        try:
            conn.getLibVersion()
        except libvirt.libvirtError as exc:
            self._raise_if_lost(exc)
        if not self.alive():
            raise ConnectionLost("connection is no longer alive")

    def _require(self) -> libvirt.virConnect:
        conn = self._conn
        if conn is None:
            raise ConnectionLost("not connected")
        # Domain handles keep their connection's C object referenced, so calls on them
        # can still answer after the connection itself was closed: check it first.
        if not self.alive():
            raise ConnectionLost("connection is no longer alive")
        return conn

    def _raise_if_lost(self, exc: libvirt.libvirtError) -> None:
        if not self.alive():
            raise ConnectionLost(_message(exc)) from None

    # -- reading -------------------------------------------------------------------------

    def read_all(self, wants: Callable[[str], bool]) -> dict[str, VmRead]:
        """Every domain ``wants``; raises libvirtError (the caller decides what it means).

        The domains and their states come in one call (``getAllDomainStats``), not one
        ``info()`` each, and a running domain's pins come from its live XML: it then
        costs one round trip to libvirtd (XMLDesc), not four (and vcpuPinInfo, which
        the bindings make three: host CPU map, info, pins). The XMLs are read several
        at a time (``_describe_all``). Issue #16.
        """
        conn = self._conn
        assert conn is not None
        vms: dict[str, VmRead] = {}
        sockets = scan_channels_dir(self._channels_dir)
        listed = [
            (dom, name, state_code)
            for dom, state_code in self._list_with_states(conn)
            if wants(name := dom.name())
        ]
        running = [
            (dom, name, sockets.get(name, {}))
            for dom, name, state_code in listed
            if state_code is not None and _STATES.get(state_code) is not VmState.SHUTOFF
        ]
        described = self._describe_all(running)
        for dom, name, state_code in listed:
            try:
                vms[name] = self._read_domain(
                    dom, name, sockets.get(name, {}), state_code, described.get(name)
                )
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                    continue  # undefined while we were listing
                raise
            self._doms[name] = dom
        # Only the domains just read keep a handle and a remembered XML: what rm_vm
        # left out, or libvirt undefined unseen, goes (bounded by libvirt's domains).
        self._doms = {n: dom for n, dom in self._doms.items() if n in vms}
        self._map_xml = {n: known for n, known in self._map_xml.items() if n in vms}
        return vms

    def _describe_all(
        self, running: Sequence[tuple[libvirt.virDomain, str, dict[int, str]]]
    ) -> dict[str, _Described]:
        """Each running domain's live XML, read ``_XML_READERS`` at a time and parsed:
        name → (when it was read, DomainXml or the exception its read raised, which
        ``_read_domain`` raises in order, and the parse's ``_XmlKey``). The threads
        only call libvirt, the clock and the parser; they are joined here, so the
        session's state stays the worker thread's."""
        out: dict[str, _Described] = {}
        if len(running) < _XML_READERS_FROM:
            return out  # read one by one in _read_domain
        work = iter(running)
        lock = threading.Lock()
        host_cpus, clock = self._host_cpus, self._clock

        def reader() -> None:
            while True:
                with lock:
                    item = next(work, None)
                if item is None:
                    return
                dom, name, dir_sockets = item
                read_at = clock()  # the map's age counts from its read, not the batch's end
                try:
                    xml = dom.XMLDesc(0)
                    facts = parse_domain(name, xml, dir_sockets, host_cpus)
                    out[name] = (read_at, facts, _xml_key(xml, host_cpus))
                except Exception as exc:  # raised in order by _read_domain, on the caller
                    out[name] = (read_at, exc, None)

        # Daemon threads: a call that hangs (libvirtd stopped) must not hold the
        # process's exit; the worker thread that waits here is abandoned the same way.
        readers = [
            threading.Thread(target=reader, name="libvirt-xml", daemon=True)
            for _ in range(_XML_READERS)
        ]
        for thread in readers:
            thread.start()
        for thread in readers:
            thread.join()
        return out

    def _list_with_states(
        self, conn: libvirt.virConnect
    ) -> list[tuple[libvirt.virDomain, int | None]]:
        """Every domain with its state code (None: unknown, each domain asked apart)."""
        try:
            stats = conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE, 0)
        except libvirt.libvirtError as exc:
            if _code(exc) not in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED):
                raise
            self.state_listings_unsupported += 1
            return [(dom, None) for dom in conn.listAllDomains(0)]
        return [(dom, fields.get("state.state")) for dom, fields in stats]

    def refresh_all(self, wants: Callable[[str], bool]) -> dict[str, VmRead]:
        """``read_all`` for the owner: HypervisorError or ConnectionLost on failure."""
        self._require()
        try:
            return self.read_all(wants)
        except libvirt.libvirtError as exc:
            self._raise_if_lost(exc)
            raise HypervisorError(f"refresh: {_message(exc)}") from None

    def dir_sockets(self, name: str) -> dict[str, dict[int, str]]:
        """``name``'s sockets in the channels directory, as ``read_vms`` takes them. No
        libvirt call: the owner thread looks them up (``Hypervisor.add_vm_start``)."""
        return {name: scan_channels_dir(self._channels_dir).get(name, {})}

    def read_vms(
        self, names: Iterable[str], dir_sockets: Mapping[str, dict[int, str]] | None = None
    ) -> dict[str, VmRead | str | None]:
        """Each VM read afresh: a VmRead, None when libvirt no longer has it, or the error.
        ``dir_sockets``: each VM's sockets in the channels directory, when the caller
        has looked them up already (else they are looked up here)."""
        conn = self._require()
        sockets = scan_channels_dir(self._channels_dir) if dir_sockets is None else dir_sockets
        out: dict[str, VmRead | str | None] = {}
        for name in names:
            try:
                dom = conn.lookupByName(name)
                out[name] = self._read_domain(dom, name, sockets.get(name, {}))
                self._doms[name] = dom
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                    self._doms.pop(name, None)
                    self._map_xml.pop(name, None)
                    out[name] = None
                    continue
                self._raise_if_lost(exc)
                log.warning("re-reading VM %s: %s", name, _message(exc))
                out[name] = f"{name}: {_message(exc)}"
        return out

    def read_map(self, info: VmInfo) -> tuple[frozenset[int], ...] | VmRead | str | None:
        """The live map of a running VM; the whole VM (or None, gone) when it stopped.

        A str is an error that leaves the last known map in place.
        """
        self._require()
        dom = self._doms.get(info.name)
        if info.active and dom is not None:
            try:
                pcpus = self._live_map(dom, info)
            except libvirt.libvirtError as exc:
                if _code(exc) not in (
                    libvirt.VIR_ERR_OPERATION_INVALID,  # stopped; its event is on the way
                    libvirt.VIR_ERR_NO_DOMAIN,
                ):
                    self._raise_if_lost(exc)
                    log.warning("re-reading the vCPU map of %s: %s", info.name, _message(exc))
                    return f"{info.name}: {_message(exc)}"
            else:
                if pcpus:
                    return pcpus
        # Not active (or no longer): read the whole VM, its state has changed or may have.
        return self.read_vms([info.name])[info.name]

    def _live_map(self, dom: libvirt.virDomain, info: VmInfo) -> tuple[frozenset[int], ...]:
        """A running VM's pins from its live XML: one round trip to libvirtd, where
        vcpuPinInfo with the online CPUs is four. libvirt's API answers where the XML
        cannot say (placement='auto'; a definition no longer running, which then raises).
        () when its vCPU count changed: the whole VM is read again."""
        xml = dom.XMLDesc(0)
        # A live XML identical to the last one parsed for this VM gives the same pins
        # (pins_from_xml is a function of the text and the host CPU count): their key
        # is compared, not the text parsed again. At 1000 busy VMs the re-reads run at
        # their cap (MAP_REREADS_PER_S), mostly on unchanged XMLs, and the parse was
        # over half of each one's CPU (140 of 260 us), all of it holding the
        # interpreter lock the monitor loop serves guests with (issue #16).
        key = _xml_key(xml, self._host_cpus)
        known = self._map_xml.get(info.name)
        if known is not None and known[0] == key:
            pins = known[1]
        else:
            pins = pins_from_xml(xml, self._host_cpus)
            self._map_xml[info.name] = (key, pins)
        if pins is None:
            return self._vcpu_map(dom, info.vcpu_count)
        if len(pins) != info.vcpu_count:
            return ()
        return self._unpinned_as_every_cpu(pins)

    def _read_domain(
        self,
        dom: libvirt.virDomain,
        name: str,
        dir_sockets: dict[int, str],
        state_code: int | None = None,
        described: _Described | None = None,
    ) -> VmRead:
        """One domain; ``state_code`` when already known (``read_all``): no ``info()``
        then, and ``described``, its live XML already read (when, what it gave, and the
        parse's ``_XmlKey``). A
        running domain costs its live XML (channels, NICs and pins), plus ``info()``
        when its state is not known; ``vcpuPinInfo`` only where the XML cannot give
        the pins."""
        vcpu_count: int | None = None
        if state_code is None:
            state_code, _max_mem, _mem, vcpu_count, _cpu_time = dom.info()
        state = _STATES.get(state_code, VmState.OTHER)
        pcpus: tuple[frozenset[int], ...] = ()
        channels: tuple[ChannelInfo, ...] = ()
        nics: tuple[str, ...] = ()
        read_at = self._clock()
        if state is not VmState.SHUTOFF:
            facts: DomainXml | Exception
            key: _XmlKey | None
            if described is None:
                xml, host_cpus = dom.XMLDesc(0), self._host_cpus
                facts = parse_domain(name, xml, dir_sockets, host_cpus)
                key = _xml_key(xml, host_cpus)
            else:
                read_at, facts, key = described
            if isinstance(facts, Exception):
                raise facts
            # The pins parsed from this XML are what its next map re-read would parse
            # (pins_from_xml gives vcpu_pins of the same root) with the same host CPU
            # count: remembered for it. The count is the parse's own, not the session's
            # now (another VM's vcpuPinInfo below may have read a new one meanwhile).
            assert key is not None  # an XML read that failed raised above
            self._map_xml[name] = (key, facts.vcpu_pcpus)
            if facts.vcpu_pcpus is not None:
                pcpus = self._unpinned_as_every_cpu(facts.vcpu_pcpus)
            else:
                try:
                    pcpus = self._vcpu_map(dom, vcpu_count)
                except libvirt.libvirtError as exc:
                    # Not active (e.g. crashed and not preserved): no live map to read.
                    if _code(exc) != libvirt.VIR_ERR_OPERATION_INVALID:
                        raise
            if pcpus:
                channels, nics = facts.channels, facts.nics
        if vcpu_count is None:
            # The bindings size vcpuPinInfo's answer by info()'s vCPU count: the same.
            vcpu_count = len(pcpus) if pcpus else dom.info()[3]
        info = VmInfo(
            name=name,
            uuid=dom.UUIDString(),
            state=state,
            vcpu_count=vcpu_count,
            vcpu_pcpus=pcpus,
            channels=channels,
            map_read_at=read_at,
            host_cpus=self._host_cpus,
        )
        return VmRead(info, nics)

    def _vcpu_map(
        self, dom: libvirt.virDomain, vcpu_count: int | None
    ) -> tuple[frozenset[int], ...]:
        # The live pinning as libvirt keeps it. QEMU answers for every possible vCPU
        # (maxvcpus); the guest's online vCPUs are the first vcpu_count of them when
        # hot-plugged in order (None: every map given). The host's online CPUs are read
        # with it: QEMU answers an unpinned vCPU with those (below).
        self._read_host_cpus(self._require())
        maps = dom.vcpuPinInfo(libvirt.VIR_DOMAIN_AFFECT_LIVE)
        return self._unpinned_as_every_cpu(tuple(_cpumap_to_set(m) for m in maps[:vcpu_count]))

    def _read_host_cpus(self, conn: libvirt.virConnect) -> None:
        count, online, _online_count = conn.getCPUMap()
        self._host_cpus = count
        self._online_cpus = frozenset(itertools.compress(range(count), online))

    def _unpinned_as_every_cpu(
        self, pcpus: tuple[frozenset[int], ...]
    ) -> tuple[frozenset[int], ...]:
        """Each vCPU whose affinity covers every online host CPU as every host CPU: an
        unpinned one (rule 4: it owns none). QEMU's driver answers an unpinned vCPU's
        pins with the *online* CPUs (qemuDomainGetVcpuPinInfo uses
        virHostCPUGetAvailableCPUsBitmap), while the host CPU count includes offline
        ones: on a host with a CPU offline (SMT switched off) that answer would
        otherwise read as pinned to every online CPU."""
        online = self._online_cpus
        if not online:
            return pcpus
        every = every_cpu(self._host_cpus)
        return tuple(every if cpus >= online else cpus for cpus in pcpus)

    # -- per-VM calls --------------------------------------------------------------------

    def _domain(self, name: str) -> libvirt.virDomain:
        dom = self._doms.get(name)
        if dom is None:
            try:
                dom = self._require().lookupByName(name)
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                    raise UnknownVmError(f"libvirt knows no VM named {name!r}") from None
                self._raise_if_lost(exc)
                raise HypervisorError(f"{name}: {_message(exc)}") from None
            self._doms[name] = dom
        return dom

    def pin(self, info: VmInfo, vcpu: int, wanted: frozenset[int]) -> tuple[frozenset[int], ...]:
        """Pin ``vcpu`` (live) to ``wanted``; the map read back (or the one libvirt took)."""
        self._require()
        dom = self._domain(info.name)
        cpumap = tuple(cpu in wanted for cpu in range(self._host_cpus))
        try:
            dom.pinVcpu(vcpu, cpumap)
        except libvirt.libvirtError as exc:
            self._raise_if_lost(exc)
            raise HypervisorError(
                f"pinning {info.name} vCPU {vcpu} to {format_cpu_list(wanted)}: {_message(exc)}"
            ) from None
        try:
            pcpus = self._vcpu_map(dom, info.vcpu_count)
        except libvirt.libvirtError:
            pcpus = ()
        if not pcpus:  # could not read it back: trust what libvirt accepted
            pcpus = tuple(wanted if i == vcpu else s for i, s in enumerate(info.vcpu_pcpus))
        return pcpus

    def vcpu_times(self, names: Iterable[str]) -> VcpuTimes:
        """Each named running VM's vCPUs: (CPU time used in s, host CPU it runs on now).

        virDomainGetVcpus (virVcpuInfo: number, state, cpuTime in ns, cpu); a VM that
        stopped or went away meanwhile is left out. ``read_at`` is taken after the reads
        (the owner's clock): the energy account's interval ends there (vmpower.energy).
        """
        self._require()
        times: dict[str, tuple[tuple[float, int], ...]] = {}
        for name in names:
            try:
                infos, _maps = self._domain(name).vcpus()
            except UnknownVmError:
                continue
            except libvirt.libvirtError as exc:
                self._raise_if_lost(exc)
                continue  # not running (any more): it used no vCPU time
            times[name] = tuple((ns / 1e9, cpu) for _n, _state, ns, cpu in infos)
        return VcpuTimes(times, self._clock())

    def vcpu_stats(self) -> VcpuTimes | None:
        """Every running VM's vCPU times in one call: virConnectGetAllDomainStats' VCPU
        group ("vcpu.<n>.time", ns; a sparse array under vCPU hotplug), one round trip
        to libvirtd for the host where ``vcpu_times`` makes three a VM. It names no host
        CPU: each vCPU's is CPU_NOT_REPORTED. None where the driver reports no vCPU
        statistics (libvirt's test driver): ask ``vcpu_times`` then."""
        conn = self._require()
        try:
            records = conn.getAllDomainStats(
                libvirt.VIR_DOMAIN_STATS_VCPU, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
            )
        except libvirt.libvirtError as exc:
            self._raise_if_lost(exc)
            if _code(exc) in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED):
                return None
            raise HypervisorError(f"vCPU statistics: {_message(exc)}") from None
        times: dict[str, tuple[tuple[float, int], ...]] = {}
        for dom, fields in records:
            maximum = fields.get("vcpu.maximum")
            if not isinstance(maximum, int):
                return None  # this driver reports no vCPU group
            keys = (f"vcpu.{n}.time" for n in range(maximum))
            times[dom.name()] = tuple(
                (fields[key] / 1e9, CPU_NOT_REPORTED) for key in keys if key in fields
            )
        return VcpuTimes(times, self._clock())

    def interface_stats(self, name: str, nics: tuple[str, ...]) -> tuple[int, int]:
        """(rx_packets, tx_packets) summed over ``nics`` of the VM."""
        self._require()
        dom = self._domain(name)
        rx_packets = tx_packets = 0
        for nic in nics:
            try:
                stats = dom.interfaceStats(nic)
            except libvirt.libvirtError as exc:
                self._raise_if_lost(exc)
                raise HypervisorError(f"{name} NIC {nic} statistics: {_message(exc)}") from None
            # virDomainInterfaceStats: a counter the hypervisor does not keep reads -1.
            rx_packets += max(stats[1], 0)
            tx_packets += max(stats[5], 0)
        return rx_packets, tx_packets
