"""systemd's notify protocol (sd_notify(3)): readiness, reload, status, watchdog.

A ``Notifier`` is built from the environment systemd gives a ``Type=notify`` service:
``NOTIFY_SOCKET`` (an AF_UNIX datagram socket; ``@`` starts an abstract name),
``WATCHDOG_USEC`` and ``WATCHDOG_PID``. Outside systemd (no ``NOTIFY_SOCKET``) every
call is a no-op. Messages are ``KEY=value`` lines in one datagram, as sd_notify sends
them. Nothing here runs a timer: the daemon sends ``WATCHDOG=1`` from its monitor loop,
so a loop that hangs stops the pings and systemd restarts the service.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmpower.monitor import Monitor

log = logging.getLogger("vmpower.notify")


class Notifier:
    """Sends sd_notify messages to systemd; does nothing when not run by systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None, pid: int | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.pid = os.getpid() if pid is None else pid
        self.watchdog_usec = _watchdog_usec(env, self.pid)
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def watchdog_period_s(self) -> float | None:
        """How often to send WATCHDOG=1: half the watchdog's time (sd_watchdog_enabled(3)
        recommends it), or None when systemd watches no watchdog for this process."""
        if not self.enabled or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2 / 1e6

    def send(self, *lines: str) -> None:
        """One datagram of ``KEY=value`` lines; failures are logged once, never raised
        (systemd restarting must not stop the daemon's work)."""
        if not self.address:
            return
        data = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(data, self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("sd_notify to %s failed: %s", self.address.lstrip("\0"), exc)

    # -- the messages vmpowerd sends -----------------------------------------------------

    def ready(self, status: str = "") -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        """RELOADING=1 with the CLOCK_MONOTONIC time (systemd ≥ 253 needs both for
        Type=notify-reload; older ones take RELOADING=1 alone)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self, status: str = "") -> None:
        self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))


def _watchdog_usec(env: Mapping[str, str], pid: int) -> int | None:
    """WATCHDOG_USEC when it is meant for this process (WATCHDOG_PID unset or ours)."""
    text = env.get("WATCHDOG_USEC", "")
    if not text.isdigit() or int(text) == 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None  # a parent's watchdog, inherited through the environment
    return int(text)


STATUS_PERIOD_S = 1.0  # STATUS= lines: at most one per second, and only on change


def one_line(text: str) -> str:
    """A STATUS= value: sd_notify lines end at a newline."""
    return " ".join(text.split())


class SystemdReports:
    """WATCHDOG=1 and STATUS= lines for systemd, sent from timers on the monitor loop.

    WATCHDOG=1 every WATCHDOG_USEC/2 (when systemd watches this process): the loop that
    runs the timer is the loop that must not hang. STATUS= says what is served, checked
    every STATUS_PERIOD_S and sent only when it changed.
    """

    def __init__(
        self,
        monitor: Monitor,
        notifier: Notifier,
        status_line: Callable[[], str],
        running: Callable[[], bool],
    ) -> None:
        self.monitor = monitor
        self.notifier = notifier
        self.status_line = status_line
        self.running = running
        self.last_status = ""

    def start(self) -> None:
        if not self.notifier.enabled:
            return
        period_s = self.notifier.watchdog_period_s()
        if period_s is not None:
            self._every(period_s, self.notifier.watchdog)
            log.info("systemd watchdog: WATCHDOG=1 every %.3g s", period_s)
        self._every(STATUS_PERIOD_S, self.report_status)

    def _every(self, period_s: float, action: Callable[[], None]) -> None:
        def tick() -> None:
            if not self.running():
                return
            action()
            self.monitor.call_later(period_s, tick)

        self.monitor.call_later(period_s, tick)

    def report_status(self) -> None:
        text = one_line(self.status_line())
        if text != self.last_status:
            self.last_status = text
            self.notifier.status(text)
