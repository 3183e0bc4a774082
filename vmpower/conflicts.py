"""Other power managers that write the cpufreq files vmpower writes.

tuned, power-profiles-daemon, auto-cpufreq, cpupower-gui, TLP and laptop-mode-tools
set governors, limits and EPP on their own schedule; beside vmpowerd each undoes the
other's settings, and a guest's ACK stops meaning what it says. vmpowerd cannot stop
them (that is the operator's call; its unit file says ``Conflicts=`` for the services
that must not run beside it), so it finds them and says so: a WARNING naming each
one when it appears (once, not once a minute), and ``status`` lists them
(``conflicts``).

Found two ways, at start and every ``CHECK_PERIOD_S``, on a thread of its own:

* processes under ``/proc`` (an injectable root): ``comm`` (the kernel keeps its
  first 15 characters: "power-profiles-"), and for interpreters (tuned and
  auto-cpufreq are Python scripts; run as ``python3 /usr/sbin/tuned`` the comm is
  "python3") the script named in ``cmdline``;
* their systemd units, where systemd is PID 1: ``systemctl is-active`` on the known
  units in one call (TLP and laptop-mode have no daemon: their units stay active
  after running once).

A local user can start a process named ``tuned``: all it earns is one warning line per
appearance, and the list in ``status`` (names from the fixed table below, pids as
numbers, at most ``MAX_PIDS`` each); nothing is read from a process but its two small
files, each bounded.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmpower.monitor import Monitor

log = logging.getLogger("vmpower.conflicts")

CHECK_PERIOD_S = 60.0
MAX_PIDS = 8  # pids listed per manager
MAX_PROCESSES = 65536  # /proc entries looked at per check
COMM_MAX = 15  # TASK_COMM_LEN - 1: the kernel truncates comm to it
CMDLINE_MAX = 4096
SYSTEMCTL_TIMEOUT_S = 2.0
_INTERPRETER = re.compile(r"^(?:python[0-9.]*|perl[0-9.]*|sh|bash|dash)$")


@dataclass(frozen=True)
class Manager:
    """One power manager: its name, the program names it runs as, its systemd unit."""

    name: str
    programs: tuple[str, ...]
    unit: str | None


KNOWN: tuple[Manager, ...] = (
    Manager("tuned", ("tuned",), "tuned.service"),
    Manager("power-profiles-daemon", ("power-profiles-daemon",), "power-profiles-daemon.service"),
    Manager("auto-cpufreq", ("auto-cpufreq",), "auto-cpufreq.service"),
    Manager("cpupower-gui", ("cpupower-gui", "cpupower-gui-helper"), None),
    Manager("tlp", ("tlp",), "tlp.service"),
    Manager("laptop-mode", ("laptop_mode", "laptop-mode"), "laptop-mode.service"),
)


def _program_table(managers: Sequence[Manager]) -> dict[str, Manager]:
    table = {}
    for manager in managers:
        for program in manager.programs:
            table[program] = manager
            table[program[:COMM_MAX]] = manager  # as comm shows it
    return table


def _read_small(path: str, limit: int) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None  # the process is gone, or hidden (hidepid)
    try:
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)


def scan_processes(proc_root: str, managers: Sequence[Manager] = KNOWN) -> dict[str, list[int]]:
    """manager name → pids of its processes under ``proc_root`` (sorted, at most MAX_PIDS)."""
    table = _program_table(managers)
    found: dict[str, list[int]] = {}
    try:
        entries = os.scandir(proc_root)
    except OSError as exc:
        log.debug("cannot list %s: %s", proc_root, exc)
        return {}
    with entries:
        for n, entry in enumerate(entries):
            if n >= MAX_PROCESSES:
                break
            if not entry.name.isdigit():
                continue
            base = f"{proc_root}/{entry.name}"
            raw = _read_small(f"{base}/comm", 64)
            if raw is None:
                continue
            comm = raw.decode(errors="replace").strip()
            manager = table.get(comm)
            if manager is None and _INTERPRETER.match(comm):
                manager = _script(base, table)
            if manager is not None:
                pids = found.setdefault(manager.name, [])
                if len(pids) < MAX_PIDS:
                    pids.append(int(entry.name))
    return {name: sorted(pids) for name, pids in found.items()}


def _script(base: str, table: dict[str, Manager]) -> Manager | None:
    """The manager an interpreter runs: the first argument that is not an option."""
    raw = _read_small(f"{base}/cmdline", CMDLINE_MAX)
    if not raw:
        return None
    args = raw.split(b"\0")[1:4]
    for arg in args:
        if arg.startswith(b"-"):
            continue
        return table.get(os.path.basename(arg.decode(errors="replace")))
    return None


def systemd_running(proc_root: str) -> bool:
    raw = _read_small(f"{proc_root}/1/comm", 64)
    return raw is not None and raw.strip() == b"systemd"


def active_units(units: Sequence[str], systemctl: str = "systemctl") -> set[str]:
    """The units of ``units`` systemd reports active (one ``systemctl is-active`` call)."""
    try:
        done = subprocess.run(
            [systemctl, "is-active", *units],
            capture_output=True,
            timeout=SYSTEMCTL_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("systemctl is-active: %s", exc)
        return set()
    states = done.stdout.decode(errors="replace").split()
    return {unit for unit, state in zip(units, states, strict=False) if state == "active"}


class ConflictWatch:
    """Finds other power managers at start and every ``period_s``.

    Looking (a walk of /proc, one ``systemctl`` call that may take seconds) runs on a
    thread of its own; what it found is handed to the monitor thread, which alone keeps
    the result and logs, so the loop never waits for it.
    """

    def __init__(
        self,
        monitor: Monitor,
        proc_root: str = "/proc",
        period_s: float = CHECK_PERIOD_S,
        managers: Sequence[Manager] = KNOWN,
        units: Callable[[Sequence[str]], set[str]] | None = None,
    ) -> None:
        self.monitor = monitor
        self.proc_root = proc_root
        self.period_s = period_s
        self.managers = tuple(managers)
        # systemd's view (None: ask systemctl when systemd is PID 1 under proc_root)
        self._units = units
        self._found: dict[str, dict[str, object]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vmpower-conflicts", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def _run(self) -> None:
        wait_s = 0.0  # the first look at once
        while not self._stop.wait(wait_s):
            wait_s = self.period_s
            try:
                found = self._look()
            except Exception:  # a look that fails must not end the watch
                log.exception("looking for other power managers failed; trying again later")
                continue
            self.monitor.call_soon_threadsafe(lambda f=found: self._apply(f))

    def check(self) -> list[dict[str, object]]:
        """Look now, on this thread; warn about each manager that appeared, note each gone."""
        self._apply(self._look())
        return self.conflicts()

    def _look(self) -> dict[str, dict[str, object]]:
        """Which known managers run now (any thread: reads /proc, asks systemd)."""
        pids = scan_processes(self.proc_root, self.managers)
        unit_names = [m.unit for m in self.managers if m.unit]
        active: set[str] = set()
        if self._units is not None:
            active = self._units(unit_names)
        elif unit_names and systemd_running(self.proc_root):
            active = active_units(unit_names)
        found: dict[str, dict[str, object]] = {}
        for manager in self.managers:
            unit = manager.unit if manager.unit in active else None
            if manager.name in pids or unit is not None:
                found[manager.name] = {
                    "name": manager.name,
                    "pids": pids.get(manager.name, []),
                    "unit": unit,
                }
        return found

    def _apply(self, found: dict[str, dict[str, object]]) -> None:
        """Keep what a look found and log the changes (the monitor thread)."""
        for name, entry in found.items():
            if name not in self._found:
                log.warning(
                    "another power manager is running: %s (%s): it writes cpufreq files too,"
                    " so it and vmpowerd undo each other's settings; stop it%s",
                    name,
                    _where(entry),
                    f" (systemctl disable --now {entry['unit']})" if entry["unit"] else "",
                )
        for name in self._found.keys() - found.keys():
            log.info("power manager %s is gone", name)
        self._found = found

    def conflicts(self) -> list[dict[str, object]]:
        """What the last check found (``status``'s ``conflicts``), by name."""
        return [dict(entry) for _, entry in sorted(self._found.items())]


def _where(entry: dict[str, object]) -> str:
    parts = []
    pids = entry.get("pids")
    if pids:
        parts.append("pid " + ", ".join(str(p) for p in pids))  # type: ignore[union-attr]
    if entry.get("unit"):
        parts.append(f"unit {entry['unit']} active")
    return "; ".join(parts)
