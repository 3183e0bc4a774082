"""The control socket against careless and hostile local clients (issue #11, points 2 and 8).

Point 2: a client that pipelines requests and never reads its replies must not grow the
daemon without bound nor hold the loop; the guests keep their replies, and the client,
once it reads, gets every reply in order on a connection that still works.

Point 8: whatever a line holds (bad JSON, JSON nested 100 000 deep, not an object, not
UTF-8, over the line limit, an unknown command, a handler that raises), it gets exactly
one error reply and the next request on the same connection is answered; errors are
logged by kind with counts, never one line per bad request.

Real parts: vmpowerd as a subprocess (tests/agent_support.py), real Unix sockets; the
handler-exception case runs a ControlServer on a real Monitor thread with a command that
raises, since no shipped handler is meant to.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_support import RunningAgent

from vmpower import protocol
from vmpower.control import MAX_LINE, Command, ControlServer, PeerCred
from vmpower.devtools import make_request, wait_for
from vmpower.monitor import Monitor
from vmpower.protocol import Command as Pkt
from vmpower.protocol import ReplyCode, Unit

REPLY_TIMEOUT_S = 30.0  # generous: the machine is shared and loaded


class LineClient:
    """A raw JSON-lines client: send any bytes, read one reply line at a time."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.buf = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.settimeout(REPLY_TIMEOUT_S)
        self.sock.sendall(data)

    def reply(self, timeout_s: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
        self.sock.settimeout(timeout_s)
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the daemon closed the connection")
            self.buf += chunk
        nl = self.buf.index(b"\n")
        line = bytes(self.buf[:nl])
        del self.buf[: nl + 1]
        reply = json.loads(line)
        assert isinstance(reply, dict), line
        return reply

    def nothing_more(self, wait_s: float = 0.3) -> bool:
        if self.buf:
            return False
        ready, _, _ = select.select([self.sock], [], [], wait_s)
        return not ready

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    running = RunningAgent(tmp_path_factory.mktemp("control"))
    try:
        yield running.start()
    finally:
        running.close()


@pytest.fixture
def client(agent: RunningAgent) -> Iterator[LineClient]:
    conn = LineClient(agent.socket)
    try:
        yield conn
    finally:
        conn.close()


# -- point 8: every bad line gets one error reply, the connection goes on ----------------

BAD_LINES = {
    "bad_json": b"{not json",
    "nested_100k": b"[" * 100_000 + b"]" * 100_000,
    "nested_objects": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "not_an_object": b"[1, 2, 3]",
    "a_number": b"42",
    "null": b"null",
    "cmd_not_a_string": b'{"cmd": 5}',
    "not_utf8": b'{"cmd": "st\xff\xfeatus"}',
    "unknown_cmd": b'{"cmd": "no_such_command"}',
    "over_the_limit": b'{"cmd": "status", "pad": "' + b"x" * (MAX_LINE + 100) + b'"}',
}


@pytest.mark.parametrize("name", sorted(BAD_LINES))
def test_bad_line_gets_one_error_and_the_connection_goes_on(client: LineClient, name: str) -> None:
    client.send(BAD_LINES[name] + b"\n")
    reply = client.reply()
    assert reply["ok"] is False
    assert isinstance(reply["error"], str) and reply["error"]
    assert len(reply["error"]) < 500  # one clear line, not an echo of the input
    client.send(b'{"cmd": "status"}\n')
    status = client.reply()
    assert status["ok"] is True, status  # exactly one error reply: the next is status's
    assert "version" in status["result"]
    assert client.nothing_more()


def test_over_the_limit_line_in_pieces_skips_to_the_next_newline(client: LineClient) -> None:
    """A long line sent in pieces, with a good request right after its newline in the
    same write: one error, the rest of the long line discarded, the good one answered."""
    piece = b"y" * (1 << 16)
    sent = 0
    while sent <= MAX_LINE + len(piece):
        client.send(piece)
        sent += len(piece)
    assert client.reply()["ok"] is False  # reported once the limit is passed
    client.send(piece + b'\n{"cmd": "status"}\n')
    assert client.reply()["ok"] is True
    assert client.nothing_more()


def test_client_errors_are_logged_by_kind_not_per_line(
    agent: RunningAgent, client: LineClient
) -> None:
    count = 300
    client.send(b'{"cmd": "kind_log_probe"}\n' * count)
    for _ in range(count):
        assert client.reply()["ok"] is False
    client.send(b'{"cmd": "status"}\n')
    assert client.reply()["ok"] is True
    assert wait_for(lambda: "kind_log_probe" in agent.log(), 10), "never logged"
    lines = [line for line in agent.log().splitlines() if "kind_log_probe" in line]
    # The first occurrence at once; the rest only in the per-interval summary.
    assert 1 <= len(lines) <= 3, lines[:5]


# -- a handler raising an unexpected exception ------------------------------------------


class _Boom(RuntimeError):
    pass


def _explode(_request: dict[str, Any], _cred: PeerCred) -> Any:
    raise _Boom("handler bug")


def _ok(request: dict[str, Any], _cred: PeerCred) -> Any:
    return {"echo": request.get("n")}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ControlServer]:
    monitor = Monitor()
    path = tmp_path / "control.sock"
    srv = ControlServer(path, monitor, {"explode": Command(_explode), "ok": Command(_ok)})
    srv.start()
    thread = threading.Thread(target=monitor.run, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        monitor.stop()
        thread.join(10)
        srv.close()
        monitor.close()
    assert not path.exists()


def test_handler_exception_gets_one_error_reply_and_one_log_line(
    server: ControlServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="vmpower.control")
    conn = LineClient(server.path)
    try:
        count = 200
        conn.send(b'{"cmd": "explode"}\n' * count + b'{"cmd": "ok", "n": 7}\n')
        for _ in range(count):
            reply = conn.reply()
            assert reply["ok"] is False and "handler bug" in reply["error"]
        assert conn.reply() == {"ok": True, "result": {"echo": 7}}
        assert conn.nothing_more()
    finally:
        conn.close()
    about = [r for r in caplog.records if "explode" in r.getMessage()]
    assert 1 <= len(about) <= 2, [r.getMessage() for r in about[:5]]


def test_a_burst_in_one_write_is_answered_in_full(client: LineClient) -> None:
    """Far more lines than one turn handles, in one write, and nothing after it: the
    leftover lines must still be handled (the socket is not readable again)."""
    count = 5000
    lines = b"".join(b'{"cmd": "n%d"}\n' % i for i in range(count))
    sender = threading.Thread(target=client.send, args=(lines,))
    sender.start()
    try:
        for i in range(count):
            reply = client.reply()
            assert reply["ok"] is False and f"'n{i}'" in reply["error"], (i, reply)
    finally:
        sender.join(REPLY_TIMEOUT_S)
    client.send(b'{"cmd": "status"}\n')
    assert client.reply()["ok"] is True


# -- point 2: a client that never reads its replies -------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


MARK_EVERY = 500  # every 500th request is an unknown command naming its index


def hog_payload(count: int) -> bytes:
    lines = []
    for i in range(count):
        if i % MARK_EVERY == 0:
            lines.append(b'{"cmd": "mark_%d"}\n' % i)
        else:
            lines.append(b'{"cmd": "list_vms"}\n')
    return b"".join(lines)


class Hog:
    """Pipelines requests as fast as the daemon takes them and never reads (until told)."""

    def __init__(self, path: Path, payload: bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.setblocking(False)
        self.payload = payload
        self.sent = 0
        self.stop = threading.Event()

    def push(self) -> None:
        while self.sent < len(self.payload) and not self.stop.is_set():
            _, writable, _ = select.select([], [self.sock], [], 0.1)
            if writable:
                try:
                    self.sent += self.sock.send(self.payload[self.sent : self.sent + (1 << 16)])
                except BlockingIOError:
                    pass

    def drain(self, timeout_s: float) -> list[bytes]:
        """Finish the partial line, then read every reply to what was sent."""
        # The first newline at or after the last byte sent ends the last request begun.
        target = b""
        if self.sent:
            target = self.payload[: self.payload.find(b"\n", self.sent - 1) + 1]
        want = target.count(b"\n")
        buf = bytearray()
        lines: list[bytes] = []
        deadline = time.monotonic() + timeout_s
        while len(lines) < want:
            assert time.monotonic() < deadline, f"{len(lines)} of {want} replies"
            wlist = [self.sock] if self.sent < len(target) else []
            readable, writable, _ = select.select([self.sock], wlist, [], 1.0)
            if writable:
                try:
                    self.sent += self.sock.send(target[self.sent :])
                except BlockingIOError:
                    pass
            if readable:
                chunk = self.sock.recv(1 << 20)
                assert chunk, "the daemon closed the hog's connection"
                buf += chunk
                *complete, rest = bytes(buf).split(b"\n")
                lines.extend(complete)
                buf = bytearray(rest)
        assert not buf
        return lines


def test_a_client_that_never_reads_cannot_grow_the_daemon_or_stall_guests(
    tmp_path: Path,
) -> None:
    agent = RunningAgent(tmp_path)
    hog: Hog | None = None
    try:
        agent.start()
        pid = agent.proc.pid  # type: ignore[union-attr]
        vm1 = agent.hosts["vm1.0"]
        agent.control("list_vms")
        start_kib = rss_kib(pid)
        payload = hog_payload(400_000)
        hog = Hog(agent.socket, payload)
        pusher = threading.Thread(target=hog.push, daemon=True)
        pusher.start()
        answered = 0
        peak_kib = start_kib
        deadline = time.monotonic() + 8.0
        units = (Unit.SCALE_MAX, Unit.SCALE_MIN)
        while time.monotonic() < deadline:
            packet = make_request(Pkt.CPU_POWER, units[answered % 2], 0)
            reply = vm1.request(packet, timeout_s=REPLY_TIMEOUT_S)
            assert protocol.peek_header(reply)[2] == int(ReplyCode.ACK)
            answered += 1
            peak_kib = max(peak_kib, rss_kib(pid))
            time.sleep(0.01)
        hog.stop.set()
        pusher.join(10)
        peak_kib = max(peak_kib, rss_kib(pid))
        assert answered > 0
        grown_mib = (peak_kib - start_kib) / 1024
        assert grown_mib < 50, f"the daemon grew {grown_mib:.0f} MiB under the hog"

        # The hog reads at last: one well-formed reply per request it sent, in order.
        lines = hog.drain(timeout_s=120)
        assert len(lines) >= 1000
        for i, line in enumerate(lines):
            reply = json.loads(line)
            if i % MARK_EVERY == 0:
                assert reply["ok"] is False and f"'mark_{i}'" in reply["error"], (i, reply)
            else:
                assert reply["ok"] is True and isinstance(reply["result"], list), (i, reply)
        # And the connection still works.
        hog.sock.setblocking(True)
        hog.sock.settimeout(REPLY_TIMEOUT_S)
        hog.sock.sendall(b'{"cmd": "status"}\n')
        status = b""
        while not status.endswith(b"\n"):
            chunk = hog.sock.recv(1 << 16)
            assert chunk
            status += chunk
        assert json.loads(status)["ok"] is True
        # Guests still served after it.
        assert vm1.request(make_request(Pkt.CPU_POWER, Unit.SCALE_MAX, 0), timeout_s=30)
        assert agent.stop() == 0
    finally:
        if hog is not None:
            hog.stop.set()
            hog.sock.close()
        agent.close()
