"""DKIM verification (`mailwarden.dkim.verify.verify_message`) with every key fetched from the
real DNS server on loopback: the RFC 8463 Appendix A message, messages signed here with fresh
keys, and each way a signature can go wrong, mapped to its RFC 8601 §2.7.1 result word.

The messages are signed with dkimpy directly (not with `mailwarden.dkim.sign`), so that the
verifier is checked against an independent signer; `sign_with_tags` builds signatures with tags
dkimpy's `sign()` cannot write (x=, a chosen t=)."""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
import dkim.util
import nacl.encoding
import nacl.signing
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import HASH_ALGORITHMS

from mailwarden.devtools.devdns import DevDNSServer, load_zone_file
from mailwarden.dkim.keys import public_record
from mailwarden.dkim.verify import SignatureResult, verify_message
from mailwarden.dns import Resolver

from helpers import make_resolver, weak_rsa_key

DATA = Path(__file__).resolve().parents[1] / "data"
DOMAIN = b"example.com"
MESSAGE = (
    b"From: Alice Example <alice@example.com>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: Lunch on Friday\r\n"
    b"Date: Tue, 03 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <lunch-1@example.com>\r\n"
    b"\r\n"
    b"Hi Bob,\r\n"
    b"\r\n"
    b"noon at the usual place?\r\n"
    b"\r\n"
    b"Alice\r\n"
)
SIGNED_HEADERS = [b"from", b"to", b"subject", b"date", b"message-id"]


# -- keys ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DkimKey:
    selector: bytes
    algorithm: bytes  # rsa-sha256 | ed25519-sha256
    private: bytes  # what dkimpy signs with: PEM (RSA), base64 seed (Ed25519)
    record: str  # the TXT record
    bits: int

    @property
    def p(self) -> str:
        return self.record.rpartition("p=")[2]


def rsa_test_key(selector: bytes, key: rsa.RSAPrivateKey) -> DkimKey:
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    return DkimKey(selector, b"rsa-sha256", pem, public_record(key), key.key_size)


def ed25519_test_key(selector: bytes) -> DkimKey:
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    return DkimKey(selector, b"ed25519-sha256", base64.b64encode(seed), public_record(key), 256)




@dataclass(frozen=True)
class Keys:
    rsa: DkimKey
    ed: DkimKey
    rsa512: DkimKey
    rsa768: DkimKey
    zone: dict[str, Any]


def key_name(selector: bytes | str) -> str:
    text = selector.decode() if isinstance(selector, bytes) else selector
    return f"{text}._domainkey.example.com"


@pytest.fixture(scope="module")
def keys() -> Keys:
    rsa_key = rsa_test_key(b"rsa2048", rsa.generate_private_key(65537, 2048))
    ed_key = ed25519_test_key(b"ed")
    rsa512 = rsa_test_key(b"weak512", weak_rsa_key(512))
    rsa768 = rsa_test_key(b"weak768", weak_rsa_key(768))
    assert (rsa512.bits, rsa768.bits) == (512, 768)
    zone: dict[str, Any] = {
        key_name(k.selector): [{"TXT": k.record}] for k in (rsa_key, ed_key, rsa512, rsa768)
    }
    zone.update({
        key_name("revoked"): [{"TXT": "v=DKIM1; k=rsa; p="}],
        key_name("slow"): ["TIMEOUT"],
        key_name("sha1only"): [{"TXT": f"v=DKIM1; k=rsa; h=sha1; p={rsa_key.p}"}],
        key_name("bothhashes"): [{"TXT": f"v=DKIM1; k=rsa; h=sha1:sha256; p={rsa_key.p}"}],
        key_name("edtype"): [{"TXT": f"v=DKIM1; k=ed25519; p={rsa_key.p}"}],
        key_name("strict"): [{"TXT": f"v=DKIM1; k=rsa; t=s; p={rsa_key.p}"}],
        key_name("tlsrpt"): [{"TXT": f"v=DKIM1; k=rsa; s=tlsrpt; p={rsa_key.p}"}],
        key_name("services"): [{"TXT": f"v=DKIM1; k=rsa; s=tlsrpt:email; p={rsa_key.p}"}],
        key_name("secure"): [{"TXT": rsa_key.record}, "AD"],
        # a name that exists, without TXT: NODATA
        key_name("nodata"): [{"A": "192.0.2.1"}],
    })
    return Keys(rsa_key, ed_key, rsa512, rsa768, zone)


@pytest.fixture
def resolver(dns_server: DevDNSServer, keys: Keys) -> Iterator[Resolver]:
    dns_server.load(keys.zone)
    yield make_resolver(dns_server)


# -- signing ---------------------------------------------------------------------------------
def sign(message: bytes, key: DkimKey, *, selector: bytes | None = None,
         canonicalize: tuple[bytes, bytes] = (b"relaxed", b"relaxed"),
         headers: Sequence[bytes] = SIGNED_HEADERS, algorithm: bytes | None = None,
         length: bool = False, identity: bytes | None = None) -> bytes:
    """`message` with one more DKIM-Signature on top, made by dkimpy."""
    line: bytes = dkim.sign(message, selector or key.selector, DOMAIN, key.private,
                            identity=identity, canonicalize=canonicalize,
                            signature_algorithm=algorithm or key.algorithm,
                            include_headers=list(headers), length=length)
    assert line.startswith(b"DKIM-Signature: ")
    return line + message


def sign_with_tags(message: bytes, key: DkimKey, tags: Sequence[tuple[bytes, bytes]],
                   *, selector: bytes | None = None, with_bh: bool = True) -> bytes:
    """Like `sign`, with extra tags (t=, x=) placed before h= and b= by dkimpy's own header
    builder, so the b= signature covers them."""
    signer = dkim.DKIM(message, signature_algorithm=key.algorithm)
    policy = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    signer.hasher = HASH_ALGORITHMS[key.algorithm]
    body_hash = base64.b64encode(signer.hasher(policy.canonicalize_body(signer.body)).digest())
    if key.algorithm == b"ed25519-sha256":
        pk: Any = nacl.signing.SigningKey(key.private, encoder=nacl.encoding.Base64Encoder)
    else:
        pk = dkim.crypto.parse_pem_private_key(key.private)
    fields = [(b"v", b"1"), (b"a", key.algorithm), (b"c", b"relaxed/relaxed"), (b"d", DOMAIN),
              (b"s", selector or key.selector), *tags, (b"h", b":".join(SIGNED_HEADERS))]
    if with_bh:
        fields.append((b"bh", body_hash))
    fields.append((b"b", b"0" * 60))
    value: bytes = signer.gen_header(fields, list(SIGNED_HEADERS), policy, b"DKIM-Signature",
                                     pk)
    return b"DKIM-Signature: " + value + message


def signature_tags(signed: bytes, index: int = 0) -> dict[bytes, bytes]:
    headers = [v for n, v in dkim.rfc822_parse(signed)[0] if n.lower() == b"dkim-signature"]
    tags: dict[bytes, bytes] = dkim.util.parse_tag_value(headers[index])
    return tags


def header_b(signed: bytes, index: int = 0) -> str:
    return re.sub(rb"\s+", b"", signature_tags(signed, index)[b"b"])[:8].decode()


def only(results: list[SignatureResult]) -> SignatureResult:
    assert len(results) == 1, results
    return results[0]


def replace_once(message: bytes, old: bytes, new: bytes) -> bytes:
    assert message.count(old) == 1, old
    return message.replace(old, new)


# -- RFC 8463 Appendix A -----------------------------------------------------------------------
def test_rfc8463_appendix_a_both_signatures_pass(dns_server: DevDNSServer) -> None:
    dns_server.load(load_zone_file(DATA / "rfc8463" / "zone.yaml"))
    message = (DATA / "rfc8463" / "signed.eml").read_bytes()
    ed, rsa_sig = verify_message(message, make_resolver(dns_server))
    assert (ed.result, ed.reason) == ("pass", "signature verified")
    assert (ed.domain, ed.selector, ed.algorithm) == (
        "football.example.com", "brisbane", "ed25519-sha256")
    assert (ed.b, ed.key_bits, ed.identity) == ("/gCrinpc", 256, "@football.example.com")
    assert (rsa_sig.result, rsa_sig.domain, rsa_sig.selector, rsa_sig.algorithm) == (
        "pass", "football.example.com", "test", "rsa-sha256")
    assert (rsa_sig.b, rsa_sig.key_bits) == ("F45dVWDf", 1024)
    assert ed.body_length is None and rsa_sig.body_length is None
    assert not ed.authentic and not rsa_sig.authentic


def test_rfc8463_message_with_a_changed_body_fails_both(dns_server: DevDNSServer) -> None:
    dns_server.load(load_zone_file(DATA / "rfc8463" / "zone.yaml"))
    message = (DATA / "rfc8463" / "signed.eml").read_bytes()
    tampered = replace_once(message, b"We lost the game.", b"We won the game.")
    results = verify_message(tampered, make_resolver(dns_server))
    assert [(r.result, r.reason) for r in results] == [("fail", "body hash mismatch")] * 2


# -- fresh keys: pass --------------------------------------------------------------------------
CANONICALIZATIONS = [(b"simple", b"simple"), (b"relaxed", b"relaxed"), (b"relaxed", b"simple")]


@pytest.mark.parametrize("kind", ["rsa", "ed"])
@pytest.mark.parametrize("canon", CANONICALIZATIONS, ids=lambda c: b"/".join(c).decode())
def test_fresh_signature_passes(resolver: Resolver, keys: Keys, kind: str,
                                canon: tuple[bytes, bytes]) -> None:
    key = keys.rsa if kind == "rsa" else keys.ed
    signed = sign(MESSAGE, key, canonicalize=canon)
    result = only(verify_message(signed, resolver))
    assert (result.result, result.reason) == ("pass", "signature verified")
    assert result.domain == "example.com"
    assert result.selector == key.selector.decode()
    assert result.algorithm == key.algorithm.decode()
    assert result.key_bits == key.bits
    assert result.b == header_b(signed) and len(result.b) == 8
    assert result.identity == "@example.com"
    assert result.body_length is None
    assert signature_tags(signed)[b"c"] == b"/".join(canon)


def test_dual_signed_message_gives_one_result_per_signature_top_first(
        resolver: Resolver, keys: Keys) -> None:
    signed = sign(sign(MESSAGE, keys.rsa), keys.ed)  # the Ed25519 one is on top
    results = verify_message(signed, resolver)
    assert [(r.result, r.algorithm, r.key_bits) for r in results] == [
        ("pass", "ed25519-sha256", 256), ("pass", "rsa-sha256", 2048)]
    assert [r.b for r in results] == [header_b(signed, 0), header_b(signed, 1)]


def test_lf_only_line_ends_still_verify(resolver: Resolver, keys: Keys) -> None:
    for canon in CANONICALIZATIONS:
        for key in (keys.rsa, keys.ed):
            signed = sign(MESSAGE, key, canonicalize=canon)
            lf_only = signed.replace(b"\r\n", b"\n")
            assert b"\r" not in lf_only
            assert only(verify_message(lf_only, resolver)).result == "pass", (canon, key)


def test_dnssec_authenticated_key_is_reported(resolver: Resolver, keys: Keys) -> None:
    signed = sign(MESSAGE, keys.rsa, selector=b"secure")
    result = only(verify_message(signed, resolver))
    assert (result.result, result.authentic) == ("pass", True)
    plain = only(verify_message(sign(MESSAGE, keys.rsa), resolver))
    assert (plain.result, plain.authentic) == ("pass", False)


def test_unsigned_message_has_no_results(resolver: Resolver) -> None:
    assert verify_message(MESSAGE, resolver) == []


# -- fail --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["rsa", "ed"])
def test_tampered_body_fails_with_body_hash_mismatch(resolver: Resolver, keys: Keys,
                                                     kind: str) -> None:
    signed = sign(MESSAGE, keys.rsa if kind == "rsa" else keys.ed)
    tampered = replace_once(signed, b"noon at", b"one at")
    result = only(verify_message(tampered, resolver))
    assert (result.result, result.reason) == ("fail", "body hash mismatch")
    assert result.key_bits in (2048, 256)


@pytest.mark.parametrize("kind", ["rsa", "ed"])
def test_tampered_signed_header_fails(resolver: Resolver, keys: Keys, kind: str) -> None:
    signed = sign(MESSAGE, keys.rsa if kind == "rsa" else keys.ed)
    tampered = replace_once(signed, b"Subject: Lunch on Friday", b"Subject: Lunch on Monday")
    result = only(verify_message(tampered, resolver))
    assert (result.result, result.reason) == ("fail", "signature does not verify")


def test_tampered_signature_value_fails(resolver: Resolver, keys: Keys) -> None:
    signed = sign(MESSAGE, keys.rsa)
    value = re.sub(rb"\s+", b"", signature_tags(signed)[b"b"])
    raw = base64.b64decode(value)
    forged = base64.b64encode(raw[:-1] + bytes([raw[-1] ^ 1]))
    header_end = signed.index(b"\r\nFrom:")
    head = re.sub(rb"b=[A-Za-z0-9+/=\s]+$", b"b=" + forged, signed[:header_end])
    result = only(verify_message(head + signed[header_end:], resolver))
    assert (result.result, result.reason) == ("fail", "signature does not verify")


def test_added_second_instance_of_an_oversigned_header_fails(resolver: Resolver,
                                                            keys: Keys) -> None:
    oversigned = sign(MESSAGE, keys.rsa, headers=[*SIGNED_HEADERS, b"subject"])
    assert signature_tags(oversigned)[b"h"].count(b"subject") == 2
    assert only(verify_message(oversigned, resolver)).result == "pass"
    for added in (b"Subject: Free money\r\n" + oversigned,  # on top
                  replace_once(oversigned, b"\r\n\r\nHi Bob", b"\r\nSubject: Free money"
                                                              b"\r\n\r\nHi Bob")):  # at the end
        result = only(verify_message(added, resolver))
        assert (result.result, result.reason) == ("fail", "signature does not verify")


def test_without_oversigning_an_added_subject_on_top_still_passes(resolver: Resolver,
                                                                  keys: Keys) -> None:
    """The contrast that makes oversigning worth it (RFC 6376 §5.4.2, §8.15): the bottom-most
    Subject is the signed one, so one added on top goes unnoticed."""
    signed = sign(MESSAGE, keys.rsa)
    assert only(verify_message(b"Subject: Free money\r\n" + signed, resolver)).result == "pass"


def test_added_unsigned_header_still_passes(resolver: Resolver, keys: Keys) -> None:
    signed = sign(MESSAGE, keys.rsa)
    added = (b"Received: from relay.example.net by mx.example.org; Tue, 3 Nov 2026\r\n"
             b"X-Mailing-List: lunch@example.net\r\n" + signed)
    added = replace_once(added, b"\r\n\r\nHi Bob", b"\r\nX-Spam-Score: 0.1\r\n\r\nHi Bob")
    result = only(verify_message(added, resolver))
    assert (result.result, result.reason) == ("pass", "signature verified")


@pytest.mark.parametrize(("body_canon", "expected"), [(b"relaxed", "pass"), (b"simple", "fail")])
def test_body_whitespace_change_depends_on_body_canonicalization(
        resolver: Resolver, keys: Keys, body_canon: bytes, expected: str) -> None:
    """RFC 6376 §3.4.4: relaxed body canonicalization ignores trailing whitespace and reduces
    runs of whitespace; simple does not."""
    signed = sign(MESSAGE, keys.rsa, canonicalize=(b"relaxed", body_canon))
    changed = replace_once(signed, b"noon at the usual place?\r\n",
                           b"noon  at the usual\tplace?  \r\n")
    assert only(verify_message(changed, resolver)).result == expected


@pytest.mark.parametrize(("header_canon", "expected"),
                         [(b"relaxed", "pass"), (b"simple", "fail")])
def test_header_whitespace_change_depends_on_header_canonicalization(
        resolver: Resolver, keys: Keys, header_canon: bytes, expected: str) -> None:
    """RFC 6376 §3.4.2: relaxed header canonicalization lower-cases the name and unfolds and
    compresses whitespace; simple changes nothing."""
    signed = sign(MESSAGE, keys.rsa, canonicalize=(header_canon, b"simple"))
    changed = replace_once(signed, b"Subject: Lunch on Friday",
                           b"SUBJECT:   Lunch\r\n on   Friday")
    assert only(verify_message(changed, resolver)).result == expected


def test_expired_signature_fails(resolver: Resolver, keys: Keys) -> None:
    """x= a few minutes ago (inside dkimpy's own 10-hour slop): fail (RFC 6376 §3.5, §6.1.1)."""
    now = int(time.time())
    signed = sign_with_tags(MESSAGE, keys.rsa, [(b"t", b"%d" % (now - 3600)),
                                                 (b"x", b"%d" % (now - 120))])
    result = only(verify_message(signed, resolver))
    assert result.result == "fail"
    assert "expired" in result.reason


def test_signature_with_future_expiry_passes(resolver: Resolver, keys: Keys) -> None:
    now = int(time.time())
    signed = sign_with_tags(MESSAGE, keys.rsa, [(b"t", b"%d" % now), (b"x", b"%d" % (now + 600))])
    assert only(verify_message(signed, resolver)).result == "pass"
    # and the same signature once its x= has passed (the verifier's clock moved on)
    later = only(verify_message(signed, resolver, now=now + 3600))
    assert later.result == "fail" and "expired" in later.reason


def test_signature_expired_a_day_ago_fails(resolver: Resolver, keys: Keys) -> None:
    now = int(time.time())
    signed = sign_with_tags(MESSAGE, keys.rsa, [(b"t", b"%d" % (now - 3 * 86400)),
                                                 (b"x", b"%d" % (now - 86400))])
    result = only(verify_message(signed, resolver))
    assert result.result == "fail", result


def test_signature_dated_in_the_future_fails(resolver: Resolver, keys: Keys) -> None:
    """t= an hour ahead (past verify.py's 5-minute allowance, inside dkimpy's 10 hours)."""
    future = int(time.time()) + 3600
    signed = sign_with_tags(MESSAGE, keys.rsa, [(b"t", b"%d" % future)])
    result = only(verify_message(signed, resolver))
    assert result.result == "fail"
    assert "future" in result.reason


def test_signature_dated_far_in_the_future_fails(resolver: Resolver, keys: Keys) -> None:
    future = int(time.time()) + 30 * 86400
    signed = sign_with_tags(MESSAGE, keys.rsa, [(b"t", b"%d" % future)])
    result = only(verify_message(signed, resolver))
    assert result.result == "fail", result


def test_slightly_future_timestamp_is_tolerated(resolver: Resolver, keys: Keys) -> None:
    signed = sign_with_tags(MESSAGE, keys.rsa, [(b"t", b"%d" % (int(time.time()) + 60))])
    assert only(verify_message(signed, resolver)).result == "pass"


# -- permerror ---------------------------------------------------------------------------------
def test_revoked_key_is_permerror(resolver: Resolver, keys: Keys) -> None:
    result = only(verify_message(sign(MESSAGE, keys.rsa, selector=b"revoked"), resolver))
    assert result.result == "permerror"
    assert "revoked" in result.reason
    assert result.selector == "revoked"


@pytest.mark.parametrize("selector", [b"missing", b"nodata"])
def test_missing_key_is_permerror(resolver: Resolver, keys: Keys, selector: bytes) -> None:
    result = only(verify_message(sign(MESSAGE, keys.rsa, selector=selector), resolver))
    assert result.result == "permerror"
    assert key_name(selector) in result.reason
    assert ("nxdomain" if selector == b"missing" else "nodata") in result.reason


def test_key_that_allows_only_sha1_is_permerror(resolver: Resolver, keys: Keys) -> None:
    result = only(verify_message(sign(MESSAGE, keys.rsa, selector=b"sha1only"), resolver))
    assert result.result == "permerror"
    assert "h=sha1" in result.reason
    # a key listing both hashes is fine
    both = only(verify_message(sign(MESSAGE, keys.rsa, selector=b"bothhashes"), resolver))
    assert both.result == "pass"


def test_ed25519_key_for_an_rsa_signature_is_permerror(resolver: Resolver, keys: Keys) -> None:
    result = only(verify_message(sign(MESSAGE, keys.rsa, selector=b"edtype"), resolver))
    assert result.result == "permerror"
    assert "k=ed25519" in result.reason and "rsa-sha256" in result.reason


def test_strict_key_refuses_a_subdomain_identity(resolver: Resolver, keys: Keys) -> None:
    """RFC 6376 §3.6.1 t=s: the i= domain must be d= exactly."""
    sub = sign(MESSAGE, keys.rsa, selector=b"strict", identity=b"alice@mail.example.com")
    result = only(verify_message(sub, resolver))
    assert result.result == "permerror" and "t=s" in result.reason
    exact = sign(MESSAGE, keys.rsa, selector=b"strict", identity=b"alice@example.com")
    assert only(verify_message(exact, resolver)).result == "pass"


def test_key_for_another_service_is_permerror(resolver: Resolver, keys: Keys) -> None:
    """RFC 6376 §3.6.1 s=: a key whose service types include neither email nor * is not for
    mail; unknown types in the list are ignored."""
    other = only(verify_message(sign(MESSAGE, keys.rsa, selector=b"tlsrpt"), resolver))
    assert other.result == "permerror" and "s=tlsrpt" in other.reason
    listed = only(verify_message(sign(MESSAGE, keys.rsa, selector=b"services"), resolver))
    assert listed.result == "pass"


def test_signature_that_does_not_sign_from_is_neutral(resolver: Resolver, keys: Keys) -> None:
    """RFC 6376 §6.1.1: h= must include From, or the signature is ignored."""
    signed = replace_once(sign(MESSAGE, keys.rsa), b"h=from : to", b"h=to")
    result = only(verify_message(signed, resolver))
    assert result.result == "neutral" and "From" in result.reason


def test_a_second_from_above_a_signed_message_fails(resolver: Resolver, keys: Keys) -> None:
    """RFC 6376 §8.15: a From added on top of a message signed with one From."""
    signed = sign(MESSAGE, keys.rsa)
    assert only(verify_message(signed, resolver)).result == "pass"
    forged = b"From: Mallory <ceo@example.com>\r\n" + signed
    assert only(verify_message(forged, resolver)).result == "fail"


# -- temperror ---------------------------------------------------------------------------------
def test_key_lookup_timeout_is_temperror_and_quick(resolver: Resolver, keys: Keys) -> None:
    signed = sign(MESSAGE, keys.rsa, selector=b"slow")
    started = time.monotonic()
    result = only(verify_message(signed, resolver))
    elapsed = time.monotonic() - started
    assert result.result == "temperror"
    assert key_name("slow") in result.reason
    assert elapsed < 3.0


# -- neutral -----------------------------------------------------------------------------------
def test_malformed_tag_list_is_neutral(resolver: Resolver) -> None:
    message = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s\r\n" + MESSAGE
    result = only(verify_message(message, resolver))
    assert result.result == "neutral"
    assert "malformed tag list" in result.reason


def test_signature_without_bh_is_neutral(resolver: Resolver, keys: Keys) -> None:
    signed = sign_with_tags(MESSAGE, keys.rsa, [], with_bh=False)
    assert b"bh=" not in signed
    result = only(verify_message(signed, resolver))
    assert result.result == "neutral"
    assert "missing" in result.reason and "bh" in result.reason
    assert (result.domain, result.selector) == ("example.com", "rsa2048")


@pytest.mark.parametrize(("old", "new", "reason"), [
    (b"a=rsa-sha256", b"a=rsa-sha512", "unknown signature algorithm"),
    (b"v=1", b"v=2", "v= value is not 1"),
    (b"d=example.com", b"d=exa(mple.com", "d= value is not valid"),
])
def test_invalid_signature_tags_are_neutral(resolver: Resolver, keys: Keys, old: bytes,
                                            new: bytes, reason: str) -> None:
    signed = sign(MESSAGE, keys.rsa)
    header_end = signed.index(b"\r\nFrom:")
    broken = signed[:header_end].replace(old, new, 1) + signed[header_end:]
    result = only(verify_message(broken, resolver))
    assert result.result == "neutral"
    assert reason in result.reason


def test_expiry_before_timestamp_is_neutral(resolver: Resolver, keys: Keys) -> None:
    now = int(time.time())
    signed = sign_with_tags(MESSAGE, keys.rsa, [(b"t", b"%d" % now), (b"x", b"%d" % (now - 60))])
    assert only(verify_message(signed, resolver)).result == "neutral"


def test_signatures_beyond_max_signatures_are_not_evaluated(dns_server: DevDNSServer,
                                                           keys: Keys) -> None:
    dns_server.load(keys.zone)
    bottom = sign(MESSAGE, keys.rsa, selector=b"bothhashes")
    signed = sign(sign(bottom, keys.ed), keys.rsa)
    dns_server.clear_log()
    results = verify_message(signed, make_resolver(dns_server), max_signatures=2)
    assert [r.result for r in results] == ["pass", "pass", "neutral"]
    assert [r.selector for r in results[:2]] == ["rsa2048", "ed"]
    assert "not evaluated" in results[2].reason
    assert "more than 2 signatures" in results[2].reason
    # the third signature's key was never asked for
    asked = " ".join(str(query) for query in dns_server.queries)
    assert "rsa2048._domainkey" in asked and "ed._domainkey" in asked
    assert "bothhashes" not in asked
    # with the default limit, all three are evaluated
    assert [r.result for r in verify_message(signed, make_resolver(dns_server))] == ["pass"] * 3


# -- policy ------------------------------------------------------------------------------------
def test_rsa_sha1_is_policy(resolver: Resolver, keys: Keys) -> None:
    signed = sign(MESSAGE, keys.rsa, algorithm=b"rsa-sha1")
    assert signature_tags(signed)[b"a"] == b"rsa-sha1"
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: keys.rsa.record.encode())
    result = only(verify_message(signed, resolver))
    assert result.result == "policy"
    assert "RFC 8301" in result.reason
    assert result.algorithm == "rsa-sha1"


@pytest.mark.parametrize("bits", [512, 768])
def test_weak_rsa_key_is_policy(resolver: Resolver, keys: Keys, bits: int) -> None:
    key = keys.rsa512 if bits == 512 else keys.rsa768
    signed = sign(MESSAGE, key)
    # technically valid: dkimpy accepts it when told that any key size will do
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: key.record.encode(), minkey=256)
    result = only(verify_message(signed, resolver))
    assert result.result == "policy"
    assert result.key_bits == bits
    assert "RFC 8301" in result.reason


def test_body_length_signature(resolver: Resolver, keys: Keys) -> None:
    signed = sign(MESSAGE, keys.rsa, length=True)
    length = int(signature_tags(signed)[b"l"])
    assert length == len(MESSAGE.partition(b"\r\n\r\n")[2])
    result = only(verify_message(signed, resolver))
    assert (result.result, result.body_length) == ("pass", length)
    # text appended after the signed length does not break it (the l= risk, RFC 6376 §8.2)
    appended = signed + b"-- \r\nunsubscribe: https://lists.example.net/\r\n"
    result = only(verify_message(appended, resolver))
    assert (result.result, result.body_length) == ("pass", length)
    # ... but a change inside the signed part does
    assert only(verify_message(replace_once(signed, b"noon", b"nine"),
                               resolver)).result == "fail"


def test_body_length_signature_refused_is_policy(resolver: Resolver, keys: Keys) -> None:
    signed = sign(MESSAGE, keys.rsa, length=True)
    result = only(verify_message(signed, resolver, accept_body_length=False))
    assert result.result == "policy"
    assert "l=" in result.reason
    assert result.body_length == int(signature_tags(signed)[b"l"])
    # signatures without l= are unaffected by the refusal
    plain = only(verify_message(sign(MESSAGE, keys.rsa), resolver, accept_body_length=False))
    assert plain.result == "pass"
