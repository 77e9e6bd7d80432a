"""DKIM signing (RFC 6376 §5) with every key of the author's domain: RSA and Ed25519 dual
signing (RFC 8463), oversigning so that signed header fields cannot be added after signing
(RFC 6376 §8.15)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import dkim

from mailwarden.dkim.keys import SigningKey

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


def header_list(present: Sequence[str], options: SignOptions) -> list[bytes]:
    """h= : each listed field as often as it is present, and an oversigned field once more
    (a signed absent instance makes any added one break the signature)."""
    counts: dict[str, int] = {}
    for name in present:
        counts[name.lower()] = counts.get(name.lower(), 0) + 1
    names: list[bytes] = []
    for name in options.headers:
        count = counts.get(name, 0) + (1 if name in options.oversign else 0)
        names.extend([name.encode()] * count)
    return names


def sign_message(message: bytes, keys: Sequence[SigningKey], options: SignOptions = SignOptions()
                 ) -> list[tuple[str, str]]:
    """DKIM-Signature fields (name, value without the CRLF) for `message`, one per key, in the
    order to insert them at the top. Raises dkim.DKIMException for an unsignable message."""
    signer = dkim.DKIM(message)
    present = [name.decode("ascii", "replace") for name, _ in signer.headers]
    include = header_list(present, options)
    canon = (options.canonicalization[0].encode(), options.canonicalization[1].encode())
    fields = []
    for key in keys:
        line = signer.sign(key.selector.encode(), key.domain.encode(), key.private,
                           signature_algorithm=key.algorithm.encode(), canonicalize=canon,
                           include_headers=include)
        name, _, value = line.decode("ascii").partition(":")
        fields.append((name, value.rstrip("\r\n").replace("\r\n", "\n")))
    return fields
