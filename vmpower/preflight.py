"""The start-up checks a configuration must pass, beyond each key's own type and range.

``vmpower.config`` checks every key alone. This module checks what needs several keys
or the host, so that ``vmpowerd --check-config`` reports every problem at once and a
start refuses a bad configuration (exit status 2) before anything is changed:

* the TIME policies' time zone exists (``policies.timezone``);
* the control socket's group exists (``control.group``);
* ``libvirt.reconnect_min_s`` ≤ ``libvirt.reconnect_max_s``;
* ``control.mode`` holds permission bits only (≤ 0o7777);
* with ``paths=True`` (``--check-config``): the sysfs root has a CPU tree, and the
  channel and state directories, when they exist, pass the trust rules the daemon
  applies at start (``vmpower.trust``: owner, mode, no untrusted link on the way).
  At start the daemon makes those checks itself, in order, creating what is missing.
"""

from __future__ import annotations

import grp
import os
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from vmpower import trust
from vmpower.config import Config
from vmpower.errors import ConfigError

MODE_BITS = 0o7777  # chmod(2): permission bits, set-id and sticky; nothing above


def problems(config: Config, file: str, *, paths: bool = False) -> list[ConfigError]:
    """Every problem found, each naming ``file``, the key and the reason; [] when none."""
    found: list[ConfigError] = []

    def bad(key: str, reason: str) -> None:
        found.append(ConfigError(file, key, reason))

    zone = config.policies.timezone
    if zone:
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            bad("policies.timezone", f"unknown time zone {zone!r} (e.g. Europe/Paris, UTC)")
    group = config.control.group
    if group:
        try:
            grp.getgrnam(group)
        except KeyError:
            bad("control.group", f"no group named {group!r} on this host")
    lo, hi = config.libvirt.reconnect_min_s, config.libvirt.reconnect_max_s
    if lo > hi:
        bad("libvirt.reconnect_min_s", f"{lo:g} is above libvirt.reconnect_max_s {hi:g}")
    mode = config.control.mode
    if mode > MODE_BITS:
        bad("control.mode", f"{oct(mode)} is not a file mode (at most 0o7777)")
    if paths:
        found.extend(_path_problems(config, file))
    return found


def _path_problems(config: Config, file: str) -> list[ConfigError]:
    found: list[ConfigError] = []
    cpu_dir = Path(config.cpufreq.sysfs_root) / "devices/system/cpu"
    if not cpu_dir.is_dir():
        found.append(ConfigError(file, "cpufreq.sysfs_root", f"no CPU tree at {cpu_dir}"))
    checks = (
        ("channels.dir", config.channels.dir, trust.owners_with_qemu(config.channels.qemu_user)),
        ("state.dir", config.state.dir, trust.daemon_owners()),
    )
    for key, path, owners in checks:
        if not os.path.lexists(path):
            continue  # created at start, with the right owner and mode
        try:
            trust.check_directory(path, owners, key)
        except trust.UntrustedPathError as exc:
            found.append(ConfigError(file, key, _without_key(str(exc), key)))
        except OSError as exc:
            found.append(ConfigError(file, key, f"{path}: {exc.strerror or exc}"))
    return found


def _without_key(message: str, key: str) -> str:
    """trust's one line starts with the key; ConfigError puts it in front already."""
    prefix = key + " "
    return message[len(prefix) :] if message.startswith(prefix) else message
