"""Log lines the way the place they go expects them.

On a terminal or a plain file: `mailwarden[PID]: LEVEL message`. Under systemd, whose journal
takes standard error (systemd.exec(5): `JOURNAL_STREAM` names the device and inode of the
stream it connected), the journal adds `mailwarden[PID]:` itself, so the line starts with the
syslog priority instead (`<3>` for an error, sd-daemon(3)): `journalctl -p err` then finds the
errors, and the prefix no longer appears twice.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


def under_journald(stream: TextIO) -> bool:
    """Is `stream` the one systemd connected to its journal?"""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


class JournalFormatter(logging.Formatter):
    """Every line of a record (a traceback's too) with the record's priority in front."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).split("\n"))


def configure_logging(level: str, stream: TextIO | None = None) -> None:
    out = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(out)
    if under_journald(out):
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("mailwarden[%(process)d]: %(levelname)s "
                                               "%(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
