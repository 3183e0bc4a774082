"""The Prometheus endpoint: HTTP GET /metrics, served from snapshots the monitor publishes.

Threads (docs/architecture.md, "One thread, one loop"): the monitor thread builds an
immutable ``Snapshot`` of plain copies (``SnapshotBuilder.build``: whole-dict copies of
the counters, no per-VM formatting, well under issue #16's 5 ms of loop hold) and
publishes it by one reference store; the HTTP threads only read the latest snapshot and
render it. A scrape is served the latest snapshot when it was begun at most REFRESH_S
before the scrape arrived (no wait: it shows every reply sent up to REFRESH_S before);
otherwise it asks the monitor for a fresh one (``call_soon_threadsafe``) and waits at
most REFRESH_WAIT_S, else serves the old one (``vmpower_snapshot_timestamp_seconds``
says how old): a hung loop never hangs a scrape, and however many clients ask, the loop
builds at most one snapshot per REFRESH_S.

Against hostile clients: at most MAX_CLIENTS connections are served at once (more get
503 at once and are closed, from the listening thread, without blocking), each has
CLIENT_TIMEOUT_S to send its request, and nothing but ``GET /metrics`` (and HEAD) is
answered (404 / 405 otherwise). Bodies are rendered once per snapshot, and
incrementally (``Renderer``): each per-VM line is kept between snapshots and formatted
again only when that VM's value changed; most VMs are idle between two scrapes.

Rendering: the vmpower families are written here in the Prometheus text format 0.0.4
(label values escaped as the format says: backslash, double quote, newline), because
prometheus_client's generic rendering takes about 90 ms for 1000 VMs x 4 channels
(bench/bench_metrics.py); the process families (``process_*``: CPU, memory, open fds of
the daemon) are prometheus_client's ``ProcessCollector``'s, read the same way but for
the open fds (``_ProcessCollector``). tests/test_metrics.py
checks the text with prometheus_client's parser and with ``promtool check metrics``.

This module holds the snapshots and their rendering; the endpoint (``MetricsExporter``,
its HTTP server and the process families) is vmpower.metrics_http, imported only when
metrics.listen is set: prometheus_client and http.server cost a daemon without an
endpoint 4.5 MiB and ~30 ms of start-up otherwise (issue #16).

Families and how they are made: docs/metrics.md.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from vmpower import __version__
from vmpower.channels import ChannelRegistry, ChannelState
from vmpower.cpufreq import CpuFreq
from vmpower.energy import EnergyAccount
from vmpower.errors import SysfsError, VmpowerError
from vmpower.hypervisor import Hypervisor
from vmpower.power import PowerManager
from vmpower.restore import RestoreJournal
from vmpower.sysfs import Reader, Sysfs

if TYPE_CHECKING:  # for type checkers: at run time, __getattr__ below
    from vmpower.metrics_http import MetricsExporter  # noqa: F401

log = logging.getLogger("vmpower.metrics")

REFRESH_S = 0.5  # at most one snapshot build per this many seconds, however many ask
REFRESH_WAIT_S = 2.0  # how long a scrape waits for the monitor's fresh snapshot
MAX_CLIENTS = 4  # connections served at once; more get 503
CLIENT_TIMEOUT_S = 5.0  # to send the request (slow clients do not hold a slot longer)

# Refusal kinds (``power.Refused.kind`` and the request path's other NACKs) → the
# small fixed set of ``reason`` label values. A kind not listed counts as "other".
REASONS = (
    "rate_limited",
    "disabled",
    "not_permitted",
    "cpu_unavailable",
    "invalid",
    "apply_failed",
    "error",
    "other",
)
REASON_OF_KIND = {
    "rate limit": "rate_limited",
    "channel disabled": "disabled",
    "not pinned": "not_permitted",
    "no such vCPU": "not_permitted",
    "spoofed name": "not_permitted",
    "vm unknown": "not_permitted",
    "reserved": "cpu_unavailable",
    "offline": "cpu_unavailable",
    "no turbo": "cpu_unavailable",
    "unknown unit": "invalid",
    "unknown command": "invalid",
    "unknown core type": "invalid",
    "bad policy": "invalid",
    "no policy": "invalid",
    "write failed": "apply_failed",
    "internal error": "error",
}


def reason_of(kind: str) -> str:
    reason = REASON_OF_KIND.get(kind)
    if reason is not None:
        return reason
    return "error" if kind.startswith("failed") else "other"


@dataclass(frozen=True)
class Snapshot:
    """What one scrape shows: plain copies taken on the monitor thread, never changed after.

    Kept raw (the agent's own counters, copied whole: a C-level dict copy each), so the
    build on the loop stays short at any fleet size; grouping, sorting and formatting are
    the renderer's (``Renderer``, on an HTTP thread).
    """

    taken_at: float  # time.time()
    libvirt_connected: bool
    restore_pending: int
    cpus_driven: int
    acks_by: Mapping[tuple[str, str], int]  # PowerManager.acks_by: (kind, owner) → n
    nacks_by: Mapping[tuple[str, str, str], int]  # (kind, owner, refusal kind) → n
    channel_keys: tuple[tuple[str, int], ...]  # (vm, index) of each VM channel
    channel_states: tuple[ChannelState, ...]  # their states, in the same order
    vm_uuids: Mapping[str, str]  # every VM libvirt knows → its UUID
    cpu_hz: tuple[tuple[int, int], ...]  # (cpu, Hz now)
    target_hz: tuple[tuple[int, int], ...]  # (cpu, Hz vmpower set)
    package_j: tuple[tuple[int, float], ...]
    host_j: tuple[tuple[int, float], ...]
    vm_j: Mapping[str, float]  # EnergyAccount.vm_j (VMs without books count 0)
    departed_j: float | None  # None: no intel-rapl zone, no energy families
    conflicts: tuple[str, ...] = ()  # other power managers running (vmpower.conflicts)
    build_s: float = 0.0  # how long the build held the monitor loop


_STATE_OF = attrgetter("state")


class SnapshotBuilder:
    """Builds snapshots from the agent's parts; runs on the monitor thread only.

    Issue #16's rule: no control work holds the loop more than 5 ms. A build copies the
    counters whole (dict copies, C-level), reads each CPU's scaling_cur_freq once, books
    the energy so far, and takes each VM's UUID; the channels' states are walked again
    only when the registry's tally says one moved. About 0.4 ms at 1000 VMs x 4
    channels in process (bench_metrics: ``loop_hold_build_ms``).
    """

    def __init__(
        self,
        *,
        power: PowerManager,
        cpufreq: CpuFreq,
        hypervisor: Hypervisor,
        channels: ChannelRegistry,
        journal: RestoreJournal,
        energy: EnergyAccount | None,
        conflicts: Callable[[], list[dict[str, object]]] | None = None,
    ) -> None:
        self.power = power
        self.conflicts = conflicts
        self.cpufreq = cpufreq
        self.hypervisor = hypervisor
        self.channels = channels
        self.journal = journal
        self.energy = energy
        # scaling_cur_freq readers kept open (one pread each per snapshot), read-only.
        self._sysfs = Sysfs(cpufreq.sysfs.root)
        self._cur: dict[int, Reader] = {}
        self._channels_version = -1  # ChannelRegistry.tally.version of the two below
        self._channel_keys: tuple[tuple[str, int], ...] = ()
        self._channel_states: tuple[ChannelState, ...] = ()

    def build(self) -> Snapshot:
        began = time.perf_counter()
        power = self.power
        vms = self.hypervisor.vms()
        vm_uuids = {name: info.uuid for name, info in vms.items()}
        # The channels' tally counts every open, close and state change: while its
        # version stands still, the last walk over every channel still holds.
        version = self.channels.tally.version
        if version != self._channels_version:
            vm_channels = self.channels.vm_channels
            self._channel_keys = tuple(vm_channels)
            self._channel_states = tuple(map(_STATE_OF, vm_channels.values()))
            self._channels_version = version
        channel_keys, channel_states = self._channel_keys, self._channel_states
        # Requesters gone from libvirt and from the channels: their counts go (a counter
        # that disappears is a reset to Prometheus), so VM churn cannot grow them.
        if len(power.acks_by) + len(power.nacks_by) > 4 * (len(vms) + len(channel_keys)) + 64:
            served = {vm for vm, _index in channel_keys}
            power.forget_counts(lambda kind, owner: kind != "vm" or owner in vms or owner in served)
        targets = []
        for cpu, wishes in power.wishes.items():
            if wishes:
                try:
                    targets.append((cpu, self.cpufreq.requested_khz(cpu) * 1000))
                except VmpowerError:
                    continue
        driven = {c for c, w in power.wishes.items() if w} | {
            c for c, lim in power.limits.items() if lim
        }
        energy = self.energy
        package_j: tuple[tuple[int, float], ...] = ()
        host_j: tuple[tuple[int, float], ...] = ()
        vm_j: Mapping[str, float] = {}
        departed: float | None = None
        if energy is not None and energy.enabled:
            energy.update()
            energy.forget(vms)
            package_j = tuple(sorted(energy.package_j.items()))
            host_j = tuple(sorted(energy.host_j.items()))
            vm_j = dict(energy.vm_j)
            departed = energy.departed_j
        snap = Snapshot(
            taken_at=time.time(),
            libvirt_connected=self.hypervisor.conn is not None,  # status()'s "connected"
            restore_pending=self.journal.pending_count(),
            cpus_driven=len(driven),
            acks_by=dict(power.acks_by),
            nacks_by=dict(power.nacks_by),
            channel_keys=channel_keys,
            channel_states=channel_states,
            vm_uuids=vm_uuids,
            cpu_hz=self._frequencies(),
            target_hz=tuple(sorted(targets)),
            package_j=package_j,
            host_j=host_j,
            vm_j=vm_j,
            departed_j=departed,
            conflicts=tuple(
                sorted(str(c.get("name")) for c in (self.conflicts() if self.conflicts else ()))
            ),
        )
        return replace(snap, build_s=time.perf_counter() - began)

    def _frequencies(self) -> tuple[tuple[int, int], ...]:
        """scaling_cur_freq of every CPU that has one (kHz → Hz); offline ones left out."""
        out = []
        for cpu in self.cpufreq.cpus():
            reader = self._cur.get(cpu)
            try:
                if reader is None:
                    reader = self._sysfs.open_reader(
                        f"devices/system/cpu/cpu{cpu}/cpufreq/scaling_cur_freq"
                    )
                    self._cur[cpu] = reader
                out.append((cpu, reader.read_int() * 1000))
            except (SysfsError, OSError, ValueError):
                stale = self._cur.pop(cpu, None)  # offline now: opened again when back
                if stale is not None:
                    stale.close()
        return tuple(out)

    def close(self) -> None:
        for reader in self._cur.values():
            reader.close()
        self._cur.clear()
        self._sysfs.close()


# -- rendering (any thread: reads only the snapshot) ---------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _family(name: str, kind: str, help_text: str) -> str:
    return f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"


_MISSING = object()
_STATES = tuple(ChannelState)


class _VmLines:
    """One per-VM family's sample lines, kept between renders.

    ``update`` gets each VM's value (anything comparable); only the lines of VMs whose
    value changed (or that are new) are formatted again, and the family's text is joined
    again only when something changed. Most VMs are idle between two scrapes, so a scrape
    formats a handful of lines, not thousands.
    """

    def __init__(self, fmt: Callable[[str, Any], str]) -> None:
        self._fmt = fmt  # (the VM's escaped label, its value) → its lines
        self._values: dict[str, Any] = {}
        self._lines: dict[str, str] = {}
        self._labels: dict[str, str] = {}  # vm → 'vm="<escaped>"', made once per VM
        self._order: list[str] = []
        self.text = ""

    def update(self, values: dict[str, Any]) -> int:
        """Take this render's values (every VM's); return the sample lines formatted."""
        old = self._values
        if values == old:
            return 0
        changed: dict[str, Any] = {vm: _MISSING for vm in old.keys() - values.keys()}
        for vm, value in values.items():
            if old.get(vm, _MISSING) != value:  # NaN != NaN: formatted again, harmless
                changed[vm] = value
        return self.patch(changed)

    def patch(self, changed: dict[str, Any]) -> int:
        """Only these VMs' values may have changed (``_MISSING``: the VM's lines go);
        return the sample lines formatted."""
        values, lines, labels, fmt = self._values, self._lines, self._labels, self._fmt
        formatted = 0
        reordered = False
        for vm, value in changed.items():
            if value is _MISSING:
                if values.pop(vm, _MISSING) is not _MISSING:
                    del lines[vm], labels[vm]
                    reordered = True
                continue
            label = labels.get(vm)
            if label is None:
                label = labels[vm] = f'vm="{_escape(vm)}"'
                reordered = True
            elif values[vm] == value:
                continue
            values[vm] = value
            text = lines[vm] = fmt(label, value)
            formatted += text.count("\n")
        if reordered:
            self._order = sorted(values)
        if formatted or reordered:
            self.text = "".join([lines[vm] for vm in self._order])
        return formatted


def _requests_lines(label: str, counts: tuple[int, int]) -> str:
    return (
        f'vmpower_requests_total{{{label},result="ack"}} {counts[0]}\n'
        f'vmpower_requests_total{{{label},result="nack"}} {counts[1]}\n'
    )


def _refusals_lines(label: str, by_reason: tuple[tuple[str, int], ...]) -> str:
    return "".join(
        f'vmpower_refusals_total{{{label},reason="{reason}"}} {n}\n' for reason, n in by_reason
    )


def _channels_lines(label: str, counts: tuple[int, ...]) -> str:
    return "".join(
        f'vmpower_channels{{{label},state="{state.value}"}} {n}\n'
        for state, n in zip(_STATES, counts, strict=True)
    )


def _info_line(label: str, uuid: str) -> str:
    return f'vmpower_vm_info{{{label},uuid="{_escape(uuid)}"}} 1\n'


def _energy_line(label: str, joules: float) -> str:
    if joules.__class__ is float and math.isfinite(joules):
        return f"vmpower_vm_energy_joules_total{{{label}}} {joules!r}\n"
    return f"vmpower_vm_energy_joules_total{{{label}}} {_number(joules)}\n"


class Renderer:
    """Snapshots in the Prometheus text format 0.0.4, rebuilding only what changed.

    Keeps, between renders, each per-VM family's lines (``_VmLines``) and the raw inputs
    they were made from: when a snapshot's counters equal the previous one's (dict
    equality, C-level), the family is not even regrouped. Not thread-safe: one caller at
    a time (the exporter holds its render lock). ``vm_lines_formatted``: per-VM sample
    lines formatted by the last ``render`` (tests/test_metrics.py counts it).
    """

    def __init__(self) -> None:
        self._requests = _VmLines(_requests_lines)
        self._refusals = _VmLines(_refusals_lines)
        self._channels = _VmLines(_channels_lines)
        self._info = _VmLines(_info_line)
        self._energy = _VmLines(_energy_line)
        self._prev: Snapshot | None = None
        self._served: set[str] = set()  # VMs with channels in _prev
        self.vm_lines_formatted = 0

    def render(self, snap: Snapshot) -> str:
        prev = self._prev
        formatted = 0
        same_channels = (
            prev is not None
            and snap.channel_keys == prev.channel_keys
            and snap.channel_states == prev.channel_states
        )
        same_keys = prev is not None and snap.channel_keys == prev.channel_keys
        if not same_keys:
            formatted += self._all_requests(snap)
        elif snap.acks_by != prev.acks_by or snap.nacks_by != prev.nacks_by:
            formatted += self._some_requests(snap, prev)
        if not same_channels:
            counts: dict[str, list[int]] = {}
            index_of = {state: i for i, state in enumerate(_STATES)}
            for (vm, _index), state in zip(snap.channel_keys, snap.channel_states, strict=True):
                per_vm = counts.get(vm)
                if per_vm is None:
                    per_vm = counts[vm] = [0] * len(_STATES)
                per_vm[index_of[state]] += 1
            formatted += self._channels.update({vm: tuple(n) for vm, n in counts.items()})
        if prev is None or snap.vm_uuids != prev.vm_uuids:
            formatted += self._info.update(dict(snap.vm_uuids))
        if snap.departed_j is not None and (
            prev is None or snap.vm_j != prev.vm_j or snap.vm_uuids.keys() != prev.vm_uuids.keys()
        ):
            books = dict.fromkeys(snap.vm_uuids, 0.0)
            books.update(snap.vm_j)  # every VM libvirt knows has a counter, from 0
            formatted += self._energy.update(books)
        self._prev = snap
        self.vm_lines_formatted = formatted
        return self._text(snap)

    def _all_requests(self, snap: Snapshot) -> int:
        """Regroup every VM's counters (the first render, or the channels changed)."""
        acks: dict[str, int] = {}
        nacks: dict[str, int] = {}
        refusals: dict[str, dict[str, int]] = {}
        for (kind, owner), n in snap.acks_by.items():
            if kind == "vm":
                acks[owner] = n
        for (kind, owner, refusal), n in snap.nacks_by.items():
            if kind == "vm":
                nacks[owner] = nacks.get(owner, 0) + n
                per_vm = refusals.setdefault(owner, {})
                reason = reason_of(refusal)
                per_vm[reason] = per_vm.get(reason, 0) + n
        self._served = served = {vm for vm, _index in snap.channel_keys}
        counted = set(acks) | set(nacks) | served
        return self._requests.update(
            {vm: (acks.get(vm, 0), nacks.get(vm, 0)) for vm in counted}
        ) + self._refusals.update({vm: tuple(sorted(by.items())) for vm, by in refusals.items()})

    def _some_requests(self, snap: Snapshot, prev: Snapshot) -> int:
        """Regroup the counters of the VMs whose counters differ from ``prev``'s only."""
        changed: set[str] = set()
        for new, old in ((snap.acks_by, prev.acks_by), (snap.nacks_by, prev.nacks_by)):
            if new != old:
                changed.update(k[1] for k, n in new.items() if k[0] == "vm" and old.get(k) != n)
                changed.update(k[1] for k in old.keys() - new.keys() if k[0] == "vm")
        if not changed:
            return 0
        nacks = dict.fromkeys(changed, 0)
        refusals: dict[str, dict[str, int]] = {}
        for (kind, owner, refusal), n in snap.nacks_by.items():
            if kind == "vm" and owner in changed:
                nacks[owner] += n
                per_vm = refusals.setdefault(owner, {})
                reason = reason_of(refusal)
                per_vm[reason] = per_vm.get(reason, 0) + n
        served = {vm for vm, _index in snap.channel_keys} if changed else set()
        requests: dict[str, Any] = {}
        for vm in changed:
            acks = snap.acks_by.get(("vm", vm))
            counted = acks is not None or vm in refusals or vm in served
            requests[vm] = (acks or 0, nacks[vm]) if counted else _MISSING
        return self._requests.patch(requests) + self._refusals.patch(
            {
                vm: tuple(sorted(refusals[vm].items())) if vm in refusals else _MISSING
                for vm in changed
            }
        )

    def _text(self, snap: Snapshot) -> str:
        out: list[str] = []
        add = out.append
        add(_family("vmpower_build_info", "gauge", "vmpower version (always 1)"))
        add(f'vmpower_build_info{{version="{_escape(__version__)}"}} 1\n')
        add(
            _family(
                "vmpower_snapshot_timestamp_seconds",
                "gauge",
                "when the daemon's loop took the values shown (Unix time)",
            )
        )
        add(f"vmpower_snapshot_timestamp_seconds {snap.taken_at!r}\n")
        add(
            _family(
                "vmpower_snapshot_build_seconds",
                "gauge",
                "how long building the snapshot shown held the daemon's loop",
            )
        )
        add(f"vmpower_snapshot_build_seconds {snap.build_s!r}\n")
        add(_family("vmpower_libvirt_connected", "gauge", "1 while connected to libvirt"))
        add(f"vmpower_libvirt_connected {int(snap.libvirt_connected)}\n")
        add(
            _family(
                "vmpower_restore_pending_files",
                "gauge",
                "settings whose original waits in the restore journal",
            )
        )
        add(f"vmpower_restore_pending_files {snap.restore_pending}\n")
        add(_family("vmpower_cpus_driven", "gauge", "host CPUs vmpower holds (a wish or a limit)"))
        add(f"vmpower_cpus_driven {snap.cpus_driven}\n")
        add(
            _family(
                "vmpower_conflicting_power_managers",
                "gauge",
                "other power managers running (they undo vmpower's settings)",
            )
        )
        add(f"vmpower_conflicting_power_managers {len(snap.conflicts)}\n")
        add(_family("vmpower_conflict", "gauge", "another power manager running (always 1)"))
        for manager in snap.conflicts:
            add(f'vmpower_conflict{{manager="{_escape(manager)}"}} 1\n')
        add(_family("vmpower_requests_total", "counter", "requests answered, by VM and result"))
        add(self._requests.text)
        add(_family("vmpower_refusals_total", "counter", "requests refused (NACK), by reason"))
        add(self._refusals.text)
        add(_family("vmpower_cpu_frequency_hertz", "gauge", "frequency the kernel reports now"))
        for cpu, hz in snap.cpu_hz:
            add(f'vmpower_cpu_frequency_hertz{{cpu="{cpu}"}} {hz}\n')
        add(
            _family(
                "vmpower_cpu_target_frequency_hertz",
                "gauge",
                "frequency vmpower set (only CPUs it drives)",
            )
        )
        for cpu, hz in snap.target_hz:
            add(f'vmpower_cpu_target_frequency_hertz{{cpu="{cpu}"}} {hz}\n')
        add(_family("vmpower_channels", "gauge", "VM power channels by state"))
        add(self._channels.text)
        add(_family("vmpower_vm_info", "gauge", "VMs known to libvirt (always 1)"))
        add(self._info.text)
        if snap.departed_j is not None:
            add(
                _family(
                    "vmpower_package_energy_joules_total",
                    "counter",
                    "intel-rapl package energy since vmpowerd started",
                )
            )
            for package, j in snap.package_j:
                add(f'vmpower_package_energy_joules_total{{package="{package}"}} {_number(j)}\n')
            add(
                _family(
                    "vmpower_vm_energy_joules_total",
                    "counter",
                    "package energy shared to the VM by the vCPU time it used",
                )
            )
            add(self._energy.text)
            add(
                _family(
                    "vmpower_host_energy_joules_total",
                    "counter",
                    "package energy no VM accounts for (host processes, idle)",
                )
            )
            for package, j in snap.host_j:
                add(f'vmpower_host_energy_joules_total{{package="{package}"}} {_number(j)}\n')
            add(
                _family(
                    "vmpower_departed_vm_energy_joules_total",
                    "counter",
                    "energy of VMs whose own counters were dropped (gone from libvirt)",
                )
            )
            add(f"vmpower_departed_vm_energy_joules_total {_number(snap.departed_j)}\n")
        return "".join(out)


def render(snap: Snapshot) -> str:
    """The snapshot in the Prometheus text format 0.0.4, from scratch (no kept lines)."""
    return Renderer().render(snap)


def __getattr__(name: str) -> Any:
    # ``from vmpower.metrics import MetricsExporter`` keeps working: the endpoint's module
    # (and prometheus_client with it) is imported on that first use only.
    if name == "MetricsExporter":
        from vmpower.metrics_http import MetricsExporter

        return MetricsExporter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
