"""vmpowerd: builds and wires the agent, runs its monitor loop, handles signals.

The Agent owns nothing clever itself: it builds the parts once (restore journal,
cpufreq, hypervisor, channel registry, request handler, VM lifecycle, policies, batch
sessions, control socket with the admin commands) into ``Parts`` and hooks them onto
the monitor loop. Everything runs on the monitor thread; libvirt's event thread only
enqueues and wakes it.

Signals: SIGTERM/SIGINT stop reading, restore every setting and exit 0 (1 when a
setting could not be restored: it is named, and kept in the journal for the next
start); SIGHUP reloads the configuration file (what can change live does; the rest is
logged as needing a restart). The handlers are installed before anything can change
(the lock, the journal's recovery, FIFOs), so a signal during the start only ends it
early and cleanly; one that comes before them (while Python imports the modules) kills
with the default action, when nothing has changed yet.

Under systemd (``Type=notify``, ``vmpower.notify``): READY=1 once serving, STATUS=
lines with the VMs and channels served (when they change, at most once a second),
WATCHDOG=1 from a monitor timer every WATCHDOG_USEC/2 (a hung loop stops them, and
systemd restarts the service), RELOADING=1 then READY=1 around a SIGHUP reload, with a
STATUS= line saying whether it was applied, and STOPPING=1.
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import tzinfo
from pathlib import Path
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from vmpower import __version__, preflight, trust
from vmpower.admin import AdminCommands
from vmpower.channels import ChannelLogs, ChannelRegistry
from vmpower.config import (
    CONFIG_ENV,
    Config,
    ConfigProblems,
    config_problems,
    config_to_toml,
    default_config_path,
    load_config,
)
from vmpower.config_reload import RELOAD_LIVE, changed_keys, merge, value
from vmpower.conflicts import ConflictWatch
from vmpower.control import ControlServer
from vmpower.cpufreq import CpuFreq, open_cpufreq
from vmpower.cpuset import format_cpu_list
from vmpower.energy import EnergyAccount
from vmpower.errors import ConfigError, VmpowerError
from vmpower.events import EventQueue
from vmpower.heap import HeapKeeper
from vmpower.hotplug import CpuEventSource, CpuHotplug, KernelCpuEvents
from vmpower.hypervisor import Hypervisor
from vmpower.instancelock import InstanceLock
from vmpower.lifecycle import VmLifecycle
from vmpower.logbook import KindLogs
from vmpower.logsetup import setup_logging
from vmpower.metrics import SnapshotBuilder
from vmpower.monitor import Monitor
from vmpower.notify import Notifier, SystemdReports, one_line
from vmpower.policies import PolicyEngine
from vmpower.power import PowerLogs, PowerManager
from vmpower.restore import RestoreJournal
from vmpower.sysfs import Sysfs
from vmpower.telemetry.service import BatchService

if TYPE_CHECKING:
    # Imported when metrics.listen is set (_start_observability): prometheus_client and
    # http.server are not loaded by a daemon that serves no endpoint (issue #16).
    from vmpower.metrics_http import MetricsExporter

log = logging.getLogger("vmpower.daemon")

RECONNECT_PERIOD_S = 1.0
HYPERVISOR_CHECK_S = 0.5  # liveness check of the libvirt connection when nothing happens
WARM_CPUS = 8  # CPUs read ahead per turn after start (about 2 ms of the loop)
LOOP_SWITCH_INTERVAL_S = 0.001  # sys.setswitchinterval: see main()
# Exit status (vmpowerd --help lists them).
EXIT_OK = 0  # a clean stop: every setting restored
EXIT_FAILURE = 1  # cannot start, or settings left unrestored (kept in the journal)
EXIT_CONFIG = 2  # bad configuration
EXIT_STATUS_HELP = """signals:
  SIGTERM, SIGINT  stop: restore every setting changed, then exit
  SIGHUP           reload the configuration file (what cannot change live is logged)

exit status:
  0  clean stop: every setting restored
  1  cannot start, or settings left unrestored (kept in the journal for the next start)
  2  bad configuration (every problem is listed)"""


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
        notifier: Notifier | None = None,
        cpu_events: Callable[[], CpuEventSource] | None = None,
        proc_root: str = "/proc",
        heap: HeapKeeper | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.clock = clock
        # systemd's notify socket; disabled unless given (main() builds it from the env)
        self.notifier = notifier if notifier is not None else Notifier({})
        self.monitor = Monitor(clock)
        self.lock = InstanceLock(config.state.dir)
        self.events = EventQueue(clock=clock, wake=self.monitor.wake)
        self.started_at = time.time()
        self._parts: Parts | None = None
        # libvirt's news (an event queued on its thread, a worker result applied): marks
        # the pump due and wakes the loop, so the news is handled in that very turn.
        self._libvirt_news = _NewsFlag(self.monitor.wake)
        self._pending_signals: list[int] = []
        self._stopped = False
        self._unrestored: list[str] = []  # journal entries shutdown could not restore
        self._kind_logs = KindLogs(())  # the monitor ticker of the logs by kind
        # Observability (issue #15): lifetime energy books and the Prometheus endpoint.
        self.energy: EnergyAccount | None = None
        self.metrics: MetricsExporter | None = None
        self._snapshots: SnapshotBuilder | None = None
        # CPU hotplug from the kernel's uevents (issue #13): the source is passed in, the
        # kernel's netlink socket by default; and the other power managers under /proc.
        self._cpu_events = cpu_events if cpu_events is not None else KernelCpuEvents
        self.hotplug: CpuHotplug | None = None
        self.conflict_watch = ConflictWatch(self.monitor, proc_root)
        # What VMs arriving after the start build, kept out of the collector's passes
        # as main() keeps the start's (None: the collector is left alone, in process).
        self.heap = heap

    @property
    def stopped(self) -> bool:
        """True once shutdown() began: timers stop re-arming."""
        return self._stopped

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
        try:
            self._wire(self._parts)
        except BaseException:
            self.shutdown()  # FIFOs, sockets, settings: what the wiring began is undone
            raise

    def _build(self, cfg: Config) -> Parts:
        """Build every part, in dependency order (the journal recovers first)."""
        # Only files under the sysfs root and MSRs under the msr root are ever written
        # back: a journal naming anything else is refused entry by entry (vmpower.restore).
        journal = RestoreJournal(
            cfg.state.dir,
            file_roots=[cfg.cpufreq.sysfs_root],
            msr_roots=[cfg.policies.msr_root],
        )
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
        # The channel directory decides who may speak as a VM: trusted as sshd's
        # StrictModes would, else no start (vmpower.trust); after the journal's recovery,
        # so a refusal here never leaves a crashed run's settings in place.
        trust.ensure_channel_dir(cfg.channels.dir, trust.configure(cfg.channels.qemu_user))
        hypervisor = Hypervisor(
            cfg.libvirt.uri,
            cfg.channels.dir,
            wake=self._libvirt_news.set,
            clock=self.clock,
            reconnect_min_s=cfg.libvirt.reconnect_min_s,
            reconnect_max_s=cfg.libvirt.reconnect_max_s,
            map_refresh_s=cfg.libvirt.map_refresh_s,
            track_all=cfg.libvirt.track_all,
            # libvirt calls run on the hypervisor's worker thread, never on this loop's
            # (a hung libvirtd must not hold guests and operators: issue #11, point 4).
            post=self.monitor.call_soon_threadsafe,
        )
        hypervisor.connect()
        # What repeats (refusals, frequency changes, dropped replies) is logged by kind:
        # one summary line per source per interval, driven as monitor tickers.
        power_logs = PowerLogs.build(cfg.log.summary_interval_s, self.clock)
        channel_logs = ChannelLogs.build(cfg.log.summary_interval_s, self.clock)
        kind_logs = (*power_logs.all(), *channel_logs.all())
        self._kind_logs = KindLogs(kind_logs)  # log.summary_interval_s applies on reload
        self.monitor.add_ticker(self._kind_logs)
        power = PowerManager(
            cpufreq, hypervisor, journal, cfg.cpufreq.reserved_cpus, self.clock, logs=power_logs
        )
        channels = ChannelRegistry(
            self.monitor,
            cfg.channels.dir,
            power.handle_vm_packets,
            power.handle_fifo_messages,
            rate_per_s=cfg.channels.rate_per_s,
            burst=cfg.channels.burst,
            send_queue_max=cfg.channels.send_queue_max,
            clock=self.clock,
            logs=channel_logs,
        )
        power.send_replies = channels.send
        lifecycle = VmLifecycle(
            hypervisor, channels, power, kept=self.heap.note_kept if self.heap else None
        )
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
        # Their control writes are wishes of `power`, the one arbiter (issue #12, point 5).
        batches = BatchService(cfg, self.monitor, cpufreq, hypervisor, power=power)
        # Energy books for the daemon's lifetime: package energy (intel-rapl under the
        # sysfs root) shared among VMs by vCPU time; vCPU times come from the libvirt
        # worker (vmpower.energy). A host without readable zones keeps no books.
        energy = EnergyAccount(
            cfg.cpufreq.sysfs_root,
            hypervisor.read_vcpu_times,
            self.clock,
            period_s=cfg.metrics.energy_period_s,
            vcpu_pins=hypervisor.vcpu_pins,
        )
        self.energy = energy if energy.enabled else None
        if self.energy is None:
            energy.close()
        admin = AdminCommands(
            hypervisor,
            power,
            cpufreq,
            channels,
            lifecycle,
            journal,
            self.started_at,
            energy=self.energy,
            loop=self.monitor.stats,
            conflicts=self.conflict_watch.conflicts,
        )
        control = ControlServer(
            cfg.control.socket,
            self.monitor,
            {**admin.commands(), **batches.commands()},
            cfg.control.mode,
            cfg.control.group,
            log_interval_s=cfg.log.summary_interval_s,
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
        # Subscribed to CPU uevents before the control socket exists: once operators
        # (and tests) can talk to the daemon, no hotplug goes unseen.
        self._watch_hotplug(parts)
        parts.control.start()
        pump = _HypervisorPump(parts.hypervisor, parts.lifecycle, self.clock, self._libvirt_news)
        self.monitor.add_ticker(pump)
        # Each turn ends with: signals, then libvirt's news, then this turn's writes and
        # replies (a VM that stopped this turn gets no ACK for a CPU it gave up).
        self.monitor.add_end_of_turn(self._handle_signals)
        self.monitor.add_end_of_turn(pump.end_of_turn)
        self.monitor.add_end_of_turn(parts.power.finish_turn)
        if self.heap is not None:  # after the replies: the pass is not in their round trip
            self.monitor.add_end_of_turn(self.heap.end_of_turn)
        # A policy installed while the evaluation slept wakes it (not a check per turn).
        parts.power.policy_installed = parts.policies.ensure_running
        self._schedule_reconnects()
        self._schedule_warm_up(parts)
        self.conflict_watch.start()
        self._start_observability(parts)
        log.info(
            "vmpowerd %s ready: libvirt %s, %d VMs, %d channels",
            __version__,
            cfg.libvirt.uri,
            len(parts.hypervisor.vms()),
            len(parts.channels.vm_channels),
        )

    def _start_observability(self, parts: Parts) -> None:
        """The energy books' timer and, when metrics.listen is set, the endpoint."""
        cfg = self.config
        energy = self.energy
        if energy is not None:
            period_s = cfg.metrics.energy_period_s

            def tick() -> None:
                if self._stopped:
                    return
                energy.tick()
                self.monitor.call_later(period_s, tick)

            energy.tick()  # the first vCPU read: shares from the second one on
            self.monitor.call_later(period_s, tick)
            log.info(
                "energy books: intel-rapl packages %s, shared among VMs every %g s",
                ",".join(map(str, energy.packages())),
                period_s,
            )
        if cfg.metrics.listen:
            from vmpower.metrics_http import MetricsExporter

            self._snapshots = SnapshotBuilder(
                power=parts.power,
                cpufreq=parts.cpufreq,
                hypervisor=parts.hypervisor,
                channels=parts.channels,
                journal=parts.journal,
                energy=energy,
                conflicts=self.conflict_watch.conflicts,
            )
            # Built on this (monitor) thread only; the HTTP threads ask through the loop.
            self.metrics = MetricsExporter(
                cfg.metrics.listen, self._snapshots.build, self.monitor.call_soon_threadsafe
            )
            self.metrics.start()

    def run(self) -> None:
        self.monitor.run()

    def request_stop(self) -> None:
        """Ask the loop to stop (safe from signal handlers and other threads)."""
        self.monitor.stop()

    def shutdown(self) -> bool:
        """Stop reading, restore every setting, release everything. Idempotent.

        Returns True when every setting is back. Otherwise the journal keeps the others
        for the next start, which restores them first; the journal logged each one with
        its reason, and this names them all in one line.
        """
        if self._stopped:
            return not self._unrestored
        self._stopped = True
        parts = self._parts
        if self.metrics is not None:
            try:
                self.metrics.close()
            except Exception:
                log.exception("shutdown: closing the metrics endpoint failed; going on")
        for closer in (self._snapshots, self.energy):
            if closer is not None:
                closer.close()
        if parts is not None:
            steps: tuple[tuple[str, Callable[[], object]], ...] = (
                ("closing the channels", parts.channels.close_all),
                ("stopping the policies", parts.policies.stop),
                # each session's server restores its controls first
                ("closing the batch sessions", parts.batches.close),
                ("closing the CPU uevents", self._close_hotplug),
                ("restoring the settings", parts.power.restore_all),
                ("closing the control socket", parts.control.close),
                ("closing libvirt", parts.hypervisor.close),
                ("closing cpufreq", parts.cpufreq.close),
            )
            for what, step in steps:
                try:
                    step()
                except Exception:  # one part's failure must not keep the others open
                    log.exception("shutdown: %s failed; going on", what)
            self._unrestored = sorted(parts.journal.pending())
        self.monitor.close()
        self.lock.release()
        if self._unrestored:
            log.error(
                "vmpowerd stopped; %d settings not restored, kept in the journal %s for the"
                " next start: %s",
                len(self._unrestored),
                parts.journal.path if parts is not None else "",
                ", ".join(self._unrestored),
            )
            return False
        log.info("vmpowerd stopped; every setting restored")
        return True

    def _close_hotplug(self) -> None:
        self.conflict_watch.stop()
        if self.hotplug is not None:
            self.hotplug.close()
            self.hotplug = None

    def _watch_hotplug(self, parts: Parts) -> None:
        """CPU uevents on the loop: an offline CPU refused, a returning one set again.
        No uevents (no netlink here): hotplug is not followed, and the log says so."""
        try:
            source = self._cpu_events()
        except Exception as exc:  # pyudev/libudev missing, netlink refused
            log.warning(
                "CPU hotplug is not followed (kernel uevents unavailable: %s): a CPU"
                " going offline fails its requests; one coming back is set at its next"
                " request",
                exc,
            )
            return
        self.hotplug = CpuHotplug(
            self.monitor, source, parts.power.cpus_changed, parts.cpufreq.cpus
        )

    def _schedule_warm_up(self, parts: Parts) -> None:
        """Read every CPU's first-request state ahead (PowerManager.warm), WARM_CPUS per
        turn so no turn holds guests long: the first contact of 256 CPUs then costs
        their writes only (issue #16)."""
        cpus = parts.cpufreq.cpus()

        def step(start: int = 0) -> None:
            if self._stopped or start >= len(cpus):
                return
            parts.power.warm(cpus[start : start + WARM_CPUS])
            self.monitor.call_later(0.0, lambda: step(start + WARM_CPUS))

        self.monitor.call_later(0.0, step)

    def _schedule_reconnects(self) -> None:
        def tick() -> None:
            if self._stopped:
                return
            parts = self.parts
            parts.channels.reconnect()
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
                self._reload_notified()
            else:
                log.info("%s: stopping", signal.Signals(signum).name)
                self.monitor.stop()

    def _reload_notified(self) -> None:
        """SIGHUP under systemd: RELOADING=1, the reload, then READY=1 with a STATUS= line
        saying whether it was applied (sd_notify(3), Type=notify-reload)."""
        self.notifier.reloading()
        applied, summary = self.reload()
        if applied:
            text = "configuration reloaded" + (f": {summary}" if summary else "")
        else:
            text = "reload NOT applied, running configuration kept" + (
                f": {summary}" if summary else ""
            )
        self.notifier.ready(one_line(text))

    def reload(self) -> tuple[bool, str]:
        """Re-read the configuration file: every changed key is applied live or named as
        needing a restart (RELOAD_LIVE, RELOAD_RESTART). Returns (applied?, one line):
        False when nothing was applied (no file, or a bad one: the running configuration
        stays, and the line says why). The hook for systemd's RELOADING=1/READY=1/STATUS=.
        """
        if self.config_path is None:
            summary = "no configuration file to reload"
            log.warning("SIGHUP: %s", summary)
            return False, summary
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("SIGHUP: configuration not reloaded, keeping the running one: %s", exc)
            return False, str(exc)
        old = self.config
        changed = changed_keys(old, new)
        restart = [k for k in changed if k not in RELOAD_LIVE]
        live = [k for k in changed if k in RELOAD_LIVE]
        for key in restart:
            log.warning(
                "SIGHUP: %s changed (%r → %r): needs a restart to take effect",
                key,
                value(old, key),
                value(new, key),
            )
        # What needs a restart keeps its running value: the running config stays whole.
        effective = merge(old, new, live)
        try:
            self._apply_live(old, effective)
        except VmpowerError as exc:
            log.error("SIGHUP: configuration not reloaded, keeping the running one: %s", exc)
            return False, str(exc)
        self.config = effective
        summary = f"applied {', '.join(live) or 'nothing new'}" + (
            f"; needs a restart: {', '.join(restart)}" if restart else ""
        )
        log.info("SIGHUP: configuration reloaded from %s: %s", self.config_path, summary)
        return True, summary

    def _apply_live(self, old: Config, new: Config) -> None:
        """Hand every RELOAD_LIVE key's value to the part that uses it."""
        # Checked before anything changes: a bad zone name keeps the whole old config.
        timezone = _timezone(new.policies.timezone)
        logging.getLogger("vmpower").setLevel(new.log.level.upper())
        parts = self.parts
        interval_s = new.log.summary_interval_s
        for kind_log in (*self._kind_logs.logs, parts.control.errors):
            kind_log.interval_s = interval_s
        parts.hypervisor.set_map_refresh(new.libvirt.map_refresh_s)
        parts.channels.set_limits(
            new.channels.rate_per_s, new.channels.burst, new.channels.send_queue_max
        )
        parts.channels.set_fifo_cpus(new.channels.fifo_cpus)
        if new.cpufreq.reserved_cpus != old.cpufreq.reserved_cpus:
            # Both ways, everywhere: PowerManager and CpuFreq refuse the newly reserved
            # CPUs (restored at the end of this turn) and serve the others; batch
            # sessions read the configuration when they start and when they write.
            parts.power.reserved_cpus = new.cpufreq.reserved_cpus
        parts.policies.reconfigure(
            period_s=new.policies.period_s,
            branch_period_s=new.policies.branch_period_s,
            branch_threshold=new.policies.branch_threshold,
            timezone=timezone,
        )
        # telemetry.*: read by each start_batch (sessions running keep what they got).
        parts.batches.reconfigure(new)


class _NewsFlag:
    """Set from any thread (libvirt's event thread, the monitor thread) when the
    hypervisor has news; the monitor thread takes it at the end of the turn.

    Setting is one attribute store then the monitor's eventfd wake: no lock is needed,
    since only the monitor thread clears it, and it clears before draining (a set that
    races the drain leaves the flag set for the next turn, never lost).
    """

    __slots__ = ("_set", "_wake")

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._set = False

    def set(self) -> None:
        self._set = True
        self._wake()

    def take(self) -> bool:
        was, self._set = self._set, False
        return was


class _HypervisorPump:
    """Hands libvirt's queued news to the VM lifecycle, on the monitor thread.

    The hypervisor's queue is drained at the end of the turn in which libvirt woke the
    loop (``news``: an event queued on libvirt's thread, or a worker's result applied
    in this turn's thread-safe calls, such as the re-read that follows an event), when
    its reconnect deadline came (this is the loop's ticker for it), and at least every
    HYPERVISOR_CHECK_S for the liveness check: not on every turn of a busy loop.
    """

    def __init__(
        self,
        hypervisor: Hypervisor,
        lifecycle: VmLifecycle,
        clock: Callable[[], float],
        news: _NewsFlag,
    ) -> None:
        self.hypervisor = hypervisor
        self.lifecycle = lifecycle
        self.clock = clock
        self.news = news
        self.pending = True
        self.check_at = 0.0

    def next_due(self) -> float | None:
        return self.hypervisor.next_deadline()

    def run_due(self) -> int:
        self.pending = True  # the reconnect deadline came
        return 0

    def end_of_turn(self) -> None:
        now = self.clock()
        news = self.news.take()
        if news or self.pending or now >= self.check_at:
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


def _status_line(agent: Agent) -> str:
    """systemd's STATUS=: what is served (counts kept as channels change, no walk)."""
    channels = agent.parts.channels
    tally = channels.tally
    return (
        f"serving {len(tally.per_vm)} VMs on {len(channels.vm_channels)} channels"
        f" ({tally.connected} connected)"
    )


def build_parser() -> argparse.ArgumentParser:
    default = default_config_path()
    parser = argparse.ArgumentParser(
        prog="vmpowerd",
        description="vmpower host agent: applies VM guests' power requests to host CPUs."
        f"\nWithout --config it reads {default} when that file exists"
        f"\n(${CONFIG_ENV} names another file), else it runs on the built-in defaults.",
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", "-c", type=Path, metavar="FILE", help=f"configuration file (default: {default})"
    )
    parser.add_argument(
        "--check-config",
        type=Path,
        metavar="FILE",
        nargs="?",
        const=default,
        help="run every start-up check on FILE (default: the default file), print the"
        " effective configuration or every problem (exit 2), and exit",
    )
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=("debug", "info", "warning", "error"),
        help="override log.level (any case)",
    )
    parser.add_argument("--version", action="version", version=f"vmpowerd {__version__}")
    return parser


def _print_problems(problems: list[ConfigError]) -> None:
    for problem in problems:
        print(f"vmpowerd: {problem}", file=sys.stderr)
    if len(problems) > 1:
        print(f"vmpowerd: {len(problems)} problems", file=sys.stderr)


def check_config(path: Path) -> int:
    """--check-config: the loader's and every start-up check's problems, all of them."""
    try:
        config = load_config(path)
        found: list[ConfigError] = []
    except ConfigProblems as exc:
        config, found = exc.partial or Config(), list(exc.problems)
    except ConfigError as exc:  # unreadable, not TOML: nothing more can be checked
        _print_problems([exc])
        return EXIT_CONFIG
    found += preflight.problems(config, str(path), paths=True)
    if found:
        _print_problems(found)
        return EXIT_CONFIG
    print(config_to_toml(config), end="")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.check_config is not None:
        return check_config(args.check_config)

    config_path: Path | None = args.config
    if config_path is None and default_config_path().exists():
        config_path = default_config_path()
    config = Config()
    if config_path is not None:
        try:
            config = load_config(config_path)
        except ConfigError as exc:
            _print_problems(config_problems(exc))
            return EXIT_CONFIG
    problems = preflight.problems(config, str(config_path or "<defaults>"))
    if problems:
        _print_problems(problems)
        return EXIT_CONFIG
    setup_logging(args.log_level or config.log.level, sys.stderr)
    notifier = Notifier()
    # The loop thread shares the interpreter with helpers (libvirt worker and event
    # threads, conflict scan, metrics): after each system call it waits for the lock up
    # to the switch interval (5 ms by default) while a helper runs Python, and every
    # guest waits with it. 1 ms bounds that wait (issue #16: 12-22 ms holds of status
    # and list_vms during the helpers' work at start).
    sys.setswitchinterval(LOOP_SWITCH_INTERVAL_S)
    agent = Agent(config, config_path, notifier=notifier, heap=HeapKeeper())
    # Before anything can change: a SIGTERM during the start is noted, and the loop's
    # first turn stops; the default action would kill a half-done start.
    agent.install_signal_handlers()
    if config_path is None:
        log.info(
            "no configuration file (%s does not exist): built-in defaults", default_config_path()
        )
    # No cyclic collection during the start: it builds some ten objects a channel, all
    # kept, and each full pass walked them again (0.19 s of a 4000-VM start, issue #16).
    # The start leaves no cycles worth a pass (a collection after it found 36 objects
    # at 4000 VMs, for 0.1 s).
    gc.disable()
    try:
        agent.start()
    except (VmpowerError, OSError) as exc:  # one line naming the cause, no traceback
        log.error("cannot start: %s", exc)
        notifier.status(one_line(f"cannot start: {exc}"))
        return EXIT_FAILURE
    finally:
        # What the start built (VMs, channels, tables) is kept for the daemon's life:
        # out of the collector's generations, a full collection no longer walks it (one
        # took 25 ms inside a loop turn at 1000 VMs). The collector runs from here on.
        gc.freeze()
        gc.enable()
    reports = SystemdReports(
        agent.monitor,
        notifier,
        status_line=lambda: _status_line(agent),
        running=lambda: not agent.stopped,
    )
    reports.last_status = reports.status_line()
    notifier.ready(reports.last_status)
    reports.start()
    try:
        agent.run()
    finally:
        notifier.stopping("stopping: restoring every setting")
        restored = agent.shutdown()
    return EXIT_OK if restored else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
