"""A private Sendmail 8.17 on loopback for the tests, with a milter attached, relaying every
message to an SMTP sink (smtpsink.py) that stores it byte for byte.

Debian's `sendmail-bin` conflicts with `postfix`, so `scripts/setup.sh --test` downloads it
(with `sendmail-cf` and `libwrap0`) and unpacks it into `.cache/sendmail/root` instead of
installing it; the binary runs from there with LD_LIBRARY_PATH pointing at the unpacked
libraries (its setgid bit is removed, since ld.so ignores LD_LIBRARY_PATH for setgid binaries).
`sendmail.cf` is built with m4 from the unpacked `cf/m4/cf.m4`.

Sendmail looks its own host name up at start: in a machine without a reachable DNS server that
takes minutes. It runs in a private mount namespace (`unshare --mount`) where /etc/hosts names
this host `HOST.sendmail.test` and /etc/resolv.conf points at a loopback address nobody
answers on, so every lookup fails at once; nothing outside the namespace changes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / ".cache" / "sendmail" / "root"
BINARY = ROOT / "usr" / "libexec" / "sendmail" / "sendmail"
CF_DIR = ROOT / "usr" / "share" / "sendmail" / "cf"
LIBS = ROOT / "usr" / "lib" / "x86_64-linux-gnu"
SINK_SCRIPT = Path(__file__).with_name("smtpsink.py")
DOMAIN = "mx.sendmail.test"

MC = """divert(-1)
divert(0)dnl
VERSIONID(`mailwarden tests')dnl
OSTYPE(`linux')dnl
define(`confDOMAIN_NAME', `{domain}')dnl
define(`confDONT_PROBE_INTERFACES', `True')dnl
define(`QUEUE_DIR', `{work}/queue')dnl
define(`confPID_FILE', `{work}/sendmail.pid')dnl
define(`ALIAS_FILE', `{work}/aliases')dnl
define(`STATUS_FILE', `{work}/statistics')dnl
define(`confSERVICE_SWITCH_FILE', `{work}/service.switch')dnl
define(`confLOG_LEVEL', `9')dnl
define(`confMAX_MESSAGE_SIZE', `0')dnl
define(`SMART_HOST', `esmtp:[127.0.0.1]')dnl
define(`ESMTP_MAILER_ARGS', `TCP $h {sink_port}')dnl
define(`confDONT_BLAME_SENDMAIL', `AssumeSafeChown,GroupWritableDirPathSafe,TrustStickyBit')dnl
FEATURE(`nocanonify')dnl
FEATURE(`no_default_msa')dnl
FEATURE(`promiscuous_relay')dnl
FEATURE(`accept_unresolvable_domains')dnl
FEATURE(`accept_unqualified_senders')dnl
DAEMON_OPTIONS(`Port={port}, Addr=127.0.0.1, Name=MTA')dnl
INPUT_MAIL_FILTER(`mailwarden', `S={milter}, F=T, T={timeouts}')dnl
MAILER(`local')dnl
MAILER(`smtp')dnl
"""
RUN = """#!/bin/sh
mount --bind {work}/hosts /etc/hosts && mount --bind {work}/resolv.conf /etc/resolv.conf || exit 1
LD_LIBRARY_PATH={libs}
export LD_LIBRARY_PATH
exec {binary} -C {work}/sendmail.cf -bD
"""


def sendmail_problem() -> str | None:
    """Why a private Sendmail cannot run here, or None."""
    if os.geteuid() != 0:
        return "running Sendmail needs root"
    if not os.access(BINARY, os.X_OK):
        return f"Sendmail is not unpacked in {ROOT} (bash scripts/setup.sh --test)"
    for tool in ("m4", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (bash scripts/setup.sh --test)"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class SendmailInstance:
    """Sendmail (and its sink) under `workdir`, the milter at `milter` (unix:PATH or
    inet:PORT@HOST); `start()`, `stop()`, `messages()`, `queue()`."""

    def __init__(self, workdir: Path, milter: str, timeouts: str = "S:30s;R:60s;E:5m") -> None:
        self.workdir = workdir
        self.milter = milter
        self.timeouts = timeouts  # the milter's T= (R: how long a reply may take)
        self.smtp_port = 0
        self.sink_dir = workdir / "sink"
        self._sendmail: subprocess.Popen[bytes] | None = None
        self._sink: subprocess.Popen[bytes] | None = None

    @property
    def queue_dir(self) -> Path:
        return self.workdir / "queue"

    def start(self, timeout: float = 30.0) -> None:
        work = self.workdir
        work.mkdir(parents=True, exist_ok=True)
        self.queue_dir.mkdir(mode=0o700, exist_ok=True)
        self.sink_dir.mkdir(exist_ok=True)
        (work / "aliases").touch()
        (work / "service.switch").write_text("hosts files\naliases files\n")
        host = socket.gethostname().split(".")[0]
        (work / "hosts").write_text(f"127.0.0.1 localhost\n127.0.0.1 {host}.sendmail.test "
                                    f"{host}\n")
        (work / "resolv.conf").write_text("nameserver 127.0.0.254\noptions timeout:1 "
                                          "attempts:1\n")
        sink_port = self._start_sink()
        self.smtp_port = free_port()
        (work / "test.mc").write_text(MC.format(domain=DOMAIN, work=work, port=self.smtp_port,
                                                sink_port=sink_port, milter=self.milter,
                                                timeouts=self.timeouts))
        with (work / "sendmail.cf").open("wb") as cf:
            subprocess.run(["m4", f"-D_CF_DIR_={CF_DIR}/", str(CF_DIR / "m4" / "cf.m4"),
                            str(work / "test.mc")], stdout=cf, stderr=subprocess.DEVNULL,
                           check=True, timeout=30)
        run = work / "run.sh"
        run.write_text(RUN.format(work=work, libs=LIBS, binary=BINARY))
        run.chmod(0o755)
        with (work / "sendmail.log").open("ab") as log:
            self._sendmail = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", str(run)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError), \
                    socket.create_connection(("127.0.0.1", self.smtp_port), timeout=1) as probe:
                if probe.makefile("rb").readline().startswith(b"220"):
                    return
            if self._sendmail.poll() is not None or time.monotonic() > deadline:
                log_text = (work / "sendmail.log").read_text(errors="replace")
                self.stop()
                raise RuntimeError(f"Sendmail did not start on 127.0.0.1:{self.smtp_port}:\n"
                                   f"{log_text}")
            time.sleep(0.1)

    def _start_sink(self) -> int:
        port_file = self.workdir / "sink.port"
        port_file.unlink(missing_ok=True)
        with (self.workdir / "sink.log").open("ab") as log:
            self._sink = subprocess.Popen(
                [sys.executable, str(SINK_SCRIPT), "--dir", str(self.sink_dir),
                 "--port-file", str(port_file), "--host", "127.0.0.1", "--port", "0"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + 10
        while not port_file.exists():
            if self._sink.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the SMTP sink did not start")
            time.sleep(0.02)
        return int(port_file.read_text())

    def stop(self) -> None:
        """Sendmail's process group (the daemon and the children it forked), then the sink:
        both were started here, in sessions of their own."""
        for process in (self._sendmail, self._sink):
            if process is None or process.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        self._sendmail = self._sink = None

    def messages(self) -> list[bytes]:
        """Every message the sink has received so far, in order of arrival."""
        return [eml.read_bytes() for eml in sorted(self.sink_dir.glob("*.eml"))]

    def wait_for(self, marker: bytes, timeout: float = 30.0) -> bytes:
        """The delivered message containing `marker`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for raw in self.messages():
                if marker in raw:
                    return raw
            time.sleep(0.05)
        raise AssertionError(f"no message with {marker!r} was delivered; queue: "
                             f"{sorted(p.name for p in self.queue_dir.iterdir())}")

    def quarantined(self) -> list[str]:
        """Queue files Sendmail holds as quarantined (hf*: held, not delivered) and their
        quarantine reasons (the q line)."""
        reasons = []
        for held in sorted(self.queue_dir.glob("hf*")):
            for line in held.read_text(errors="replace").splitlines():
                if line.startswith("q"):
                    reasons.append(line[1:])
        return reasons
