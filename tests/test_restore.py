"""The restore journal: durable originals, ordered restore, isolation of failures,
corrupt journals kept aside, and recovery after a SIGKILL in the middle of writes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmpower.cpufreq.simulate import DRIVERS, KernelSysfs, build_tree, snapshot
from vmpower.errors import RestoreError, SysfsError
from vmpower.restore import JOURNAL_NAME, RestoreJournal, select_cpu
from vmpower.sysfs import Sysfs

CPU = "devices/system/cpu"
POLICY = f"{CPU}/cpufreq/policy"


def make_files(tmp_path: Path, values: dict[str, str]) -> dict[str, Path]:
    paths = {}
    for name, value in values.items():
        path = tmp_path / "files" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")  # sysfs attributes end with a newline
        paths[name] = path
    return paths


def test_remember_is_in_the_file_before_it_returns(tmp_path):
    journal = RestoreJournal(tmp_path / "state")
    journal.remember("/sys/a", "1")
    # a second process (a fresh object) sees it at once: the daemon's death keeps it
    assert RestoreJournal(tmp_path / "state").pending() == {"/sys/a": "1"}
    data = json.loads((tmp_path / "state" / JOURNAL_NAME).read_text())
    assert data["entries"] == [{"path": "/sys/a", "original": "1"}]
    assert [p.name for p in (tmp_path / "state").iterdir()] == [JOURNAL_NAME]  # no temp left


def test_the_first_original_wins(tmp_path):
    journal = RestoreJournal(tmp_path / "state")
    assert not journal.knows("/sys/a")
    journal.remember("/sys/a", "original")
    journal.remember("/sys/a", "changed-by-us")
    assert journal.knows("/sys/a")
    assert journal.pending() == {"/sys/a": "original"}


def test_relative_paths_are_refused(tmp_path):
    with pytest.raises(RestoreError, match="absolute"):
        RestoreJournal(tmp_path / "state").remember("sys/a", "1")


def test_an_unusable_state_directory_is_a_clear_error(tmp_path):
    (tmp_path / "state").write_text("a file, not a directory")
    with pytest.raises(RestoreError, match="state directory"):
        RestoreJournal(tmp_path / "state")


def test_a_journal_that_cannot_be_written_refuses_the_write(tmp_path):
    """remember() fails → Sysfs.write raises before touching the file."""
    paths = make_files(tmp_path, {"f": "orig"})
    state = tmp_path / "state"
    journal = RestoreJournal(state)
    os.rmdir(state)
    (tmp_path / "state").write_text("now a file")  # the directory vanished
    sysfs = Sysfs(tmp_path / "files", journal)
    with pytest.raises(RestoreError, match="cannot write restore journal"):
        sysfs.write("f", "new")
    assert paths["f"].read_text() == "orig\n"
    assert not journal.knows(str(paths["f"]))


def test_restore_puts_back_in_reverse_order_and_empties_the_journal(tmp_path):
    paths = make_files(tmp_path, {"gov": "ondemand", "speed": "<unsupported>", "x": "7"})
    order: list[str] = []

    def writer(path: str, value: str) -> None:
        order.append(Path(path).name)
        Path(path).write_text(value + "\n")

    journal = RestoreJournal(tmp_path / "state", writer=writer)
    sysfs = Sysfs(tmp_path / "files", journal)
    sysfs.write("gov", "userspace")
    sysfs.write("speed", "2000000")
    sysfs.write("x", "8")
    sysfs.write("speed", "1000000")  # a later write does not move it in the order
    report = journal.restore()
    assert order == ["x", "speed", "gov"]
    assert report.ok and sorted(report.restored) == sorted(str(p) for p in paths.values())
    assert {n: p.read_text() for n, p in paths.items()} == {
        "gov": "ondemand\n",
        "speed": "<unsupported>\n",
        "x": "7\n",
    }
    assert journal.pending() == {}
    assert not (tmp_path / "state" / JOURNAL_NAME).exists()
    assert journal.restore().restored == []  # nothing left: a no-op


def test_restore_selects_one_cpu(sim_sysfs, tmp_path):
    root = sim_sysfs("intel_pstate", cpus=3)
    journal = RestoreJournal(tmp_path / "state")
    sysfs = Sysfs(root, journal)
    for cpu in (0, 1, 2):
        sysfs.write(f"{CPU}/cpu{cpu}/cpufreq/scaling_max_freq", 2_000_000)
    report = journal.restore(select_cpu(root, 1))
    assert [Path(p).parts[-3] for p in report.restored] == ["cpu1"]
    assert (
        root / f"{POLICY}1/scaling_max_freq"
    ).read_text() == "4700000\n"  # as it was, byte for byte
    assert (root / f"{POLICY}0/scaling_max_freq").read_text() == "2000000"  # as vmpower wrote it
    assert len(journal.pending()) == 2
    # cpu1 does not select cpu10/cpu11: the prefix ends with a separator
    assert not select_cpu(root, 1)(str(root / f"{CPU}/cpu11/cpufreq/scaling_max_freq"))


def test_ordering_refusals_are_retried_in_a_second_pass(sim_sysfs, tmp_path):
    """Originally pinned at 2 GHz; vmpower raised max first (to 3 GHz), then went down
    to 1 GHz. Reverse order restores min first: 2 GHz > the current max of 1 GHz is
    refused by the kernel, and only succeeds once max is back."""
    root = sim_sysfs("intel_pstate", cpus=1)
    for name in ("scaling_min_freq", "scaling_max_freq"):
        (root / f"{POLICY}0/{name}").write_text("2000000\n")
    kernel = KernelSysfs(root)
    journal = RestoreJournal(tmp_path / "state", writer=kernel.write_path)
    sysfs = KernelSysfs(root, journal)
    sysfs.write(f"{CPU}/cpu0/cpufreq/scaling_max_freq", 3_000_000)
    sysfs.write(f"{CPU}/cpu0/cpufreq/scaling_min_freq", 3_000_000)
    sysfs.write(f"{CPU}/cpu0/cpufreq/scaling_min_freq", 1_000_000)
    sysfs.write(f"{CPU}/cpu0/cpufreq/scaling_max_freq", 1_000_000)
    report = journal.restore()
    assert report.failed == []
    assert [
        (root / f"{POLICY}0/{n}").read_text().strip()
        for n in ("scaling_min_freq", "scaling_max_freq")
    ] == ["2000000", "2000000"]


def test_one_failure_does_not_stop_the_others_and_stays_for_later(tmp_path, caplog):
    paths = make_files(tmp_path, {"a": "1", "b": "2", "c": "3"})
    journal = RestoreJournal(tmp_path / "state")
    sysfs = Sysfs(tmp_path / "files", journal)
    for name in ("a", "b", "c"):
        sysfs.write(name, "9")
    paths["b"].unlink()
    paths["b"].mkdir()  # "b" cannot be written now (like an offline CPU's file)
    report = journal.restore()
    assert sorted(Path(p).name for p in report.restored) == ["a", "c"]
    assert report.failed == [str(paths["b"])]
    assert "Is a directory" in report.reasons[str(paths["b"])]
    assert "cannot restore" in caplog.text
    assert paths["a"].read_text() == "1\n" and paths["c"].read_text() == "3\n"
    # the failure is kept, durably, for a later attempt
    assert RestoreJournal(tmp_path / "state").pending() == {str(paths["b"]): "2"}
    paths["b"].rmdir()
    paths["b"].write_text("9")
    later = journal.restore()
    assert later.restored == [str(paths["b"])] and paths["b"].read_text() == "2\n"
    assert not (tmp_path / "state" / JOURNAL_NAME).exists()


def test_a_refused_setspeed_placeholder_counts_as_restored(tmp_path):
    paths = make_files(tmp_path, {"scaling_setspeed": "<unsupported>"})

    def kernel_like(path: str, value: str) -> None:
        if not value.isdigit():  # the userspace governor parses kHz only: EINVAL
            raise OSError(22, "Invalid argument")
        Path(path).write_text(value)

    journal = RestoreJournal(tmp_path / "state", writer=kernel_like)
    Sysfs(tmp_path / "files", journal).write("scaling_setspeed", "1000000")
    report = journal.restore()
    assert report.ok and report.restored == [str(paths["scaling_setspeed"])]
    assert journal.pending() == {}


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"format": "something-else", "version": 1, "entries": []}),
        json.dumps({"format": "vmpower-restore-journal", "version": 99, "entries": []}),
        json.dumps(
            {
                "format": "vmpower-restore-journal",
                "version": 1,
                "entries": [{"path": "relative", "original": "1"}],
            }
        ),
        json.dumps(
            {
                "format": "vmpower-restore-journal",
                "version": 1,
                "entries": [{"path": "/sys/a", "original": 1}],
            }
        ),
    ],
)
def test_a_corrupt_journal_is_kept_aside_and_reported(tmp_path, content):
    state = tmp_path / "state"
    state.mkdir()
    (state / JOURNAL_NAME).write_text(content)
    (state / JOURNAL_NAME).chmod(0o600)  # a trusted file, only its content is wrong
    journal = RestoreJournal(state)
    with pytest.raises(RestoreError, match=r"corrupt.*kept as.*check them by hand") as exc:
        journal.recover()
    kept = [p for p in state.iterdir() if p.name.startswith(f"{JOURNAL_NAME}.corrupt-")]
    assert len(kept) == 1 and kept[0].read_text() == content  # not silently dropped
    assert str(kept[0]) in str(exc.value)
    # the journal is usable afterwards, and a second recover has nothing to do
    assert journal.recover().restored == []
    journal.remember("/sys/b", "2")
    assert RestoreJournal(state).pending() == {"/sys/b": "2"}


def test_a_new_run_keeps_the_crashed_runs_originals(tmp_path):
    """A file the crashed run changed is recorded with the *real* original, even if
    the new run writes it again before recovering."""
    paths = make_files(tmp_path, {"f": "orig"})
    Sysfs(tmp_path / "files", RestoreJournal(tmp_path / "state")).write("f", "crashed-run")
    journal = RestoreJournal(tmp_path / "state")
    Sysfs(tmp_path / "files", journal).write("f", "new-run")
    assert journal.pending() == {str(paths["f"]): "orig"}
    journal.recover()
    assert paths["f"].read_text() == "orig\n"


@settings(max_examples=40, deadline=None)
@given(
    writes=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.text("0123456789xyz", max_size=6)),
        max_size=20,
    )
)
def test_any_series_of_writes_is_undone(writes):
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_files(Path(tmp), {n: f"orig-{n}" for n in "abcd"})
        journal = RestoreJournal(Path(tmp) / "state")
        sysfs = Sysfs(Path(tmp) / "files", journal)
        for name, value in writes:
            sysfs.write(name, value)
        assert len(journal.pending()) == len({n for n, _ in writes})
        assert RestoreJournal(Path(tmp) / "state").recover().ok
        assert {n: p.read_text() for n, p in paths.items()} == {n: f"orig-{n}\n" for n in "abcd"}


# -- crash recovery ------------------------------------------------------------------

CHILD = r"""
import sys
from vmpower.cpufreq import open_cpufreq
from vmpower.errors import CpufreqError
from vmpower.restore import RestoreJournal
from vmpower.sysfs import Sysfs

root, state, quiet = sys.argv[1], sys.argv[2], sys.argv[3] == "quiet"
cf = open_cpufreq(Sysfs(root, RestoreJournal(state)))
epp = ["power", "balance_power", "performance"]
print("ready", flush=True)
n = 0
while True:  # a series of writes that never ends: only SIGKILL stops it
    for cpu in cf.cpus():
        n += 1
        if n % 7 == 0:
            cf.set_turbo(cpu, True)
        elif n % 5 == 0:
            try:
                cf.set_epp(cpu, epp[n % 3])
            except CpufreqError:
                pass  # acpi-cpufreq, amd-pstate, cppc: no EPP
        else:
            # walk the table (its turbo range only once turbo is switched on)
            table = cf.table_khz(cpu)
            if not cf.turbo_enabled(cpu):
                table = tuple(f for f in table if f <= cf.nominal_khz(cpu))
            cf.set_khz(cpu, table[(n * 3) % len(table)])
        if not quiet:
            print(n, flush=True)
"""


def run_child(root: Path, state: Path, quiet: bool) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), str(state), "quiet" if quiet else "loud"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill(child: subprocess.Popen[str]) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL, child.stderr.read() if child.stderr else ""
    if child.stdout:
        child.stdout.close()
    if child.stderr:
        child.stderr.close()


@pytest.mark.parametrize("driver", DRIVERS)
def test_recover_after_sigkill_in_the_middle_of_writes(tmp_path, driver):
    root = tmp_path / "sys"
    build_tree(root, driver, 3, turbo=True)
    # one CPU's turbo is switched off system-wide: the child will switch it on
    if driver == "intel_pstate":
        (root / f"{CPU}/intel_pstate/no_turbo").write_text("1\n")
    elif driver != "cppc_cpufreq":
        (root / f"{CPU}/cpufreq/boost").write_text("0\n")
    before = snapshot(root)
    child = run_child(root, tmp_path / "state", quiet=False)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready", child.stderr.read()  # type: ignore[union-attr]
    for _ in range(40):  # well into the series: every kind of write has happened
        line = child.stdout.readline()
        assert line, child.stderr.read()  # type: ignore[union-attr]
    kill(child)
    assert snapshot(root) != before  # the child did change things
    report = RestoreJournal(tmp_path / "state").recover()  # a fresh start
    assert report.ok and report.restored
    assert snapshot(root) == before  # byte for byte
    assert not (tmp_path / "state" / JOURNAL_NAME).exists()


@pytest.mark.parametrize("driver", ["acpi-cpufreq", "intel_pstate"])
def test_recover_after_sigkill_at_arbitrary_points(tmp_path, driver):
    """Killed at random moments (inside a journal update, between the two limit
    writes, ...): whatever the moment, a fresh start restores every original."""
    rng = random.Random(1234)
    for attempt in range(4):
        root = tmp_path / f"sys{attempt}"
        state = tmp_path / f"state{attempt}"
        build_tree(root, driver, 2, turbo=True)
        before = snapshot(root)
        child = run_child(root, state, quiet=True)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        # where it dies is what varies; nothing below depends on how long this is
        time.sleep(rng.uniform(0.0, 0.05))
        kill(child)
        assert RestoreJournal(state).recover().ok
        assert snapshot(root) == before


def test_sysfs_error_from_a_kernel_writer_is_isolated(sim_sysfs, tmp_path):
    """A KernelSysfs refusal (not an OSError) is also contained to its file."""
    root = sim_sysfs("acpi-cpufreq", cpus=2)
    journal = RestoreJournal(tmp_path / "state", writer=KernelSysfs(root).write_path)
    sysfs = Sysfs(root, journal)
    sysfs.write(f"{CPU}/cpu0/cpufreq/scaling_governor", "performance")
    sysfs.write(f"{CPU}/cpu1/cpufreq/scaling_governor", "performance")
    # an original the kernel refuses to take back (not a frequency)
    journal.remember(str(root / f"{CPU}/cpu1/cpufreq/scaling_min_freq"), "not-a-number")
    report = journal.restore()
    assert len(report.restored) == 2 and len(report.failed) == 1
    assert "EINVAL" in report.reasons[report.failed[0]]
    assert (root / f"{POLICY}0/scaling_governor").read_text().strip() == "schedutil"
    with pytest.raises(SysfsError):
        KernelSysfs(root).write(f"{CPU}/cpu1/cpufreq/scaling_min_freq", "not-a-number")


def test_msr_originals_round_trip_in_the_append_only_journal(tmp_path):
    """The append-only version holds files and MSRs; the file is whole JSON after each
    record, so an older vmpowerd finds an unknown version and keeps it aside, never
    misreads it."""
    state = tmp_path / "state"
    journal = RestoreJournal(state)
    journal.remember("/sys/a", "1")
    assert json.loads((state / JOURNAL_NAME).read_text())["version"] == 4
    msr = tmp_path / "msr"
    msr.write_bytes(bytes(16))
    journal.remember_msr(str(msr), 8, b"\x01\x02\x03\x04\x05\x06\x07\x08")
    data = json.loads((state / JOURNAL_NAME).read_text())
    assert data["version"] == 4
    assert data["entries"][1] == {"path": str(msr), "offset": 8, "bytes": "0102030405060708"}
    again = RestoreJournal(state, writer=lambda path, value: None)
    assert again.pending() == {"/sys/a": "1", f"{msr}@0x8": "0102030405060708"}
    report = again.restore()
    assert report.ok and msr.read_bytes() == bytes(8) + bytes(range(1, 9))


@pytest.mark.parametrize("version", [1, 2])
def test_journals_of_the_rewrite_whole_versions_are_still_recovered(tmp_path, version):
    paths = make_files(tmp_path, {"f": "changed"})
    msr = tmp_path / "msr"
    msr.write_bytes(bytes(16))
    entries: list[dict[str, object]] = [{"path": str(paths["f"]), "original": "orig"}]
    if version == 2:
        entries.append({"path": str(msr), "offset": 8, "bytes": "0102030405060708"})
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    old = {"format": "vmpower-restore-journal", "version": version, "entries": entries}
    (state / JOURNAL_NAME).write_text(json.dumps(old, indent=1) + "\n")
    (state / JOURNAL_NAME).chmod(0o600)
    report = RestoreJournal(state).recover()
    assert report.ok and len(report.restored) == len(entries)
    assert paths["f"].read_text() == "orig\n"
    if version == 2:
        assert msr.read_bytes() == bytes(8) + bytes(range(1, 9))
    assert not (state / JOURNAL_NAME).exists()


def test_paths_outside_the_roots_are_not_journaled_so_not_written(tmp_path):
    paths = make_files(tmp_path, {"inside/f": "1", "outside/f": "2"})
    journal = RestoreJournal(
        tmp_path / "state", file_roots=[tmp_path / "files" / "inside"], msr_roots=[]
    )
    sysfs = Sysfs(tmp_path / "files", journal)
    sysfs.write("inside/f", "3")
    with pytest.raises(RestoreError, match="outside"):
        sysfs.write("outside/f", "4")
    with pytest.raises(RestoreError, match="outside"):
        sysfs.write("inside/../outside/f", "4")
    with pytest.raises(RestoreError, match="outside"):
        journal.remember_msr(str(paths["inside/f"]), 0, bytes(8))  # not under an MSR root
    assert paths["outside/f"].read_text() == "2\n"
    assert list(journal.pending()) == [str(paths["inside/f"])]
