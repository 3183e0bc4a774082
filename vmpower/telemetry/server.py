"""The batch server: one process per session, serving one client (model: GEOPM BatchServer).

The daemon starts it with fork followed at once by exec of a fresh interpreter
(``python -m vmpower.telemetry.server --session-dir DIR --barrier ME,THEM,PIPE``), so
nothing here inherits the daemon's threads or locks. This module owns the server's life:

1. Set-up: check that the client is still the process the daemon accepted (a pidfd,
   then start time, uid and gid compared, docs/telemetry.md section 5: no pid reuse), open
   every reader and control file, create both value buffers and the channel (0600,
   owned by the client), then place one barrier: the daemon answers ``start_batch`` only
   then. A failure prints one line on stdout (the daemon's pipe) and exits instead.
2. Serving, on one epoll loop, no polling: the channel's FIFO (transitions: ``c`` attach,
   ``r`` read, ``w`` write, ``q`` quit), the client's pidfd (its exit), the barrier (the
   daemon aborts it to stop the session, and its pipe hangs up if the daemon dies),
   signals, and the periodic event queue (continuous mode samples into the signal
   buffer under its sequence lock; energy counters are refreshed so a wrap is never
   missed). The first transition is the client's attach: every name is then unlinked
   (GEOPM does the same), both sides keep their mappings.
3. Ending (client quit or exit, daemon stop or exit, a signal): tell a waiting client
   (``q``), remove the files, exit. On the client's quit the server first tells the
   daemon that the session's limits go, so the CPUs are as before when the client's
   stop returns; otherwise the daemon drops them when it reaps the server.

Controls (issue #12, point 5): the server never writes a cpufreq file. A ``w``
transition's values become the session's frequency limits, sent to the daemon's control
socket (``session_limits``, accepted only from this server's pid), where the daemon's
one arbiter applies them as the session's wishes and its restore journal records the
true originals. The session directory's journal is kept for sessions of older
versions a crash left behind.

VM signals: the server opens its own read-only libvirt connection to the daemon's URI
(it is a fresh process, so that is safe), only when a VM signal is asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from vmpower import control
from vmpower.barrier import CHILD, Barrier, BarrierFds, BarrierTimeout
from vmpower.errors import ControlError, TelemetryError, VmpowerError
from vmpower.events import EventQueue
from vmpower.restore import RestoreJournal
from vmpower.sysfs import Sysfs
from vmpower.telemetry.catalog import VM, Topology
from vmpower.telemetry.channel import STOP, ControllerGone, WorkerChannel
from vmpower.telemetry.session import (
    SessionSpec,
    process_ids,
    process_start_ticks,
    remove_session_dir,
    remove_session_files,
    session_paths,
    session_prefix,
)
from vmpower.telemetry.shm import KIND_CONTROLS, KIND_SIGNALS, ValueBuffer
from vmpower.telemetry.sources import ControlApplier, LibvirtVmTimes, Limits, Sampler, Sources

log = logging.getLogger("vmpower.batch")

ENERGY_REFRESH_S = 30.0
"""How often energy counters are read even when nobody asks (a wrap takes minutes)."""

SEND_TIMEOUT_S = 3.0
"""How long a control write waits for the daemon (it answers in one loop turn)."""

EXIT_OK = 0
EXIT_SETUP_FAILED = 2
EXIT_RESTORE_FAILED = 3


class BatchServer:
    """One session's server; ``setup()`` then ``run()`` (which returns the exit status)."""

    def __init__(
        self,
        spec: SessionSpec,
        session_dir: Path,
        barrier: Barrier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.session_dir = session_dir
        self.barrier = barrier
        self.clock = clock
        self.paths = session_paths(spec.shm_dir, spec.key)
        self.journal: RestoreJournal | None = None
        self.sources: Sources | None = None
        self.sampler: Sampler | None = None
        self.applier: ControlApplier | None = None
        self.signals: ValueBuffer | None = None
        self.controls: ValueBuffer | None = None
        self.channel: WorkerChannel | None = None
        self._client_fd = -1
        self._attached = False
        self._reason: str | None = None

    # -- set-up ------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything the client will need; VmpowerError (cleaned up) when impossible."""
        try:
            self._setup()
        except BaseException:
            self._release()
            remove_session_files(self.spec.shm_dir, self.spec.key)
            raise

    def _setup(self) -> None:
        spec = self.spec
        self._watch_client()
        self.journal = RestoreJournal(self.session_dir)
        sysfs = Sysfs(spec.sysfs_root, journal=self.journal)
        vms = sorted({str(r.index) for r in spec.signals if r.domain == VM})
        topology = Topology.discover(Sysfs(spec.sysfs_root), vms=vms)
        vm_times = None
        if vms:
            uri = spec.libvirt_uri
            vm_times = lambda: LibvirtVmTimes(uri)  # noqa: E731 - opened only if needed
        self.sources = Sources(
            sysfs, Sysfs(spec.powercap_root), Path(spec.proc_root), topology, vm_times, self.clock
        )
        self.sampler = Sampler(self.sources, spec.signals)
        self.applier = ControlApplier(self.sources, spec.controls, self._send_limits)
        # Stale files of a crashed session with this key go first (same name maker).
        remove_session_files(spec.shm_dir, spec.key)
        owner = spec.owner
        self.signals = ValueBuffer.create(
            self.paths.signals, KIND_SIGNALS, len(spec.signals), owner
        )
        self.controls = ValueBuffer.create(
            self.paths.controls, KIND_CONTROLS, len(spec.controls), owner
        )
        self.channel = WorkerChannel(
            spec.shm_dir, session_prefix(spec.key), create=True, owner=owner
        )
        if spec.period_s is not None:
            self.signals.write(self.sampler.sample())  # continuous readers start with data

    def _send_limits(self, limits: Limits) -> None:
        """The session's limits to the daemon, which applies and journals them (the one
        writer of cpufreq files, issue #12 point 5); TelemetryError with its refusal."""
        if not self.spec.control_socket:
            raise TelemetryError("no daemon control socket to send controls to")
        try:
            control.request(
                self.spec.control_socket,
                "session_limits",
                timeout_s=SEND_TIMEOUT_S,
                server_key=self.spec.key,
                limits=[[cpu, lo, hi] for cpu, (lo, hi) in sorted(limits.items())],
            )
        except ControlError as exc:
            raise TelemetryError(str(exc)) from None

    def _watch_client(self) -> None:
        spec = self.spec
        try:
            self._client_fd = os.pidfd_open(spec.client_pid)
        except ProcessLookupError:
            raise VmpowerError(f"the client (pid {spec.client_pid}) has exited") from None
        except OSError as exc:
            raise VmpowerError(f"cannot watch the client pid {spec.client_pid}: {exc}") from None
        # The pidfd now pins the process; make sure it is the one the daemon accepted,
        # not a newer one that reused the pid in between.
        ticks = process_start_ticks(spec.client_pid, spec.pid_root)
        ids = process_ids(spec.client_pid, spec.pid_root)
        if ticks != spec.client_start_ticks or ids != (spec.client_uid, spec.client_gid):
            raise VmpowerError(
                f"the client (pid {spec.client_pid}) has exited (its pid was reused)"
            )

    # -- serving ---------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until the session ends; restore, clean up and return the exit status."""
        assert self.channel is not None and self.sources is not None
        epoll = select.epoll()
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        handlers: dict[int, Callable[[int], None]] = {
            self.channel.fileno(): self._on_channel,
            self._client_fd: lambda _ev: self._end("the client exited"),
            wake_r: lambda _ev: _drain(wake_r),
        }
        epoll.register(self.channel.fileno(), select.EPOLLIN)
        epoll.register(self._client_fd, select.EPOLLIN)
        epoll.register(wake_r, select.EPOLLIN)
        if self.barrier is not None:
            _me_fd, them_fd, pipe_fd = self.barrier.fds()
            handlers[them_fd] = self._on_daemon
            handlers[pipe_fd] = self._on_daemon
            epoll.register(them_fd, select.EPOLLIN)
            epoll.register(pipe_fd, 0)  # EPOLLERR/EPOLLHUP are always reported
        previous = self._install_signals(wake_w)
        queue = EventQueue(self.clock)
        if self.spec.period_s is not None:
            queue.register(self.spec.period_s, self._sample_continuous)
        if self.sources.has_energy():
            queue.register(ENERGY_REFRESH_S, lambda _id, _data: self._refresh_counters())
        timed = not queue.is_empty()  # no timer at all: skip the queue on the hot path
        channel_fd = self.channel.fileno()
        on_channel = self._on_channel
        poll = epoll.poll
        try:
            while self._reason is None:
                timeout = -1.0
                if timed:
                    due = queue.next_due()
                    if due is not None:
                        timeout = max(0.0, due - self.clock())
                for fd, events in poll(timeout):
                    if fd == channel_fd:
                        on_channel(events)
                        continue
                    handler = handlers.get(fd)
                    if handler is not None and self._reason is None:
                        handler(events)
                if timed and self._reason is None:
                    queue.run_due()
        except Exception as exc:  # a bug, or a block the client scribbled on: still restore
            log.exception("session %s: serving failed", self.spec.key)
            self._end(f"internal error: {exc}")
        finally:
            signal.set_wakeup_fd(previous)
            epoll.close()
            os.close(wake_r)
            os.close(wake_w)
        return self.shutdown()

    def _install_signals(self, wake_w: int) -> int:
        def on_signal(signum: int, _frame: object) -> None:
            self._end(f"{signal.Signals(signum).name} received")

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, on_signal)
        return signal.set_wakeup_fd(wake_w)

    def _on_daemon(self, _events: int) -> None:
        assert self.barrier is not None
        try:
            self.barrier.wait_abortion(timeout_s=0)
        except BarrierTimeout:
            return  # a barrier, not an abortion: nothing the server waits for
        self._end("the daemon ended the session (stop_batch, shutdown or exit)")

    def _on_channel(self, events: int) -> None:
        channel = self.channel
        assert channel is not None
        try:
            transition = channel.next_transition(events)
        except ControllerGone:
            self._end("the client closed its channel")
            return
        if transition is None:
            return
        if transition is STOP:
            self._end("the client stopped the channel")
            return
        if not self._attached:
            # The client has mapped everything: no name needs to exist any longer.
            self._attached = True
            remove_session_files(self.spec.shm_dir, self.spec.key)
        code = transition.code
        if code == "r":
            assert self.sampler is not None and self.signals is not None
            self.signals.write(self.sampler.sample())
            channel.finish()
        elif code == "w":
            assert self.applier is not None and self.controls is not None
            try:
                self.applier.apply(self.controls.read())
            except VmpowerError as exc:
                channel.finish(1, str(exc).encode())
                return
            channel.finish()
        elif code == "c":
            channel.finish()
        elif code == "q":
            # Restore before answering: when the client's stop returns, it is done.
            assert self.applier is not None
            try:
                self.applier.release()
            except VmpowerError as exc:  # the daemon drops them when it reaps this server
                log.warning("session %s: releasing its limits: %s", self.spec.key, exc)
            self._restore()
            channel.finish()
            self._end("the client quit")
        else:
            channel.finish(1, f"unknown transition code {code!r} (r, w, c or q)".encode())

    def _sample_continuous(self, _event_id: int, _data: object) -> None:
        assert self.sampler is not None and self.signals is not None
        self.signals.write(self.sampler.sample())

    def _refresh_counters(self) -> None:
        assert self.sources is not None
        self.sources.refresh_counters()

    def _end(self, reason: str) -> None:
        if self._reason is None:
            self._reason = reason

    # -- ending ------------------------------------------------------------------------------

    def _restore(self) -> bool:
        """Put every control back; False if some could not be (kept in the journal)."""
        if self.journal is None:
            return True
        report = self.journal.restore()
        if report.restored:
            log.info("session %s: restored %d settings", self.spec.key, len(report.restored))
        return report.ok

    def shutdown(self) -> int:
        """Tell a waiting client, restore, remove the files; the exit status."""
        log.info("session %s ends: %s", self.spec.key, self._reason or "shutdown")
        if self.channel is not None and self._reason != "the client quit":
            self.channel.quit()
        restored = self._restore()
        self._release()
        remove_session_files(self.spec.shm_dir, self.spec.key)
        if not restored:
            log.error(
                "session %s: some settings could not be restored; the journal in %s keeps"
                " them for the daemon to retry",
                self.spec.key,
                self.session_dir,
            )
            return EXIT_RESTORE_FAILED
        remove_session_dir(self.session_dir)
        return EXIT_OK

    def _release(self) -> None:
        for part in (self.channel, self.signals, self.controls, self.sources):
            if part is not None:
                part.close()
        if self._client_fd >= 0:
            os.close(self._client_fd)
            self._client_fd = -1


def _drain(fd: int) -> None:
    # signal.set_wakeup_fd's bytes: the handler already recorded why the loop must end.
    with contextlib.suppress(BlockingIOError):
        os.read(fd, 512)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmpower-batch-server", description=__doc__)
    parser.add_argument("--session-dir", type=Path, required=True)
    parser.add_argument("--barrier", help="the barrier's fds for this side: me,them,pipe")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("VMPOWER_BATCH_LOG", "INFO").upper(),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s vmpower-batch[{os.getpid()}]: %(message)s",
    )
    try:
        barrier = None
        if args.barrier:
            barrier = Barrier.from_fds(*BarrierFds.decode(args.barrier), role=CHILD)
        spec = SessionSpec.load(args.session_dir)
        server = BatchServer(spec, args.session_dir, barrier)
        server.setup()
    except VmpowerError as exc:
        # One line for the daemon, which passes it to the client as the refusal.
        print(str(exc).replace("\n", " "), flush=True)
        return EXIT_SETUP_FAILED
    if barrier is not None:
        barrier.place()  # ready: the daemon may now answer start_batch
    # The daemon has read all it wanted from stdout; nothing may block on it later.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    return server.run()


if __name__ == "__main__":
    sys.exit(main())
