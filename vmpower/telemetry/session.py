"""One batch session: its key, the names of its files, and the spec the server runs from.

This module owns

* ``session_paths(shm_dir, key)``: every name a session uses in ``telemetry.shm_dir``
  (the two value buffers ``vmpower-batch-<key>-signals`` / ``-controls`` and the channel's
  files). ``remove_session_files`` removes exactly those names, so the cleanup of a
  crashed run always matches what was created (GEOPM's did not: docs/telemetry.md section 5);
* ``SessionSpec``: what the daemon decided for a session (client identity, validated
  requests, roots), written as ``session.json`` into the session's state directory
  (``<state.dir>/telemetry/<key>/``), read by the exec'd server and, after a crash, by
  the next daemon to find the files and the restore journal the session left.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

from vmpower.errors import TelemetryError
from vmpower.telemetry.catalog import Request, parse_requests
from vmpower.telemetry.channel import ChannelPaths, channel_paths
from vmpower.telemetry.shm import unlink_quietly

SPEC_NAME = "session.json"
SESSIONS_DIR = "telemetry"
_KEY = re.compile(r"^[0-9]+-[0-9a-f]{8}$")


def new_key(client_pid: int) -> str:
    """``<client pid>-<8 random hex digits>``: GEOPM keys by pid; the random part keeps two
    sessions of one client (or of two daemons sharing /dev/shm) apart."""
    return f"{client_pid}-{secrets.token_hex(4)}"


def check_key(key: Any) -> str:
    if not isinstance(key, str) or not _KEY.match(key):
        raise TelemetryError(f"bad batch server key {key!r} (expected <pid>-<8 hex digits>)")
    return key


def session_prefix(key: str) -> str:
    return f"vmpower-batch-{check_key(key)}"


class SessionPaths(NamedTuple):
    signals: Path
    controls: Path
    channel: ChannelPaths

    def all(self) -> list[Path]:
        return [self.signals, self.controls, *self.channel.all()]


def session_paths(shm_dir: str | os.PathLike[str], key: str) -> SessionPaths:
    """Every name session ``key`` may use in ``shm_dir`` (the only function making them)."""
    prefix = session_prefix(key)
    base = Path(shm_dir)
    return SessionPaths(
        signals=base / f"{prefix}-signals",
        controls=base / f"{prefix}-controls",
        channel=channel_paths(base, prefix),
    )


def remove_session_files(shm_dir: str | os.PathLike[str], key: str) -> list[Path]:
    """Remove every name of session ``key``; return those that existed."""
    return [path for path in session_paths(shm_dir, key).all() if unlink_quietly(path)]


def remove_session_dir(session_dir: Path) -> None:
    """Remove a finished session's state directory (spec, empty journal, temp files)."""
    with contextlib.suppress(FileNotFoundError):
        for entry in session_dir.iterdir():
            with contextlib.suppress(OSError):
                entry.unlink()
    with contextlib.suppress(OSError):
        session_dir.rmdir()


@dataclass(frozen=True)
class SessionSpec:
    """Everything a batch server needs, fixed when the daemon accepted the session."""

    key: str
    shm_dir: str
    client_pid: int
    client_uid: int
    client_gid: int
    client_start_ticks: int
    signals: tuple[Request, ...]
    controls: tuple[Request, ...]
    period_s: float | None
    sysfs_root: str
    powercap_root: str
    proc_root: str
    libvirt_uri: str
    pid_root: str = "/proc"
    daemon_pid: int = 0
    created_at: float = 0.0
    # The daemon's control socket: the server sends its control writes there, to be
    # arbitrated and journaled by the daemon (issue #12, point 5).
    control_socket: str = ""

    def to_json(self) -> str:
        data = asdict(self)
        data["signals"] = [r.to_json() for r in self.signals]
        data["controls"] = [r.to_json() for r in self.controls]
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = SPEC_NAME) -> SessionSpec:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise TelemetryError(f"{source}: not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise TelemetryError(f"{source}: not a JSON object")
        try:
            period = data.get("period_s")
            if period is not None and (
                isinstance(period, bool)
                or not isinstance(period, int | float)
                or not math.isfinite(period)
                or period <= 0
            ):
                raise TelemetryError(f"period_s must be > 0 seconds, not {period!r}")
            spec = cls(
                key=check_key(data["key"]),
                shm_dir=_str(data, "shm_dir"),
                client_pid=_int(data, "client_pid"),
                client_uid=_int(data, "client_uid"),
                client_gid=_int(data, "client_gid"),
                client_start_ticks=_int(data, "client_start_ticks"),
                signals=tuple(parse_requests(data.get("signals"), "signal")),
                controls=tuple(parse_requests(data.get("controls"), "control")),
                period_s=None if period is None else float(period),
                sysfs_root=_str(data, "sysfs_root"),
                powercap_root=_str(data, "powercap_root"),
                proc_root=_str(data, "proc_root"),
                libvirt_uri=str(data.get("libvirt_uri", "")),
                pid_root=_str(data, "pid_root"),
                daemon_pid=_int(data, "daemon_pid"),
                created_at=float(data.get("created_at", 0.0)),
                control_socket=str(data.get("control_socket", "")),
            )
        except KeyError as exc:
            raise TelemetryError(f"{source}: missing {exc.args[0]!r}") from None
        except TelemetryError as exc:
            raise TelemetryError(f"{source}: {exc}") from None
        return spec

    def save(self, session_dir: Path) -> Path:
        """Write ``session.json`` atomically (temp file, fsync, rename)."""
        path = session_dir / SPEC_NAME
        tmp = session_dir / f".{SPEC_NAME}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, self.to_json().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, session_dir: Path) -> SessionSpec:
        path = session_dir / SPEC_NAME
        try:
            text = path.read_text()
        except OSError as exc:
            raise TelemetryError(f"cannot read {path}: {exc.strerror}") from None
        return cls.from_json(text, str(path))

    @property
    def owner(self) -> tuple[int, int]:
        return (self.client_uid, self.client_gid)


def _int(data: dict[str, Any], key: str) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TelemetryError(f"{key} must be an integer, not {value!r}")
    return value


def _str(data: dict[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str) or not value:
        raise TelemetryError(f"{key} must be a non-empty string, not {value!r}")
    return value


def process_start_ticks(pid: int, pid_root: str | os.PathLike[str] = "/proc") -> int | None:
    """Start time of ``pid`` in clock ticks since boot (proc(5): /proc/<pid>/stat field 22).

    None when the process is gone. With uid and gid it tells a process from a later one
    that reused its pid (docs/telemetry.md section 5).
    """
    try:
        with open(Path(pid_root) / str(pid) / "stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ")": split
    # after the last ")" (proc(5)); starttime is then the 20th field.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def process_ids(pid: int, pid_root: str | os.PathLike[str] = "/proc") -> tuple[int, int] | None:
    """(effective uid, effective gid) of ``pid`` from /proc/<pid>/status; None when gone.

    Effective ids, as SO_PEERCRED reports them (socket(7)).
    """
    try:
        text = (Path(pid_root) / str(pid) / "status").read_text()
    except OSError:
        return None
    uid = gid = None
    for line in text.splitlines():
        # proc(5): "Uid:" real, effective, saved set, filesystem
        if line.startswith("Uid:"):
            uid = int(line.split()[2])
        elif line.startswith("Gid:"):
            gid = int(line.split()[2])
    if uid is None or gid is None:
        return None
    return uid, gid
