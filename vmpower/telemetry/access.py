"""Access lists: which signals a client may read and which controls it may write.

Layout under ``telemetry.access_dir`` (GEOPM's service layout)::

    0.DEFAULT_ACCESS/allowed_signals     everyone
    0.DEFAULT_ACCESS/allowed_controls
    0.DEFAULT_ACCESS/allowed_controls_on_vm_cpus
    <group>/allowed_signals              members of Unix group <group>
    <group>/allowed_controls
    <group>/allowed_controls_on_vm_cpus

One name per line; ``#`` starts a comment; blank lines are ignored. A name the catalogue
does not know is an error naming the file and line (an access list is not guessed at).

The effective rights of a client are the default lists plus the lists of every group it
belongs to (its primary group from the socket's credentials and its supplementary
groups from the group database). Every allowed control is also a readable signal.
``allowed_controls_on_vm_cpus`` names the controls that may also be written on host CPUs
a running VM is pinned to (issue #12 point 5: a session must not take a VM's CPUs
unless granted); each is also an allowed control. Root gets everything. Defaults when
a default list is missing: writing is root-only (no control, none on VM CPUs), and
every signal may be read except the sensitive ones (energy: the kernel made RAPL
counters root-only after CVE-2020-8694). Lists are read when a session starts, so its
rights are fixed for its whole life.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from vmpower.errors import TelemetryError
from vmpower.telemetry.catalog import CATALOG, Request

DEFAULT_GROUP = "0.DEFAULT_ACCESS"
SIGNALS_FILE = "allowed_signals"
CONTROLS_FILE = "allowed_controls"
VM_CPU_CONTROLS_FILE = "allowed_controls_on_vm_cpus"

GroupsOf = Callable[[int, int], list[str]]


def unix_groups(uid: int, gid: int) -> list[str]:
    """Names of the primary group ``gid`` and of every supplementary group of ``uid``."""
    gids = {gid}
    try:
        user = pwd.getpwuid(uid).pw_name
        gids.update(os.getgrouplist(user, gid))
    except (KeyError, OSError):
        pass  # a uid without a passwd entry has only the primary group
    names = []
    for group_id in sorted(gids):
        try:
            names.append(grp.getgrgid(group_id).gr_name)
        except KeyError:
            continue
    return names


@dataclass(frozen=True)
class Rights:
    """What one client may do; ``everything`` for root."""

    signals: frozenset[str]
    controls: frozenset[str]
    everything: bool = False
    # the controls it may write on host CPUs a running VM is pinned to, too
    vm_cpu_controls: frozenset[str] = frozenset()

    def may_read(self, name: str) -> bool:
        return self.everything or name in self.signals or name in self.controls

    def may_write(self, name: str) -> bool:
        return self.everything or name in self.controls

    def may_write_on_vm_cpus(self, name: str) -> bool:
        return self.everything or name in self.vm_cpu_controls


class AccessLists:
    """Reads the lists under ``access_dir`` and answers for a client's uid and gid."""

    def __init__(self, access_dir: str | os.PathLike[str], groups_of: GroupsOf = unix_groups):
        self.access_dir = Path(access_dir)
        self._groups_of = groups_of

    def _read(self, path: Path) -> frozenset[str] | None:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TelemetryError(f"cannot read access list {path}: {exc.strerror}") from None
        names: set[str] = set()
        for number, raw in enumerate(text.splitlines(), 1):
            name = raw.split("#", 1)[0].strip()
            if not name:
                continue
            if name not in CATALOG:
                raise TelemetryError(
                    f"access list {path}:{number}: unknown signal or control {name!r}"
                )
            names.add(name)
        return frozenset(names)

    def rights(self, uid: int, gid: int) -> Rights:
        if uid == 0:
            return Rights(frozenset(CATALOG), frozenset(CATALOG), everything=True)
        default_dir = self.access_dir / DEFAULT_GROUP
        signals = self._read(default_dir / SIGNALS_FILE)
        if signals is None:
            signals = frozenset(n for n, i in CATALOG.items() if not i.sensitive)
        controls = self._read(default_dir / CONTROLS_FILE) or frozenset()
        on_vm_cpus = self._read(default_dir / VM_CPU_CONTROLS_FILE) or frozenset()
        for group in self._groups_of(uid, gid):
            if group == DEFAULT_GROUP or "/" in group or group.startswith("."):
                continue
            group_dir = self.access_dir / group
            signals |= self._read(group_dir / SIGNALS_FILE) or frozenset()
            controls |= self._read(group_dir / CONTROLS_FILE) or frozenset()
            on_vm_cpus |= self._read(group_dir / VM_CPU_CONTROLS_FILE) or frozenset()
        controls |= on_vm_cpus
        return Rights(signals | controls, controls, vm_cpu_controls=on_vm_cpus)

    def check(
        self, uid: int, gid: int, signals: Iterable[Request], controls: Iterable[Request]
    ) -> Rights:
        """The client's rights; TelemetryError (one line) naming the first refused request."""
        rights = self.rights(uid, gid)
        for request in signals:
            if not rights.may_read(request.name):
                raise TelemetryError(
                    f"access denied: uid {uid} may not read {request.name}"
                    f" (see the access lists in {self.access_dir})"
                )
        for request in controls:
            if not rights.may_write(request.name):
                allowed = ", ".join(sorted(rights.controls)) or "none"
                raise TelemetryError(
                    f"access denied: uid {uid} may not write {request.name} (controls it"
                    f" may write: {allowed}; writing is root-only unless {self.access_dir}"
                    " allows it)"
                )
        return rights
