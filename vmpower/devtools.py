"""Stand-ins for parts that cannot run everywhere: QEMU's end of a power channel.

QEMU binds each VM's channel socket and the agent connects to it. Where no QEMU runs
(the `make run` demo, integration tests, benchmarks), ``ChannelHost`` binds the
socket, accepts the agent, and speaks the guest side of the protocol through it,
exactly as bytes from a guest would arrive through virtio-serial.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
import tty
from pathlib import Path

from vmpower import protocol


class ChannelHost:
    """Plays QEMU for one channel socket: listens at ``path``, accepts the agent."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.bind(self.path)
        self.listener.listen(4)
        self.conn: socket.socket | None = None

    def accept(self, timeout_s: float = 10.0) -> None:
        """Wait for the agent to connect (it retries about once a second)."""
        self.listener.settimeout(timeout_s)
        try:
            conn, _ = self.listener.accept()
        except TimeoutError:
            raise TimeoutError(
                f"the agent did not connect to {self.path} in {timeout_s} s"
            ) from None
        if self.conn is not None:
            self.conn.close()
        conn.settimeout(timeout_s)
        self.conn = conn

    def send(self, data: bytes) -> None:
        assert self.conn is not None, "accept() first"
        self.conn.sendall(data)

    def recv_exact(self, size: int, timeout_s: float = 5.0) -> bytes:
        assert self.conn is not None, "accept() first"
        self.conn.settimeout(timeout_s)
        buf = bytearray()
        while len(buf) < size:
            chunk = self.conn.recv(size - len(buf))
            if not chunk:
                raise ConnectionError(f"{self.path}: agent closed the channel")
            buf += chunk
        return bytes(buf)

    def nothing_to_read(self, wait_s: float = 0.2) -> bool:
        """True when no byte arrives within ``wait_s`` (for requests without a reply)."""
        assert self.conn is not None
        # poll, not select: a process with many fds open can hold this one past 1023.
        poller = select.poll()
        poller.register(self.conn, select.POLLIN)
        return not poller.poll(wait_s * 1000)

    def request(
        self, packet: bytes, reply_size: int | None = None, timeout_s: float = 5.0
    ) -> bytes:
        """Send one request and read its reply (of the size the protocol gives it)."""
        self.send(packet)
        if reply_size is None:
            reply_size = protocol.reply_size(packet)
        return self.recv_exact(reply_size, timeout_s)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> ChannelHost:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class PtyChannelHost:
    """One power channel the way QEMU and a virtio port make it: the host side a socket
    the agent connects to, the guest side a raw pseudo-terminal (one open, a byte
    stream) that ``vmpower-guest --device`` opens. Bytes are copied both ways by a
    thread; hold() keeps the host's replies back until release() (a late reply)."""

    def __init__(self, socket_path: str | Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(socket_path))
        self.listener.listen(1)
        self.master, self.slave = os.openpty()
        # Raw: no echo, no CR/LF translation, no flow control on 0x11/0x13 bytes. The
        # test keeps the slave open so the terminal (and its settings) outlive each run
        # of the guest tool, as a virtio port outlives the programs that open it.
        tty.setraw(self.slave)
        self.device = os.ttyname(self.slave)
        self.conn: socket.socket | None = None
        self.guest_bytes = 0  # bytes the guest sent towards the host
        self._held: bytearray | None = None
        self._lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe()
        self._thread: threading.Thread | None = None

    def accept(self, timeout_s: float = 10.0) -> None:
        self.listener.settimeout(timeout_s)
        self.conn, _ = self.listener.accept()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.conn is not None
        conn = self.conn.fileno()
        poller = select.poll()
        for fd in (conn, self.master, self._stop_r):
            poller.register(fd, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._stop_r in ready:
                return
            if conn in ready:
                data = os.read(conn, 65536)
                if not data:
                    return
                with self._lock:
                    if self._held is not None:
                        self._held += data
                        data = b""
                if data:
                    os.write(self.master, data)
            if self.master in ready:
                data = os.read(self.master, 65536)
                self.guest_bytes += len(data)
                self.conn.sendall(data)

    def hold(self) -> None:
        with self._lock:
            self._held = bytearray()

    def held(self) -> int:
        with self._lock:
            return len(self._held or b"")

    def release(self) -> None:
        with self._lock:
            data, self._held = bytes(self._held or b""), None
        os.write(self.master, data)

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(5)
        for fd in (self.master, self.slave, self._stop_r, self._stop_w):
            os.close(fd)
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


def make_request(command: int, unit: int = 0, resource_id: int = 0, **fields: object) -> bytes:
    """A 464-byte guest request, zero everywhere but the fields given."""
    return protocol.encode_packet(
        protocol.Packet(command=int(command), unit=int(unit), resource_id=resource_id, **fields)  # type: ignore[arg-type]
    )


def wait_for(predicate, timeout_s: float = 10.0, interval_s: float = 0.02) -> bool:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until true or ``timeout_s`` passes; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return bool(value)
        time.sleep(interval_s)
