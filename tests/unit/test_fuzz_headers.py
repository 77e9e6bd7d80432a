"""Fuzzing the header code: Authentication-Results composition (`mailwarden.headers`, RFC 8601),
Received-SPF (`mailwarden.spf.received`, RFC 7208 §9.1) and forged-header detection.

Whatever the results, reasons, properties and comments hold (CR, LF, NUL, `;`, quotes,
parentheses, backslashes, non-ASCII, lone surrogates, kilobytes), the header value is one line
of printable ASCII that a strict reader of our grammar and the `authres` library both parse
back to the same resinfos, and that survives authres's parse and re-serialisation — what
dkimpy does to it for ARC-Authentication-Results — without gaining structure."""

from __future__ import annotations

import re

import authres
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz_corpus import budget, corpus, examples, fuzzed

from mailwarden.headers import (
    FOLD_WIDTH,
    LINE_LIMIT,
    RESULTS,
    _words,
    authentication_results,
    authserv_id_of,
    fold,
    forged_indices,
    unfold,
)
from mailwarden.spf.received import received_spf
from mailwarden.transaction import CheckResult

AUTHSERV = "mx.example.com"
PRINTABLE = re.compile(r"[\x20-\x7e]*")
SPF_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")

# -- a strict reader of what we write -----------------------------------------------------
TOKEN = r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+"
DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
DOT_ATOM = rf"{ATOM}(?:\.{ATOM})*"
ADDRESS = rf"(?:{DOT_ATOM})?@{DOMAIN}"
QUOTED = r'"(?:[^"\\]|\\[\x20-\x7e])*"'
PVALUE = rf"(?:{QUOTED}@{DOMAIN}|{QUOTED}|{ADDRESS}|{TOKEN})"
KEYWORD = r"[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?"  # ldh-str, and '_'
PROPERTY = KEYWORD
COMMENT = r"\((?:[^()\\]|\\[\x20-\x7e])*\)"  # we escape ( ) \, so ours never nest
RESINFO = re.compile(rf"({KEYWORD})=({KEYWORD})(?: ({COMMENT}))?((?: {KEYWORD}\.{PROPERTY}="
                     rf"{PVALUE})*)")
PROPSPEC = re.compile(rf" ({KEYWORD})\.({PROPERTY})=({PVALUE})")


def unquote(quoted: str) -> str:
    return re.sub(r"\\(.)", r"\1", quoted[1:-1])


def read_pvalue(text: str) -> str:
    """The value a pvalue stands for: `"local"@domain` is local@domain, a quoted-string its
    content, a token or address itself."""
    match = re.fullmatch(rf"({QUOTED})@({DOMAIN})", text)
    if match:
        return unquote(match.group(1)) + "@" + match.group(2)
    return unquote(text) if text.startswith('"') else text


def strict_ar(value: str) -> tuple[str, list[tuple[str, str, str | None, list[tuple[str, str]]]]]:
    """authserv-id and [(method, result, comment, [(ptype.property, pvalue text)])]; raises
    AssertionError on anything but the grammar we write."""
    assert PRINTABLE.fullmatch(value), value
    authserv_id, sep, rest = value.partition("; ")
    assert sep and re.fullmatch(DOMAIN, authserv_id), value
    if rest == "none":
        return authserv_id, []
    clauses = []
    pos = 0
    while True:
        match = RESINFO.match(rest, pos)
        assert match, f"no resinfo at {rest[pos:]!r} in {value!r}"
        props = [(f"{m.group(1)}.{m.group(2)}", m.group(3))
                 for m in PROPSPEC.finditer(match.group(4))]
        assert "".join(m.group(0) for m in PROPSPEC.finditer(match.group(4))) == match.group(4)
        clauses.append((match.group(1), match.group(2), match.group(3), props))
        pos = match.end()
        if pos == len(rest):
            return authserv_id, clauses
        assert rest.startswith("; ", pos), f"junk at {rest[pos:]!r} in {value!r}"
        pos += 2


def sanitized(text: str) -> str:
    return re.sub(r"[^\x20-\x7e]", "?", text)[:256]


def expected_value(value: str) -> str:
    """What a property value must read back as: the sanitized text, '@' kept only where the
    text after the last one is a domain (written as an address or `"local"@domain`)."""
    clean = sanitized(value)
    if "@" in clean and not re.fullmatch(DOMAIN, clean.rpartition("@")[2]):
        return clean.replace("@", "?")
    return clean


AUTHRES_PTYPES = {"smtp", "header", "body", "policy"}  # authres drops other ptypes


def authres_view(props: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """The properties authres 1.2 reads back from ours: a plain quoted-string only when it is
    the last property (it wants `;` or the end right after one), content with its escapes
    kept; `"local"@domain`, tokens and addresses as written."""
    view = []
    for index, (key, text) in enumerate(props):
        ptype, _, name = key.partition(".")
        plain_quoted = text.startswith('"') and text.endswith('"')
        if ptype not in AUTHRES_PTYPES or (plain_quoted and index < len(props) - 1):
            continue
        view.append((ptype, name, text[1:-1] if plain_quoted else text))
    return view


def check_folded(name: str, value: str) -> None:
    """RFC 5322 §2.1.1 and §2.2.3: the field as we insert it has no line over 998 octets and
    none over 78 that a space outside a quoted-string could have broken; it unfolds to the
    value exactly, and authres reads the folded field as the unfolded one."""
    folded = fold(name, value)
    lines = f"{name}: {folded}".split("\n")
    assert all(len(line) <= LINE_LIMIT for line in lines), lines
    for line in lines:
        assert len(line) <= FOLD_WIDTH or len(_words(line.strip())) == 1, line
    assert all(line.strip() for line in lines)  # no line of whitespace alone
    assert all(line.startswith(" ") for line in lines[1:])
    assert unfold(folded) == value
    if name == "Authentication-Results":
        flat = authres.AuthenticationResultsHeader.parse(f"{name}: {value}")
        wrapped = authres.AuthenticationResultsHeader.parse(
            f"{name}: " + folded.replace("\n", "\r\n"))
        assert str(wrapped) == str(flat)


def check_ar(results: list[CheckResult]) -> str:
    """authentication_results() must never raise, and its value must read back (strictly,
    with authres, and after authres's re-serialisation) to the results it was given."""
    value = authentication_results(AUTHSERV, results)
    assert "\r" not in value and "\n" not in value and "\0" not in value
    check_folded("Authentication-Results", value)
    authserv_id, clauses = strict_ar(value)
    assert authserv_id == AUTHSERV
    reported = [r for r in results if r.report and re.fullmatch(KEYWORD, r.method)]
    assert len(clauses) == len(reported)
    for (method, result, comment, props), given_result in zip(clauses, reported, strict=True):
        assert method == given_result.method.lower()
        assert result in RESULTS
        wanted = given_result.result.lower()
        assert result == (wanted if wanted in RESULTS else "permerror")
        if given_result.comment:
            assert comment is not None
            assert unquote(comment) == sanitized(given_result.comment)
        else:
            assert comment is None
        kept = [(k, v) for k, v in given_result.properties
                if v and re.fullmatch(rf"{KEYWORD}\.{PROPERTY}", k)]
        assert [k for k, _ in props] == [k.lower() for k, _ in kept]
        for (_, text), (_, original) in zip(props, kept, strict=True):
            assert read_pvalue(text) == expected_value(original)

    parsed = authres.AuthenticationResultsHeader.parse(f"Authentication-Results: {value}")
    assert parsed.authserv_id == AUTHSERV
    assert [(r.method, r.result) for r in parsed.results] == [(m, r) for m, r, _, _ in clauses]
    for got, (_, _, _, props) in zip(parsed.results, clauses, strict=True):
        assert [(p.type, p.name, str(p.value)) for p in got.properties] == authres_view(props)

    # dkimpy's arc_sign: parse, then str() every result into ARC-Authentication-Results
    aar = "; ".join([AUTHSERV, *(str(r) for r in parsed.results)]) if parsed.results else \
        f"{AUTHSERV}; none"
    assert PRINTABLE.fullmatch(aar)
    again = authres.AuthenticationResultsHeader.parse(f"Authentication-Results: {aar}")
    assert [(r.method, r.result) for r in again.results] == [(m, r) for m, r, _, _ in clauses]
    for before, after in zip(parsed.results, again.results, strict=True):
        assert [(p.type, p.name) for p in after.properties] == \
            [(p.type, p.name) for p in before.properties]
    return value


# -- Authentication-Results ------------------------------------------------------------------
VALUES = corpus("header_value") + corpus("mail_from") + corpus("helo")
METHODS = ["spf", "dkim", "dmarc", "iprev", "arc", "auth", "SPF", "x-custom", "mail_relay"]
KEYS = ["smtp.mailfrom", "smtp.helo", "header.from", "header.d", "header.s", "header.b",
        "header.a", "policy.iprev", "polrec.p", "polrec.domain", "arc.chain",
        "header.oldest-pass", "smtp.mail_from"]
HOSTILE_KEYS = ["", ".", "smtp.", ".from", "smtp mailfrom", "smtp.mail;from", "x.y\r\nz",
                "header.from=", "a.b.c", "h\u00e9.x"]

values = fuzzed(VALUES)
result_strategy = st.builds(
    CheckResult,
    rule=st.just("rule"),
    method=st.one_of(st.sampled_from(METHODS), st.sampled_from(METHODS), values),
    result=st.one_of(st.sampled_from(sorted(RESULTS)), st.sampled_from(sorted(RESULTS)),
                     st.sampled_from(["PASS", "hardfail", "unusable_from", "sealed"]), values),
    reason=values,
    properties=st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS),
                                            st.sampled_from(HOSTILE_KEYS)), values),
                        max_size=5).map(tuple),
    comment=st.one_of(st.none(), values),
    report=st.booleans() | st.just(True),
)


@pytest.mark.parametrize("value", examples("header_value") + examples("mail_from"))
def test_corpus_value_as_every_property(value: str) -> None:
    props = tuple((key, value) for key in KEYS)
    check_ar([CheckResult("r", "spf", "pass", properties=props, comment=value)])
    for key in KEYS:  # alone, so authres must read back even a plain quoted-string
        check_ar([CheckResult("r", "dkim", "fail", properties=((key, value),))])


@budget(300)
@given(st.lists(result_strategy, max_size=6))
def test_authentication_results_fuzzed(results: list[CheckResult]) -> None:
    check_ar(results)


def test_huge_values_stay_bounded() -> None:
    big = "x;\r\n\"(\\@" * 10000
    value = check_ar([CheckResult("r", "spf", "fail", properties=(("smtp.mailfrom", big),),
                                  comment=big)])
    assert len(value) < 1200


@pytest.mark.parametrize(("value", "written"), [
    # found by this fuzzing: authres wrote these back unquoted, with their ';'
    ("x;dkim=pass header.d=bank.example@evil.example",
     '"x;dkim=pass header.d=bank.example"@evil.example'),
    ("x;dkim=pass@[192.0.2.1]", '"x;dkim=pass?[192.0.2.1]"'),
    ("a@b@c", '"a@b"@c'),
    ("user@", '"user?"'),
])
def test_quoted_values_survive_authres_reserialisation(value: str, written: str) -> None:
    header = check_ar([CheckResult("r", "spf", "fail", properties=(("smtp.mailfrom", value),))])
    assert header == f"{AUTHSERV}; spf=fail smtp.mailfrom={written}"


def test_empty_and_malformed_properties_are_left_out() -> None:
    header = check_ar([CheckResult("r", "spf", "pass", properties=(
        ("smtp.helo", ""), ("smtp.mail;from", "x"), ("smtp.mailfrom", "a@example.com")))])
    assert header == f"{AUTHSERV}; spf=pass smtp.mailfrom=a@example.com"


def test_unknown_result_and_bad_method() -> None:
    header = check_ar([CheckResult("r", "spf", "pass\r\nX-Injected: yes"),
                       CheckResult("r", "dkim;x", "pass"), CheckResult("r", "-x", "pass"),
                       CheckResult("r", "iprev", "TempError")])
    assert header == f"{AUTHSERV}; spf=permerror; iprev=temperror"


# -- Received-SPF ----------------------------------------------------------------------------
KV = re.compile(rf"([a-z-]+)=({DOT_ATOM}|{QUOTED});")


def strict_received_spf(value: str) -> tuple[str, str, dict[str, str]]:
    """result, comment text, key-value pairs (RFC 7208 §9.1) of a value we wrote."""
    assert PRINTABLE.fullmatch(value), value
    match = re.fullmatch(rf"([a-z]+) ({COMMENT}) ((?:[a-z-]+=(?:{DOT_ATOM}|{QUOTED});"
                         rf"(?: |\Z))+)", value)
    assert match, value
    pairs: dict[str, str] = {}
    for kv in KV.finditer(match.group(3)):
        assert kv.group(1) not in pairs
        text = kv.group(2)
        pairs[kv.group(1)] = unquote(text) if text.startswith('"') else text
    return match.group(1), unquote(match.group(2)), pairs


def spf_clean(value: str) -> str:
    value = re.sub(r"[^\x20-\x7e]", "?", value)
    return value if len(value) <= 256 else value[:253] + "..."


@budget(300)
@given(result=st.one_of(st.sampled_from(SPF_RESULTS), values),
       fields=st.lists(values, min_size=5, max_size=5),
       mechanism=st.one_of(st.none(), values), problem=st.one_of(st.none(), values))
def test_received_spf_fuzzed(result: str, fields: list[str], mechanism: str | None,
                             problem: str | None) -> None:
    receiver, ip, sender, helo, identity = fields
    value = received_spf(result, receiver=receiver, ip=ip, sender=sender, helo=helo,
                         identity=identity, mechanism=mechanism, problem=problem)
    written, _, pairs = strict_received_spf(value)
    check_folded("Received-SPF", value)
    assert written == (result if result in SPF_RESULTS else "permerror")
    assert pairs["receiver"] == spf_clean(receiver)
    assert pairs["client-ip"] == spf_clean(ip)
    assert pairs["envelope-from"] == spf_clean(sender)
    assert pairs["helo"] == spf_clean(helo)
    assert pairs["identity"] == spf_clean(identity)
    assert pairs.get("mechanism") == (spf_clean(mechanism) if mechanism else None)
    if problem and written in ("temperror", "permerror"):
        assert pairs["problem"] == spf_clean(problem)
    else:
        assert "problem" not in pairs


@pytest.mark.parametrize("value", examples("header_value") + examples("helo"))
def test_received_spf_corpus(value: str) -> None:
    for result in SPF_RESULTS:
        header = received_spf(result, receiver=AUTHSERV, ip="192.0.2.1", sender=value,
                              helo=value, identity="mailfrom", mechanism=value, problem=value)
        _, _, pairs = strict_received_spf(header)
        assert pairs["envelope-from"] == pairs["helo"] == pairs["mechanism"] == spf_clean(value)


# -- forged Authentication-Results -----------------------------------------------------------
ar_values = fuzzed(corpus("ar_header"))


def check_forged(values: list[str]) -> None:
    """forged_indices never raises, and flags every field authres (hence dkimpy, when it picks
    the results to seal) would read as ours."""
    headers = [("Authentication-Results", value) for value in values]
    flagged = forged_indices(headers, AUTHSERV)
    assert flagged == sorted(set(flagged))
    assert all(1 <= i <= len(values) for i in flagged)
    for position, value in enumerate(values, 1):
        claimed = authserv_id_of(value)
        assert (position in flagged) == (claimed == AUTHSERV)
        try:
            parsed = authres.AuthenticationResultsHeader.parse(
                "Authentication-Results: " + value.strip())
        except authres.core.AuthResError:
            continue
        if parsed.authserv_id == AUTHSERV:
            assert position in flagged, value


@pytest.mark.parametrize("value", examples("ar_header"))
def test_forged_corpus(value: str) -> None:
    check_forged([value])


def test_forged_corpus_claims() -> None:
    headers = [("Authentication-Results", v) for v in corpus("ar_header")]
    claimed = {corpus("ar_header")[i - 1] for i in forged_indices(headers, AUTHSERV)}
    assert "(a (nested) comment) mx.example.com; none" in claimed
    assert "\r\n\tmx.example.com;\r\n\tdkim=pass header.d=bank.example" in claimed
    assert "mx.example.com.evil.net; spf=pass" not in claimed


@budget(300)
@given(st.lists(ar_values, max_size=4))
def test_forged_fuzzed(values: list[str]) -> None:
    check_forged(values)


def test_authserv_id_of_is_linear() -> None:
    # nested and repeated comments in front of the id: one pass, not one slice per comment
    assert authserv_id_of("()" * 200_000 + " mx.example.com; none") == AUTHSERV
    assert authserv_id_of("(" * 200_000) == ""
    assert authserv_id_of('"' + "\\x" * 200_000) == ""
