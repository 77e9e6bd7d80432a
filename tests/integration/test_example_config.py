"""The shipped example configuration (`conf/mailwarden.yaml`), as it stands, judged by
`mailwarden test` with DNS from the loopback server: it must be safe to deploy unchanged.

Roaming users (SMTP AUTH from a hotel address, Debian's `submission` service inheriting
`smtpd_milters`) send as our own domain from an address our SPF record does not list: their
mail must not be refused by SPF or by our own DMARC policy. The same message from the same
address without authentication is a spoof and is refused, which proves the rules still run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mailwarden.devtools.devdns import DevDNSServer

EXAMPLE = Path(__file__).resolve().parents[2] / "conf" / "mailwarden.yaml"
HOTEL = "203.0.113.77"
MESSAGE = (b"From: Alice <alice@example.com>\r\nTo: carol@far.example\r\n"
           b"Subject: from the road\r\nMessage-ID: <road.1@example.com>\r\n"
           b"Date: Mon, 07 Dec 2026 10:00:00 +0000\r\n\r\nSent from a hotel.\r\n")


@pytest.fixture(scope="module")
def message(dns_server: DevDNSServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dns_server.load({
        "example.com": [{"TXT": "v=spf1 ip4:192.168.1.0/24 -all"}],
        "_dmarc.example.com": [{"TXT": "v=DMARC1; p=reject"}],
    })
    path = tmp_path_factory.mktemp("example") / "road.eml"
    path.write_bytes(MESSAGE)
    return path


def judge(dns_server: DevDNSServer, message: Path, *extra: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "mailwarden", "test", str(message), "--config", str(EXAMPLE),
         "--nameserver", f"127.0.0.1:{dns_server.port}", "--ip", HOTEL,
         "--helo", "[203.0.113.77]", "--mail-from", "alice@example.com",
         "--rcpt", "carol@far.example", "--json", *extra],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def test_an_authenticated_roaming_user_is_not_refused(dns_server: DevDNSServer,
                                                      message: Path) -> None:
    data = judge(dns_server, message, "--auth-user", "alice")
    assert data["verdict"] == "continue", data
    assert data["reply"] is None


def test_the_same_message_unauthenticated_is_refused(dns_server: DevDNSServer,
                                                     message: Path) -> None:
    data = judge(dns_server, message)
    assert data["verdict"] == "reject", data
    assert data["reply"].startswith("554 5.7.1") or data["reply"].startswith("550 5.7.")
