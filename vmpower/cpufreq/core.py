"""CpuFreq: the one facade the rest of vmpower uses for CPU frequencies.

It owns validation (the simulated tree's plain files accept anything, so everything the
kernel would refuse is refused here first with ``CpufreqError``), the per-CPU caches
that keep the request path cheap (static tables and facts, the last frequency set, the
turbo switch's state), the files of each CPU (``cpu_path_prefix``,
``policy_path_prefix``, ``close``), and the once-only reporting of unsupported
features. The per-driver file work is delegated to a backend (see
``vmpower.cpufreq.detect``).

Policies: CPUs sharing one cpufreq policy (``vmpower.cpufreq.topology``) share one set
of files, so everything here that writes or caches is per policy: a CPU's request is
its policy's, written through the policy's one directory (so the journal names each
file once), and the caches of the policy's CPUs are one object. Which of the CPUs'
wishes wins is the request path's business (``vmpower.power``: the highest).

Which frequency a CPU should run (stepping up and down the table, each requester's
turbo wish) is decided by the request path, ``vmpower.power``; this facade sets what
it is told, within the rules.

Turbo: the turbo range (the table entries above the nominal frequency) is usable while
the driver's turbo switches are on (``intel_pstate/no_turbo``; the cpufreq core's
``cpufreq/boost`` and, where the kernel has it, the policy's own ``cpuN/cpufreq/boost``:
both must be on), and ``set_khz`` refuses it while they are off (the kernel would clamp
it to nominal). ``set_turbo`` only ever switches them *on*, when a CPU needs turbo; the
journal puts them back. A CPU leaves its turbo range by asking a lower frequency; where
that is not a cap (acpi-cpufreq boosting above its table, AMD) the backend switches the
policy's own ``boost`` off, never a system-wide switch.

Changes: one CPU's change can take several writes (the turbo switch, the governor, then
``scaling_setspeed``; or both limits). Between ``begin_change`` and ``end_change`` each
file's value before its first write is kept, so when a later write fails,
``undo_change`` writes the earlier ones back: a request that gets NACK leaves the CPU as
it was (docs/protocol.md, host rule 2: an ACK means applied).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Generator, Mapping
from pathlib import Path
from typing import cast

from vmpower.cpufreq.backend import CPU_DIR, Backend
from vmpower.cpufreq.detect import (
    BACKENDS,
    make_backend,
    present_cpus,
    priority_cpus,
    read_cpu_list,
    system_driver,
)
from vmpower.cpufreq.limits import MAX_FREQ, MIN_FREQ, write_limits
from vmpower.cpufreq.model import Capabilities, CpuInfo, CpuState
from vmpower.cpufreq.topology import Topology
from vmpower.cpuset import format_cpu_list
from vmpower.errors import CpufreqError, SysfsError, UnsupportedError, VmpowerError
from vmpower.restore import PLACEHOLDERS
from vmpower.sysfs import Sysfs, WriteJournal

log = logging.getLogger("vmpower.cpufreq")


class _Cpu:
    """Per-policy facts and caches (mutable; only the facade touches them), kept under
    the number of every CPU of the policy that asked."""

    __slots__ = ("entries", "info", "last_khz", "leader", "switch_on", "switches")

    def __init__(
        self, leader: int, info: CpuInfo, switches: tuple[str, ...], switch_on: bool
    ) -> None:
        self.leader = leader  # the policy's number: what the backend is given
        self.info = info
        self.entries = frozenset(info.table_khz)
        self.switches = switches  # the turbo switches' relative paths (empty: none)
        self.switch_on = switch_on  # all of them on, as last read or written
        self.last_khz: int | None = None  # the value vmpower last set (None: not in control)


# Files whose last written value _ChangeLog remembers: a few per CPU on a 1024-CPU host.
WRITTEN_KEPT_MAX = 4096


class _ChangeLog:
    """The Sysfs the backends write through: it keeps what an open change overwrote.

    Everything but ``read`` and ``write`` is the wrapped Sysfs's own. While a change is
    open, the value a file held before its first write in the change is kept, to be
    written back if a later write of the change fails. That value costs no read where
    it is known already:

    * a file vmpower wrote before holds what it wrote last (remembered here: no read on
      the request path, where a turn writes one file of a CPU it wrote before);
    * a file the change has just read through this log, with no write of the change
      since (the governor a take-over reads to learn whether it is ours), holds what
      was read; that read is also the journal's original when the journal has none
      (``Sysfs.remember_original``). Any write forgets these reads: a write may change
      other files (the governor makes ``scaling_setspeed`` readable), and a read-back
      after a write is always a read of its own;
    * any other file is read through the fd its write will use (``Sysfs.read_for_write``:
      one ``pread``; the journal gets its original from that read too).

    The journal's original is no help: it is the value before vmpower's first write
    ever, not before this change. Someone writing the file beside vmpower is not seen,
    as in ``CpuFreq``'s own write skipping; a failed change then puts back vmpower's
    value, and ``forget_written`` (the CPU restored, forgotten, or re-read) clears what
    is remembered.
    """

    def __init__(self, sysfs: Sysfs) -> None:
        self._sysfs = sysfs
        # The wrapped Sysfs's other methods, bound here once. Not a __getattr__: CPython
        # (3.11) does not specialize attribute access on a type that overrides it, so
        # every attribute of this object, its own included, was a slow look-up, a
        # dozen a request (issue #16).
        own = set(dir(type(self)))
        for name in dir(sysfs):
            if not name.startswith("_") and name not in own:
                method = getattr(sysfs, name)
                if callable(method):
                    setattr(self, name, method)
        # rel → its value before the change's first write to it, in the order written
        self.change: dict[str, str | None] | None = None
        self._read: dict[str, str] = {}  # rel → read in the open change since its last write
        self._written: dict[str, str] = {}  # rel → what vmpower wrote there last

    @property
    def root(self) -> Path:
        return self._sysfs.root

    @property
    def journal(self) -> WriteJournal | None:
        return self._sysfs.journal

    def end(self) -> dict[str, str | None]:
        """The change is over (gone through or undone): what it overwrote."""
        change, self.change = self.change or {}, None
        if self._read:
            self._read.clear()
        return change

    def read(self, rel: str) -> str:
        return self._noted(rel, self._sysfs.read(rel))

    def read_kept(self, rel: str) -> str:
        return self._noted(rel, self._sysfs.read_kept(rel))

    def _noted(self, rel: str, text: str) -> str:
        if self.change is not None:
            self._read[rel] = text
        return text

    def write(self, rel: str, value: str | int) -> None:
        change = self.change
        if change is not None:
            if rel not in change:
                change[rel] = self._before(rel)
            if self._read:
                self._read.clear()
        self._written.pop(rel, None)  # a write that fails leaves the value unknown
        self._sysfs.write(rel, value)
        if len(self._written) < WRITTEN_KEPT_MAX:
            self._written[rel] = str(value)

    def _before(self, rel: str) -> str | None:
        """``rel``'s value now, or None when it cannot be read (then nothing to put back)."""
        written = self._written.get(rel)
        if written is not None:
            return written
        text = self._read.get(rel)
        if text is not None:
            self._sysfs.remember_original(rel, text)
            return text
        try:
            return self._sysfs.read_for_write(rel)
        except SysfsError:
            return None  # gone (CPU offline) or replaced: the write says why

    def forget_written(self) -> None:
        """Files were written beside this log (a restore, an undo): re-read them all
        before their next change. Global files (the turbo switch) are among them, so
        everything goes, not just one CPU's; it costs one read per file, once."""
        self._written.clear()

    def close(self) -> None:
        self._written.clear()
        self._read.clear()


def open_cpufreq(sysfs: Sysfs, reserved_cpus: frozenset[int] = frozenset()) -> CpuFreq:
    """Find the CPUs and the scaling driver under ``sysfs`` and return the facade."""
    return CpuFreq(sysfs, reserved_cpus)


class CpuFreq:
    """Frequency control of the host CPUs through one scaling driver's sysfs files."""

    def __init__(self, sysfs: Sysfs, reserved_cpus: frozenset[int] = frozenset()) -> None:
        self.sysfs = sysfs
        # Every write of the backends and of this facade goes through it (see undo_change).
        self._changes = _ChangeLog(sysfs)
        writer = cast(Sysfs, self._changes)
        self._reserved = frozenset(reserved_cpus)
        self._reasons: dict[str, str] = {}
        self._present = present_cpus(sysfs)
        self._present_set = frozenset(self._present)
        self._driver = system_driver(sysfs, self._present)
        self._topology = Topology(sysfs, self._present)
        self._backend: Backend | None = make_backend(
            writer, self._driver, self._present, self._report
        )
        if self._backend is not None:
            self._backend.dir = self._topology.dir
        if self._driver and self._backend is None:
            self._report(
                f"driver:{self._driver}",
                f"scaling driver {self._driver!r} is not supported (known: "
                f"{', '.join(BACKENDS)}; others need scaling_available_frequencies)",
            )
        self._priority = (
            priority_cpus(self._backend.priority_values(self._present))
            if self._backend is not None
            else frozenset()
        )
        self._cpus: dict[int, _Cpu] = {}
        # cpu → policy_path_prefix(cpu): asked once per written CPU per turn; a hotplug
        # (refresh) may move a CPU to another policy directory, so it drops them all.
        self._path_prefixes: dict[int, str] = {}

    # -- CPUs --------------------------------------------------------------------------

    def cpus(self) -> list[int]:
        """Every present CPU number."""
        return list(self._present)

    def online(self, cpu: int) -> bool:
        if cpu not in self._present_set:
            return False
        try:
            return self.sysfs.read(f"{CPU_DIR}/cpu{cpu}/online") == "1"
        except SysfsError:
            pass  # cpu0 and CPUs that cannot be unplugged have no online file
        listed = read_cpu_list(self.sysfs, f"{CPU_DIR}/online")
        return listed is None or cpu in listed

    def managed(self, cpu: int) -> bool:
        """Online, has a cpufreq policy of a supported driver, and neither it nor a CPU
        sharing its policy is reserved (a write to the policy moves them all)."""
        return (
            cpu in self._present_set
            and not self._reserved_policy(cpu)
            and self._backend is not None
            and self.online(cpu)
            and self.sysfs.exists(f"{self._topology.dir(cpu)}/scaling_driver")
        )

    # -- policies ----------------------------------------------------------------------

    def policy(self, cpu: int) -> int:
        """The number of ``cpu``'s cpufreq policy (M of ``policyM``)."""
        return self._topology.leader(cpu)

    def policy_cpus(self, cpu: int) -> frozenset[int]:
        """Every CPU sharing ``cpu``'s policy (``related_cpus``), ``cpu`` included."""
        return self._topology.members(cpu)

    def policy_name(self, cpu: int) -> str:
        return self._topology.name(cpu)

    def policy_dir(self, cpu: int) -> str:
        """The directory (relative to the sysfs root) ``cpu``'s policy is written through."""
        return self._topology.dir(cpu)

    def policy_path_prefixes(self, cpu: int) -> tuple[str, ...]:
        """Absolute path prefixes of every file of ``cpu``'s policy as a journal may name
        them: the policy's directory, and each of its CPUs' own directory."""
        members = self._topology.members(cpu)
        return (
            self.policy_path_prefix(cpu),
            *(self.cpu_path_prefix(c) for c in sorted(members)),
        )

    def refresh(self, cpu: int) -> None:
        """``cpu`` went offline or came back (hotplug): re-read its policy, and drop
        everything cached about it: the kernel brings a CPU back with its own governor
        and frequency (cpufreq_online() starts the policy's last governor afresh)."""
        self._path_prefixes.clear()
        before = self._topology.members(cpu)
        self._topology.refresh(cpu)
        for c in before | self._topology.members(cpu):
            self._drop(c)

    def _reserved_policy(self, cpu: int) -> bool:
        if cpu in self._reserved:
            return True
        return bool(self._reserved) and not self._reserved.isdisjoint(self._topology.members(cpu))

    def driver(self, cpu: int) -> str:
        self._check_present(cpu)
        return self._driver

    # -- files ---------------------------------------------------------------------------

    def cpu_path_prefix(self, cpu: int) -> str:
        """Absolute path of ``cpu``'s sysfs directory, ending in "/": every file of
        that CPU (its journal entries included) starts with it. Any CPU number is
        accepted; an absent CPU's prefix matches nothing."""
        return self.sysfs.path(f"{CPU_DIR}/cpu{cpu}/")

    def close(self) -> None:
        """Close the attributes kept open (at shutdown; reopened on demand)."""
        self._changes.close()
        self.sysfs.close()

    # -- limits (telemetry sessions' wishes) ---------------------------------------------

    def set_limits(
        self,
        cpu: int,
        min_khz: int | None,
        max_khz: int | None,
        originals: Mapping[str, str],
    ) -> bool:
        """Set ``cpu``'s policy limits (scaling_min_freq, scaling_max_freq).

        A side given as None goes back to its original (``originals``: file name → the
        value the restore journal holds for this policy's directory), or keeps its value.
        One change, all or nothing (``undo_change`` when a write fails), in the order the
        kernel needs (``limits.write_limits``). Written beside the backend, so nothing
        cached about the CPU holds afterwards. True when a file was written.
        """
        d = self.policy_dir(cpu)
        cur_min = self.sysfs.read_int(f"{d}/{MIN_FREQ}")
        cur_max = self.sysfs.read_int(f"{d}/{MAX_FREQ}")
        lo = min_khz if min_khz is not None else _int_or(originals.get(MIN_FREQ), cur_min)
        hi = max_khz if max_khz is not None else _int_or(originals.get(MAX_FREQ), cur_max)
        self.begin_change()
        try:
            written = write_limits(
                cast(Sysfs, self._changes), cpu, min(lo, hi), hi, cur_min, cur_max, d
            )
        except (VmpowerError, OSError) as exc:
            unrestored = self.undo_change(cpu)  # forgets the CPU too
            left = f" (not put back: {'; '.join(unrestored)})" if unrestored else ""
            raise CpufreqError(f"cpu {cpu}: cannot set limits: {exc}{left}") from exc
        self.end_change()
        self.forget(cpu)
        return bool(written)

    def policy_path_prefix(self, cpu: int) -> str:
        """The absolute path of ``cpu``'s policy directory, ending in "/" (the restore
        journal's ``originals_in`` takes it)."""
        prefix = self._path_prefixes.get(cpu)
        if prefix is None:
            prefix = self._path_prefixes[cpu] = self.sysfs.path(self.policy_dir(cpu)) + "/"
        return prefix

    # -- changes: all or nothing ---------------------------------------------------------

    def begin_change(self) -> None:
        """The writes from now to ``end_change``/``undo_change`` are one change."""
        changes = self._changes
        if changes.change is not None:  # left open by a failure nobody undid
            changes.end()  # its reads must not serve as this change's values before
        changes.change = {}

    def end_change(self) -> None:
        """The change went through: forget what it overwrote."""
        self._changes.end()

    def undo_change(self, cpu: int) -> list[str]:
        """The change on ``cpu`` failed: write back what it overwrote, newest first.

        Returns "path: reason" for each file that could not be put back (the caller
        logs them). Afterwards nothing cached about ``cpu`` is trusted: the next change
        reads its files again (and takes the governor again).
        """
        change = self._changes.end()
        failed: list[str] = []
        for rel, before in reversed(change.items()):
            # A placeholder ("<unsupported>" in scaling_setspeed) is no value: putting
            # the governor back (it comes later in this loop) brings it back.
            if before is None or before in PLACEHOLDERS:
                continue
            try:
                if self.sysfs.read(rel) != before:
                    self.sysfs.write(rel, before)
            except SysfsError as exc:
                failed.append(f"{exc.path}: {exc.reason}")
        self.forget(cpu)
        # A shared turbo switch may be back off (one _Cpu per policy, under many keys).
        for c in {id(c): c for c in self._cpus.values()}.values():
            if any(rel in change for rel in c.switches):
                c.switch_on = self._read_switches(c.switches)
        return failed

    # -- tables --------------------------------------------------------------------------

    def table_khz(self, cpu: int) -> tuple[int, ...]:
        """Frequencies high → low; the turbo range (entries above nominal) first."""
        return self._cpu(cpu).info.table_khz

    def nominal_khz(self, cpu: int) -> int:
        """The highest non-turbo frequency (the cap while the turbo switch is off)."""
        return self._cpu(cpu).info.nominal_khz

    # -- the request path ----------------------------------------------------------------

    def set_khz(self, cpu: int, freq_khz: int) -> bool:
        """Request ``freq_khz``; False (nothing written) when vmpower already set it.

        Refused (``CpufreqError``, nothing written): a reserved or absent CPU, a value
        off the table (or outside the bounds, where any kHz is settable), and a turbo
        entry while the turbo switch is off (``set_turbo`` first).
        """
        if self._reserved and self._reserved_policy(cpu):
            raise self._reserved_error(cpu)
        c = self._cpus.get(cpu) or self._cpu(cpu)
        if type(freq_khz) is not int and (
            isinstance(freq_khz, bool) or not isinstance(freq_khz, int)
        ):
            raise CpufreqError(f"cpu {cpu}: frequency must be an integer kHz, got {freq_khz!r}")
        info = c.info
        if info.continuous:
            if not info.min_khz <= freq_khz <= info.max_khz:
                raise CpufreqError(
                    f"cpu {cpu}: {freq_khz} kHz is outside {info.min_khz}-{info.max_khz} kHz"
                    " (cpuinfo_min_freq-cpuinfo_max_freq)"
                )
        elif freq_khz not in c.entries:
            raise CpufreqError(
                f"cpu {cpu}: {freq_khz} kHz is not in the frequency table"
                f" ({' '.join(map(str, info.table_khz))})"
            )
        if freq_khz > info.nominal_khz and not c.switch_on:
            raise CpufreqError(
                f"cpu {cpu}: {freq_khz} kHz is in the turbo range and turbo is disabled"
                f" (highest allowed {info.nominal_khz} kHz)"
            )
        if c.last_khz == freq_khz:
            return False
        backend = self._backend
        assert backend is not None  # _cpu() raised otherwise
        try:
            backend.write_khz(c.leader, freq_khz)
        except SysfsError as exc:
            raise self._lost(cpu, exc) from exc
        c.last_khz = freq_khz
        if backend.switch_follows_writes(c.leader):
            # It switched the policy's boost itself: on exactly for the turbo entry
            # (the global switch is on then: set_turbo came first).
            c.switch_on = freq_khz > info.nominal_khz
        return True

    def requested_khz(self, cpu: int) -> int:
        """The target in force: the value vmpower last set, else read from the files
        (setspeed under userspace, min when min == max), else the current frequency
        rounded to the nearest table entry."""
        c = self._cpu(cpu)
        if c.last_khz is not None:
            return c.last_khz
        backend = self._backend
        assert backend is not None
        try:
            pinned = backend.read_requested(c.leader)
            if pinned is None:
                pinned = self.sysfs.read_kept_int(f"{self._topology.dir(cpu)}/scaling_cur_freq")
        except SysfsError as exc:
            raise self._lost(cpu, exc) from exc
        return _nearest(c.info, pinned)

    def set_reserved(self, cpus: frozenset[int]) -> None:
        """New reserved CPUs (SIGHUP reload): refused from now on, the others served.

        What is cached about a CPU changing sides is dropped; the caller restores the
        newly reserved CPUs' files first (``PowerManager.reserved_cpus``).
        """
        changed = self._reserved ^ frozenset(cpus)
        self._reserved = frozenset(cpus)
        for cpu in changed:
            if cpu in self._present_set:
                self.forget(cpu)
                if self._reserved_policy(cpu):  # opened ahead by the warm-up: let go
                    self.sysfs.close_under(self._topology.dir(cpu))

    def forget(self, cpu: int) -> None:
        """Drop what vmpower believes about the requests of ``cpu``'s policy (its files
        were restored, or written beside the backend)."""
        leader = self._topology.leader(cpu)
        c = self._cpus.get(cpu) or self._cpus.get(leader)
        if c is not None:
            c.last_khz = None
            c.switch_on = self._read_switches(c.switches)
        self._changes.forget_written()
        if self._backend is not None:
            self._backend.forget(leader)

    def _drop(self, cpu: int) -> None:
        """Forget everything about ``cpu``'s policy, its static facts included."""
        leader = self._topology.leader(cpu)
        for c in self._topology.members(cpu) | {cpu, leader}:
            self._cpus.pop(c, None)
        self._changes.forget_written()
        if self._backend is not None:
            self._backend.forget(leader)
            self._backend.forget(cpu)

    # -- turbo ---------------------------------------------------------------------------

    def turbo_enabled(self, cpu: int) -> bool:
        """The CPU has a turbo range and the driver's turbo switch is on (read now)."""
        c = self._cpu(cpu)
        if not c.info.has_turbo:
            return False
        c.switch_on = self._read_switches(c.switches)
        return c.switch_on

    def set_turbo(self, cpu: int, enabled: bool) -> None:
        """Make ``cpu``'s turbo range usable: switch the driver's turbo switch on if it
        is off (system-wide on most drivers; journaled like every write).

        It does not move the CPU: the caller sets a turbo frequency next. vmpower never
        switches turbo off (``enabled=False`` is refused): the switch is system-wide on
        most drivers, and a CPU leaves its turbo range by asking a lower frequency.
        """
        if self._reserved and self._reserved_policy(cpu):
            raise self._reserved_error(cpu)
        c = self._cpu(cpu)
        if not c.info.has_turbo:
            raise self._report(
                f"turbo:{self._driver}",
                f"{self._driver}: some CPUs have no turbo range (first seen: cpu {cpu})",
                f"cpu {cpu} has no turbo range",
            )
        if not enabled:
            raise CpufreqError(
                f"cpu {cpu}: vmpower never switches turbo off (the switch is system-wide on"
                " most drivers); set a frequency at or below nominal instead"
            )
        for rel in c.switches:  # in order: the global boost before the policy's
            if not self._read_switch(rel):
                self._switch_on(cpu, rel)
        c.switch_on = True

    def _switch_on(self, cpu: int, rel: str) -> None:
        backend = self._backend
        assert backend is not None
        value = "0" if backend.switch_inverted else "1"
        try:
            self._changes.write(rel, value)
            # Read back: intel_pstate refuses (or ignores) no_turbo=0 when the
            # firmware disabled turbo.
            if not self._read_switch(rel):
                raise SysfsError(self.sysfs.path(rel), "the kernel kept turbo switched off")
        except SysfsError as exc:
            raise CpufreqError(f"cpu {cpu}: cannot switch turbo on: {exc}") from exc
        if backend.switch_is_global(rel):
            log.warning(
                "turbo switched on system-wide (%s) for cpu %d; restored at exit",
                self.sysfs.path(rel),
                cpu,
            )
        # The switch may be shared: the cached CPUs behind it are re-read (a global
        # boost also switches every policy's own boost, cpufreq.c). The limits in force
        # may have moved with it (amd-pstate sets scaling_max_freq to the new maximum;
        # intel_pstate brings back a maximum request): a CPU vmpower pinned is pinned
        # again, within this change, so switching turbo on moves no CPU.
        for other in list({id(o): o for o in self._cpus.values()}.values()):
            if rel not in other.switches:
                continue
            num = other.leader
            other.switch_on = self._read_switches(other.switches)
            if backend.switch_follows_writes(num):
                continue  # its setspeed did not move; its next write sets its boost
            pinned, other.last_khz = other.last_khz, None
            backend.forget(num)
            if pinned is None:
                continue
            try:
                if backend.read_requested(num) != pinned:
                    backend.write_khz(num, pinned)
                other.last_khz = pinned
            except SysfsError as exc:
                raise CpufreqError(
                    f"cpu {num}: cannot keep {pinned} kHz after switching turbo on: {exc}"
                ) from exc

    def _read_switches(self, rels: tuple[str, ...]) -> bool:
        """All of them on (no switch at all: turbo cannot be switched off)."""
        return all(self._read_switch(rel) for rel in rels)

    def _read_switch(self, rel: str) -> bool:
        backend = self._backend
        assert backend is not None
        try:
            text = self.sysfs.read(rel)
        except SysfsError:
            return True
        return (text == "0") if backend.switch_inverted else (text != "0")

    # -- capabilities and state --------------------------------------------------------

    def note(self, cpu: int) -> str:
        """Why ``cpu``'s turbo range is unknown or its non-turbo maximum a fallback (for
        show_cpus; "" when the driver's files gave both)."""
        return self._cpu(cpu).info.note

    def unsupported_on(self, cpu: int) -> dict[str, str]:
        """What ``cpu`` cannot do, feature → why (status and show_cpus report it, as
        Intel's power-optimization-library does); empty when it can do everything."""
        if self._reserved and self._reserved_policy(cpu):
            return {"control": str(self._reserved_error(cpu))}
        try:
            info = self._cpu(cpu).info
        except VmpowerError as exc:
            return {"control": str(exc)}
        d = self._topology.dir(cpu)
        why: dict[str, str] = {}
        if not info.has_turbo:
            why["turbo"] = (
                f"no turbo range: {info.max_khz} kHz, the top of the range, is the nominal"
                f" frequency ({_NO_TURBO_WHY.get(self._driver, 'the driver shows none above it')})"
            )
        if not self.sysfs.exists(f"{d}/energy_performance_preference"):
            why["epp"] = (
                f"no EPP: {self._driver} has no energy_performance_preference (EPP needs"
                " intel_pstate with HWP or amd-pstate-epp)"
            )
        if not info.priority and not self._priority:
            why["priority"] = "no priority cores: every CPU reports the same highest performance"
        if info.note:
            why["nominal"] = info.note
        if self._topology.shared(cpu):
            others = format_cpu_list(self._topology.members(cpu) - {cpu})
            why["per_cpu"] = (
                f"shares {self._topology.name(cpu)} with CPU {others}: the highest wish of"
                " them all is set for all of them"
            )
        return why

    def unsupported_summary(self) -> dict[str, dict[str, str]]:
        """Host-wide: each feature some online CPU cannot use → those CPUs and a reason
        (``unsupported_summary_steps`` in one piece)."""
        steps = self.unsupported_summary_steps(len(self._present) or 1)
        try:
            next(steps)  # one step holds every CPU: it never yields
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        raise AssertionError("unsupported_summary_steps yielded in one piece")

    def unsupported_summary_steps(
        self, cpus_per_step: int
    ) -> Generator[None, None, dict[str, dict[str, str]]]:
        """``unsupported_summary`` built afresh, yielding after each ``cpus_per_step``
        CPUs (status builds it in slices of the monitor's turns; not cached, since the
        CPUs' state may change between slices)."""
        by_feature: dict[str, tuple[list[int], str]] = {}
        for index, cpu in enumerate(self.cpus()):
            if index and index % cpus_per_step == 0:
                yield
            if not self.online(cpu):
                continue
            for feature, why in self.unsupported_on(cpu).items():
                by_feature.setdefault(feature, ([], why))[0].append(cpu)
        return {
            feature: {"cpus": format_cpu_list(cpus), "reason": reason}
            for feature, (cpus, reason) in sorted(by_feature.items())
        }

    def capabilities(self, cpu: int) -> Capabilities:
        info = self._cpu(cpu).info
        return Capabilities(turbo=info.has_turbo, priority=info.priority)

    def state(self, cpu: int) -> CpuState:
        """The CPU as the kernel shows it now (files read, caches not consulted)."""
        self._check_present(cpu)
        online = self.online(cpu)
        d = self._topology.dir(cpu)
        if not online or not self.sysfs.exists(f"{d}/scaling_governor"):
            return CpuState(cpu, self._driver, None, online, None, None, None, None, None, None)
        governor = self._opt(f"{d}/scaling_governor")
        lo = _int_or_none(self._opt(f"{d}/scaling_min_freq"))
        hi = _int_or_none(self._opt(f"{d}/scaling_max_freq"))
        target: int | None = None
        if governor == "userspace":
            target = _int_or_none(self._opt(f"{d}/scaling_setspeed"))
        elif lo is not None and lo == hi:
            target = hi
        turbo: bool | None = None
        if self._backend is not None:
            try:
                c = self._cpu(cpu)
                turbo = self.turbo_enabled(cpu) if c.info.has_turbo else None
            except CpufreqError:
                turbo = None
        return CpuState(
            cpu=cpu,
            driver=self._driver,
            governor=governor,
            online=True,
            cur_khz=_int_or_none(self._opt(f"{d}/scaling_cur_freq")),
            target_khz=target,
            min_khz=lo,
            max_khz=hi,
            turbo_enabled=turbo,
            epp=self._opt(f"{d}/energy_performance_preference"),
        )

    # -- energy/performance preference ------------------------------------------------

    def set_epp(self, cpu: int, preference: str) -> None:
        """Set the EPP hint (intel_pstate with HWP, amd-pstate-epp)."""
        if self._reserved and self._reserved_policy(cpu):
            raise self._reserved_error(cpu)
        self._cpu(cpu)
        d = self._topology.dir(cpu)
        rel = f"{d}/energy_performance_preference"
        if not self.sysfs.exists(rel):
            raise self._report(
                f"epp:{self._driver}",
                f"{self._driver} has no energy_performance_preference (EPP needs"
                " intel_pstate with HWP or amd-pstate-epp)",
            )
        try:
            # Read each time, not cached: the list follows the governor (amd-pstate-epp
            # lists only "performance" under the performance governor).
            choices = tuple(
                self.sysfs.read(f"{d}/energy_performance_available_preferences").split()
            )
            if not isinstance(preference, str) or preference not in choices:
                raise CpufreqError(
                    f"cpu {cpu}: unknown energy performance preference {preference!r}"
                    f" (available: {' '.join(choices)})"
                )
            # intel_pstate.rst ("HWP + performance") and amd-pstate: under the
            # performance governor only "performance" is accepted (the kernel: EBUSY).
            governor = self.sysfs.read(f"{d}/scaling_governor")
            if governor == "performance" and preference != "performance":
                raise CpufreqError(
                    f"cpu {cpu}: the EPP cannot be changed under the performance governor"
                    " (the kernel refuses with EBUSY)"
                )
            self._changes.write(rel, preference)
            now = self.sysfs.read(rel)
        except SysfsError as exc:
            raise self._lost(cpu, exc) from exc
        if preference == "default":
            # The kernel never shows "default": it writes the firmware's value and shows
            # its name, or (intel_pstate) the raw number when it matches no name.
            if now == "default" or not (now.isdigit() or now in choices):
                raise CpufreqError(f"cpu {cpu}: wrote EPP 'default', the kernel reports {now!r}")
        elif now != preference:
            raise CpufreqError(f"cpu {cpu}: wrote EPP {preference!r}, the kernel reports {now!r}")

    def unsupported(self) -> list[str]:
        """The unsupported features reported so far (each once), with their reasons."""
        return list(self._reasons.values())

    # -- internals -----------------------------------------------------------------------

    def _report(self, key: str, reason: str, message: str | None = None) -> UnsupportedError:
        if key not in self._reasons:
            self._reasons[key] = reason
            log.warning("unsupported: %s", reason)
        return UnsupportedError(message or reason)

    def _reserved_error(self, cpu: int) -> CpufreqError:
        if cpu in self._reserved:
            return CpufreqError(f"cpu {cpu} is reserved: vmpower does not touch it")
        others = format_cpu_list(self._reserved & self._topology.members(cpu))
        return CpufreqError(
            f"cpu {cpu} shares {self._topology.name(cpu)} with reserved CPU {others}:"
            " vmpower does not touch it"
        )

    def _check_present(self, cpu: int) -> None:
        if isinstance(cpu, bool) or not isinstance(cpu, int) or cpu not in self._present_set:
            present = format_cpu_list(self._present) or "none"
            raise CpufreqError(f"no CPU {cpu!r} (present: {present})")

    def _cpu(self, cpu: int) -> _Cpu:
        c = self._cpus.get(cpu)
        if c is not None:
            return c
        self._check_present(cpu)
        backend = self._backend
        if backend is None:
            if not self._driver:
                raise CpufreqError(f"cpu {cpu} has no cpufreq (no scaling driver registered)")
            raise self._report(
                f"driver:{self._driver}",
                f"scaling driver {self._driver!r} is not supported",
            )
        leader = self._topology.leader(cpu)
        c = self._cpus.get(leader)
        if c is not None:  # another CPU of the policy asked first
            self._cpus[cpu] = c
            return c
        if not self.sysfs.exists(self._topology.dir(cpu)):
            if not self.online(cpu):
                raise CpufreqError(f"cpu {cpu} is offline")
            raise CpufreqError(f"cpu {cpu} has no cpufreq policy")
        try:
            info = backend.probe(leader, leader in self._priority)
        except SysfsError as exc:
            raise CpufreqError(f"cpu {cpu}: cannot read its cpufreq files: {exc}") from exc
        switches = backend.turbo_switches(leader)
        c = _Cpu(leader, info, switches, self._read_switches(switches))
        self._cpus[cpu] = self._cpus[leader] = c
        if not self._reserved_policy(cpu):
            backend.prepare(leader)  # never a reserved CPU's files, not even opened
            # Where a requester new to the CPU starts when no target is set
            # (requested_khz): read through a kept fd, opened once.
            self.sysfs.keep_for_reads(f"{self._topology.dir(leader)}/scaling_cur_freq")
        return c

    def _lost(self, cpu: int, exc: SysfsError) -> CpufreqError:
        """A file access failed: drop the caches; say "offline" when that is why."""
        self._drop(cpu)
        if not self.online(cpu):
            return CpufreqError(f"cpu {cpu} is offline")
        return CpufreqError(f"cpu {cpu}: {exc}")

    def _opt(self, rel: str) -> str | None:
        try:
            return self.sysfs.read(rel)
        except SysfsError:
            return None


# Why a driver shows no turbo range (for unsupported_on).
_NO_TURBO_WHY = {
    "acpi-cpufreq": "no _PSS entry 1 MHz above the rest, and cpuinfo_max_freq not above P0",
    "intel_pstate": "cpuinfo_max_freq is base_frequency",
    "intel_cpufreq": "cpuinfo_max_freq is the highest non-turbo P-state",
    "amd-pstate": "acpi_cppc highest_perf is not above nominal_perf",
    "amd-pstate-epp": "acpi_cppc highest_perf is not above nominal_perf",
    "cppc_cpufreq": "acpi_cppc highest_perf is not above nominal_perf",
}


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


def _nearest(info: CpuInfo, freq_khz: int) -> int:
    asc = info.ascending_khz
    i = bisect.bisect_left(asc, freq_khz)
    if i == 0:
        return asc[0]
    if i == len(asc):
        return asc[-1]
    below, above = asc[i - 1], asc[i]
    return above if above - freq_khz <= freq_khz - below else below


def _int_or(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default
