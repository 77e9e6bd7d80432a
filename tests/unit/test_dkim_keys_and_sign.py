"""DKIM keys and signing without a network: `mailwarden.dkim.keys` (loading, generating, the
zone record, checking the published record through fakedns.py), `mailwarden.dkim.sign`
(h= with oversigning, dual RSA + Ed25519 signatures that both verify), the `cryptography` RSA
path of `mailwarden.dkim.fastrsa` against dkimpy's pure-Python RSA, and the `signing:` part of
the configuration."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import dkim.crypto
import dkim.util
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from mailwarden.config import ConfigError
from mailwarden.config.build import parse
from mailwarden.dkim import fastrsa
from mailwarden.dkim.keys import (
    KeyError_,
    SigningKey,
    check_dns,
    generate,
    load_key,
    public_record,
    write_private,
    zone_record,
)
from mailwarden.dkim.sign import (
    DEFAULT_HEADERS,
    DEFAULT_OVERSIGN,
    SignOptions,
    header_list,
    sign_message,
)
from mailwarden.dkim.verify import verify_message
from mailwarden.transaction import Transaction

from fakedns import FakeDNS
from helpers import weak_rsa_key

MESSAGE = (
    b"From: Alice Example <alice@example.com>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: Quarterly report\r\n"
    b"Date: Tue, 03 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <report-7@example.com>\r\n"
    b"Received: from a.example.com by b.example.com; Tue, 3 Nov 2026 10:00:01 +0000\r\n"
    b"X-Internal: yes\r\n"
    b"\r\n"
    b"The numbers are in.\r\n"
)
NO_ENCRYPTION = serialization.NoEncryption()
PEM = serialization.Encoding.PEM
PKCS8 = serialization.PrivateFormat.PKCS8
TRADITIONAL = serialization.PrivateFormat.TraditionalOpenSSL


# -- key material ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 1024)


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def write_pem(path: Path, data: bytes, mode: int = 0o600) -> str:
    path.write_bytes(data)
    path.chmod(mode)
    return str(path)


def pem(key: Any, fmt: serialization.PrivateFormat = PKCS8) -> bytes:
    data: bytes = key.private_bytes(PEM, fmt, NO_ENCRYPTION)
    return data


def record_p(record: str) -> bytes:
    return base64.b64decode(record.rpartition("p=")[2])


# -- load_key ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", [PKCS8, TRADITIONAL], ids=["pkcs8", "traditional"])
def test_load_rsa_key(tmp_path: Path, rsa_key: rsa.RSAPrivateKey,
                      fmt: serialization.PrivateFormat) -> None:
    path = write_pem(tmp_path / "k.pem", pem(rsa_key, fmt))
    key = load_key("example.com", "s2026", path)
    assert (key.domain, key.selector, key.algorithm, key.bits) == (
        "example.com", "s2026", "rsa-sha256", 2048)
    assert key.path == path
    assert key.dns_name == "s2026._domainkey.example.com"
    # dkimpy signs with the traditional (PKCS#1) PEM, whatever the file held
    assert key.private.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert dkim.crypto.parse_pem_private_key(key.private)["modulus"] == \
        rsa_key.private_numbers().public_numbers.n
    assert key.public_record.startswith("v=DKIM1; k=rsa; p=")
    spki = rsa_key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    assert record_p(key.public_record) == spki


def test_load_ed25519_key(tmp_path: Path, ed_key: ed25519.Ed25519PrivateKey) -> None:
    path = write_pem(tmp_path / "k.pem", pem(ed_key))
    key = load_key("example.com", "ed", path, "ed25519-sha256")
    assert (key.algorithm, key.bits) == ("ed25519-sha256", 256)
    seed = ed_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                NO_ENCRYPTION)
    assert base64.b64decode(key.private) == seed  # dkimpy's form: base64 of the seed
    raw = ed_key.public_key().public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw)
    assert key.public_record == f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    assert len(record_p(key.public_record)) == 32  # RFC 8463 §4: the raw 32-octet key


def test_ed25519_has_no_traditional_pem_and_openssh_format_is_refused(
        tmp_path: Path, ed_key: ed25519.Ed25519PrivateKey) -> None:
    with pytest.raises(ValueError):
        pem(ed_key, TRADITIONAL)  # there is no "traditional" PEM for Ed25519, PKCS#8 only
    openssh = ed_key.private_bytes(PEM, serialization.PrivateFormat.OpenSSH, NO_ENCRYPTION)
    path = write_pem(tmp_path / "k.pem", openssh)
    with pytest.raises(KeyError_, match="not a usable PEM private key"):
        load_key("example.com", "ed", path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_key_readable_by_group_or_others_is_refused(tmp_path: Path, ed_key: Any,
                                                     mode: int) -> None:
    path = write_pem(tmp_path / "k.pem", pem(ed_key), mode)
    with pytest.raises(KeyError_, match=f"readable by group or others \\(mode {mode:04o}\\)"):
        load_key("example.com", "s", path)
    assert load_key("example.com", "s", path, allow_group_readable=True).algorithm == \
        "ed25519-sha256"


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_owner_only_modes_are_accepted(tmp_path: Path, ed_key: Any, mode: int) -> None:
    path = write_pem(tmp_path / "k.pem", pem(ed_key), mode)
    assert load_key("example.com", "s", path).bits == 256


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(KeyError_, match=r"cannot read key .*nope\.pem: No such file"):
        load_key("example.com", "s", str(tmp_path / "nope.pem"))


def test_directory_is_not_a_key(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    directory.mkdir(mode=0o700)
    with pytest.raises(KeyError_, match="not a regular file"):
        load_key("example.com", "s", str(directory))


@pytest.mark.parametrize("data", [
    b"",
    b"not a key at all\n",
    b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
])
def test_malformed_key_file(tmp_path: Path, data: bytes) -> None:
    path = write_pem(tmp_path / "k.pem", data)
    with pytest.raises(KeyError_, match="not a usable PEM private key"):
        load_key("example.com", "s", path)


def test_encrypted_key_is_refused(tmp_path: Path, ed_key: Any) -> None:
    data = ed_key.private_bytes(PEM, PKCS8, serialization.BestAvailableEncryption(b"secret"))
    path = write_pem(tmp_path / "k.pem", data)
    with pytest.raises(KeyError_, match="not a usable PEM private key"):
        load_key("example.com", "s", path)


def test_other_key_types_are_refused(tmp_path: Path) -> None:
    path = write_pem(tmp_path / "k.pem", pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(KeyError_, match="neither RSA nor Ed25519"):
        load_key("example.com", "s", path)


def test_algorithm_mismatch(tmp_path: Path, rsa_key: Any, ed_key: Any) -> None:
    rsa_path = write_pem(tmp_path / "rsa.pem", pem(rsa_key))
    ed_path = write_pem(tmp_path / "ed.pem", pem(ed_key))
    with pytest.raises(KeyError_, match="is rsa-sha256, not ed25519-sha256"):
        load_key("example.com", "s", rsa_path, "ed25519-sha256")
    with pytest.raises(KeyError_, match="is ed25519-sha256, not rsa-sha256"):
        load_key("example.com", "s", ed_path, "rsa-sha256")
    assert load_key("example.com", "s", rsa_path, "rsa-sha256").algorithm == "rsa-sha256"


def test_rsa_key_under_1024_bits_is_refused(tmp_path: Path) -> None:
    path = write_pem(tmp_path / "weak.pem", pem(weak_rsa_key(512), TRADITIONAL))
    with pytest.raises(KeyError_, match=re.escape("512 bits; RFC 8301 §3.2 requires 1024")):
        load_key("example.com", "s", path)


def test_rsa_key_of_1024_bits_is_accepted(tmp_path: Path, other_rsa_key: Any) -> None:
    path = write_pem(tmp_path / "k.pem", pem(other_rsa_key))
    assert load_key("example.com", "s", path).bits == 1024


# -- generate, write_private ---------------------------------------------------------------------
def test_generate() -> None:
    key = generate("rsa", 1024)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 1024 and key.private_numbers().public_numbers.e == 65537
    assert isinstance(generate("ed25519"), ed25519.Ed25519PrivateKey)
    with pytest.raises(ValueError, match="RFC 8301"):
        generate("rsa", 768)
    with pytest.raises(ValueError, match="unknown key type"):
        generate("dsa")


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)  # nothing masked: the mode must come from write_private itself
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("open_umask")
def test_write_private_is_mode_0600_and_loads_back(tmp_path: Path, rsa_key: Any,
                                                  ed_key: Any) -> None:
    for name, key in (("rsa.pem", rsa_key), ("ed.pem", ed_key)):
        path = str(tmp_path / name)
        write_private(key, path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert Path(path).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
        loaded = load_key("example.com", "s", path)
        assert loaded.public_record == public_record(key)


def test_write_private_refuses_to_overwrite(tmp_path: Path, ed_key: Any) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        write_private(ed_key, str(path))
    assert path.read_bytes() == b"precious"


def test_write_private_does_not_follow_a_symlink(tmp_path: Path, ed_key: Any) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / "k.pem").symlink_to(target)
    with pytest.raises(FileExistsError):
        write_private(ed_key, str(tmp_path / "k.pem"))
    assert not target.exists()


# -- zone_record -------------------------------------------------------------------------------
def zone_strings(line: str) -> tuple[str, list[str]]:
    """The owner and the character-strings of a zone line, read by dnspython."""
    match = re.fullmatch(r"(\S+)\. IN TXT (\(.*\))", line)
    assert match, line
    rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, match.group(2))
    return match.group(1), [s.decode() for s in rdata.strings]  # type: ignore[attr-defined]


@pytest.mark.parametrize("bits", [1024, 2048, 4096])
def test_zone_record_splits_at_255_octets(bits: int) -> None:
    record = public_record(generate("rsa", bits) if bits != 2048 else generate("rsa"))
    line = zone_record("s1._domainkey.example.com", record)
    owner, strings = zone_strings(line)
    assert owner == "s1._domainkey.example.com"
    assert "".join(strings) == record
    assert all(len(s.encode()) <= 255 for s in strings)
    assert all(len(s) == 255 for s in strings[:-1])  # full strings, then the rest
    assert len(strings) == -(-len(record) // 255)
    assert len(strings) > 1 or bits == 1024


def test_zone_record_of_an_ed25519_key_is_one_string() -> None:
    record = public_record(generate("ed25519"))
    _, strings = zone_strings(zone_record("ed._domainkey.example.com", record))
    assert strings == [record]


# -- check_dns ---------------------------------------------------------------------------------
@pytest.fixture
def signing_key(tmp_path: Path, rsa_key: Any) -> SigningKey:
    return load_key("example.com", "s1", write_pem(tmp_path / "k.pem", pem(rsa_key)))


NAME = "s1._domainkey.example.com"


def test_check_dns_match(signing_key: SigningKey) -> None:
    found = check_dns(FakeDNS({NAME: {"TXT": [signing_key.public_record]}}), signing_key)
    assert found.ok
    assert NAME in found.message


def test_check_dns_match_with_split_strings_and_spaces_in_p(signing_key: SigningKey) -> None:
    record = signing_key.public_record
    head, _, p = record.partition("p=")
    spaced = head + "p=" + " ".join(p[i:i + 64] for i in range(0, len(p), 64))
    chunks = [spaced[i:i + 255] for i in range(0, len(spaced), 255)]  # several strings
    assert check_dns(FakeDNS({NAME: {"TXT": [chunks]}}), signing_key).ok


def test_check_dns_mismatch(signing_key: SigningKey, other_rsa_key: Any) -> None:
    found = check_dns(FakeDNS({NAME: {"TXT": [public_record(other_rsa_key)]}}), signing_key)
    assert not found.ok
    assert "does not match" in found.message


def test_check_dns_key_type_mismatch(signing_key: SigningKey, ed_key: Any) -> None:
    found = check_dns(FakeDNS({NAME: {"TXT": [public_record(ed_key)]}}), signing_key)
    assert not found.ok
    assert "k=ed25519 published" in found.message


def test_check_dns_revoked(signing_key: SigningKey) -> None:
    found = check_dns(FakeDNS({NAME: {"TXT": ["v=DKIM1; k=rsa; p="]}}), signing_key)
    assert not found.ok
    assert "revoked" in found.message


def test_check_dns_missing(signing_key: SigningKey) -> None:
    found = check_dns(FakeDNS({}), signing_key)
    assert not found.ok
    assert "no TXT record" in found.message and "nxdomain" in found.message
    nodata = check_dns(FakeDNS({NAME: {"A": ["192.0.2.1"]}}), signing_key)
    assert not nodata.ok and "nodata" in nodata.message


def test_check_dns_multiple_records(signing_key: SigningKey) -> None:
    records = [signing_key.public_record, "v=DKIM1; k=rsa; p="]
    found = check_dns(FakeDNS({NAME: {"TXT": records}}), signing_key)
    assert not found.ok
    assert "2 TXT records" in found.message


def test_check_dns_temperror(signing_key: SigningKey) -> None:
    found = check_dns(FakeDNS({NAME: "TEMPERROR"}), signing_key)
    assert not found.ok
    assert found.message.startswith(f"DNS error for {NAME}")


def test_check_dns_malformed_record(signing_key: SigningKey) -> None:
    found = check_dns(FakeDNS({NAME: {"TXT": ["v=DKIM1; k=rsa; p"]}}), signing_key)
    assert not found.ok
    assert "malformed" in found.message


def test_check_dns_asks_the_selector_name(signing_key: SigningKey) -> None:
    dns = FakeDNS({NAME: {"TXT": [signing_key.public_record]}})
    check_dns(dns, signing_key)
    assert dns.queries == [(NAME, "TXT")]


# -- header_list -------------------------------------------------------------------------------
def test_header_list_counts_present_fields_and_oversigns() -> None:
    present = ["From", "To", "To", "SUBJECT", "Received", "Received", "X-Internal",
               "In-Reply-To"]
    names = [n.decode() for n in header_list(present, SignOptions())]
    count = names.count
    assert count("from") == 2  # present once, oversigned once
    assert count("to") == 3  # present twice, oversigned once
    assert count("subject") == 2  # case-insensitive
    assert count("in-reply-to") == 1  # present, not oversigned
    for absent_oversigned in ("cc", "reply-to", "mime-version", "content-type",
                              "content-transfer-encoding"):
        assert count(absent_oversigned) == 1, absent_oversigned
    # absent, and added by the MTA after the milters: their absence is not signed
    assert count("date") == 0 and count("message-id") == 0
    with_both = header_list([*present, "Date", "Message-ID"], SignOptions())
    assert with_both.count(b"date") == 2 and with_both.count(b"message-id") == 2
    for left_out in ("references", "list-id", "resent-from", "content-id", "received",
                     "x-internal"):
        assert count(left_out) == 0, left_out
    # in the order of the headers option
    order = [h for h in DEFAULT_HEADERS if h in names]
    assert list(dict.fromkeys(names)) == order
    assert all(isinstance(n, bytes) for n in header_list(present, SignOptions()))


def test_header_list_with_custom_options() -> None:
    options = SignOptions(headers=("from", "subject", "x-tag"), oversign=("from",))
    assert header_list(["From", "Subject", "X-Tag", "X-Tag"], options) == [
        b"from", b"from", b"subject", b"x-tag", b"x-tag"]
    assert header_list([], options) == [b"from"]
    assert header_list(["Subject"], SignOptions(headers=("from", "subject"), oversign=())) == [
        b"subject"]


def test_default_oversign_is_a_subset_of_the_signed_headers() -> None:
    assert "from" in DEFAULT_HEADERS
    assert set(DEFAULT_OVERSIGN) <= set(DEFAULT_HEADERS)


# -- sign_message ------------------------------------------------------------------------------
@pytest.fixture
def dual_keys(tmp_path: Path, rsa_key: Any, ed_key: Any) -> tuple[SigningKey, SigningKey]:
    return (load_key("example.com", "rsa1", write_pem(tmp_path / "rsa.pem", pem(rsa_key))),
            load_key("example.com", "ed1", write_pem(tmp_path / "ed.pem", pem(ed_key))))


def zone_of(*keys: SigningKey) -> dict[str, Any]:
    return {k.dns_name: {"TXT": [k.public_record]} for k in keys}


def prepend(fields: list[tuple[str, str]], message: bytes) -> bytes:
    """What the MTA inserts: the value's LF line ends become CRLF."""
    lines = b"".join(f"{n}:{v}".replace("\n", "\r\n").encode() + b"\r\n" for n, v in fields)
    return lines + message


def test_sign_message_dual_signs(dual_keys: tuple[SigningKey, SigningKey]) -> None:
    fields = sign_message(MESSAGE, dual_keys)
    assert [name for name, _ in fields] == ["DKIM-Signature", "DKIM-Signature"]
    tags = [dkim.util.parse_tag_value(value.encode()) for _, value in fields]
    assert [(t[b"a"], t[b"s"], t[b"d"]) for t in tags] == [
        (b"rsa-sha256", b"rsa1", b"example.com"), (b"ed25519-sha256", b"ed1", b"example.com")]
    assert all(t[b"c"] == b"relaxed/relaxed" for t in tags)
    signed = prepend(fields, MESSAGE)
    dns = FakeDNS(zone_of(*dual_keys))
    results = verify_message(signed, dns)
    assert [(r.result, r.algorithm) for r in results] == [
        ("pass", "rsa-sha256"), ("pass", "ed25519-sha256")]

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
        return dns.txt(name.decode().rstrip(".")).records[0].encode()

    for index in range(2):
        assert dkim.DKIM(signed).verify(idx=index, dnsfunc=dnsfunc), index


def test_signature_values_fold_with_lf_only(dual_keys: tuple[SigningKey, SigningKey]) -> None:
    for _, value in sign_message(MESSAGE, dual_keys):
        assert "\r" not in value
        assert "\n" in value  # folded
        assert value.startswith(" v=1;")
        assert not value.endswith("\n")
        # every continuation line starts with white space (RFC 5322 §2.2.3 folding)
        assert all(line[:1] in (" ", "\t") for line in value.split("\n")[1:])


def test_signature_through_the_transaction_verifies(
        dual_keys: tuple[SigningKey, SigningKey]) -> None:
    """The milter path: fields added as they come out of sign_message, the message rebuilt by
    Transaction.message() (which restores CRLF)."""
    txn = Transaction()
    txn.new_message()
    head, _, body = MESSAGE.partition(b"\r\n\r\n")
    original = [tuple(line.decode().split(":", 1)) for line in head.split(b"\r\n")]
    txn.headers = [(n, v) for n, v in original]
    txn.add_body(body)
    assert txn.message() == MESSAGE
    fields = sign_message(txn.message(), dual_keys)
    txn.headers[:0] = fields
    txn.add_body(b"")  # the message is rebuilt
    results = verify_message(txn.message(), FakeDNS(zone_of(*dual_keys)))
    assert [r.result for r in results] == ["pass", "pass"]


def test_h_list_shows_oversigning(dual_keys: tuple[SigningKey, SigningKey]) -> None:
    _, value = sign_message(MESSAGE, dual_keys[:1])[0]
    h = dkim.util.parse_tag_value(value.encode())[b"h"]
    names = [n.strip().decode() for n in h.split(b":")]
    assert names.count("from") == 2 and names.count("subject") == 2
    assert names.count("cc") == 1  # absent, oversigned
    assert "received" not in names and "x-internal" not in names
    assert names == [n.decode() for n in header_list(
        ["From", "To", "Subject", "Date", "Message-ID", "Received", "X-Internal"],
        SignOptions())]


def test_oversigned_signature_breaks_when_a_header_is_added(
        dual_keys: tuple[SigningKey, SigningKey]) -> None:
    signed = prepend(sign_message(MESSAGE, dual_keys), MESSAGE)
    dns = FakeDNS(zone_of(*dual_keys))
    for extra in (b"Subject: Re: Quarterly report\r\n", b"Cc: eve@example.org\r\n"):
        results = verify_message(extra + signed, dns)
        assert [r.result for r in results] == ["fail", "fail"], extra
    # an unsigned field may be added
    assert [r.result for r in verify_message(b"X-Extra: 1\r\n" + signed, dns)] == ["pass"] * 2


@pytest.mark.parametrize("canon", [("simple", "simple"), ("relaxed", "simple"),
                                   ("simple", "relaxed")])
def test_sign_message_canonicalization_option(
        dual_keys: tuple[SigningKey, SigningKey], canon: tuple[str, str]) -> None:
    options = SignOptions(canonicalization=canon)
    fields = sign_message(MESSAGE, dual_keys, options)
    for _, value in fields:
        assert dkim.util.parse_tag_value(value.encode())[b"c"] == "/".join(canon).encode()
    results = verify_message(prepend(fields, MESSAGE), FakeDNS(zone_of(*dual_keys)))
    assert [r.result for r in results] == ["pass", "pass"]


def test_sign_message_with_an_lf_only_message(dual_keys: tuple[SigningKey, SigningKey]) -> None:
    lf_message = MESSAGE.replace(b"\r\n", b"\n")
    fields = sign_message(lf_message, dual_keys)
    results = verify_message(prepend(fields, MESSAGE), FakeDNS(zone_of(*dual_keys)))
    assert [r.result for r in results] == ["pass", "pass"]


def test_sign_message_refuses_a_malformed_message(
        dual_keys: tuple[SigningKey, SigningKey]) -> None:
    with pytest.raises(dkim.DKIMException):
        sign_message(b"this is not a header\r\n\r\nbody\r\n", dual_keys)


# -- fastrsa -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dkimpy_rsa(rsa_key: rsa.RSAPrivateKey) -> dict[str, int]:
    parsed: dict[str, int] = dkim.crypto.parse_pem_private_key(pem(rsa_key, TRADITIONAL))
    return parsed


def public_part(key: dict[str, int]) -> dict[str, int]:
    return {"modulus": key["modulus"], "publicExponent": key["publicExponent"]}


def test_fastrsa_is_installed_into_dkimpy() -> None:
    assert dkim.RSASSA_PKCS1_v1_5_sign is fastrsa.sign
    assert dkim.RSASSA_PKCS1_v1_5_verify is fastrsa.verify
    # the pure-Python originals are still there to compare against
    assert dkim.crypto.RSASSA_PKCS1_v1_5_sign is not fastrsa.sign


@settings(max_examples=25, deadline=None)
@given(data=st.binary(max_size=512), sha1=st.booleans())
def test_fastrsa_signatures_are_byte_identical_to_dkimpy(dkimpy_rsa: dict[str, int],
                                                        data: bytes, sha1: bool) -> None:
    """RSASSA-PKCS1-v1_5 is deterministic (RFC 8017 §8.2.1), so both must give the same
    octets."""
    new = hashlib.sha1 if sha1 else hashlib.sha256
    ours = fastrsa.sign(new(data), dkimpy_rsa)
    theirs = dkim.crypto.RSASSA_PKCS1_v1_5_sign(new(data), dkimpy_rsa)
    assert bytes(ours) == bytes(theirs)
    assert len(ours) == 256
    public = public_part(dkimpy_rsa)
    assert fastrsa.verify(new(data), ours, public)
    assert dkim.crypto.RSASSA_PKCS1_v1_5_verify(new(data), ours, public)


def test_fastrsa_sign_with_a_hash_through_object(dkimpy_rsa: dict[str, int]) -> None:
    """dkimpy hands its HashThrough wrapper, not a hashlib object, to the RSA primitive."""
    for new in (hashlib.sha1, hashlib.sha256):
        wrapped = dkim.HashThrough(new(b"header data"))
        assert fastrsa.sign(wrapped, dkimpy_rsa) == \
            dkim.crypto.RSASSA_PKCS1_v1_5_sign(new(b"header data"), dkimpy_rsa)


def test_fastrsa_verify_agrees_with_dkimpy_on_invalid_signatures(
        dkimpy_rsa: dict[str, int], other_rsa_key: rsa.RSAPrivateKey) -> None:
    public = public_part(dkimpy_rsa)
    digest = hashlib.sha256(b"message")
    good = bytes(fastrsa.sign(digest, dkimpy_rsa))
    flipped = good[:100] + bytes([good[100] ^ 0x10]) + good[101:]
    other = dkim.crypto.parse_pem_private_key(pem(other_rsa_key, TRADITIONAL))
    cases = {
        "valid": (hashlib.sha256(b"message"), good, public, True),
        "bit flipped": (hashlib.sha256(b"message"), flipped, public, False),
        "other message": (hashlib.sha256(b"massage"), good, public, False),
        "other hash": (hashlib.sha1(b"message"), good, public, False),
        "truncated": (hashlib.sha256(b"message"), good[:-1], public, False),
        "empty": (hashlib.sha256(b"message"), b"", public, False),
        "other key": (hashlib.sha256(b"message"), good, public_part(other), False),
        "zeros": (hashlib.sha256(b"message"), bytes(256), public, False),
    }
    for name, (digest_, signature, key, expected) in cases.items():
        assert fastrsa.verify(digest_, signature, key) is expected, name
        assert bool(dkim.crypto.RSASSA_PKCS1_v1_5_verify(digest_, signature, key)) is expected, \
            name


def test_fastrsa_verify_requires_a_signature_of_modulus_length(
        dkimpy_rsa: dict[str, int]) -> None:
    """RFC 8017 §8.2.2 step 1: a signature that is not k octets long is invalid, even with a
    leading zero octet added (dkimpy's pure-Python verify accepts that one)."""
    digest = hashlib.sha256(b"message")
    good = bytes(fastrsa.sign(digest, dkimpy_rsa))
    assert not fastrsa.verify(hashlib.sha256(b"message"), b"\x00" + good,
                              public_part(dkimpy_rsa))


# -- signing: configuration ----------------------------------------------------------------------
FILE = "mw.yaml"


def config_text(keys: str, extra: str = "") -> str:
    return "authserv_id: mx.example.com\nsigning:\n  keys:\n" + textwrap.indent(
        textwrap.dedent(keys).strip("\n"), "    ") + "\n" + extra


def config_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text, FILE)
    assert info.value.file == FILE
    assert str(info.value).startswith(f"{FILE}:{info.value.line}: {info.value.key}: ")
    return info.value


def line_of(text: str, needle: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.fixture
def key_files(tmp_path: Path, rsa_key: Any, ed_key: Any) -> dict[str, str]:
    return {"rsa": write_pem(tmp_path / "rsa.pem", pem(rsa_key)),
            "ed": write_pem(tmp_path / "ed.pem", pem(ed_key)),
            "open": write_pem(tmp_path / "open.pem", pem(ed_key), 0o640)}


def test_signing_config_loads_keys(key_files: dict[str, str]) -> None:
    text = config_text(f"""
        - domain: Example.COM
          selector: "2026-11"
          key: {key_files['rsa']}
          algorithm: rsa-sha256
        - domain: example.com
          selector: 2026-11e
          key: {key_files['ed']}
        """, "  canonicalization: relaxed/simple\n  oversign: [From, Subject]\n")
    signing = parse(text, FILE).signing
    assert [(k.domain, k.selector, k.algorithm) for k in signing.keys] == [
        ("example.com", "2026-11", "rsa-sha256"), ("example.com", "2026-11e", "ed25519-sha256")]
    assert signing.canonicalization == ("relaxed", "simple")
    assert signing.oversign == ("from", "subject")
    assert signing.headers == DEFAULT_HEADERS
    assert signing.parent_domains is True


def test_signing_config_missing_key_file(tmp_path: Path) -> None:
    text = config_text(f"""
        - domain: example.com
          selector: s1
          key: {tmp_path}/missing.pem
        """)
    exc = config_error(text)
    assert exc.key == "signing.keys[0].key"
    assert exc.line == line_of(text, "missing.pem")
    assert "cannot read key" in exc.message


def test_signing_config_group_readable_key(key_files: dict[str, str]) -> None:
    entries = f"""
        - domain: example.com
          selector: s1
          key: {key_files['rsa']}
        - domain: example.com
          selector: s2
          key: {key_files['open']}
        """
    text = config_text(entries)
    exc = config_error(text)
    assert exc.key == "signing.keys[1].key"
    assert exc.line == line_of(text, "open.pem")
    assert "readable by group or others (mode 0640)" in exc.message
    allowed = parse(config_text(entries, "  allow_group_readable_keys: true\n"), FILE)
    assert len(allowed.signing.keys) == 2


@pytest.mark.parametrize("selector", ["bad selector", "a..b", ".lead", "sel/1", '""'])
def test_signing_config_bad_selector(key_files: dict[str, str], selector: str) -> None:
    text = config_text(f"""
        - domain: example.com
          selector: {selector}
          key: {key_files['rsa']}
        """)
    exc = config_error(text)
    assert exc.key == "signing.keys[0].selector"
    assert exc.line == line_of(text, "selector:")
    assert "not a valid selector" in exc.message


@pytest.mark.parametrize("selector", ["2024.10", "01"])
def test_signing_config_numeric_looking_selector_is_kept_verbatim(
        key_files: dict[str, str], selector: str) -> None:
    text = config_text(f"""
        - domain: example.com
          selector: {selector}
          key: {key_files['rsa']}
        """)
    assert parse(text, FILE).signing.keys[0].selector == selector


def test_signing_config_unknown_algorithm(key_files: dict[str, str]) -> None:
    text = config_text(f"""
        - domain: example.com
          selector: s1
          key: {key_files['rsa']}
          algorithm: rsa-sha1
        """)
    exc = config_error(text)
    assert exc.key == "signing.keys[0].algorithm"
    assert exc.line == line_of(text, "algorithm:")
    assert "rsa-sha256, ed25519-sha256" in exc.message


def test_signing_config_algorithm_mismatch(key_files: dict[str, str]) -> None:
    text = config_text(f"""
        - domain: example.com
          selector: s1
          key: {key_files['ed']}
          algorithm: rsa-sha256
        """)
    exc = config_error(text)
    assert exc.key == "signing.keys[0].key"
    assert "is ed25519-sha256, not rsa-sha256" in exc.message


def test_signing_config_headers_without_from(key_files: dict[str, str]) -> None:
    text = config_text(f"""
        - domain: example.com
          selector: s1
          key: {key_files['rsa']}
        """, "  headers: [to, subject, date]\n")
    exc = config_error(text)
    assert exc.key == "signing.headers"
    assert exc.line == line_of(text, "headers:")
    assert "From must be signed" in exc.message


@pytest.mark.parametrize(("entry", "key", "message"), [
    ("selector: s1\n  key: KEY", "signing.keys[0].domain", "is required"),
    ("domain: example.com\n  key: KEY", "signing.keys[0].selector", "is required"),
    ("domain: example.com\n  selector: s1", "signing.keys[0].key", "is required"),
    ("domain: exa_mple..com\n  selector: s1\n  key: KEY", "signing.keys[0].domain",
     "not a domain name"),
    ("domain: example.com\n  selector: s1\n  key: KEY\n  colour: blue",
     "signing.keys[0].colour", "unknown key"),
])
def test_signing_config_entry_errors(key_files: dict[str, str], entry: str, key: str,
                                     message: str) -> None:
    text = config_text("- " + entry.replace("KEY", key_files["rsa"]))
    exc = config_error(text)
    assert exc.key == key
    assert message in exc.message
    assert exc.line > 0


def test_signing_config_unknown_canonicalization(key_files: dict[str, str]) -> None:
    text = config_text(f"""
        - domain: example.com
          selector: s1
          key: {key_files['rsa']}
        """, "  canonicalization: nofws/simple\n")
    exc = config_error(text)
    assert exc.key == "signing.canonicalization"
    assert exc.line == line_of(text, "canonicalization:")


def test_no_signing_section_gives_no_keys_and_the_default_lists() -> None:
    signing = parse("authserv_id: mx.example.com\n", FILE).signing
    assert signing.keys == ()
    assert (signing.headers, signing.oversign) == (DEFAULT_HEADERS, DEFAULT_OVERSIGN)
    assert signing.keys_for_author("a@example.com") == ()


def test_dkim_sign_rule_needs_keys() -> None:
    text = ("authserv_id: mx.example.com\nrules:\n  eom:\n    - name: sign\n"
            "      check: dkim_sign\n      authenticated: true\n")
    exc = config_error(text)
    assert "needs keys in signing.keys" in exc.message
    assert exc.key.startswith("rules.eom[0]")


@pytest.mark.parametrize("parent_domains", [True, False])
def test_keys_for(key_files: dict[str, str], parent_domains: bool) -> None:
    text = config_text(f"""
        - {{domain: example.com, selector: r, key: {key_files['rsa']}}}
        - {{domain: example.com, selector: e, key: {key_files['ed']}}}
        - {{domain: news.example.com, selector: n, key: {key_files['rsa']}}}
        """, f"  parent_domains: {'true' if parent_domains else 'false'}\n")
    signing = parse(text, FILE).signing
    assert signing.parent_domains is parent_domains

    def selectors(domain: str) -> list[str]:
        return [k.selector for k in signing.keys_for_author(f"a@{domain}")]

    assert selectors("example.com") == ["r", "e"]
    assert selectors("EXAMPLE.com.") == ["r", "e"]
    assert selectors("news.example.com") == ["n"]  # its own keys, not the parent's as well
    assert selectors("example.org") == []
    assert selectors("notexample.com") == []
    if parent_domains:
        assert selectors("mail.example.com") == ["r", "e"]
        assert selectors("a.b.example.com") == ["r", "e"]
        assert selectors("x.news.example.com") == ["n"]  # the closest parent with keys
    else:
        assert selectors("mail.example.com") == []
        assert selectors("x.news.example.com") == []
