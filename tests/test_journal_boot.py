"""The restore journal belongs to one boot of the host: a reboot resets every setting it
records, so an earlier boot's journal is set aside unrestored, and its records need only
survive the daemon's death (no sync per append) where the boot is known."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from vmpower.cpufreq import open_cpufreq
from vmpower.cpufreq.simulate import build_tree, snapshot
from vmpower.errors import RestoreError
from vmpower.restore import BOOT_ID_PATH, JOURNAL_NAME, RestoreJournal, read_boot_id
from vmpower.sysfs import Sysfs

GOVERNOR = "devices/system/cpu/cpufreq/policy{}/scaling_governor"


def boot(boot_id: str | None):  # type: ignore[no-untyped-def]
    return lambda: boot_id


def crashed_run(root: Path, state: Path, boot_id: str, cpus: range) -> dict[str, str]:
    """A run in boot ``boot_id`` that took ``cpus`` and died without restoring them;
    returns their files as it left them."""
    journal = RestoreJournal(state, boot_id=boot(boot_id))
    cpufreq = open_cpufreq(Sysfs(root, journal))
    for cpu in cpus:
        cpufreq.set_khz(cpu, min(cpufreq.table_khz(cpu)))
    cpufreq.close()
    journal.close()  # the file as a killed daemon leaves it: no compaction, no restore
    return snapshot(root)


def test_an_earlier_boots_journal_is_kept_aside_and_nothing_restored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, state = tmp_path / "sys", tmp_path / "state"
    build_tree(root, "acpi-cpufreq", 4)
    crashed_run(root, state, "boot-a", range(2))
    text = (state / JOURNAL_NAME).read_text()
    assert json.loads(text)["boot_id"] == "boot-a"
    # The host rebooted; this boot's own set-up chose the performance governor.
    for cpu in range(4):
        (root / GOVERNOR.format(cpu)).write_text("performance\n")
    this_boot = snapshot(root)

    with caplog.at_level(logging.WARNING, logger="vmpower.restore"):
        journal = RestoreJournal(state, boot_id=boot("boot-b"))
        report = journal.recover()
    assert report.restored == [] and report.ok
    assert snapshot(root) == this_boot  # nothing of the earlier boot written back
    kept = state / f"{JOURNAL_NAME}.boot-boot-a"
    assert report.earlier_boot == str(kept)
    assert kept.read_text() == text  # not dropped: the operator can read it
    assert not (state / JOURNAL_NAME).exists()
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "earlier boot (boot-a; this one is boot-b)" in warning
    assert "its 4 settings are not restored" in warning  # governor and setspeed of 2 CPUs

    # This boot's journal works as ever: its own originals come back.
    cpufreq = open_cpufreq(Sysfs(root, journal))
    cpufreq.set_khz(3, min(cpufreq.table_khz(3)))
    cpufreq.close()
    journal.close()
    assert RestoreJournal(state, boot_id=boot("boot-b")).recover().ok
    assert snapshot(root) == this_boot


def test_the_same_boots_journal_is_recovered(tmp_path: Path) -> None:
    root, state = tmp_path / "sys", tmp_path / "state"
    build_tree(root, "acpi-cpufreq", 4)
    before = snapshot(root)
    crashed_run(root, state, "boot-a", range(4))
    assert snapshot(root) != before
    report = RestoreJournal(state, boot_id=boot("boot-a")).recover()
    assert report.ok and len(report.restored) == 8 and report.earlier_boot is None
    assert snapshot(root) == before


def test_a_damaged_journal_of_an_earlier_boot_is_kept_aside_not_called_corrupt(
    tmp_path: Path,
) -> None:
    """Appends are not synced: a host crash may leave anything past the header. Of an
    earlier boot that is no one's concern; of this boot it is corruption, as before."""
    root, state = tmp_path / "sys", tmp_path / "state"
    build_tree(root, "acpi-cpufreq", 4)
    crashed_run(root, state, "boot-a", range(4))
    path = state / JOURNAL_NAME
    lines = path.read_text().splitlines(keepends=True)
    damaged = lines[0] + lines[1][:12] + "\0\0\0\n" + "".join(lines[2:])
    path.write_text(damaged)
    report = RestoreJournal(state, boot_id=boot("boot-b")).recover()
    assert report.restored == [] and report.earlier_boot is not None
    assert Path(report.earlier_boot).read_text() == damaged

    path.write_text(damaged)
    path.chmod(0o600)
    with pytest.raises(RestoreError, match="corrupt"):
        RestoreJournal(state, boot_id=boot("boot-a")).recover()


def test_a_journal_written_before_boot_ids_is_recovered_as_this_boots(tmp_path: Path) -> None:
    """A version 3 file names no boot when an older vmpowerd wrote it: it cannot be told
    apart, so it is restored, as that vmpowerd would have."""
    root, state = tmp_path / "sys", tmp_path / "state"
    build_tree(root, "acpi-cpufreq", 2)
    before = snapshot(root)
    crashed_run(root, state, "boot-a", range(2))
    path = state / JOURNAL_NAME
    text = path.read_text()
    version_3 = text.replace('"version": 4, "boot_id": "boot-a"', '"version": 3', 1)
    assert version_3 != text and "boot_id" not in json.loads(version_3)
    path.write_text(version_3[: version_3.rindex(",{")] + ',{"pa')  # torn, as it may be
    report = RestoreJournal(state, boot_id=boot("boot-b")).recover()
    assert report.ok and len(report.restored) == 3 and report.earlier_boot is None
    assert snapshot(root) != before  # the torn record's file: written by this test only
    path.write_text(version_3)
    path.chmod(0o600)
    report = RestoreJournal(state, boot_id=boot("boot-b")).recover()
    assert report.ok and snapshot(root) == before


def test_an_earlier_boots_msrs_are_restored_and_their_records_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reboot by kexec does not reset MSRs (the PMU event selects BRANCH_RATIO
    programs): of an earlier boot's journal, its MSRs are still put back."""
    state, msr = tmp_path / "state", tmp_path / "msr"
    msr.write_bytes(bytes(16))
    journal = RestoreJournal(state, boot_id=boot("boot-a"))
    journal.remember("/sys/a", "1")  # creates the file
    syncs = SyncCounter(monkeypatch)
    journal.remember("/sys/b", "2")
    assert syncs.calls == 0
    journal.remember_msr(str(msr), 8, bytes(range(1, 9)))
    assert syncs.calls == 1  # the MSR's record is on disk whatever happens to the host
    journal.close()
    monkeypatch.undo()
    msr.write_bytes(bytes(16))  # programmed by the crashed run (here: zeroed)
    report = RestoreJournal(state, boot_id=boot("boot-b")).recover()
    assert report.restored == [f"{msr}@0x8"] and report.earlier_boot is not None
    assert msr.read_bytes() == bytes(8) + bytes(range(1, 9))
    assert not (state / JOURNAL_NAME).exists()  # nothing left to restore


def test_a_session_journal_of_an_earlier_boot_is_removed_not_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A telemetry session's directory is removed once finished: its journal of an
    earlier boot goes with it, and the warning says so (not "kept as")."""
    state = tmp_path / "session"
    journal = RestoreJournal(state, boot_id=boot("boot-a"))
    journal.remember("/sys/a", "1")
    journal.close()
    with caplog.at_level(logging.WARNING, logger="vmpower.restore"):
        report = RestoreJournal(state, boot_id=boot("boot-b"), keep_earlier_boot=False).recover()
    assert report.restored == [] and report.earlier_boot is None
    assert list(state.iterdir()) == []
    assert caplog.records[-1].getMessage().endswith("when it booted; removed")


class SyncCounter:
    """Counts fsync and fdatasync calls while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        for name in ("fsync", "fdatasync"):
            monkeypatch.setattr(os, name, self._counted(getattr(os, name)))

    def _counted(self, real):  # type: ignore[no-untyped-def]
        def counted(fd: int) -> None:
            self.calls += 1
            real(fd)

        return counted


@pytest.mark.parametrize("boot_id", ["boot-a", None], ids=["boot known", "boot unknown"])
def test_first_contact_syncs_only_where_the_boot_is_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, boot_id: str | None
) -> None:
    """Turns of 8 CPUs written for the first time: no sync at all once the file exists
    where the boot is known; one sync a turn where it is not (the records must then
    survive a host crash, since a later boot would restore them)."""
    root, state = tmp_path / "sys", tmp_path / "state"
    build_tree(root, "acpi-cpufreq", 32)
    before = snapshot(root)
    journal = RestoreJournal(state, boot_id=boot(boot_id))
    cpufreq = open_cpufreq(Sysfs(root, journal))
    syncs = SyncCounter(monkeypatch)

    def turn(cpus: range) -> int:
        start = syncs.calls
        journal.begin_turn([cpufreq.policy_path_prefix(c) for c in cpus])
        for cpu in cpus:
            cpufreq.set_khz(cpu, min(cpufreq.table_khz(cpu)))
        journal.end_turn()
        return syncs.calls - start

    first = turn(range(8))  # creates the file: a compaction (file and directory synced)
    later = [turn(range(n, n + 8)) for n in (8, 16, 24)]
    assert later == ([0, 0, 0] if boot_id else [1, 1, 1])
    assert first <= 3
    assert len(journal.pending()) == 64
    cpufreq.close()
    journal.close()
    assert RestoreJournal(state, boot_id=boot(boot_id)).recover().ok  # as after a crash
    assert snapshot(root) == before


def test_the_boot_id_is_the_kernels(tmp_path: Path) -> None:
    kernel = Path(BOOT_ID_PATH).read_text().strip()
    assert read_boot_id() == kernel and len(kernel) == 36  # a UUID, as random.c gives it
    assert read_boot_id(str(tmp_path / "none")) is None
    (tmp_path / "odd").write_text("../../etc\n")
    assert read_boot_id(str(tmp_path / "odd")) is None  # never a path in a file name
    journal = RestoreJournal(tmp_path / "state")
    journal.remember("/sys/a", "1")
    journal.close()
    assert json.loads((tmp_path / "state" / JOURNAL_NAME).read_text())["boot_id"] == kernel
