"""Every human-readable output escapes what it did not write itself (issue 14): a sender or HELO
that is not UTF-8, carries an escape sequence, a carriage return or a line feed, a From field
or a DKIM-Signature made of the same, a domain argument likewise. Under a strict UTF-8 locale
(where a byte that is not UTF-8 made `print` raise UnicodeEncodeError) each command exits
normally, prints no control character but line feeds (and tabs), and no value adds a line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mailwarden.devtools.devdns import DevDNSServer

HOSTILE_SENDER = b"a\xff\x1b[31mred\x1b[0m@spoiled.example"
HOSTILE_HELO = b"h\r\nverdict: ACCEPT (forged)\xe2\x80\xaeexample"
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def run(*args: bytes | str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "LC_ALL": "C.UTF-8", "PYTHONUTF8": "0"}
    env.pop("PYTHONIOENCODING", None)
    return subprocess.run([sys.executable, "-m", "mailwarden", *args], capture_output=True,
                          timeout=60, check=False, env=env)


def clean(done: subprocess.CompletedProcess[bytes]) -> str:
    """The output, which must be UTF-8 without control characters (but LF and tab)."""
    assert b"Traceback" not in done.stderr, done.stderr.decode(errors="replace")
    text = done.stdout.decode("utf-8") + done.stderr.decode("utf-8")
    assert not CONTROL.search(text), ascii(text)
    return text


@pytest.fixture
def nameserver(dns_server: DevDNSServer) -> str:
    dns_server.load({"spoiled.example": [{"TXT": "v=spf1 -all"}],
                     "_dmarc.spoiled.example": [{"TXT": "v=DMARC1; p=reject"}]})
    return f"127.0.0.1:{dns_server.port}"


def test_spf(nameserver: str) -> None:
    done = run("spf", "--ip", "192.0.2.1", "--sender", HOSTILE_SENDER, "--helo", HOSTILE_HELO,
               "--nameserver", nameserver, "--identity", "helo")
    assert done.returncode == 0
    text = clean(done)
    assert not any(line.startswith("verdict:") for line in text.splitlines())  # none forged
    assert len(text.splitlines()) == 6
    done = run("spf", "--ip", "192.0.2.1", "--sender", HOSTILE_SENDER, "--helo", HOSTILE_HELO,
               "--nameserver", nameserver)
    assert done.returncode == 0
    text = clean(done)
    assert "a\\xff\\x1b[31mred\\x1b[0m@spoiled.example" in text
    assert len(text.splitlines()) == 6


def test_mailwarden_test(nameserver: str, tmp_path: Path) -> None:
    config = tmp_path / "mailwarden.yaml"
    config.write_text(yaml.safe_dump({
        "authserv_id": "mx.example.net",
        "dns": {"nameservers": [nameserver], "timeout": 0.5, "lifetime": 1.0},
        "rules": {"mail": [{"name": "spf", "check": "spf", "on": {"fail": "continue"}}],
                  "eom": [{"name": "dmarc", "check": "dmarc", "enforce": False}]}}))
    message = tmp_path / "hostile.eml"
    message.write_bytes(b"From: \x1b]0;owned\x07 <x@spoiled.example>\r\nSubject: \xff\r\n\r\n"
                        b"body\r\n")
    done = run("test", str(message), "--ip", "192.0.2.1", "--helo", HOSTILE_HELO,
               "--mail-from", HOSTILE_SENDER, "--rcpt", b"r\rx@example.net",
               "--config", str(config))
    assert done.returncode == 0, done.stderr
    text = clean(done)
    assert [line for line in text.splitlines() if line.startswith("verdict:")] == \
        ["verdict: CONTINUE (at eom)"], text


def test_dkim_verify(nameserver: str, tmp_path: Path) -> None:
    message = tmp_path / "signed.eml"
    message.write_bytes(b"DKIM-Signature: v=1; a=rsa-sha256; d=sp\x1b[2Joiled.example; "
                        b"s=\xff\x1b; h=from; bh=AAAA; b=AAAA\r\nFrom: <x@spoiled.example>\r\n"
                        b"\r\nbody\r\n")
    done = run("dkim", "verify", str(message), "--nameserver", nameserver, "--timeout", "0.5")
    assert done.returncode in (0, 1)
    text = clean(done)
    assert text.startswith("dkim=")


def test_dmarc_check(nameserver: str) -> None:
    done = run("dmarc", "check", b"sp\xffoiled.example\x1b[2J", "--nameserver", nameserver,
               "--timeout", "0.5")
    clean(done)
    assert done.returncode in (0, 1)
