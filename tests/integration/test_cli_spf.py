"""`mailwarden spf` end to end: a subprocess resolving through the loopback DNS server, on the
zone shipped as the README's example (conf/example-dns.yaml)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mailwarden.devtools.devdns import DevDNSServer, load_zone_file

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def nameserver(dns_server: DevDNSServer) -> str:
    dns_server.load(load_zone_file(ROOT / "conf" / "example-dns.yaml"))
    return f"{dns_server.host}:{dns_server.port}"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailwarden", "spf", *args],
                          capture_output=True, text=True, timeout=30, check=False)


def spf_json(nameserver: str, ip: str, sender: str, helo: str, *extra: str) -> dict[str, Any]:
    done = run("--ip", ip, "--sender", sender, "--helo", helo, "--nameserver", nameserver,
               "--timeout", "0.5", "--receiver", "mx.example.net", "--json", *extra)
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def test_pass_through_an_include_chain(nameserver: str) -> None:
    data = spf_json(nameserver, "203.0.113.200", "alice@example.com", "out.mailer.example.net")
    assert data["result"] == "pass"
    assert data["mechanism"] == "include:_spf.mailer.example.net"
    assert data["domain"] == "example.com"
    assert data["identity"] == "mailfrom"
    assert data["lookups"] == 5  # mx, a, include, and the two nested includes
    assert data["void_lookups"] == 0
    assert data["authentic"] is False
    assert data["received_spf"].startswith("Received-SPF: pass (mx.example.net: ")
    assert "client-ip=203.0.113.200;" in data["received_spf"]


def test_mx_pass_over_ipv6(nameserver: str) -> None:
    data = spf_json(nameserver, "2001:db8::20", "alice@example.com", "mx2.example.com")
    assert (data["result"], data["mechanism"]) == ("pass", "mx")


def test_fail_carries_the_expanded_explanation(nameserver: str) -> None:
    data = spf_json(nameserver, "192.0.2.99", "mallory@example.com", "spoofer.example.org")
    assert data["result"] == "fail"
    assert data["mechanism"] == "-all"
    assert data["explanation"] == (
        "192.0.2.99 is not one of example.com's mail servers; "
        "see https://example.com/spf?s=mallory%40example.com")


def test_permerror_names_the_offending_term(nameserver: str) -> None:
    data = spf_json(nameserver, "192.0.2.99", "x@broken.example.org", "host.example.org")
    assert data["result"] == "permerror"
    assert "ip4:192.0.2.300" in data["cause"]
    assert "problem=" in data["received_spf"]


def test_dns_timeout_is_temperror(nameserver: str) -> None:
    data = spf_json(nameserver, "192.0.2.99", "x@slow.example.org", "host.example.org")
    assert data["result"] == "temperror"
    assert "timeout" in data["cause"]


def test_null_reverse_path_uses_postmaster_at_helo(nameserver: str) -> None:
    data = spf_json(nameserver, "192.0.2.20", "", "mx2.example.com")
    assert data["sender"] == "postmaster@mx2.example.com"
    assert data["domain"] == "mx2.example.com"
    assert data["identity"] == "mailfrom"
    assert data["result"] == "none"


def test_helo_identity(nameserver: str) -> None:
    data = spf_json(nameserver, "192.0.2.20", "alice@example.com", "example.com",
                    "--identity", "helo")
    assert (data["identity"], data["domain"], data["result"]) == ("helo", "example.com", "pass")


def test_human_output(nameserver: str) -> None:
    done = run("--ip", "192.0.2.99", "--sender", "mallory@example.com", "--helo", "h.example.org",
               "--nameserver", nameserver)
    assert done.returncode == 0
    assert done.stdout.startswith("SPF fail for mailfrom identity mallory@example.com")
    assert "\nReceived-SPF: fail (" in done.stdout


@pytest.mark.parametrize("args", [
    ["--ip", "not-an-ip", "--sender", "a@example.com", "--helo", "h.example.com"],
    ["--sender", "a@example.com", "--helo", "h.example.com"],
    ["--ip", "192.0.2.1", "--sender", "a@example.com", "--helo", "h", "--nameserver", "dns.host"],
    ["--ip", "192.0.2.1", "--sender", "a@example.com", "--helo", "h", "--timeout", "0"],
])
def test_usage_errors_exit_non_zero(args: list[str]) -> None:
    done = run(*args)
    assert done.returncode == 2
    assert "error:" in done.stderr
    assert done.stdout == ""


def test_mail_from_is_the_name_every_command_uses(nameserver: str) -> None:
    """`--mail-from`, as `mailwarden test` names it (issue 15 #6); `--sender` still works."""
    new = run("--ip", "192.0.2.99", "--mail-from", "mallory@example.com", "--helo",
              "spoofer.example.org", "--nameserver", nameserver, "--json")
    old = run("--ip", "192.0.2.99", "--sender", "mallory@example.com", "--helo",
              "spoofer.example.org", "--nameserver", nameserver, "--json")
    assert new.returncode == old.returncode == 0, new.stderr
    assert json.loads(new.stdout)["result"] == json.loads(old.stdout)["result"] == "fail"
