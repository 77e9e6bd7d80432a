"""`mailwarden import opendkim` on real configurations: Debian's own opendkim.conf and
opendmarc.conf as installed, and a realistic set-up with a KeyTable, a refile: SigningTable
(per-address entries, another domain's key, subdomain wildcards) and a TrustedHosts file
(localhost, CIDR, host names, `!` exclusions). The output passes `check-config`, run as root,
which makes the daemon user's start-up checks (the keys readable by it) too."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailwarden.dkim.keys import generate, write_private
from mailwarden.identity import ids_of

DEBIAN_OPENDKIM, DEBIAN_OPENDMARC = Path("/etc/opendkim.conf"), Path("/etc/opendmarc.conf")


def mailwarden(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailwarden", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def check_config(text: str, where: Path) -> subprocess.CompletedProcess[str]:
    """check-config on `text`, saved in `where` (a directory the daemon user can read, as
    /etc/mailwarden is)."""
    config = where / "mailwarden.yaml"
    config.write_text(text)
    config.chmod(0o644)
    return mailwarden("check-config", "--config", str(config))


@pytest.fixture
def readable() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="mailwarden-import-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(not (DEBIAN_OPENDKIM.exists() and DEBIAN_OPENDMARC.exists()),
                    reason="OpenDKIM/OpenDMARC are not installed (scripts/setup.sh --test)")
def test_debians_own_configuration(readable: Path) -> None:
    done = mailwarden("import", "opendkim", str(DEBIAN_OPENDKIM), "--opendmarc",
                      str(DEBIAN_OPENDMARC), "--hostname", "mx.example.com")
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    assert config["authserv_id"] == "mx.example.com"
    assert config["listen"] == "unix:/run/mailwarden/milter.sock"
    assert [r["check"] for r in config["rules"]["eom"]] == ["dkim_verify", "dmarc"]
    assert config["rules"]["eom"][1]["enforce"] is False  # RejectFailures defaults to false
    notes = done.stderr
    assert "remove OpenDMARC's socket" in notes and "no keys configured" in notes
    assert "PidFile /run/opendkim/opendkim.pid: not carried over" in notes
    checked = check_config(done.stdout, readable)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.fixture
def setup(readable: Path) -> Path:
    """A realistic OpenDKIM + OpenDMARC set-up in a directory the daemon user can read."""
    root = readable
    keys = root / "keys"
    keys.mkdir(mode=0o755)
    owner = ids_of("mailwarden") if os.geteuid() == 0 else None
    for name in ("example.com", "example.net", "news.example.com"):
        write_private(generate("rsa", 2048), str(keys / f"{name}.private"), owner)
    (root / "KeyTable").write_text(
        f"mail._domainkey.example.com example.com:mail:{keys}/example.com.private\n"
        f"mail._domainkey.example.net example.net:mail:{keys}/example.net.private\n"
        f"news._domainkey.example.com example.com:news:{keys}/news.example.com.private\n"
        f"pct %:mail:{keys}/example.com.private\n")
    (root / "SigningTable").write_text(
        "# most specific first, as refile: tables are read in order\n"
        "ceo@example.org     mail._domainkey.example.net\n"
        "*@example.org       mail._domainkey.example.com\n"
        "*@example.com       mail._domainkey.example.com\n"
        "*@*.example.com     news._domainkey.example.com\n"
        "*odd*               mail._domainkey.example.com\n")
    (root / "TrustedHosts").write_text(
        "127.0.0.1\n::1\nlocalhost\n192.168.1.0/24\n!192.168.1.66\nmx2.example.com\n")
    (root / "opendkim.conf").write_text(
        "Syslog yes\nMode sv\nSocket inet:8891@localhost\nUserID opendkim\n"
        "Canonicalization relaxed/relaxed\n"
        f"KeyTable {root}/KeyTable\nSigningTable refile:{root}/SigningTable\n"
        f"InternalHosts refile:{root}/TrustedHosts\n"
        f"ExternalIgnoreList refile:{root}/TrustedHosts\n"
        "OversignHeaders From\nSignHeaders From,To,Subject,Date,Message-ID\n"
        "MinimumKeyBits 2048\nRequireSafeKeys yes\nAutoRestart yes\n")
    (root / "opendmarc.conf").write_text(
        "AuthservID mx.example.com\nTrustedAuthservIDs mx.example.com\nRejectFailures true\n"
        f"IgnoreAuthenticatedClients true\nIgnoreHosts {root}/TrustedHosts\n"
        "HistoryFile /run/opendmarc/opendmarc.dat\nSPFSelfValidate true\n"
        "Socket inet:8893@localhost\n")
    return root


def test_a_realistic_refile_setup(setup: Path) -> None:
    done = mailwarden("import", "opendkim", str(setup / "opendkim.conf"), "--opendmarc",
                      str(setup / "opendmarc.conf"))
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    signing = config["signing"]
    assert [(k["domain"], k["selector"]) for k in signing["keys"]] == [
        ("example.com", "mail"), ("example.net", "mail"), ("example.com", "news")]
    assert signing["table"] == [
        {"from": "ceo@example.org", "keys": ["example.net/mail"]},
        {"from": "*@example.org", "keys": ["example.com/mail"]},
        {"from": "*@example.com", "keys": ["example.com/mail"]},
        {"from": "*@*.example.com", "keys": ["example.com/news"]}]
    assert signing["canonicalization"] == "relaxed/relaxed"
    assert signing["headers"] == ["from", "to", "subject", "date", "message-id"]
    assert signing["oversign"] == ["from"] and signing["allow_group_readable_keys"] is False
    assert config["listen"] == "inet:8891@localhost"
    assert config["hosts"]["internal"] == [f"file:{setup}/TrustedHosts"]
    dmarc = next(r for r in config["rules"]["eom"] if r["check"] == "dmarc")
    assert dmarc["enforce"] is True
    assert dmarc["when"] == {"not": {"client_in": ["dmarc_ignore"]}, "authenticated": False}
    notes = done.stderr
    for said in ("KeyTable:4: pct %:mail:", "SigningTable:6: *odd*", "MinimumKeyBits 2048",
                 "TrustedAuthservIDs", "AutoRestart yes: not carried over: systemd",
                 "ExternalIgnoreList", "HistoryFile /run/opendmarc/opendmarc.dat"):
        assert said in notes, (said, notes)
    checked = check_config(done.stdout, setup)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "signing table ceo@example.org -> example.net/mail" in checked.stdout


def test_an_unreadable_table_is_named(setup: Path) -> None:
    (setup / "SigningTable").unlink()
    done = mailwarden("import", "opendkim", str(setup / "opendkim.conf"))
    assert done.returncode == 2
    assert f"opendkim.conf:7: cannot read {setup}/SigningTable" in done.stderr
