"""Authentication-Results (RFC 8601), built with `authres`, and forged-header detection.

Values taken from the envelope are made into valid RFC 8601 `pvalue`s here (authres leaves any
value containing '@' unquoted), and comments are escaped, so no client can inject header syntax.
The value must also survive a parse and re-serialisation by authres unchanged in structure:
dkimpy does exactly that when it copies our results into ARC-Authentication-Results.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import authres
import authres.core

from mailwarden.transaction import CheckResult

AR = "Authentication-Results"
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+\Z")  # RFC 2045 token
_DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
_ADDRESS = re.compile(
    r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*)?@" + _DOMAIN
    + r"\Z")
_DOMAIN_NAME = re.compile(_DOMAIN + r"\Z")
_UNSAFE = re.compile(r"[^\x20-\x7e]")
# RFC 8601 §2.2 Keyword (ldh-str) for method, ptype and property names; '_' is let through
# too (authres reads it, and it is no header syntax).
_KEYWORD = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?\Z")
# RFC 8601 §2.7 and the method registries (RFC 7208 §2.6 for spf): the results we may write.
_QUOTED_ID = re.compile(r'"((?:[^"\\]|\\.)*)"')
_TOKEN_ID = re.compile(r"[^\s;()\"]+")
RESULTS = frozenset({"none", "pass", "fail", "softfail", "neutral", "temperror", "permerror",
                     "policy"})


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def pvalue(value: str) -> str:
    """RFC 8601 §2.2 pvalue: a token or `local-part@domain` as is, an address with any other
    local-part as `"local-part"@domain`, else a quoted-string.

    A quoted-string never contains '@': authres reads `"a;b@c"` back as `a;b@c` and writes
    that unquoted (anything with '@' it leaves as is), which is how dkimpy would carry a
    forged `;` into ARC-Authentication-Results. In `"local-part"@domain` the quotes survive
    that round trip, so an '@' is kept only there; elsewhere it becomes '?'."""
    value = _UNSAFE.sub("?", value)[:256]
    if _TOKEN.match(value) or _ADDRESS.match(value):
        return value
    local, at, domain = value.rpartition("@")
    if at and _DOMAIN_NAME.match(domain):
        return _quoted(local) + "@" + domain
    return _quoted(value.replace("@", "?"))


def comment(text: str) -> str:
    """Text made safe for the inside of an RFC 5322 comment."""
    return re.sub(r"([()\\])", r"\\\1", _UNSAFE.sub("?", text)[:256])


class _Value(authres.core.QuotableValue):  # type: ignore[misc]
    def quote_if_needed(self) -> str:
        return pvalue(str(self))


def authentication_results(authserv_id: str, results: Iterable[CheckResult]) -> str:
    """The header value: `authserv-id; method=result prop=value ...` or `authserv-id; none`."""
    clauses = []
    for result in results:
        if not result.report or not _KEYWORD.match(result.method):
            continue
        properties = []
        for key, value in result.properties:
            ptype, _, name = key.partition(".")
            if not (value and _KEYWORD.match(ptype) and _KEYWORD.match(name)):
                # Not RFC 8601 propspec syntax: left out rather than written raw. An empty
                # value is left out too: authres reads `p=""` followed by another property
                # as if that property were the value, and then fails on the rest.
                continue
            prop = authres.core.AuthenticationResultProperty(ptype, name, "x")
            prop.value = _Value(value)
            properties.append(prop)
        # A result outside the vocabulary (a check's bug) is written as permerror.
        verdict = result.result.lower() if result.result.lower() in RESULTS else "permerror"
        clause = authres.core.AuthenticationResult(
            result.method, result=verdict,
            result_comment=comment(result.comment) if result.comment else None,
            properties=properties,
        )
        clauses.append(clause)
    header = authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=clauses)
    return str(header.header_value())


FOLD_WIDTH = 78  # RFC 5322 §2.1.1: lines SHOULD be no longer than 78 characters
LINE_LIMIT = 998  # and MUST be no longer than 998


def fold(name: str, value: str, width: int = FOLD_WIDTH) -> str:
    """`value` of the field `name` folded (RFC 5322 §2.2.3): a line break goes before a
    space outside quoted-strings -- between resinfo units and properties of RFC 8601, between
    the tag=value pairs of Received-SPF and ARC fields, inside comments -- wherever the line
    would pass `width`. Breaks already in the value are taken out first. Only whitespace
    becomes folding whitespace, so relaxed canonicalization (RFC 6376 §3.4.2) reads the
    folded field exactly as the unfolded one. Lines are LF-separated, as the MTA takes them.
    A line longer than `width` remains only where a single word is (values are capped well
    below RFC 5322's 998)."""
    words = _words(unfold(value))
    lines: list[str] = []
    line = words[0] if words else ""
    used = len(name) + 2 + len(line)
    for word in words[1:]:
        if used + 1 + len(word) > width:
            lines.append(line)
            line, used = " " + word, 1 + len(word)
        else:
            line += " " + word
            used += 1 + len(word)
    lines.append(line)
    return "\n".join(lines)


def unfold(value: str) -> str:
    """RFC 5322 §2.2.3 unfolding: every line break followed by whitespace taken out."""
    return re.sub(r"\r?\n(?=[ \t])", "", value)


def _words(value: str) -> list[str]:
    """`value` cut at the spaces where a fold may go: outside quoted-strings, and followed
    by something other than whitespace (a folded line must not be all whitespace)."""
    words, start, quoted, depth, index = [], 0, False, 0, 0
    while index < len(value):
        char = value[index]
        if char == "\\":
            index += 2
            continue
        if char == '"' and depth == 0:
            quoted = not quoted
        elif not quoted and char == "(":
            depth += 1
        elif not quoted and char == ")" and depth:
            depth -= 1
        elif (char == " " and not quoted and index > start
              and index + 1 < len(value) and value[index + 1] not in " \t"):
            words.append(value[start:index])
            start = index + 1
        index += 1
    words.append(value[start:])
    return words


def authserv_id_of(value: str) -> str:
    """The authserv-id an Authentication-Results value claims (RFC 8601 §2.2): its first
    token or quoted-string after optional comments (RFC 5322 CFWS, with quoted-pairs).
    One pass over the value, whatever comments a forger nests in front of it."""
    index, end = 0, len(value)
    while True:
        while index < end and value[index].isspace():
            index += 1
        if index >= end or value[index] != "(":
            break
        depth = 0
        while index < end:
            char = value[index]
            if char == "\\":
                index += 2
                continue
            if char == "(":
                depth += 1
            elif char == ")":
                depth -= 1
                if depth == 0:
                    break
            index += 1
        index += 1
    if value.startswith('"', index):
        match = _QUOTED_ID.match(value, index)
        if match is None:
            return ""
        return re.sub(r"\\(.)", r"\1", match.group(1)).lower()
    match = _TOKEN_ID.match(value, index)
    return match.group(0).lower() if match else ""


def forged_indices(headers: Iterable[tuple[str, str]], authserv_id: str) -> list[int]:
    """1-based positions, among the Authentication-Results fields, of those that claim our
    authserv-id: RFC 8601 §5 says to delete them before adding ours."""
    ours = authserv_id.lower()
    found, position = [], 0
    for name, value in headers:
        if name.lower() == AR.lower():
            position += 1
            if authserv_id_of(value) == ours:
                found.append(position)
    return found
