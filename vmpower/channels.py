"""Power-channel endpoints: VM virtio-serial sockets and host JSON FIFOs.

A VM channel is the host end of a virtio-serial port: QEMU binds an AF_UNIX stream
socket (``/tmp/powermonitor/<vm>.<n>``) and vmpower connects to it as the client,
non-blocking. Each channel keeps its own receive framing (464-byte packets), a
bounded send queue (a guest that never reads its replies must not block anyone:
past the bound the oldest unsent replies are dropped and counted) and a token bucket
for the flood rule (docs/protocol.md, host rule 9).

A FIFO channel (``fifo<N>``, mode 0660) carries JSON messages from host processes for
host CPU N; the FIFO's permissions decide who may control CPU N.

``ChannelRegistry`` keeps every open endpoint (VM channels by ``(vm, index)``, FIFOs
by host CPU), registers them with the monitor loop, reconnects dropped VM channels
and sends each turn's replies. It does socket and FIFO I/O only: what a message means
is ``power``'s job, handed over through the two callbacks it is built with, and which
VMs should have channels is the daemon's (from the hypervisor).
"""

from __future__ import annotations

import enum
import errno
import functools
import logging
import os
import socket
import stat
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vmpower import protocol, trust
from vmpower.logbook import DEFAULT_INTERVAL_S, KindLog
from vmpower.tokenbucket import TokenBucket

if TYPE_CHECKING:
    from vmpower.monitor import Monitor

log = logging.getLogger("vmpower.channels")

RECV_CHUNK = 64 * 1024  # one turn's share of a busy channel: ~141 packets
_STREAM_FLAGS = socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
# One turn's share of a FIFO. What a read costs is its messages (each framed, parsed
# and handled: ~10 us even for a rejected "{}" on a loaded 2-core machine), and a
# writer chooses the cheapest: "{}" is a message every 2 bytes. 32 bytes are at most
# 16 messages, about 0.2 ms of the monitor thread (issue #11 point 5: no FIFO writer
# adds more than 1 ms to a turn; at 128 bytes a "{}" flood measured +1.08 ms on the
# guests' p50, at 64 bytes +0.82 ms); other bytes are skipped at C speed
# (protocol.JsonStream). The rest waits in the pipe and its writer blocks
# (back-pressure). Legitimate messages are 32-300 bytes: a few turns each.
FIFO_READ_BYTES = 32
FIFO_MODE = 0o660


@dataclass(frozen=True)
class ChannelLogs:
    """What VM channels log by kind (the daemon drives them as monitor tickers)."""

    # Sockets refused for their owner or type (vmpower.trust): the reconnect tick
    # retries every second, so each (socket, reason) is logged once, then only counted.
    refused_sockets: KindLog
    # Replies dropped for guests that do not read them: one line per channel per
    # interval (show_vm keeps the exact count).
    dropped_replies: KindLog

    @classmethod
    def build(
        cls, interval_s: float = DEFAULT_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> ChannelLogs:
        return cls(
            KindLog(log, "connections refused", interval_s=interval_s, clock=clock),
            KindLog(log, "replies dropped", interval_s=interval_s, clock=clock),
        )

    def all(self) -> tuple[KindLog, ...]:
        return (self.refused_sockets, self.dropped_replies)


_KINDS = {stat.S_IFLNK: "symbolic link", stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket"}


class ChannelState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"


# The members as module constants: a member looked up on its Enum class costs 0.15 us in
# Python 3.11, paid several times a channel (16 000 of them at a 4000-VM start, issue #16).
_DISCONNECTED = ChannelState.DISCONNECTED
_CONNECTING = ChannelState.CONNECTING
_CONNECTED = ChannelState.CONNECTED


class Endpoint:
    """What VM sockets and FIFOs share: a name, an fd, counters, enabled flag."""

    kind = "endpoint"

    def __init__(self, owner: str, path: str, bucket: TokenBucket) -> None:
        self.owner = owner  # the requester identity: the VM's name, or "fifo<N>"
        self.path = path
        self.bucket = bucket
        self.enabled = True
        self.state = _DISCONNECTED
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


class ChannelTally:
    """The registry's VM channels counted as they open, close and change state: how many
    each VM has and how many are connected, and which wait to be connected again.

    ``status``, ``list_vms`` and the 1 s reconnect tick read these instead of walking
    every channel (16 000 at 4000 VMs, issue #16: a walk a second was most of the idle
    daemon's CPU, and one per ``status`` held the loop). ``version`` changes with every
    count, so a reader can tell that nothing moved. ``per_vm``'s values are immutable,
    replaced on each change (channels change rarely), so ``dict(per_vm)`` is a coherent
    snapshot: ``list_vms`` takes one at 4000 VMs in ~0.05 ms, where copying mutable pairs
    took 0.6-2 ms of the loop.
    """

    def __init__(self) -> None:
        self.connected = 0
        self.version = 0
        self.per_vm: dict[str, tuple[int, int]] = {}  # VM → (channels, connected)
        self.down: dict[VmChannel, None] = {}  # DISCONNECTED channels (ordered set)
        self.by_vm: dict[str, dict[int, VmChannel]] = {}  # VM → index → channel

    def add(self, channel: VmChannel) -> None:
        channel._tally = self
        channels, connected = self.per_vm.get(channel.vm, (0, 0))
        self.per_vm[channel.vm] = (channels + 1, connected)
        self.by_vm.setdefault(channel.vm, {})[channel.index] = channel
        self.version += 1
        self._enter(channel, channel.state)

    def remove(self, channel: VmChannel) -> None:
        if channel._tally is not self:
            return
        self._leave(channel, channel.state)
        channel._tally = None
        channels, connected = self.per_vm[channel.vm]
        if channels > 1:
            self.per_vm[channel.vm] = (channels - 1, connected)
        else:
            del self.per_vm[channel.vm]
        mine = self.by_vm[channel.vm]
        if mine.get(channel.index) is channel:
            del mine[channel.index]
            if not mine:
                del self.by_vm[channel.vm]
        self.version += 1

    def moved(self, channel: VmChannel, old: ChannelState, new: ChannelState) -> None:
        self._leave(channel, old)
        self._enter(channel, new)
        self.version += 1

    def _enter(self, channel: VmChannel, state: ChannelState) -> None:
        if state is _CONNECTED:
            self.connected += 1
            channels, connected = self.per_vm[channel.vm]
            self.per_vm[channel.vm] = (channels, connected + 1)
        elif state is _DISCONNECTED:
            self.down[channel] = None

    def _leave(self, channel: VmChannel, state: ChannelState) -> None:
        if state is _CONNECTED:
            self.connected -= 1
            channels, connected = self.per_vm[channel.vm]
            self.per_vm[channel.vm] = (channels, connected - 1)
        elif state is _DISCONNECTED:
            self.down.pop(channel, None)


class VmChannel(Endpoint):
    """The host (client) end of one VM power channel socket."""

    kind = "vm"
    _tally: ChannelTally | None = None  # the registry's counts, told of each state change
    _state = _DISCONNECTED
    stream: protocol.PacketStream  # each connection's own (_connected)

    @property  # type: ignore[override]
    def state(self) -> ChannelState:
        return self._state

    @state.setter
    def state(self, new: ChannelState) -> None:
        old = self._state
        if new is old:
            return
        self._state = new
        if self._tally is not None:
            self._tally.moved(self, old, new)

    def __init__(
        self,
        vm: str,
        index: int,
        path: str,
        bucket: TokenBucket,
        send_queue_max: int,
        logs: ChannelLogs | None = None,
    ) -> None:
        super().__init__(vm, path, bucket)
        self.vm = vm
        self.index = index
        self.logs = logs if logs is not None else ChannelLogs.build()
        self.sock: socket.socket | None = None
        self.send_queue_max = send_queue_max
        self._tx: deque[tuple[bytes, int]] = deque()  # (chunk of replies, how many)
        self._tx_count = 0
        self._tx_head: bytes | memoryview | None = None  # being sent: never dropped
        self.connects = 0

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    # -- connection --------------------------------------------------------------------

    def connect(self) -> ChannelState:
        """Start a non-blocking connect; CONNECTED, CONNECTING, or DISCONNECTED (retry later).

        Only a socket owned by root, the daemon's user or the QEMU user is served
        (vmpower.trust): anyone else's could impersonate this VM.
        """
        if self.sock is not None:
            self.close()
        refused = trust.socket_problem(self.path)
        if refused is not None:
            kind, detail = refused
            self.last_error = f"not served: {detail}"
            self.logs.refused_sockets.note(self.path, kind, f"not served: {detail}")
            return self.state
        self.logs.refused_sockets.forget(self.path)  # a later refusal is news again
        # Non-blocking from its creation (Python then keeps no timeout): no ioctl.
        try:
            sock = socket.socket(socket.AF_UNIX, _STREAM_FLAGS)
        except OSError as exc:  # EMFILE, ENFILE: past the fd limit; the tick retries
            self.last_error = f"socket: {exc.strerror or exc}"
            detail = f"not connected: {exc.strerror or exc}"
            reason = "no socket"
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                reason = "fd limit"
                detail += " (raise the process's fd limit, LimitNOFILE: one fd a channel)"
            # One source: one line for them all, then counts.
            self.logs.refused_sockets.note("channels", reason, detail)
            return self.state
        try:
            sock.connect(self.path)
        except (BlockingIOError, InterruptedError):
            # AF_UNIX: the listener's backlog is full; writable once accepted.
            self.sock = sock
            self.state = _CONNECTING
            return _CONNECTING
        except OSError as exc:
            sock.close()
            self.last_error = f"connect: {exc.strerror or exc}"
            self.state = _DISCONNECTED
            return _DISCONNECTED
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
        self.state = _CONNECTED
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
        self.state = _DISCONNECTED

    # -- receive -----------------------------------------------------------------------

    def receive(self) -> bytes | None:
        """Read one turn's share: its whole packets as one bytes (``b""`` for none), or
        None when the peer hung up."""
        assert self.sock is not None
        try:
            data = self.sock.recv(RECV_CHUNK)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError as exc:
            self.last_error = f"recv: {exc.strerror or exc}"
            return None
        if not data:
            return None
        return self.stream.feed(data)

    # -- send --------------------------------------------------------------------------

    def queue_replies(self, chunks: list[bytes], count: int) -> None:
        """Queue a turn's ``count`` replies (``chunks`` of whole replies) as one chunk;
        past the bound, the oldest unsent go.

        The bound counts replies. Dropping works on whole chunks (a turn's replies), and
        never on the chunk being sent, so the guest's byte stream stays in 464-byte step.
        """
        self._tx.append((chunks[0] if len(chunks) == 1 else b"".join(chunks), count))
        self._tx_count += count
        self.replies += count
        while self._tx_count > self.send_queue_max and len(self._tx) > 1:
            _, dropped = self._tx.popleft()
            self._tx_count -= dropped
            self.dropped_replies += dropped
            self.logs.dropped_replies.note(
                self.path,
                "not reading",
                f"guest is not reading its replies ({self.dropped_replies} dropped so far)",
                dropped,
            )

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
                    head = tx.popleft()[0]
                else:
                    head = b"".join(chunk for chunk, _ in tx)
                    tx.clear()
                self._tx_count = 0
            try:
                sent = sock.send(head)
            except (BlockingIOError, InterruptedError):
                self._tx_head = head
                return False
            except OSError as exc:
                self.last_error = f"send: {exc.strerror or exc}"
                self._clear_output()
                return True
            if sent < len(head):  # the rest when the socket is writable: no copy of it
                self._tx_head = memoryview(head)[sent:]
                return False
            self._tx_head = None
            if not tx:
                return True

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
        """Create the FIFO anew (mode 0660) and open it for reading, non-blocking.

        Whatever is at the path was not created by this daemon (its own FIFOs are
        unlinked when closed): another user's FIFO, which it could keep open or have
        given another mode, or a symbolic link. It is removed (unlink never follows a
        link: its target is untouched) and a FIFO of ours made in its place; a directory
        there is refused. The path is opened with O_NOFOLLOW, never through a link.
        """
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISDIR(st.st_mode):
                raise OSError(errno.EISDIR, f"{self.path} is a directory, not our FIFO")
            os.unlink(self.path)
            log.warning(
                "%s: removed a %s owned by %s that vmpowerd had not created",
                self.path,
                _KINDS.get(stat.S_IFMT(st.st_mode), "file"),
                trust.user_name(st.st_uid),
            )
        os.mkfifo(self.path, FIFO_MODE & ~0o077)  # no one else until it is ours with its mode
        # O_RDWR keeps a writer on our own FIFO, so the read end never sees EOF (and never
        # spins on POLLHUP) between host writers; Linux defines O_RDWR on a FIFO (fifo(7)).
        fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            if not stat.S_ISFIFO(st.st_mode) or st.st_uid != os.geteuid():
                raise OSError(errno.EEXIST, f"{self.path} was replaced while being created")
            os.fchmod(fd, FIFO_MODE)  # mkfifo applies the umask; the mode is the contract
        except OSError:
            os.close(fd)
            raise
        self.fd = fd
        self.state = ChannelState.CONNECTED

    def receive(self) -> list[object]:
        """Read one turn's share of the FIFO (FIFO_READ_BYTES) and frame it."""
        try:
            data = os.read(self.fd, FIFO_READ_BYTES)
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


PacketHandler = Callable[[VmChannel, bytes], None]  # a read's whole packets, one bytes
MessageHandler = Callable[[FifoChannel, list[object]], None]


# A summary of channels closed by their peers names this many VMs (sorted), then counts.
_CLOSED_VMS_NAMED = 10


def _log_turn(batch: list[VmChannel], happened: str, name_vms: int = 0) -> None:
    """One INFO line for the channels to which ``happened`` this turn; past one channel,
    the first ``name_vms`` VMs are named."""
    if len(batch) == 1:
        channel = batch[0]
        log.info("%s: channel %d of %s %s", channel.path, channel.index, channel.vm, happened)
    elif batch:
        vms = {channel.vm for channel in batch}
        first = batch[0]
        named = ""
        if name_vms:
            named = ": " + ", ".join(sorted(vms)[:name_vms])
            if len(vms) > name_vms:
                named += f" and {len(vms) - name_vms} more"
        log.info(
            "%d channels of %d VM(s) %s%s (%s: channel %d of %s, and %d more)",
            len(batch), len(vms), happened, named, first.path, first.index, first.vm,
            len(batch) - 1,
        )  # fmt: skip


class ChannelRegistry:
    """Every open power endpoint, wired to the monitor loop; owned by the monitor thread."""

    def __init__(
        self,
        monitor: Monitor,
        directory: Path,
        on_packets: PacketHandler,
        on_messages: MessageHandler,
        *,
        rate_per_s: float,
        burst: int,
        send_queue_max: int,
        clock: Callable[[], float],
        logs: ChannelLogs | None = None,
    ) -> None:
        self.monitor = monitor
        self.logs = logs if logs is not None else ChannelLogs.build(clock=clock)
        self.directory = directory
        self.on_packets = on_packets
        self.on_messages = on_messages
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.send_queue_max = send_queue_max
        self.clock = clock
        # Channels connected, and closed by their peers, this turn: one line each (_log_turn)
        self._just_connected: list[VmChannel] = []
        self._just_closed: list[VmChannel] = []
        self.vm_channels: dict[tuple[str, int], VmChannel] = {}
        # Counts kept as channels come and go (status, list_vms, reconnect: no walks).
        self.tally = ChannelTally()
        self.fifos: dict[int, FifoChannel] = {}
        # Channels the operator disabled: kept across reconnects and VM restarts.
        self.disabled: set[tuple[str, int]] = set()
        # Endpoints with replies to send at the turn's end (send, _send_queued).
        self._to_send: set[Endpoint] = set()
        monitor.add_last(self._send_queued)

    def _bucket(self) -> TokenBucket:
        return TokenBucket(self.rate_per_s, self.burst, self.clock)

    # -- VM channels -------------------------------------------------------------------

    # One VM's channels cost its own (add_vm, rm_vm, show_vm), not a walk of them all.

    def for_vm(self, vm: str) -> list[VmChannel]:
        return list(self.tally.by_vm.get(vm, {}).values())

    def indexes(self, vm: str) -> set[int]:
        return set(self.tally.by_vm.get(vm, ()))

    def vms(self) -> set[str]:
        return set(self.tally.by_vm)

    def open_vm(
        self, vm: str, channels: Iterable[tuple[int, str]], only: set[int] | None = None
    ) -> list[int]:
        """Open (and connect) the given ``(index, path)`` channels of a running VM.

        A channel already open on the same path is kept; one whose path changed is
        reopened. Returns the indexes newly opened.
        """
        opened = []
        for index, path in channels:
            if only is not None and index not in only:
                continue
            key = (vm, index)
            channel = self.vm_channels.get(key)
            if channel is None or channel.path != path:
                if channel is not None:
                    self._close(channel)
                    self.tally.remove(channel)
                channel = VmChannel(vm, index, path, self._bucket(), self.send_queue_max, self.logs)
                channel.enabled = key not in self.disabled
                self.vm_channels[key] = channel
                self.tally.add(channel)
                opened.append(index)
            if channel.state is _DISCONNECTED:
                self._connect(channel)
        return opened

    def close_vm(self, vm: str) -> None:
        """A VM stopped or left: close its channels."""
        for index in list(self.tally.by_vm.get(vm, ())):
            channel = self.vm_channels.pop((vm, index))
            self._close(channel)
            self.tally.remove(channel)

    def set_enabled(self, vm: str, index: int, enabled: bool) -> None:
        key = (vm, index)
        if enabled:
            self.disabled.discard(key)
        else:
            self.disabled.add(key)
        channel = self.vm_channels.get(key)
        if channel is not None:
            channel.enabled = enabled

    def reconnect(self) -> None:
        """Connect again every channel whose peer went away (the VM still runs)."""
        # Only the disconnected ones: walking all 16 000 channels at 4000 VMs every second
        # was most of an idle daemon's CPU (issue #16).
        for channel in list(self.tally.down):
            if channel.state is _DISCONNECTED:
                self._connect(channel)

    def _connect(self, channel: VmChannel) -> None:
        state = channel.connect()
        if state is _CONNECTED:
            self._connected(channel)
        elif state is _CONNECTING:
            self.monitor.add_writer(channel.fileno(), lambda _fd, c=channel: self._finish(c))

    def _finish(self, channel: VmChannel) -> None:
        self.monitor.remove(channel.fileno())
        if channel.finish_connect() is _CONNECTED:
            self._connected(channel)

    def _connected(self, channel: VmChannel) -> None:
        # One INFO line per turn, not per channel: at start, one line for each of 16 000
        # channels was a fifth of the start-up (issue #16). Each channel at DEBUG.
        log.debug("%s: channel %d of %s connected", channel.path, channel.index, channel.vm)
        if not self._just_connected:
            self.monitor.call_later(0.0, self._log_connected)
        self._just_connected.append(channel)
        # A partial, not a lambda: one Python frame less on every read (issue #16)
        self.monitor.add_reader(channel.fileno(), functools.partial(self._readable, channel))

    def _log_connected(self) -> None:
        batch, self._just_connected = self._just_connected, []
        _log_turn(batch, "connected")

    def _readable(self, channel: VmChannel, _fd: int) -> None:
        packets = channel.receive()
        if packets is None:
            # As connects: QEMUs that go away together (a host's VMs stopped at once)
            # close thousands of channels a turn, one INFO line for them all.
            log.debug("%s: channel of %s closed by the other end", channel.path, channel.vm)
            if not self._just_closed:
                self.monitor.call_later(0.0, self._log_closed)
            self._just_closed.append(channel)
            self.monitor.remove(channel.fileno())
            channel.close()  # reconnect() connects it again while the VM runs
            return
        if packets:
            self.on_packets(channel, packets)

    def _log_closed(self) -> None:
        batch, self._just_closed = self._just_closed, []
        # Which VMs lost their channels matters (QEMUs that exited or crashed): named.
        _log_turn(batch, "closed by the other end", _CLOSED_VMS_NAMED)

    def _close(self, channel: VmChannel) -> None:
        if channel.sock is not None:
            self.monitor.remove(channel.fileno())
        channel.close()

    # -- replies -----------------------------------------------------------------------

    def send(self, endpoints: Iterable[Endpoint]) -> None:
        """Send the replies queued on ``endpoints`` as the turn's last step.

        The peer that carries a reply to its guest is QEMU's main loop, on the host's
        housekeeping CPUs as vmpowerd is. Woken by the send, it runs once the loop
        blocks, so whatever the turn did after the send (its other hooks, its figures,
        the next wait's computation: a third of a one-request turn) was in every guest's
        round trip. The sends are the loop's last step (``Monitor.add_last``) instead.

        A yield after the send (``sched_yield``) had done it before: on a CPU shared
        with a busy process it handed that process a whole slice while the loop had
        work left, and the next requests waited for it. In the agent bench with a
        busy loop on the agent's CPU, p90 3.9 ms with the yield, 0.09 ms without
        (issue #16).
        """
        self._to_send.update(endpoints)

    def _send_queued(self) -> None:
        if not self._to_send:
            return
        endpoints, self._to_send = self._to_send, set()
        for endpoint in endpoints:
            # FIFOs have no replies; a channel whose socket refuses the rest is drained
            # when it turns writable.
            if (
                isinstance(endpoint, VmChannel)
                and endpoint.sock is not None
                and not endpoint.flush()
            ):
                self.monitor.add_writer(endpoint.fileno(), lambda _fd, c=endpoint: self._drain(c))

    def _drain(self, channel: VmChannel) -> None:
        if channel.flush() and channel.sock is not None:
            self.monitor.remove_writer(channel.fileno())

    # -- FIFOs -------------------------------------------------------------------------

    def open_fifo(self, cpu: int) -> None:
        fifo = FifoChannel(self.directory, cpu, self._bucket())
        try:
            fifo.open()
        except OSError as exc:
            log.error("%s: cannot open FIFO: %s", fifo.path, exc)
            return
        self.fifos[cpu] = fifo

        def readable(_fd: int, f: FifoChannel = fifo) -> None:
            messages = f.receive()
            if messages:
                self.on_messages(f, messages)

        self.monitor.add_reader(fifo.fileno(), readable)

    def close_fifo(self, cpu: int) -> None:
        fifo = self.fifos.pop(cpu)
        self.monitor.remove(fifo.fileno())
        fifo.close()

    def set_fifo_cpus(self, cpus: Iterable[int]) -> None:
        """Open the FIFOs of ``cpus`` and close the others."""
        wanted = set(cpus)
        for cpu in sorted(set(self.fifos) - wanted):
            self.close_fifo(cpu)
        for cpu in sorted(wanted - set(self.fifos)):
            self.open_fifo(cpu)

    # -- limits and shutdown -----------------------------------------------------------

    def set_limits(self, rate_per_s: float, burst: int, send_queue_max: int) -> None:
        """New flood and send-queue limits (reload): every endpoint gets a fresh bucket."""
        self.rate_per_s, self.burst, self.send_queue_max = rate_per_s, burst, send_queue_max
        for endpoint in [*self.vm_channels.values(), *self.fifos.values()]:
            endpoint.bucket = self._bucket()
            if isinstance(endpoint, VmChannel):
                endpoint.send_queue_max = send_queue_max

    def close_all(self) -> None:
        for channel in list(self.vm_channels.values()):
            self._close(channel)
            self.tally.remove(channel)
        self.vm_channels.clear()
        for cpu in list(self.fifos):
            self.close_fifo(cpu)
        for kind_log in self.logs.all():
            kind_log.flush()  # what is still only counted reaches the log before exit
