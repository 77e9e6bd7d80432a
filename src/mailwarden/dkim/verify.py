"""DKIM verification (RFC 6376 §6), one result per DKIM-Signature, keys through our resolver.

Results are RFC 8601 §2.7.1 words:
  pass       the signature verifies
  fail       it does not (body hash or signature mismatch), or it expired (x=) or is dated in
             the future (t=) (RFC 6376 §6.1.1 PERMFAIL on the signature)
  policy     a signature we do not accept whatever its cryptographic validity (so it is not
             checked): rsa-sha1 and RSA keys under 1024 bits never pass (RFC 8301 §3.1,
             §3.2); l= signatures when refused by the rule
  neutral    the signature is malformed (missing or invalid tags, RFC 8601 "syntax errors")
  permerror  the key is missing (NXDOMAIN/NODATA), revoked (empty p=), malformed, or its
             constraints (h=, k=, s=, t=s) exclude this signature (RFC 6376 §6.1.2)
  temperror  the key lookup failed temporarily: never a failure
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import dkim.crypto
import dkim.util
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from mailwarden.deadline import Deadline
from mailwarden.dkim import fastrsa
from mailwarden.dkim.canon import body_hash
from mailwarden.dkim.headerhash import HeaderFormatError, parse_fields, signed_data
from mailwarden.dns import DNSClient, Status
from mailwarden.results import Result

MANDATORY = (b"v", b"a", b"b", b"bh", b"d", b"h", b"s")


@dataclass(frozen=True, slots=True)
class SignatureResult:
    result: Result  # RFC 6376 §6.1, RFC 8601 §2.7.1
    reason: str
    domain: str = ""  # d=
    selector: str = ""  # s=
    algorithm: str = ""  # a=
    b: str = ""  # the first 8 characters of b= (RFC 6008 header.b)
    identity: str = ""  # i=
    body_length: int | None = None  # l=
    key_bits: int = 0
    authentic: bool = False  # the key record was DNSSEC-authenticated


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace")


BodySource = Callable[[], Iterable[bytes]]


@dataclass(frozen=True, slots=True)
class PublicKey:
    kind: bytes  # b"rsa" or b"ed25519"
    bits: int
    key: rsa.RSAPublicKey | ed25519.Ed25519PublicKey

    def verifies(self, signature: bytes, data: bytes, hash_name: bytes) -> bool:
        """RSASSA-PKCS1-v1_5 over `data` (RFC 6376 §3.3.1), or Ed25519 over its SHA-256
        (RFC 8463 §3: PureEdDSA signs the hash, not the data)."""
        try:
            if isinstance(self.key, rsa.RSAPublicKey):
                algorithm = hashes.SHA1() if hash_name == b"sha1" else hashes.SHA256()
                self.key.verify(signature, data, padding.PKCS1v15(), algorithm)
            else:
                self.key.verify(signature, hashlib.sha256(data).digest())
        except (InvalidSignature, ValueError):
            return False
        return True


# Read-only use: the parsed tags of a key record, once per distinct record.
_key_tags = functools.lru_cache(maxsize=1024)(dkim.util.parse_tag_value)


@functools.lru_cache(maxsize=1024)
def public_key(record: bytes) -> PublicKey:
    """The key of a DKIM key record (RFC 6376 §3.6.1 k= and p=; RFC 8463 §4 for Ed25519: p= is
    the raw 32-byte key), parsed once per distinct record: a busy domain's key is seen on
    every message. Raises ValueError for an unusable key."""
    tags = _key_tags(record)
    kind = tags.get(b"k", b"rsa").strip().lower()
    try:
        data = base64.b64decode(re.sub(rb"\s+", b"", tags.get(b"p", b"")), validate=True)
    except ValueError:
        raise ValueError("p= is not base64") from None
    if kind == b"ed25519":
        return PublicKey(kind, 256, ed25519.Ed25519PublicKey.from_public_bytes(data))
    if kind != b"rsa":
        raise ValueError(f"unknown key type k={kind.decode('ascii', 'replace')}")
    try:
        parsed = dkim.crypto.parse_public_key(data)
    except (dkim.crypto.UnparsableKeyError, IndexError, KeyError, TypeError) as exc:
        raise ValueError(f"unparseable RSA key: {exc}") from None
    modulus, exponent = parsed["modulus"], parsed["publicExponent"]
    return PublicKey(kind, modulus.bit_length(), fastrsa.public(modulus, exponent))


def split_message(message: bytes) -> tuple[bytes, BodySource]:
    """A whole message as (header block, body source), for callers that hold it in memory."""
    found = [(index, size) for index, size in ((message.find(b"\r\n\r\n"), 4),
                                               (message.find(b"\n\n"), 2)) if index >= 0]
    if not found:
        return message + b"\r\n", lambda: ()
    index, size = min(found)
    body = message[index + size:]
    return message[: index + size], lambda: (body,)


class _BodyHashes:
    """Body hashes by (canonicalization, hash, l=): computed once each, streamed."""

    def __init__(self, body: BodySource, crlf: bool) -> None:
        self.body = body
        self.crlf = crlf
        self.known: dict[tuple[str, str, int | None], bytes] = {}

    def get(self, canonicalization: str, hash_name: str, limit: int | None) -> bytes:
        key = (canonicalization, hash_name, limit)
        if key not in self.known:
            self.known[key] = body_hash(self.body(), canonicalization, hash_name, limit,
                                        self.crlf)
        return self.known[key]


def verify_message(message: bytes, dns: DNSClient, *, body: BodySource | None = None,
                   crlf: bool = False, max_signatures: int = 8,
                   accept_body_length: bool = True,
                   now: float | None = None, deadline: Deadline | None = None
                   ) -> list[SignatureResult]:
    """Every DKIM-Signature, top first. `message` is the whole message, or only its header
    block when `body` streams the body (so a large body is never held whole in memory).
    `crlf`: the body's line ends are all CRLF already (a body from the MTA).

    Only the top `max_signatures` are verified (each costs a key lookup, a body hash and a
    public-key operation); the others get one `neutral` result together, which says how many."""
    if body is None:
        message, body = split_message(message)
    try:
        fields = parse_fields(message)
    except HeaderFormatError as exc:
        return [SignatureResult(Result.PERMERROR, f"unparseable message: {exc}")]
    hashes = _BodyHashes(body, crlf)
    headers = [(name, value) for name, value in fields if name.lower() == b"dkim-signature"]
    present = {name.lower() for name, _ in fields}
    results = [_verify_one(fields, present, header, hashes, dns, accept_body_length,
                           time.time() if now is None else now, deadline)
               for header in headers[:max_signatures]]
    skipped = len(headers) - max_signatures
    if skipped > 0:
        results.append(SignatureResult(
            Result.NEUTRAL, f"{skipped} not evaluated: more than {max_signatures} signatures "
                            "(limits.dkim_signatures)"))
    return results


def _verify_one(fields: list[tuple[bytes, bytes]], present: set[bytes],
                header: tuple[bytes, bytes], hashes: _BodyHashes,
                dns: DNSClient, accept_body_length: bool, now: float, deadline: Deadline | None
                ) -> SignatureResult:
    try:
        sig = dkim.util.parse_tag_value(header[1])
    except dkim.util.InvalidTagValueList as exc:
        return SignatureResult(Result.NEUTRAL, f"malformed tag list: {exc}")
    info = {
        "domain": _text(sig.get(b"d", b"")).lower(),
        "selector": _text(sig.get(b"s", b"")),
        "algorithm": _text(sig.get(b"a", b"")).lower(),
        "b": _text(re.sub(rb"\s+", b"", sig.get(b"b", b""))[:8]),
        "identity": _text(sig.get(b"i", b"")),
    }
    if sig.get(b"l", b"").isdigit():
        info["body_length"] = int(sig[b"l"])  # type: ignore[assignment]

    def result(word: Result, reason: str, **more: object) -> SignatureResult:
        return SignatureResult(word, reason, **{**info, **more})  # type: ignore[arg-type]

    # x= and t= are judged below against our clock; dkimpy's own check uses the wall clock
    # with a 10-hour allowance, which would turn an expired signature into a syntax error.
    untimed = {k: v for k, v in sig.items() if k not in (b"x", b"t")}
    try:
        dkim.validate_signature_fields(untimed, list(MANDATORY))
    except dkim.ValidationError as exc:
        return result(Result.NEUTRAL, f"invalid signature: {exc}")
    for tag in (b"x", b"t"):
        if tag in sig and not sig[tag].strip().isdigit():
            return result(Result.NEUTRAL, f"{tag.decode()}= is not a number")
    if sig[b"v"] != b"1":
        return result(Result.NEUTRAL, f"unknown version v={_text(sig[b'v'])}")
    if b"x" in sig and sig[b"x"].isdigit():
        expires = int(sig[b"x"])
        if b"t" in sig and sig[b"t"].isdigit() and expires < int(sig[b"t"]):
            return result(Result.NEUTRAL, "x= is earlier than t= (RFC 6376 §3.5)")
        if expires < now:
            return result(Result.FAIL, f"signature expired at {expires} (x=)")
    if b"t" in sig and sig[b"t"].isdigit() and int(sig[b"t"]) > now + 300:
        return result(Result.FAIL, f"signature dated in the future (t={int(sig[b't'])})")
    include = [h.lower() for h in re.split(rb"\s*:\s*", sig[b"h"].strip())]
    if b"from" not in include:
        return result(Result.NEUTRAL, "h= does not include From (RFC 6376 §6.1.1)")
    if sig[b"a"].lower() == b"rsa-sha1":
        return result(Result.POLICY, "rsa-sha1 is not accepted (RFC 8301 §3.1)")
    if b"l" in sig and not accept_body_length:
        return result(Result.POLICY, "l= (body length) signatures are not accepted here")

    name = f"{info['selector']}._domainkey.{info['domain']}"
    answer = dns.txt(name, deadline)
    if answer.status is Status.TEMPERROR:
        return result(Result.TEMPERROR, f"key lookup {name}: {answer.error}")
    if not answer.ok or not answer.records:
        return result(Result.PERMERROR, f"no key at {name} ({answer.status})")
    record = answer.records[0].encode("latin-1")
    try:
        key_tags = _key_tags(record)
    except dkim.util.InvalidTagValueList as exc:
        return result(Result.PERMERROR, f"malformed key record at {name}: {exc}")
    if not key_tags.get(b"p", b"").strip():
        return result(Result.PERMERROR, f"key revoked (empty p=) at {name}")
    problem = _key_constraints(sig, key_tags)
    if problem:
        return result(Result.PERMERROR, problem)
    try:
        key = public_key(record)
    except (dkim.util.InvalidTagValueList, ValueError) as exc:
        return result(Result.PERMERROR, f"unusable key at {name}: {exc}")
    bits = key.bits
    if key.kind == b"rsa" and bits < 1024:
        return result(Result.POLICY, f"RSA key of {bits} bits (RFC 8301 §3.2 requires 1024+)",
                      key_bits=bits)
    canon = sig.get(b"c", b"simple/simple").decode("ascii", "replace").lower()
    body_canon = canon.partition("/")[2] or "simple"
    if body_canon not in ("simple", "relaxed") or \
            canon.partition("/")[0] not in ("simple", "relaxed"):
        return result(Result.NEUTRAL, f"unknown canonicalization c={canon}")
    limit = int(sig[b"l"]) if b"l" in sig else None
    digest = hashes.get(body_canon, "sha256" if algorithm_hash(sig) == b"sha256" else "sha1",
                        limit)
    try:
        expected = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]), validate=True)
    except ValueError:
        return result(Result.NEUTRAL, "bh= is not base64")
    if digest != expected:
        return result(Result.FAIL, "body hash mismatch", key_bits=bits, authentic=answer.authentic)
    try:
        signature = base64.b64decode(re.sub(rb"\s+", b"", sig[b"b"]), validate=True)
    except ValueError:
        return result(Result.NEUTRAL, "b= is not base64")
    # A name of h= that no field has contributes nothing (RFC 6376 §5.4.2): dropped first, so
    # that a long h= of absent names costs no scan of the header per name.
    include = [name for name in include if name in present]
    data = signed_data(fields, include, header, relaxed=canon.partition("/")[0] == "relaxed")
    if not key.verifies(signature, data, algorithm_hash(sig)):
        return result(Result.FAIL, "signature does not verify", key_bits=bits,
                      authentic=answer.authentic)
    return result(Result.PASS, "signature verified", key_bits=bits, authentic=answer.authentic)


def algorithm_hash(sig: dict[bytes, bytes]) -> bytes:
    return sig[b"a"].lower().partition(b"-")[2]


def _key_constraints(sig: dict[bytes, bytes], key: dict[bytes, bytes]) -> str:
    """RFC 6376 §3.6.1: a key's h=, k= and t=s restrict the signatures it can verify."""
    algorithm = sig[b"a"].lower()
    kind, _, digest = algorithm.partition(b"-")
    if key.get(b"k", b"rsa").lower() != kind:
        return f"key type k={key.get(b'k', b'rsa').decode('ascii', 'replace')} does not " \
               f"match a={algorithm.decode('ascii', 'replace')}"
    if b"h" in key:
        allowed = [h.strip().lower() for h in key[b"h"].split(b":")]
        if digest not in allowed:
            return f"key allows h={key[b'h'].decode('ascii', 'replace')} only"
    services = [s.strip().lower() for s in key.get(b"s", b"*").split(b":")]
    if b"*" not in services and b"email" not in services:
        return f"key is for service s={key[b's'].decode('ascii', 'replace')}, not email"
    flags = [f.strip() for f in key.get(b"t", b"").split(b":")]
    if b"s" in flags and b"i" in sig:
        identity_domain = sig[b"i"].rpartition(b"@")[2].lower()
        if identity_domain != sig[b"d"].lower():
            return "key has t=s: i= must be in exactly d=, not a subdomain"
    return ""
