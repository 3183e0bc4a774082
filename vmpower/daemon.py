"""vmpowerd: builds and wires the agent, runs its monitor loop, handles signals.

The Agent owns nothing clever itself: it connects the parts (restore journal,
cpufreq, hypervisor, channels, request handler, control socket) and keeps the
bookkeeping of which channels each VM has. Everything runs on the monitor thread;
libvirt's event thread only enqueues and wakes it.

Signals: SIGTERM/SIGINT stop reading, restore every setting and exit 0; SIGHUP
reloads the configuration file (what can change live does; the rest is logged as
needing a restart).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from datetime import tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from vmpower import __version__
from vmpower.channels import ChannelState, FifoChannel, TokenBucket, VmChannel
from vmpower.config import Config, config_to_toml, load_config
from vmpower.control import Command, ControlServer, PeerCred
from vmpower.cpufreq import CpuFreq, open_cpufreq
from vmpower.cpuset import format_cpu_list, parse_cpu_list
from vmpower.errors import ConfigError, ControlError, CpuListError, VmpowerError
from vmpower.events import EventQueue
from vmpower.hypervisor import Hypervisor, VmEvent, VmInfo, VmState
from vmpower.monitor import Monitor
from vmpower.policies import PolicyEngine
from vmpower.power import PowerManager
from vmpower.protocol import Unit
from vmpower.restore import RestoreJournal
from vmpower.sysfs import Sysfs
from vmpower.telemetry.service import BatchService

log = logging.getLogger("vmpower.daemon")

RECONNECT_PERIOD_S = 1.0
HYPERVISOR_CHECK_S = 0.5  # liveness check of the libvirt connection when nothing happens
LOCK_NAME = "vmpowerd.lock"

_UNITS = {
    "up": Unit.SCALE_UP,
    "down": Unit.SCALE_DOWN,
    "max": Unit.SCALE_MAX,
    "min": Unit.SCALE_MIN,
    "enable_turbo": Unit.ENABLE_TURBO,
    "disable_turbo": Unit.DISABLE_TURBO,
}


class InstanceLock:
    """An exclusive flock in state.dir: one vmpowerd per host (channels connect once)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self.fd = -1

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise VmpowerError(
                    f"another vmpowerd (pid {holder}) is running: it holds {self.path}"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Agent:
    """The running host agent: all parts wired on one monitor loop."""

    def __init__(
        self,
        config: Config,
        config_path: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.clock = clock
        self.monitor = Monitor(clock)
        self.lock = InstanceLock(config.state.dir)
        self.journal: RestoreJournal | None = None
        self.cpufreq: CpuFreq | None = None
        self.hypervisor: Hypervisor | None = None
        self.power: PowerManager | None = None
        self.control: ControlServer | None = None
        self.batches: BatchService | None = None
        self.events = EventQueue(clock=clock, wake=self.monitor.wake)
        self.policies: PolicyEngine | None = None
        self.channels: dict[tuple[str, int], VmChannel] = {}
        self.fifos: dict[int, FifoChannel] = {}
        self.disabled_channels: set[tuple[str, int]] = set()
        self.started_at = time.time()
        self._pending_signals: list[int] = []
        self._hypervisor_pending = True
        self._hypervisor_check_at = 0.0
        self._stopped = False

    # -- start and stop ----------------------------------------------------------------

    def start(self) -> None:
        cfg = self.config
        self.lock.acquire()
        try:
            self._start_parts(cfg)
        except BaseException:
            self.lock.release()
            raise

    def _start_parts(self, cfg: Config) -> None:
        self.journal = RestoreJournal(cfg.state.dir)
        report = self.journal.recover()
        if report.restored or report.failed:
            log.warning(
                "a previous run did not finish: restored %d settings it had changed (%d failed)",
                len(report.restored),
                len(report.failed),
            )
        sysfs = Sysfs(cfg.cpufreq.sysfs_root, journal=self.journal)
        self.cpufreq = open_cpufreq(sysfs, cfg.cpufreq.reserved_cpus)
        managed = [c for c in self.cpufreq.cpus() if self.cpufreq.managed(c)]
        log.info(
            "cpufreq under %s: %d CPUs, managed %s, reserved %s",
            cfg.cpufreq.sysfs_root,
            len(self.cpufreq.cpus()),
            format_cpu_list(managed) or "none",
            format_cpu_list(cfg.cpufreq.reserved_cpus) or "none",
        )
        cfg.channels.dir.mkdir(parents=True, exist_ok=True)
        self.hypervisor = Hypervisor(
            cfg.libvirt.uri,
            cfg.channels.dir,
            wake=self.monitor.wake,
            clock=self.clock,
            reconnect_min_s=cfg.libvirt.reconnect_min_s,
            reconnect_max_s=cfg.libvirt.reconnect_max_s,
            map_refresh_s=cfg.libvirt.map_refresh_s,
            track_all=cfg.libvirt.track_all,
        )
        self.hypervisor.connect()
        self.power = PowerManager(
            self.cpufreq, self.hypervisor, self.journal, cfg.cpufreq.reserved_cpus, self.clock
        )
        self.monitor.add_ticker(self.events)
        self.policies = PolicyEngine(
            self.power,
            self.events,
            period_s=cfg.policies.period_s,
            branch_period_s=cfg.policies.branch_period_s,
            branch_threshold=cfg.policies.branch_threshold,
            msr_root=cfg.policies.msr_root,
            traffic=self.hypervisor.interface_stats,
            timezone=_timezone(cfg.policies.timezone),
        )
        self.policies.start()
        for cpu in sorted(cfg.channels.fifo_cpus):
            self._open_fifo(cpu)
        for name in sorted(self.hypervisor.vms()):
            self._sync_vm(name)
        # Batch sessions; start() restores what sessions of a crashed run left.
        self.batches = BatchService(cfg, self.monitor, self.cpufreq, self.hypervisor)
        self.batches.start()
        self.control = ControlServer(
            cfg.control.socket, self.monitor, self._commands(), cfg.control.mode, cfg.control.group
        )
        self.control.start()
        self.monitor.add_end_of_turn(self._end_of_turn)
        self.monitor.add_ticker(_HypervisorTicker(self, self.hypervisor))
        self._schedule_reconnects()
        log.info(
            "vmpowerd %s ready: libvirt %s, %d VMs, %d channels",
            __version__,
            cfg.libvirt.uri,
            len(self.hypervisor.vms()),
            len(self.channels),
        )

    def run(self) -> None:
        self.monitor.run()

    def request_stop(self) -> None:
        """Ask the loop to stop (safe from signal handlers and other threads)."""
        self.monitor.stop()

    def shutdown(self) -> None:
        """Stop reading, restore every setting, release everything. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        for channel in list(self.channels.values()):
            self._close_channel(channel)
        self.channels.clear()
        for fifo in list(self.fifos.values()):
            self.monitor.remove(fifo.fileno())
            fifo.close()
        self.fifos.clear()
        if self.policies is not None:
            self.policies.stop()
        if self.batches is not None:
            self.batches.close()  # each session's server restores its controls first
        if self.power is not None:
            self.power.restore_all()
        if self.control is not None:
            self.control.close()
        if self.hypervisor is not None:
            self.hypervisor.close()
        if self.cpufreq is not None:
            self.cpufreq.sysfs.close()
        self.monitor.close()
        self.lock.release()
        log.info("vmpowerd stopped; every setting restored")

    # -- the loop's hooks --------------------------------------------------------------

    def _end_of_turn(self) -> None:
        if self._pending_signals:
            self._handle_signals()
        assert self.hypervisor is not None and self.power is not None
        now = self.clock()
        if self._hypervisor_pending or now >= self._hypervisor_check_at:
            # Only when libvirt's thread queued something, or once a period for the
            # liveness check and reconnects: not on every turn of a busy loop.
            self._hypervisor_pending = False
            self._hypervisor_check_at = now + HYPERVISOR_CHECK_S
            for event in self.hypervisor.process_events():
                self._on_vm_event(event)
        for channel in self.power.flush():
            self._flush(channel)

    def _hypervisor_woke(self) -> None:
        """libvirt's thread queued an event (or a deadline came): handle it next turn."""
        self._hypervisor_pending = True
        self.monitor.wake()

    def _flush(self, channel: Any) -> None:
        if isinstance(channel, VmChannel) and channel.sock is not None and not channel.flush():
            self.monitor.add_writer(channel.fileno(), lambda _fd, c=channel: self._drain(c))

    def _drain(self, channel: VmChannel) -> None:
        if channel.flush() and channel.sock is not None:
            self.monitor.remove_writer(channel.fileno())

    def _on_vm_event(self, event: VmEvent) -> None:
        assert self.hypervisor is not None and self.power is not None
        log.info("libvirt: %s %s %s", event.kind, event.vm or "", event.detail)
        if event.kind in ("stopped", "undefined") and event.vm:
            self._vm_gone(event.vm)
        elif event.kind in ("started", "defined", "resumed") and event.vm:
            self._sync_vm(event.vm)
        elif event.kind == "pinning" and event.vm:
            self._pinning_changed(event.vm)
        elif event.kind == "connection_restored":
            for name in sorted(self.hypervisor.vms()):
                self._sync_vm(name)
                self._pinning_changed(name)
            for vm in {vm for vm, _ in self.channels} - set(self.hypervisor.vms()):
                self._vm_gone(vm)

    def _pinning_changed(self, name: str) -> None:
        assert self.hypervisor is not None and self.power is not None
        try:
            info = self.hypervisor.vm(name)
        except VmpowerError:
            return
        self.power.pinning_changed(info)

    def _vm_gone(self, name: str) -> None:
        """A VM stopped or left: close its channels, free its CPUs."""
        assert self.power is not None
        for key in [k for k in self.channels if k[0] == name]:
            self._close_channel(self.channels.pop(key))
        self.power.requester_gone(name)

    # -- channels ----------------------------------------------------------------------

    def _bucket(self) -> TokenBucket:
        return TokenBucket(self.config.channels.rate_per_s, self.config.channels.burst, self.clock)

    def _sync_vm(self, name: str, only: set[int] | None = None) -> list[int]:
        """Open the channels of a running, tracked VM (from XML and the directory)."""
        assert self.hypervisor is not None
        try:
            info = self.hypervisor.vm(name)
        except VmpowerError:
            return []
        if info.state is not VmState.RUNNING or not self.hypervisor.tracked(name):
            return []
        opened = []
        for ch in info.channels:
            if only is not None and ch.index not in only:
                continue
            key = (name, ch.index)
            channel = self.channels.get(key)
            if channel is None or channel.path != ch.path:
                if channel is not None:
                    self._close_channel(channel)
                channel = VmChannel(
                    name, ch.index, ch.path, self._bucket(), self.config.channels.send_queue_max
                )
                channel.enabled = key not in self.disabled_channels
                self.channels[key] = channel
                opened.append(ch.index)
            if channel.state is ChannelState.DISCONNECTED:
                self._connect(channel)
        return opened

    def _connect(self, channel: VmChannel) -> None:
        state = channel.connect()
        if state is ChannelState.CONNECTED:
            self._connected(channel)
        elif state is ChannelState.CONNECTING:
            self.monitor.add_writer(channel.fileno(), lambda _fd, c=channel: self._finish(c))

    def _finish(self, channel: VmChannel) -> None:
        fd = channel.fileno()
        self.monitor.remove(fd)
        if channel.finish_connect() is ChannelState.CONNECTED:
            self._connected(channel)

    def _connected(self, channel: VmChannel) -> None:
        log.info("%s: channel %d of %s connected", channel.path, channel.index, channel.vm)
        self.monitor.add_reader(channel.fileno(), lambda _fd, c=channel: self._readable(c))

    def _readable(self, channel: VmChannel) -> None:
        packets = channel.receive()
        if packets is None:
            log.info("%s: channel of %s closed by the other end", channel.path, channel.vm)
            self.monitor.remove(channel.fileno())
            channel.close()  # reconnected by the periodic check while the VM runs
            return
        if packets:
            assert self.power is not None
            self.power.handle_vm_packets(channel, packets)

    def _close_channel(self, channel: VmChannel) -> None:
        if channel.sock is not None:
            self.monitor.remove(channel.fileno())
        channel.close()

    def _schedule_reconnects(self) -> None:
        def tick() -> None:
            if self._stopped:
                return
            for channel in list(self.channels.values()):
                if channel.state is ChannelState.DISCONNECTED:
                    self._connect(channel)
            if self.power is not None:
                self.power.refresh_cpus()  # CPUs hot-plugged since: refuse or serve them
            self.monitor.call_later(RECONNECT_PERIOD_S, tick)

        self.monitor.call_later(RECONNECT_PERIOD_S, tick)

    def _open_fifo(self, cpu: int) -> None:
        assert self.power is not None
        fifo = FifoChannel(self.config.channels.dir, cpu, self._bucket())
        try:
            fifo.open()
        except OSError as exc:
            log.error("%s: cannot open FIFO: %s", fifo.path, exc)
            return
        self.fifos[cpu] = fifo

        def readable(_fd: int, f: FifoChannel = fifo) -> None:
            assert self.power is not None
            messages = f.receive()
            if messages:
                self.power.handle_fifo_messages(f, messages)

        self.monitor.add_reader(fifo.fileno(), readable)

    # -- signals -----------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, _frame: object) -> None:
            # Only note it and wake the loop: the loop thread acts at the end of its turn.
            self._pending_signals.append(signum)
            self.monitor.wake()

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, on_signal)

    def _handle_signals(self) -> None:
        signals, self._pending_signals = self._pending_signals, []
        for signum in signals:
            if signum == signal.SIGHUP:
                self.reload()
            else:
                log.info("%s: stopping", signal.Signals(signum).name)
                self.monitor.stop()

    def reload(self) -> None:
        """Re-read the configuration file; apply what can change while running."""
        if self.config_path is None:
            log.warning("SIGHUP: no configuration file to reload")
            return
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("SIGHUP: configuration not reloaded, keeping the running one: %s", exc)
            return
        old = self.config
        for section in ("libvirt", "cpufreq", "state", "control"):
            for key in ("uri", "sysfs_root", "dir", "socket"):
                if getattr(getattr(old, section), key, None) != getattr(
                    getattr(new, section), key, None
                ):
                    log.warning(
                        "SIGHUP: %s.%s changed: takes effect at the next restart", section, key
                    )
        self.config = new
        logging.getLogger("vmpower").setLevel(new.log.level.upper())
        assert self.power is not None
        self.power.reserved_cpus = new.cpufreq.reserved_cpus
        for channel in list(self.channels.values()) + list(self.fifos.values()):
            channel.bucket = self._bucket()
            if isinstance(channel, VmChannel):
                channel.send_queue_max = new.channels.send_queue_max
        for cpu in sorted(set(self.fifos) - new.channels.fifo_cpus):
            fifo = self.fifos.pop(cpu)
            self.monitor.remove(fifo.fileno())
            fifo.close()
        for cpu in sorted(new.channels.fifo_cpus - set(self.fifos)):
            self._open_fifo(cpu)
        log.info("SIGHUP: configuration reloaded from %s", self.config_path)

    # -- control commands --------------------------------------------------------------

    def _commands(self) -> dict[str, Command]:
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
            **(self.batches.commands() if self.batches is not None else {}),
        }

    def _vm_arg(self, request: dict[str, Any]) -> VmInfo:
        assert self.hypervisor is not None
        name = request.get("vm")
        if not isinstance(name, str) or not name:
            raise ControlError('missing "vm": the VM name')
        try:
            return self.hypervisor.vm(name)
        except VmpowerError:
            raise ControlError(f"unknown VM {name!r} (list_vms shows the known ones)") from None

    def _cpu_arg(self, value: Any) -> int:
        assert self.cpufreq is not None
        cpus = self.cpufreq.cpus()
        if isinstance(value, bool) or not isinstance(value, int):
            raise ControlError(f"host CPU must be an integer, got {value!r}")
        if value not in cpus:
            raise ControlError(f"host CPU {value} out of range (0-{max(cpus)})")
        return value

    def _channel_list(self, vm: VmInfo, request: dict[str, Any]) -> set[int]:
        spec = request.get("channels", "all")
        if spec == "all":
            return {ch.index for ch in vm.channels} | {i for v, i in self.channels if v == vm.name}
        try:
            if isinstance(spec, list):
                return {int(x) for x in spec}
            return set(parse_cpu_list(str(spec)))
        except (ValueError, CpuListError):
            raise ControlError(f"bad channel list {spec!r}: use all, 0,1 or 0-3") from None

    def cmd_status(self, _req: dict[str, Any], _cred: PeerCred) -> dict[str, Any]:
        assert self.hypervisor and self.power and self.journal
        stats = self.power.stats
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "libvirt": self.hypervisor.status(),
            "vms": len(self.hypervisor.vms()),
            "channels": len(self.channels),
            "channels_connected": sum(
                1 for c in self.channels.values() if c.state is ChannelState.CONNECTED
            ),
            "fifos": sorted(self.fifos),
            "requests": stats.requests,
            "acks": stats.acks,
            "nacks": stats.nacks,
            "writes": stats.writes,
            "writes_skipped": stats.writes_skipped,
            "write_failures": stats.write_failures,
            "pending_restore": len(self.journal.pending()),
            "reserved_cpus": format_cpu_list(self.power.reserved_cpus),
        }

    def cmd_list_vms(self, _req: dict[str, Any], _cred: PeerCred) -> list[dict[str, Any]]:
        assert self.hypervisor is not None and self.power is not None
        rows = []
        for name, vm in sorted(self.hypervisor.vms().items()):
            chans = [c for (v, _), c in self.channels.items() if v == name]
            rows.append(
                {
                    "name": name,
                    "state": vm.state.name.lower(),
                    "vcpus": vm.vcpu_count,
                    "pcpus": format_cpu_list(vm.pcpus()),
                    "tracked": self.hypervisor.tracked(name),
                    "channels": len(chans),
                    "connected": sum(1 for c in chans if c.state is ChannelState.CONNECTED),
                    "query": name in self.power.query_allowed,
                }
            )
        return rows

    def cmd_show_vm(self, req: dict[str, Any], _cred: PeerCred) -> dict[str, Any]:
        assert self.hypervisor is not None and self.power is not None
        vm = self._vm_arg(req)
        host_cpus = self.hypervisor.host_cpu_count()
        vcpus = []
        for vcpu, cpus in enumerate(vm.vcpu_pcpus):
            vcpus.append(
                {
                    "vcpu": vcpu,
                    "pcpus": format_cpu_list(cpus),
                    "pinned": bool(cpus) and len(cpus) < host_cpus,
                }
            )
        channels = []
        known = {ch.index: ch for ch in vm.channels}
        for index in sorted(set(known) | {i for v, i in self.channels if v == vm.name}):
            channel = self.channels.get((vm.name, index))
            if channel is not None:
                channels.append(channel.describe())
            else:
                channels.append(
                    {
                        "index": index,
                        "path": known[index].path,
                        "state": "closed",
                        "enabled": (vm.name, index) not in self.disabled_channels,
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
            "policy": _policy_row(policy) if policy else None,
        }

    def cmd_show_cpus(self, req: dict[str, Any], _cred: PeerCred) -> list[dict[str, Any]]:
        assert self.cpufreq is not None and self.power is not None and self.hypervisor
        wanted = req.get("cpu")
        cpus = self.cpufreq.cpus() if wanted in (None, "all") else [self._cpu_arg(wanted)]
        holders: dict[int, list[str]] = {}
        for name, vm in self.hypervisor.vms().items():
            if vm.state is VmState.RUNNING:
                for cpu in vm.pcpus():
                    holders.setdefault(cpu, []).append(name)
        rows = []
        for cpu in cpus:
            if not self.cpufreq.online(cpu):
                rows.append({"cpu": cpu, "online": False})
                continue
            row = self.power.cpu_report(cpu)
            row["vms"] = sorted(holders.get(cpu, []))
            rows.append(row)
        return rows

    def cmd_show_policies(self, _req: dict[str, Any], _cred: PeerCred) -> list[dict[str, Any]]:
        assert self.power is not None
        return [_policy_row(p) for _, p in sorted(self.power.policies.items())]

    def cmd_add_vm(self, req: dict[str, Any], _cred: PeerCred) -> dict[str, Any]:
        assert self.hypervisor is not None
        name = req.get("vm")
        if not isinstance(name, str) or not name:
            raise ControlError('missing "vm": the VM name')
        try:
            self.hypervisor.add_vm(name)
        except VmpowerError as exc:
            raise ControlError(str(exc)) from None
        return {"vm": name, "opened": self._sync_vm(name)}

    def cmd_rm_vm(self, req: dict[str, Any], _cred: PeerCred) -> dict[str, Any]:
        assert self.hypervisor is not None
        vm = self._vm_arg(req)
        self._vm_gone(vm.name)
        self.hypervisor.remove_vm(vm.name)
        return {"vm": vm.name, "removed": True}

    def cmd_add_channels(self, req: dict[str, Any], _cred: PeerCred) -> dict[str, Any]:
        assert self.hypervisor is not None
        vm = self._vm_arg(req)
        self.hypervisor.refresh(vm.name)
        vm = self.hypervisor.vm(vm.name)
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
        self._sync_vm(vm.name, only=wanted)
        return {"vm": vm.name, "channels": sorted(wanted)}

    def cmd_set_channel_status(self, req: dict[str, Any], _cred: PeerCred) -> dict[str, Any]:
        vm = self._vm_arg(req)
        status = req.get("status")
        if status not in ("enabled", "disabled"):
            raise ControlError('status must be "enabled" or "disabled"')
        wanted = self._channel_list(vm, req)
        for index in wanted:
            key = (vm.name, index)
            if status == "enabled":
                self.disabled_channels.discard(key)
            else:
                self.disabled_channels.add(key)
            channel = self.channels.get(key)
            if channel is not None:
                channel.enabled = status == "enabled"
        return {"vm": vm.name, "channels": sorted(wanted), "status": status}

    def cmd_set_pcpu(self, req: dict[str, Any], _cred: PeerCred) -> dict[str, Any]:
        assert self.hypervisor is not None and self.power is not None
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
        for cpu in cpus:
            if cpu >= self.hypervisor.host_cpu_count():
                raise ControlError(
                    f"host CPU {cpu} out of range (0-{self.hypervisor.host_cpu_count() - 1})"
                )
        try:
            self.hypervisor.set_pcpu(vm.name, vcpu, cpus)
        except VmpowerError as exc:
            raise ControlError(str(exc)) from None
        self.power.pinning_changed(self.hypervisor.vm(vm.name))
        return {"vm": vm.name, "vcpu": vcpu, "pcpus": format_cpu_list(cpus)}

    def cmd_set_query(self, req: dict[str, Any], _cred: PeerCred) -> dict[str, Any]:
        assert self.power is not None
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
        assert self.power is not None
        cpu = self._cpu_arg(req.get("cpu"))
        op = req.get("op")
        unit = _UNITS.get(op) if isinstance(op, str) else None
        if unit is None:
            raise ControlError(f"op must be one of {', '.join(_UNITS)}, got {op!r}")
        try:
            freq_khz = self.power.set_cpu_freq("operator", cpu, unit)
        except VmpowerError as exc:
            raise ControlError(str(exc)) from None
        return {"cpu": cpu, "freq_khz": freq_khz}


class _HypervisorTicker:
    """Lets the loop wake for the hypervisor's reconnect timer."""

    def __init__(self, agent: Agent, hypervisor: Hypervisor) -> None:
        self.agent = agent
        self.hypervisor = hypervisor

    def next_due(self) -> float | None:
        return self.hypervisor.next_deadline()

    def run_due(self) -> int:
        self.agent._hypervisor_pending = True  # its reconnect deadline came
        return 0


def _policy_row(policy: Any) -> dict[str, Any]:
    packet = policy.packet
    fifo = policy.fifo
    kind = None
    if packet is not None and packet.policy_enum is not None:
        kind = packet.policy_enum.name
    elif fifo is not None and fifo.policy_type is not None:
        kind = fifo.policy_type.name
    return {
        "owner": policy.owner,
        "type": kind,
        "cpus": format_cpu_list(policy.cpus),
        "last_decision": policy.last_decision,
        "last_decision_at": policy.last_decision_at,
    }


def _timezone(name: str) -> tzinfo | None:
    """The TIME policies' zone: empty means local time."""
    if not name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise VmpowerError(f"policies.timezone: unknown time zone {name!r}") from None


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about readiness; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", address, exc)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vmpowerd",
        description="vmpower host agent: applies VM guests' power requests to host CPUs.",
    )
    parser.add_argument("--config", "-c", type=Path, help="configuration file (TOML)")
    parser.add_argument(
        "--check-config",
        type=Path,
        metavar="FILE",
        help="validate FILE, print the effective configuration, exit",
    )
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), help="override log.level"
    )
    parser.add_argument("--version", action="version", version=f"vmpowerd {__version__}")
    args = parser.parse_args(argv)

    if args.check_config is not None:
        try:
            config = load_config(args.check_config)
        except ConfigError as exc:
            print(f"vmpowerd: {exc}", file=sys.stderr)
            return 2
        print(config_to_toml(config), end="")
        return 0

    config = Config()
    if args.config is not None:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"vmpowerd: {exc}", file=sys.stderr)
            return 2
    setup_logging(args.log_level or config.log.level)
    agent = Agent(config, args.config)
    try:
        agent.start()
    except VmpowerError as exc:
        log.error("cannot start: %s", exc)
        return 1
    agent.install_signal_handlers()
    sd_notify("READY=1")
    try:
        agent.run()
    finally:
        sd_notify("STOPPING=1")
        agent.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
