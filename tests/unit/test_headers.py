"""Authentication-Results (RFC 8601) building and forged-header detection
(`mailwarden.headers`): no envelope value can inject header syntax."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailwarden.headers import (
    authentication_results,
    authserv_id_of,
    comment,
    forged_indices,
    pvalue,
)
from mailwarden.transaction import CheckResult

AR = "Authentication-Results"


def sanitized(text: str) -> str:
    """What an envelope value becomes: non-printable and non-ASCII characters as '?', at most
    256 characters."""
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)[:256]


DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\Z")


def as_pvalue(text: str) -> str:
    """What a property value reads back as: sanitized, '@' kept only where a domain follows
    the last one (authres would write any other quoted '@' value back unquoted)."""
    clean = sanitized(text)
    if "@" in clean and not DOMAIN.match(clean.rpartition("@")[2]):
        return clean.replace("@", "?")
    return clean


# -- a small RFC 8601 tokenizer ------------------------------------------------------------
class Malformed(Exception):
    pass


@dataclass
class Clause:
    method: str
    result: str
    comment: str | None = None
    properties: list[tuple[str, str]] = field(default_factory=list)


class Scanner:
    """Reads an Authentication-Results value as produced here: `authserv-id; method=result
    [(comment)] [ptype.name=pvalue]...; ...` or `authserv-id; none`."""

    VALUE_STOP = ' \t;()"'

    def __init__(self, text: str) -> None:
        if "\r" in text or "\n" in text:
            raise Malformed("CR or LF in the header")
        self.text, self.pos = text, 0

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise Malformed(f"expected {char!r} at {self.pos}: {self.text!r}")
        self.pos += 1

    def skip_ws(self) -> None:
        while self.peek() in (" ", "\t") and self.peek():
            self.pos += 1

    def atom(self, stop: str) -> str:
        start = self.pos
        while self.peek() and self.peek() not in stop:
            self.pos += 1
        if self.pos == start:
            raise Malformed(f"empty token at {start}: {self.text!r}")
        return self.text[start:self.pos]

    def quoted(self) -> str:
        self.expect('"')
        out: list[str] = []
        while True:
            char = self.peek()
            if not char:
                raise Malformed("unterminated quoted-string")
            self.pos += 1
            if char == '"':
                return "".join(out)
            if char == "\\":
                if not self.peek():
                    raise Malformed("dangling backslash")
                char = self.peek()
                self.pos += 1
            out.append(char)

    def comment(self) -> str:
        self.expect("(")
        out, depth = [], 1
        while True:
            char = self.peek()
            if not char:
                raise Malformed("unbalanced comment")
            self.pos += 1
            if char == "\\":
                if not self.peek():
                    raise Malformed("dangling backslash")
                out.append(self.peek())
                self.pos += 1
                continue
            if char == "(":
                depth += 1
            elif char == ")":
                depth -= 1
                if depth == 0:
                    return "".join(out)
            out.append(char)

    def value(self) -> str:
        if self.peek() != '"':
            return self.atom(self.VALUE_STOP)
        text = self.quoted()
        if self.peek() == "@":  # RFC 8601 pvalue: quoted local-part "@" domain-name
            self.pos += 1
            text += "@" + self.atom(self.VALUE_STOP)
        return text

    def parse(self) -> tuple[str, list[Clause]]:
        authserv_id = self.atom(" \t;()\"")
        self.skip_ws()
        self.expect(";")
        clauses: list[Clause] = []
        while True:
            self.skip_ws()
            method = self.atom(" \t;()\"=")
            if method == "none" and not clauses and not self.peek():
                return authserv_id, []
            self.expect("=")
            clause = Clause(method, self.atom(" \t;()\"="))
            self.skip_ws()
            if self.peek() == "(":
                clause.comment = self.comment()
                self.skip_ws()
            while self.peek() and self.peek() != ";":
                key = self.atom(" \t;()\"=")
                if not re.fullmatch(r"[a-z]+\.[a-z0-9_-]+", key):
                    raise Malformed(f"bad property {key!r}")
                self.expect("=")
                clause.properties.append((key, self.value()))
                self.skip_ws()
            clauses.append(clause)
            if not self.peek():
                return authserv_id, clauses
            self.expect(";")


def parse_ar(value: str) -> tuple[str, list[Clause]]:
    return Scanner(value).parse()


def test_scanner_rejects_broken_structure() -> None:
    for broken in ('mx; spf=pass smtp.mailfrom="open', "mx; spf=pass (open",
                   "mx; spf=pass\r\nX: y", "mx spf=pass", "mx; spf=pass smtp.mailfrom=a;b c"):
        with pytest.raises(Malformed):
            parse_ar(broken)


# -- pvalue --------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [
    "abc", "mail.example.net", "192.0.2.1", "a+b~c", "x_y-z",
    "user@example.com", "first.last+tag@sub.example.org", "@example.com",
    "o'brien@example.com", "a=b@example.com",
])
def test_pvalue_keeps_tokens_and_addresses_rfc8601_2_2(value: str) -> None:
    assert pvalue(value) == value


@pytest.mark.parametrize(("value", "expected"), [
    ("a b", '"a b"'),
    ("", '""'),
    ("a;b", '"a;b"'),
    ("(x)", '"(x)"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("back\\slash", '"back\\\\slash"'),
    ("2001:db8::1", '"2001:db8::1"'),
    ("a@b@c", '"a@b"@c'),
    ("user@exa_mple.com", '"user?exa_mple.com"'),
    ("user@", '"user?"'),
    ("@", '"?"'),
    ('"quoted"@example.com', '"\\"quoted\\""@example.com'),
    ("x;dkim=pass@evil.example", '"x;dkim=pass"@evil.example'),
    ("a=b", '"a=b"'),
])
def test_pvalue_quotes_everything_else_with_escapes(value: str, expected: str) -> None:
    assert pvalue(value) == expected


@pytest.mark.parametrize("value", ["x\r\ny", "a\nb@example.com", "h\u00e9llo", "nul\x00",
                                   "tab\there", "\u202eevil@example.com", "del\x7f"])
def test_pvalue_removes_cr_lf_and_non_ascii(value: str) -> None:
    out = pvalue(value)
    assert re.fullmatch(r"[\x20-\x7e]*", out)
    assert "\r" not in out and "\n" not in out


def test_pvalue_is_bounded() -> None:
    assert pvalue("a" * 1000) == "a" * 256
    assert len(pvalue(" " * 1000)) == 258


def test_pvalue_quoting_after_truncation_stays_balanced() -> None:
    out = pvalue("x" * 255 + "\\" + "tail")
    assert out.endswith('\\\\"')
    assert Scanner(out).quoted() == "x" * 255 + "\\"


# -- comment -------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ("plain text", "plain text"),
    ("a (nested) b", "a \\(nested\\) b"),
    ("close) only", "close\\) only"),
    ("back\\slash", "back\\\\slash"),
    ("cr\r\nlf", "cr??lf"),
    ("caf\u00e9", "caf?"),
    ('"quotes" stay', '"quotes" stay'),
])
def test_comment_escaping(text: str, expected: str) -> None:
    assert comment(text) == expected


def test_comment_round_trips_through_a_comment_reader() -> None:
    text = "))(( \\ (a) \\) x"
    assert Scanner("(" + comment(text) + ")").comment() == text


# -- authentication_results ----------------------------------------------------------------
def test_authentication_results_format() -> None:
    results = [
        CheckResult("r", "iprev", "pass", properties=(("policy.iprev", "192.0.2.1"),),
                    comment="mail.example.net"),
        CheckResult("r", "spf", "fail", properties=(("smtp.mailfrom", "a@example.org"),)),
        CheckResult("r", "mail_relay", "pass", properties=(("smtp.mailfrom", "x"),),
                    report=False),
    ]
    assert authentication_results("mx.example.com", results) == (
        "mx.example.com; iprev=pass (mail.example.net) policy.iprev=192.0.2.1; "
        "spf=fail smtp.mailfrom=a@example.org")


def test_authentication_results_without_results_is_none_rfc8601_2_2() -> None:
    assert authentication_results("mx.example.com", []) == "mx.example.com; none"
    unreported = [CheckResult("r", "rcpt_relay", "fail", report=False)]
    assert authentication_results("mx.example.com", unreported) == "mx.example.com; none"


def test_authentication_results_hostile_address_with_at_sign_is_quoted() -> None:
    # authres alone leaves any value containing '@' unquoted
    hostile = "x; dkim=pass header.d=bank.example (a@b"
    value = authentication_results("mx.example.com", [
        CheckResult("r", "spf", "pass", properties=(("smtp.mailfrom", hostile),))])
    _, clauses = parse_ar(value)
    assert len(clauses) == 1
    assert clauses[0].properties == [("smtp.mailfrom", hostile)]


METHODS = st.sampled_from(["spf", "iprev", "dkim", "mail_relay"])
RESULTS = st.sampled_from(["pass", "fail", "softfail", "temperror", "permerror", "none"])
KEYS = st.sampled_from(["smtp.mailfrom", "smtp.helo", "policy.iprev", "header.d", "smtp.rcptto"])
HOSTILE = st.text(alphabet=' ()\\";=@.ab\r\n\t\u00e9\x00', max_size=40)
EMAILS = st.emails().map(str)
VALUES = st.one_of(st.text(max_size=300), HOSTILE, EMAILS)
COMMENTS = st.one_of(st.none(), st.text(max_size=300), HOSTILE)
RESULT = st.builds(
    CheckResult,
    rule=st.just("rule"),
    method=METHODS,
    result=RESULTS,
    properties=st.lists(st.tuples(KEYS, VALUES), max_size=4).map(tuple),
    comment=COMMENTS,
    report=st.booleans(),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(RESULT, max_size=5))
def test_authentication_results_structure_survives_hostile_values(
        results: list[CheckResult]) -> None:
    value = authentication_results("mx.example.com", results)
    assert "\r" not in value and "\n" not in value
    assert re.fullmatch(r"[\x20-\x7e]+", value)
    authserv_id, clauses = parse_ar(value)
    assert authserv_id == "mx.example.com"
    reported = [r for r in results if r.report]
    assert len(clauses) == len(reported)
    for clause, result in zip(clauses, reported, strict=True):
        assert (clause.method, clause.result) == (result.method, result.result)
        expected_comment = sanitized(result.comment) if result.comment else None
        assert clause.comment == expected_comment
        assert clause.properties == [(key, as_pvalue(val)) for key, val in result.properties
                                     if val]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_pvalue_round_trips(value: str) -> None:
    out = pvalue(value)
    scanner = Scanner(out)
    assert scanner.value() == as_pvalue(value)
    assert scanner.pos == len(out)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_comment_round_trips(text: str) -> None:
    scanner = Scanner("(" + comment(text) + ")")
    assert scanner.comment() == sanitized(text)
    assert not scanner.peek()


# -- authserv_id_of ------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "expected"), [
    ("mx.example.com; spf=pass", "mx.example.com"),
    ("MX.Example.COM; none", "mx.example.com"),
    ("  mx.example.com ; none", "mx.example.com"),
    ("mx.example.com 1; none", "mx.example.com"),  # with a version
    ("mx.example.com(comment); none", "mx.example.com"),
    ("(a comment) mx.example.com; none", "mx.example.com"),
    ("(one) (two)mx.example.com; none", "mx.example.com"),
    ("(a (nested) comment) mx.example.com; none", "mx.example.com"),
    ('"mx.example.com"; none', "mx.example.com"),
    ('(c) "MX.example.com"; none', "mx.example.com"),
    ("\r\n\tmx.example.com;\r\n\tnone", "mx.example.com"),
    ("", ""),
    ("(only a comment)", ""),
    ("; none", ""),
])
def test_authserv_id_of_rfc8601_2_2(value: str, expected: str) -> None:
    assert authserv_id_of(value) == expected


def test_authserv_id_of_comment_with_escaped_paren() -> None:
    assert authserv_id_of("(x\\)) mx.example.com; spf=pass") == "mx.example.com"


def test_authserv_id_of_quoted_id_with_quoted_pair() -> None:
    assert authserv_id_of('"mx.example\\.com"; spf=pass') == "mx.example.com"


# -- forged_indices ------------------------------------------------------------------------
def test_forged_indices_counts_among_authentication_results_only_1_based() -> None:
    headers = [
        ("Received", "mx.example.com; whatever"),
        (AR, "other.example.net; spf=pass"),
        ("Subject", "mx.example.com"),
        (AR, "mx.example.com; spf=pass"),
        ("DKIM-Signature", "v=1"),
        ("authentication-RESULTS", "(forged) MX.EXAMPLE.COM; dkim=pass"),
        (AR, "mx.example.com.evil.net; spf=pass"),
        (AR, '"mx.example.com"; none'),
    ]
    assert forged_indices(headers, "mx.example.com") == [2, 3, 5]
    assert forged_indices(headers, "MX.example.com") == [2, 3, 5]


def test_forged_indices_none_found() -> None:
    assert forged_indices([], "mx.example.com") == []
    assert forged_indices([("Received", "x"), (AR, "other; none")], "mx.example.com") == []
