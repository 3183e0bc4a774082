"""vmpowerd: builds and wires the agent, runs its monitor loop, handles signals.

The Agent owns nothing clever itself: it builds the parts once (restore journal,
cpufreq, hypervisor, channel registry, request handler, VM lifecycle, policies, batch
sessions, control socket with the admin commands) into ``Parts`` and hooks them onto
the monitor loop. Everything runs on the monitor thread; libvirt's event thread only
enqueues and wakes it.

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
from dataclasses import dataclass
from datetime import tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from vmpower import __version__
from vmpower.admin import AdminCommands
from vmpower.channels import ChannelRegistry
from vmpower.config import Config, config_to_toml, load_config
from vmpower.control import ControlServer
from vmpower.cpufreq import CpuFreq, open_cpufreq
from vmpower.cpuset import format_cpu_list
from vmpower.errors import ConfigError, VmpowerError
from vmpower.events import EventQueue
from vmpower.hypervisor import Hypervisor
from vmpower.lifecycle import VmLifecycle
from vmpower.monitor import Monitor
from vmpower.policies import PolicyEngine
from vmpower.power import PowerManager
from vmpower.restore import RestoreJournal
from vmpower.sysfs import Sysfs
from vmpower.telemetry.service import BatchService

log = logging.getLogger("vmpower.daemon")

RECONNECT_PERIOD_S = 1.0
HYPERVISOR_CHECK_S = 0.5  # liveness check of the libvirt connection when nothing happens
LOCK_NAME = "vmpowerd.lock"


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


@dataclass(frozen=True)
class Parts:
    """The running agent's parts, built once by ``Agent.start``; none is ever missing."""

    journal: RestoreJournal
    cpufreq: CpuFreq
    hypervisor: Hypervisor
    power: PowerManager
    channels: ChannelRegistry
    lifecycle: VmLifecycle
    policies: PolicyEngine
    batches: BatchService
    control: ControlServer


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
        self.events = EventQueue(clock=clock, wake=self.monitor.wake)
        self.started_at = time.time()
        self._parts: Parts | None = None
        self._pending_signals: list[int] = []
        self._stopped = False

    @property
    def parts(self) -> Parts:
        if self._parts is None:
            raise RuntimeError("the agent is not started")
        return self._parts

    # -- start and stop ----------------------------------------------------------------

    def start(self) -> None:
        self.lock.acquire()
        try:
            self._parts = self._build(self.config)
        except BaseException:
            self.lock.release()
            raise
        self._wire(self._parts)

    def _build(self, cfg: Config) -> Parts:
        """Build every part, in dependency order (the journal recovers first)."""
        journal = RestoreJournal(cfg.state.dir)
        report = journal.recover()
        if report.restored or report.failed:
            log.warning(
                "a previous run did not finish: restored %d settings it had changed (%d failed)",
                len(report.restored),
                len(report.failed),
            )
        sysfs = Sysfs(cfg.cpufreq.sysfs_root, journal=journal)
        cpufreq = open_cpufreq(sysfs, cfg.cpufreq.reserved_cpus)
        managed = [c for c in cpufreq.cpus() if cpufreq.managed(c)]
        log.info(
            "cpufreq under %s: %d CPUs, managed %s, reserved %s",
            cfg.cpufreq.sysfs_root,
            len(cpufreq.cpus()),
            format_cpu_list(managed) or "none",
            format_cpu_list(cfg.cpufreq.reserved_cpus) or "none",
        )
        cfg.channels.dir.mkdir(parents=True, exist_ok=True)
        hypervisor = Hypervisor(
            cfg.libvirt.uri,
            cfg.channels.dir,
            wake=self.monitor.wake,
            clock=self.clock,
            reconnect_min_s=cfg.libvirt.reconnect_min_s,
            reconnect_max_s=cfg.libvirt.reconnect_max_s,
            map_refresh_s=cfg.libvirt.map_refresh_s,
            track_all=cfg.libvirt.track_all,
        )
        hypervisor.connect()
        power = PowerManager(cpufreq, hypervisor, journal, cfg.cpufreq.reserved_cpus, self.clock)
        channels = ChannelRegistry(
            self.monitor,
            cfg.channels.dir,
            power.handle_vm_packets,
            power.handle_fifo_messages,
            rate_per_s=cfg.channels.rate_per_s,
            burst=cfg.channels.burst,
            send_queue_max=cfg.channels.send_queue_max,
            clock=self.clock,
        )
        power.send_replies = channels.send
        lifecycle = VmLifecycle(hypervisor, channels, power)
        policies = PolicyEngine(
            power,
            self.events,
            period_s=cfg.policies.period_s,
            branch_period_s=cfg.policies.branch_period_s,
            branch_threshold=cfg.policies.branch_threshold,
            msr_root=cfg.policies.msr_root,
            traffic=hypervisor.interface_stats,
            timezone=_timezone(cfg.policies.timezone),
        )
        # Batch sessions; start() restores what sessions of a crashed run left.
        batches = BatchService(cfg, self.monitor, cpufreq, hypervisor)
        admin = AdminCommands(
            hypervisor, power, cpufreq, channels, lifecycle, journal, self.started_at
        )
        control = ControlServer(
            cfg.control.socket,
            self.monitor,
            {**admin.commands(), **batches.commands()},
            cfg.control.mode,
            cfg.control.group,
        )
        return Parts(
            journal, cpufreq, hypervisor, power, channels, lifecycle, policies, batches, control
        )

    def _wire(self, parts: Parts) -> None:
        """Start the parts on the loop: channels, sessions, control, the turn's hooks."""
        cfg = self.config
        self.monitor.add_ticker(self.events)
        parts.policies.start()
        for cpu in sorted(cfg.channels.fifo_cpus):
            parts.channels.open_fifo(cpu)
        parts.lifecycle.sync_all()
        parts.batches.start()
        parts.control.start()
        pump = _HypervisorPump(parts.hypervisor, parts.lifecycle, self.clock)
        self.monitor.add_ticker(pump)
        # Each turn ends with: signals, then libvirt's news, then this turn's writes and
        # replies (a VM that stopped this turn gets no ACK for a CPU it gave up).
        self.monitor.add_end_of_turn(self._handle_signals)
        self.monitor.add_end_of_turn(pump.end_of_turn)
        self.monitor.add_end_of_turn(parts.power.finish_turn)
        self._schedule_reconnects()
        log.info(
            "vmpowerd %s ready: libvirt %s, %d VMs, %d channels",
            __version__,
            cfg.libvirt.uri,
            len(parts.hypervisor.vms()),
            len(parts.channels.vm_channels),
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
        parts = self._parts
        if parts is not None:
            parts.channels.close_all()
            parts.policies.stop()
            parts.batches.close()  # each session's server restores its controls first
            parts.power.restore_all()
            parts.control.close()
            parts.hypervisor.close()
            parts.cpufreq.close()
        self.monitor.close()
        self.lock.release()
        log.info("vmpowerd stopped; every setting restored")

    def _schedule_reconnects(self) -> None:
        def tick() -> None:
            if self._stopped:
                return
            parts = self.parts
            parts.channels.reconnect()
            parts.power.refresh_cpus()  # CPUs hot-plugged since: refuse or serve them
            self.monitor.call_later(RECONNECT_PERIOD_S, tick)

        self.monitor.call_later(RECONNECT_PERIOD_S, tick)

    # -- signals -----------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, _frame: object) -> None:
            # Only note it and wake the loop: the loop thread acts at the end of its turn.
            self._pending_signals.append(signum)
            self.monitor.wake()

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, on_signal)

    def _handle_signals(self) -> None:
        if not self._pending_signals:
            return
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
        parts = self.parts
        parts.power.reserved_cpus = new.cpufreq.reserved_cpus
        parts.channels.set_limits(
            new.channels.rate_per_s, new.channels.burst, new.channels.send_queue_max
        )
        parts.channels.set_fifo_cpus(new.channels.fifo_cpus)
        log.info("SIGHUP: configuration reloaded from %s", self.config_path)


class _HypervisorPump:
    """Hands libvirt's queued news to the VM lifecycle, on the monitor thread.

    The hypervisor's queue is drained at the end of a turn when its reconnect deadline
    came (this is the loop's ticker for it), and at least every HYPERVISOR_CHECK_S for
    the liveness check: not on every turn of a busy loop.
    """

    def __init__(
        self, hypervisor: Hypervisor, lifecycle: VmLifecycle, clock: Callable[[], float]
    ) -> None:
        self.hypervisor = hypervisor
        self.lifecycle = lifecycle
        self.clock = clock
        self.pending = True
        self.check_at = 0.0

    def next_due(self) -> float | None:
        return self.hypervisor.next_deadline()

    def run_due(self) -> int:
        self.pending = True  # the reconnect deadline came
        return 0

    def end_of_turn(self) -> None:
        now = self.clock()
        if self.pending or now >= self.check_at:
            self.pending = False
            self.check_at = now + HYPERVISOR_CHECK_S
            for event in self.hypervisor.process_events():
                self.lifecycle.on_event(event)


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
