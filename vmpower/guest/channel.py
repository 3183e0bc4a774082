"""One open power port: send a request, get *its* reply, within a deadline.

A virtio-serial port is a byte stream with no message boundaries and no request ids,
and the Linux driver lets only one process open it at a time (virtio_console returns
EBUSY to a second open). So the port is opened once, read-write, and kept open, and
the stream is kept in step explicitly:

* before each request, bytes already waiting are discarded: a reply that came after
  an earlier request gave up (or after an earlier process exited) is not ours;
* a request that timed out in this process still owes its reply: those bytes are
  skipped when they arrive, whatever comes next (the host answers every request
  with a reply of the size the protocol gives it: docs/protocol.md, host rule 2);
* a reply is accepted only if it fits the request (an ACK/NACK echoes every field;
  a query reply has the right code): anything else is a stale reply from another
  process, skipped byte by byte until the stream lines up again.

The port's host end may be unconnected (no agent on the host): virtio_console then
reports POLLHUP and refuses writes (will_write_block() while !host_connected), which
is reported as such rather than as a silent timeout.
"""

from __future__ import annotations

import errno
import os
import select
import time
from collections.abc import Callable

from vmpower.guest.ports import PortError, PortInfo

_READ_CHUNK = 4096


class NoReplyError(PortError):
    """The host did not answer within the deadline."""


class PortChannel:
    """A power port opened once (O_RDWR | O_NOCTTY | O_NONBLOCK) for the session."""

    def __init__(self, port: PortInfo, clock: Callable[[], float] = time.monotonic) -> None:
        self.port = port
        self.clock = clock
        self.fd = -1
        self.owed_bytes = 0  # reply bytes still due for requests that timed out here
        self._unsent = b""  # the tail of a request whose write timed out half-way

    # -- open and close ----------------------------------------------------------------

    def open(self) -> None:
        if self.fd >= 0:
            return
        flags = os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.port.device, flags)
        except FileNotFoundError:
            raise PortError(f"{self.port.device}: no such device") from None
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise PortError(
                    f"{self.port.device}: already open by another program (a virtio port"
                    " opens once at a time)"
                ) from None
            raise PortError(f"{self.port.device}: cannot open: {exc.strerror}") from None
        if os.isatty(fd):
            # A virtio port is no tty. A serial line or pseudo-terminal standing in for
            # one would echo bytes back and translate CR/LF, corrupting the binary
            # stream: raw mode passes every byte through unchanged.
            import tty

            tty.setraw(fd)
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PortChannel:
        self.open()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- the exchange ------------------------------------------------------------------

    def drain(self) -> int:
        """Discard every byte already waiting; returns how many."""
        self.open()
        dropped = 0
        while True:
            try:
                chunk = os.read(self.fd, _READ_CHUNK)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EIO:  # a pseudo-terminal whose other end is gone
                    break
                raise PortError(f"{self.port.device}: read failed: {exc.strerror}") from None
            if not chunk:  # virtio: host end not connected and nothing buffered
                break
            dropped += len(chunk)
        self.owed_bytes = max(0, self.owed_bytes - dropped)
        return dropped

    def exchange(
        self,
        request: bytes,
        reply_size: int,
        accept: Callable[[bytes], bool],
        timeout_s: float,
    ) -> bytes:
        """Send ``request`` and return the first ``reply_size`` bytes that ``accept``s.

        Raises NoReplyError when no such reply arrives within ``timeout_s``, and
        PortError when the port fails or its host end is not connected.
        """
        deadline = self.clock() + timeout_s
        self.drain()
        if self._unsent:
            # Finish the request cut short earlier so the host's framing stays intact;
            # its reply is already counted in owed_bytes.
            self._write(self._unsent, deadline, continuation=True)
        try:
            self._write(request, deadline, continuation=False)
        except NoReplyError:
            if self._unsent:  # the host has part of it: it will answer once it has all
                self.owed_bytes += reply_size
            raise
        buf = bytearray()
        while True:
            if self.owed_bytes and buf:
                skip = min(self.owed_bytes, len(buf))
                del buf[:skip]
                self.owed_bytes -= skip
            if not self.owed_bytes:
                while len(buf) >= reply_size:
                    candidate = bytes(buf[:reply_size])
                    if accept(candidate):
                        return candidate
                    del buf[:1]  # a stale reply from another process: resynchronise
            remaining = deadline - self.clock()
            if remaining <= 0 or not self._wait(select.POLLIN, remaining):
                # Our reply may still come: skip it when it does.
                self.owed_bytes += max(0, reply_size - len(buf))
                raise NoReplyError(
                    f"no reply from the host within {timeout_s:g} s on {self.port.device}"
                )
            buf += self._read()

    # -- low level ---------------------------------------------------------------------

    def _wait(self, events: int, timeout_s: float) -> bool:
        poller = select.poll()
        poller.register(self.fd, events)
        ready = poller.poll(max(0, int(timeout_s * 1000)) + 1)
        if not ready:
            return False
        revents = ready[0][1]
        if revents & (select.POLLHUP | select.POLLERR) and not revents & events:
            raise PortError(
                f"{self.port.device}: the host end is not connected (is vmpowerd running"
                " and serving this VM's power channels?)"
            )
        return True

    def _read(self) -> bytes:
        try:
            chunk = os.read(self.fd, _READ_CHUNK)
        except BlockingIOError:
            return b""
        except OSError as exc:
            raise PortError(f"{self.port.device}: read failed: {exc.strerror}") from None
        if not chunk:
            raise PortError(f"{self.port.device}: the host end closed the port")
        return chunk

    def _write(self, data: bytes, deadline: float, continuation: bool) -> None:
        """Write all of ``data``; on timeout keep what is left if the host has a part."""
        view = memoryview(data)
        sent = 0
        while sent < len(view):
            try:
                sent += os.write(self.fd, view[sent:])
                continue
            except BlockingIOError:
                pass
            except OSError as exc:
                raise PortError(f"{self.port.device}: write failed: {exc.strerror}") from None
            remaining = deadline - self.clock()
            if remaining <= 0 or not self._wait(select.POLLOUT, remaining):
                if sent or continuation:
                    self._unsent = bytes(view[sent:])
                raise NoReplyError(
                    f"{self.port.device}: the host is not reading the port (is vmpowerd"
                    " serving this VM's power channels?)"
                )
        if continuation:
            self._unsent = b""
