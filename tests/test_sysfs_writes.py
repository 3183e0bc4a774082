"""How Sysfs writes an attribute: whole values, truncated only where the file is a file.

On sysfs (kernfs) one write(2) at offset 0 is the whole new value, and a truncate is a
syscall for nothing; a simulated tree is regular files, where a shorter value must cut
what a longer one left. Sysfs tells them apart by the device of the mount.
"""

from __future__ import annotations

import os
from pathlib import Path

from vmpower.sysfs import Sysfs, sysfs_devices


def _mountinfo(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "mountinfo"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_the_sysfs_mounts_are_found_by_their_filesystem_type(tmp_path: Path) -> None:
    sysfs_dir = tmp_path / "sys"
    sysfs_dir.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    info = _mountinfo(
        tmp_path,
        f"22 1 0:21 / {sysfs_dir} rw,nosuid shared:7 - sysfs sysfs rw",
        f"23 1 0:22 / {other} rw shared:8 - tmpfs tmpfs rw",
        "garbage without a separator",
        "24 1 0:23 / /no/such/mount rw - sysfs sysfs rw",  # gone since: skipped
    )
    assert sysfs_devices(info) == frozenset({os.stat(sysfs_dir).st_dev})
    assert sysfs_devices(str(tmp_path / "missing")) == frozenset()


def test_a_shorter_value_replaces_a_longer_one_in_a_simulated_tree(tmp_path: Path) -> None:
    attribute = tmp_path / "scaling_setspeed"
    attribute.write_text("<unsupported>\n")
    sysfs = Sysfs(tmp_path)
    for value in ("2400000", "800000", "1"):
        sysfs.write("scaling_setspeed", value)
        assert attribute.read_text() == value
    sysfs.close()


def test_this_hosts_sys_is_recognised_when_it_is_sysfs() -> None:
    with open("/proc/self/mountinfo") as f:
        mounted = any(
            line.split()[4] == "/sys" and " - sysfs " in line for line in f.read().splitlines()
        )
    if mounted:
        assert os.stat("/sys").st_dev in sysfs_devices()
    else:
        assert os.stat("/sys").st_dev not in sysfs_devices()
