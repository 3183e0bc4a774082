"""The local admin API: JSON lines on a Unix stream socket, served by the monitor loop.

One request per line, ``{"cmd": "show_vm", "vm": "vm1"}``; one reply per line,
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "one clear line"}``.
The socket's mode (default 0660) and group decide who may talk to the daemon; the
peer's credentials (SO_PEERCRED) are logged with every command that changes state.

A client is not trusted to behave (issue #11, points 2 and 8):

* every line gets exactly one reply, whatever it holds: bad JSON, JSON nested too
  deeply for the parser, not an object, not UTF-8, an unknown command, a handler that
  raises; the connection goes on;
* a line longer than ``MAX_LINE`` gets one error reply when the limit is passed, and the
  rest of it is discarded up to the next newline (the stream is still framed by
  newlines, so the next request is found again; dropping the connection would punish a
  client for one oversized argument, and discarding keeps nothing in memory);
* a client's work per loop turn is bounded (``LINES_PER_TURN``, one ``recv`` of
  ``RECV_BYTES``), as rule 9 bounds a guest channel's share (docs/protocol.md), so one
  client cannot hold the loop; lines left over are handled in the following turns;
* a client's unsent replies are bounded (``MAX_UNSENT_BYTES``): past it the client is
  not read (its requests wait in the kernel's socket buffer, and its ``send`` blocks)
  until it reads its replies and the queue drains below ``RESUME_BELOW_BYTES``;
* errors are logged by kind with counts (``KindLog``, per peer uid), never one line
  per bad request.

A command whose work grows with the host (every CPU's sysfs files, every VM's row) is
*sliced* (issue #16: no command holds the loop more than 5 ms): its handler is a
generator (``Steps``) that does a bounded piece of work per ``next()`` and returns the
result. The server runs one step per loop turn, so guests are served between steps and
the client gets its answer some turns later. A long list result is encoded in slices
too (``ENCODE_BYTES_PER_SLICE``). A step that waits for something off the loop (a
libvirt call on the hypervisor's worker) yields a ``ready()`` predicate instead of None:
the task is parked, not stepped, until ``ready()`` is true (checked at the end of every
turn; the thing awaited wakes the loop, as a worker's posted outcome does, and a parked
task is looked at again at least every ``PARK_RECHECK_S``). Bounds: a client has at most
one sliced command in flight (its next lines wait, and it is not read once a whole line
waits), and at most ``SLICES_PER_TURN`` steps run per turn over all clients, each
client's at most once.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmpower.errors import ControlError, VmpowerError
from vmpower.logbook import DEFAULT_INTERVAL_S, KindLog
from vmpower.monitor import Monitor, TimerHandle

log = logging.getLogger("vmpower.control")

MAX_LINE = 1 << 20  # a request line longer than this is a broken or hostile client
RECV_BYTES = 1 << 16  # one read per client per turn
LINES_PER_TURN = 64  # requests handled per client per loop turn; the rest wait a turn
ACCEPTS_PER_TURN = 16  # new clients a loop turn; the rest wait in the listen backlog
MAX_UNSENT_BYTES = 1 << 20  # a client's unsent replies; past it, it is not read
RESUME_BELOW_BYTES = MAX_UNSENT_BYTES // 2  # read it again once drained below this
TEXT_MAX = 120  # client-supplied text quoted in an error reply or the log
MAX_TRACED = 64  # (command, exception type) pairs whose traceback is logged once
SLICES_PER_TURN = 2  # sliced-command steps per loop turn, over all clients (one each)
# A long list reply is encoded this many bytes (about) per turn: json.dumps of list_vms
# at 4000 VMs (0.5 MB) held the loop 3-9 ms in one piece.
ENCODE_BYTES_PER_SLICE = 1 << 16
ENCODE_ITEMS_PER_CHUNK = 16  # items encoded per json.dumps call while slicing
PARK_RECHECK_S = 0.1  # a parked task's ready() is checked at least this often

# A sliced handler's steps: each next() does a bounded piece of work; the generator's
# return value is the command's result. A step yields None (go on next turn) or a
# ``ready()`` predicate (go on once it is true: waiting, not spinning the loop).
Steps = Generator[Callable[[], bool] | None, None, Any]
_ReplySteps = Generator[Any, None, dict[str, Any]]


def run_steps(result: Any) -> Any:
    """A handler's result, with every step of a sliced one run at once (tests, tools;
    a step waiting for ``ready()`` is waited for here, off any loop)."""
    if isinstance(result, Generator):
        while True:
            try:
                waiting = next(result)
            except StopIteration as stop:
                return stop.value
            while callable(waiting) and not waiting():
                time.sleep(0.001)
    return result


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"pid={self.pid} uid={self.uid} gid={self.gid}"


@dataclass(frozen=True)
class Command:
    """A control command: its handler and whether it changes state (logged with creds).

    The handler returns the result, or a generator (``Steps``) for a sliced command. A
    long list result is encoded over several turns: a handler returns values it does not
    change afterwards (each builds its rows for the reply).
    """

    handler: Callable[[dict[str, Any], PeerCred], Any]
    changes: bool = False
    help: str = ""


class _Task:
    """One request line in flight: its steps (parse, handler steps, encoding) end with
    the reply line's bytes; ``name`` is the command's once parsed (LoopStats)."""

    __slots__ = ("name", "ready", "steps", "turn")

    def __init__(self) -> None:
        self.name = ""
        self.steps: Generator[Any, None, bytes] | None = None
        self.turn = -1  # the loop turn of its last step: one step a turn
        self.ready: Callable[[], bool] | None = None  # parked until this is true


class _Client:
    __slots__ = ("blocked", "buf", "cred", "out", "reading", "skipping", "sock", "task")

    def __init__(self, sock: socket.socket, cred: PeerCred) -> None:
        self.sock = sock
        self.cred = cred
        self.buf = bytearray()  # received, not yet handled: at most MAX_LINE + RECV_BYTES
        self.out = bytearray()  # replies not yet sent: about MAX_UNSENT_BYTES at most
        self.reading = True  # read interest registered with the monitor
        self.blocked = False  # too much unsent: not read until it drains
        self.skipping = False  # discarding the rest of an over-long line
        self.task: _Task | None = None  # a sliced command in flight: its lines wait


def _clip(text: str) -> str:
    return text if len(text) <= TEXT_MAX else text[:TEXT_MAX] + "…"


class _Failure(Exception):
    """One bad request: ``kind`` for the log's counts, ``message`` for the reply."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class ControlServer:
    """Serves JSON-line commands on ``path`` from the monitor thread."""

    def __init__(
        self,
        path: Path,
        monitor: Monitor,
        commands: dict[str, Command],
        mode: int = 0o660,
        group: str = "",
        log_interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        self.path = path
        self.monitor = monitor
        self.commands = commands
        self.mode = mode
        self.group = group
        self._sock: socket.socket | None = None
        self._clients: dict[int, _Client] = {}
        # Clients with whole lines waiting (and room for replies): served next turn.
        self._backlog: set[int] = set()
        self._backlog_queued = False
        # Clients with a sliced command in flight, served round-robin SLICES_PER_TURN a turn.
        self._slicing: deque[int] = deque()
        self._parked: dict[int, None] = {}  # clients whose task waits for ready()
        self._steps_taken = 0  # sliced-command steps this turn (reset at its end)
        self._recheck: TimerHandle | None = None
        self.errors = KindLog(
            log, "control requests failed", interval_s=log_interval_s, clock=monitor.clock
        )
        self._error_sources: set[str] = set()
        self._traced: set[tuple[str, str]] = set()

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
        self.monitor.add_ticker(self.errors)
        self.monitor.add_end_of_turn(self._end_of_turn)
        log.info("control socket %s (mode %o)", self.path, self.mode)

    def close(self) -> None:
        for fd in list(self._clients):
            self._drop(fd)
        for source in self._error_sources:
            self.errors.forget(source)  # say what is still counted
        self._error_sources.clear()
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
        # Bounded: each client's first command runs here (below), and the listening
        # socket stays readable for the next turn while more wait in the backlog.
        for _ in range(ACCEPTS_PER_TURN):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(False)
            raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            cred = PeerCred(*struct.unpack("3i", raw))
            fd = conn.fileno()
            self._clients[fd] = _Client(conn, cred)
            self.monitor.add_reader(fd, self._readable)
            # A client sends its command as soon as its connect returns, mostly before
            # this accept: read now, not when the next turn finds the socket readable
            # (issue #16: that turn was 0.16 ms median of every command under guest
            # traffic). Nothing there yet costs one recv that would block.
            self._readable(fd)

    # -- input -------------------------------------------------------------------------

    def _readable(self, fd: int) -> None:
        client = self._clients.get(fd)
        if client is None:
            return
        try:
            data = client.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(fd)
            return
        if client.skipping:  # the tail of an over-long line: discard up to its newline
            nl = data.find(b"\n")
            if nl < 0:
                return
            client.skipping = False
            data = data[nl + 1 :]
        client.buf += data
        self._serve(client)

    def _serve(self, client: _Client) -> None:
        """Handle up to LINES_PER_TURN whole lines while there is room for the replies."""
        buf = client.buf
        out = client.out
        handled = 0
        while handled < LINES_PER_TURN and len(out) < MAX_UNSENT_BYTES and client.task is None:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > MAX_LINE:  # no newline within the limit: skip to the next
                    buf.clear()
                    client.skipping = True
                    out += self._too_long_line(client.cred)
                break
            handled += 1  # empty lines count too: they cost a turn's work like any other
            if nl > MAX_LINE:
                del buf[: nl + 1]
                out += self._too_long_line(client.cred)
                continue
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            if line.strip():
                task = self._task(line, client.cred)
                reply = self._step(task)
                if reply is None:  # sliced: the rest in the next turns, its lines wait
                    client.task = task
                    self._queue(client.sock.fileno(), task)
                else:
                    out += reply
        if self._flush(client):
            self._update_interest(client)

    def _queue(self, fd: int, task: _Task) -> None:
        if task.ready is None:
            self._slicing.append(fd)
        else:
            self._parked[fd] = None

    def _unpark(self) -> None:
        for fd in list(self._parked):
            client = self._clients.get(fd)
            task = client.task if client is not None else None
            if task is None or task.ready is None or task.ready():
                del self._parked[fd]
                if client is None or task is None:
                    continue
                task.ready = None
                # Resumed in this turn, whose guests are served already: stepped in
                # the next turn instead, after its guests, add_vm waited 0.2-0.9 ms more
                # of its 2.4 under 1000 guest req/s (issue #16). Within the turn's
                # step bound; a task that parked this very turn waits for the next.
                if self._steps_left() and task.turn != self.monitor.turns:
                    self._advance(fd, client, task)
                else:
                    self._slicing.append(fd)
        if self._parked and self._recheck is None:
            self._recheck = self.monitor.call_later(PARK_RECHECK_S, self._rechecked)

    def _rechecked(self) -> None:
        self._recheck = None  # this turn's end looks at the parked tasks again

    def _end_of_turn(self) -> None:
        if self._parked:
            self._unpark()
        self._steps_taken = 0  # the turn's last steps were the unparked ones
        # Queued at the end of a turn, the call runs in the next one (call_soon_threadsafe
        # makes that turn's wait zero), so a backlogged client gets one share per turn,
        # and a sliced command one step; the turn first serves the guests ready then.
        if (self._backlog or self._slicing) and not self._backlog_queued:
            self._backlog_queued = True
            self.monitor.call_soon_threadsafe(self._serve_backlog)

    def _serve_backlog(self) -> None:
        self._backlog_queued = False
        # Taken first: a client whose sliced command ends here serves its next lines in
        # the next turn, not this one (one share a turn).
        fds, self._backlog = self._backlog, set()
        # At most one step per client per turn: never more than the clients waiting.
        for _ in range(min(self._steps_left(), len(self._slicing))):
            fd = self._slicing.popleft()
            client = self._clients.get(fd)
            if client is None or client.task is None:
                continue
            if client.task.turn == self.monitor.turns:  # began this turn (its first step)
                self._slicing.append(fd)
                continue
            self._advance(fd, client, client.task)
        for fd in fds:
            client = self._clients.get(fd)
            if client is not None:
                self._serve(client)

    def _steps_left(self) -> int:
        """Sliced-command steps this turn may still take (SLICES_PER_TURN a turn)."""
        return max(0, SLICES_PER_TURN - self._steps_taken)

    def _advance(self, fd: int, client: _Client, task: _Task) -> None:
        """One more step of ``client``'s sliced ``task``: queued again, or its reply sent."""
        self._steps_taken += 1
        reply = self._step(task)
        if reply is None:
            self._queue(fd, task)
            return
        client.task = None
        client.out += reply
        if self._flush(client):
            self._update_interest(client)

    def _update_interest(self, client: _Client) -> None:
        """Read the client only when its lines are all handled and its replies fit."""
        fd = client.sock.fileno()
        if len(client.out) >= MAX_UNSENT_BYTES:
            client.blocked = True
        elif client.blocked and len(client.out) < RESUME_BELOW_BYTES:
            client.blocked = False
        pending = client.buf.find(b"\n") >= 0 or len(client.buf) > MAX_LINE
        if pending and not client.blocked and client.task is None:
            self._backlog.add(fd)
        else:
            self._backlog.discard(fd)
        want = not client.blocked and not pending
        if want == client.reading:
            return
        client.reading = want
        if want:
            self.monitor.add_reader(fd, self._readable)  # keeps the writer, if any
        else:
            # The monitor has no "remove reader": forget the fd and re-add the writer
            # alone, which keeps draining the replies.
            self.monitor.remove(fd)
            if client.out:
                self.monitor.add_writer(fd, self._writable)

    # -- requests ----------------------------------------------------------------------

    def _task(self, line: bytes, cred: PeerCred) -> _Task:
        task = _Task()
        task.steps = self._line_steps(line, cred, task)
        return task

    def _step(self, task: _Task) -> bytes | None:
        """Run one step of ``task``; its reply line once it is done, else None."""
        assert task.steps is not None
        task.turn = self.monitor.turns
        started = time.perf_counter()
        started_cpu = time.thread_time()
        try:
            waiting = next(task.steps)
            task.ready = waiting if callable(waiting) else None
            return None
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        finally:
            # How long the command held the loop in one piece (issue #16: at most 5 ms;
            # a sliced command's longest step): ``status``.loop
            if task.name:
                self.monitor.stats.command(
                    task.name,
                    time.perf_counter() - started,
                    time.thread_time() - started_cpu,
                )

    def _line_steps(self, line: bytes, cred: PeerCred, task: _Task) -> Generator[Any, None, bytes]:
        reply = yield from self._reply(line, cred, task)
        return (yield from self._encode_steps(reply, cred))

    def _reply(self, line: bytes, cred: PeerCred, task: _Task) -> _ReplySteps:
        """One request's steps, ending with its reply object (never raises)."""
        try:
            result = yield from self._run(line, cred, task)
            return {"ok": True, "result": result}
        except _Failure as failure:
            self._note(cred, failure.kind, failure.message)
            return {"ok": False, "error": failure.message}

    def _run(self, line: bytes, cred: PeerCred, task: _Task) -> Steps:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Failure("not UTF-8", f"request is not UTF-8 (byte {exc.start})") from None
        try:
            request = json.loads(text)
        except RecursionError:  # the parser recurses once per level: [[[[...]]]]
            raise _Failure("nested too deeply", "request JSON is nested too deeply") from None
        except ValueError as exc:
            raise _Failure("not JSON", _clip(f"request is not JSON: {exc}")) from None
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            raise _Failure("not a request", 'a request is a JSON object with a "cmd" string')
        name = request["cmd"]
        command = self.commands.get(name)
        if command is None:
            raise _Failure("unknown command", _clip(f"unknown command {name!r}"))
        task.name = name
        try:
            result = command.handler(request, cred)
            if isinstance(result, Generator):
                result = yield from result  # sliced: one step per turn
        except (ControlError, VmpowerError) as exc:
            # A refused state change is counted in the log; a refused read is not (its
            # reply says it all).
            raise _Failure(f"{name} refused" if command.changes else "", str(exc)) from None
        except Exception as exc:  # a handler bug: the client still gets its one reply
            kind = f"{name} failed: {type(exc).__name__}"
            self._trace_once(name, exc, cred)
            raise _Failure(kind, _clip(f"internal error in {name}: {exc}")) from None
        if command.changes:
            args = {k: v for k, v in request.items() if k != "cmd"}
            log.info("control %s %s by %s", name, _clip(json.dumps(args, sort_keys=True)), cred)
        return result

    def _note(self, cred: PeerCred, kind: str, message: str) -> None:
        if not kind:
            return  # a plain refusal of a read-only command: the reply says it all
        # Keyed by uid (bounded: the users allowed on the socket), the pid in the detail:
        # a client opening a connection per bad request still gets summarized.
        source = f"control uid={cred.uid}"
        self._error_sources.add(source)
        self.errors.note(source, kind, _clip(f"pid {cred.pid}: {message}"))

    def _trace_once(self, name: str, exc: Exception, cred: PeerCred) -> None:
        key = (name, type(exc).__name__)
        if key in self._traced or len(self._traced) >= MAX_TRACED:
            return
        self._traced.add(key)
        log.error("control %s by %s failed (traceback once)", name, cred, exc_info=exc)

    def _too_long_line(self, cred: PeerCred) -> bytes:
        message = f"request line longer than {MAX_LINE} bytes: skipped to its newline"
        self._note(cred, "line too long", message)
        return self._encode({"ok": False, "error": message}, cred)

    def _encode_steps(self, reply: dict[str, Any], cred: PeerCred) -> Generator[None, None, bytes]:
        """The reply line; a long list result about ENCODE_BYTES_PER_SLICE a step. The
        text is json.dumps's own (items joined by ", "); the result is the handler's
        finished value, which nothing changes between steps.

        The last step only joins: the pieces are already bytes, separators included, so
        the line is made in one copy (issue #16: at 4000 VMs, encoding the last chunks,
        then joining 0.5 MB of text, adding its ends and encoding it, held the loop
        2-3 ms in one step)."""
        result = reply.get("result")
        if not isinstance(result, list) or len(result) <= ENCODE_ITEMS_PER_CHUNK:
            return self._encode(reply, cred)
        pieces: list[bytes] = [b'{"ok": true, "result": [']
        size = 0
        yield  # not in the step that finished the result (its last slice of work)
        try:
            for start in range(0, len(result), ENCODE_ITEMS_PER_CHUNK):
                if size >= ENCODE_BYTES_PER_SLICE:
                    size = 0
                    yield
                # the chunk's items without its brackets; UTF-8 of the chunk is the
                # line's own bytes (json.dumps escapes all but ASCII anyway)
                chunk = json.dumps(result[start : start + ENCODE_ITEMS_PER_CHUNK]).encode()
                if start:
                    pieces.append(b", ")
                pieces.append(chunk[1:-1])
                size += len(chunk)
        except (TypeError, ValueError, RecursionError) as exc:
            return self._not_json(cred, exc)
        yield  # the last chunks were encoded in this step: the join is the next one's
        pieces.append(b"]}\n")
        return b"".join(pieces)

    def _encode(self, reply: dict[str, Any], cred: PeerCred) -> bytes:
        try:
            return json.dumps(reply).encode() + b"\n"
        except (TypeError, ValueError, RecursionError) as exc:
            return self._not_json(cred, exc)

    def _not_json(self, cred: PeerCred, exc: Exception) -> bytes:
        message = _clip(f"internal error: reply is not JSON: {exc}")
        self._note(cred, "reply not JSON", message)
        return json.dumps({"ok": False, "error": message}).encode() + b"\n"

    # -- output ------------------------------------------------------------------------

    def _writable(self, fd: int) -> None:
        client = self._clients.get(fd)
        if client is not None and self._flush(client):
            self._update_interest(client)

    def _flush(self, client: _Client) -> bool:
        """Send what the socket takes; False when the client was dropped."""
        fd = client.sock.fileno()
        if client.out:
            try:
                sent = client.sock.send(client.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._drop(fd)
                return False
            del client.out[:sent]
        if client.out:
            self.monitor.add_writer(fd, self._writable)
        else:
            self.monitor.remove_writer(fd)
        return True

    def _drop(self, fd: int) -> None:
        client = self._clients.pop(fd, None)
        self._backlog.discard(fd)
        if client is not None and client.task is not None:
            # A new client may get the same fd: its entry must not serve that one.
            if fd in self._parked:
                del self._parked[fd]
            else:
                self._slicing.remove(fd)
            assert client.task.steps is not None
            client.task.steps.close()
            client.task = None
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
