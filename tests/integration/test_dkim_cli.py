"""`mailwarden dkim ...` end to end: subprocesses that make keys, sign and verify files, and ask
the loopback DNS server for the published records."""

from __future__ import annotations

import json
import os
import pwd
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import dkim
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest

from mailwarden.devtools.devdns import DevDNSServer
from mailwarden.dkim.keys import generate, write_private

MESSAGE = (
    b"From: Carol <carol@example.com>\r\n"
    b"To: Dave <dave@example.net>\r\n"
    b"Subject: Minutes of the meeting\r\n"
    b"Date: Wed, 04 Nov 2026 09:30:00 +0000\r\n"
    b"Message-ID: <minutes-12@example.com>\r\n"
    b"\r\n"
    b"Attached are the minutes.\r\n"
)


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "mailwarden", "dkim", *args],
                          capture_output=True, timeout=30, check=False, cwd=cwd)


def zone_line_record(line: str) -> tuple[str, list[str]]:
    """The owner and the character-strings of a printed zone line, parsed by dnspython."""
    match = re.fullmatch(r"(\S+)\. IN TXT (\(.*\))", line)
    assert match, line
    rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, match.group(2))
    return match.group(1), [s.decode() for s in rdata.strings]  # type: ignore[attr-defined]


def genkey(tmp_path: Path, kind: str, selector: str) -> tuple[Path, str, list[str]]:
    """Run genkey; the key file, the zone owner name and the record's strings."""
    path = tmp_path / f"{selector}.pem"
    done = run("genkey", "--domain", "example.com", "--selector", selector, "--type", kind,
               "--out", str(path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert lines[0] == f"; private key written to {path} (mode 0600)"
    owner, strings = zone_line_record(lines[1])
    return path, owner, strings


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("keys")
    rsa_path, rsa_owner, rsa_strings = genkey(tmp, "rsa", "r2026")
    ed_path, ed_owner, ed_strings = genkey(tmp, "ed25519", "e2026")
    return {
        "rsa": rsa_path, "ed25519": ed_path,
        "selectors": {"rsa": "r2026", "ed25519": "e2026"},
        "zone": {rsa_owner: [{"TXT": rsa_strings}], ed_owner: [{"TXT": ed_strings}]},
        "records": {"rsa": "".join(rsa_strings), "ed25519": "".join(ed_strings)},
    }


@pytest.fixture
def nameserver(dns_server: DevDNSServer, generated: dict[str, Any]) -> str:
    zone = dict(generated["zone"])
    zone["gone._domainkey.example.com"] = [{"TXT": "v=DKIM1; k=rsa; p="}]
    dns_server.load(zone)
    return f"{dns_server.host}:{dns_server.port}"


def dns_options(nameserver: str) -> list[str]:
    return ["--nameserver", nameserver, "--timeout", "0.5"]


# -- genkey --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_genkey_writes_a_0600_key_and_its_record(generated: dict[str, Any], kind: str) -> None:
    path: Path = generated[kind]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    record: str = generated["records"][kind]
    assert record.startswith(f"v=DKIM1; k={kind}; p=")
    strings = generated["zone"][f"{generated['selectors'][kind]}._domainkey.example.com"][0]
    assert all(len(s) <= 255 for s in strings["TXT"])
    assert len(strings["TXT"]) == (2 if kind == "rsa" else 1)  # RSA-2048: ~400 octets


def test_genkey_default_path_and_bits(tmp_path: Path) -> None:
    done = run("genkey", "--domain", "example.org", "--selector", "sel", "--bits", "1024",
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    path = tmp_path / "example.org.sel.rsa.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    owner, strings = zone_line_record(done.stdout.decode().splitlines()[1])
    assert owner == "sel._domainkey.example.org"
    assert len(strings) == 1  # a 1024-bit key's record fits in one string


def test_genkey_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "existing.pem"
    path.write_bytes(b"keep me")
    done = run("genkey", "--domain", "example.com", "--selector", "s", "--type", "ed25519",
               "--out", str(path))
    assert done.returncode == 2
    assert b"mailwarden:" in done.stderr
    assert done.stdout == b""
    assert path.read_bytes() == b"keep me"


def test_genkey_refuses_a_short_rsa_key(tmp_path: Path) -> None:
    done = run("genkey", "--domain", "example.com", "--selector", "s", "--bits", "768",
               "--out", str(tmp_path / "k.pem"))
    assert done.returncode == 2
    assert b"RFC 8301" in done.stderr
    assert not (tmp_path / "k.pem").exists()


# -- check-dns -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_check_dns_ok_for_the_published_record(generated: dict[str, Any], nameserver: str,
                                               kind: str) -> None:
    selector = generated["selectors"][kind]
    done = run("check-dns", "--domain", "example.com", "--selector", selector,
               "--key", str(generated[kind]), *dns_options(nameserver))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.decode().startswith(f"OK: {selector}._domainkey.example.com publishes")


def test_check_dns_json(generated: dict[str, Any], nameserver: str) -> None:
    done = run("check-dns", "--domain", "example.com", "--selector", "r2026",
               "--key", str(generated["rsa"]), *dns_options(nameserver), "--json")
    assert done.returncode == 0
    assert json.loads(done.stdout) == {
        "ok": True, "name": "r2026._domainkey.example.com", "key": str(generated["rsa"]),
        "staged": False, "temporary": False,
        "message": f"r2026._domainkey.example.com publishes the public key of {generated['rsa']}"}


def test_check_dns_with_another_key_is_a_mismatch(generated: dict[str, Any],
                                                  nameserver: str) -> None:
    # the RSA record at r2026, checked against a different RSA key
    other = generated["rsa"].parent / "other.pem"
    if not other.exists():
        write_private(generate("rsa", 1024), str(other))
    done = run("check-dns", "--domain", "example.com", "--selector", "r2026",
               "--key", str(other), *dns_options(nameserver))
    assert done.returncode == 1
    assert done.stdout.decode().startswith("MISMATCH: ")
    assert "does not match" in done.stdout.decode()
    # the Ed25519 key against the RSA record: wrong key type
    done = run("check-dns", "--domain", "example.com", "--selector", "r2026",
               "--key", str(generated["ed25519"]), *dns_options(nameserver))
    assert done.returncode == 1
    assert "MISMATCH: k=rsa published" in done.stdout.decode()


@pytest.mark.parametrize(("selector", "words"), [("nosuch", "no TXT record"),
                                                 ("gone", "revoked")])
def test_check_dns_missing_or_revoked(generated: dict[str, Any], nameserver: str,
                                      selector: str, words: str) -> None:
    done = run("check-dns", "--domain", "example.com", "--selector", selector,
               "--key", str(generated["rsa"]), *dns_options(nameserver))
    assert done.returncode == 1
    assert done.stdout.decode().startswith("MISMATCH: ")
    assert words in done.stdout.decode()


def test_check_dns_unreadable_key_is_exit_2(tmp_path: Path, nameserver: str) -> None:
    done = run("check-dns", "--domain", "example.com", "--selector", "r2026",
               "--key", str(tmp_path / "missing.pem"), *dns_options(nameserver))
    assert done.returncode == 2
    assert b"cannot read key" in done.stderr


# -- sign and verify -----------------------------------------------------------------------------
def sign_file(generated: dict[str, Any], kind: str, message_file: Path,
              *extra: str) -> subprocess.CompletedProcess[bytes]:
    return run("sign", str(message_file), "--domain", "example.com",
               "--selector", generated["selectors"][kind], "--key", str(generated[kind]), *extra)


def verify_json(path: Path, nameserver: str) -> list[dict[str, Any]]:
    done = run("verify", str(path), *dns_options(nameserver), "--json")
    assert done.returncode in (0, 1), done.stderr  # 1: no signature passes
    results: list[dict[str, Any]] = json.loads(done.stdout)
    return results


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_signed_file_verifies_with_our_cli_and_with_dkimpy(
        tmp_path: Path, generated: dict[str, Any], nameserver: str, kind: str) -> None:
    source = tmp_path / "message.eml"
    source.write_bytes(MESSAGE)
    done = sign_file(generated, kind, source)
    assert done.returncode == 0, done.stderr
    signed = done.stdout
    assert signed.startswith(b"DKIM-Signature:")
    assert signed.endswith(MESSAGE)
    header = signed[: len(signed) - len(MESSAGE)]
    assert b"\n" not in header.replace(b"\r\n", b"")  # CRLF line ends only
    out = tmp_path / "signed.eml"
    out.write_bytes(signed)

    [result] = verify_json(out, nameserver)
    assert result["result"] == "pass"
    assert (result["domain"], result["selector"]) == ("example.com", generated["selectors"][kind])
    assert result["algorithm"] == ("rsa-sha256" if kind == "rsa" else "ed25519-sha256")
    assert result["key_bits"] == (2048 if kind == "rsa" else 256)
    b_tag = re.sub(rb"\s+", b"", dkim.util.parse_tag_value(
        dkim.rfc822_parse(signed)[0][0][1])[b"b"])
    assert result["b"] == b_tag[:8].decode()

    record = generated["records"][kind].encode()
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: record)


def test_verify_text_output(tmp_path: Path, generated: dict[str, Any], nameserver: str) -> None:
    source = tmp_path / "message.eml"
    source.write_bytes(MESSAGE)
    signed = tmp_path / "signed.eml"
    signed.write_bytes(sign_file(generated, "rsa", source).stdout)
    done = run("verify", str(signed), *dns_options(nameserver))
    assert done.returncode == 0
    assert re.fullmatch(r"dkim=pass header\.d=example\.com header\.s=r2026 "
                        r"header\.a=rsa-sha256 header\.b=\S{8}: signature verified\n",
                        done.stdout.decode())
    unsigned = run("verify", str(source), *dns_options(nameserver))
    assert unsigned.returncode == 1  # no passing signature: scripts can tell (issue 15 #6)
    assert unsigned.stdout == b"dkim=none (no DKIM-Signature)\n"
    # the message on standard input ("-"), as with sign
    piped = subprocess.run([sys.executable, "-m", "mailwarden", "dkim", "verify", "-",
                            *dns_options(nameserver)], input=signed.read_bytes(),
                           capture_output=True, timeout=30, check=False)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == done.stdout


def test_verify_tampered_file_reports_fail(tmp_path: Path, generated: dict[str, Any],
                                           nameserver: str) -> None:
    source = tmp_path / "message.eml"
    source.write_bytes(MESSAGE)
    signed = sign_file(generated, "ed25519", source).stdout
    body = tmp_path / "body.eml"
    body.write_bytes(signed.replace(b"Attached are", b"Attached were"))
    header = tmp_path / "header.eml"
    header.write_bytes(signed.replace(b"Subject: Minutes", b"Subject: Hours"))
    [body_result] = verify_json(body, nameserver)
    assert (body_result["result"], body_result["reason"]) == ("fail", "body hash mismatch")
    [header_result] = verify_json(header, nameserver)
    assert (header_result["result"], header_result["reason"]) == (
        "fail", "signature does not verify")
    assert run("verify", str(header), *dns_options(nameserver)).returncode == 1


def test_sign_json_and_canonicalization(tmp_path: Path, generated: dict[str, Any],
                                        nameserver: str) -> None:
    source = tmp_path / "message.eml"
    source.write_bytes(MESSAGE)
    done = sign_file(generated, "rsa", source, "--json", "--canonicalization", "simple/simple")
    assert done.returncode == 0, done.stderr
    [field] = json.loads(done.stdout)["headers"]
    assert field["name"] == "DKIM-Signature"
    assert "\r" not in field["value"]
    assert dkim.util.parse_tag_value(field["value"].encode())[b"c"] == b"simple/simple"
    # the field, inserted as an MTA would, verifies
    signed = tmp_path / "signed.eml"
    line = f"{field['name']}:{field['value']}".replace("\n", "\r\n").encode() + b"\r\n"
    signed.write_bytes(line + MESSAGE)
    assert [r["result"] for r in verify_json(signed, nameserver)] == ["pass"]


def test_sign_with_an_unusable_key_is_exit_2(tmp_path: Path, generated: dict[str, Any]) -> None:
    source = tmp_path / "message.eml"
    source.write_bytes(MESSAGE)
    readable = tmp_path / "readable.pem"
    readable.write_bytes(generated["rsa"].read_bytes())
    readable.chmod(0o644)
    done = run("sign", str(source), "--domain", "example.com", "--selector", "r2026",
               "--key", str(readable))
    assert done.returncode == 2
    assert b"readable by group or others" in done.stderr
    assert done.stdout == b""


def test_verify_unreadable_file(tmp_path: Path, nameserver: str) -> None:
    done = run("verify", str(tmp_path / "nope.eml"), *dns_options(nameserver))
    assert done.returncode == 1
    assert b"cannot read" in done.stderr


# -- usage errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    [],
    ["genkey", "--selector", "s"],
    ["genkey", "--domain", "example.com", "--selector", "s", "--type", "dsa"],
    ["check-dns", "--domain", "example.com", "--selector", "s"],
    ["verify"],
    ["verify", "x.eml", "--timeout", "0"],
    ["sign", "x.eml", "--domain", "example.com", "--selector", "s", "--key", "k",
     "--canonicalization", "nofws"],
], ids=lambda a: " ".join(a) or "none")
def test_usage_errors_exit_2(tmp_path: Path, args: list[str]) -> None:
    done = run(*args, cwd=tmp_path)
    assert done.returncode == 2, done
    assert b"usage:" in done.stderr
    assert done.stdout == b""
    assert os.listdir(tmp_path) == []  # nothing was written


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")
def test_genkey_as_root_gives_the_key_to_the_daemons_user(tmp_path: Path) -> None:
    """A root-owned 0600 key is one the daemon (user mailwarden) cannot read and refuses: run as
    root, genkey gives it to the user of the configuration, or --owner (issue 15 #6); errors are
    said in words, not errno numbers."""
    try:
        user = pwd.getpwnam("mailwarden")
    except KeyError:
        pytest.skip("no mailwarden user (scripts/setup.sh creates it)")
    config = tmp_path / "mailwarden.yaml"
    config.write_text("authserv_id: mx.example.com\nuser: mailwarden\n")
    key = tmp_path / "k.pem"
    done = run("genkey", "--domain", "example.com", "--selector", "s1", "--out", str(key),
               "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert (key.stat().st_uid, key.stat().st_mode & 0o777) == (user.pw_uid, 0o600)
    assert b"owner mailwarden" in done.stdout
    again = run("genkey", "--domain", "example.com", "--selector", "s1", "--out", str(key),
                "--owner", "mailwarden")
    assert again.returncode == 2
    assert again.stderr.decode().strip() == f"mailwarden: cannot write {key}: File exists"


# -- check-dns --all (issue 16) ------------------------------------------------------------------
def all_keys_config(tmp_path: Path, generated: dict[str, Any], new_state: str) -> Path:
    """The two published keys, and a new one (`new_state`) whose record is not out yet."""
    new_key, _, _ = genkey(tmp_path, "rsa", "r2027")
    config = tmp_path / "mailwarden.yaml"
    config.write_text(
        "authserv_id: mx.example.com\nsigning:\n  keys:\n"
        f"    - {{domain: example.com, selector: r2026, key: {generated['rsa']}}}\n"
        f"    - {{domain: example.com, selector: e2026, key: {generated['ed25519']}}}\n"
        f"    - {{domain: example.com, selector: r2027, key: {new_key}, state: {new_state}}}\n")
    return config


def test_check_dns_all_reports_every_key_and_a_staged_one_does_not_fail(
        tmp_path: Path, generated: dict[str, Any], nameserver: str) -> None:
    config = all_keys_config(tmp_path, generated, "staged")
    done = run("check-dns", "--all", "--config", str(config), *dns_options(nameserver))
    lines = done.stdout.decode().splitlines()
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert [line.split(":", 2)[:2] for line in lines] == [
        ["OK", " example.com/r2026"], ["OK", " example.com/e2026"],
        ["MISMATCH", " example.com/r2027 (staged)"]]
    assert "no TXT record at r2027._domainkey.example.com" in lines[2]


def test_check_dns_all_fails_for_an_active_key_without_its_record(
        tmp_path: Path, generated: dict[str, Any], nameserver: str) -> None:
    config = all_keys_config(tmp_path, generated, "active")
    done = run("check-dns", "--all", "--config", str(config), *dns_options(nameserver),
               "--json")
    assert done.returncode == 1
    rows = json.loads(done.stdout)
    assert [(r["name"], r["ok"], r["staged"]) for r in rows] == [
        ("r2026._domainkey.example.com", True, False),
        ("e2026._domainkey.example.com", True, False),
        ("r2027._domainkey.example.com", False, False)]
