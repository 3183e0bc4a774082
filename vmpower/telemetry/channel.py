"""The controller/worker channel (model: CMSSW FWCore/SharedMemory, docs/telemetry.md section 3).

Two processes share a small control block; this module owns its layout, the two named
FIFOs that carry wake-ups, and the growable payload banks.

Control block (64 bytes, host byte order, every field naturally aligned)::

    0  u32 magic "VMCC"     4 u16 version     6 u16 reserved
    8  u32 stop             12 u32 code (an ASCII transition code: r w q c t ...)
    16 u64 transition id    (the worker flips it, id = ~id, when done)
    24 u32 result           (the worker's verdict: 0 ok, else an error, text in its payload)
    28 u32 worker state     (0 running; ord("q") once the worker is leaving on its own)
    32 u32 to-worker bank   36 u32 to-worker identifier
    40 u32 from-worker bank 44 u32 from-worker identifier
    48 u32 worker pid

Notification, no polling loop: the controller writes one byte to the ``to-worker`` FIFO
after setting the code and id, and waits in ``poll`` on ``to-controller``, where the worker
writes one byte after flipping the id. Bytes only wake; the shared id decides, so a late
or duplicate byte is harmless. A FIFO reports a hang-up once every writer is gone
(pipe(7); Linux's pipe_poll only reports it after a writer was seen), so a dead worker
wakes a waiting controller at once: that is the monitor of CMSSW's model, with no thread.

The flip rule (CMSSW ``doTransition``): a wait that timed out still succeeds when the id
flipped in the meantime; only a timeout without a flip fails. A failed transition leaves
the channel unusable (the worker may still finish and flip later), so the controller
refuses further transitions. A wait cut short by a signal handler's exception leaves the
transition in flight: the next transition first waits for its flip.

Payload banks (CMSSW ``WriteBuffer``/``ReadBuffer``): per direction two files, ``…-0`` and
``…-1``. Each holds a u64 length prefix (CMSSW stores none) then the payload. A writer
whose payload does not fit creates the *other* bank at exactly the needed size (the first
payload creates bank 0), bumps the identifier and records the bank index in the control
block; the reader re-maps whenever the identifier changed, so two growths between reads
are never missed. The reader unlinks a bank's name once mapped: no name outlives its use.
Every name is made by ``channel_paths``; ``remove_channel_files`` removes exactly those,
so stale files of a crashed run are always found.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import select
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, Self

from vmpower.errors import TelemetryError
from vmpower.telemetry.shm import Owner, create_file, map_fd, open_file, unlink_quietly

MAGIC = 0x43434D56  # b"VMCC" as a little-endian u32
VERSION = 1
BLOCK_SIZE = 64
MASK64 = (1 << 64) - 1
SETUP_ID = MASK64
"""Transition id the controller sets before launching the worker; setup_done flips it to 0."""

# u32 word indices in the block
_MAGIC, _VERSION_WORD, _STOP, _CODE = 0, 1, 2, 3
_RESULT, _WORKER_STATE = 6, 7
_TO_WORKER, _FROM_WORKER = 8, 10
_WORKER_PID = 12
# u64 word index of the transition id
_ID = 2

LENGTH = struct.Struct("=Q")

CODE_STOPPING = ord("q")
_DONE_BYTE = b"c"
_QUIT_BYTE = b"q"


class ChannelError(TelemetryError):
    """The channel failed: bad state, files gone, or the other side misbehaved."""


class ChannelTimeout(ChannelError, TimeoutError):
    """A wait ran out without the worker flipping the transition id."""


class WorkerGone(ChannelError):
    """The worker exited (or closed its end); the controller will get no answer."""


class WorkerStopped(WorkerGone):
    """The worker announced it is leaving (``q``): stopped by its owner."""


class ControllerGone(ChannelError):
    """The controller closed its end or exited."""


class BufferRecord(NamedTuple):
    """Where one direction's payload lives: bank index (0/1) and identifier."""

    bank: int
    identifier: int


class ChannelPaths(NamedTuple):
    block: Path
    to_worker: Path
    to_controller: Path
    banks: dict[tuple[str, int], Path]

    def all(self) -> list[Path]:
        return [self.block, self.to_worker, self.to_controller, *self.banks.values()]


TO_WORKER = "to-worker"
FROM_WORKER = "from-worker"


def channel_paths(directory: str | os.PathLike[str], prefix: str) -> ChannelPaths:
    """Every name a channel ``prefix`` may use in ``directory`` (the only name maker)."""
    base = Path(directory)
    if not prefix or "/" in prefix or prefix.startswith("."):
        raise ChannelError(f"bad channel name {prefix!r}")
    banks = {
        (direction, bank): base / f"{prefix}-buffer-{direction}-{bank}"
        for direction in (TO_WORKER, FROM_WORKER)
        for bank in (0, 1)
    }
    return ChannelPaths(
        block=base / f"{prefix}-channel",
        to_worker=base / f"{prefix}-{TO_WORKER}",
        to_controller=base / f"{prefix}-to-controller",
        banks=banks,
    )


def remove_channel_files(directory: str | os.PathLike[str], prefix: str) -> list[Path]:
    """Remove every name ``channel_paths`` makes; return those that were there."""
    return [path for path in channel_paths(directory, prefix).all() if unlink_quietly(path)]


def create_channel_files(
    directory: str | os.PathLike[str], prefix: str, owner: Owner | None = None
) -> ChannelPaths:
    """Create the control block and both FIFOs, 0600, owned by ``owner``.

    Stale files of the same name (a crashed run) are removed first.
    """
    paths = channel_paths(directory, prefix)
    remove_channel_files(directory, prefix)
    fd = create_file(paths.block, BLOCK_SIZE, owner)
    try:
        mm = map_fd(fd, True, paths.block)
    finally:
        os.close(fd)
    struct.pack_into("=IHH", mm, 0, MAGIC, VERSION, 0)
    mm.close()
    try:
        for fifo in (paths.to_worker, paths.to_controller):
            os.mkfifo(fifo, 0o600)
            if owner is not None and (owner[0], owner[1]) != (os.geteuid(), os.getegid()):
                os.chown(fifo, owner[0], owner[1], follow_symlinks=False)
    except OSError as exc:
        remove_channel_files(directory, prefix)
        raise ChannelError(f"cannot create the channel FIFOs in {directory}: {exc}") from None
    return paths


class ControlBlock:
    """The mapped control block: typed access to its fields."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        fd = open_file(path, True)
        try:
            self._mm = map_fd(fd, True, path)
        finally:
            os.close(fd)
        if len(self._mm) < BLOCK_SIZE:
            self._mm.close()
            raise ChannelError(f"{path}: too short for a channel control block")
        self._u32 = memoryview(self._mm)[:BLOCK_SIZE].cast("I")
        self._u64 = memoryview(self._mm)[:BLOCK_SIZE].cast("Q")
        if self._u32[_MAGIC] != MAGIC or self._u32[_VERSION_WORD] & 0xFFFF != VERSION:
            self.close()
            raise ChannelError(f"{path}: not a vmpower channel control block")

    def words(self) -> tuple[memoryview, memoryview]:
        """The block as u32 and u64 words (for hot paths that index fields directly)."""
        return self._u32, self._u64

    @property
    def stop(self) -> bool:
        return bool(self._u32[_STOP])

    @stop.setter
    def stop(self, value: bool) -> None:
        self._u32[_STOP] = 1 if value else 0

    @property
    def code(self) -> str:
        code = self._u32[_CODE]
        return chr(code) if code else ""

    @code.setter
    def code(self, value: str) -> None:
        self._u32[_CODE] = ord(value) if value else 0

    @property
    def transition_id(self) -> int:
        return self._u64[_ID]

    @transition_id.setter
    def transition_id(self, value: int) -> None:
        self._u64[_ID] = value & MASK64

    @property
    def result(self) -> int:
        return self._u32[_RESULT]

    @result.setter
    def result(self, value: int) -> None:
        self._u32[_RESULT] = value

    @property
    def worker_state(self) -> int:
        return self._u32[_WORKER_STATE]

    @worker_state.setter
    def worker_state(self, value: int) -> None:
        self._u32[_WORKER_STATE] = value

    @property
    def worker_pid(self) -> int:
        return self._u32[_WORKER_PID]

    @worker_pid.setter
    def worker_pid(self, value: int) -> None:
        self._u32[_WORKER_PID] = value

    def record(self, direction: str) -> BufferRecord:
        i = _TO_WORKER if direction == TO_WORKER else _FROM_WORKER
        return BufferRecord(self._u32[i], self._u32[i + 1])

    def set_record(self, direction: str, record: BufferRecord) -> None:
        i = _TO_WORKER if direction == TO_WORKER else _FROM_WORKER
        self._u32[i] = record.bank
        self._u32[i + 1] = record.identifier & 0xFFFFFFFF

    def close(self) -> None:
        if self._mm.closed:
            return
        self._u32.release()
        self._u64.release()
        self._mm.close()


# -- payload banks -------------------------------------------------------------------------


class BankWriter:
    """Writes one direction's payloads, growing into the other bank when they do not fit."""

    def __init__(
        self, paths: ChannelPaths, direction: str, block: ControlBlock, owner: Owner | None
    ) -> None:
        self._paths = paths
        self._direction = direction
        self._block = block
        self._owner = owner
        self._mm: mmap.mmap | None = None
        # The writer's own record of where its payload lives; the copy in the shared
        # block is for the reader (the other process could scribble over that one).
        self._bank = 0
        self._identifier = 0
        self.capacity = 0

    def write(self, payload: bytes) -> None:
        if len(payload) > self.capacity or self._mm is None:
            self._grow(len(payload))
        mm = self._mm
        assert mm is not None
        mm[LENGTH.size : LENGTH.size + len(payload)] = payload
        LENGTH.pack_into(mm, 0, len(payload))

    def _grow(self, size: int) -> None:
        # The first payload creates bank 0; every growth after it takes the other bank.
        bank = 0 if self._mm is None else 1 - self._bank
        path = self._paths.banks[(self._direction, bank)]
        unlink_quietly(path)  # stale, or the reader never mapped it: ours to replace
        fd = create_file(path, LENGTH.size + max(size, 1), self._owner)
        try:
            mm = map_fd(fd, True, path)
        finally:
            os.close(fd)
        if self._mm is not None:
            self._mm.close()
        self._mm = mm
        self.capacity = size
        self._bank = bank
        self._identifier += 1
        self._block.set_record(self._direction, BufferRecord(bank, self._identifier))

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None


class BankReader:
    """Reads one direction's payloads, re-mapping when the writer grew into a new bank."""

    def __init__(self, paths: ChannelPaths, direction: str, block: ControlBlock) -> None:
        self._paths = paths
        self._direction = direction
        self._block = block
        self._mm: mmap.mmap | None = None
        self._identifier = 0
        self.capacity = 0

    def must_remap(self) -> bool:
        """True when the writer grew since the last read (CMSSW ``mustGetBufferAgain``)."""
        return self._block.record(self._direction).identifier != self._identifier

    def read(self) -> bytes:
        """The last payload written (empty before the first)."""
        record = self._block.record(self._direction)
        if record.identifier != self._identifier:
            if record.bank not in (0, 1):
                raise ChannelError(f"bad {self._direction} bank index {record.bank}")
            path = self._paths.banks[(self._direction, record.bank)]
            fd = open_file(path, False)
            try:
                mm = map_fd(fd, False, path)
            finally:
                os.close(fd)
            unlink_quietly(path)  # mapped: the name has served its purpose
            if self._mm is not None:
                self._mm.close()
            self._mm = mm
            self._identifier = record.identifier
            self.capacity = len(mm) - LENGTH.size
        if self._mm is None:
            return b""
        (length,) = LENGTH.unpack_from(self._mm, 0)
        if length > self.capacity:
            raise ChannelError(f"payload length {length} exceeds its bank ({self.capacity} bytes)")
        return bytes(self._mm[LENGTH.size : LENGTH.size + length])

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None


# -- the FIFOs ---------------------------------------------------------------------------------


def _open_fifo(path: Path, mode: str) -> int:
    """Open a channel FIFO, non-blocking: "r" to read, "rw" to write.

    Linux lets a FIFO be opened O_RDWR without waiting for a reader (fifo(7)); a writer
    that is also a reader never gets EPIPE. Each side writes through such an fd, so
    neither needs the other to be there first.
    """
    flags = (os.O_RDONLY if mode == "r" else os.O_RDWR) | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ChannelError(f"{path} does not exist (the channel is gone)") from None
    except OSError as exc:
        raise ChannelError(f"cannot open {path}: {exc.strerror}") from None
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.close(fd)
        raise ChannelError(f"{path} is not a FIFO")
    return fd


def _notify(fd: int, byte: bytes) -> None:
    try:
        os.write(fd, byte)
    except BlockingIOError:
        pass  # the FIFO is full of unread wake-ups: the reader is awake anyway


def _timeout_ms(deadline_s: float | None) -> int | None:
    if deadline_s is None:
        return None
    # poll counts whole milliseconds: round up so a wait never ends early
    return max(0, math.ceil((deadline_s - time.monotonic()) * 1000))


# -- the two ends --------------------------------------------------------------------------------


class _ChannelEnd:
    """What both ends share: the files, the control block, a FIFO each way, closing."""

    paths: ChannelPaths
    block: ControlBlock
    _created: bool
    _closed: bool
    _fds: list[int]
    _from_fd: int
    _to_fd: int
    _poller: select.poll

    def _open_end(
        self,
        directory: str | os.PathLike[str],
        prefix: str,
        create: bool,
        owner: Owner | None,
        read_fifo: str,
        write_fifo: str,
    ) -> None:
        self.paths = (
            create_channel_files(directory, prefix, owner)
            if create
            else channel_paths(directory, prefix)
        )
        self._created = create
        self._closed = False
        self._fds = []
        try:
            self.block = ControlBlock(self.paths.block)
            self._from_fd = _open_fifo(getattr(self.paths, read_fifo), "r")
            self._fds.append(self._from_fd)
            # O_RDWR: no waiting for a peer not started yet, and never EPIPE/SIGPIPE
            # (which would kill a client that did not ignore SIGPIPE) once it is gone.
            self._to_fd = _open_fifo(getattr(self.paths, write_fifo), "rw")
            self._fds.append(self._to_fd)
        except TelemetryError:
            self.close()
            raise
        self._poller = select.poll()
        self._poller.register(self._from_fd, select.POLLIN)

    def unlink(self) -> None:
        """Remove every name of this channel (the mappings and open FIFOs stay usable)."""
        remove_channel_files(self.paths.block.parent, _prefix_of(self.paths))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _close_end(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class ControllerChannel(_ChannelEnd):
    """The controller's end: sets transitions, waits (with a timeout) for the worker's flip.

    ``create=True`` makes the files (the controller launches the worker, CMSSW style);
    ``create=False`` attaches to files the worker made (the batch client).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        prefix: str,
        timeout_s: float = 10.0,
        *,
        create: bool = True,
        owner: Owner | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise ChannelError(f"timeout_s must be > 0, not {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self._timeout_ms = math.ceil(self.timeout_s * 1000)
        # Opened while the worker holds its write end (or before the worker ever opened
        # it), the read end reports the hang-up when the worker is gone.
        self._open_end(directory, prefix, create, owner, "to_controller", "to_worker")
        self.writer = BankWriter(self.paths, TO_WORKER, self.block, owner)
        self.reader = BankReader(self.paths, FROM_WORKER, self.block)
        self._broken: str | None = None
        # (id, code) of the transition in flight; set only while one may be.
        self._unanswered: tuple[int, str] | None = None

    # -- CMSSW's API ------------------------------------------------------------------------

    @property
    def to_worker(self) -> BufferRecord:
        return self.block.record(TO_WORKER)

    @to_worker.setter
    def to_worker(self, record: BufferRecord) -> None:
        self.block.set_record(TO_WORKER, BufferRecord(*record))

    @property
    def from_worker(self) -> BufferRecord:
        return self.block.record(FROM_WORKER)

    def setup_worker(
        self, launch: Callable[[], None] | None = None, retry: Callable[[], bool] | None = None
    ) -> None:
        """Run ``launch`` (start the worker) and wait for its ``setup_done``.

        A timeout without it (and without ``retry()`` asking to wait on) sets stop and
        raises ChannelTimeout.
        """
        self.block.transition_id = SETUP_ID
        if launch is not None:
            launch()
        try:
            self._wait_flip(~SETUP_ID & MASK64, retry, "set up")
        except ChannelTimeout:
            self.block.stop = True
            _notify(self._to_fd, b"s")
            raise

    def do_transition(
        self,
        code: str,
        transition_id: int,
        on_done: Callable[[], None] | None = None,
        retry: Callable[[], bool] | None = None,
    ) -> None:
        """Ask the worker for transition ``code`` and wait until it flipped ``transition_id``.

        ``on_done`` runs after a successful transition (CMSSW's functor). A timeout with no
        flip asks ``retry()``; False (or no ``retry``) raises ChannelTimeout. WorkerGone
        (or WorkerStopped) when the worker exits or says it is leaving.
        """
        if self._broken is not None:
            raise ChannelError(f"the channel is unusable: {self._broken}")
        if len(code) != 1 or not code.isascii():
            raise ChannelError(f"a transition code is one ASCII character, not {code!r}")
        if self._unanswered is not None:
            self._finish_unanswered()
        transition_id &= MASK64
        # The block's words are indexed directly: this is the round trip's hot path.
        u32, u64 = self.block.words()
        if transition_id == SETUP_ID or transition_id == u64[_ID]:
            raise ChannelError(
                f"transition id {transition_id} cannot be told from the worker's last answer"
            )
        if u32[_WORKER_STATE] == CODE_STOPPING:
            raise WorkerStopped("the worker has stopped (its owner ended it)")
        # From here until its flip is seen, this transition may be the worker's: a signal
        # handler that raises (Ctrl-C, the CLI's SIGTERM) can cut the call short anywhere,
        # and the next transition must then settle it (_finish_unanswered), never
        # overwrite its id. Recorded before the id is written, so no point is missed.
        self._unanswered = (transition_id, code)
        u32[_RESULT] = 0
        u32[_CODE] = ord(code)
        u64[_ID] = transition_id
        target = ~transition_id & MASK64
        deadline = time.monotonic() + self.timeout_s
        _notify(self._to_fd, code.encode())
        # Fast path: one wake-up carrying the worker's "done" byte.
        events = self._poller.poll(self._timeout_ms)
        if events and events[0][1] == select.POLLIN and u64[_ID] == target:
            try:
                data = os.read(self._from_fd, 4096)
            except BlockingIOError:
                data = b""
            if data and _QUIT_BYTE not in data:
                self._unanswered = None
                if on_done is not None:
                    on_done()
                return
            if data:
                events = []  # a "q" came with it: let the full check decide
        revents = events[0][1] if events else 0
        self._settle(target, retry, f"transition {code!r}", deadline, revents)
        if on_done is not None:
            on_done()

    def _settle(
        self,
        target: int,
        retry: Callable[[], bool] | None,
        what: str,
        deadline: float | None = None,
        revents: int = 0,
    ) -> None:
        """Wait for the flip to ``target`` (after draining ``revents``, a wake-up already
        polled): then nothing is in flight. A failure also leaves the channel unusable;
        a signal's exception leaves the transition in flight, for the next to settle."""
        try:
            if revents:
                self._drain(revents, target, what)
            self._wait_flip(target, retry, what, deadline)
        except ChannelError as exc:
            self._broken = str(exc)
            self._unanswered = None
            raise
        self._unanswered = None

    def _finish_unanswered(self) -> None:
        """Settle a transition cut short: wait (one timeout at most) for its flip."""
        assert self._unanswered is not None
        transition_id, code = self._unanswered
        target = ~transition_id & MASK64
        current = self.block.transition_id
        if current == transition_id:
            # Cut short before or right after its wake-up: send that again (bytes only
            # wake; a duplicate is harmless), or the worker may never look.
            _notify(self._to_fd, code.encode())
        elif current != target:
            # Cut short before its id was written: the worker never saw it.
            self._unanswered = None
            return
        self._settle(target, None, f"the interrupted transition {code!r}")

    def stop_worker(self) -> None:
        """Make the worker leave its loop without running another transition."""
        if self._closed:
            return
        self.block.stop = True
        _notify(self._to_fd, b"s")

    # -- payloads ----------------------------------------------------------------------------

    def send(self, payload: bytes) -> None:
        """Put ``payload`` in the to-worker bank (for the next transition)."""
        self.writer.write(payload)

    def received(self) -> bytes:
        """The worker's last payload."""
        return self.reader.read()

    @property
    def result(self) -> int:
        """The worker's verdict on the last transition (0: success)."""
        return self.block.result

    # -- waiting -------------------------------------------------------------------------------

    def _wait_flip(
        self,
        target: int,
        retry: Callable[[], bool] | None,
        what: str,
        deadline: float | None = None,
    ) -> None:
        block = self.block
        poll = self._poller.poll
        if deadline is None:
            deadline = time.monotonic() + self.timeout_s
        while True:
            if block.transition_id == target:
                return
            events = poll(_timeout_ms(deadline))
            if events:
                self._drain(events[0][1], target, what)
                continue
            if time.monotonic() < deadline:
                continue
            # Timed out. The flip rule: a late but finished worker still counts.
            if block.transition_id == target:
                return
            if retry is not None and retry():
                deadline = time.monotonic() + self.timeout_s
                continue
            raise ChannelTimeout(
                f"the worker did not finish {what} within {self.timeout_s:g} s"
                f" (worker pid {block.worker_pid or '?'})"
            )

    def _drain(self, revents: int, target: int, what: str) -> None:
        data = b""
        if revents & select.POLLIN:
            try:
                data = os.read(self._from_fd, 4096)
            except BlockingIOError:
                return
            if data:
                if _QUIT_BYTE in data and self.block.transition_id != target:
                    raise WorkerStopped(f"the worker stopped before it finished {what}")
                return
        # Read end-of-file, or a hang-up with nothing left to read: every writer is gone.
        if self.block.transition_id == target:
            return  # it finished, then left: the answer stands
        if self.block.worker_state == CODE_STOPPING:
            raise WorkerStopped(f"the worker stopped before it finished {what}")
        raise WorkerGone(f"the worker exited before it finished {what}")

    def worker_ended(self, timeout_s: float | None = 0.0) -> bool:
        """True once the worker has left (hang-up or ``q``); waits up to ``timeout_s``.

        For a controller with nothing to ask: holding a setting until the worker ends.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self.block.worker_state == CODE_STOPPING:
                return True
            events = self._poller.poll(_timeout_ms(deadline))
            if events:
                revents = events[0][1]
                if revents & select.POLLIN:
                    try:
                        data = os.read(self._from_fd, 4096)
                    except BlockingIOError:
                        data = b"x"
                    if not data or _QUIT_BYTE in data:
                        return True
                    continue
                return True  # hang-up
            if deadline is not None and time.monotonic() >= deadline:
                return False


class Transition(NamedTuple):
    code: str
    transition_id: int


STOP = Transition("", -1)
"""What ``next_transition`` returns when the controller set the stop flag."""


class WorkerChannel(_ChannelEnd):
    """The worker's end: waits for transitions, runs them, flips the id and notifies."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        prefix: str,
        *,
        create: bool = False,
        owner: Owner | None = None,
    ) -> None:
        self._open_end(directory, prefix, create, owner, "to_worker", "to_controller")
        self.block.worker_pid = os.getpid()
        self._done_id = self.block.transition_id
        self._words = self.block.words()
        self.writer = BankWriter(self.paths, FROM_WORKER, self.block, owner)
        self.reader = BankReader(self.paths, TO_WORKER, self.block)
        self._current: Transition | None = None

    def fileno(self) -> int:
        """The fd to poll for transitions (POLLIN / hang-up) in the worker's own loop."""
        return self._from_fd

    @property
    def to_worker(self) -> BufferRecord:
        return self.block.record(TO_WORKER)

    @property
    def from_worker(self) -> BufferRecord:
        return self.block.record(FROM_WORKER)

    @from_worker.setter
    def from_worker(self, record: BufferRecord) -> None:
        self.block.set_record(FROM_WORKER, BufferRecord(*record))

    def setup_done(self) -> None:
        """Tell a controller waiting in ``setup_worker`` that the worker is ready."""
        self._done_id = ~SETUP_ID & MASK64
        self.block.transition_id = self._done_id
        _notify(self._to_fd, _DONE_BYTE)

    def next_transition(self, revents: int) -> Transition | None:
        """After ``poll`` reported ``revents`` on ``fileno()``: the pending transition,
        STOP, or None (a stale wake-up). ControllerGone when the controller hung up."""
        if revents & select.POLLIN:
            try:
                data = os.read(self._from_fd, 4096)
            except BlockingIOError:
                data = b"x"
            if not data:
                raise ControllerGone("the controller closed the channel")
        elif revents:
            raise ControllerGone("the controller closed the channel")
        return self.pending()

    def pending(self) -> Transition | None:
        """The transition waiting in the block, STOP, or None (read it; no I/O)."""
        u32, u64 = self._words
        if u32[_STOP]:
            return STOP
        transition_id = u64[_ID]
        if transition_id == self._done_id or transition_id == SETUP_ID:
            return None
        code = u32[_CODE]
        # Whatever the other process left there, a code is one ASCII character.
        self._current = Transition(chr(code) if 0 < code < 128 else "?", transition_id)
        return self._current

    def wait_transition(self, timeout_s: float | None = None) -> Transition | None:
        """Block until a transition (or STOP) arrives; None on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending = self.pending()
        while pending is None:
            events = self._poller.poll(_timeout_ms(deadline))
            if not events:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            pending = self.next_transition(events[0][1])
        return pending

    def finish(self, result: int = 0, payload: bytes | None = None, notify: bool = True) -> None:
        """The current transition is done: store ``result``/``payload``, flip the id, notify.

        ``notify=False`` flips without waking the controller (a late wake-up; the flip
        rule still lets a controller whose wait ran out succeed).
        """
        current = self._current
        if current is None or current is STOP:
            raise ChannelError("no transition to finish")
        if payload is not None:
            self.writer.write(payload)
        u32, u64 = self._words
        u32[_RESULT] = result
        self._done_id = done_id = ~current.transition_id & MASK64
        u64[_ID] = done_id
        self._current = None
        if notify:
            _notify(self._to_fd, _DONE_BYTE)

    def notify(self) -> None:
        """Wake the controller (after a ``finish(notify=False)``)."""
        _notify(self._to_fd, _DONE_BYTE)

    def quit(self) -> None:
        """Say the worker is leaving: a controller waiting now gets WorkerStopped, not a hang."""
        self.block.worker_state = CODE_STOPPING
        _notify(self._to_fd, _QUIT_BYTE)

    def handle_transitions(self, handler: Callable[[str, int], int | None]) -> None:
        """CMSSW's loop: run ``handler(code, id)`` for each transition until stop.

        The handler's return value (None: 0) is the transition's result.
        """
        while True:
            transition = self.wait_transition()
            if transition is None:
                continue
            if transition is STOP:
                return
            result = handler(transition.code, transition.transition_id)
            self.finish(result or 0)

    def send(self, payload: bytes) -> None:
        self.writer.write(payload)

    def received(self) -> bytes:
        return self.reader.read()


def _close_end(end: _ChannelEnd) -> None:
    for fd in end._fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    end._fds = []
    for part in ("writer", "reader"):
        obj = getattr(end, part, None)
        if obj is not None:
            obj.close()
    block = getattr(end, "block", None)
    if block is not None:
        block.close()
    if end._created:
        end.unlink()


def _prefix_of(paths: ChannelPaths) -> str:
    name = paths.block.name
    return name[: -len("-channel")]
