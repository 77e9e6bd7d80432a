"""The real OpenDKIM and mailwarden side by side (issue 16): OpenDKIM runs a realistic
set-up (KeyTable, a refile: SigningTable with per-address entries, another domain's key,
subdomain wildcards, MultipleSignatures), `mailwarden import opendkim` converts that very
opendkim.conf, and each milter sits behind its own real Postfix. The same messages go through
both: the signatures carry the same d=/s= pairs, and inbound mail gets the same DKIM verdict."""

from __future__ import annotations

import email
import email.policy
import os
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from daemon import Daemon
from opendkim import OPENDKIM, OpenDKIM
from postfix import PostfixInstance, postfix_available

from mailwarden.devtools.devdns import DevDNSServer
from mailwarden.dkim.keys import generate, load_key, public_record, write_private
from mailwarden.dkim.sign import SignOptions, sign_message

pytestmark = [
    pytest.mark.skipif(not Path(OPENDKIM).exists(), reason="OpenDKIM is not installed "
                       "(scripts/setup.sh --test)"),
    pytest.mark.skipif(not postfix_available(), reason="Postfix is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="running Postfix needs root"),
]

INTERNAL, OUTSIDE = "127.0.0.10", "127.0.0.20"
KEYS = (("example.com", "mail"), ("example.net", "mail"), ("example.com", "news"))
SIGNING_TABLE = ("ceo@example.org     example.net-mail\n"
                 "*@example.org       example.com-mail\n"
                 "*@*.example.com     example.com-news\n")
OUTBOUND = {  # author -> the d=/s= pairs OpenDKIM signs with (MultipleSignatures yes)
    "ceo@example.org": {("example.net", "mail"), ("example.com", "mail")},
    "staff@example.org": {("example.com", "mail")},
    "a@lists.example.com": {("example.com", "news")},
    "x@other.example": set(),
}


def message(author: str, subject: str, body: str = "Hello.\r\n") -> bytes:
    return (f"From: <{author}>\r\nTo: <bob@far.example>\r\nSubject: {subject}\r\n"
            f"Date: Mon, 07 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{subject}@t>\r\n\r\n"
            f"{body}").encode()


def send(mx: PostfixInstance, source: str, sender: str, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", mx.smtp_port, source_address=(source, 0), timeout=60) as s:
        s.ehlo("client.example")
        s.sendmail(sender, ["bob@far.example"], data)


def delivered(mx: PostfixInstance, subject: str) -> email.message.Message:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for raw in mx.messages():
            if f"Subject: {subject}\r\n".encode() in raw:
                return email.message_from_bytes(raw, policy=email.policy.compat32)
        time.sleep(0.1)
    raise AssertionError(f"{subject} not delivered:\n{mx.maillog_tail()}")


def signers(msg: email.message.Message) -> set[tuple[str, str]]:
    found = set()
    for field in msg.get_all("DKIM-Signature") or []:
        tags = dict(re.findall(r"\b([ds])=([^;\s]+)", " ".join(str(field).split())))
        found.add((tags["d"], tags["s"]))
    return found


def dkim_verdict(msg: email.message.Message) -> str:
    for field in msg.get_all("Authentication-Results") or []:
        found = re.search(r"\bdkim=(\w+)", " ".join(str(field).split()))
        if found:
            return found.group(1)
    return "none"


def test_opendkim_and_its_imported_configuration_agree(dns_server: DevDNSServer,
                                                      tmp_path: Path) -> None:
    keydir = tmp_path / "keys"
    keydir.mkdir()
    zone: dict[str, list[dict[str, str]]] = {}
    table_lines = []
    key_args = []
    for domain, selector in (*KEYS, ("far.example", "ext")):
        private = generate("rsa", 2048)
        path = keydir / f"{domain}-{selector}.pem"
        write_private(private, str(path))
        zone[f"{selector}._domainkey.{domain}"] = [{"TXT": public_record(private)}]
        if domain != "far.example":
            table_lines.append(f"{domain}-{selector} {domain}:{selector}:{path}\n")
            key_args.append((domain, selector, path))
    dns_server.load(zone)
    (tmp_path / "KeyTable").write_text("".join(table_lines))
    (tmp_path / "SigningTable").write_text(SIGNING_TABLE)
    odk = OpenDKIM(tmp_path / "odk", mode="sv", keys=key_args,
                   dns=("127.0.0.1", dns_server.port), internal_hosts=(INTERNAL,),
                   extra_conf={"KeyTable": f"file:{tmp_path}/KeyTable",
                               "SigningTable": f"refile:{tmp_path}/SigningTable",
                               "MultipleSignatures": "yes", "AuthservID": "mx.test"})
    sockets = Path(tempfile.mkdtemp(prefix="mailwarden-interop-"))
    sockets.chmod(0o755)
    mx_odk = mx_mw = None
    milter = None
    try:
        odk.start()
        converted = subprocess.run(
            [sys.executable, "-m", "mailwarden", "import", "opendkim", str(odk.conf_path),
             "--hostname", "mx.test"], capture_output=True, text=True, timeout=60, check=False)
        assert converted.returncode == 0, converted.stderr
        config = yaml.safe_load(converted.stdout)
        # what differs on this test machine: where to listen, the DNS, the user (the keys
        # are in a directory only root can read)
        config.update(listen=f"unix:{sockets}/milter.sock", socket_mode="0666", user="root",
                      group="root", workers=1,
                      dns={"nameservers": [f"127.0.0.1:{dns_server.port}"]})
        config.pop("socket_group", None)
        milter = Daemon(tmp_path / "mailwarden", config)
        milter.start()
        mx_odk = PostfixInstance(tmp_path / "pf-odk", milter=odk.postfix_socket)
        mx_mw = PostfixInstance(tmp_path / "pf-mw", milter=f"unix:{sockets}/milter.sock")
        mx_odk.start()
        mx_mw.start()

        far = load_key("far.example", "ext", str(keydir / "far.example-ext.pem"))
        inbound = message("a@far.example", "in-signed")
        fields = sign_message(inbound, [far], SignOptions())
        signed = b"".join(f"{n}:{v}".replace("\n", "\r\n").encode() + b"\r\n"
                          for n, v in fields) + inbound
        cases: list[tuple[str, str, str, bytes]] = [
            (INTERNAL, author, f"out-{n}", message(author, f"out-{n}"))
            for n, author in enumerate(OUTBOUND)]
        cases += [(OUTSIDE, "a@far.example", "in-signed", signed),
                  (OUTSIDE, "a@far.example", "in-tampered",
                   signed.replace(b"Hello.", b"Hell0.").replace(b"Subject: in-signed",
                                                                b"Subject: in-tampered")),
                  (OUTSIDE, "a@far.example", "in-unsigned", message("a@far.example",
                                                                   "in-unsigned"))]
        for source, sender, _, data in cases:
            for mx in (mx_odk, mx_mw):
                send(mx, source, sender, data)
        for n, (author, expected) in enumerate(OUTBOUND.items()):
            theirs = signers(delivered(mx_odk, f"out-{n}"))
            ours = signers(delivered(mx_mw, f"out-{n}"))
            assert theirs == expected, (author, theirs)  # the set-up works as intended
            assert ours == theirs, (author, ours, theirs)
        verdicts = {subject: (dkim_verdict(delivered(mx_odk, subject)),
                              dkim_verdict(delivered(mx_mw, subject)))
                    for subject in ("in-signed", "in-tampered", "in-unsigned")}
        assert verdicts == {"in-signed": ("pass", "pass"), "in-tampered": ("fail", "fail"),
                            "in-unsigned": ("none", "none")}, verdicts
    finally:
        for mx in (mx_odk, mx_mw):
            if mx is not None:
                mx.stop()
        if milter is not None:
            milter.stop()
        odk.stop()
        shutil.rmtree(sockets, ignore_errors=True)
