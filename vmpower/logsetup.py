"""Where vmpowerd's log goes and how its lines look: a terminal, a file, or journald.

Under systemd, stderr is a stream to journald, which stamps each line itself and
reads its priority from a ``<N>`` prefix (sd-daemon(3)). systemd says so through
``JOURNAL_STREAM=<device>:<inode>`` (systemd.exec(5)): when that names the stream
stderr really is (a child may have redirected it), lines get the prefix and no time;
otherwise they keep the usual ``time LEVEL logger: message`` form.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TextIO

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "<%(journal_priority)d>%(name)s: %(message)s"

# syslog(3) priorities, as journald reads them from the prefix.
_PRIORITIES = (
    (logging.CRITICAL, 2),  # LOG_CRIT
    (logging.ERROR, 3),  # LOG_ERR
    (logging.WARNING, 4),  # LOG_WARNING
    (logging.INFO, 6),  # LOG_INFO
)
_DEBUG_PRIORITY = 7  # LOG_DEBUG


def journal_priority(levelno: int) -> int:
    for level, priority in _PRIORITIES:
        if levelno >= level:
            return priority
    return _DEBUG_PRIORITY


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.journal_priority = journal_priority(record.levelno)
        text = super().format(record)
        # journald takes one line per entry: a traceback's lines carry the same priority.
        prefix = f"<{record.journal_priority}>"
        return text.replace("\n", "\n" + prefix)


def stream_is_journal(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``stream`` is the journald stream systemd named in JOURNAL_STREAM."""
    value = environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return st.st_dev == int(device) and st.st_ino == int(inode)


def setup_logging(
    level: str, stream: TextIO, environ: Mapping[str, str] = os.environ
) -> logging.Handler:
    """Log to ``stream`` at ``level`` (any case), in journald's form when it is journald."""
    handler = logging.StreamHandler(stream)
    if stream_is_journal(stream, environ):
        handler.setFormatter(_JournalFormatter(JOURNAL_FORMAT))
    else:
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
