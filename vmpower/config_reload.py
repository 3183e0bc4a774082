"""What a SIGHUP reload may change: every configuration key's rule, and what changed.

Each key of the configuration is in exactly one of RELOAD_LIVE (the daemon hands the
new value to the part that uses it) and RELOAD_RESTART (the daemon logs it by name
as needing a restart); tests/test_reload.py walks every key, so a new key cannot be
forgotten. ``changed_keys`` and ``merge`` are what the reload compares and keeps.
"""

from __future__ import annotations

import dataclasses

from vmpower.config import Config

# Every configuration key is in exactly one of these (tests/test_reload.py walks them).
RELOAD_LIVE = frozenset(
    {
        "libvirt.map_refresh_s",
        "channels.fifo_cpus",
        "channels.rate_per_s",
        "channels.burst",
        "channels.send_queue_max",
        "cpufreq.reserved_cpus",
        "policies.period_s",
        "policies.branch_period_s",
        "policies.branch_threshold",
        "policies.timezone",
        "telemetry.proc_root",
        "telemetry.powercap_root",
        "telemetry.access_dir",
        "telemetry.shm_dir",
        "telemetry.start_timeout_s",
        "telemetry.max_sessions",
        "log.level",
        "log.summary_interval_s",
    }
)
RELOAD_RESTART = frozenset(
    {
        "libvirt.uri",  # the connection, its event callbacks, the registry
        "libvirt.reconnect_min_s",
        "libvirt.reconnect_max_s",
        "libvirt.track_all",  # which VMs the registry holds: read at connect
        "channels.dir",  # checked for trust at start; the channel paths come from it
        "channels.qemu_user",  # part of that trust check
        "cpufreq.sysfs_root",  # the files, the journal's allowed roots
        "state.dir",  # the journal and the instance lock
        "control.socket",  # bound at start (a second socket would need the lock's care)
        "control.mode",
        "control.group",
        "policies.msr_root",  # the journal's allowed MSR root
        "metrics.listen",  # the endpoint's socket is bound at start
        "metrics.energy_period_s",  # the accounting timer is set up at start
    }
)


def changed_keys(old: Config, new: Config) -> list[str]:
    """Every "section.key" whose value differs, in the configuration's order."""
    keys = []
    for section in dataclasses.fields(old):
        a, b = getattr(old, section.name), getattr(new, section.name)
        for key in dataclasses.fields(a):
            if getattr(a, key.name) != getattr(b, key.name):
                keys.append(f"{section.name}.{key.name}")
    return keys


def value(config: Config, dotted: str) -> object:
    section, key = dotted.split(".", 1)
    return getattr(getattr(config, section), key)


def merge(old: Config, new: Config, live: list[str]) -> Config:
    """``old`` with the ``live`` keys taken from ``new``."""
    sections = {}
    for section in dataclasses.fields(old):
        values = {
            key.split(".", 1)[1]: value(new, key)
            for key in live
            if key.startswith(f"{section.name}.")
        }
        sections[section.name] = dataclasses.replace(getattr(old, section.name), **values)
    return dataclasses.replace(old, **sections)
