"""``vmpower restore``: put back what a stopped vmpowerd left changed, without it.

After ``kill -9`` (or before uninstalling), the settings vmpowerd changed are still in
its restore journal (``state.dir``). This takes the daemon's instance lock, so it never
runs beside a vmpowerd (and no vmpowerd starts while it works), then restores every
entry the way the daemon's start does (``RestoreJournal.recover``: the same trust
checks on the journal, entries outside ``cpufreq.sysfs_root`` / ``policies.msr_root``
refused) and reports each one. Exit status: 0 every setting back (or nothing to do),
1 refused (vmpowerd runs, untrusted journal) or some setting not restored, 2 bad
configuration.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path
from typing import TextIO

from vmpower.config import Config, config_problems, default_config_path, load_config
from vmpower.errors import ConfigError, VmpowerError
from vmpower.restore import RestoreJournal

LOCK_NAME = "vmpowerd.lock"  # in state.dir: vmpowerd's single-instance flock
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


class DaemonRunning(VmpowerError):
    """vmpowerd holds its instance lock: it restores its own settings when it stops."""


def take_instance_lock(state_dir: Path) -> int:
    """vmpowerd's lock, as vmpowerd takes it (flock, non-blocking); returns its fd."""
    path = state_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise DaemonRunning(
                f"vmpowerd (pid {holder}) is running (it holds {path}): it puts back its"
                " own settings when it stops (systemctl stop vmpowerd); vmpower restore is"
                " for a daemon that is not running"
            ) from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def restore(config: Config) -> dict[str, object]:
    """Restore every journal entry; what was done, per entry. Raises VmpowerError."""
    state_dir = Path(config.state.dir)
    result: dict[str, object] = {
        "journal": str(state_dir),
        "restored": [],
        "failed": [],
        "refused": [],
    }
    if not state_dir.is_dir():
        return result  # vmpowerd never ran with this state.dir: nothing it changed
    fd = take_instance_lock(state_dir)
    try:
        journal = RestoreJournal(
            state_dir,
            file_roots=[config.cpufreq.sysfs_root],
            msr_roots=[config.policies.msr_root],
        )
        result["journal"] = str(journal.path)
        originals = journal.pending()
        report = journal.recover()
    finally:
        os.close(fd)  # releases the flock
    result["restored"] = [{"setting": k, "value": originals.get(k)} for k in report.restored]
    result["failed"] = [{"setting": k, "reason": report.reasons.get(k, "")} for k in report.failed]
    result["refused"] = list(report.refused)
    return result


def main(config_path: Path | None, out: TextIO, err: TextIO, *, json_output: bool = False) -> int:
    """``vmpower restore [--config FILE]``; returns the exit status."""

    def fail(message: str, status: int) -> int:
        if json_output:
            print(json.dumps({"error": message, "exit_status": status}), file=out)
        else:
            print(f"vmpower: {message}", file=err)
        return status

    if config_path is None and default_config_path().exists():
        config_path = default_config_path()
    try:
        config = load_config(config_path) if config_path is not None else Config()
    except ConfigError as exc:
        return fail("; ".join(str(p) for p in config_problems(exc)), EXIT_CONFIG)
    try:
        result = restore(config)
    except (VmpowerError, OSError) as exc:
        return fail(f"error: {exc}", EXIT_FAILED)
    restored, failed, refused = result["restored"], result["failed"], result["refused"]
    assert isinstance(restored, list) and isinstance(failed, list) and isinstance(refused, list)
    if json_output:
        print(json.dumps(result, indent=2), file=out)
    else:
        for entry in restored:
            print(f"restored {entry['setting']} = {entry['value']}", file=out)
        for entry in failed:
            print(f"NOT restored {entry['setting']}: {entry['reason']}", file=out)
        for label in refused:
            print(f"refused {label}: outside the sysfs and msr roots, never written", file=out)
        if not (restored or failed or refused):
            print(f"nothing to restore: the journal in {config.state.dir} is empty", file=out)
        else:
            kept = f" (kept in {result['journal']} for vmpowerd's next start)" if failed else ""
            print(f"{len(restored)} settings restored, {len(failed)} not restored{kept}", file=out)
    return EXIT_FAILED if failed else EXIT_OK
