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

import json
from pathlib import Path
from typing import TextIO

from vmpower.config import Config, config_problems, default_config_path, load_config
from vmpower.errors import ConfigError, VmpowerError
from vmpower.instancelock import InstanceLock, LockHeld
from vmpower.restore import RestoreJournal
from vmpower.telemetry.cli import report_error

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def _lock(state_dir: Path) -> InstanceLock:
    """vmpowerd's own instance lock: refused, with what to do, while the daemon runs."""
    lock = InstanceLock(state_dir)
    try:
        lock.acquire()
    except LockHeld as exc:
        raise VmpowerError(
            f"vmpowerd (pid {exc.holder}) is running (it holds {exc.path}): it puts back its"
            " own settings when it stops (systemctl stop vmpowerd); vmpower restore is"
            " for a daemon that is not running"
        ) from None
    return lock


def restore(config: Config) -> dict[str, object]:
    """Restore every journal entry; what was done, per entry. Raises VmpowerError."""
    state_dir = Path(config.state.dir)
    result: dict[str, object] = {
        "journal": str(state_dir),
        "restored": [],
        "failed": [],
        "refused": [],
        "earlier_boot": None,
    }
    if not state_dir.is_dir():
        return result  # vmpowerd never ran with this state.dir: nothing it changed
    lock = _lock(state_dir)
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
        lock.release()
    result["restored"] = [{"setting": k, "value": originals.get(k)} for k in report.restored]
    result["failed"] = [{"setting": k, "reason": report.reasons.get(k, "")} for k in report.failed]
    result["refused"] = list(report.refused)
    result["earlier_boot"] = report.earlier_boot
    return result


def main(config_path: Path | None, out: TextIO, err: TextIO, *, json_output: bool = False) -> int:
    """``vmpower restore [--config FILE]``; returns the exit status."""
    if config_path is None and default_config_path().exists():
        config_path = default_config_path()
    try:
        config = load_config(config_path) if config_path is not None else Config()
    except ConfigError as exc:
        problems = "; ".join(str(p) for p in config_problems(exc))
        return report_error(problems, EXIT_CONFIG, json_output, out, err)
    try:
        result = restore(config)
    except (VmpowerError, OSError) as exc:
        return report_error(f"error: {exc}", EXIT_FAILED, json_output, out, err)
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
        if result["earlier_boot"]:
            # Its sysfs files; its MSRs (a reboot by kexec keeps them) are listed above.
            print(
                f"not restored: the journal was written in an earlier boot, whose settings"
                f" the kernel reset when it booted; kept as {result['earlier_boot']}",
                file=out,
            )
        if restored or failed or refused:
            kept = f" (kept in {result['journal']} for vmpowerd's next start)" if failed else ""
            print(f"{len(restored)} settings restored, {len(failed)} not restored{kept}", file=out)
        elif not result["earlier_boot"]:
            print(f"nothing to restore: the journal in {config.state.dir} is empty", file=out)
    return EXIT_FAILED if failed else EXIT_OK
