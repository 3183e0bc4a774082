"""Which files vmpowerd may trust: owners and modes, checked before they are used.

Another local user must not be able to steer the daemon through the file system: be
served as a VM by binding ``<vm>.<n>`` in the channel directory, hand it a FIFO, or
make it "restore" a file of their choosing. The models are sshd's StrictModes (every
directory from the file up to ``/`` owned by root or the user and not writable by
others) and GEOPM's ``SecurePath`` / ``is_secure_file`` (owned by the effective user,
no group or other bits, never through a symbolic link).

The rules, precisely:

* **Trusted owners**: root, the daemon's effective user, and the QEMU user
  (``channels.qemu_user``) where the channel directory is concerned, since QEMU binds
  the sockets there. A QEMU user that does not exist on the host is not trusted (said
  once, at start). ``configure`` sets the process-wide set once at start-up.
* **Directories** (``check_directory``): the path is resolved one component at a time,
  as the kernel would. Every directory passed, from ``/`` down, must be owned by a
  trusted user and not writable by group or others, except that a parent (not the
  directory itself) may be writable when it is sticky (``/tmp``, 1777 root): in a
  sticky directory only an entry's owner may rename or remove it, so a trusted entry
  there cannot be replaced. Every symbolic link followed must be owned by a trusted
  user (whoever owns the link decides where it points). The directory itself must not
  be writable by group or others even when sticky: sticky does not stop others from
  *creating* entries, such as a socket named after a VM before QEMU binds it.
* **Sockets** (``socket_problem``): the path itself (``lstat``, not followed) must be a
  socket owned by a trusted user.
* **Private files** (``private_file_problem``): a regular file, not a symbolic link,
  owned by the effective user, no group or other permission bits (0600 or stricter).

POSIX ACLs are not looked at: like sshd, only owner and mode bits.
"""

from __future__ import annotations

import logging
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from vmpower.errors import VmpowerError

log = logging.getLogger("vmpower.trust")

ROOT_UID = 0
CHANNEL_DIR_MODE = 0o755  # see ensure_channel_dir
MAX_SYMLINKS = 40  # the kernel's own limit (ELOOP) on links followed in one resolution
_GROUP_OTHER_WRITE = stat.S_IWGRP | stat.S_IWOTH


class UntrustedPathError(VmpowerError):
    """A path vmpowerd would have to trust is owned or writable by someone it does not trust."""


@dataclass(frozen=True)
class TrustedOwners:
    """The uids whose files and directories the daemon trusts, with names for messages."""

    uids: frozenset[int]
    names: tuple[str, ...]  # "root", "vmpowerd's user (uid 1000)", "libvirt-qemu (uid 999)"
    qemu_uid: int | None = None
    qemu_gid: int | None = None

    def __contains__(self, uid: object) -> bool:
        return uid in self.uids

    def describe(self) -> str:
        if len(self.names) == 1:
            return self.names[0]
        return ", ".join(self.names[:-1]) + " or " + self.names[-1]


def daemon_owners() -> TrustedOwners:
    """Root and the daemon's effective user: whom the daemon trusts without configuration."""
    euid = os.geteuid()
    names = ["root"]
    if euid != ROOT_UID:
        names.append(f"vmpowerd's user ({user_name(euid)})")
    return TrustedOwners(frozenset({ROOT_UID, euid}), tuple(names))


def owners_with_qemu(qemu_user: str) -> TrustedOwners:
    """Root, the daemon's user and ``qemu_user`` (when it exists on this host)."""
    base = daemon_owners()
    if not qemu_user:
        return base
    try:
        entry = pwd.getpwnam(qemu_user)
    except KeyError:
        log.warning(
            "channels.qemu_user %r: no such user on this host; sockets and directories it"
            " would own are not trusted (set it to the user QEMU runs as)",
            qemu_user,
        )
        return base
    names = base.names
    if entry.pw_uid not in base.uids:
        names = (*names, f"the QEMU user {qemu_user} (uid {entry.pw_uid})")
    return TrustedOwners(base.uids | {entry.pw_uid}, names, entry.pw_uid, entry.pw_gid)


_configured: TrustedOwners | None = None


def configure(qemu_user: str) -> TrustedOwners:
    """Set the process-wide trusted owners (start-up, once); returns them."""
    global _configured
    _configured = owners_with_qemu(qemu_user)
    return _configured


def trusted_owners() -> TrustedOwners:
    """The owners set by ``configure``; root and the daemon's user until then."""
    return _configured if _configured is not None else daemon_owners()


def user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


# -- directories -------------------------------------------------------------------------


def _directory_problem(path: str, st: os.stat_result, owners: TrustedOwners, leaf: bool) -> str:
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid not in owners:
        return f"{path} is owned by {user_name(st.st_uid)}, not by {owners.describe()}"
    mode = stat.S_IMODE(st.st_mode)
    if mode & _GROUP_OTHER_WRITE and (leaf or not mode & stat.S_ISVTX):
        return f"{path} is writable by group or others (mode {mode:04o})"
    return ""


def check_directory(path: str | os.PathLike[str], owners: TrustedOwners, what: str) -> str:
    """The resolved directory ``path`` names, after every check above; else raise.

    Raises UntrustedPathError with one line: ``what`` (the config key), the path and
    the problem. A missing component raises FileNotFoundError.
    """
    original = os.fspath(path)
    full = original if os.path.isabs(original) else os.path.join(os.getcwd(), original)

    def refuse(problem: str) -> UntrustedPathError:
        where = f"{what} {original}" if what else original
        if problem.startswith(original + " "):
            return UntrustedPathError(f"{where}{problem[len(original) :]}")
        return UntrustedPathError(f"{where}: {problem}")

    pending = [part for part in reversed(full.split("/")) if part not in ("", ".")]
    current = "/"
    problem = _directory_problem(current, os.lstat(current), owners, leaf=not pending)
    if problem:
        raise refuse(problem)
    links = 0
    while pending:
        name = pending.pop()
        if name == "..":
            current = os.path.dirname(current)  # an ancestor: already checked on the way
            continue
        candidate = os.path.join(current, name)
        st = os.lstat(candidate)
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise refuse(f"too many symbolic links at {candidate}")
            if st.st_uid not in owners:
                raise refuse(
                    f"symbolic link {candidate} is owned by {user_name(st.st_uid)},"
                    f" not by {owners.describe()}"
                )
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = "/"
            pending.extend(part for part in reversed(target.split("/")) if part not in ("", "."))
            continue
        problem = _directory_problem(candidate, st, owners, leaf=False)
        if problem:
            raise refuse(problem)
        current = candidate
    # The directory reached is held to the strict rule (no sticky exception); ".." or a
    # link may have made it one that was only checked as a parent on the way.
    problem = _directory_problem(current, os.lstat(current), owners, leaf=True)
    if problem:
        resolved_elsewhere = current != os.path.normpath(full)
        raise refuse(f"(resolved to {current}) {problem}" if resolved_elsewhere else problem)
    return current


def ensure_channel_dir(path: Path, owners: TrustedOwners, what: str = "channels.dir") -> Path:
    """Check the channel directory, creating it first when it does not exist.

    Created with mode 0755, owned by the QEMU user when it exists (QEMU binds the
    sockets there: DPDK's vm_power_manager guide has the directory chowned to it),
    else by the daemon. 0755 and not 0750: the host processes allowed to write a
    ``fifo<N>`` must be able to reach it, and who may is the FIFO's own mode (0660) to
    decide; what matters here is that nobody else may *create* entries. Raises
    UntrustedPathError (one line) when the directory cannot be trusted.
    """
    try:
        os.lstat(path)
    except FileNotFoundError:
        _create_channel_dir(path, owners, what)
    try:
        return Path(check_directory(path, owners, what))
    except FileNotFoundError as exc:
        raise UntrustedPathError(f"{what} {path}: {exc.filename} does not exist") from None
    except OSError as exc:
        raise UntrustedPathError(f"{what} {path}: cannot check it: {exc.strerror}") from None


def _create_channel_dir(path: Path, owners: TrustedOwners, what: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        try:
            os.mkdir(path, CHANNEL_DIR_MODE)
        except FileExistsError:
            return  # someone was faster: the checks decide whether it can be trusted
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, CHANNEL_DIR_MODE)  # mkdir applied the umask
            if owners.qemu_uid is not None and owners.qemu_gid is not None:
                os.fchown(fd, owners.qemu_uid, owners.qemu_gid)
        finally:
            os.close(fd)
    except OSError as exc:
        raise UntrustedPathError(f"{what} {path}: cannot create it: {exc.strerror}") from None
    log.info("%s: created %s (mode %04o)", what, path, CHANNEL_DIR_MODE)


# -- sockets and files -------------------------------------------------------------------


def socket_problem(path: str, owners: TrustedOwners | None = None) -> tuple[str, str] | None:
    """Why the socket at ``path`` must not be served, as (kind, detail); None if it may.

    A path that does not exist (yet) or cannot be examined is not refused here: the
    connect that follows fails and says why.
    """
    owners = owners or trusted_owners()
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return "symbolic link", f"{path} is a symbolic link, not a socket"
    if not stat.S_ISSOCK(st.st_mode):
        return "not a socket", f"{path} is not a socket"
    if st.st_uid not in owners:
        return (
            f"owner uid {st.st_uid}",
            f"{path} is owned by {user_name(st.st_uid)}, not by {owners.describe()}",
        )
    return None


def private_file_problem(st: os.stat_result, path: str) -> str | None:
    """Why a file the daemon keeps for itself cannot be trusted (``fstat`` of it), or None."""
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_uid != os.geteuid():
        return f"{path} is owned by {user_name(st.st_uid)}, not by {user_name(os.geteuid())}"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return f"{path} has mode {mode:04o}: group or others have access (0600 expected)"
    return None
