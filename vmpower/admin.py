"""The operator's commands: what each control-socket command reads, checks and changes.

``control`` carries JSON lines; this module gives them meaning. Each ``cmd_*`` handler
takes the request's arguments (checked here, with a clear error for anything wrong)
and the caller's credentials, and returns a JSON-able result. Handlers run on the
monitor thread, so they read and change agent state directly. The commands that need
libvirt (add_vm, add_channels, set_pcpu) go through ``Hypervisor``, whose calls run on
its worker thread: they wait at most about a second and are refused at once ("libvirt
is not responding ...; try again") while libvirt hangs; ``status`` never calls libvirt
and says whether it responds (``libvirt.responsive``, ``libvirt.stalled_s``).

The commands whose work grows with the host are sliced (``control.Steps``, issue #16:
no command holds the loop more than 5 ms): ``show_cpus`` reads ``CPUS_PER_SLICE`` CPUs
a loop turn, ``status`` builds its host-wide ``unsupported`` summary
``SUMMARY_CPUS_PER_SLICE`` CPUs a turn, ``list_vms`` sorts its names and builds its rows
a bounded number a turn, and ``add_vm`` waits for libvirt parked (``control``: the loop
serves guests meanwhile). Each says what its answer is a view of.
"""

from __future__ import annotations

import heapq
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from vmpower import __version__
from vmpower.channels import ChannelRegistry
from vmpower.control import Command, PeerCred, Steps
from vmpower.cpufreq import CpuFreq
from vmpower.cpuset import format_cpu_list, parse_cpu_list
from vmpower.energy import EnergyAccount
from vmpower.errors import ControlError, CpuListError, VmpowerError
from vmpower.hypervisor import Hypervisor, VmInfo, VmState
from vmpower.hypervisor.registry import CALL_WAIT_S
from vmpower.lifecycle import VmLifecycle
from vmpower.monitor import LoopStats
from vmpower.policies import PolicyRecord
from vmpower.power import PowerManager
from vmpower.protocol import UNIT_BY_OP
from vmpower.restore import RestoreJournal

OPERATOR = "operator"  # the owner of the wishes set_cpu_freq makes
RELEASE = "release"  # set_cpu_freq's op that withdraws the operator's wish

# Work per loop turn of the sliced commands (issue #16: no command holds the loop more
# than 5 ms; these keep a step near 1-2 ms of CPU on a loaded 2-core host, where a
# show_cpus row, ~10 sysfs reads, took 130-300 us). A CPU's unsupported_on() is up to
# ~110 us the first time (the cpufreq probe), ~30 us after.
CPUS_PER_SLICE = 2  # show_cpus rows a turn (0.7-1.4 ms each at 256 CPUs: 8 held 6 ms, 4 held 5.5)
# status's "unsupported" summary: CPUs a turn (a CPU not probed yet, before the warm-up
# reached it, costs ~0.3 ms: its probe, and its write files opened ahead; 16 held 4.6 ms)
SUMMARY_CPUS_PER_SLICE = 8
VMS_PER_SLICE = 250  # show_cpus's holders: one VmInfo.pcpus() each, 3-9 us
# list_vms names sorted a turn (~0.15 ms; all 4000 in one step were ~1 ms), merged lazily
LIST_SORTED_PER_SLICE = 1000
LIST_ROWS_PER_SLICE = 500  # list_vms rows looked at a turn (~1.5 us when kept)
LIST_BUILT_PER_SLICE = 150  # list_vms rows built anew a turn (~5-10 us each)


def _slices(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class AdminCommands:
    """The control commands of a running agent, over its parts."""

    def __init__(
        self,
        hypervisor: Hypervisor,
        power: PowerManager,
        cpufreq: CpuFreq,
        channels: ChannelRegistry,
        lifecycle: VmLifecycle,
        journal: RestoreJournal,
        started_at: float,
        energy: EnergyAccount | None = None,
        loop: LoopStats | None = None,
        conflicts: Callable[[], list[dict[str, object]]] | None = None,
    ) -> None:
        self.hypervisor = hypervisor
        self.power = power
        self.cpufreq = cpufreq
        self.channels = channels
        self.lifecycle = lifecycle
        self.journal = journal
        self.started_at = started_at
        self.energy = energy  # show_vm's energy_j (None: no intel-rapl zone)
        self.loop = loop  # status's "loop": how long turns and commands hold the loop
        # status's "conflicts": other power managers running (vmpower.conflicts)
        self.conflicts = conflicts
        # list_vms: each VM's row with what it was built from; rebuilt only when that
        # changed (issue #16: ~5 us a row built anew, 4000 rows per call).
        self._rows: dict[str, tuple[tuple[object, ...], dict[str, Any]]] = {}
        self.rows_built = 0  # list_vms rows built since start (tests/test_scale.py)

    def commands(self) -> dict[str, Command]:
        return {
            "status": Command(self.cmd_status, help="daemon status"),
            "list_vms": Command(self.cmd_list_vms, help="VMs with state and channels"),
            "show_vm": Command(self.cmd_show_vm, help="one VM: channels, vCPU map, query"),
            "show_cpus": Command(self.cmd_show_cpus, help="host CPUs: frequencies and holders"),
            "show_policies": Command(self.cmd_show_policies, help="installed policies"),
            "add_vm": Command(self.cmd_add_vm, changes=True, help="serve a VM"),
            "rm_vm": Command(self.cmd_rm_vm, changes=True, help="stop serving a VM"),
            "add_channels": Command(self.cmd_add_channels, changes=True, help="open channels"),
            "set_channel_status": Command(
                self.cmd_set_channel_status, changes=True, help="enable or disable channels"
            ),
            "set_pcpu": Command(self.cmd_set_pcpu, changes=True, help="pin a vCPU"),
            "set_query": Command(self.cmd_set_query, changes=True, help="allow queries"),
            "set_cpu_freq": Command(
                self.cmd_set_cpu_freq,
                changes=True,
                help="operator frequency request for a host CPU",
            ),
        }

    # -- arguments ---------------------------------------------------------------------

    def _vm_arg(self, request: dict[str, Any]) -> VmInfo:
        name = request.get("vm")
        if not isinstance(name, str) or not name:
            raise ControlError('missing "vm": the VM name')
        try:
            return self.hypervisor.vm(name)
        except VmpowerError:
            raise ControlError(f"unknown VM {name!r} (list_vms shows the known ones)") from None

    def _cpu_arg(self, value: Any) -> int:
        cpus = self.cpufreq.cpus()
        if isinstance(value, bool) or not isinstance(value, int):
            raise ControlError(f"host CPU must be an integer, got {value!r}")
        if value not in cpus:
            raise ControlError(f"host CPU {value} out of range (0-{max(cpus)})")
        return value

    def _channel_list(self, vm: VmInfo, request: dict[str, Any]) -> set[int]:
        spec = request.get("channels", "all")
        if spec == "all":
            return {ch.index for ch in vm.channels} | self.channels.indexes(vm.name)
        try:
            if isinstance(spec, list):
                return {int(x) for x in spec}
            return set(parse_cpu_list(str(spec)))
        except (ValueError, CpuListError):
            raise ControlError(f"bad channel list {spec!r}: use all, 0,1 or 0-3") from None

    # -- reading -----------------------------------------------------------------------

    def cmd_status(self, _req: dict[str, Any], _cred: PeerCred) -> Steps:
        # Everything but "unsupported" as of the first step; that summary reads every CPU
        # (SUMMARY_CPUS_PER_SLICE a turn), each as it is when its slice runs: a hotplug
        # meanwhile shows on the CPUs read after it, as on any read racing it. Built anew
        # each time (CpuFreq's cached summary is built whole, 28 ms at 256 CPUs; nothing
        # public says when it was dropped): ~7 ms of reads a status, spread over turns.
        stats = self.power.stats
        tally = self.channels.tally  # counted as channels change: no walk of 16 000
        reply: dict[str, Any] = {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "libvirt": self.hypervisor.status(),
            "vms": self.hypervisor.vm_count(),
            "channels": len(self.channels.vm_channels),
            "channels_connected": tally.connected,
            "fifos": sorted(self.channels.fifos),
            "requests": stats.requests,
            "acks": stats.acks,
            "nacks": stats.nacks,
            "writes": stats.writes,
            "writes_skipped": stats.writes_skipped,
            "write_failures": stats.write_failures,
            "pending_restore": self.journal.pending_count(),
            "reserved_cpus": format_cpu_list(self.power.reserved_cpus),
            "loop": None if self.loop is None else self.loop.report(),
            # other power managers writing cpufreq too (issue #13): [] when none
            "conflicts": [] if self.conflicts is None else self.conflicts(),
        }
        # features some CPU cannot use: those CPUs and why (per CPU: show_cpus)
        # (SUMMARY_CPUS_PER_SLICE CPUs a step: built whole, the first status held the
        # loop 28 ms at 256 CPUs)
        reply["unsupported"] = yield from self.cpufreq.unsupported_summary_steps(
            SUMMARY_CPUS_PER_SLICE
        )
        return reply

    def cmd_list_vms(self, _req: dict[str, Any], _cred: PeerCred) -> Steps:
        # One coherent answer: the VMs, their channel counts and the query set are copied
        # at the first step, and nothing else is done in it (plain dict copies: VmInfo and
        # the tally's counts are immutable; 0.1 ms at 4000 VMs). The names are then sorted
        # LIST_SORTED_PER_SLICE a turn, and the rows built from the copy over the next
        # turns, a bounded number a turn, in name order merged lazily from those sorted
        # runs (issue #16: at 4000 VMs the whole build held the loop 39 ms, the copy and
        # whole sort 3-4 ms). The answer is the registry as it was when the command came.
        # Each row is kept with what it shows (state, vCPUs and their pins, channel
        # counts, query) and built again only when that changed. The channel counts are
        # kept by ChannelRegistry as channels change, not walked.
        vms = self.hypervisor.vms()
        per_vm = dict(self.channels.tally.per_vm)
        query = frozenset(self.power.query_allowed)
        runs: list[list[str]] = []
        for some in _slices(list(vms), LIST_SORTED_PER_SLICE):
            yield
            runs.append(sorted(some))
        yield
        cache = self._rows
        fresh: dict[str, tuple[tuple[object, ...], dict[str, Any]]] = {}
        rows = []
        no_channels = (0, 0)
        looked = built = 0
        # A few comparisons a row (log2 of the runs); names are unique (dict keys)
        for name in heapq.merge(*runs):
            if looked >= LIST_ROWS_PER_SLICE or built >= LIST_BUILT_PER_SLICE:
                looked = built = 0
                yield
            looked += 1
            vm = vms[name]
            channels, connected = per_vm.get(name, no_channels)
            key = (vm.state, vm.vcpu_count, vm.vcpu_pcpus, channels, connected, name in query)
            kept = cache.get(name)
            if kept is None or kept[0] != key:
                built += 1
                self.rows_built += 1
                kept = (
                    key,
                    {
                        "name": name,
                        "state": vm.state.name.lower(),
                        "vcpus": vm.vcpu_count,
                        "pcpus": format_cpu_list(vm.pcpus()),
                        "tracked": True,  # every VM Hypervisor.vms() returns is tracked
                        "channels": channels,
                        "connected": connected,
                        "query": key[5],
                    },
                )
            fresh[name] = kept
            rows.append(kept[1])
        # Two list_vms in flight each keep their own: the later one's rows stay cached.
        self._rows = fresh
        return rows

    def cmd_show_vm(self, req: dict[str, Any], _cred: PeerCred) -> dict[str, Any]:
        vm = self._vm_arg(req)
        host_cpus = self.hypervisor.host_cpu_count()
        vcpus = [
            {
                "vcpu": vcpu,
                "pcpus": format_cpu_list(cpus),
                "pinned": bool(vm.pinned_pcpus(vcpu, host_cpus)),
            }
            for vcpu, cpus in enumerate(vm.vcpu_pcpus)
        ]
        channels = []
        known = {ch.index: ch for ch in vm.channels}
        for index in sorted(set(known) | self.channels.indexes(vm.name)):
            channel = self.channels.vm_channels.get((vm.name, index))
            if channel is not None:
                channels.append(channel.describe())
            else:
                channels.append(
                    {
                        "index": index,
                        "path": known[index].path,
                        "state": "closed",
                        "enabled": (vm.name, index) not in self.channels.disabled,
                    }
                )
        policy = self.power.policies.get(vm.name)
        return {
            "name": vm.name,
            "uuid": vm.uuid,
            "state": vm.state.name.lower(),
            "tracked": self.hypervisor.tracked(vm.name),
            "vcpu_count": vm.vcpu_count,
            "vcpus": vcpus,
            "channels": channels,
            "query": vm.name in self.power.query_allowed,
            "policy": policy_row(policy) if policy else None,
            # Its share of the packages' energy since vmpowerd started (vmpower.energy);
            # null on a host without intel-rapl zones.
            "energy_j": None if self.energy is None else self.energy.vm_energy_j(vm.name),
        }

    def cmd_show_cpus(self, req: dict[str, Any], _cred: PeerCred) -> Steps:
        # Sliced (issue #16: 256 CPUs' reads held the loop 60 ms): which VMs run on which
        # CPU is taken from the registry as it is at the first step (VmInfo is immutable),
        # VMS_PER_SLICE VMs a turn; then CPUS_PER_SLICE CPUs' rows a turn, each row read
        # whole in one step. Rows of different CPUs are read some turns apart, and guests
        # are served in between: a row shows its CPU as it was when read, as frequencies
        # move under any read anyway; the "vms" column is the placement at the start.
        wanted = req.get("cpu")
        cpus = self.cpufreq.cpus() if wanted in (None, "all") else [self._cpu_arg(wanted)]
        holders: dict[int, list[str]] = {}
        running = [
            (name, vm) for name, vm in self.hypervisor.vms().items() if vm.state is VmState.RUNNING
        ]
        for some in _slices(running, VMS_PER_SLICE):
            for name, vm in some:
                for cpu in vm.pcpus():
                    holders.setdefault(cpu, []).append(name)
            yield
        rows = []
        for index, some in enumerate(_slices(cpus, CPUS_PER_SLICE)):
            if index:
                yield
            for cpu in some:
                rows.append(self._cpu_row(cpu, holders))
        return rows

    def _cpu_row(self, cpu: int, holders: dict[int, list[str]]) -> dict[str, Any]:
        # cpu_report reads the online file once (CpuFreq.state): not read here again,
        # a sysfs read of each CPU fewer (issue #16: show_cpus is its reads).
        row = self.power.cpu_report(cpu)
        if not row["online"]:
            return {"cpu": cpu, "online": False, "policy": row["policy"]}
        # What it cannot do and why: no turbo, no EPP, a policy shared with others, ...
        row["unsupported"] = self.cpufreq.unsupported_on(cpu)
        try:
            # e.g. hybrid LP E-cores whose base_frequency is their minimum
            note = self.cpufreq.note(cpu)
        except VmpowerError:
            note = ""
        if note:
            row["note"] = note
        row["vms"] = sorted(holders.get(cpu, []))
        # Everyone with a wish on it: VMs, FIFOs, policies, "operator", "session:<key>".
        row["wishers"] = sorted({*row["wishes"], *row["limits"]})  # type: ignore[misc]
        return row

    def cmd_show_policies(self, _req: dict[str, Any], _cred: PeerCred) -> list[dict[str, Any]]:
        return [policy_row(p) for _, p in sorted(self.power.policies.items())]

    # -- changing ----------------------------------------------------------------------

    def cmd_add_vm(self, req: dict[str, Any], _cred: PeerCred) -> Steps:
        name = req.get("vm")
        if not isinstance(name, str) or not name:
            raise ControlError('missing "vm": the VM name')
        # libvirt's part runs on the hypervisor's worker while the loop serves guests (the
        # loop waited for it: 1-6 ms a call under guest traffic, issue #16); the command
        # is parked meanwhile, at most CALL_WAIT_S, as add_vm would wait.
        before = self.channels.indexes(name)
        try:
            job = self.hypervisor.add_vm_start(name)
            if job is not None:
                if not job.wait(0):
                    # Resumed when the job finished or the wait is over; add_vm_finish
                    # refuses in the second case, as add_vm would.
                    deadline = time.monotonic() + CALL_WAIT_S
                    yield lambda: job.wait(0) or time.monotonic() >= deadline
                self.hypervisor.add_vm_finish(name, job)
        except VmpowerError as exc:
            raise ControlError(str(exc)) from None
        self.lifecycle.sync_vm(name)
        # The channels opened since the command came: by this sync, or by the sync of the
        # "defined" event add_vm queues, when the loop handled it while the command waited.
        return {"vm": name, "opened": sorted(self.channels.indexes(name) - before)}

    def cmd_rm_vm(self, req: dict[str, Any], _cred: PeerCred) -> dict[str, Any]:
        vm = self._vm_arg(req)
        self.lifecycle.vm_gone(vm.name)
        self.hypervisor.remove_vm(vm.name)
        return {"vm": vm.name, "removed": True}

    def cmd_add_channels(self, req: dict[str, Any], _cred: PeerCred) -> dict[str, Any]:
        vm = self._vm_arg(req)
        try:
            # Re-reads the XML and the directory through libvirt's worker thread: refused
            # at once while libvirt is not responding (issue #11, point 4).
            self.hypervisor.refresh(vm.name)
            vm = self.hypervisor.vm(vm.name)
        except VmpowerError as exc:
            raise ControlError(str(exc)) from None
        if vm.state is not VmState.RUNNING:
            raise ControlError(f"{vm.name} is not running ({vm.state.name.lower()})")
        wanted = self._channel_list(vm, req)
        known = {ch.index for ch in vm.channels}
        missing = wanted - known
        if missing:
            raise ControlError(
                f"{vm.name} has no channel {format_cpu_list(missing)} "
                f"(known: {format_cpu_list(known) or 'none'})"
            )
        self.lifecycle.sync_vm(vm.name, only=wanted)
        return {"vm": vm.name, "channels": sorted(wanted)}

    def cmd_set_channel_status(self, req: dict[str, Any], _cred: PeerCred) -> dict[str, Any]:
        vm = self._vm_arg(req)
        status = req.get("status")
        if status not in ("enabled", "disabled"):
            raise ControlError('status must be "enabled" or "disabled"')
        wanted = self._channel_list(vm, req)
        for index in wanted:
            self.channels.set_enabled(vm.name, index, status == "enabled")
        return {"vm": vm.name, "channels": sorted(wanted), "status": status}

    def cmd_set_pcpu(self, req: dict[str, Any], _cred: PeerCred) -> dict[str, Any]:
        vm = self._vm_arg(req)
        vcpu = req.get("vcpu")
        if isinstance(vcpu, bool) or not isinstance(vcpu, int) or not 0 <= vcpu < vm.vcpu_count:
            raise ControlError(f"vCPU must be 0-{vm.vcpu_count - 1} for {vm.name}, got {vcpu!r}")
        try:
            cpus = parse_cpu_list(str(req.get("cpus", "")))
        except CpuListError as exc:
            raise ControlError(str(exc)) from None
        if not cpus:
            raise ControlError("no host CPU given")
        host_cpus = self.hypervisor.host_cpu_count()
        for cpu in cpus:
            if cpu >= host_cpus:
                raise ControlError(f"host CPU {cpu} out of range (0-{host_cpus - 1})")
        try:
            self.hypervisor.set_pcpu(vm.name, vcpu, cpus)
        except VmpowerError as exc:
            raise ControlError(str(exc)) from None
        self.lifecycle.pinning_changed(vm.name)
        return {"vm": vm.name, "vcpu": vcpu, "pcpus": format_cpu_list(cpus)}

    def cmd_set_query(self, req: dict[str, Any], _cred: PeerCred) -> dict[str, Any]:
        vm = self._vm_arg(req)
        enable = req.get("enable")
        if not isinstance(enable, bool):
            raise ControlError('"enable" must be true or false')
        if enable:
            self.power.query_allowed.add(vm.name)
        else:
            self.power.query_allowed.discard(vm.name)
        return {"vm": vm.name, "query": enable}

    def cmd_set_cpu_freq(self, req: dict[str, Any], cred: PeerCred) -> dict[str, Any]:
        op = req.get("op")
        if op == RELEASE:
            # The operator's wish goes: the CPU follows the wishes left, or is restored.
            wanted = req.get("cpu")
            cpus = None if wanted == "all" else [self._cpu_arg(wanted)]
            try:
                released = self.power.release(OPERATOR, cpus)
            except VmpowerError as exc:
                raise ControlError(str(exc)) from None
            return {"cpu": wanted, "released": released}
        cpu = self._cpu_arg(req.get("cpu"))
        unit = UNIT_BY_OP.get(op) if isinstance(op, str) else None
        if unit is None:
            ops = ", ".join((*UNIT_BY_OP, RELEASE))
            raise ControlError(f"op must be one of {ops}, got {op!r}")
        try:
            freq_khz = self.power.set_cpu_freq(OPERATOR, cpu, unit)
        except VmpowerError as exc:
            raise ControlError(str(exc)) from None
        return {"cpu": cpu, "freq_khz": freq_khz}


def policy_row(policy: PolicyRecord) -> dict[str, Any]:
    return {
        "owner": policy.owner,
        "type": policy.spec.type.name,
        "cpus": format_cpu_list(policy.cpus),
        "last_decision": policy.last_decision,
        "last_decision_at": policy.last_decision_at,
    }
