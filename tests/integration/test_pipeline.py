"""The end-of-message pipeline (issue 13): verification, the verdict, then for every message not
refused, whatever let it through, the steps that transform it (Authentication-Results, DKIM
signing, ARC sealing) and the DMARC record with the disposition actually applied.

Driven as a user would: the daemon over the milter protocol, and `mailwarden test`."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from daemon import Daemon
from milterload import MilterClient

from mailwarden.devtools.devdns import DevDNSServer
from mailwarden.dkim.keys import generate, public_record, write_private
from mailwarden.dmarc.report import ReportSettings, build_reports
from mailwarden.dmarc.store import Store

AUTHSERV = "mx.pipeline.example"
ROAMING = "203.0.113.40"  # an authenticated user's hotel address
SPOOFER = "198.51.100.66"
SETTINGS = ReportSettings(org_name="Pipeline Test", email="dmarc@ours.example")


def eml(from_addr: str, subject: str) -> bytes:
    return (f"From: <{from_addr}>\r\nTo: <bob@far.example>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@pipeline.example>\r\n"
            "Date: Mon, 07 Dec 2026 10:00:00 +0000\r\n\r\nbody\r\n").encode()


@pytest.fixture(scope="module")
def world(dns_server: DevDNSServer, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("pipeline")
    private = generate("rsa", 2048)
    write_private(private, str(workdir / "ours.pem"))
    dns_server.load({
        "ours.example": [{"TXT": "v=spf1 ip4:10.0.0.0/8 -all"}],
        "_dmarc.ours.example": [{"TXT": "v=DMARC1; p=reject"}],
        "s1._domainkey.ours.example": [{"TXT": public_record(private)}],
        "bank.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}],
        "_dmarc.bank.example": [{"TXT": "v=DMARC1; p=reject"}],
    })
    config: dict[str, Any] = {
        "listen": f"unix:{workdir}/milter.sock",
        "authserv_id": AUTHSERV, "workers": 1, "log_level": "info",
        "dns": {"nameservers": [f"127.0.0.1:{dns_server.port}"], "timeout": 0.5,
                "lifetime": 1.0},
        "domains": ["ours.example"],
        "hosts": {"internal": ["10.0.0.0/8"]},
        "signing": {"keys": [{"domain": "ours.example", "selector": "s1",
                              "key": str(workdir / "ours.pem")}]},
        "dmarc": {"store": str(workdir / "dmarc.db")},
        "rules": {
            "mail": [
                # the usual outbound policy: authenticated senders are let through at once
                {"name": "submission", "check": "mail_relay", "allowed_hosts": "internal",
                 "on": {"pass": "accept"}, "when": {"authenticated": True}},
                {"name": "spf", "check": "spf", "header": "auth",
                 "on": {"fail": "continue"}},
            ],
            "eom": [{"name": "dkim", "check": "dkim_verify"},
                    {"name": "dmarc", "check": "dmarc", "mode": "monitor"},
                    {"name": "sign", "check": "dkim_sign", "allowed_hosts": "internal"}],
        },
    }
    files = {}
    for name, data in (("outbound", eml("alice@ours.example", "from the road")),
                       ("spoof", eml("ceo@bank.example", "urgent transfer")),
                       ("foreign", eml("carol@far.example", "no key here"))):
        files[name] = workdir / f"{name}.eml"
        files[name].write_bytes(data)
    path = workdir / "mailwarden.yaml"
    path.write_text(yaml.safe_dump({**config, "user": "root"}, sort_keys=False))
    yield {"dir": workdir, "config": config, "path": path, "files": files,
           "store": workdir / "dmarc.db"}


@pytest.fixture(scope="module")
def daemon(world: dict[str, Any]) -> Iterator[Daemon]:
    with Daemon(world["dir"] / "daemon", world["config"]) as running:
        yield running


def offline(world: dict[str, Any], name: str, *extra: str, ip: str = ROAMING,
            sender: str = "alice@ours.example") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailwarden", "test", str(world["files"][name]), "--ip", ip,
         "--helo", "laptop.example.net", "--mail-from", sender, "--rcpt", "bob@far.example",
         "--config", str(world["path"]), *extra],
        capture_output=True, text=True, timeout=60, check=False)


def test_accept_at_mail_from_still_signs(world: dict[str, Any], daemon: Daemon) -> None:
    """`accept` ends the checks, never the transformations: the mail leaves signed."""
    with MilterClient(daemon.socket) as client:
        result = client.send_message(client_ip=ROAMING, helo="laptop.example.net",
                                     mail_from="alice@ours.example", rcpts=["bob@far.example"],
                                     message=world["files"]["outbound"].read_bytes(),
                                     auth_authen="alice")
    names = [name for name, _ in result.headers_added]
    assert "DKIM-Signature" in names, result.headers_added
    signature = dict(result.headers_added)["DKIM-Signature"]
    assert "d=ours.example" in signature and "s=s1" in signature


def test_signing_is_visible_in_the_log_and_in_mailwarden_test(world: dict[str, Any],
                                                              daemon: Daemon) -> None:
    with MilterClient(daemon.socket) as client:
        client.send_message(client_ip="10.1.2.3", helo="app.ours.example",
                            mail_from="app@ours.example", rcpts=["bob@far.example"],
                            message=eml("app@ours.example", "signed from inside"))
        client.send_message(client_ip="10.1.2.3", helo="app.ours.example",
                            mail_from="app@ours.example", rcpts=["bob@far.example"],
                            message=eml("carol@far.example", "nothing to sign with"))
    log = daemon.wait_for_log("dkim_sign=", count=2)
    assert 'dkim_sign="signed(d=ours.example s=s1 a=rsa-sha256)"' in log, log
    assert 'dkim_sign="none(no signing key for far.example)"' in log, log
    data = json.loads(offline(world, "outbound", "--json", "--auth-user", "alice").stdout)
    assert data["signing"] == [{"rule": "sign", "check": "dkim_sign", "result": "signed",
                                "domain": "ours.example",
                                "selector": "s1", "algorithm": "rsa-sha256",
                                "reason": ""}], data
    text = offline(world, "foreign", ip="10.1.2.3").stdout
    assert "dkim_sign by rule 'sign': none (no signing key for far.example)" in text, text


def test_monitor_mode_records_the_disposition_applied(world: dict[str, Any],
                                                      daemon: Daemon) -> None:
    """DMARC in monitor mode refuses nothing: the header, the store, the report and the
    summary say `none`, never the `reject` that was held back."""
    with MilterClient(daemon.socket) as client:
        result = client.send_message(client_ip=SPOOFER, helo="mx.spoof.example",
                                     mail_from="x@spoof.example", rcpts=["bob@ours.example"],
                                     message=world["files"]["spoof"].read_bytes())
    assert result.action == "continue", result
    (ar,) = [v for n, v in result.headers_added if n == "Authentication-Results"]
    assert "dmarc=fail" in ar and "dis=none" in ar and "dis=reject" not in ar, ar
    with sqlite3.connect(world["store"]) as conn:
        rows = conn.execute("SELECT disposition FROM evaluations WHERE header_from = ?",
                            ("bank.example",)).fetchall()
    assert rows == [("none",)], rows
    summary = subprocess.run(
        [sys.executable, "-m", "mailwarden", "dmarc", "summary", "--store",
         str(world["store"]), "--domain", "bank.example", "--json"],
        capture_output=True, text=True, timeout=60, check=True)
    (domain,) = json.loads(summary.stdout)["domains"]
    assert [s["dispositions"] for s in domain["sources"]] == [
        {"none": 1, "quarantine": 0, "reject": 0}], domain
    store = Store.open(str(world["store"]))
    try:
        now = time.time()
        (report,) = [r for r in build_reports(store, period_start=now - 3600,
                                              period_end=now + 3600, settings=SETTINGS)
                     if r.policy_domain == "bank.example"]
    finally:
        store.close()
    assert b"<disposition>none</disposition>" in report.xml, report.xml
    assert b"<disposition>reject</disposition>" not in report.xml
    data = json.loads(offline(world, "spoof", "--json", ip=SPOOFER,
                              sender="x@spoof.example").stdout)
    (ar,) = [h["value"] for h in data["headers"]["added"] if h["name"] ==
             "Authentication-Results"]
    assert "dis=none" in ar, ar
