"""``BatchClient``: a local program's handle on one batch session.

This module owns the client's side: asking the daemon for a session (``start_batch``
over the control socket), attaching to the server's buffers and channel, and the
round trips (``read``, ``write``, ``stop``) or, in continuous mode, the lock-free
``sample``. The session belongs to the process that started it: the daemon watches that
process, and the server restores every control it wrote when the process stops the
session, closes the client, or dies.

::

    with BatchClient(socket, signals=[("CPU_FREQUENCY_STATUS", "cpu", 0)]) as batch:
        (freq_hz,) = batch.read()
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import select
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from vmpower import control
from vmpower.errors import TelemetryError
from vmpower.telemetry.channel import (
    ChannelTimeout,
    ControllerChannel,
    WorkerGone,
    WorkerStopped,
)
from vmpower.telemetry.session import check_key, session_paths, session_prefix
from vmpower.telemetry.shm import KIND_CONTROLS, KIND_SIGNALS, ValueBuffer

RequestLike = Sequence[Any]
Requester = Callable[..., Any]


class BatchClient:
    """A batch session: ``start`` (or ``with``), then ``read``/``write``/``sample``, ``stop``.

    ``signals`` and ``controls`` are ``(name, domain, index)`` triples (see
    ``vmpower signals``). ``period_s`` asks for continuous mode: the server samples every
    ``period_s`` seconds into shared memory and ``sample()`` returns the latest values
    without a round trip. ``timeout_s`` bounds every wait on the server.
    """

    def __init__(
        self,
        socket_path: str | Path,
        signals: Iterable[RequestLike] = (),
        controls: Iterable[RequestLike] = (),
        *,
        period_s: float | None = None,
        timeout_s: float = 10.0,
        request: Requester = control.request,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.signal_requests = [list(r) for r in signals]
        self.control_requests = [list(r) for r in controls]
        self.period_s = period_s
        self.timeout_s = timeout_s
        self._request = request
        self._ids = itertools.count(1)
        self._channel: ControllerChannel | None = None
        self._signals: ValueBuffer | None = None
        self._controls: ValueBuffer | None = None
        self.session: dict[str, Any] = {}
        self._server_fd = -1
        self._closed = False

    # -- life ----------------------------------------------------------------------------

    def start(self) -> BatchClient:
        """Ask the daemon for the session and attach to it; TelemetryError/ControlError."""
        if self.session:
            raise TelemetryError("this batch client is already started")
        args: dict[str, Any] = {
            "signals": self.signal_requests,
            "controls": self.control_requests,
        }
        if self.period_s is not None:
            args["period_s"] = self.period_s
        result = self._request(self.socket_path, "start_batch", **args)
        if not isinstance(result, Mapping):
            raise TelemetryError(f"start_batch answered {result!r}, not a session")
        try:
            self._attach(result)
        except BaseException:
            self._abandon()
            raise
        return self

    @classmethod
    def attach(
        cls, session: Mapping[str, Any], timeout_s: float = 10.0, period_s: float | None = None
    ) -> BatchClient:
        """Attach to a session started by other means (``start_batch``'s result)."""
        client = cls("", timeout_s=timeout_s, period_s=period_s)
        client._attach(session)
        return client

    def _attach(self, session: Mapping[str, Any]) -> None:
        self.session = dict(session)
        key = check_key(session.get("server_key"))
        shm_dir = session.get("shm_dir")
        if not isinstance(shm_dir, str):
            raise TelemetryError(f"session {key}: no shm_dir in {session!r}")
        self.period_s = session.get("period_s", self.period_s)
        paths = session_paths(shm_dir, key)
        signal_count = len(session.get("signals") or ())
        control_count = len(session.get("controls") or ())
        self._signals = ValueBuffer.open(paths.signals, KIND_SIGNALS, False, signal_count)
        self._controls = ValueBuffer.open(paths.controls, KIND_CONTROLS, True, control_count)
        self._channel = ControllerChannel(
            shm_dir, session_prefix(key), self.timeout_s, create=False
        )
        try:
            # Alive now (it answered start_batch and the daemon has not reaped it), so
            # this pidfd is that process: readable when it exits.
            self._server_fd = os.pidfd_open(int(session.get("server_pid", 0)))
        except (OSError, ValueError):
            self._server_fd = -1  # e.g. another pid namespace: stop() just does not wait
        # The first message: the server now unlinks every name (we keep our mappings).
        self._transition("c")

    def _abandon(self) -> None:
        """A start that failed half-way: make sure the server does not outlive it."""
        key = self.session.get("server_key")
        self.close()
        if key:
            # The original failure matters more than this clean-up's.
            with contextlib.suppress(Exception):
                self._request(self.socket_path, "stop_batch", server_key=key)

    def stop(self) -> None:
        """End the session: the server restores every control it wrote, then exits."""
        if self._closed or self._channel is None:
            self.close()
            return
        try:
            self._transition("q")
            # Answered once its controls are restored; it exits right after: wait for
            # that, so a stopped session is gone, not going.
            if self._server_fd >= 0:
                # poll, not select: a client with many fds open may hold this one past 1023.
                poller = select.poll()
                poller.register(self._server_fd, select.POLLIN)
                poller.poll(self.timeout_s * 1000)
        except TelemetryError:
            pass  # already gone: its exit restored everything
        finally:
            self.close()

    def close(self) -> None:
        """Let go of the session without asking (the server sees it and ends it too)."""
        if self._closed:
            return
        self._closed = True
        for part in (self._channel, self._signals, self._controls):
            if part is not None:
                part.close()
        if self._server_fd >= 0:
            os.close(self._server_fd)
            self._server_fd = -1

    def __enter__(self) -> BatchClient:
        if not self.session:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what a session offers ----------------------------------------------------------

    @property
    def server_pid(self) -> int:
        return int(self.session.get("server_pid", 0))

    @property
    def server_key(self) -> str:
        return str(self.session.get("server_key", ""))

    @property
    def signal_labels(self) -> list[str]:
        return list(self.session.get("signals") or [])

    @property
    def control_labels(self) -> list[str]:
        return list(self.session.get("controls") or [])

    def ping(self) -> None:
        """One round trip that does nothing: the server is alive and answering."""
        self._transition("c")

    def read(self) -> list[float]:
        """Sample every signal now (one round trip); NaN for a signal that cannot be read."""
        self._transition("r")
        assert self._signals is not None
        return self._signals.read()

    def sample(self) -> list[float]:
        """Continuous mode: the latest sample, straight from shared memory (no round trip)."""
        if self.period_s is None:
            raise TelemetryError("sample() needs continuous mode: start with period_s")
        self._check_open()
        assert self._signals is not None
        return self._signals.read()

    def write(self, values: Sequence[float]) -> None:
        """Set every control (Hz, in request order; NaN leaves one alone); one round trip."""
        self._check_open()
        assert self._controls is not None
        if len(values) != self._controls.count:
            raise TelemetryError(
                f"write() needs {self._controls.count} values (one per control), got {len(values)}"
            )
        floats = []
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TelemetryError(f"control values are numbers, not {value!r}")
            floats.append(float(value))
        self._controls.write(floats)
        self._transition("w")

    def ended(self, timeout_s: float | None = 0.0) -> bool:
        """True once the server has gone (stopped by the daemon, or exited); may wait."""
        self._check_open()
        assert self._channel is not None
        return self._channel.worker_ended(timeout_s)

    # -- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed or self._channel is None:
            raise TelemetryError("this batch session is closed")

    def _transition(self, code: str) -> None:
        self._check_open()
        channel = self._channel
        assert channel is not None
        try:
            channel.do_transition(code, next(self._ids))
        except WorkerStopped:
            raise TelemetryError(
                f"batch session {self.server_key} was stopped (stop_batch, or vmpowerd is"
                " stopping); its controls are restored"
            ) from None
        except WorkerGone:
            raise TelemetryError(
                f"the batch server of session {self.server_key} exited; its controls are restored"
            ) from None
        except ChannelTimeout:
            raise TelemetryError(
                f"the batch server of session {self.server_key} did not answer within"
                f" {self.timeout_s:g} s"
            ) from None
        if channel.result != 0:
            message = channel.received().decode(errors="replace")
            raise TelemetryError(message or f"the batch server refused {code!r}")


def format_value(value: float) -> str:
    """A value as the CLIs print it: integers without a fraction, NaN as ``nan``."""
    if math.isnan(value):
        return "nan"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)
