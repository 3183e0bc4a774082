"""The channels directory's index (issue #16: add_vm probed its VM's 64 candidate sockets
on the monitor loop, 0.6 ms of its 2.4 under guest traffic): real inotify on a real
directory of bound AF_UNIX sockets under tmp_path. The index must give what the probe
gives, for every change made to the directory before the look-up, and say "I cannot
tell" (None) rather than guess when it lost track.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmpower.hypervisor import channels_index
from vmpower.hypervisor.channels_index import ChannelsIndex, list_channels
from vmpower.hypervisor.domain_xml import ChannelsDir

VMS = 50


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Directory:
    """A channels directory: ``VMS`` VMs x 2 bound sockets, plus what a test adds."""

    def __init__(self, where: Path) -> None:
        self.where = where
        where.mkdir()
        self.socks: dict[str, socket.socket] = {}
        for vm in range(VMS):
            for n in range(2):
                self.bind(f"vm{vm}.{n}")

    def bind(self, name: str) -> str:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.where / name))
        self.socks[name] = sock
        return str(self.where / name)

    def remove(self, name: str) -> None:
        os.unlink(self.where / name)
        self.socks.pop(name).close()

    def probe(self, vm: str) -> dict[int, str]:
        """What add_vm looked up before the index: the reference."""
        return ChannelsDir(self.where)._probe(vm)

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()


@pytest.fixture
def directory(tmp_path: Path) -> Iterator[Directory]:
    made = Directory(tmp_path / "ch")
    try:
        yield made
    finally:
        made.close()


def built(directory: Directory, clock: Clock | None = None) -> ChannelsIndex:
    index = ChannelsIndex(directory.where, clock or Clock())
    epoch = index.begin_listing()
    assert epoch is not None
    index.listed(epoch, list_channels(directory.where))
    return index


def test_a_whole_index_gives_what_the_probe_gives_and_stats_only_the_vms_own(
    directory: Directory, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = built(directory)
    try:
        stats: list[str] = []
        real_stat = os.stat

        def counted(path, *args, **kwargs):  # type: ignore[no-untyped-def]
            stats.append(os.fspath(path))
            return real_stat(path, *args, **kwargs)

        monkeypatch.setattr(channels_index.os, "stat", counted)
        monkeypatch.setattr(channels_index.os, "scandir", None)  # no listing at look-up
        found = index.lookup("vm7")
        own = sorted(os.path.basename(path) for path in (found or {}).values())
        assert sorted(os.path.basename(path) for path in stats) == own, "stats beyond its own"
        assert found == {n: str(directory.where / f"vm7.{n}") for n in range(2)}
        assert found == directory.probe("vm7")
        assert index.lookup("nosuchvm") == {}
    finally:
        index.close()


def test_every_change_before_a_look_up_is_seen_by_it(directory: Directory) -> None:
    index = built(directory)
    try:
        added = directory.bind("vm3.5")
        directory.remove("vm4.1")
        os.rename(directory.where / "vm5.0", directory.where / "vm6.9")  # out and in
        (directory.where / "vm8.3").write_text("a regular file, not a socket\n")
        (directory.where / "vm8.4").mkdir()
        directory.bind("vm8.07")  # not how the probe writes index 7
        directory.bind("vm8.64")  # past DPDK's 64 channels
        directory.bind("vm.with.dots.2")
        os.symlink(added, directory.where / "vm9.6")  # the probe follows it: so does this
        where = directory.where

        def paths(vm: str, *indexes: int) -> dict[int, str]:
            return {n: str(where / f"{vm}.{n}") for n in indexes}

        expected = {
            "vm3": paths("vm3", 0, 1, 5),
            "vm4": paths("vm4", 0),
            "vm5": paths("vm5", 1),
            "vm6": paths("vm6", 0, 1, 9),
            "vm8": paths("vm8", 0, 1),
            "vm.with.dots": paths("vm.with.dots", 2),
            "vm9": paths("vm9", 0, 1, 6),
        }
        for vm, sockets in expected.items():
            assert directory.probe(vm) == sockets, vm  # the reference agrees
            assert index.lookup(vm) == sockets, vm
    finally:
        index.close()


def test_changes_while_the_listing_is_made_are_replayed_on_it(directory: Directory) -> None:
    index = ChannelsIndex(directory.where, Clock())
    try:
        epoch = index.begin_listing()
        assert epoch is not None
        listing = list_channels(directory.where)  # the worker's listing ...
        directory.remove("vm1.0")  # ... and changes it does not show
        directory.bind("vm1.3")
        directory.bind("vm2.4")
        directory.remove("vm2.4")
        assert index.lookup("vm1") is None, "answered before its listing was back"
        directory.bind("vm1.6")  # between that look-up and the listing's return
        index.listed(epoch, listing)
        for vm in ("vm1", "vm2"):
            assert index.lookup(vm) == directory.probe(vm), vm
        assert sorted(index.lookup("vm1") or {}) == [1, 3, 6]
    finally:
        index.close()


def test_lost_events_drop_the_index_until_a_new_listing(
    directory: Directory, tmp_path: Path
) -> None:
    clock = Clock()
    index = built(directory, clock)
    try:
        queued_max = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
        scratch = directory.where / "scratch"
        for _ in range(queued_max // 2 + 1):  # a create and a delete each: past the queue
            scratch.touch()
            scratch.unlink()
        directory.bind("vm1.2")
        assert index.lookup("vm1") is None  # it cannot tell: the caller probes
        assert index.begin_listing() is None, "a listing asked for at every add_vm"
        clock.now += channels_index.RELIST_MIN_S
        epoch = index.begin_listing()
        assert epoch is not None
        index.listed(epoch, list_channels(directory.where))
        assert index.lookup("vm1") == directory.probe("vm1")
        assert 2 in index.lookup("vm1")  # type: ignore[operator]
    finally:
        index.close()


def test_a_directory_deleted_and_made_again_is_watched_anew(directory: Directory) -> None:
    clock = Clock()
    index = built(directory, clock)
    try:
        for name in list(directory.socks):
            directory.remove(name)
        directory.where.rmdir()
        assert index.lookup("vm1") is None
        directory.where.mkdir()
        directory.bind("vm1.4")
        clock.now += channels_index.RELIST_MIN_S
        epoch = index.begin_listing()
        assert epoch is not None
        index.listed(epoch, list_channels(directory.where))
        assert index.lookup("vm1") == {4: str(directory.where / "vm1.4")}
    finally:
        index.close()


def test_no_directory_yet_means_probe_and_no_listing(tmp_path: Path) -> None:
    clock = Clock()
    index = ChannelsIndex(tmp_path / "missing", clock)
    try:
        assert index.begin_listing() is None
        assert index.lookup("vm1") is None
        (tmp_path / "missing").mkdir()
        clock.now += channels_index.RELIST_MIN_S
        epoch = index.begin_listing()
        assert epoch is not None
        index.listed(epoch, list_channels(tmp_path / "missing"))
        assert index.lookup("vm1") == {}
    finally:
        index.close()


def test_a_failed_listing_is_not_retried_at_once(directory: Directory) -> None:
    clock = Clock()
    index = ChannelsIndex(directory.where, clock)
    try:
        epoch = index.begin_listing()
        assert epoch is not None
        index.listed(epoch, None)
        assert index.lookup("vm1") is None
        assert index.begin_listing() is None
        clock.now += channels_index.RELIST_MIN_S
        assert index.begin_listing() is not None
    finally:
        index.close()


def test_a_burst_larger_than_one_read_drops_the_index_for_a_new_listing(
    directory: Directory,
) -> None:
    """More changes queued than one look-up parses (VMs starting together): the look-up
    does not parse them on the loop (the probe is cheaper); the index is listed again."""
    clock = Clock()
    index = built(directory, clock)
    try:
        for vm in range(VMS, VMS + 300):  # ~600 events of 32 bytes: past one 16 KiB read
            for n in range(2):
                directory.bind(f"vm{vm}.{n}")
        assert index.lookup("vm1") is None
        assert index.lookup("vm1") is None  # until it is listed again
        assert index.begin_listing() is None  # not sooner than RELIST_MIN_S
        clock.now += channels_index.RELIST_MIN_S
        epoch = index.begin_listing()
        assert epoch is not None
        index.listed(epoch, list_channels(directory.where))
        last = f"vm{VMS + 299}"
        assert (
            index.lookup(last)
            == directory.probe(last)
            == {n: str(directory.where / f"{last}.{n}") for n in range(2)}
        )
    finally:
        index.close()


def test_closing_gives_back_the_inotify_descriptor(directory: Directory) -> None:
    before = len(os.listdir("/proc/self/fd"))
    index = built(directory)
    assert len(os.listdir("/proc/self/fd")) == before + 1
    index.close()
    assert len(os.listdir("/proc/self/fd")) == before
    assert index.lookup("vm1") is None


def test_the_first_watch_runs_no_program(
    directory: Directory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first add_vm loads the inotify binding on the loop: ctypes.util.find_library
    ran ldconfig as a subprocess there, 13 ms (an 8.8 ms add_vm step in `make bench`,
    past the 5 ms a command may hold the loop). libc's symbols are the process's own."""
    import subprocess

    from vmpower import inotify

    spawned: list[object] = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):  # type: ignore[no-untyped-def]
        spawned.append(args)
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(inotify, "_libc", None)  # as in a daemon that never loaded it
    index = built(directory)
    try:
        assert spawned == []
        assert index.lookup("vm1") == directory.probe("vm1")
    finally:
        index.close()
