"""The restore journal is append-only (issue #16): a new original costs O(1) bytes,
whatever the journal holds (a turn's first writes share one append, and syncs:
test_journal_boot.py); a torn last record (a crash inside an append) is ignored,
anything else is corrupt."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vmpower import restore
from vmpower.errors import RestoreError
from vmpower.restore import JOURNAL_NAME, RestoreJournal
from vmpower.sysfs import Sysfs


def make_files(root: Path, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        path = root / f"cpu{i}" / "scaling_governor"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("schedutil\n")
        paths.append(path)
    return paths


def bytes_written() -> int:
    """What this process handed to write(2) and pwrite(2) so far (the kernel's count)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


def count_realpath(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths the journal resolves (os.path.realpath) from now on, as a list."""
    resolved: list[str] = []
    real = os.path.realpath

    def counting(path: str, *args: object, **kwargs: object) -> str:
        resolved.append(str(path))
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(restore.os.path, "realpath", counting)
    return resolved


def test_a_new_original_appends_a_few_bytes_to_the_same_file(tmp_path: Path) -> None:
    """1000 files: each new original grows the same file by its record alone (the file
    was rewritten whole, temp + rename, for each one: 2048 files took 6.3 s)."""
    paths = make_files(tmp_path / "files", 1000)
    journal = RestoreJournal(tmp_path / "state")
    sysfs = Sysfs(tmp_path / "files", journal)
    sysfs.write("cpu0/scaling_governor", "userspace")
    path = tmp_path / "state" / JOURNAL_NAME
    inode = path.stat().st_ino
    written = []
    for i in range(1, 1000):
        before = bytes_written()
        sysfs.write(f"cpu{i}/scaling_governor", "userspace")
        written.append(bytes_written() - before)
    record = len(json.dumps({"path": str(paths[999]), "original": "schedutil"})) + 2
    # the record, the trailer (3 bytes), and the write to the file itself ("userspace")
    assert max(written) <= record + 3 + len("userspace"), (
        f"bytes written per new file grew with the journal: {written[0]} for the 2nd,"
        f" {written[-1]} for the 1000th"
    )
    assert path.stat().st_ino == inode, "the journal was rewritten, not appended to"
    data = json.loads(path.read_text())  # whole JSON after every append
    assert [e["path"] for e in data["entries"]] == [str(p) for p in paths]
    assert len(RestoreJournal(tmp_path / "state").pending()) == 1000


def test_a_torn_last_record_is_ignored_and_a_torn_middle_is_corrupt(tmp_path: Path) -> None:
    paths = make_files(tmp_path / "files", 3)
    state = tmp_path / "state"
    journal = RestoreJournal(state)
    sysfs = Sysfs(tmp_path / "files", journal)
    for i in range(3):
        sysfs.write(f"cpu{i}/scaling_governor", "userspace")
    journal.close()
    path = state / JOURNAL_NAME
    text = path.read_text()
    assert text.endswith("]}\n")
    # a host crash inside the third record's append: half a record, no trailer
    torn = text[: text.rindex(",{")] + ',{"path": "' + str(paths[2])[:5]
    path.write_text(torn)
    assert list(RestoreJournal(state).pending()) == [str(paths[0]), str(paths[1])]
    # the same damage before an intact record is corruption: kept aside, reported
    lines = text.splitlines(keepends=True)
    lines[1] = lines[1][:10] + "\n"
    path.write_text("".join(lines))
    with pytest.raises(RestoreError, match="corrupt"):
        RestoreJournal(state).recover()


def test_restores_append_records_and_compact_when_dead_ones_pile_up(tmp_path: Path) -> None:
    count = restore.COMPACT_MIN_DEAD + 10
    paths = make_files(tmp_path / "files", count)
    state = tmp_path / "state"
    journal = RestoreJournal(state)
    sysfs = Sysfs(tmp_path / "files", journal)
    for i in range(count):
        sysfs.write(f"cpu{i}/scaling_governor", "userspace")
    path = state / JOURNAL_NAME
    inode = path.stat().st_ino
    journal.restore(lambda p: p == str(paths[0]))  # one CPU's release: appended
    assert path.stat().st_ino == inode
    assert str(paths[0]) not in RestoreJournal(state).pending()
    assert paths[0].read_text() == "schedutil\n"
    for p in paths[1 : count // 2 + 20]:
        journal.restore(lambda q, p=p: q == str(p))
    assert path.stat().st_ino != inode  # compacted: dead records outnumbered live ones
    rows = json.loads(path.read_text())["entries"]
    assert len(rows) < count  # the dead records went with the compaction
    live = [str(p) for p in paths[count // 2 + 20 :]]
    assert list(RestoreJournal(state).pending()) == live
    journal.restore()  # exit: everything back, the file gone
    assert not path.exists()
    assert all(p.read_text() == "schedutil\n" for p in paths)


def test_a_directory_is_resolved_once_and_a_link_out_of_the_roots_still_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """First contact journals several files per CPU directory: their directory's links
    are resolved once (realpath is an lstat per component), not once per file."""
    root = tmp_path / "sys"
    policy = root / "policy0"
    policy.mkdir(parents=True)
    outside = tmp_path / "etc"
    outside.mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    journal = RestoreJournal(tmp_path / "state", file_roots=[root])
    resolved = count_realpath(monkeypatch)
    for name in ("scaling_governor", "scaling_setspeed", "scaling_min_freq"):
        journal.remember(str(policy / name), "x")
    assert resolved == [str(policy)]
    for _ in range(2):  # refused, and again from what was kept
        with pytest.raises(RestoreError, match="lies outside"):
            journal.remember(str(root / "escape" / "passwd"), "x")
    assert resolved == [str(policy), str(root / "escape")]
    assert set(journal.pending()) == {str(policy / n) for n in ("scaling_governor",
        "scaling_setspeed", "scaling_min_freq")}  # fmt: skip


def test_directories_resolved_ahead_cost_nothing_at_the_first_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "sys"
    policies = [root / f"policy{n}" for n in range(3)]
    for policy in policies:
        policy.mkdir(parents=True)
    journal = RestoreJournal(tmp_path / "state", file_roots=[root])
    journal.resolve_ahead(f"{policy}/" for policy in policies)  # the daemon's warm-up
    resolved = count_realpath(monkeypatch)
    for policy in policies:
        journal.remember(str(policy / "scaling_governor"), "schedutil")
    assert resolved == []
    assert len(journal.pending()) == 3


def test_a_dot_dot_name_is_refused_without_refusing_its_directory(tmp_path: Path) -> None:
    root = tmp_path / "sys"
    policy = root / "policy0"
    policy.mkdir(parents=True)
    journal = RestoreJournal(tmp_path / "state", file_roots=[root])
    with pytest.raises(RestoreError, match="lies outside"):
        journal.remember(f"{policy}/..", "x")
    journal.remember(str(policy / "scaling_governor"), "schedutil")  # the directory is fine
    assert list(journal.pending()) == [str(policy / "scaling_governor")]
