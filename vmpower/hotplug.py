"""CPU hotplug: the kernel's CPU uevents, on the monitor's epoll set.

The kernel announces a CPU going offline or coming back with a uevent on the
``NETLINK_KOBJECT_UEVENT`` socket (``ACTION=offline|online``, ``DEVPATH=
/devices/system/cpu/cpuN``, ``SUBSYSTEM=cpu``; drivers/base/core.c, and ``change``
when something asks for it). ``KernelCpuEvents`` listens to the kernel's own multicast
group through pyudev (``source="kernel"``: no udevd needed) filtered to subsystem
``cpu``; its socket sits in the monitor's epoll set, so there is no thread and no
polling: an idle daemon reads no CPU state at all.

``CpuHotplug`` reads what is there (at most ``MAX_EVENTS_PER_TURN`` a turn: the rest
waits in the socket for the next turn) and hands the CPU numbers to its callback
(``PowerManager.cpus_changed``) in the same turn, before the end-of-turn flush that
writes. The event's action is not trusted: it only says *which* CPU to look at; the
callback reads that CPU's ``online`` file under the daemon's own sysfs root (a
simulated tree in tests), so a stray or forged event costs one read and changes
nothing. Only root writes ``/sys/devices/system/cpu/cpuN/uevent`` (which makes the
kernel emit that event for cpuN, the way tests drive it), and libudev drops
multicast messages not sent by the kernel (sender port id 0).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from vmpower.monitor import Monitor

log = logging.getLogger("vmpower.hotplug")

MAX_EVENTS_PER_TURN = 256
_CPU_NAME = re.compile(r"^cpu(\d{1,5})$")


class CpuEventSource(Protocol):
    """Where CPU uevents come from: a pollable fd and a non-blocking receive."""

    def fileno(self) -> int: ...

    def receive(self) -> tuple[str, str] | None:
        """(action, device name such as "cpu3"), or None when nothing is waiting."""
        ...

    def close(self) -> None: ...


class KernelCpuEvents:
    """The kernel's CPU uevents through pyudev (netlink, kernel group, subsystem cpu)."""

    def __init__(self) -> None:
        import pyudev  # a dependency of the package; imported here: only the daemon needs it

        self._monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
        self._monitor.filter_by("cpu")
        self._monitor.start()  # binds; libudev's socket is non-blocking

    def fileno(self) -> int:
        return self._monitor.fileno()

    def receive(self) -> tuple[str, str] | None:
        device = self._monitor.poll(timeout=0)
        if device is None:
            return None
        return (device.action or "", device.sys_name or "")

    def close(self) -> None:
        # pyudev has no close; its socket goes with the monitor object
        self._monitor = None  # type: ignore[assignment]


class CpuHotplug:
    """Reads CPU uevents on the monitor loop and reports the CPUs they name."""

    def __init__(
        self,
        monitor: Monitor,
        source: CpuEventSource,
        on_cpus: Callable[[Iterable[int]], list[tuple[int, bool]]],
        all_cpus: Callable[[], Iterable[int]],
        max_per_turn: int = MAX_EVENTS_PER_TURN,
    ) -> None:
        self.monitor = monitor
        self.source = source
        self.on_cpus = on_cpus  # → (cpu, online) for each CPU whose state changed
        self.all_cpus = all_cpus  # every present CPU (events were lost: look at all)
        self.max_per_turn = max_per_turn
        self.events = 0  # uevents read (any action, any CPU)
        self._fd = source.fileno()
        monitor.add_reader(self._fd, self._readable)

    def _readable(self, _fd: int) -> None:
        cpus: set[int] = set()
        for _ in range(self.max_per_turn):
            try:
                event = self.source.receive()
            except OSError as exc:  # ENOBUFS: the kernel dropped events; every CPU is looked at
                log.warning("CPU uevents lost (%s): checking every CPU", exc)
                cpus.add(-1)
                break
            if event is None:
                break
            self.events += 1
            action, name = event
            match = _CPU_NAME.match(name)
            if match is None:
                continue
            cpus.add(int(match.group(1)))
            log.debug("uevent %s %s", action, name)
        if -1 in cpus:
            cpus.discard(-1)
            cpus |= set(self.all_cpus())
        if not cpus:
            return
        for cpu, online in self.on_cpus(sorted(cpus)):
            log.info(
                "host CPU %d %s",
                cpu,
                "online: its policy is read again and its wishes re-applied"
                if online
                else "offline: its requests are refused, its wishes kept",
            )

    def close(self) -> None:
        try:
            self.monitor.remove(self._fd)
        except (KeyError, OSError, ValueError):
            pass
        self.source.close()
