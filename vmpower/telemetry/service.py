"""The daemon's side of telemetry: start, watch, stop and recover batch sessions.

``BatchService`` lives in vmpowerd (model: GEOPM's service). It owns the control
commands ``start_batch``, ``stop_batch``, ``list_batches`` and ``list_signals``; the
validation of requests (catalogue, domains and indices, the caller's rights from the
access lists and its socket credentials); the launch of one batch server per session
(fork + exec of ``python -m vmpower.telemetry.server``, never a bare fork: the daemon has
threads); and the sessions' ends.

A session's state lives in ``<state.dir>/telemetry/<key>/``: ``session.json`` and the
session's restore journal. The server removes the directory when it ends cleanly; when
it crashed (or could not restore), the daemon restores from that journal when it reaps
the server, and a daemon starting after a crash does the same for every directory left.

Start-up: ``start_batch`` answers only when the server has created its buffers and
channel and placed its barrier (``vmpower.barrier``); a server that fails says why in
one line on its stdout, and that line is the refusal. The barrier stays: the daemon
aborts it to stop a session, and a server whose daemon died sees the barrier's pipe hang
up and ends itself. The daemon hears of a server's exit through a pidfd on its monitor
loop. A session's MIN/MAX frequency controls are written by the daemon alone: its
server sends them (``session_limits``, accepted from that server's pid only) and the
daemon's arbiter applies them as the session's limit wishes, journaled once by the
daemon's restore journal; they go when the session ends (issue #12, point 5).
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vmpower.barrier import CHILD, PARENT, Barrier, BarrierTimeout
from vmpower.config import Config
from vmpower.control import Command, PeerCred
from vmpower.errors import RestoreError, TelemetryError, VmpowerError
from vmpower.restore import RestoreJournal, RestoreReport
from vmpower.sysfs import Sysfs
from vmpower.telemetry.access import AccessLists, Rights
from vmpower.telemetry.catalog import CATALOG, Request, Topology, parse_requests
from vmpower.telemetry.session import (
    SESSIONS_DIR,
    SessionSpec,
    check_key,
    new_key,
    process_start_ticks,
    remove_session_dir,
    remove_session_files,
)

log = logging.getLogger("vmpower.telemetry")

STOP_TIMEOUT_S = 5.0
"""How long stop_batch and shutdown wait for a server to restore and exit."""
MIN_PERIOD_S = 0.001


class _Monitor(Protocol):
    """What the service needs of the daemon's monitor loop."""

    def add_reader(self, fd: int, callback: Callable[[int], None]) -> None: ...

    def remove(self, fd: int) -> None: ...


@dataclass
class Session:
    """A running batch server, as the daemon tracks it."""

    spec: SessionSpec
    session_dir: Path
    proc: subprocess.Popen[bytes]
    barrier: Barrier
    pidfd: int
    cpus: tuple[int, ...]
    started_at: float
    # What it may write on host CPUs a running VM is pinned to (issue #12 point 5):
    # the client's rights from the access lists, fixed when the session starts.
    rights: Rights = Rights(frozenset(), frozenset())

    @property
    def owner(self) -> str:
        """Its name among a CPU's wishers (``show_cpus``)."""
        return f"session:{self.spec.key}"

    def row(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "server_key": spec.key,
            "server_pid": self.proc.pid,
            "client_pid": spec.client_pid,
            "uid": spec.client_uid,
            "signals": [r.label() for r in spec.signals],
            "controls": [r.label() for r in spec.controls],
            "period_s": spec.period_s,
            "started_at": self.started_at,
        }


def launch_server(
    spec: SessionSpec,
    session_dir: Path,
    timeout_s: float,
    python: str = sys.executable,
    log_level: str = "info",
) -> tuple[subprocess.Popen[bytes], Barrier]:
    """Write the spec, fork+exec the server, wait for its barrier; TelemetryError on failure."""
    spec.save(session_dir)
    barrier = Barrier()
    child = barrier.fds(CHILD)
    env = dict(os.environ, VMPOWER_BATCH_LOG=log_level)
    try:
        proc = subprocess.Popen(
            [
                python,
                "-m",
                "vmpower.telemetry.server",
                "--session-dir",
                str(session_dir),
                "--barrier",
                child.encode(),
            ],
            pass_fds=tuple(child),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            close_fds=True,
            env=env,
        )
    except OSError as exc:
        barrier.destroy()
        raise TelemetryError(f"cannot start the batch server: {exc}") from None
    barrier.set_role(PARENT)
    assert proc.stdout is not None
    try:
        ready = barrier.wait_next(timeout_s)
    except BarrierTimeout:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        barrier.destroy()
        raise TelemetryError(
            f"the batch server did not get ready within {timeout_s:g} s (killed)"
        ) from None
    if not ready:  # it exited (an abortion queued behind no barrier)
        message = proc.stdout.read().decode(errors="replace").strip()
        status = proc.wait()
        proc.stdout.close()
        barrier.destroy()
        raise TelemetryError(
            message or f"the batch server failed to start (exit status {status}; see the log)"
        )
    proc.stdout.close()
    return proc, barrier


def finish_session(session_dir: Path) -> RestoreReport | None:
    """After its server is gone: remove a session's files, restore what its journal
    holds, and remove its directory once nothing is left to restore."""
    try:
        spec = SessionSpec.load(session_dir)
    except TelemetryError as exc:
        log.warning("session %s: %s", session_dir.name, exc)
        spec = None
    if spec is not None:
        removed = remove_session_files(spec.shm_dir, spec.key)
        if removed:
            log.info("session %s: removed %d leftover files", spec.key, len(removed))
    try:
        # An earlier boot's session journal goes with the session's directory.
        journal = RestoreJournal(session_dir, keep_earlier_boot=False)
        report = journal.recover()
    except RestoreError as exc:
        log.error("session %s: %s", session_dir.name, exc)
        return None
    if report.restored:
        log.warning(
            "session %s: restored %d settings it had changed",
            session_dir.name,
            len(report.restored),
        )
    if not journal.pending():
        remove_session_dir(session_dir)
    return report


def recover_sessions(sessions_dir: Path) -> list[str]:
    """Finish every session a previous daemon left (start-up after a crash)."""
    if not sessions_dir.is_dir():
        return []
    found = []
    for entry in sorted(sessions_dir.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            found.append(entry.name)
            finish_session(entry)
    return found


class BatchService:
    """Batch sessions of one daemon: commands, servers, and their ends."""

    def __init__(
        self,
        config: Config,
        monitor: _Monitor,
        cpufreq: Any = None,
        hypervisor: Any = None,
        *,
        power: Any = None,
        python: str = sys.executable,
        access: AccessLists | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.monitor = monitor
        self.cpufreq = cpufreq
        self.hypervisor = hypervisor
        # The daemon's one arbiter (PowerManager): sessions' control writes are its
        # wishes, journaled by the daemon's restore journal.
        self.power = power
        self.python = python
        self.access = access or AccessLists(config.telemetry.access_dir)
        self.clock = clock
        self.sessions_dir = config.state.dir / SESSIONS_DIR
        self.sessions: dict[str, Session] = {}

    def reconfigure(self, config: Config) -> None:
        """A reloaded configuration: telemetry.* and cpufreq.reserved_cpus apply to the
        sessions started from now on (running ones keep what they were given)."""
        if config.telemetry.access_dir != self.config.telemetry.access_dir:
            self.access = AccessLists(config.telemetry.access_dir)
        self.config = config

    # -- life -------------------------------------------------------------------------

    def start(self) -> list[str]:
        """Recover the sessions a crashed run left; returns their keys."""
        self.sessions_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        recovered = recover_sessions(self.sessions_dir)
        if recovered:
            log.warning("recovered %d batch sessions of a previous run", len(recovered))
        return recovered

    def close(self) -> None:
        """Stop every session: its server restores its controls, then exits."""
        for session in list(self.sessions.values()):
            session.barrier.abort()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for key in list(self.sessions):
            self._wait(self.sessions[key], max(0.0, deadline - time.monotonic()))
            self._reap(key)

    def commands(self) -> dict[str, Command]:
        return {
            "start_batch": Command(
                self.cmd_start_batch,
                changes=True,
                help="start a batch server: signals and controls in shared memory",
            ),
            "stop_batch": Command(
                self.cmd_stop_batch,
                changes=True,
                help="stop a batch server (its controls are restored)",
            ),
            "session_limits": Command(
                self.cmd_session_limits,
                changes=True,
                help="(batch servers only) a session's frequency limits",
            ),
            "list_batches": Command(self.cmd_list_batches, help="running batch sessions"),
            "list_signals": Command(
                self.cmd_list_signals, help="signals and controls, with your access"
            ),
        }

    # -- commands ------------------------------------------------------------------------

    def cmd_start_batch(self, req: dict[str, Any], cred: PeerCred) -> dict[str, Any]:
        cfg = self.config
        signals = parse_requests(req.get("signals"), "signal")
        controls = parse_requests(req.get("controls"), "control")
        if not signals and not controls:
            raise TelemetryError("start_batch needs signals and/or controls to serve")
        period_s = _period(req.get("period_s"))
        if len(self.sessions) >= cfg.telemetry.max_sessions:
            raise TelemetryError(
                f"too many batch sessions ({cfg.telemetry.max_sessions}, telemetry.max_sessions)"
            )
        topology = self.topology()
        signals = [topology.resolve(r) for r in signals]
        controls = [topology.resolve(r, write=True) for r in controls]
        rights = self.access.check(cred.uid, cred.gid, signals, controls)
        reserved = sorted(
            set(_controlled_cpus(topology, controls)) & self.config.cpufreq.reserved_cpus
        )
        if reserved:
            raise TelemetryError(
                f"host CPU {', '.join(map(str, reserved))} is reserved (cpufreq.reserved_cpus):"
                " no control may be written there"
            )
        ticks = process_start_ticks(cred.pid)
        if ticks is None:
            raise TelemetryError(f"the client (pid {cred.pid}) has exited")
        key = new_key(cred.pid)
        spec = SessionSpec(
            key=key,
            shm_dir=str(cfg.telemetry.shm_dir),
            client_pid=cred.pid,
            client_uid=cred.uid,
            client_gid=cred.gid,
            client_start_ticks=ticks,
            signals=tuple(signals),
            controls=tuple(controls),
            period_s=period_s,
            sysfs_root=str(cfg.cpufreq.sysfs_root),
            powercap_root=str(cfg.telemetry.powercap_root),
            proc_root=str(cfg.telemetry.proc_root),
            libvirt_uri=cfg.libvirt.uri,
            daemon_pid=os.getpid(),
            created_at=self.clock(),
            control_socket=str(cfg.control.socket),
        )
        session_dir = self.sessions_dir / key
        self.sessions_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        session_dir.mkdir(mode=0o700)
        try:
            proc, barrier = launch_server(
                spec, session_dir, cfg.telemetry.start_timeout_s, self.python, cfg.log.level
            )
        except TelemetryError:
            finish_session(session_dir)
            raise
        cpus = _controlled_cpus(topology, controls)
        try:
            pidfd = os.pidfd_open(proc.pid)
        except OSError as exc:  # cannot watch it: do not leave it running unwatched
            barrier.abort()
            proc.wait()
            barrier.destroy()
            finish_session(session_dir)
            raise TelemetryError(f"cannot watch the batch server: {exc}") from None
        session = Session(spec, session_dir, proc, barrier, pidfd, cpus, self.clock(), rights)
        self.sessions[key] = session
        self.monitor.add_reader(pidfd, lambda _fd, k=key: self._reap(k))
        self._forget(cpus)
        log.info(
            "batch session %s: server pid %d for pid %d uid %d (%d signals, %d controls%s)",
            key,
            proc.pid,
            cred.pid,
            cred.uid,
            len(signals),
            len(controls),
            f", every {period_s:g} s" if period_s else "",
        )
        return {
            "server_pid": proc.pid,
            "server_key": key,
            "shm_dir": spec.shm_dir,
            "signals": [r.label() for r in signals],
            "controls": [r.label() for r in controls],
            "period_s": period_s,
        }

    def cmd_stop_batch(self, req: dict[str, Any], cred: PeerCred) -> dict[str, Any]:
        key = check_key(req.get("server_key"))
        session = self.sessions.get(key)
        if session is None:
            raise TelemetryError(f"no batch session {key} (list_batches shows them)")
        if cred.uid not in (0, session.spec.client_uid):
            raise TelemetryError(f"batch session {key} belongs to another user")
        session.barrier.abort()
        status = self._wait(session, STOP_TIMEOUT_S)
        self._reap(key)
        return {"server_key": key, "stopped": True, "exit_status": status}

    def cmd_session_limits(self, req: dict[str, Any], cred: PeerCred) -> dict[str, Any]:
        """A batch server's control write: its session's limits, as wishes of the daemon's
        arbiter (owner ``session:<key>``), replacing the session's previous ones.

        Only the session's own server may send it: the peer's pid must be the server's
        (the daemon's unreaped child, so the pid cannot have been reused).
        """
        key = check_key(req.get("server_key"))
        session = self.sessions.get(key)
        if session is None or cred.pid != session.proc.pid:
            raise TelemetryError("session_limits is for a batch session's own server")
        if self.power is None:
            raise TelemetryError("this daemon applies no controls")
        limits = _parse_limits(req.get("limits"), session.cpus)
        self._check_vm_cpus(session, limits)
        try:
            self.power.set_limits(session.owner, limits)
        except VmpowerError as exc:
            raise TelemetryError(str(exc)) from None
        return {"server_key": key, "cpus": sorted(limits)}

    def _check_vm_cpus(
        self, session: Session, limits: dict[int, tuple[int | None, int | None]]
    ) -> None:
        """A limit on a host CPU a running VM is pinned to needs its control granted by
        the access lists' allowed_controls_on_vm_cpus (issue #12 point 5); checked at
        each write, since VMs start, stop and are re-pinned while a session runs."""
        if self.hypervisor is None:
            return
        rights = session.rights
        for name, vm in sorted(self.hypervisor.vms().items()):
            if not vm.active:
                continue
            for cpu in sorted(set(limits) & vm.pcpus()):
                for control, khz in zip(_LIMIT_CONTROLS, limits[cpu], strict=True):
                    if khz is not None and not rights.may_write_on_vm_cpus(control):
                        raise TelemetryError(
                            f"host CPU {cpu} belongs to VM {name}: uid"
                            f" {session.spec.client_uid} may not write {control} there"
                            f" (allowed_controls_on_vm_cpus in {self.access.access_dir}"
                            " grants it)"
                        )

    def cmd_list_batches(self, _req: dict[str, Any], cred: PeerCred) -> list[dict[str, Any]]:
        # A server that just exited may not have been reaped yet (its pidfd is handled
        # in a later turn of the loop): do it now so the list is current.
        for key, session in list(self.sessions.items()):
            if session.proc.poll() is not None:
                self._reap(key)
        return [
            s.row() for _, s in sorted(self.sessions.items()) if cred.uid in (0, s.spec.client_uid)
        ]

    def cmd_list_signals(self, _req: dict[str, Any], cred: PeerCred) -> list[dict[str, Any]]:
        rights = self.access.rights(cred.uid, cred.gid)
        rows = []
        for name, info in sorted(CATALOG.items()):
            row = info.row()
            access = ""
            if rights.may_read(name):
                access += "r"
            if info.writable and rights.may_write(name):
                access += "w"
            row["access"] = access or "-"
            rows.append(row)
        return rows

    # -- helpers ----------------------------------------------------------------------------

    def topology(self) -> Topology:
        cpus = self.cpufreq.cpus() if self.cpufreq is not None else None
        vms = sorted(self.hypervisor.vms()) if self.hypervisor is not None else []
        return Topology.discover(Sysfs(self.config.cpufreq.sysfs_root), cpus, vms)

    def _wait(self, session: Session, timeout_s: float) -> int:
        try:
            return session.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.error(
                "batch session %s: server %d did not stop within %g s: killed",
                session.spec.key,
                session.proc.pid,
                timeout_s,
            )
            session.proc.kill()
            return session.proc.wait()

    def _reap(self, key: str) -> None:
        """The server exited (pidfd readable): collect it and finish what it left."""
        session = self.sessions.pop(key, None)
        if session is None:
            return
        self.monitor.remove(session.pidfd)
        os.close(session.pidfd)
        status = session.proc.wait()
        session.barrier.destroy()
        if session.session_dir.exists():
            finish_session(session.session_dir)
        self._release(session)
        self._forget(session.cpus)
        log.info("batch session %s ended (server exit status %d)", key, status)

    def _release(self, session: Session) -> None:
        """The session is over: its limits go now (CPUs left to nobody are restored)."""
        if self.power is None:
            return
        try:
            self.power.set_limits(session.owner, {})
        except VmpowerError as exc:
            log.error(
                "batch session %s: its limits could not be released: %s", session.spec.key, exc
            )

    def _forget(self, cpus: tuple[int, ...]) -> None:
        if self.cpufreq is None:
            return
        for cpu in cpus:
            try:
                self.cpufreq.forget(cpu)
            except VmpowerError as exc:
                log.debug("cpu %d: cannot drop cached state: %s", cpu, exc)


def _period(value: Any) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < MIN_PERIOD_S
    ):
        raise TelemetryError(
            f"period_s must be a number of seconds >= {MIN_PERIOD_S}, not {value!r}"
        )
    return float(value)


MAX_LIMIT_KHZ = 1 << 40  # far above any CPU: a bigger number is a bad request


# The control behind each side of a limit (minimum, maximum): telemetry/sources.py
_LIMIT_CONTROLS = ("CPU_FREQUENCY_MIN_CONTROL", "CPU_FREQUENCY_MAX_CONTROL")


def _parse_limits(value: Any, cpus: tuple[int, ...]) -> dict[int, tuple[int | None, int | None]]:
    """``[[cpu, min_khz or null, max_khz or null], ...]`` → {cpu: (min, max)}; only the
    session's own CPUs (fixed at its start), each once."""
    if not isinstance(value, list) or len(value) > len(cpus):
        raise TelemetryError("limits must be a list of [cpu, min_khz, max_khz], one per CPU")
    out: dict[int, tuple[int | None, int | None]] = {}
    for item in value:
        if not isinstance(item, list) or len(item) != 3:
            raise TelemetryError(f"bad limit {item!r}: expected [cpu, min_khz, max_khz]")
        cpu, lo, hi = item
        if isinstance(cpu, bool) or not isinstance(cpu, int) or cpu not in cpus or cpu in out:
            raise TelemetryError(f"bad limit {item!r}: host CPU not one of this session's")
        for khz in (lo, hi):
            if khz is not None and (
                isinstance(khz, bool) or not isinstance(khz, int) or not 0 < khz < MAX_LIMIT_KHZ
            ):
                raise TelemetryError(f"bad limit {item!r}: kHz must be a positive integer")
        if lo is None and hi is None:
            continue
        out[cpu] = (lo, hi)
    return out


def _controlled_cpus(topology: Topology, controls: list[Request]) -> tuple[int, ...]:
    cpus: set[int] = set()
    for request in controls:
        cpus.update(topology.cpus_of(request.domain, request.index))
    return tuple(sorted(cpus))
