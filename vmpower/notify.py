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
from collections.abc import Mapping

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
