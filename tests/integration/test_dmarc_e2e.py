"""DMARC end to end: SMTP clients -> a real Postfix with mailwarden attached -> a sink, DNS from
the loopback test server. Enforcement: reject 550 5.7.1, quarantine (Postfix's hold queue),
p=none delivered with the header."""

from __future__ import annotations

import shutil
import smtplib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemon import Daemon
from postfix import PostfixInstance

from mailwarden.devtools.devdns import DevDNSServer
from mailwarden.dkim.keys import SigningKey, generate, load_key, write_private
from mailwarden.dkim.sign import SignOptions, sign_message

pytestmark = pytest.mark.skipif(shutil.which("postfix") is None and
                                not Path("/usr/sbin/postfix").exists(),
                                reason="Postfix is not installed (scripts/setup.sh --test)")

SPF_PASS = "v=spf1 ip4:127.0.0.0/16 -all"
ZONE: dict[str, list[object]] = {
    "bounce.example": [{"TXT": SPF_PASS}],  # SPF passes, aligned with nobody
    "spfonly.example": [{"TXT": SPF_PASS}, {"A": "192.0.2.1"}],
    "_dmarc.spfonly.example": [{"TXT": "v=DMARC1; p=reject"}],
    "dkimonly.example": [{"A": "192.0.2.1"}],
    "_dmarc.dkimonly.example": [{"TXT": "v=DMARC1; p=reject"}],
    "rejectme.example": [{"A": "192.0.2.1"}],
    "_dmarc.rejectme.example": [{"TXT": "v=DMARC1; p=reject; rua=mailto:d@rejectme.example"}],
    "quarantine.example": [{"A": "192.0.2.1"}],
    "_dmarc.quarantine.example": [{"TXT": "v=DMARC1; p=quarantine"}],
    "none.example": [{"A": "192.0.2.1"}],
    "_dmarc.none.example": [{"TXT": "v=DMARC1; p=none"}],
    "org.example": [{"A": "192.0.2.1"}],
    "_dmarc.org.example": [{"TXT": "v=DMARC1; p=none; sp=reject; np=quarantine"}],
    "sub.org.example": [{"A": "192.0.2.2"}],
    "walk.example": [{"A": "192.0.2.1"}],
    "_dmarc.walk.example": [{"TXT": "v=DMARC1; p=reject"}],
    "a.b.c.walk.example": [{"A": "192.0.2.3"}],
    "strict.example": [{"A": "192.0.2.1"}],
    "_dmarc.strict.example": [{"TXT": "v=DMARC1; p=reject; aspf=s"}],
    "mail.strict.example": [{"TXT": SPF_PASS}],
    "relaxed.example": [{"A": "192.0.2.1"}],
    "_dmarc.relaxed.example": [{"TXT": "v=DMARC1; p=reject; aspf=r"}],
    "mail.relaxed.example": [{"TXT": SPF_PASS}],
    "testing.example": [{"A": "192.0.2.1"}],
    "_dmarc.testing.example": [{"TXT": "v=DMARC1; p=reject; t=y"}],
}


@dataclass
class Stack:
    daemon: Daemon
    postfix: PostfixInstance
    key: SigningKey


@pytest.fixture(scope="module")
def stack(dns_server: DevDNSServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("dmarc-e2e")
    key_path = workdir / "dkimonly.pem"
    write_private(generate("rsa"), str(key_path))
    key = load_key("dkimonly.example", "sel", str(key_path))
    zone = dict(ZONE)
    zone[key.dns_name] = [{"TXT": key.public_record}]
    dns_server.load(zone)
    sockets = Path(tempfile.mkdtemp(prefix="mailwarden-dmarc-"))
    sockets.chmod(0o755)
    config = {
        "listen": f"unix:{sockets}/milter.sock", "socket_mode": "0666",
        "authserv_id": "mx.test.example", "workers": 2, "drain_timeout": 5,
        "dns": {"nameservers": [f"127.0.0.1:{dns_server.port}"], "timeout": 0.5,
                "lifetime": 1.0},
        "dmarc": {"store": str(workdir / "dmarc.db")},
        "rules": {
            "mail": [{"name": "spf", "check": "spf", "header": "auth",
                      "on": {"fail": "continue"}}],
            "eom": [{"name": "dkim", "check": "dkim_verify"},
                    {"name": "dmarc", "check": "dmarc", "enforce": True}],
        },
    }
    daemon = Daemon(workdir / "milter", config)
    daemon.start()
    postfix = PostfixInstance(workdir / "postfix", milter=f"unix:{sockets}/milter.sock")
    try:
        postfix.start()
        yield Stack(daemon, postfix, key)
    finally:
        postfix.stop()
        daemon.stop()
        shutil.rmtree(sockets, ignore_errors=True)


def message(from_header: str, subject: str) -> bytes:
    return (f"From: {from_header}\r\nTo: <bob@ours.example>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@test>\r\n\r\nbody of {subject}\r\n").encode()


def send(stack: Stack, mail_from: str, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", stack.postfix.smtp_port, source_address=("127.0.0.9", 0),
                      timeout=60) as smtp:
        smtp.ehlo("client.bounce.example")
        smtp.sendmail(mail_from, ["bob@ours.example"], data)


def refused(stack: Stack, mail_from: str, data: bytes) -> tuple[int, str]:
    with pytest.raises(smtplib.SMTPDataError) as error:
        send(stack, mail_from, data)
    return error.value.smtp_code, error.value.smtp_error.decode()


def delivered(stack: Stack, subject: str, timeout: float = 30.0) -> str:
    """The Authentication-Results of the delivered message with this Subject."""
    wanted = f"Subject: {subject}\r\n".encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for raw in stack.postfix.messages():
            if wanted in raw:
                head = raw.split(b"\r\n\r\n", 1)[0].decode()
                unfolded = head.replace("\r\n\t", " ").replace("\r\n ", " ")
                return next(line for line in unfolded.split("\r\n")
                            if line.startswith("Authentication-Results: mx.test.example"))
        time.sleep(0.05)
    raise AssertionError(f"{subject!r} was not delivered")


def held(stack: Stack, subject: str, timeout: float = 15.0) -> str:
    """Postfix puts a milter-quarantined message on hold; mailwarden logs the reason."""
    line = stack.postfix.wait_for_log(rf"message-id=<{subject}@test>", timeout=timeout)[0]
    queue_id = line.split(": message-id=")[0].rsplit(" ", 1)[1]
    stack.postfix.wait_for_log(rf"{queue_id}: milter-hold", timeout=timeout)
    log = stack.daemon.wait_for_log(f"queue_id={queue_id}")
    return next(x for x in log.splitlines() if f"queue_id={queue_id}" in x)


def test_pass_by_spf_alignment_only(stack: Stack) -> None:
    send(stack, "bounce@spfonly.example", message("<a@spfonly.example>", "dm-spf"))
    results = delivered(stack, "dm-spf")
    assert "dmarc=pass" in results and "header.from=spfonly.example" in results, results
    assert "polrec.p=reject" in results and "polrec.domain=spfonly.example" in results


def test_pass_by_dkim_alignment_only(stack: Stack) -> None:
    data = message("<a@dkimonly.example>", "dm-dkim")
    fields = sign_message(data, [stack.key], SignOptions())
    signed = "".join(f"{n}:{v}".replace("\n", "\r\n") + "\r\n" for n, v in fields).encode()
    send(stack, "x@bounce.example", signed + data)
    results = delivered(stack, "dm-dkim")
    assert "dkim=pass" in results and "dmarc=pass" in results, results


def test_fail_with_p_reject_is_refused_550_5_7_1(stack: Stack) -> None:
    code, text = refused(stack, "x@bounce.example", message("<a@rejectme.example>", "dm-rej"))
    assert code == 550 and text.startswith("5.7.1 "), text
    assert "rejectme.example" in text


def test_fail_with_p_quarantine_is_quarantined(stack: Stack) -> None:
    send(stack, "x@bounce.example", message("<a@quarantine.example>", "dm-quar"))
    assert 'quarantine="DMARC quarantine: quarantine.example' in held(stack, "dm-quar")


def test_fail_with_p_none_is_delivered_with_the_header(stack: Stack) -> None:
    send(stack, "x@bounce.example", message("<a@none.example>", "dm-none"))
    results = delivered(stack, "dm-none")
    assert "dmarc=fail" in results and "header.from=none.example" in results, results


def test_sp_applies_to_an_existing_subdomain(stack: Stack) -> None:
    code, text = refused(stack, "x@bounce.example", message("<a@sub.org.example>", "dm-sp"))
    assert code == 550 and "sub.org.example" in text, text


def test_np_applies_to_a_non_existent_subdomain(stack: Stack) -> None:
    send(stack, "x@bounce.example", message("<a@ghost.org.example>", "dm-np"))
    assert "np=quarantine" in held(stack, "dm-np")


def test_tree_walk_finds_the_organizational_policy(stack: Stack) -> None:
    code, text = refused(stack, "x@bounce.example", message("<a@a.b.c.walk.example>", "dm-walk"))
    assert code == 550 and "a.b.c.walk.example" in text, text


def test_strict_spf_alignment_fails_where_relaxed_passes(stack: Stack) -> None:
    code, _ = refused(stack, "x@mail.strict.example", message("<a@strict.example>", "dm-s"))
    assert code == 550
    send(stack, "x@mail.relaxed.example", message("<a@relaxed.example>", "dm-r"))
    assert "dmarc=pass" in delivered(stack, "dm-r")


def test_testing_mode_is_one_level_less_strict(stack: Stack) -> None:
    send(stack, "x@bounce.example", message("<a@testing.example>", "dm-t"))
    assert "t=y" in held(stack, "dm-t")


def test_forged_multi_address_from_is_refused(stack: Stack) -> None:
    code, text = refused(stack, "x@spfonly.example",
                         message("<a@spfonly.example>, <b@rejectme.example>", "dm-multi"))
    assert code == 550 and text.startswith("5.7.1 "), text


def test_every_evaluation_is_recorded_for_reports(stack: Stack) -> None:
    """RFC 9990: what aggregate reports are built from, written by the daemon's workers."""
    from mailwarden.dmarc.store import Store

    send(stack, "x@bounce.example", message("<a@none.example>", "dm-recorded"))
    delivered(stack, "dm-recorded")
    store = Store.open(str(stack.daemon.config["dmarc"]["store"]))  # type: ignore[index]
    try:
        rows = [e for e in store.evaluations() if e.header_from == "none.example"]
    finally:
        store.close()
    assert rows, "no evaluation recorded"
    latest = rows[-1]
    assert (latest.policy_domain, latest.p, latest.disposition) == ("none.example", "none",
                                                                    "none")
    assert latest.spf_aligned == "fail" and latest.dkim_aligned == "fail"
    assert latest.source_ip == "127.0.0.9" and latest.envelope_from == "bounce.example"
