"""Power-channel endpoints: VM virtio-serial sockets and host JSON FIFOs.

A VM channel is the host end of a virtio-serial port: QEMU binds an AF_UNIX stream
socket (``/tmp/powermonitor/<vm>.<n>``) and vmpower connects to it as the client,
non-blocking. Each channel keeps its own receive framing (464-byte packets), a
bounded send queue (a guest that never reads its replies must not block anyone:
past the bound the oldest unsent replies are dropped and counted) and a token bucket
for the flood rule (PROTOCOL.md, host rule 9).

A FIFO channel (``fifo<N>``, mode 0660) carries JSON messages from host processes for
host CPU N; the FIFO's permissions decide who may control CPU N.

This module does socket and FIFO I/O only; what a message means is ``power``'s job.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import socket
import stat
from collections import deque
from collections.abc import Callable
from pathlib import Path

from vmpower import protocol

log = logging.getLogger("vmpower.channels")

RECV_CHUNK = 64 * 1024  # one turn's share of a busy channel: ~141 packets
FIFO_MODE = 0o660


class ChannelState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``burst`` saved; one token a request."""

    __slots__ = ("burst", "clock", "rate_per_s", "stamp", "tokens")

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self.clock = clock
        self.tokens = float(burst)
        self.stamp = clock()

    def take_many(self, now: float, count: int) -> int:
        """Take up to ``count`` tokens at once; returns how many were granted."""
        tokens = self.tokens
        if tokens < self.burst:
            tokens = min(self.burst, tokens + (now - self.stamp) * self.rate_per_s)
        self.stamp = now
        granted = min(count, int(tokens))
        self.tokens = tokens - granted
        return granted

    def take(self, now: float) -> bool:
        tokens = self.tokens
        if tokens < self.burst:
            tokens = min(self.burst, tokens + (now - self.stamp) * self.rate_per_s)
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False


class Endpoint:
    """What VM sockets and FIFOs share: a name, an fd, counters, enabled flag."""

    kind = "endpoint"

    def __init__(self, owner: str, path: str, bucket: TokenBucket) -> None:
        self.owner = owner  # the requester identity: the VM's name, or "fifo<N>"
        self.path = path
        self.bucket = bucket
        self.enabled = True
        self.state = ChannelState.DISCONNECTED
        self.requests = 0
        self.nacks = 0
        self.replies = 0
        self.dropped_replies = 0
        self.protocol_errors = 0
        self.rate_limited = 0
        self.last_error = ""

    def fileno(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def describe(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "path": self.path,
            "state": self.state.value,
            "enabled": self.enabled,
            "requests": self.requests,
            "replies": self.replies,
            "nacks": self.nacks,
            "rate_limited": self.rate_limited,
            "dropped_replies": self.dropped_replies,
            "protocol_errors": self.protocol_errors,
            "last_error": self.last_error,
        }


class VmChannel(Endpoint):
    """The host (client) end of one VM power channel socket."""

    kind = "vm"

    def __init__(
        self, vm: str, index: int, path: str, bucket: TokenBucket, send_queue_max: int
    ) -> None:
        super().__init__(vm, path, bucket)
        self.vm = vm
        self.index = index
        self.sock: socket.socket | None = None
        self.stream = protocol.PacketStream()
        self.send_queue_max = send_queue_max
        self._tx: deque[tuple[bytes, int]] = deque()  # (chunk of replies, how many)
        self._tx_count = 0
        self._tx_head: memoryview | None = None  # replies being sent: never dropped
        self.connects = 0

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    # -- connection --------------------------------------------------------------------

    def connect(self) -> ChannelState:
        """Start a non-blocking connect; CONNECTED, CONNECTING, or DISCONNECTED (retry later)."""
        self.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            sock.connect(self.path)
        except (BlockingIOError, InterruptedError):
            # AF_UNIX: the listener's backlog is full; writable once accepted.
            self.sock = sock
            self.state = ChannelState.CONNECTING
            return self.state
        except OSError as exc:
            sock.close()
            self.last_error = f"connect: {exc.strerror or exc}"
            self.state = ChannelState.DISCONNECTED
            return self.state
        self.sock = sock
        self._connected()
        return self.state

    def finish_connect(self) -> ChannelState:
        """After a CONNECTING socket turned writable: CONNECTED or DISCONNECTED."""
        assert self.sock is not None
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.last_error = f"connect: {os.strerror(err)}"
            self.close()
            return self.state
        self._connected()
        return self.state

    def _connected(self) -> None:
        self.state = ChannelState.CONNECTED
        self.connects += 1
        self.last_error = ""
        self.stream = protocol.PacketStream()  # a new connection starts a new byte stream
        self._clear_output()

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:  # pragma: no cover - close of a socket cannot really fail
                pass
        self.sock = None
        self.state = ChannelState.DISCONNECTED

    # -- receive -----------------------------------------------------------------------

    def receive(self) -> list[bytes] | None:
        """Read one turn's share; whole packets, or None when the peer hung up."""
        assert self.sock is not None
        try:
            data = self.sock.recv(RECV_CHUNK)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError as exc:
            self.last_error = f"recv: {exc.strerror or exc}"
            return None
        if not data:
            return None
        return self.stream.feed(data)

    # -- send --------------------------------------------------------------------------

    def queue_reply(self, reply: bytes) -> None:
        """Queue one reply (see queue_replies)."""
        self.queue_replies([reply])

    def queue_replies(self, replies: list[bytes]) -> None:
        """Queue a turn's replies as one chunk; past the bound, the oldest unsent go.

        The bound counts replies. Dropping works on whole chunks (a turn's replies), and
        never on the chunk being sent, so the guest's byte stream stays in 464-byte step.
        """
        count = len(replies)
        self._tx.append((replies[0] if count == 1 else b"".join(replies), count))
        self._tx_count += count
        self.replies += count
        while self._tx_count > self.send_queue_max and len(self._tx) > 1:
            _, dropped = self._tx.popleft()
            self._tx_count -= dropped
            before = self.dropped_replies
            self.dropped_replies += dropped
            if before == 0 or before // 1000 != self.dropped_replies // 1000:
                log.warning(
                    "%s: guest is not reading its replies; %d dropped so far",
                    self.path,
                    self.dropped_replies,
                )

    def has_pending_output(self) -> bool:
        return bool(self._tx) or self._tx_head is not None

    def _clear_output(self) -> None:
        self._tx.clear()
        self._tx_count = 0
        self._tx_head = None

    def flush(self) -> bool:
        """Send what the socket takes now; True when everything queued went out."""
        sock = self.sock
        if sock is None:
            self._clear_output()
            return True
        tx = self._tx
        while True:
            head = self._tx_head
            if head is None:
                if not tx:
                    return True
                # One send for everything queued: replies of a turn leave together.
                if len(tx) == 1:
                    data = tx.popleft()[0]
                else:
                    data = b"".join(chunk for chunk, _ in tx)
                    tx.clear()
                self._tx_count = 0
                head = memoryview(data)
            try:
                sent = sock.send(head)
            except (BlockingIOError, InterruptedError):
                self._tx_head = head
                return False
            except OSError as exc:
                self.last_error = f"send: {exc.strerror or exc}"
                self._clear_output()
                return True
            self._tx_head = head[sent:] if sent < len(head) else None
            if self._tx_head is not None:
                return False

    def describe(self) -> dict[str, object]:
        info = super().describe()
        info.update(vm=self.vm, index=self.index, connects=self.connects)
        return info


class FifoChannel(Endpoint):
    """A JSON FIFO for host CPU ``cpu``: ``<dir>/fifo<cpu>``."""

    kind = "fifo"

    def __init__(self, directory: Path, cpu: int, bucket: TokenBucket) -> None:
        path = str(directory / f"fifo{cpu}")
        super().__init__(f"fifo{cpu}", path, bucket)
        self.cpu = cpu
        self.fd = -1
        self.stream = protocol.JsonStream()

    def fileno(self) -> int:
        return self.fd

    def open(self) -> None:
        """Create the FIFO (mode 0660) if needed and open it for reading, non-blocking."""
        try:
            st = os.lstat(self.path)
            if not stat.S_ISFIFO(st.st_mode):
                raise OSError(errno.EEXIST, f"{self.path} exists and is not a FIFO")
        except FileNotFoundError:
            os.mkfifo(self.path, FIFO_MODE)
        os.chmod(self.path, FIFO_MODE)  # mkfifo applies the umask; the mode is the contract
        # O_RDWR keeps a writer on our own FIFO, so the read end never sees EOF (and never
        # spins on POLLHUP) between host writers; Linux defines O_RDWR on a FIFO (fifo(7)).
        self.fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.state = ChannelState.CONNECTED

    def receive(self) -> list[object]:
        try:
            data = os.read(self.fd, RECV_CHUNK)
        except (BlockingIOError, InterruptedError):
            return []
        return self.stream.feed(data)

    def close(self, unlink: bool = True) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self.state = ChannelState.CLOSED
