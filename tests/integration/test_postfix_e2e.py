"""End to end: SMTP clients on 127.0.0.0/8 -> a real Postfix on loopback with mailwarden as its
milter -> a sink. DNS answers come from the loopback test server."""

from __future__ import annotations

import email
import email.policy
import shutil
import smtplib
import tempfile
import threading
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
from mailwarden.dkim.verify import verify_message
from mailwarden.dns import Resolver
from mailwarden.headers import unfold

from helpers import make_resolver

pytestmark = pytest.mark.skipif(shutil.which("postfix") is None and
                                not Path("/usr/sbin/postfix").exists(),
                                reason="Postfix is not installed (scripts/setup.sh --test)")

ZONE = {
    "pass.example": [{"TXT": "v=spf1 ip4:127.0.0.0/16 -all"}],
    "fail.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all exp=why.fail.example"}],
    "why.fail.example": [{"TXT": "%{i} is not a mail server of %{d}"}],
    "soft.example": [{"TXT": "v=spf1 ~all"}],
    "pct.example": [{"TXT": "v=spf1 -all exp=why.pct.example"}],
    "why.pct.example": [{"TXT": "100%% refused, see https://pct.example/?s=%{S}"}],
    "slow.example": ["TIMEOUT"],
    "client.pass.example": [{"A": "127.0.0.2"}],
}
AUTHSERV_ID = "mx.test.example"


@dataclass
class Stack:
    daemon: Daemon
    postfix: PostfixInstance
    resolver: Resolver
    outside_key: SigningKey


def _key(workdir: Path, domain: str, selector: str, kind: str) -> SigningKey:
    path = workdir / f"{domain}.{selector}.pem"
    write_private(generate(kind), str(path))
    return load_key(domain, selector, str(path))


@pytest.fixture(scope="module", params=["libmilter", "native"])
def stack(dns_server: DevDNSServer, tmp_path_factory: pytest.TempPathFactory,
          request: pytest.FixtureRequest) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp(f"e2e-{request.param}")
    ours_rsa = _key(workdir, "ours.example", "rsa2026", "rsa")
    ours_ed = _key(workdir, "ours.example", "ed2026", "ed25519")
    outside = _key(workdir, "pass.example", "sel", "rsa")
    zone = dict(ZONE)
    for key in (ours_rsa, ours_ed, outside):
        zone[key.dns_name] = [{"TXT": key.public_record}]
    dns_server.load(zone)
    # Postfix's smtpd runs as the postfix user: the socket must be reachable by it.
    sockets = Path(tempfile.mkdtemp(prefix="mailwarden-e2e-"))
    sockets.chmod(0o755)
    config = {
        "transport": request.param,
        "listen": f"unix:{sockets}/milter.sock",
        "socket_mode": "0666",
        "authserv_id": AUTHSERV_ID,
        "workers": 2,
        "drain_timeout": 5,
        "dns": {"nameservers": [f"127.0.0.1:{dns_server.port}"], "timeout": 0.5,
                "lifetime": 1.0},
        "domains": ["ours.example"],
        "hosts": {"internal": ["127.0.0.10/32"]},
        "signing": {"keys": [
            {"domain": "ours.example", "selector": "rsa2026", "key": ours_rsa.path},
            {"domain": "ours.example", "selector": "ed2026", "key": ours_ed.path},
        ]},
        "rules": {
            "mail": [{"name": "spf", "check": "spf", "header": "both", "policy": "soft"}],
            "rcpt": [{"name": "no open relay", "check": "rcpt_relay",
                      "allowed_hosts": "internal"}],
            "eom": [{"name": "dkim", "check": "dkim_verify"},
                    {"name": "sign outgoing", "check": "dkim_sign",
                     "allowed_hosts": "internal"}],
        },
    }
    daemon = Daemon(workdir / "milter", config)
    daemon.start()
    postfix = PostfixInstance(workdir / "postfix", milter=f"unix:{sockets}/milter.sock",
                              extra_main_cf={"default_process_limit": "250"})
    try:
        postfix.start()
        yield Stack(daemon, postfix, make_resolver(dns_server, timeout=1.0, lifetime=2.0),
                    outside)
    finally:
        postfix.stop()
        daemon.stop()
        shutil.rmtree(sockets, ignore_errors=True)


def message(sender: str, rcpt: str, subject: str, extra: str = "") -> bytes:
    return (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@test>\r\n{extra}\r\nbody of {subject}\r\n").encode()


def send(stack: Stack, source: str, sender: str, rcpts: list[str], subject: str,
         extra: str = "", helo: str | None = "client.pass.example") -> dict[str, tuple[int, bytes]]:
    """Send one message; returns the refused recipients as smtplib reports them."""
    with smtplib.SMTP("127.0.0.1", stack.postfix.smtp_port, source_address=(source, 0),
                      timeout=60) as smtp:
        if helo is not None:
            smtp.ehlo(helo)
        return smtp.sendmail(sender, rcpts, message(sender, rcpts[0], subject, extra))


def delivered_raw(stack: Stack, subject: str, timeout: float = 30.0) -> bytes:
    """The delivered message with this Subject, as the sink received it."""
    deadline = time.monotonic() + timeout
    wanted = f"Subject: {subject}\r\n".encode()
    while time.monotonic() < deadline:
        for raw in stack.postfix.messages():
            if wanted in raw:
                return raw
        time.sleep(0.05)
    raise AssertionError(f"{subject!r} was not delivered")


def delivered(stack: Stack, subject: str) -> email.message.Message:
    return email.message_from_bytes(delivered_raw(stack, subject), policy=email.policy.compat32)


def test_spf_pass_is_delivered_with_our_headers(stack: Stack) -> None:
    forged = f"Authentication-Results: {AUTHSERV_ID}; spf=pass smtp.mailfrom=forged\r\n" \
             "Authentication-Results: other.example; dkim=pass\r\n"
    refused = send(stack, "127.0.0.2", "alice@pass.example", ["bob@ours.example"], "e2e-pass",
                   forged)
    assert refused == {}
    got = delivered(stack, "e2e-pass")
    results = got.get_all("Authentication-Results")
    assert results is not None
    ours = [r for r in results if r.strip().lower().startswith(AUTHSERV_ID)]
    assert len(ours) == 1, results  # the forged one is gone, ours is there
    assert "spf=pass smtp.mailfrom=alice@pass.example" in ours[0]
    assert "spf=none smtp.helo=client.pass.example" in ours[0] or \
        "smtp.helo=client.pass.example" in ours[0]
    assert any("other.example" in r for r in results)  # other servers' results stay
    received_spf = got.get_all("Received-SPF")
    assert received_spf and received_spf[0].startswith("pass (mx.test.example:")
    names = [name.lower() for name, _ in got.items()]
    assert names.index("authentication-results") < names.index("subject")


def test_spf_fail_is_rejected_550_5_7_23(stack: Stack) -> None:
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        send(stack, "127.0.0.3", "mallory@fail.example", ["bob@ours.example"], "e2e-fail")
    assert refused.value.smtp_code == 550
    text = refused.value.smtp_error.decode()
    assert text.startswith("5.7.23 "), text
    assert "127.0.0.3 is not a mail server of fail.example" in text


def test_reply_text_with_percent_signs_reaches_the_client_intact(stack: Stack) -> None:
    """libmilter treats reply text as a format string: '%' must arrive as one '%'."""
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        send(stack, "127.0.0.3", "a.b@pct.example", ["bob@ours.example"], "e2e-pct")
    text = refused.value.smtp_error.decode()
    assert "100% refused, see https://pct.example/?s=a.b%40pct.example" in text, text


def test_spf_softfail_is_accepted_under_the_soft_policy(stack: Stack) -> None:
    assert send(stack, "127.0.0.4", "x@soft.example", ["bob@ours.example"], "e2e-soft") == {}
    got = delivered(stack, "e2e-soft")
    assert "spf=softfail smtp.mailfrom=x@soft.example" in str(got["Authentication-Results"])


def test_spf_temperror_is_tempfailed_451_4_7_24(stack: Stack) -> None:
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        send(stack, "127.0.0.5", "x@slow.example", ["bob@ours.example"], "e2e-temp")
    assert refused.value.smtp_code == 451
    assert refused.value.smtp_error.decode().startswith("4.7.24 ")


def test_relay_denied_for_outsiders_and_allowed_for_internal_hosts(stack: Stack) -> None:
    refused = send(stack, "127.0.0.6", "alice@pass.example",
                   ["far@elsewhere.example", "bob@ours.example"], "e2e-relay-denied")
    assert set(refused) == {"far@elsewhere.example"}
    code, text = refused["far@elsewhere.example"]
    assert code == 554 and text.decode().startswith("5.7.1 "), text
    got = delivered(stack, "e2e-relay-denied")
    assert got["Subject"] == "e2e-relay-denied"
    assert send(stack, "127.0.0.10", "alice@pass.example", ["far@elsewhere.example"],
                "e2e-relay-allowed") == {}
    delivered(stack, "e2e-relay-allowed")


def test_missing_helo(stack: Stack) -> None:
    with smtplib.SMTP("127.0.0.1", stack.postfix.smtp_port, source_address=("127.0.0.7", 0),
                      timeout=60) as smtp:
        code, _ = smtp.docmd("MAIL FROM:<alice@pass.example>")
        assert code == 250
        code, _ = smtp.docmd("RCPT TO:<bob@ours.example>")
        assert code == 250
        code, _ = smtp.docmd("DATA")
        assert code == 354
        smtp.send(message("alice@pass.example", "bob@ours.example", "e2e-nohelo") + b".\r\n")
        code, _ = smtp.getreply()
        assert code == 250
    got = delivered(stack, "e2e-nohelo")
    results = unfold(str(got["Authentication-Results"]))
    assert "spf=pass smtp.mailfrom=alice@pass.example" in results
    assert "smtp.helo" not in results


def test_outbound_mail_from_an_internal_host_leaves_signed_with_both_keys(stack: Stack) -> None:
    assert send(stack, "127.0.0.10", "alice@ours.example", ["far@elsewhere.example"],
                "e2e-signed") == {}
    raw = delivered_raw(stack, "e2e-signed")
    results = verify_message(raw, stack.resolver)
    assert sorted((r.result, r.algorithm, r.selector) for r in results) == [
        ("pass", "ed25519-sha256", "ed2026"), ("pass", "rsa-sha256", "rsa2026")], results
    signed = email.message_from_bytes(raw, policy=email.policy.compat32)
    h_tag = " ".join(str(signed["DKIM-Signature"]).split())
    assert "h=from : from :" in h_tag or "h=from:from" in h_tag.replace(" ", "")


def test_inbound_dkim_results(stack: Stack) -> None:
    body = message("alice@pass.example", "bob@ours.example", "e2e-dkim-in")
    fields = sign_message(body.replace(b"From: <alice@pass.example>",
                                       b"From: Alice <alice@pass.example>"),
                          [stack.outside_key], SignOptions())
    signature = "".join(f"{n}:{v}".replace("\n", "\r\n") + "\r\n" for n, v in fields)
    with smtplib.SMTP("127.0.0.1", stack.postfix.smtp_port, source_address=("127.0.0.2", 0),
                      timeout=60) as smtp:
        smtp.ehlo("client.pass.example")
        smtp.sendmail("alice@pass.example", ["bob@ours.example"],
                      signature.encode() + body.replace(b"From: <alice@pass.example>",
                                                        b"From: Alice <alice@pass.example>"))
        tampered = signature.encode() + body.replace(b"From: <alice@pass.example>",
                                                     b"From: Alice <alice@pass.example>")
        tampered = tampered.replace(b"body of e2e-dkim-in", b"body of e2e-dkim-in!")
        tampered = tampered.replace(b"Subject: e2e-dkim-in", b"Subject: e2e-dkim-tampered")
        smtp.sendmail("alice@pass.example", ["bob@ours.example"], tampered)
    good = str(delivered(stack, "e2e-dkim-in")["Authentication-Results"])
    assert "dkim=pass" in good and "header.d=pass.example" in good, good
    assert "header.s=sel" in good and "header.a=rsa-sha256" in good
    bad = str(delivered(stack, "e2e-dkim-tampered")["Authentication-Results"])
    assert "dkim=fail" in bad and "header.d=pass.example" in bad, bad


def test_200_simultaneous_sessions(stack: Stack) -> None:
    before = len(stack.postfix.messages())
    outcomes: dict[int, str] = {}
    start = threading.Barrier(200, timeout=60)

    def session(index: int) -> None:
        kind = ("pass", "fail", "relay")[index % 3]
        try:
            start.wait()
            if kind == "pass":
                refused = send(stack, f"127.0.1.{index % 250 + 1}", f"u{index}@pass.example",
                               ["bob@ours.example"], f"load-{index}")
                outcomes[index] = "delivered" if refused == {} else f"refused {refused}"
            elif kind == "fail":
                send(stack, f"127.0.1.{index % 250 + 1}", f"u{index}@fail.example",
                     ["bob@ours.example"], f"load-{index}")
                outcomes[index] = "not rejected"
            else:
                refused = send(stack, f"127.0.1.{index % 250 + 1}", f"u{index}@pass.example",
                               ["x@elsewhere.example", "bob@ours.example"], f"load-{index}")
                outcomes[index] = "relay denied" if set(refused) == {"x@elsewhere.example"} \
                    else f"relay outcome {refused}"
        except smtplib.SMTPSenderRefused as exc:
            outcomes[index] = f"sender refused {exc.smtp_code}"
        except Exception as exc:  # recorded and asserted below
            outcomes[index] = f"error {type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=session, args=(i,)) for i in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    expected = {i: ("delivered", "sender refused 550", "relay denied")[i % 3] for i in range(200)}
    wrong = {i: outcomes.get(i) for i in range(200) if outcomes.get(i) != expected[i]}
    assert not wrong, wrong
    deliveries = sum(1 for i in range(200) if i % 3 != 1)
    stack.postfix.wait_for_messages(before + deliveries, timeout=120)
    log = stack.daemon.log()
    assert "ERROR" not in log and "Traceback" not in log, log[-3000:]
    assert log.count("verdict=reject rule=spf") >= 66


def test_the_largest_header_field_postfix_hands_over_is_judged(stack: Stack) -> None:
    """One field of 80 folded 900-character lines (72 KB, more than libmilter's 64 KiB
    packets): Postfix keeps about 60 KB of it (measured: 66 of the 80 lines) and hands that to
    the milter in one packet; the message is judged and delivered with our
    Authentication-Results, through both transports."""
    folded = "X-Folded: start" + "".join("\r\n\t" + "f" * 900 for _ in range(80))
    refused = send(stack, "127.0.0.2", "alice@pass.example", ["bob@ours.example"],
                   "folded70k", extra=folded + "\r\n")
    assert refused == {}
    raw = delivered_raw(stack, "folded70k")
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert head.count(b"\t" + b"f" * 900 + b"\r\n") >= 60
    assert f"Authentication-Results: {AUTHSERV_ID};".encode() in head
    assert "Traceback" not in stack.daemon.log()
