"""A private rsyslogd for a test: its socket in WORKDIR/dev-log stands in for /dev/log, and it
files lines the way Debian's /etc/rsyslog.conf does (`mail.*` to mail.log, the rest to
syslog), so a test reads what an administrator would find in /var/log/mail.log."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"


def available() -> bool:
    return Path(RSYSLOGD).exists()


class Rsyslog:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.socket = workdir / "dev-log"
        self.mail_log = workdir / "mail.log"
        self.other_log = workdir / "syslog"
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "rsyslog.conf").write_text(
            f'global(workDirectory="{workdir}")\n'
            'module(load="imuxsock" SysSock.Use="off")\n'
            f'input(type="imuxsock" Socket="{self.socket}")\n'
            f'mail.* action(type="omfile" file="{self.mail_log}")\n'
            f'*.*;mail.none action(type="omfile" file="{self.other_log}")\n')

    def start(self, timeout: float = 10.0) -> None:
        self.process = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(self.workdir / "rsyslog.conf"),
             "-i", str(self.workdir / "rsyslogd.pid")],
            stdout=subprocess.DEVNULL, stderr=(self.workdir / "rsyslogd.err").open("ab"))
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("rsyslogd did not start: "
                                     + (self.workdir / "rsyslogd.err").read_text())
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            self.process.wait(10)
        self.process = None
        self.socket.unlink(missing_ok=True)

    def send_other(self, text: str) -> None:
        """A line of another facility (daemon.info): what must stay out of mail.log."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as out:
            out.sendto(f"<30>canary: {text}".encode(), str(self.socket))
        deadline = time.monotonic() + 10
        while text not in self.other():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not filed by rsyslogd")
            time.sleep(0.05)

    def other(self) -> str:
        return self.other_log.read_text(errors="replace") if self.other_log.exists() else ""

    def mail(self) -> str:
        return self.mail_log.read_text(errors="replace") if self.mail_log.exists() else ""

    def wait_for_mail(self, text: str, count: int = 1, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.mail().count(text) >= count:
                return self.mail()
            time.sleep(0.05)
        raise AssertionError(f"{text!r} (x{count}) not in mail.log:\n{self.mail()}")
