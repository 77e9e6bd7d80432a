"""Authentication-Results (RFC 8601), built with `authres`, and forged-header detection.

Values taken from the envelope are made into valid RFC 8601 `pvalue`s here (authres leaves any
value containing '@' unquoted), and comments are escaped, so no client can inject header syntax.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import authres
import authres.core

from mailwarden.transaction import CheckResult

AR = "Authentication-Results"
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+\Z")  # RFC 2045 token
_ADDRESS = re.compile(
    r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*)?@"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\Z")
_UNSAFE = re.compile(r"[^\x20-\x7e]")


def pvalue(value: str) -> str:
    """RFC 8601 §2.2 pvalue: a token or `local-part@domain` as is, else a quoted-string."""
    value = _UNSAFE.sub("?", value)[:256]
    if _TOKEN.match(value) or _ADDRESS.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


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
        if not result.report:
            continue
        properties = []
        for key, value in result.properties:
            ptype, _, name = key.partition(".")
            prop = authres.core.AuthenticationResultProperty(ptype, name, "x")
            prop.value = _Value(value)
            properties.append(prop)
        clause = authres.core.AuthenticationResult(
            result.method, result=result.result,
            result_comment=comment(result.comment) if result.comment else None,
            properties=properties,
        )
        clauses.append(clause)
    header = authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=clauses)
    return str(header.header_value())


def authserv_id_of(value: str) -> str:
    """The authserv-id an Authentication-Results value claims (RFC 8601 §2.2): its first
    token or quoted-string after optional comments (RFC 5322 CFWS, with quoted-pairs)."""
    text = value.lstrip()
    while text.startswith("("):
        depth, index = 0, 0
        while index < len(text):
            char = text[index]
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
        text = text[index + 1 :].lstrip()
    if text.startswith('"'):
        match = re.match(r'"((?:[^"\\]|\\.)*)"', text)
        if match is None:
            return ""
        return re.sub(r"\\(.)", r"\1", match.group(1)).lower()
    match = re.match(r"[^\s;()\"]+", text)
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
