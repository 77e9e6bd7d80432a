"""The Received-SPF header field (RFC 7208 §9.1), escaped so that no envelope value can add
header syntax: every value is a dot-atom or a quoted-string, the comment escapes its specials,
and control characters (CR and LF included) and non-ASCII never reach the header."""

from __future__ import annotations

import re

_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")
_UNSAFE = re.compile(r"[^\x20-\x7e]")
MAX_VALUE = 256

_COMMENTS = {
    "pass": "domain of {sender} designates {ip} as permitted sender",
    "fail": "domain of {sender} does not designate {ip} as permitted sender",
    "softfail": "domain of transitioning {sender} does not designate {ip} as permitted sender",
    "neutral": "{ip} is neither permitted nor denied by domain of {sender}",
    "none": "domain of {sender} does not publish an SPF record",
    "temperror": "temporary error evaluating domain of {sender}",
    "permerror": "permanent error in the SPF record of domain of {sender}",
}


def _clean(value: str) -> str:
    value = _UNSAFE.sub("?", value)
    return value if len(value) <= MAX_VALUE else value[: MAX_VALUE - 3] + "..."


def quote_value(value: str) -> str:
    """RFC 5322 dot-atom when it already is one, else a quoted-string."""
    value = _clean(value)
    if _DOT_ATOM.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def comment_text(value: str) -> str:
    """Escape text for use inside an RFC 5322 comment."""
    value = _clean(value)
    return re.sub(r"([()\\])", r"\\\1", value)


def received_spf(
    result: str,
    *,
    receiver: str,
    ip: str,
    sender: str,
    helo: str,
    identity: str,
    mechanism: str | None,
    problem: str | None,
) -> str:
    """The header value (without the "Received-SPF:" name), on one line. A result outside
    the vocabulary of §2.6 (a caller's bug) is written as permerror."""
    if result not in _COMMENTS:
        result = "permerror"
    comment = _COMMENTS[result].format(sender=sender or "<>", ip=ip)
    pairs = [
        ("receiver", receiver),
        ("client-ip", ip),
        ("envelope-from", sender),
        ("helo", helo),
        ("identity", identity),
    ]
    if mechanism:
        pairs.append(("mechanism", mechanism))
    if problem and result in ("temperror", "permerror"):
        pairs.append(("problem", problem))
    body = " ".join(f"{key}={quote_value(value)};" for key, value in pairs)
    return f"{result} ({comment_text(receiver)}: {comment_text(comment)}) {body}"
