"""Logging for conode's long-running processes (the agent, the coordinator): one line per record on stderr.

Under systemd, stderr is the journal, which stamps every line itself: a second timestamp in the text would only
repeat it. There the lines carry the record's priority as a ``<N>`` prefix instead (journald turns it into the
entry's priority, so ``journalctl -p warning`` works). systemd says stderr is the journal by setting
``JOURNAL_STREAM`` to the stream's device and inode; a stderr redirected elsewhere keeps its timestamps.
"""

from __future__ import annotations

import logging
import os
import sys

TIMESTAMPED = "%(asctime)s %(name)s %(levelname)s %(message)s"
JOURNAL = "<%(priority)d>%(name)s %(levelname)s %(message)s"
# syslog priorities by logging level (debug 7, info 6, warning 4, error 3, critical 2)
PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def stderr_is_journal() -> bool:
    """Whether stderr is the stream systemd connected to the journal (JOURNAL_STREAM names its device:inode)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        stat = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return (stat.st_dev, stat.st_ino) == (int(device), int(inode))


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.priority = next((p for level, p in PRIORITIES if record.levelno >= level), 7)
        # a multi-line record (a traceback) stays one entry per line, each with the priority
        return "\n".join(f"<{record.priority}>{line}" if i else line
                         for i, line in enumerate(super().format(record).splitlines()))


def configure_logging(level: str) -> None:
    """Log at *level* to stderr: with timestamps, or, on the journal, with priorities instead."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JournalFormatter(JOURNAL) if stderr_is_journal() else logging.Formatter(TIMESTAMPED))
    logging.basicConfig(level=level, handlers=[handler])
