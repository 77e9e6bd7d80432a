"""Log lines the way the place they go expects them (`log.target`).

- `stderr`: on a terminal or a plain file, `mailwarden[PID]: LEVEL message`. Under systemd,
  whose journal takes standard error (systemd.exec(5): `JOURNAL_STREAM` names the device and
  inode of the stream it connected), the journal adds `mailwarden[PID]:` itself, so the line
  starts with the syslog priority instead (`<3>` for an error, sd-daemon(3)): `journalctl -p
  err` then finds the errors, and the prefix no longer appears twice.
- `syslog`: RFC 3164 datagrams to the local syslog socket with the configured facility (`mail`
  by default: rsyslog's Debian configuration writes it to /var/log/mail.log, where pflogsumm
  and fail2ban look).
- `journal`: systemd-journald's native protocol (systemd.journal-fields(7)): the message with
  PRIORITY, SYSLOG_FACILITY, SYSLOG_IDENTIFIER and SYSLOG_PID.

A line the syslog or journal socket does not take is written to standard error instead, and
a socket that is not there at start-up makes standard error the target, with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import socket
import struct
import sys
from typing import TextIO

from mailwarden.config.model import Config, LogConfig, LogTarget

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}
SYSLOG_SOCKET = "/dev/log"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENT = "mailwarden"


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


def priority(record: logging.LogRecord) -> int:
    return _PRIORITY.get(record.levelno, 6)


class JournalFormatter(logging.Formatter):
    """Every line of a record (a traceback's too) with the record's priority in front."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


_PLAIN = logging.Formatter(f"{IDENT}[%(process)d]: %(levelname)s %(message)s")


class _Fallback:
    """What a socket handler does with a line its socket refused: standard error gets it."""

    def handleError(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # nowhere left to log to
            sys.stderr.write(_PLAIN.format(record) + "\n")


class SyslogHandler(_Fallback, logging.handlers.SysLogHandler):
    """`<PRI>mailwarden[PID]: message` (RFC 3164 §4.1.3 TAG) over the local syslog socket."""

    def __init__(self, address: str, facility: str) -> None:
        super().__init__(address, facility=self.facility_names[facility])
        self.ident = f"{IDENT}[{os.getpid()}]: "

    def emit(self, record: logging.LogRecord) -> None:
        self.ident = f"{IDENT}[{os.getpid()}]: "  # a forked worker logs its own PID
        super().emit(record)


class JournalHandler(_Fallback, logging.Handler):
    """One datagram per line to journald's native socket."""

    def __init__(self, address: str, facility: str) -> None:
        super().__init__()
        self.address = address
        self.facility = logging.handlers.SysLogHandler.facility_names[facility]
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {"MESSAGE": self.format(record), "PRIORITY": str(priority(record)),
                      "SYSLOG_FACILITY": str(self.facility), "SYSLOG_IDENTIFIER": IDENT,
                      "SYSLOG_PID": str(os.getpid())}
            self.socket.sendto(journal_datagram(fields), self.address)
        except Exception:  # logging's contract: handleError decides
            self.handleError(record)

    def close(self) -> None:
        self.socket.close()
        super().close()


def journal_datagram(fields: dict[str, str]) -> bytes:
    """The native protocol: `KEY=value\\n`, or, for a value with a newline, the key, a newline,
    the value's length as 64-bit little-endian, the value and a newline."""
    out = bytearray()
    for key, text in fields.items():
        data = text.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def reachable(address: str) -> str:
    """Empty when a datagram socket can reach `address`, else why not."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(address)
        except OSError as exc:
            return f"{address}: {exc.strerror or exc}"
    return ""


def socket_of(config: LogConfig) -> str:
    if config.address:
        return config.address
    return JOURNAL_SOCKET if config.target is LogTarget.JOURNAL else SYSLOG_SOCKET


def log_warnings(config: Config) -> list[str]:
    """What `check-config` says of the log target: a socket that is not there."""
    if config.log.target is LogTarget.STDERR:
        return []
    problem = reachable(socket_of(config.log))
    return [f"log.target {config.log.target}: {problem}; the daemon would log to standard "
            f"error instead"] if problem else []


def configure_logging(level: str, config: LogConfig | None = None,
                      stream: TextIO | None = None) -> None:
    config = config or LogConfig()
    out = sys.stderr if stream is None else stream
    handler: logging.Handler
    problem = ""
    if config.target is not LogTarget.STDERR:
        address = socket_of(config)
        problem = reachable(address)
    if config.target is LogTarget.SYSLOG and not problem:
        handler = SyslogHandler(address, config.facility)
        handler.setFormatter(logging.Formatter("%(message)s"))
    elif config.target is LogTarget.JOURNAL and not problem:
        handler = JournalHandler(address, config.facility)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(out)
        handler.setFormatter(JournalFormatter("%(message)s") if under_journald(out) else _PLAIN)
    # force=True removes and closes the handlers of a previous configuration
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
    if problem:
        logging.getLogger("mailwarden").warning(
            "log target %s is not reachable (%s): logging to standard error", config.target,
            problem)
