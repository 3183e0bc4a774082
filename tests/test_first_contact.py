"""A CPU's first request (issue #16, first contact): what taking it over costs in syscalls.

On acpi-cpufreq the first write of a CPU takes its governor (ondemand → userspace, read
back) and then writes scaling_setspeed; the journal records both files' originals
first. It cost 41 syscalls per CPU (the governor's content read four times, setspeed's
twice, every file opened once per read); 256 of them queued at first contact. Now the
files are opened while the daemon warms up (``Backend.prepare``), reads go through the
fds kept for the writes, and a value read just before a write is both what a failed
change puts back and the journal's original. The rules hold: the journal has the
true originals before the first write, the kernel's read-back is a read, and a failed
change is undone.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from vmpower import restore
from vmpower import sysfs as sysfs_module
from vmpower.cpufreq import CpuFreq, open_cpufreq
from vmpower.cpufreq.simulate import KernelSysfs
from vmpower.errors import CpufreqError, SysfsError, UnsupportedError
from vmpower.restore import RestoreJournal
from vmpower.sysfs import Sysfs

CPU = "devices/system/cpu"
POLICY = f"{CPU}/cpufreq/policy"
SYSCALLS = ("open", "close", "fstat", "read", "pread", "pwrite", "ftruncate", "fdatasync")


class Syscalls:
    """Counts the os calls a piece of vmpower makes, and which file each read touched."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: Counter[str] = Counter()
        self.reads: Counter[str] = Counter()  # file name → reads of its content
        self.opened: list[tuple[str, int]] = []  # (path, access flags)
        self._names: dict[int, str] = {}
        for name in SYSCALLS:
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))

    def _wrap(self, name: str, real):  # type: ignore[no-untyped-def]
        def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            result = real(*args, **kwargs)
            self.calls[name] += 1
            if name == "open":
                path = os.fspath(args[0])
                self._names[result] = os.path.basename(path)
                self.opened.append((path, args[1] & os.O_ACCMODE))
            elif name in ("read", "pread"):
                self.reads[self._names.get(args[0], "?")] += 1
            return result

        return counted

    def opened_under(self, root: Path, *, writable: bool = False) -> list[str]:
        """Names of the files opened under ``root`` (only those opened to be written)."""
        return [
            os.path.basename(path)
            for path, access in self.opened
            if path.startswith(f"{root}/") and not (writable and access == os.O_RDONLY)
        ]

    def reset(self) -> None:
        self.calls.clear()
        self.reads.clear()
        self.opened.clear()


def journaled(root: Path, tmp_path: Path, sysfs_class: type[Sysfs] = KernelSysfs):
    journal = RestoreJournal(tmp_path / "state", writer=KernelSysfs(root).write_path)
    return open_cpufreq(sysfs_class(root, journal)), journal


def change(cf: CpuFreq, cpu: int, freq_khz: int) -> None:
    """One request's change, as PowerManager._apply makes it."""
    cf.begin_change()
    try:
        cf.set_khz(cpu, freq_khz)
    except Exception:
        cf.undo_change(cpu)
        raise
    cf.end_change()


def originals(journal: RestoreJournal, cf: CpuFreq, cpu: int) -> dict[str, str]:
    return journal.originals_in(cf.policy_path_prefix(cpu))


def test_a_warmed_cpus_take_over_opens_nothing_and_reads_each_value_once(
    sim_sysfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fresh journal, a CPU probed ahead (the daemon's warm-up): its first change reads
    the governor once to take it (that read is also what an undo puts back and the
    journal's original) and once more as the kernel's read-back, setspeed twice (the
    journal's original before the governor changes it, then the undo's value), and
    opens no file. It opened 8 files and read the governor 5 times."""
    root = sim_sysfs("acpi-cpufreq", cpus=2)
    cf, journal = journaled(root, tmp_path, Sysfs)  # KernelSysfs reads files itself
    sys = Syscalls(monkeypatch)
    cf.table_khz(1)  # the warm-up: probe, and open the files the take-over writes
    warm_up_opens = sys.opened_under(root, writable=True)
    assert sorted(warm_up_opens) == ["scaling_governor", "scaling_setspeed"]
    sys.reset()
    change(cf, 1, 1_700_000)
    monkeypatch.undo()
    reads = {name: n for name, n in sys.reads.items() if name.startswith("scaling_")}
    assert reads == {"scaling_governor": 2, "scaling_setspeed": 2}, sys.reads
    assert sys.opened_under(root) == [], "files opened at take-over"
    assert (root / f"{POLICY}1/scaling_governor").read_text().strip() == "userspace"
    assert (root / f"{POLICY}1/scaling_setspeed").read_text().strip() == "1700000"
    assert originals(journal, cf, 1) == {
        "scaling_governor": "schedutil",
        "scaling_setspeed": "<unsupported>",
    }
    assert journal.restore().failed == []
    assert (root / f"{POLICY}1/scaling_governor").read_text().strip() == "schedutil"


def test_where_a_new_requester_starts_is_read_through_the_kept_files(
    sim_sysfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A requester new to a warmed CPU starts from the frequency in force
    (requested_khz): its governor is read through the fd kept for it, and the current
    frequency, which vmpower never writes, through one the warm-up kept for reading:
    one pread each, nothing opened (an open of scaling_cur_freq was 70 us of the loop
    per CPU at first contact, 256 of them at once on a 256-CPU host)."""
    root = sim_sysfs("acpi-cpufreq", cpus=2)
    cf, _journal = journaled(root, tmp_path, Sysfs)
    cf.table_khz(1)  # the warm-up
    sys = Syscalls(monkeypatch)
    khz = cf.requested_khz(1)
    monkeypatch.undo()
    assert khz in cf.table_khz(1)
    assert sys.opened_under(root) == []
    assert sys.calls["pread"] == 2, sys.calls
    # ... and it is the value in force now, not the one the warm-up saw.
    (root / f"{POLICY}1/scaling_cur_freq").write_text(f"{cf.table_khz(1)[0]}\n")
    assert cf.requested_khz(1) == cf.table_khz(1)[0]


def test_a_cpus_first_request_in_its_own_turn_costs_a_dozen_syscalls(
    sim_sysfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The latency case of first contact: one new CPU per monitor turn, the journal
    recording its originals ahead (begin_turn) in one append. 41 syscalls (9 opens, 12
    fstats) per CPU before; then 12, and no open: the journal's reads go through the
    files the warm-up opened too; now 11, the append not synced (test_journal_boot.py)."""
    root = sim_sysfs("acpi-cpufreq", cpus=4)
    cf, journal = journaled(root, tmp_path, Sysfs)  # KernelSysfs reads files itself
    for cpu in range(4):
        cf.table_khz(cpu)  # warm-up
    prefixes = [cf.policy_path_prefix(cpu) for cpu in range(4)]
    journal.begin_turn(prefixes[:1])  # the first CPU teaches the journal the names
    change(cf, 0, 1_700_000)
    journal.end_turn()
    sys = Syscalls(monkeypatch)
    for cpu in (1, 2, 3):
        journal.begin_turn(prefixes[cpu : cpu + 1])
        change(cf, cpu, 1_700_000)
        journal.end_turn()
    calls = dict(sys.calls)
    monkeypatch.undo()
    per_cpu = {name: count / 3 for name, count in calls.items()}
    assert "open" not in per_cpu and "close" not in per_cpu and "read" not in per_cpu, per_cpu
    # journal: 2 originals read ahead, 1 fstat (still linked?), 1 pwrite;
    # take-over: governor read, written (pwrite + truncate of a simulated file), read
    # back; setspeed read (the undo's value), written (pwrite + truncate)
    assert per_cpu == {
        "pread": 5,
        "fstat": 1,
        "pwrite": 3,
        "ftruncate": 2,
    }, per_cpu
    for cpu in (1, 2, 3):
        assert originals(journal, cf, cpu) == {
            "scaling_governor": "schedutil",
            "scaling_setspeed": "<unsupported>",
        }
    assert journal.restore().failed == []


def test_without_files_opened_ahead_the_originals_are_still_read_before_writing(
    sim_sysfs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past keep_open's share of the fd limit nothing is opened ahead: the first write
    opens each file once, read-write, and reads the value before it through that fd."""
    monkeypatch.setattr(sysfs_module, "_keep_open_max", lambda share=4: 0)
    root = sim_sysfs("acpi-cpufreq", cpus=2)
    cf, journal = journaled(root, tmp_path, Sysfs)
    cf.table_khz(1)
    sys = Syscalls(monkeypatch)
    change(cf, 1, 1_700_000)
    monkeypatch.undo()
    written = sorted(sys.opened_under(root, writable=True))
    assert written == ["scaling_governor", "scaling_setspeed"]  # once each, then kept
    assert sys.reads["scaling_available_governors"] == 0  # read by the probe
    assert originals(journal, cf, 1) == {
        "scaling_governor": "schedutil",
        "scaling_setspeed": "<unsupported>",
    }


class GovernorWontStart(KernelSysfs):
    """The userspace governor module fails to start: the kernel keeps the old one."""

    def write(self, rel: str, value: str | int) -> None:
        if rel.endswith("/scaling_governor") and str(value) == "userspace":
            return  # accepted, and the old governor goes on
        super().write(rel, value)


def failed_take_over(
    sim_sysfs, tmp_path: Path, kernel: type[KernelSysfs], error: str
) -> tuple[Path, CpuFreq, RestoreJournal]:
    """CPU 1's first change, which ``kernel`` makes fail with ``error``; the governor it
    found is back."""
    root = sim_sysfs("acpi-cpufreq", cpus=2)
    cf, journal = journaled(root, tmp_path, kernel)
    cf.table_khz(1)
    with pytest.raises(CpufreqError, match=error):
        change(cf, 1, 1_700_000)
    assert (root / f"{POLICY}1/scaling_governor").read_text().strip() == "schedutil"
    return root, cf, journal


def test_the_governors_read_back_is_still_a_read(sim_sysfs, tmp_path: Path) -> None:
    _, _, journal = failed_take_over(
        sim_sysfs, tmp_path, GovernorWontStart, "the kernel kept 'schedutil'"
    )
    assert journal.restore().failed == []


class SetspeedRefused(KernelSysfs):
    def write(self, rel: str, value: str | int) -> None:
        if rel.endswith("/scaling_setspeed"):
            raise SysfsError(self.path(rel), f"write {value!r}: refused (EBUSY)")
        super().write(rel, value)


def test_a_failed_take_over_puts_back_the_governor_it_read(sim_sysfs, tmp_path: Path) -> None:
    """The value read to take the governor is the one the undo writes back."""
    root, cf, journal = failed_take_over(sim_sysfs, tmp_path, SetspeedRefused, "refused")
    assert (root / f"{POLICY}1/scaling_setspeed").read_text().strip() == "<unsupported>"
    assert originals(journal, cf, 1)["scaling_governor"] == "schedutil"


def test_a_governor_list_without_userspace_is_read_again_before_refusing(
    sim_sysfs, tmp_path: Path
) -> None:
    """scaling_available_governors is read by the probe, not at take-over; a list
    without userspace is read again (the module may have been loaded since)."""
    root = sim_sysfs("acpi-cpufreq", cpus=2)
    available = root / f"{POLICY}1/scaling_available_governors"
    listed = available.read_text()
    available.write_text("ondemand performance\n")
    cf, _journal = journaled(root, tmp_path)
    cf.table_khz(1)
    with pytest.raises(UnsupportedError, match="userspace governor is not available"):
        change(cf, 1, 1_700_000)
    available.write_text(listed)  # modprobe cpufreq_userspace
    change(cf, 1, 1_700_000)
    assert (root / f"{POLICY}1/scaling_setspeed").read_text().strip() == "1700000"


def test_a_reserved_cpus_files_are_not_opened_ahead(
    sim_sysfs, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = sim_sysfs("acpi-cpufreq", cpus=2)
    cf = open_cpufreq(KernelSysfs(root), frozenset({1}))
    sys = Syscalls(monkeypatch)
    cf.table_khz(1)
    cf.table_khz(0)
    monkeypatch.undo()
    ahead = sys.opened_under(root / cf.policy_dir(0), writable=True)
    assert ahead == ["scaling_governor", "scaling_setspeed"]
    assert sys.opened_under(root / cf.policy_dir(1), writable=True) == []  # reserved


def _open_under(directory: Path) -> list[str]:
    """Names of the files under ``directory`` this process holds open (/proc/self/fd)."""
    names = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listing's own fd, closed meanwhile
        if target.startswith(f"{directory}/"):
            names.append(Path(target).name)
    return sorted(names)


def test_a_cpu_reserved_by_a_reload_has_its_files_closed(sim_sysfs) -> None:
    """The warm-up opened CPU 1's files ahead; a reload reserving it closes them (a
    reserved CPU's files are never written, so not held either)."""
    root = sim_sysfs("acpi-cpufreq", cpus=2)
    cf = open_cpufreq(KernelSysfs(root))
    cf.table_khz(0)
    cf.table_khz(1)
    policy1 = (root / cf.policy_dir(1)).resolve()
    assert _open_under(policy1) == ["scaling_cur_freq", "scaling_governor", "scaling_setspeed"]
    cf.set_reserved(frozenset({1}))
    assert _open_under(policy1) == []
    assert _open_under((root / cf.policy_dir(0)).resolve()) != []  # CPU 0 keeps its own
    cf.close()


def test_keep_open_writes_nothing_and_stops_at_its_share_of_the_fd_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("a", "b", "c", "d"):
        (tmp_path / name).write_text("schedutil\n")
    monkeypatch.setattr(sysfs_module, "_keep_open_max", lambda share=4: 1)
    sysfs = Sysfs(tmp_path)
    assert sysfs.keep_for_reads("c")  # fds kept for reads have a share of their own ...
    assert not sysfs.keep_for_reads("d")  # (full now)
    assert sysfs.keep_open("a")  # ... and take none of the writes'
    assert not sysfs.keep_open("b")  # one fd kept already
    assert not sysfs.keep_open("missing")
    assert (tmp_path / "a").read_text() == "schedutil\n"
    assert sysfs.read_kept("a") == sysfs.read_kept("b") == "schedutil"
    (tmp_path / "a").write_text("ondemand\n")  # the kept fd shows the file as it is now
    assert sysfs.read_kept("a") == "ondemand"
    sysfs.write("a", "userspace")
    assert sysfs.read_kept("a") == "userspace" == (tmp_path / "a").read_text()
    sysfs.close()


def test_read_kept_refuses_what_read_refuses(tmp_path: Path) -> None:
    """Where no fd is kept, read_kept opens as read does: never a FIFO or a link."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "target").write_text("1\n")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    sysfs = Sysfs(tmp_path)
    assert not sysfs.keep_open("fifo") and not sysfs.keep_open("link")
    for name in ("fifo", "link"):
        with pytest.raises(SysfsError, match="not an attribute"):
            sysfs.read_kept(name)
        with pytest.raises(SysfsError, match="not an attribute"):
            sysfs.read_for_write(name)


@pytest.mark.parametrize(
    "path, original",
    [
        ("/sys/devices/system/cpu/cpufreq/policy0/scaling_governor", "schedutil"),
        ('/odd/"quoted"\\back', "tab\there\nnewline"),
        ("/sys/ünïcode", "<unsupported>"),
    ],
)
def test_a_journal_record_is_the_json_it_always_was(path: str, original: str) -> None:
    """Records are rendered around json's own string escaping, not by json.dumps."""
    assert restore._row_text(path, original) == json.dumps(restore._row(path, original))
    msr = ("/dev/cpu/0/msr", 0x186)
    assert restore._row_text(msr, b"\x01\x02") == json.dumps(restore._row(msr, b"\x01\x02"))


def test_a_write_only_attribute_is_kept_write_only_and_read_on_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kernfs refuses to open an attribute without show() for reading (EACCES): it is
    kept open write-only, and a read before its write opens it as read does."""
    (tmp_path / "attr").write_text("old\n")
    real = sysfs_module._open_checked

    def no_reading(path: str, access: int):  # type: ignore[no-untyped-def]
        if access == os.O_RDWR:
            raise PermissionError(13, "Permission denied")
        return real(path, access)

    monkeypatch.setattr(sysfs_module, "_open_checked", no_reading)
    journal = RestoreJournal(tmp_path / "state")
    sysfs = Sysfs(tmp_path, journal)
    assert sysfs.keep_open("attr")
    assert sysfs.read_for_write("attr") == "old"
    sysfs.write("attr", "new")
    assert sysfs.read_kept("attr") == "new" == (tmp_path / "attr").read_text()
    assert journal.pending() == {str(tmp_path / "attr"): "old"}
    sysfs.close()
