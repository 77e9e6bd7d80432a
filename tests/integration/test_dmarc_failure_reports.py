"""Failure reports (RFC 9991) end to end: spoofed mail through a real Postfix with mailwarden
attached, DNS from the loopback test server, `mailwarden dmarc failures` sending what the
daemon queued to an SMTP sink. One AFRF report per failing message within the rate limit, read
back by parsedmarc; none when ruf= is absent, when an external ruf= destination is not
authorised, or when the feature is off; a second run sends nothing again."""

from __future__ import annotations

import email.message
import email.policy
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemon import Daemon
from postfix import PostfixInstance, postfix_available

from mailwarden.devtools.devdns import DevDNSServer
from mailwarden.dmarc.store import Store
from mailwarden.logparse import decisions

pytestmark = pytest.mark.skipif(not postfix_available(), reason="Postfix is not installed "
                                "(scripts/setup.sh --test)")

SINK = Path(__file__).with_name("smtpsink.py")
THIRD = "reports.third.example"
ZONE: dict[str, list[object]] = {
    "bounce.example": [{"TXT": "v=spf1 -all"}],
    "_dmarc.ruf.example": [{"TXT": "v=DMARC1; p=reject; ruf=mailto:ruf@ruf.example"}],
    "_dmarc.many.example": [{"TXT": "v=DMARC1; p=quarantine; ruf=mailto:ruf@many.example"}],
    "_dmarc.noruf.example": [{"TXT": "v=DMARC1; p=reject; rua=mailto:agg@noruf.example"}],
    "_dmarc.unverified.example": [{"TXT": f"v=DMARC1; p=reject; ruf=mailto:f@{THIRD}"}],
    "_dmarc.verified.example": [{"TXT": f"v=DMARC1; p=reject; ruf=mailto:f@{THIRD}"}],
    # RFC 9991 §5: the third party authorises reports about verified.example only
    f"verified.example._report._dmarc.{THIRD}": [{"TXT": "v=DMARC1"}],
    "_dmarc.passes.example": [{"TXT": "v=DMARC1; p=reject; ruf=mailto:ruf@passes.example"}],
    "passes.example": [{"TXT": "v=spf1 ip4:127.0.0.0/8 -all"}],
}
for _name in ("ruf", "many", "noruf", "unverified", "verified", "passes"):
    ZONE.setdefault(f"{_name}.example", []).append({"A": "192.0.2.1"})


@dataclass
class Stack:
    daemon: Daemon
    postfix: PostfixInstance
    workdir: Path
    sink_dir: Path
    config: dict[str, object]


@pytest.fixture(scope="module")
def stack(dns_server: DevDNSServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("failure-reports")
    dns_server.load(ZONE)
    sink_dir, port_file = workdir / "sink", workdir / "sink.port"
    sink = subprocess.Popen([sys.executable, str(SINK), "--dir", str(sink_dir),
                             "--port-file", str(port_file)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while not port_file.exists():
        assert sink.poll() is None and time.monotonic() < deadline, "smtpsink did not start"
        time.sleep(0.02)
    sockets = Path(tempfile.mkdtemp(prefix="mailwarden-ruf-"))
    sockets.chmod(0o755)
    config: dict[str, object] = {
        "listen": f"unix:{sockets}/milter.sock", "socket_mode": "0666",
        "authserv_id": "mx.ours.example", "workers": 2, "drain_timeout": 5,
        "dns": {"nameservers": [f"127.0.0.1:{dns_server.port}"], "timeout": 0.5,
                "lifetime": 1.0},
        "dmarc": {
            "store": str(workdir / "dmarc.db"),
            "reports": {"org_name": "Ours", "email": "dmarc-reports@ours.example",
                        "smarthost": f"127.0.0.1:{port_file.read_text()}",
                        # the test's mail comes from loopback, which reports leave out
                        "include_internal_sources": True},
            "failure_reports": {"rate_limit": 3},
        },
        "rules": {
            "mail": [{"name": "spf", "check": "spf", "on": {"fail": "continue"}}],
            "eom": [{"name": "dmarc", "check": "dmarc"}],
        },
    }
    daemon = Daemon(workdir / "milter", config)
    daemon.start()
    postfix = PostfixInstance(workdir / "postfix", milter=f"unix:{sockets}/milter.sock")
    try:
        postfix.start()
        yield Stack(daemon, postfix, workdir, sink_dir, config)
    finally:
        postfix.stop()
        daemon.stop()
        sink.terminate()
        sink.wait(timeout=10)
        shutil.rmtree(sockets, ignore_errors=True)


def send(stack: Stack, domain: str, tag: str, mail_from: str = "x@bounce.example") -> None:
    data = (f"From: Someone <someone@{domain}>\r\nTo: <alice@ours.example>\r\n"
            f"Subject: {tag} see http://phish.example/\r\nMessage-ID: <{tag}@test>\r\n\r\n"
            "body\r\n").encode()
    with smtplib.SMTP("127.0.0.1", stack.postfix.smtp_port, timeout=60) as smtp:
        smtp.ehlo("client.bounce.example")
        try:
            smtp.sendmail(mail_from, ["alice@ours.example"], data)
        except smtplib.SMTPDataError as exc:
            assert exc.smtp_code == 550, exc


def queued(stack: Stack) -> int:
    store = Store.open(str(stack.workdir / "dmarc.db"))
    try:
        return int(store.read("SELECT count(*) FROM failure_reports")[0][0])
    finally:
        store.close()


def failures_command(stack: Stack) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailwarden", "dmarc", "failures", "--config",
                           str(stack.daemon.config_path)], capture_output=True, text=True,
                          timeout=120)


def sunk(stack: Stack) -> list[tuple[list[str], bytes]]:
    import json

    return [(json.loads(eml.with_suffix(".json").read_text())["rcpt_tos"], eml.read_bytes())
            for eml in sorted(stack.sink_dir.glob("*.eml"))]


def test_one_report_per_failing_message_within_the_rate_limit(stack: Stack) -> None:
    send(stack, "ruf.example", "f-ruf")
    for n in range(5):
        send(stack, "many.example", f"f-many-{n}")  # rate_limit 3: two are dropped
    send(stack, "noruf.example", "f-noruf")  # no ruf=: nothing
    send(stack, "unverified.example", "f-unverified")  # queued, never authorised
    send(stack, "verified.example", "f-verified")
    send(stack, "passes.example", "f-pass", "x@passes.example")  # DMARC passes, fo=0: none
    stack.daemon.wait_for_log("stage=eom", count=10, timeout=60)
    deadline = time.monotonic() + 30
    while queued(stack) < 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # a seventh would be a bug: give it the chance to show
    assert queued(stack) == 6
    assert stack.daemon.log().count("rate-limited") == 2

    done = failures_command(stack)
    assert done.returncode == 0, done.stdout + done.stderr
    mails = sunk(stack)
    assert sorted(rcpt for rcpts, _ in mails for rcpt in rcpts) == (
        ["f@reports.third.example"] + ["ruf@many.example"] * 3 + ["ruf@ruf.example"])
    assert "skipped unverified.example" in done.stdout and "not authorised" in done.stdout

    # exactly once: a second run has nothing to send
    again = failures_command(stack)
    assert again.returncode == 0 and "no failure reports waiting" in again.stdout, again.stdout
    assert len(sunk(stack)) == 5

    by_rcpt = {rcpts[0]: data for rcpts, data in mails}
    message = email.message_from_bytes(by_rcpt["ruf@ruf.example"],
                                       policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    assert message.get_content_type() == "multipart/report"
    feedback, headers = list(message.iter_parts())[1:]
    fields = feedback.get_payload() if isinstance(feedback.get_payload(), str) else \
        feedback.get_payload(0).as_string()
    assert "Feedback-Type: auth-failure" in fields and "Auth-Failure: dmarc" in fields
    assert "Reported-Domain: ruf.example" in fields and "Delivery-Result: reject" in fields
    assert "Identity-Alignment: none" in fields  # nothing aligned was even tried
    assert "Source-IP: 127.0.0.1" in fields
    text = headers.get_content()
    assert "Subject: f-ruf see hxxp://phish.example/" in text
    assert "alice@" not in by_rcpt["ruf@ruf.example"].decode()  # redacted by default

    parsedmarc = pytest.importorskip("parsedmarc", reason="parsedmarc: pip install -e .[dev]")
    parsed = parsedmarc.parse_report_email(by_rcpt["ruf@ruf.example"], offline=True,
                                           always_use_local_files=True)
    assert parsed["report_type"] == "failure"
    report = parsed["report"]
    assert report["reported_domain"] == "ruf.example" and report["auth_failure"] == ["dmarc"]
    assert report["source"]["ip_address"] == "127.0.0.1"
    assert report["parsed_sample"]["subject"] == "f-ruf see hxxp://phish.example/"


def test_none_when_the_feature_is_off(stack: Stack) -> None:
    before = queued(stack)
    config = dict(stack.config)
    dmarc = dict(config["dmarc"])  # type: ignore[call-overload]
    del dmarc["failure_reports"]
    config["dmarc"] = dmarc
    stack.daemon.stop()
    stack.daemon.write_config(config)
    stack.daemon.start()
    send(stack, "ruf.example", "f-off")
    stack.daemon.wait_for_log("<f-off@test>", timeout=30)
    time.sleep(1)
    assert queued(stack) == before
    (line,) = [d for d in decisions(iter(stack.daemon.log().splitlines()))
               if d.get("msgid") == "<f-off@test>"]
    assert line["verdict"] == "reject"  # the policy still applies; only the report is off
