"""The local admin API: JSON lines on a Unix stream socket, served by the monitor loop.

One request per line, ``{"cmd": "show_vm", "vm": "vm1"}``; one reply per line,
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "one clear line"}``.
The socket's mode (default 0660) and group decide who may talk to the daemon; the
peer's credentials (SO_PEERCRED) are logged with every command that changes state.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmpower.errors import ControlError, VmpowerError
from vmpower.monitor import Monitor

log = logging.getLogger("vmpower.control")

MAX_LINE = 1 << 20  # a request line longer than this is a broken or hostile client


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"pid={self.pid} uid={self.uid} gid={self.gid}"


@dataclass(frozen=True)
class Command:
    """A control command: its handler and whether it changes state (logged with creds)."""

    handler: Callable[[dict[str, Any], PeerCred], Any]
    changes: bool = False
    help: str = ""


class _Client:
    __slots__ = ("buf", "cred", "out", "sock")

    def __init__(self, sock: socket.socket, cred: PeerCred) -> None:
        self.sock = sock
        self.cred = cred
        self.buf = bytearray()
        self.out = bytearray()


class ControlServer:
    """Serves JSON-line commands on ``path`` from the monitor thread."""

    def __init__(
        self,
        path: Path,
        monitor: Monitor,
        commands: dict[str, Command],
        mode: int = 0o660,
        group: str = "",
    ) -> None:
        self.path = path
        self.monitor = monitor
        self.commands = commands
        self.mode = mode
        self.group = group
        self._sock: socket.socket | None = None
        self._clients: dict[int, _Client] = {}

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            # A socket left by a crashed daemon; the instance lock already proved no other
            # daemon is using it.
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # Bind and listen under a temporary name, then rename: the socket appears at its
        # path only once it accepts connections, so a client never sees it refuse one.
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        if staging.exists():
            staging.unlink()
        sock.bind(str(staging))
        os.chmod(staging, self.mode)
        if self.group:
            try:
                os.chown(staging, -1, grp.getgrnam(self.group).gr_gid)
            except KeyError:
                sock.close()
                staging.unlink()
                raise VmpowerError(f"control.group: no group named {self.group!r}") from None
        sock.listen(64)
        os.rename(staging, self.path)
        sock.setblocking(False)
        self._sock = sock
        self.monitor.add_reader(sock.fileno(), self._accept)
        log.info("control socket %s (mode %o)", self.path, self.mode)

    def close(self) -> None:
        for fd in list(self._clients):
            self._drop(fd)
        if self._sock is not None:
            self.monitor.remove(self._sock.fileno())
            self._sock.close()
            self._sock = None
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def _accept(self, _fd: int) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(False)
            raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            cred = PeerCred(*struct.unpack("3i", raw))
            self._clients[conn.fileno()] = _Client(conn, cred)
            self.monitor.add_reader(conn.fileno(), self._readable)

    def _readable(self, fd: int) -> None:
        client = self._clients.get(fd)
        if client is None:
            return
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(fd)
            return
        client.buf += data
        while True:
            nl = client.buf.find(b"\n")
            if nl < 0:
                if len(client.buf) > MAX_LINE:
                    self._reply(client, {"ok": False, "error": "request line too long"})
                    self._drop(fd)
                break
            line = bytes(client.buf[:nl])
            del client.buf[: nl + 1]
            if line.strip():
                self._reply(client, self.dispatch(line, client.cred))

    def dispatch(self, line: bytes, cred: PeerCred) -> dict[str, Any]:
        """Run one request line; always returns a reply object."""
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            return {"ok": False, "error": f"not a JSON object: {exc}"}
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": 'a request is a JSON object with a "cmd" string'}
        name = request["cmd"]
        command = self.commands.get(name)
        if command is None:
            return {"ok": False, "error": f"unknown command {name!r}"}
        try:
            result = command.handler(request, cred)
        except (ControlError, VmpowerError) as exc:
            if command.changes:
                log.warning("control %s by %s refused: %s", name, cred, exc)
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("control %s by %s failed", name, cred)
            return {"ok": False, "error": f"internal error: {exc}"}
        if command.changes:
            args = {k: v for k, v in request.items() if k != "cmd"}
            log.info("control %s %s by %s", name, json.dumps(args, sort_keys=True), cred)
        return {"ok": True, "result": result}

    def _reply(self, client: _Client, reply: dict[str, Any]) -> None:
        client.out += json.dumps(reply).encode() + b"\n"
        self._send(client)

    def _send(self, client: _Client) -> None:
        fd = client.sock.fileno()
        try:
            sent = client.sock.send(client.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(fd)
            return
        del client.out[:sent]
        if client.out:
            self.monitor.add_writer(fd, lambda _fd, c=client: self._send(c))
        else:
            self.monitor.remove_writer(fd)

    def _drop(self, fd: int) -> None:
        client = self._clients.pop(fd, None)
        if client is not None:
            self.monitor.remove(fd)
            client.sock.close()


def request(path: str | Path, cmd: str, timeout_s: float = 10.0, **args: Any) -> Any:
    """Send one command to a running daemon and return its result (client side).

    Raises ControlError with the daemon's message on refusal, or a clear message when
    no daemon is listening.
    """
    payload = json.dumps({"cmd": cmd, **args}).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(
                f"vmpowerd is not running (no control socket at {path}); "
                "start it with `systemctl start vmpowerd` or `vmpowerd --config FILE`"
            ) from None
        except PermissionError:
            raise ControlError(
                f"permission denied on {path}: are you in the vmpower group?"
            ) from None
        sock.sendall(payload)
        buf = bytearray()
        while not buf.endswith(b"\n"):
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise ControlError(f"vmpowerd did not answer within {timeout_s} s") from None
            if not chunk:
                raise ControlError("vmpowerd closed the connection without answering")
            buf += chunk
    reply = json.loads(buf)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "refused"))
    return reply.get("result")
