"""Logging like a mail daemon (docs/logging.md), with the real parts an administrator has:
a real Postfix in front of the real daemon, a real rsyslogd filing the `mail` facility in
mail.log as Debian's does, Fail2Ban's own `fail2ban-regex` and `fail2ban-client -t` on the
shipped filter and jail, and `mailwarden log-summary` on the lines rsyslog wrote."""

from __future__ import annotations

import json
import os
import re
import shutil
import smtplib
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemon import Daemon
from postfix import PostfixInstance, postfix_available
from rsyslog import Rsyslog
from rsyslog import available as rsyslog_available

from mailwarden.devtools.devdns import DevDNSServer
from mailwarden.logparse import fields

ROOT = Path(__file__).resolve().parents[2]
FILTER = ROOT / "conf" / "fail2ban" / "filter.d" / "mailwarden.conf"
JAIL = ROOT / "conf" / "fail2ban" / "jail.d" / "mailwarden.local"
FAIL2BAN = Path("/etc/fail2ban")

pytestmark = [
    pytest.mark.skipif(not postfix_available(), reason="Postfix is not installed "
                       "(scripts/setup.sh --test)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="running Postfix needs root"),
    pytest.mark.skipif(not rsyslog_available(), reason="rsyslog is not installed "
                       "(scripts/setup.sh --test)"),
]

MESSAGE = (b"From: Alice <alice@pass.example>\r\nTo: bob@ours.example\r\n"
           b"Subject: hello\r\nMessage-ID: <m1.x@pass.example>\r\n"
           b"Date: Mon, 07 Dec 2026 10:00:00 +0000\r\n\r\nHello.\r\n")


@dataclass
class Stack:
    mx: PostfixInstance
    syslog: Rsyslog
    socket: str
    dns_port: int


@pytest.fixture(scope="module")
def stack(dns_server: DevDNSServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    dns_server.load({
        "pass.example": [{"TXT": "v=spf1 ip4:127.0.0.1 -all"}],
        "fail.example": [{"TXT": "v=spf1 -all"}],
    })
    workdir = tmp_path_factory.mktemp("logging")
    sockets = Path(tempfile.mkdtemp(prefix="mailwarden-logging-"))
    sockets.chmod(0o755)
    syslog = Rsyslog(workdir / "rsyslog")
    syslog.start()
    mx = PostfixInstance(workdir / "postfix", milter=f"unix:{sockets}/milter.sock")
    try:
        mx.start()
        yield Stack(mx, syslog, f"{sockets}/milter.sock", dns_server.port)
    finally:
        mx.stop()
        syslog.stop()
        shutil.rmtree(sockets, ignore_errors=True)


def milter(stack: Stack, workdir: Path, log: dict[str, str]) -> Daemon:
    return Daemon(workdir, {
        "listen": f"unix:{stack.socket}", "socket_mode": "0666",
        "authserv_id": "mx.ours.example", "workers": 1, "drain_timeout": 5,
        "dns": {"nameservers": [f"127.0.0.1:{stack.dns_port}"], "timeout": 1, "lifetime": 2},
        "domains": ["ours.example"],
        "log": log,
        "rules": {"mail": [{"name": "spf", "check": "spf"}],
                  "rcpt": [{"name": "no open relay", "check": "rcpt_relay"}]},
    })


def traffic(port: int, relay_attempts: int) -> None:
    """One message delivered, one refused by SPF at MAIL FROM, and `relay_attempts`
    recipients refused by the relay rule."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        smtp.sendmail("alice@pass.example", ["bob@ours.example"], MESSAGE)
        code, _ = smtp.mail("spoof@fail.example")
        assert code == 550
        smtp.rset()
        smtp.mail("alice@pass.example")
        for n in range(relay_attempts):
            code, _ = smtp.rcpt(f"victim{n}@elsewhere.example")
            assert code >= 500
        smtp.rset()


def fail2ban_config(tmp_path: Path) -> Path:
    """Fail2Ban's installed configuration with the shipped filter and jail added (and the
    Debian sshd jail left out: this machine has no sshd log)."""
    config = tmp_path / "fail2ban"
    shutil.copytree(FAIL2BAN, config)
    (config / "jail.d" / "defaults-debian.conf").unlink(missing_ok=True)
    shutil.copy(FILTER, config / "filter.d")
    shutil.copy(JAIL, config / "jail.d")
    return config


@pytest.mark.skipif(shutil.which("fail2ban-regex") is None,
                    reason="Fail2Ban is not installed (scripts/setup.sh --test)")
def test_mail_log_fail2ban_and_summary(stack: Stack, tmp_path: Path) -> None:
    daemon = milter(stack, tmp_path / "milter",
                    {"target": "syslog", "address": str(stack.syslog.socket)})
    daemon.start()
    try:
        traffic(stack.mx.smtp_port, relay_attempts=3)
        stack.syslog.wait_for_mail("check=rcpt_relay", count=3)
        stack.syslog.wait_for_mail("verdict=continue")
    finally:
        daemon.stop()
    mail_log = stack.syslog.mail()
    # the mail facility: in mail.log, not in the general syslog file; the daemon's stderr
    # (its own file here) holds none of it
    assert re.search(r"mailwarden\[\d+\]: listening on ", mail_log), mail_log
    stack.syslog.send_other("not mail")
    assert "queue_id=" not in stack.syslog.other() and "not mail" not in mail_log
    assert "queue_id=" not in daemon.log()
    decisions = [f for f in map(fields, mail_log.splitlines()) if f is not None]
    delivered = [d for d in decisions if d["verdict"] == "continue" and d["stage"] == "eom"]
    assert len(delivered) == 1, mail_log
    assert delivered[0]["from_domain"] == "pass.example"
    assert delivered[0]["msgid"] == "<m1.x@pass.example>"
    assert delivered[0]["queue_id"] in stack.mx.queue_ids() or delivered[0]["queue_id"] != "-"

    config = fail2ban_config(tmp_path)
    tested = subprocess.run(["fail2ban-client", "-c", str(config), "-t"], capture_output=True,
                            text=True, timeout=60, check=False)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    log_file = tmp_path / "mail.log"
    log_file.write_text(mail_log)

    def banned(filter_spec: str) -> list[str]:
        done = subprocess.run(["fail2ban-regex", "--config", str(config), "-o", "ip",
                               str(log_file), filter_spec],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout.split()

    # relay attempts only, by default; SPF refusals when asked for
    assert banned("mailwarden") == ["127.0.0.1"] * 3
    assert banned('mailwarden[checks="rcpt_relay|spf"]') == ["127.0.0.1"] * 4

    summary = subprocess.run([sys.executable, "-m", "mailwarden", "log-summary", "--json",
                              str(log_file)], capture_output=True, text=True, timeout=60,
                             check=False)
    assert summary.returncode == 0, summary.stderr
    counted = json.loads(summary.stdout)
    assert counted["verdicts"] == {"continue": 1, "reject": 4, "aborted": 1}, counted
    assert counted["refusing_rules"] == {"reject no open relay (rcpt_relay)": 3,
                                         "reject spf (spf)": 1}, counted
    assert counted["refused_clients"] == {"127.0.0.1": 4}
    text = subprocess.run([sys.executable, "-m", "mailwarden", "log-summary", "-"],
                          input=mail_log, capture_output=True, text=True, timeout=60,
                          check=False)
    assert "6 decisions" in text.stdout and "reject no open relay (rcpt_relay)" in text.stdout


def test_a_syslog_restart_loses_no_line(stack: Stack, tmp_path: Path) -> None:
    """While rsyslogd is down, the lines go to standard error; once it is back, to syslog."""
    daemon = milter(stack, tmp_path / "milter",
                    {"target": "syslog", "address": str(stack.syslog.socket)})
    daemon.start()
    try:
        stack.syslog.stop()
        traffic(stack.mx.smtp_port, relay_attempts=1)
        daemon.wait_for_log("rule=spf check=spf")
        stack.syslog.start()
        before = stack.syslog.mail().count("victim0@elsewhere.example")
        traffic(stack.mx.smtp_port, relay_attempts=1)
        stack.syslog.wait_for_mail("victim0@elsewhere.example", count=before + 1)
    finally:
        daemon.stop()
    assert daemon.log().count("check=rcpt_relay") == 1, daemon.log()


def test_journal_target_sends_priority_and_facility(stack: Stack, tmp_path: Path) -> None:
    """The native journal protocol (systemd.journal-fields(7)), received by a socket that
    stands in for journald's."""
    address = tmp_path / "journal.socket"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(address))
    address.chmod(0o666)
    receiver.settimeout(10)
    daemon = milter(stack, tmp_path / "milter", {"target": "journal", "address": str(address)})
    daemon.start()
    entries: list[dict[str, str]] = []
    try:
        traffic(stack.mx.smtp_port, relay_attempts=1)
        while not any("check=rcpt_relay" in e.get("MESSAGE", "") for e in entries):
            entries.append(decode(receiver.recv(1 << 20)))
    finally:
        daemon.stop()
        receiver.close()
    refusal = next(e for e in entries if "check=rcpt_relay" in e["MESSAGE"])
    assert refusal["PRIORITY"] == "6" and refusal["SYSLOG_FACILITY"] == "2"  # info, mail
    assert refusal["SYSLOG_IDENTIFIER"] == "mailwarden" and refusal["SYSLOG_PID"].isdigit()
    assert refusal["MESSAGE"].startswith("queue_id=")
    assert fields(refusal["MESSAGE"]) is not None


def decode(datagram: bytes) -> dict[str, str]:
    entry: dict[str, str] = {}
    rest = datagram
    while rest:
        line, _, after = rest.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            entry[key.decode()] = value.decode()
            rest = after
        else:  # KEY \n length(le64) value \n
            size = struct.unpack("<Q", after[:8])[0]
            entry[line.decode()] = after[8:8 + size].decode()
            rest = after[8 + size + 1:]
    return entry


def test_an_unreachable_target_falls_back_to_stderr(stack: Stack, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-socket"
    daemon = milter(stack, tmp_path / "milter", {"target": "syslog", "address": str(missing)})
    checked = subprocess.run([sys.executable, "-m", "mailwarden", "check-config", "--config",
                              str(daemon.config_path)], capture_output=True, text=True,
                             timeout=60, check=False)
    assert checked.returncode == 0, checked.stderr
    assert f"warning: log.target syslog: {missing}: No such file or directory" in checked.stderr
    daemon.start()
    try:
        traffic(stack.mx.smtp_port, relay_attempts=1)
        daemon.wait_for_log("check=rcpt_relay")
    finally:
        daemon.stop()
    assert "log target syslog is not reachable" in daemon.log()
