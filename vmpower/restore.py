"""The restore journal: every sysfs file vmpower changes is put back as it was.

``RestoreJournal(state_dir)`` implements ``vmpower.sysfs.WriteJournal``: before the
first write of a file, ``Sysfs`` hands it the file's original content, and the journal
makes it durable (a JSON file in ``state_dir`` replaced atomically: temp file, fsync,
rename, fsync of the directory) *before* ``remember`` returns, so a crash at any later
point still knows every original.

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
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vmpower.errors import RestoreError

log = logging.getLogger("vmpower.restore")

JOURNAL_NAME = "restore-journal.json"
FORMAT = "vmpower-restore-journal"
VERSION = 1
# cpufreq.rst: scaling_setspeed reads "<unsupported>" unless the governor is userspace.
# It is a placeholder, not a value: the kernel refuses it back, and restoring the
# governor (which comes after, in reverse order) is what brings the placeholder back.
PLACEHOLDERS = frozenset({"<unsupported>"})

Writer = Callable[[str, str], None]


@dataclass
class RestoreReport:
    """What one restore did: paths put back, paths that failed (and why)."""

    restored: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


def write_file(path: str, value: str) -> None:
    """Write ``value`` and a newline in one write(2), as ``echo value > path`` does.

    ``Sysfs.read`` strips the newline every sysfs attribute ends with, so the journal
    holds the bare value; sysfs store handlers (sscanf, kstrto*) ignore a trailing
    newline, and a simulated tree's plain files get back exactly what they held.
    O_TRUNC matters only for those plain files.
    """
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, (value + "\n").encode())
    finally:
        os.close(fd)


class RestoreJournal:
    """Originals of the files vmpower wrote, kept durably in ``state_dir``."""

    def __init__(self, state_dir: str | os.PathLike[str], writer: Writer = write_file) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / JOURNAL_NAME
        self._write = writer
        self._lock = threading.Lock()
        self._originals: dict[str, str] = {}  # path → original, in order of first recording
        self._corrupt: RestoreError | None = None
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise RestoreError(f"cannot create state directory {self.state_dir}: {exc}") from exc
        self._load()

    # -- WriteJournal --------------------------------------------------------------------

    def knows(self, path: str) -> bool:
        return path in self._originals

    def remember(self, path: str, original: str) -> None:
        """Record ``original`` for ``path`` unless already recorded; durable on return."""
        if not os.path.isabs(path):
            raise RestoreError(f"journal paths must be absolute, got {path!r}")
        with self._lock:
            if path in self._originals:
                return
            self._originals[path] = original
            try:
                self._save()
            except RestoreError:
                # not durable, so not recorded: the caller must not write the file
                del self._originals[path]
                raise

    # -- restoring -----------------------------------------------------------------------

    def pending(self) -> dict[str, str]:
        """Path → original of every file not restored yet, in order of first recording."""
        with self._lock:
            return dict(self._originals)

    def recover(self) -> RestoreReport:
        """Start-up: restore what a previous (crashed) run left in the journal.

        Raises RestoreError when that journal was corrupt; it has then been moved
        aside (the message names where) and this journal starts empty.
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
        return self.restore()

    def restore(self, select: Callable[[str], bool] | None = None) -> RestoreReport:
        """Put back every recorded file (or those ``select`` accepts), newest first."""
        report = RestoreReport()
        with self._lock:
            chosen = [
                (path, original)
                for path, original in reversed(self._originals.items())
                if select is None or select(path)
            ]
            if not chosen:
                return report
            retry: list[tuple[str, str]] = []
            for path, original in chosen:
                reason = self._put_back(path, original)
                if reason is None:
                    report.restored.append(path)
                else:
                    retry.append((path, original))
            for path, original in retry:  # second pass: refusals due to ordering
                reason = self._put_back(path, original)
                if reason is None:
                    report.restored.append(path)
                else:
                    report.failed.append(path)
                    report.reasons[path] = reason
                    log.error(
                        "cannot restore %s to %r (kept for a later attempt): %s",
                        path,
                        original,
                        reason,
                    )
            for path in report.restored:
                del self._originals[path]
            try:
                self._save()
            except RestoreError as exc:
                # The files are back; a stale journal only means they would be written
                # with the same originals again after a crash, which is harmless.
                log.error("%s", exc)
        return report

    def _put_back(self, path: str, original: str) -> str | None:
        """None when ``path`` holds ``original`` again, else the reason it does not."""
        try:
            self._write(path, original)
        except Exception as exc:  # one file's failure, whatever it is, must not stop the rest
            if original in PLACEHOLDERS:
                return None
            return _describe(exc)
        return None

    # -- the file ------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise RestoreError(f"cannot read restore journal {self.path}: {exc}") from exc
        try:
            entries = _parse(text)
        except ValueError as exc:
            kept = self._keep_aside()
            self._corrupt = RestoreError(
                f"restore journal {self.path} is corrupt ({exc}); kept as {kept}: the"
                " settings it recorded were not restored, check them by hand"
            )
            log.error("%s", self._corrupt)
            return
        self._originals = dict(entries)

    def _keep_aside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        kept = self.path.with_name(f"{JOURNAL_NAME}.corrupt-{stamp}-{os.getpid()}")
        try:
            os.replace(self.path, kept)
            _fsync_dir(self.state_dir)
        except OSError as exc:
            raise RestoreError(
                f"restore journal {self.path} is corrupt and cannot be moved aside: {exc}"
            ) from exc
        return kept

    def _save(self) -> None:
        """Make the journal file match memory: replaced atomically, or removed when empty."""
        try:
            if not self._originals:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                    _fsync_dir(self.state_dir)
                return
            data = {
                "format": FORMAT,
                "version": VERSION,
                "entries": [{"path": p, "original": o} for p, o in self._originals.items()],
            }
            tmp = self.path.with_name(f".{JOURNAL_NAME}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, (json.dumps(data, indent=1) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            _fsync_dir(self.state_dir)
        except OSError as exc:
            raise RestoreError(f"cannot write restore journal {self.path}: {exc}") from exc


def _parse(text: str) -> list[tuple[str, str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file")
    if data.get("version") != VERSION:
        raise ValueError(f"unknown version {data.get('version')!r} (expected {VERSION})")
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise ValueError('"entries" is not a list')
    result: list[tuple[str, str]] = []
    for i, entry in enumerate(entries):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("path"), str)
            or not isinstance(entry.get("original"), str)
            or not os.path.isabs(entry["path"])
        ):
            raise ValueError(f"entry {i} is not {{path: absolute path, original: string}}")
        result.append((entry["path"], entry["original"]))
    return result


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
