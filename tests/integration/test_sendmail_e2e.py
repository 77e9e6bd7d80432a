"""The real daemon behind a real Sendmail 8.17 (sendmail.py), on each transport: refusals at
MAIL FROM, RCPT TO and the end of data with their enhanced codes, our Authentication-Results on
top and forged ones deleted, quarantine, a DKIM signature that verifies, a 5 MiB message.

Sendmail differs from Postfix where it matters to a milter: it negotiates SMFIP_MDS_* and the
macro lists itself, reads a reply text as a format string, and keeps a quarantined message in
its queue as a held (hf) file."""

from __future__ import annotations

import email
import email.policy
import hashlib
import shutil
import smtplib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemon import Daemon
from sendmail import SendmailInstance, sendmail_problem

from mailwarden.devtools.devdns import DevDNSServer
from mailwarden.dkim.keys import SigningKey, generate, load_key, write_private
from mailwarden.dkim.sign import SignOptions, sign_message
from mailwarden.dkim.verify import verify_message

from helpers import make_resolver

pytestmark = pytest.mark.skipif(sendmail_problem() is not None,
                                reason=sendmail_problem() or "")

AUTHSERV = "mx.sendmail.test"
INTERNAL = "127.0.0.10"
OUTSIDE = "127.0.0.2"
ZONE: dict[str, list[object]] = {
    "pass.example": [{"TXT": "v=spf1 ip4:127.0.0.0/8 -all"}],
    "fail.example": [{"TXT": "v=spf1 -all"}],
    "ours.example": [{"TXT": "v=spf1 ip4:127.0.0.10 -all"}],
    "_dmarc.bank.example": [{"TXT": "v=DMARC1; p=reject"}],
    "_dmarc.quar.example": [{"TXT": "v=DMARC1; p=quarantine"}],
}


@dataclass
class Stack:
    daemon: Daemon
    sendmail: SendmailInstance
    dns: DevDNSServer
    key: SigningKey


@pytest.fixture(scope="module", params=["libmilter", "native"])
def stack(dns_server: DevDNSServer, tmp_path_factory: pytest.TempPathFactory,
          request: pytest.FixtureRequest) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp(f"sendmail-{request.param}")
    key_path = workdir / "ours.pem"
    write_private(generate("rsa", 2048), str(key_path))
    key = load_key("ours.example", "sm2026", str(key_path))
    dns_server.load({**ZONE, key.dns_name: [{"TXT": key.public_record}]})
    sockets = Path(tempfile.mkdtemp(prefix="mailwarden-sendmail-"))
    sockets.chmod(0o755)
    config = {
        "transport": request.param,
        "listen": f"unix:{sockets}/milter.sock", "socket_mode": "0660",
        "authserv_id": AUTHSERV, "workers": 2, "drain_timeout": 5,
        "dns": {"nameservers": [f"127.0.0.1:{dns_server.port}"], "timeout": 0.5,
                "lifetime": 1.0},
        "domains": ["ours.example"],
        "hosts": {"internal": [f"{INTERNAL}/32"]},
        "signing": {"keys": [{"domain": "ours.example", "selector": "sm2026",
                              "key": str(key_path)}]},
        "rules": {
            "mail": [{"name": "spf", "check": "spf", "header": "auth",
                      "when": {"not": {"client_in": "internal"}}}],
            "rcpt": [{"name": "no open relay", "check": "rcpt_relay",
                      "allowed_hosts": "internal"}],
            "eom": [{"name": "dkim", "check": "dkim_verify"},
                    {"name": "dmarc", "check": "dmarc",
                     "when": {"not": {"client_in": "internal"}}},
                    {"name": "sign", "check": "dkim_sign", "allowed_hosts": "internal"}],
        },
    }
    daemon = Daemon(workdir / "milter", config)
    daemon.start()
    sendmail = SendmailInstance(workdir / "sendmail", f"unix:{sockets}/milter.sock")
    try:
        sendmail.start()
        yield Stack(daemon, sendmail, dns_server, key)
    finally:
        sendmail.stop()
        daemon.stop()
        shutil.rmtree(sockets, ignore_errors=True)


def message(sender: str, subject: str, extra: str = "", body: str = "") -> bytes:
    return (f"{extra}From: <{sender}>\r\nTo: <bob@ours.example>\r\nSubject: {subject}\r\n"
            f"Date: Mon, 07 Dec 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{subject}@sendmail.test>\r\n\r\n{body or 'body of ' + subject}"
            "\r\n").encode()


def transact(stack: Stack, source: str, mail_from: str, rcpt: str, data: bytes
             ) -> list[tuple[str, int, bytes]]:
    """Command by command; stops at the first refusal. (stage, code, text) of each reply."""
    replies: list[tuple[str, int, bytes]] = []
    with smtplib.SMTP("127.0.0.1", stack.sendmail.smtp_port, source_address=(source, 0),
                      timeout=120) as smtp:
        smtp.ehlo("client.pass.example")
        for stage, call in (("mail", lambda: smtp.mail(mail_from)),
                            ("rcpt", lambda: smtp.rcpt(rcpt)),
                            ("data", lambda: smtp.data(data))):
            code, text = call()
            replies.append((stage, code, text))
            if code >= 400:
                break
    return replies


def test_spf_fail_is_refused_at_mail_from_550_5_7_23(stack: Stack) -> None:
    replies = transact(stack, OUTSIDE, "x@fail.example", "bob@ours.example",
                       message("x@fail.example", "sm-spf-fail"))
    assert replies[-1][:2] == ("mail", 550), replies
    assert replies[-1][2].startswith(b"5.7.23 "), replies


def test_relay_is_refused_at_rcpt_to_554_5_7_1(stack: Stack) -> None:
    replies = transact(stack, OUTSIDE, "a@pass.example", "victim@elsewhere.example",
                       message("a@pass.example", "sm-relay"))
    assert replies[-1][:2] == ("rcpt", 554), replies
    assert replies[-1][2].startswith(b"5.7.1 "), replies


def test_dmarc_reject_is_refused_at_the_end_of_data_550_5_7_1(stack: Stack) -> None:
    replies = transact(stack, OUTSIDE, "a@pass.example", "bob@ours.example",
                       message("ceo@bank.example", "sm-dmarc"))
    assert replies[-1][:2] == ("data", 550), replies
    assert replies[-1][2].startswith(b"5.7.1 "), replies
    assert b"bank.example" in replies[-1][2]


def test_our_results_on_top_and_forged_ones_deleted(stack: Stack) -> None:
    forged = f"Authentication-Results: {AUTHSERV}; dmarc=pass header.from=bank.example\r\n"
    theirs = "Authentication-Results: other.example; spf=pass\r\n"
    replies = transact(stack, OUTSIDE, "a@pass.example", "bob@ours.example",
                       message("a@pass.example", "sm-headers", extra=forged + theirs))
    assert replies[-1][:2] == ("data", 250), replies
    raw = stack.sendmail.wait_for(b"Subject: sm-headers")
    parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
    results = parsed.get_all("Authentication-Results") or []
    ours = [r for r in results if r.strip().startswith(AUTHSERV)]
    assert len(ours) == 1 and "spf=pass" in ours[0], results
    assert any(r.strip().startswith("other.example") for r in results), results
    # ours is the topmost field of the message as the MTA passes it on
    assert raw.split(b"\r\n", 1)[0].startswith(b"Authentication-Results: " +
                                               AUTHSERV.encode())


def test_p_quarantine_is_held_in_sendmails_queue(stack: Stack) -> None:
    replies = transact(stack, OUTSIDE, "a@pass.example", "bob@ours.example",
                       message("boss@quar.example", "sm-quarantine"))
    assert replies[-1][:2] == ("data", 250), replies
    reasons: list[str] = []
    deadline = time.monotonic() + 10
    while not reasons and time.monotonic() < deadline:
        time.sleep(0.05)
        reasons = stack.sendmail.quarantined()
    assert any("quar.example" in reason for reason in reasons), reasons
    assert not any(b"Subject: sm-quarantine" in raw for raw in stack.sendmail.messages())


def test_outgoing_mail_is_signed_and_the_signature_verifies(stack: Stack) -> None:
    replies = transact(stack, INTERNAL, "app@ours.example", "carol@far.example",
                       message("app@ours.example", "sm-signed"))
    assert replies[-1][:2] == ("data", 250), replies
    raw = stack.sendmail.wait_for(b"Subject: sm-signed")
    assert b"DKIM-Signature:" in raw
    results = verify_message(raw, make_resolver(stack.dns, timeout=1.0, lifetime=2.0))
    assert [(r.domain, r.selector, r.result) for r in results] == [
        ("ours.example", "sm2026", "pass")], results


def test_a_5_mib_message_is_judged_and_delivered_intact(stack: Stack) -> None:
    line = "The quick brown fox jumps over the lazy dog, again and again.\r\n"
    body = line * (5 * 1024 * 1024 // len(line) + 1)
    data = message("a@pass.example", "sm-big", body=body)
    replies = transact(stack, OUTSIDE, "a@pass.example", "bob@ours.example", data)
    assert replies[-1][:2] == ("data", 250), replies
    raw = stack.sendmail.wait_for(b"Subject: sm-big", timeout=60)
    delivered_body = raw.split(b"\r\n\r\n", 1)[1]
    sent_body = data.split(b"\r\n\r\n", 1)[1]
    assert hashlib.sha256(delivered_body).hexdigest() == hashlib.sha256(sent_body).hexdigest()
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(f"Authentication-Results: {AUTHSERV};".encode()), head[:300]
    assert b"spf=pass smtp.mailfrom=a@pass.example" in head


@pytest.mark.parametrize("transport", ["libmilter", "native"])
def test_a_check_slower_than_sendmails_timeout_is_kept_alive_by_progress(
        dns_server: DevDNSServer, tmp_path: Path, transport: str) -> None:
    """Sendmail waits 2 s for a reply here (T=R:2s); the DKIM key's DNS answer takes 3.5 s.
    Progress messages every 0.5 s keep Sendmail waiting, and the message ends with our
    verdict (delivered, dkim=pass), not with Sendmail's timeout (451 from F=T)."""
    key_path = tmp_path / "slow.pem"
    write_private(generate("ed25519"), str(key_path))
    key = load_key("slow.example", "s1", str(key_path))
    dns_server.load({key.dns_name: [{"TXT": key.public_record}]})
    sockets = Path(tempfile.mkdtemp(prefix="mailwarden-progress-"))
    sockets.chmod(0o755)
    daemon = Daemon(tmp_path / "milter", {
        "transport": transport, "listen": f"unix:{sockets}/milter.sock",
        "authserv_id": AUTHSERV, "workers": 1, "drain_timeout": 5, "progress_interval": 0.5,
        "dns": {"nameservers": [f"127.0.0.1:{dns_server.port}"], "timeout": 6.0,
                "lifetime": 8.0},
        "rules": {"eom": [{"name": "dkim", "check": "dkim_verify"}]},
    })
    sendmail = SendmailInstance(tmp_path / "sendmail", f"unix:{sockets}/milter.sock",
                                timeouts="S:10s;R:2s;E:5m")
    daemon.start()
    try:
        sendmail.start()
        data = message("a@slow.example", f"sm-progress-{transport}")
        fields = sign_message(data, [key], SignOptions())
        signed = "".join(f"{n}:{v}".replace("\n", "\r\n") + "\r\n" for n, v in fields).encode()
        dns_server.delay = 3.5
        started = time.monotonic()
        stack = Stack(daemon, sendmail, dns_server, key)
        replies = transact(stack, OUTSIDE, "a@slow.example", "bob@ours.example", signed + data)
        took = time.monotonic() - started
        dns_server.delay = 0.0
        assert replies[-1][:2] == ("data", 250), replies
        assert took >= 3.5
        raw = sendmail.wait_for(f"Subject: sm-progress-{transport}".encode())
        assert f"Authentication-Results: {AUTHSERV}; dkim=pass".encode() in raw
    finally:
        dns_server.delay = 0.0
        sendmail.stop()
        daemon.stop()
        shutil.rmtree(sockets, ignore_errors=True)


def test_a_script_message_without_date_or_message_id_still_verifies(stack: Stack) -> None:
    """Mail from cron or an application often has no Date: or Message-ID:, and the MTA adds
    them after the milters (RFC 6409 §8.2, §8.3 allow a submission server to). A signature
    that covered their absence (oversigning) would fail at every receiver, and under our own
    p=reject the message would bounce."""
    data = (b"From: <app@ours.example>\r\nTo: <carol@far.example>\r\n"
            b"Subject: sm-script\r\n\r\nnightly job done\r\n")
    replies = transact(stack, INTERNAL, "app@ours.example", "carol@far.example", data)
    assert replies[-1][:2] == ("data", 250), replies
    raw = stack.sendmail.wait_for(b"Subject: sm-script")
    head = raw.split(b"\r\n\r\n", 1)[0].lower()
    assert b"\r\ndate:" in head and b"\r\nmessage-id:" in head  # the MTA added them
    results = verify_message(raw, make_resolver(stack.dns, timeout=1.0, lifetime=2.0))
    assert [(r.domain, r.result) for r in results] == [("ours.example", "pass")], results
