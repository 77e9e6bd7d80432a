"""DKIM signing (RFC 6376 §5) with every key of the author's domain: RSA and Ed25519 dual
signing (RFC 8463), oversigning so that signed header fields cannot be added after signing
(RFC 6376 §8.15)."""

from __future__ import annotations

import base64
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dkim
import dkim.crypto
import nacl.encoding
import nacl.signing

from mailwarden.dkim.canon import body_hash
from mailwarden.dkim.keys import SigningKey
from mailwarden.dkim.verify import BodySource, split_message

# RFC 6376 §5.4.1 recommends these; From is required.
DEFAULT_HEADERS = (
    "from", "reply-to", "subject", "date", "to", "cc", "resent-date", "resent-from",
    "resent-to", "resent-cc", "in-reply-to", "references", "list-id", "list-help",
    "list-unsubscribe", "list-subscribe", "list-post", "list-owner", "list-archive",
    "message-id", "mime-version", "content-type", "content-transfer-encoding",
    "content-id", "content-description",
)
DEFAULT_OVERSIGN = (
    "from", "subject", "date", "to", "cc", "reply-to", "message-id", "mime-version",
    "content-type", "content-transfer-encoding",
)


@dataclass(frozen=True, slots=True)
class SignOptions:
    headers: tuple[str, ...] = DEFAULT_HEADERS
    oversign: tuple[str, ...] = DEFAULT_OVERSIGN
    canonicalization: tuple[str, str] = ("relaxed", "relaxed")


# Fields an MTA adds after the milters when a message has none (RFC 6409 §8.2, §8.3: a
# submission server may add Date and Message-ID; Sendmail and Postfix do): oversigning their
# absence would break every signature on mail from cron jobs and applications.
ADDED_BY_MTA = frozenset({"date", "message-id"})


def header_list(present: Sequence[str], options: SignOptions) -> list[bytes]:
    """h= : each listed field as often as it is present, and an oversigned field once more
    (RFC 6376 §5.4.2: a signed absent instance makes any added one break the signature),
    except the absence of a field the MTA adds itself."""
    counts: dict[str, int] = {}
    for name in present:
        counts[name.lower()] = counts.get(name.lower(), 0) + 1
    names: list[bytes] = []
    for name in options.headers:
        count = counts.get(name, 0)
        if name in options.oversign and (count or name not in ADDED_BY_MTA):
            count += 1
        names.extend([name.encode()] * count)
    return names


@functools.lru_cache(maxsize=64)
def _private_key(algorithm: str, private: bytes) -> Any:
    """dkimpy's form of the key, parsed once (dkimpy would parse the PEM on every message)."""
    if algorithm == "ed25519-sha256":
        return nacl.signing.SigningKey(private, encoder=nacl.encoding.Base64Encoder)
    return dkim.crypto.parse_pem_private_key(private)


def sign_message(message: bytes, keys: Sequence[SigningKey], options: SignOptions = SignOptions(),
                 *, body: BodySource | None = None, crlf: bool = False,
                 now: float | None = None) -> list[tuple[str, str]]:
    """DKIM-Signature fields (name, value without the CRLF, folded with LF) for the message,
    one per key, in the order to insert them at the top. `message` is the whole message, or
    only its header block when `body` streams the body (`crlf`: with CRLF line ends only,
    as the MTA sends it). dkimpy hashes and signs the header
    fields; the body hash is ours, streamed (one per canonicalization, shared by every key).
    Raises dkim.DKIMException for an unsignable message."""
    if body is None:
        message, body = split_message(message)
    signer = dkim.DKIM(message)
    present = [name.decode("ascii", "replace") for name, _ in signer.headers]
    include = header_list(present, options)
    if b"from" not in include:
        raise dkim.ParameterError("the From header field must be signed (RFC 6376 §5.4)")
    header_canon, body_canon = options.canonicalization
    policy = dkim.CanonicalizationPolicy.from_c_value(
        f"{header_canon}/{body_canon}".encode())
    body_digest = base64.b64encode(body_hash(body(), body_canon, crlf=crlf))
    timestamp = str(int(time.time() if now is None else now)).encode()
    fields = []
    for key in keys:
        algorithm = key.algorithm.encode()
        signer.signature_algorithm = algorithm
        signer.hasher = dkim.HASH_ALGORITHMS[algorithm]
        tags = [
            (b"v", b"1"), (b"a", algorithm), (b"c", policy.to_c_value()),
            (b"d", key.domain.encode()), (b"i", b"@" + key.domain.encode()),
            (b"q", b"dns/txt"), (b"s", key.selector.encode()), (b"t", timestamp),
            (b"h", b" : ".join(include)), (b"bh", body_digest),
            (b"b", b"0" * 60),  # folds b= onto its own line, as dkimpy does
        ]
        value = signer.gen_header(tags, include, policy, b"DKIM-Signature",
                                  _private_key(key.algorithm, key.private))
        # The hashed field was "DKIM-Signature: v=1...": the value keeps that one space.
        fields.append(("DKIM-Signature",
                       " " + value.decode("ascii").rstrip("\r\n").replace("\r\n", "\n")))
    return fields
