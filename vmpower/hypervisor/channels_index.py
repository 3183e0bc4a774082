"""The channels directory's names, kept current by inotify, for one VM's look-up on the
owner thread.

``add_vm`` looks up one VM's sockets in the channels directory. Without an index that
is 64 probes of ``<vm>.0`` … ``<vm>.63`` (DPDK serves channels 0..63), 0.1-0.4 ms idle
and 0.6 ms on the monitor loop under 1000 guest req/s at 1000 VMs, a quarter of
``add_vm``'s time (issue #16). With the index they are 64 look-ups in a set of names
(about 12 µs) and a ``stat`` of the VM's own sockets (``domain_xml.probe_channels``
given the names).

How it stays exact: one inotify watch on the directory, then one listing of its names
(made off the loop by the caller, ``list_channels``: about 10 ms at 4000 VMs). Every
event queued since the watch was set is replayed on that listing: a name's last event
says whether it exists now, and a name without one has not changed since before the
listing began. Each look-up first reads the events queued since the last (inotify
queues them as the directory changes, so nothing done before the look-up is missed).

When it cannot be exact it says so (``lookup`` returns None) and the caller probes as
before: no inotify (or past fs.inotify.max_user_instances or max_user_watches), no
directory yet, a listing not yet back, the directory deleted or moved, or more events
queued than one look-up reads (a burst of VMs starting, or the kernel's queue
overflowed): parsing them would cost the loop more than the probe. The index is then
rebuilt from a new listing (a new watch first when the directory went), at most once
every RELIST_MIN_S.

What it holds are names, whatever their type: a name is served as a socket after the
``stat`` the probe makes (a socket, following a link); the connect checks it again
(trust).

Owner thread only, like the registry's other state.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

from vmpower import inotify
from vmpower.hypervisor.domain_xml import MAX_DIR_CHANNELS, probe_channels

log = logging.getLogger(__name__)

_WATCH = (
    inotify.IN_CREATE
    | inotify.IN_DELETE
    | inotify.IN_MOVED_FROM
    | inotify.IN_MOVED_TO
    | inotify.IN_DELETE_SELF
    | inotify.IN_MOVE_SELF
    | inotify.IN_ONLYDIR
)
_ADDED = inotify.IN_CREATE | inotify.IN_MOVED_TO
_REMOVED = inotify.IN_DELETE | inotify.IN_MOVED_FROM
# The watch is no longer the directory's (deleted, moved, unmounted, removed).
_GONE = inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF | inotify.IN_UNMOUNT | inotify.IN_IGNORED
# One look-up parses at most this much of the queue (~500 events, ~0.5 ms); more, and
# the index is dropped and listed again (off the loop).
READ_BYTES = 16 * 1024
# Events kept for the replay while the listing is made; past it, start again.
REPLAY_MAX = 1 << 16
RELIST_MIN_S = 1.0  # listings (after a failure, a drop) are not asked for more often

Listing = set[str]


def list_channels(channels_dir: Path) -> Listing:
    """The directory's names: the listing ``ChannelsIndex.listed`` takes, made off the
    owner thread."""
    return set(os.listdir(channels_dir))


class ChannelsIndex:
    """One VM's channel sockets from an index of the channels directory (see module)."""

    def __init__(self, channels_dir: Path, clock: Callable[[], float]) -> None:
        self.channels_dir = os.fspath(channels_dir)
        self._clock = clock
        self._inotify: inotify.Inotify | None = None
        self._wd: int | None = None  # the directory's watch
        self._epochs = 0
        self._listing_epoch: int | None = None  # the listing awaited
        self._replay: list[tuple[int, str]] = []  # events since the watch, meanwhile
        self._names: Listing | None = None  # None: not whole now
        self._next_listing_at = 0.0
        self._said_unavailable = False

    # -- the owner's calls -------------------------------------------------------------

    def lookup(self, vm: str) -> dict[int, str] | None:
        """``vm``'s sockets ``{n: path}``; None when the index cannot say now (probe)."""
        if self._names is None and self._listing_epoch is None:
            return None  # dropped (or never built): nothing to keep up to date
        self._read_events()
        names = self._names
        if names is None:
            return None
        return probe_channels(self.channels_dir, vm, names)

    def begin_listing(self) -> int | None:
        """The epoch of a listing to make now (``list_channels``, handed to ``listed``),
        the directory watched first; None: one is awaited, the index is whole, or it
        cannot be built now (no inotify, no directory; tried again later)."""
        if self._listing_epoch is not None or self._names is not None:
            return None
        if self._clock() < self._next_listing_at:
            return None
        if self._wd is None and not self._watch():
            return None
        assert self._inotify is not None
        # What is queued happened before the listing: it shows there, or was replaced.
        while self._inotify.read(READ_BYTES * 4):
            pass
        self._epochs += 1
        self._listing_epoch = self._epochs
        self._replay = []
        return self._epochs

    def listed(self, epoch: int, listing: Listing | None) -> None:
        """The listing made for ``epoch`` (None: it failed); the index is whole once the
        events since the watch are replayed on it."""
        if epoch != self._listing_epoch:
            return  # the index was dropped since: a new listing will be asked for
        if listing is None:
            self._listing_epoch = None
            self._next_listing_at = self._clock() + RELIST_MIN_S
            return
        self._read_events()  # the events up to now join the replay
        if self._listing_epoch != epoch:
            return  # dropped by those events
        self._listing_epoch = None
        self._names = listing
        replay, self._replay = self._replay, []
        for mask, name in replay:
            self._apply(mask, name)

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        self._wd = None
        self._names = None
        self._listing_epoch = None

    # -- inside --------------------------------------------------------------------------

    def _watch(self) -> bool:
        try:
            if self._inotify is None:
                self._inotify = inotify.Inotify()
            self._wd = self._inotify.add_watch(self.channels_dir, _WATCH)
        except OSError as exc:
            self._next_listing_at = self._clock() + RELIST_MIN_S
            # ENOENT: no directory yet (QEMU makes it). Else the kernel refused: no
            # inotify, or past fs.inotify.max_user_instances or max_user_watches.
            if exc.errno != errno.ENOENT and not self._said_unavailable:
                self._said_unavailable = True
                log.info(
                    "channels directory %s not indexed (%s): each add_vm probes its VM's "
                    "%d candidate sockets",
                    self.channels_dir,
                    exc.strerror or exc,
                    MAX_DIR_CHANNELS,
                )
            return False
        return True

    def _read_events(self) -> None:
        inotify_ = self._inotify
        assert inotify_ is not None
        queued = inotify_.pending_bytes()
        if not queued:
            return
        if queued > READ_BYTES:
            self._drop(f"{queued} bytes of changes queued (a burst, or events lost)", True)
            return
        wd = self._wd
        for event_wd, mask, name in inotify.events(inotify_.read(READ_BYTES)):
            if mask & inotify.IN_Q_OVERFLOW:
                self._drop("events were lost (past fs.inotify.max_queued_events)", True)
                return
            if event_wd != wd:
                continue  # a watch given up before
            if mask & _GONE:
                self._drop("the directory was deleted or moved", False)
                return
            if self._names is not None:
                self._apply(mask, name)
            elif self._listing_epoch is not None:
                if len(self._replay) >= REPLAY_MAX:
                    self._drop("it changed too much while it was listed", True)
                    return
                self._replay.append((mask, name))

    def _apply(self, mask: int, name: str) -> None:
        names = self._names
        assert names is not None
        if mask & _REMOVED:
            names.discard(name)
        elif mask & _ADDED:
            names.add(name)

    def _drop(self, why: str, keep_watch: bool) -> None:
        """The index is no longer exact: probe until a new listing makes it whole (not
        asked for sooner than RELIST_MIN_S: a directory that keeps changing faster than
        it is read costs one listing that often, at most; so does this line)."""
        log.info("channels directory index dropped: %s; add_vm probes until it is rebuilt", why)
        self._names = None
        self._listing_epoch = None
        self._replay = []
        self._next_listing_at = self._clock() + RELIST_MIN_S
        if not keep_watch and self._wd is not None:
            assert self._inotify is not None
            self._inotify.rm_watch(self._wd)
            self._wd = None
