"""Work that must not grow with the number of VMs (issue #16): looking up one VM's
sockets stats only its own candidates; list_vms walks the channels once."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmpower.hypervisor import domain_xml
from vmpower.hypervisor.domain_xml import scan_channels_dir

# DPDK's vm_power_manager serves channels 0..63 of a VM (CHANNEL_CMDS_MAX_VM_CHANNELS)
MAX_DIR_CHANNELS = 64


@pytest.fixture
def channel_dir(tmp_path: Path) -> Iterator[Path]:
    """300 VMs x 4 bound channel sockets, as QEMU leaves them, plus a FIFO and a file."""
    where = tmp_path / "powermonitor"
    where.mkdir()
    socks = []
    try:
        for vm in range(300):
            for n in range(4):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.bind(str(where / f"vm{vm}.{n}"))
                socks.append(sock)
        os.mkfifo(where / "fifo3")
        (where / "vm7.9").write_text("a regular file, not a socket\n")
        yield where
    finally:
        for sock in socks:
            sock.close()


class Counted:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.stats = 0
        self.listings = 0
        real_stat, real_scandir = os.stat, os.scandir

        def stat(path, *args, **kwargs):  # type: ignore[no-untyped-def]
            self.stats += 1
            return real_stat(path, *args, **kwargs)

        def scandir(path):  # type: ignore[no-untyped-def]
            self.listings += 1
            return real_scandir(path)

        monkeypatch.setattr(domain_xml.os, "stat", stat)
        monkeypatch.setattr(domain_xml.os, "scandir", scandir)


def test_one_vms_sockets_cost_its_own_candidates_only(channel_dir: Path, monkeypatch) -> None:
    """add_vm re-read and stat-ed the whole directory (1200 sockets here, 16000 at
    4000 VMs): now it stats <vm>.0 … <vm>.63 and never lists the directory."""
    counted = Counted(monkeypatch)
    sockets = scan_channels_dir(channel_dir).get("vm7", {})
    assert sockets == {n: str(channel_dir / f"vm7.{n}") for n in range(4)}  # not the file
    assert counted.listings == 0, "the whole directory was read for one VM"
    assert counted.stats <= MAX_DIR_CHANNELS, f"{counted.stats} stat calls for one VM"


def test_many_vms_are_served_by_one_listing_without_stat_calls(
    channel_dir: Path, monkeypatch
) -> None:
    counted = Counted(monkeypatch)
    sockets = scan_channels_dir(channel_dir)
    found = {f"vm{vm}": sockets.get(f"vm{vm}", {}) for vm in range(300)}
    assert all(len(per_vm) == 4 for per_vm in found.values())
    assert sockets.get("vm7", {}) == {n: str(channel_dir / f"vm7.{n}") for n in range(4)}
    assert sockets.get("fifo3", {}) == {} and sockets.get("nosuchvm", {}) == {}
    assert counted.listings == 1
    # the few VMs probed before switching to one listing: at most 8 x 64 stat calls
    assert counted.stats <= 8 * MAX_DIR_CHANNELS


def test_a_name_that_is_no_file_name_finds_nothing(channel_dir: Path) -> None:
    assert scan_channels_dir(channel_dir).get("../powermonitor/vm7", {}) == {}
    assert scan_channels_dir(channel_dir / "missing").get("vm7", {}) == {}
