"""The restore journal: every sysfs file vmpower changes is put back as it was.

``RestoreJournal(state_dir)`` implements ``vmpower.sysfs.WriteJournal``: before the
first write of a file, ``Sysfs`` hands it the file's original content, and the journal
has written it to the file *before* ``remember`` returns, so the daemon's death at any
later point (a crash, SIGKILL, the OOM killer) still leaves every original to the next
start.

A journal belongs to one boot of the host. The sysfs files it records live in the
running kernel only: a reboot resets them, so after a reboot there is nothing of them to
put back, and putting back the originals of an earlier boot would overwrite what this
boot set up (tuned, a udev rule, the operator). The file's header names the boot it was
written in (``/proc/sys/kernel/random/boot_id``); one from an earlier boot is set aside
(``restore-journal.json.boot-<id>``) with a warning, its files unrestored. It follows
that a file's record need not survive the host's crash, only the daemon's death, which
the page cache gives on return from ``pwrite``: those appends are not synced (issue #16:
one ``fdatasync`` per turn cost 0.2-0.5 ms of the monitor loop on ext4, and tens of ms
when the filesystem's journal was busy). What that gives up: a disk that fails to write
the page back loses the record without a word (the error would only show at a sync).
MSRs are the exception: a reboot by kexec does not reset them, so an earlier boot's MSR
originals are still restored, and their records are synced. Where the boot cannot be
known (``boot_id`` gives None), every append is synced as before and the journal is
recovered whatever boot wrote it.

The file is append-only (version 4; version 3 named no boot): one JSON document whose
``entries`` list ends the file, followed by a fixed trailer. A new original is one
``pwrite`` of the record plus the trailer over the old trailer: O(1) per file, whatever
the journal holds (the whole file was rewritten before, issue #16), and the file is
valid JSON after every completed write. A restore appends ``{"restored": path}``
records (losing one only means writing the same original again after a crash). The
file is compacted (rewritten atomically: temp file, fsync, rename, fsync of the
directory, so its header is on disk whatever happens to the host) when ``recover`` or a
full ``restore`` runs (start and exit), and when dead records outnumber the live ones.
Versions 1 to 3 (1 and 2 rewritten whole each time; none names its boot) are still
read, and recovered as this boot's.

A monitor turn's first writes share one append: ``begin_turn(prefixes)`` names the
directories of the CPUs the turn is about to write (their ``cpufreq/`` directories);
when a file in one of them must be remembered, the journal also reads and records the
same file name in every other of those directories, in the same append, and later
turns record, ahead, the names it has learnt so. The cost is that a file the turn then
does not write is journaled anyway: it gets its own original back at restore.

``restore(select)`` puts originals back: all of them (shutdown), or those ``select``
accepts (one CPU's files when its VM stops). Each file is independent: a failure is
logged, the rest are still restored, and the failed ones stay in the journal for a
later attempt. Files go back in the reverse order of their first recording (the
setspeed before the governor that made it writable), then a second pass retries what
failed, because the kernel refuses some values for ordering reasons alone (a minimum
above the current maximum, until the maximum is back). ``recover()`` at start-up
restores what a crashed run left.

A journal left corrupt (not JSON, wrong shape) is moved aside, never dropped, and
reported with ``RestoreError``.

Besides sysfs files, the journal holds model-specific registers the BRANCH_RATIO policy
programs (``remember_msr``: the msr device path, the offset, the original bytes), so a
crash does not leave the PMU programmed.

Trust (GEOPM's ``is_secure_file`` is the model; docs/architecture.md, "Trust
boundaries"): the state directory must be trusted as sshd's StrictModes would
(``vmpower.trust``), the journal file must be a regular file owned by the daemon's
user with mode 0600, read without following a symbolic link, and, when the caller
gives the roots, every path in it must lie under them (sysfs files under
``cpufreq.sysfs_root``, MSRs under ``policies.msr_root``) before anything is written
to it. Temp files a crash left between write and rename are removed at start.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _json_str  # json.dumps' own escaping
from pathlib import Path

from vmpower import trust
from vmpower.errors import RestoreError
from vmpower.sysfs import open_attribute, read_attribute

log = logging.getLogger("vmpower.restore")

JOURNAL_NAME = "restore-journal.json"
FORMAT = "vmpower-restore-journal"
# Version 1: files only; 2 adds MSR entries ({path, offset, bytes}); both were rewritten
# whole for each new entry. Version 3 is the append-only layout (records appended before a
# fixed trailer, "restored" records). Version 4 is version 3 whose header names the boot
# it was written in, and whose file records are not synced (see above). Older vmpowerd
# versions find a newer version unknown: they keep the journal aside as corrupt, never
# misread it (a version 3 reader would restore an earlier boot's originals).
VERSION = 4
READ_VERSIONS = (1, 2, 3, 4)
# A boot ID as the journal takes it (from /proc and from the file): it names a file.
_BOOT_ID = re.compile(r"[0-9A-Za-z-]{1,64}")
# The header of an append-only file (version 3, or 4 naming its boot when it is known),
# whole or torn.
_HEADER_RE = re.compile(
    re.escape(f'{{"format": "{FORMAT}", "version": ')
    + rf'([34])(?:, "boot_id": "({_BOOT_ID.pattern})")?'
    + re.escape(', "entries": [\n')
)
# The kernel's random ID of the running boot (a UUID, new at every boot, kexec included).
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
_TRAILER = b"]}\n"
# Compact when the restored (dead) records outnumber the live ones and are at least this
# many: an append-only file stays O(live entries) in size, and a compaction (a rewrite)
# comes once per that many restores at the most.
COMPACT_MIN_DEAD = 512
MSR_BYTES_MAX = 8  # one MSR (arch/x86/kernel/msr.c reads and writes 8 bytes)
_NO_DIRECTORIES: frozenset[str] = frozenset()  # between turns (end_turn)
# _save's temp file; one whose writer is dead is a crash between write and rename.
_TEMP_NAME = re.compile(re.escape(f".{JOURNAL_NAME}.") + r"(\d+)\.tmp")
# cpufreq.rst: scaling_setspeed reads "<unsupported>" unless the governor is userspace.
# It is a placeholder, not a value: the kernel refuses it back, and restoring the
# governor (which comes after, in reverse order) is what brings the placeholder back.
PLACEHOLDERS = frozenset({"<unsupported>"})

Writer = Callable[[str, str], None]
MsrWriter = Callable[[str, int, bytes], None]
MsrKey = tuple[str, int]  # (msr device path, file offset)
Key = str | MsrKey


@dataclass
class RestoreReport:
    """What one restore did: paths put back, paths that failed (and why)."""

    restored: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    # Entries of a loaded journal outside the allowed roots: never written, kept aside.
    refused: list[str] = field(default_factory=list)
    # A journal of an earlier boot, found at start: not restored, kept at this path.
    earlier_boot: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failed


def write_file(path: str, value: str) -> None:
    """Write ``value`` and a newline in one write(2), as ``echo value > path`` does.

    ``Sysfs.read`` strips the newline every sysfs attribute ends with, so the journal
    holds the bare value; sysfs store handlers (sscanf, kstrto*) ignore a trailing
    newline, and a simulated tree's plain files get back exactly what they held.
    O_TRUNC matters only for those plain files. Opened as an attribute (non-blocking,
    no symlink, regular files only): a FIFO planted where a journal path points must
    not hang the restore.
    """
    fd = open_attribute(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, (value + "\n").encode())
    finally:
        os.close(fd)


def write_msr(path: str, offset: int, data: bytes) -> None:
    """Write an MSR's saved bytes back: ``pwrite`` at the MSR's offset of the msr device."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        written = os.pwrite(fd, data, offset)
    finally:
        os.close(fd)
    if written != len(data):
        raise OSError(errno.EIO, f"short write ({written} of {len(data)} bytes)")


def msr_label(path: str, offset: int) -> str:
    """How an MSR entry is named in reports and ``pending()``: ``/dev/cpu/3/msr@0x186``."""
    return f"{path}@{offset:#x}"


def _label(key: Key) -> str:
    return key if isinstance(key, str) else msr_label(*key)


def _resolved_roots(roots: Iterable[str | os.PathLike[str]] | None) -> tuple[str, ...] | None:
    if roots is None:
        return None
    return tuple(os.path.realpath(root) for root in roots)


DIRS_UNDER_MAX = 8192  # directories whose _under answer is kept (a few per CPU)


def _under(path: str, roots: tuple[str, ...] | None) -> bool:
    """True when ``path``, symbolic links resolved, lies under one of ``roots``."""
    if roots is None:
        return True
    real = os.path.realpath(path)
    return any(real == root or real.startswith(root.rstrip("/") + "/") for root in roots)


def read_boot_id(path: str = BOOT_ID_PATH) -> str | None:
    """The running boot's ID, None when the kernel does not say (no /proc)."""
    boot_id = _read_original(path)
    return boot_id if boot_id is not None and _BOOT_ID.fullmatch(boot_id) else None


class RestoreJournal:
    """Originals of the files (and MSRs) vmpower wrote, kept in ``state_dir`` for this
    boot of the host.

    ``file_roots`` and ``msr_roots``, when given, are where journaled files and MSR
    devices may be: an entry elsewhere is refused by ``remember``/``remember_msr`` and,
    loaded from the file, is never written (kept aside and reported). None: anywhere.
    ``boot_id`` gives the running boot's ID (None: unknown, see the module's docstring).
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        writer: Writer = write_file,
        *,
        file_roots: Iterable[str | os.PathLike[str]] | None = None,
        msr_roots: Iterable[str | os.PathLike[str]] | None = None,
        msr_writer: MsrWriter = write_msr,
        boot_id: Callable[[], str | None] = read_boot_id,
        keep_earlier_boot: bool = True,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / JOURNAL_NAME
        self._boot_id = boot_id()
        self._header = _header(self._boot_id)
        # An earlier boot's journal is kept aside for the operator (False: removed, where
        # its directory goes anyway, as a telemetry session's does).
        self._keep_earlier_boot = keep_earlier_boot
        # Where a journal of an earlier boot found at start was kept (for recover's report)
        self._earlier_boot_kept: str | None = None
        self._write = writer
        self._write_msr = msr_writer
        self._file_roots = _resolved_roots(file_roots)
        self._msr_roots = _resolved_roots(msr_roots)
        self._lock = threading.Lock()
        # key → original, in order of first recording: a file's path → its text, or an
        # MSR's (device path, offset) → its bytes
        self._originals: dict[Key, str | bytes] = {}
        # The same file entries by directory ("…/policy3/" → name → original), so one
        # CPU's originals (show_cpus) cost its own files, not the whole journal (issue #16:
        # show_cpus built the whole journal per CPU, 0.1-0.5 s at 256 CPUs).
        self._by_dir: dict[str, dict[str, str]] = {}
        self._corrupt: RestoreError | None = None
        self._refused: list[str] = []
        # The file open for appends (-1: none, or not in the appendable layout: the next
        # record compacts first), where its trailer starts, how many records it holds,
        # how many of them are dead (restored entries and their "restored" records).
        self._fd = -1
        self._end = 0
        self._rows = 0
        self._dead = 0
        # This turn's directories (begin_turn) and the file names learnt in them.
        self._turn: frozenset[str] = frozenset()
        self._names: dict[str, None] = {}
        self._ahead: dict[str, tuple[str, ...]] = {}  # directory → its learnt paths
        # Directories begin_turn found holding every learnt name already: a steady turn
        # (every CPU written before) costs one subset test, not a walk of each file name.
        # A new name learnt or an original dropped takes a directory out again.
        self._complete: set[str] = set()
        # (directory, roots) → whether it lies under them, symbolic links resolved
        self._dirs_under: dict[tuple[str, tuple[str, ...]], bool] = {}
        # A Sysfs's files kept open (read_originals_with): path → content, None if not kept
        self._kept_reader: weakref.WeakMethod[Callable[[str], str | None]] | None = None
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise RestoreError(f"cannot create state directory {self.state_dir}: {exc}") from exc
        self._check_state_dir()
        self._remove_stale_temps()
        self._load()

    # -- WriteJournal --------------------------------------------------------------------

    def knows(self, path: str) -> bool:
        return path in self._originals

    def pending_count(self) -> int:
        """How many entries wait to be restored (``len(pending())`` without building it)."""
        return len(self._originals)

    def begin_turn(self, directories: Iterable[str]) -> None:
        """The turn is about to write files in ``directories`` (each ending in "/").

        Originals of the file names learnt in such directories before are recorded now,
        for every directory that lacks them, in one append; a file name met for the first
        time during the turn is recorded for all of them at once (``_record``). So the
        first writes of many CPUs in one turn share one append (and one sync, where
        appends are synced).
        """
        self._turn = turn = frozenset(directories)
        if not self._names or not turn or turn <= self._complete:
            return
        originals = self._originals
        missing = [
            path
            for directory in sorted(turn)
            for path in self._ahead_paths(directory)
            if path not in originals
        ]
        if missing:
            with self._lock:
                self._record_batch(self._read_originals(missing))
        # Names that could not be read in a directory (a file it lacks) are not retried
        # every turn: a write of one records it then (_record).
        self._complete |= turn

    def end_turn(self) -> None:
        self._turn = _NO_DIRECTORIES

    def remember(self, path: str, original: str) -> None:
        """Record ``original`` for ``path`` unless already recorded; in the file on return."""
        if not os.path.isabs(path):
            raise RestoreError(f"journal paths must be absolute, got {path!r}")
        self._record(path, original, self._file_roots)

    def remember_msr(self, path: str, offset: int, original: bytes) -> None:
        """Record the ``original`` bytes of the MSR at ``offset`` of device ``path``."""
        if not os.path.isabs(path):
            raise RestoreError(f"journal paths must be absolute, got {path!r}")
        if offset < 0 or len(original) > MSR_BYTES_MAX:
            raise RestoreError(f"{msr_label(path, offset)}: not an MSR ({len(original)} bytes)")
        self._record((path, offset), bytes(original), self._msr_roots)

    def _record(self, key: Key, original: str | bytes, roots: tuple[str, ...] | None) -> None:
        if key in self._originals:  # the first original wins (unlocked fast path)
            return
        path = key if isinstance(key, str) else key[0]
        if not self._path_under(path, roots):
            raise RestoreError(
                f"{_label(key)} lies outside {', '.join(roots or ())}: not journaled,"
                " so not written"
            )
        with self._lock:
            if key in self._originals:
                return
            batch = [(key, original)]
            if isinstance(key, str) and self._turn:
                batch += self._companions(key)
            self._record_batch(batch)

    def _record_batch(self, batch: list[tuple[Key, str | bytes]]) -> None:
        """Record new entries in one append (under the lock)."""
        if not batch:
            return
        for key, original in batch:
            self._add(key, original)
        try:
            rows = [_row_text(key, original) for key, original in batch]
            # An MSR record is synced whatever the boot: a reboot by kexec keeps MSRs,
            # so an earlier boot's MSR originals are still restored (_load). Rare: the
            # BRANCH_RATIO policy programs two event selects per CPU, once.
            # Only a journal whose boot cannot be told needs its file records on disk
            # (see the module's docstring).
            msr = any(not isinstance(key, str) for key, _ in batch)
            self._append(rows, sync=self._boot_id is None or msr)
        except RestoreError:
            # not in the file, so not recorded: the caller must not write the file
            for key, _ in batch:
                self._drop(key)
            raise

    def _companions(self, path: str) -> list[tuple[Key, str | bytes]]:
        """The same file name in this turn's other directories, with their originals."""
        directory, _, name = path.rpartition("/")
        directory += "/"
        if directory not in self._turn:
            return []
        if name not in self._names:
            self._names[name] = None
            self._ahead.clear()
            self._complete.clear()
        others = [
            d + name
            for d in sorted(self._turn)
            if d != directory and d + name not in self._originals
        ]
        return self._read_originals(others)

    def _ahead_paths(self, directory: str) -> tuple[str, ...]:
        paths = self._ahead.get(directory)
        if paths is None:
            paths = self._ahead[directory] = tuple(directory + name for name in self._names)
        return paths

    def _path_under(self, path: str, roots: tuple[str, ...] | None) -> bool:
        """``_under`` for a path about to be written, through its directory's kept answer.

        realpath walks every component (an lstat each): at first contact on 256 CPUs
        that was a tenth of the loop's time. A CPU's files share a directory, and the
        file itself is opened without following a link (sysfs.open_attribute), so the
        directory's answer is the file's. Entries loaded from the journal file are
        checked in full (``_under``).
        """
        if roots is None:
            return True
        directory, _, name = path.rpartition("/")
        return name not in ("", ".", "..") and self._dir_under(directory, roots)

    def _dir_under(self, directory: str, roots: tuple[str, ...]) -> bool:
        key = (directory, roots)
        inside = self._dirs_under.get(key)
        if inside is None:
            inside = _under(directory, roots)
            if len(self._dirs_under) < DIRS_UNDER_MAX:  # full: resolved each time
                self._dirs_under[key] = inside
        return inside

    def resolve_ahead(self, directories: Iterable[str]) -> None:
        """Resolve where ``directories`` (each ending in "/") lie before their files are
        first written: the daemon calls it while warming up, a few CPUs a turn, so that
        a CPU's first request does not pay for realpath (a third of that request's cost
        at first contact on 256 CPUs)."""
        roots = self._file_roots
        if roots is not None:
            for directory in directories:
                self._dir_under(directory.rstrip("/"), roots)

    def read_originals_with(self, read: weakref.WeakMethod[Callable[[str], str | None]]) -> None:
        """Read the originals recorded ahead (``begin_turn``, ``_companions``) with
        ``read`` first: a Sysfs's ``read_kept_path``, one ``pread`` through a file it keeps
        open, None for a file it does not keep (then read here). Sysfs calls it."""
        self._kept_reader = read

    def _read_originals(self, paths: list[str]) -> list[tuple[Key, str | bytes]]:
        """``(path, original)`` for those of ``paths`` that can be read and journaled."""
        found: list[tuple[Key, str | bytes]] = []
        kept = self._kept_reader() if self._kept_reader is not None else None
        for path in paths:
            if path in self._originals or not self._path_under(path, self._file_roots):
                continue
            original = kept(path) if kept is not None else None
            if original is None:
                original = _read_original(path)
            if original is not None:
                found.append((path, original))
        return found

    # -- restoring -----------------------------------------------------------------------

    def pending(self) -> dict[str, str]:
        """Every entry not restored yet, in order of first recording: a file's path → its
        original; an MSR as ``device@0xoffset`` → its original bytes in hex."""
        with self._lock:
            return {
                _label(key): value if isinstance(value, str) else value.hex()
                for key, value in self._originals.items()
            }

    def originals_in(self, directory: str) -> dict[str, str]:
        """The pending originals of the files directly in ``directory`` (ending in "/"):
        file name → original, in order of first recording; costs that directory's files."""
        with self._lock:
            return dict(self._by_dir.get(directory, ()))

    def _add(self, key: Key, original: str | bytes) -> None:
        self._originals[key] = original
        if isinstance(key, str) and isinstance(original, str):
            directory, _, name = key.rpartition("/")
            self._by_dir.setdefault(directory + "/", {})[name] = original

    def _drop(self, key: Key) -> None:
        del self._originals[key]
        if isinstance(key, str):
            directory, _, name = key.rpartition("/")
            self._complete.discard(directory + "/")
            files = self._by_dir.get(directory + "/")
            if files is not None:
                files.pop(name, None)
                if not files:
                    del self._by_dir[directory + "/"]

    def recover(self) -> RestoreReport:
        """Start-up: restore what a previous (crashed) run left in the journal.

        Raises RestoreError when that journal was corrupt; it has then been moved
        aside (the message names where) and this journal starts empty. Entries outside
        the allowed roots were kept aside when loading: they are in ``refused``.
        """
        if self._corrupt is not None:
            error, self._corrupt = self._corrupt, None
            raise error
        if self._originals:
            log.warning(
                "restore journal %s holds %d originals from a previous run: restoring",
                self.path,
                len(self._originals),
            )
        report = self.restore()
        report.refused, self._refused = self._refused, []
        report.earlier_boot, self._earlier_boot_kept = self._earlier_boot_kept, None
        return report

    def restore(self, select: Callable[[str], bool] | None = None) -> RestoreReport:
        """Put back every recorded entry (or those whose path ``select`` accepts), newest
        first."""
        report = RestoreReport()
        with self._lock:
            chosen = [
                (key, original)
                for key, original in reversed(self._originals.items())
                if select is None or select(key if isinstance(key, str) else key[0])
            ]
            if not chosen:
                if select is None and (self._dead or self._fd >= 0):
                    self._compact_logged()  # only "restored" records left: the file goes
                return report
            done: list[Key] = []
            retry: list[tuple[Key, str | bytes]] = []
            for key, original in chosen:
                reason = self._put_back(key, original)
                if reason is None:
                    done.append(key)
                else:
                    retry.append((key, original))
            for key, original in retry:  # second pass: refusals due to ordering
                reason = self._put_back(key, original)
                if reason is None:
                    done.append(key)
                else:
                    label = _label(key)
                    report.failed.append(label)
                    report.reasons[label] = reason
                    log.error(
                        "cannot restore %s to %r (kept for a later attempt): %s",
                        label,
                        original,
                        reason,
                    )
            for key in done:
                self._drop(key)
                report.restored.append(_label(key))
            try:
                self._forget(done, everything=select is None)
            except RestoreError as exc:
                # The files are back; a stale journal only means they would be written
                # with the same originals again after a crash, which is harmless.
                log.error("%s", exc)
        return report

    def _compact_logged(self) -> None:
        try:
            self._compact()
        except RestoreError as exc:
            log.error("%s", exc)

    def _forget(self, done: list[Key], *, everything: bool) -> None:
        """Drop restored entries from the file: a compaction after a full restore (start,
        exit) or once dead records pile up, else "restored" records appended unsynced."""
        if not done:
            return
        dead = self._dead + 2 * len(done)  # each entry and its "restored" record
        if everything or dead > max(COMPACT_MIN_DEAD, len(self._originals)):
            self._compact()
        else:
            self._append([json.dumps(_restored_row(key)) for key in done], sync=False)
            self._dead = dead

    def _put_back(self, key: Key, original: str | bytes) -> str | None:
        """None when the entry holds ``original`` again, else the reason it does not."""
        try:
            if isinstance(key, str):
                assert isinstance(original, str)
                self._write(key, original)
            else:
                assert isinstance(original, bytes)
                self._write_msr(key[0], key[1], original)
        except Exception as exc:  # one file's failure, whatever it is, must not stop the rest
            if original in PLACEHOLDERS:
                return None
            return _describe(exc)
        return None

    # -- the file ------------------------------------------------------------------------

    def _check_state_dir(self) -> None:
        """The state directory: trusted like sshd's StrictModes, for root and us only."""
        try:
            trust.check_directory(self.state_dir, trust.daemon_owners(), "state directory")
        except trust.UntrustedPathError as exc:
            raise RestoreError(f"{exc}: the restore journal cannot be kept there") from None
        except OSError as exc:
            raise RestoreError(f"cannot check state directory {self.state_dir}: {exc}") from exc

    def _remove_stale_temps(self) -> None:
        """Temp files of dead writers: a crash between write and rename (``_save``)."""
        try:
            names = os.listdir(self.state_dir)
        except OSError as exc:
            raise RestoreError(f"cannot list state directory {self.state_dir}: {exc}") from exc
        for name in names:
            match = _TEMP_NAME.fullmatch(name)
            if match is None:
                continue
            pid = int(match.group(1))
            if pid == os.getpid() or _alive(pid):
                continue  # a live writer's (this directory has one writer: never ours)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.state_dir / name)  # unlink never follows a symbolic link
                log.info("removed %s, left by a run that crashed while saving", name)

    def _read_trusted(self) -> str | None:
        """The journal's text, None when there is none; refuses a file it cannot trust.

        An untrusted journal stops the start (RestoreError) and is left as it is. Not
        ignored: the journal is rewritten whole at the first write, so ignoring it would
        silently lose a crashed run's originals that may well be genuine (a journal put
        back from a backup with the wrong mode); and with the state directory writable
        only by trusted users, only root can have put it there, so refusing is no lever
        for another user. The operator checks it and fixes or removes it.
        """
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._untrusted(f"{self.path} is a symbolic link") from None
            raise RestoreError(f"cannot read restore journal {self.path}: {exc}") from exc
        try:
            problem = trust.private_file_problem(os.fstat(fd), str(self.path))
            if problem is not None:
                raise self._untrusted(problem)
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
        except OSError as exc:
            raise RestoreError(f"cannot read restore journal {self.path}: {exc}") from exc
        finally:
            os.close(fd)
        return b"".join(chunks).decode(errors="replace")

    def _untrusted(self, problem: str) -> RestoreError:
        return RestoreError(
            f"restore journal not trusted: {problem}; nothing restored from it and it is left"
            f" as it is: check its entries, then make it {trust.user_name(os.geteuid())}'s"
            " with mode 0600, or move it away"
        )

    def _load(self) -> None:
        text = self._read_trusted()
        if text is None:
            return
        try:
            entries, torn, written_in = _parse(text)
        except ValueError as exc:
            # A host crash can leave any damage past the header (appends are not synced):
            # an earlier boot's file is not this run's to be corrupt.
            header = _HEADER_RE.match(text)
            if header is not None and self._earlier(header.group(2)):
                self._set_aside_earlier_boot(header.group(2), None, 0)
                return
            kept = self._keep_aside(
                f"corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}", "is corrupt"
            )
            self._corrupt = RestoreError(
                f"restore journal {self.path} is corrupt ({exc}); kept as {kept}: the"
                " settings it recorded were not restored, check them by hand"
            )
            log.error("%s", self._corrupt)
            return
        if self._earlier(written_in):
            assert written_in is not None
            msrs = [(key, original) for key, original in entries if not isinstance(key, str)]
            self._set_aside_earlier_boot(written_in, len(entries) - len(msrs), len(msrs))
            entries = msrs  # restored: a reboot by kexec keeps MSRs as they were
            torn = ""
        if torn:
            # A crash inside an append (the daemon killed while the kernel copied a
            # record across a page, or a host crash where the boot is not known): that
            # record's file was never written, since the write waits for the append.
            log.warning("restore journal %s: ignored a torn last record: %r", self.path, torn)
        refused: list[tuple[Key, str | bytes]] = []
        for key, original in entries:
            if isinstance(key, str):
                inside = _under(key, self._file_roots)
            else:
                inside = _under(key[0], self._msr_roots)
            if inside:
                self._add(key, original)
            else:
                refused.append((key, original))
        if refused:
            self._set_aside(refused)

    def _earlier(self, written_in: str | None) -> bool:
        """Whether a journal naming ``written_in`` is of another boot than this one."""
        return written_in is not None and self._boot_id is not None and written_in != self._boot_id

    def _set_aside_earlier_boot(self, written_in: str, files: int | None, msrs: int) -> None:
        """An earlier boot's journal: the kernel reset its sysfs files at boot, so they
        are not restored; the file is kept aside (or removed). Its MSRs, which a reboot
        by kexec does not reset, the caller restores."""
        suffix = f"boot-{written_in}" if self._keep_earlier_boot else None
        kept = self._keep_aside(suffix, f"is from an earlier boot ({written_in})")
        what = "its settings" if files is None else f"its {files} settings"
        where = f"kept as {kept}" if kept is not None else "removed"
        also = f"; its {msrs} MSRs are restored (kexec keeps them)" if msrs else ""
        log.warning(
            "restore journal %s was written in an earlier boot (%s; this one is %s): %s are"
            " not restored, since the kernel reset them when it booted%s; %s",
            self.path,
            written_in,
            self._boot_id,
            what,
            also,
            where,
        )
        self._earlier_boot_kept = None if kept is None else str(kept)

    def _set_aside(self, refused: list[tuple[Key, str | bytes]]) -> None:
        """Entries outside the roots: never written; kept in a file beside, reported."""
        labels = [_label(key) for key, _ in refused]
        kept = self.path.with_name(
            f"{JOURNAL_NAME}.refused-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        )
        try:
            _write_durably(kept, _render(refused, self._header), os.O_EXCL)
            self._compact()  # the live journal no longer names them
        except (OSError, RestoreError) as exc:
            raise RestoreError(
                f"restore journal {self.path} names {len(refused)} paths outside the allowed"
                f" roots and they cannot be set aside: {exc}"
            ) from exc
        roots = ", ".join((*(self._file_roots or ()), *(self._msr_roots or ())))
        shown = ", ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")
        log.error(
            "restore journal %s: %d entries lie outside %s and were not restored (%s); kept as %s",
            self.path,
            len(labels),
            roots,
            shown,
            kept,
        )
        self._refused = labels

    def _keep_aside(self, suffix: str | None, why: str) -> Path | None:
        """Move the journal file to ``<journal>.<suffix>`` and return where (None: remove
        it); ``why`` it goes, for the error when it cannot."""
        kept = None if suffix is None else self.path.with_name(f"{JOURNAL_NAME}.{suffix}")
        try:
            if kept is None:
                os.unlink(self.path)
            else:
                os.replace(self.path, kept)
            _fsync_dir(self.state_dir)
        except OSError as exc:
            raise RestoreError(
                f"restore journal {self.path} {why} and cannot be moved aside: {exc}"
            ) from exc
        return kept

    def _append(self, rows: list[str], *, sync: bool) -> None:
        """Append ``rows`` (JSON records, already in memory) to the file; ``sync``:
        durable on return.

        One ``pwrite`` of the records and the trailer over the old trailer, so the file
        is whole JSON after it. A file not yet in the appendable layout (none yet, an
        older version, or unlinked behind our back) is compacted instead, from memory,
        which holds the new entries already.
        """
        fd = self._fd
        try:
            if fd < 0 or os.fstat(fd).st_nlink == 0:
                self._compact()
                return
            parts = []
            for row in rows:
                parts.append(("," if self._rows else "") + row + "\n")
                self._rows += 1
            data = "".join(parts).encode()
            written = os.pwrite(fd, data + _TRAILER, self._end)
            if written != len(data) + len(_TRAILER):
                raise OSError(errno.EIO, "short write")
            self._end += len(data)
            if sync:
                os.fdatasync(fd)
        except OSError as exc:
            self._close_file()  # the next record compacts from memory
            raise RestoreError(f"cannot write restore journal {self.path}: {exc}") from exc

    def _compact(self) -> None:
        """Make the file hold exactly memory's entries: replaced atomically (temp file,
        fsync, rename, fsync of the directory), or removed when there are none."""
        self._close_file()
        try:
            if not self._originals:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                    _fsync_dir(self.state_dir)
                return
            data = _render(self._originals.items(), self._header).encode()
            tmp = self.path.with_name(f".{JOURNAL_NAME}.{os.getpid()}.tmp")
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(tmp, flags, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
                os.replace(tmp, self.path)
                _fsync_dir(self.state_dir)
            except BaseException:
                os.close(fd)
                raise
        except OSError as exc:
            raise RestoreError(f"cannot write restore journal {self.path}: {exc}") from exc
        self._fd = fd  # the renamed file: later records are appended to it
        self._end = len(data) - len(_TRAILER)
        self._rows = len(self._originals)
        self._dead = 0

    def _close_file(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        """Close the file kept open for appends (reopened by the next record)."""
        with self._lock:
            self._close_file()


def _read_original(path: str) -> str | None:
    """An attribute's content as ``Sysfs.read`` gives it (stripped); None if unreadable."""
    try:
        return read_attribute(path)
    except (OSError, UnicodeDecodeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process; not a pid at all
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _row(key: Key, original: str | bytes) -> dict[str, object]:
    if isinstance(key, str):
        return {"path": key, "original": original}
    assert isinstance(original, bytes)
    return {"path": key[0], "offset": key[1], "bytes": original.hex()}


def _row_text(key: Key, original: str | bytes) -> str:
    """``json.dumps(_row(key, original))``: a file's record is built around its strings
    (json.dumps' own escaping) at a tenth of the cost; a new CPU costs two records."""
    if isinstance(key, str) and isinstance(original, str):
        return '{"path": ' + _json_str(key) + ', "original": ' + _json_str(original) + "}"
    return json.dumps(_row(key, original))


def _restored_row(key: Key) -> dict[str, object]:
    if isinstance(key, str):
        return {"restored": key}
    return {"restored": key[0], "msr_offset": key[1]}


def _header(boot_id: str | None) -> str:
    """An append-only file's header, naming the boot it is written in when that is known."""
    boot = "" if boot_id is None else f', "boot_id": "{boot_id}"'
    return f'{{"format": "{FORMAT}", "version": {VERSION}{boot}, "entries": [\n'


def _render(entries: Iterable[tuple[Key, str | bytes]], header: str) -> str:
    """An append-only file holding ``entries``: ``header``, one record a line, the trailer."""
    lines = [
        ("," if i else "") + _row_text(key, original) + "\n"
        for i, (key, original) in enumerate(entries)
    ]
    return header + "".join(lines) + _TRAILER.decode()


def _write_durably(path: Path, text: str, extra_flags: int) -> None:
    """Write a 0600 file and fsync it; never through a symbolic link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | extra_flags
    fd = os.open(path, flags, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _parse(text: str) -> tuple[list[tuple[Key, str | bytes]], str, str | None]:
    """The live entries of a journal's text, in order of first recording, the torn last
    record a crash inside an append left ("" when none), and the boot it names (None:
    none, as in every file written before boot IDs)."""
    torn = ""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        header = _HEADER_RE.match(text)
        if header is None:
            raise ValueError(f"not JSON: {exc}") from None
        rows, torn = _parse_lines(text[header.end() :], exc)
        data = {"format": FORMAT, "version": int(header.group(1)), "entries": rows}
        if header.group(2) is not None:
            data["boot_id"] = header.group(2)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file")
    version = data.get("version")
    if version not in READ_VERSIONS:
        raise ValueError(f"unknown version {version!r} (expected {VERSION})")
    boot_id = data.get("boot_id")
    if boot_id is not None and not (isinstance(boot_id, str) and _BOOT_ID.fullmatch(boot_id)):
        raise ValueError(f"boot_id {boot_id!r} is not a boot ID")
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise ValueError('"entries" is not a list')
    live: dict[Key, str | bytes] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"entry {i} has no path")
        if version >= 3 and "restored" in entry:
            live.pop(_restored_key(entry, i), None)
            continue
        if not isinstance(entry.get("path"), str):
            raise ValueError(f"entry {i} has no path")
        path = entry["path"]
        if not os.path.isabs(path):
            raise ValueError(f"entry {i}: the path is not absolute")
        key: Key
        if "offset" in entry:
            key, original = (path, _msr_offset(entry, i)), _msr_bytes(entry, i)
        elif isinstance(entry.get("original"), str):
            key, original = path, entry["original"]
        else:
            raise ValueError(f"entry {i} is not {{path: absolute path, original: string}}")
        live.setdefault(key, original)  # the first original wins
    return list(live.items()), torn, boot_id


def _parse_lines(body: str, error: json.JSONDecodeError) -> tuple[list[object], str]:
    """An append-only file that is not whole JSON: records one a line; only the last line
    may be torn (a host crash inside an append), anything else is corruption."""
    lines = body.split("\n")
    rows: list[object] = []
    for n, line in enumerate(lines):
        record = line[1:] if line.startswith(",") else line
        if not record or record == "]}":
            continue
        try:
            rows.append(json.loads(record))
        except json.JSONDecodeError:
            if any(rest.strip() not in ("", "]}") for rest in lines[n + 1 :]):
                raise ValueError(f"not JSON: {error}") from None
            return rows, line
    return rows, ""


def _restored_key(entry: dict[str, object], i: int) -> Key:
    path = entry["restored"]
    if not isinstance(path, str):
        raise ValueError(f"entry {i}: a restored record names no path")
    if "msr_offset" in entry:
        offset = entry["msr_offset"]
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise ValueError(f"entry {i}: an MSR offset must be a non-negative integer")
        return (path, offset)
    return path


def _msr_offset(entry: dict[str, object], i: int) -> int:
    offset = entry["offset"]
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"entry {i}: an MSR offset must be a non-negative integer")
    return offset


def _msr_bytes(entry: dict[str, object], i: int) -> bytes:
    text = entry.get("bytes")
    try:
        data = bytes.fromhex(text) if isinstance(text, str) else None
    except ValueError:
        data = None
    if data is None or len(data) > MSR_BYTES_MAX:
        raise ValueError(f"entry {i}: an MSR's bytes must be hex, at most {MSR_BYTES_MAX} bytes")
    return data


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def select_cpu(sysfs_root: str | os.PathLike[str], cpu: int) -> Callable[[str], bool]:
    """A ``restore`` selector for the files of one CPU (``…/devices/system/cpu/cpuN/…``)."""
    prefix = os.path.join(sysfs_root, "devices/system/cpu", f"cpu{cpu}") + os.sep
    return lambda path: path.startswith(prefix)
