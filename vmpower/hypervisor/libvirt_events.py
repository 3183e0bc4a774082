"""libvirt's event side: the process-wide event loop thread and the raw event callbacks.

Threads: libvirt runs our callbacks on its own event loop thread. They only turn what
libvirt says into a ``RawEvent`` on a queue and call ``wake()``; the owner thread drains
the queue (``EventInbox.drain()``) and applies it to the registry: the monitor thread
is the only writer of agent state (docs/architecture.md, "One thread, one loop").
Nothing here touches the registry.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import libvirt

from vmpower.hypervisor.model import EventKind

log = logging.getLogger(__name__)

# libvirt lifecycle event → (our kind, names of libvirt's detail codes in order).
# SHUTDOWN (the guest finished shutting down) maps to None: STOPPED follows it.
_LIFECYCLE: dict[int, tuple[EventKind | None, tuple[str, ...]]] = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: (
        "defined",
        ("added", "updated", "renamed", "from_snapshot"),
    ),
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: ("undefined", ("removed", "renamed")),
    libvirt.VIR_DOMAIN_EVENT_STARTED: (
        "started",
        ("booted", "migrated", "restored", "from_snapshot", "wakeup"),
    ),
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: (
        "paused",
        (
            "paused",
            "migrated",
            "ioerror",
            "watchdog",
            "restored",
            "from_snapshot",
            "api_error",
            "postcopy",
            "postcopy_failed",
        ),
    ),
    libvirt.VIR_DOMAIN_EVENT_RESUMED: (
        "resumed",
        ("unpaused", "migrated", "from_snapshot", "postcopy"),
    ),
    libvirt.VIR_DOMAIN_EVENT_STOPPED: (
        "stopped",
        ("shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from_snapshot"),
    ),
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: (None, ("finished", "guest", "host")),
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: ("paused", ("pmsuspended_memory", "pmsuspended_disk")),
    libvirt.VIR_DOMAIN_EVENT_CRASHED: ("stopped", ("panicked", "crashloaded")),
}

# virConnectCloseReason, in code order.
_CLOSE_REASONS = ("error", "eof", "keepalive timeout", "client")


def lifecycle_kind(event: int, detail: int) -> tuple[EventKind | None, str]:
    """Our event kind (None: nothing to report) and libvirt's detail code in words."""
    kind, names = _LIFECYCLE.get(event, (None, ()))
    return kind, names[detail] if 0 <= detail < len(names) else f"detail {detail}"


def close_reason(code: int) -> str:
    """libvirt's close reason code in words (the number itself when unknown)."""
    return _CLOSE_REASONS[code] if 0 <= code < len(_CLOSE_REASONS) else str(code)


class RawEvent(NamedTuple):
    """A libvirt callback's record, queued for the owner thread."""

    generation: int  # which connection it came from; older ones are ignored
    kind: Literal["lifecycle", "tunable", "close"]
    vm: str | None
    code: int  # lifecycle event, or close reason
    detail: int
    pinning: bool  # tunable event that carries cputune.vcpupin<N>


class EventLoop:
    """libvirt's default event loop implementation, run in one daemon thread.

    The event implementation is process-wide by libvirt's design: it must be registered once,
    before any connection that wants events is opened, and run by exactly one thread. That is
    why this is class state rather than per-Hypervisor state.

    Registering and running are apart: while the thread runs, each libvirt call wakes it
    (the client turns its socket's watch off and on around a call, virNetClientIO, and
    a watch that changes wakes the loop's main context), and each wake takes the
    interpreter lock back from the threads reading domains. So the first read of every
    domain runs before the thread starts; what libvirt receives meanwhile (events)
    waits in its queue, whose flush timer is due when the thread first runs.
    """

    _lock = threading.Lock()
    _registered = False
    _thread: threading.Thread | None = None

    @classmethod
    def register(cls) -> None:
        """Register the default implementation (once; before opening a connection)."""
        with cls._lock:
            if cls._registered:
                return
            libvirt.virEventRegisterDefaultImpl()
            # libvirt's default error handler prints every error to stderr, including the
            # ones we expect and handle (a domain gone, a connection lost); the same message
            # reaches us in the libvirtError, so the printout is only noise.
            libvirt.registerErrorHandler(_ignore_libvirt_error, None)
            cls._registered = True

    @classmethod
    def ensure_running(cls) -> None:
        """Register (if not yet) and start the thread that runs the loop (once)."""
        cls.register()
        with cls._lock:
            if cls._thread is not None:
                return
            thread = threading.Thread(target=cls._run, name="libvirt-events", daemon=True)
            thread.start()
            cls._thread = thread

    @staticmethod
    def _run() -> None:
        while True:
            try:
                libvirt.virEventRunDefaultImpl()
            except libvirt.libvirtError as exc:
                log.warning("libvirt event loop: %s", exc)
                time.sleep(0.1)  # do not spin if the loop keeps failing


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    return None


class EventInbox:
    """The callbacks one Hypervisor registers on each connection, and their queue.

    ``wake`` is called on libvirt's thread after each record is queued. Each connection's
    callbacks carry its ``generation`` so that records from a connection since replaced
    can be told apart and ignored.
    """

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._queue: queue.SimpleQueue[RawEvent] = queue.SimpleQueue()

    def register(self, conn: libvirt.virConnect, generation: int, ids: list[int]) -> None:
        """Register the lifecycle, tunable and close callbacks on ``conn``.

        Appends each domain event callback id to ``ids`` as it goes, so that the caller can
        undo a partial registration (``unregister()``) when a later step raises
        libvirtError.
        """
        ids.append(
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, generation
            )
        )
        ids.append(
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_TUNABLE, self._on_tunable, generation
            )
        )
        try:
            conn.registerCloseCallback(self._on_close, generation)
        except libvirt.libvirtError as exc:
            # Only remote connections can be closed under us; others may refuse.
            if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                raise

    @staticmethod
    def unregister(conn: libvirt.virConnect, ids: list[int]) -> None:
        """Undo ``register()``; never raises."""
        # Every step may fail on a dead connection (or one closed under us, whose handle is
        # gone); there is nothing left to undo then, so failures are ignored.
        for callback_id in ids:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(callback_id)
        with contextlib.suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()

    def drain(self) -> list[RawEvent]:
        """Every record queued so far, oldest first (owner thread)."""
        raws: list[RawEvent] = []
        while True:
            try:
                raws.append(self._queue.get_nowait())
            except queue.Empty:
                return raws

    # These run on libvirt's event thread: they only enqueue and wake, never touch state.

    def _on_lifecycle(
        self,
        _conn: libvirt.virConnect,
        dom: libvirt.virDomain,
        event: int,
        detail: int,
        generation: int,
    ) -> None:
        try:
            self._queue.put(RawEvent(generation, "lifecycle", dom.name(), event, detail, False))
            self._wake()
        except Exception:  # an exception here would be lost in libvirt's C code
            log.exception("libvirt lifecycle callback")

    def _on_tunable(
        self,
        _conn: libvirt.virConnect,
        dom: libvirt.virDomain,
        params: dict[str, Any],
        generation: int,
    ) -> None:
        try:
            # VIR_DOMAIN_TUNABLE_CPU_VCPUPIN is "cputune.vcpupin%u"; other tunables (shares,
            # emulator/iothread pinning, block I/O) do not move vCPUs.
            pinning = any(str(key).startswith("cputune.vcpupin") for key in params)
            self._queue.put(RawEvent(generation, "tunable", dom.name(), 0, 0, pinning))
            self._wake()
        except Exception:
            log.exception("libvirt tunable callback")

    def _on_close(self, _conn: libvirt.virConnect, reason: int, generation: int) -> None:
        try:
            self._queue.put(RawEvent(generation, "close", None, reason, 0, False))
            self._wake()
        except Exception:
            log.exception("libvirt close callback")
