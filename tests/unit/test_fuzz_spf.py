"""Fuzzing SPF (RFC 7208): the record parser (`mailwarden.spf.record`), the macro expander
(`mailwarden.spf.macro`) and the whole `spf` check over a fake DNS serving fuzzed records.

Any text gives a parsed record or a permerror cause, never an exception; any macro-string
with any sender, HELO, address and domain gives an expansion or an error, and the name it
becomes for a query is at most 253 characters (§7.3); the check always ends in a §2.6 result
and a Received-SPF header that reads back."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st
from test_fuzz_corpus import HOSTILE, budget, corpus, examples, fuzzed, mutated
from test_fuzz_headers import check_ar, strict_received_spf

from mailwarden.checks import CHECKS, Context
from mailwarden.checks.spf import SPFArgs
from mailwarden.config.build import parse
from mailwarden.policy.engine import Engine
from mailwarden.spf.macro import (
    Macro,
    MacroContext,
    MacroError,
    MacroString,
    expand,
    ip_macro_value,
    parse_macro_string,
    truncate_domain,
)
from mailwarden.spf.record import (
    CACHED_LENGTH,
    MECHANISMS,
    QUALIFIERS,
    Record,
    RecordError,
    _parse_cached,
    is_spf_record,
    parse_record,
)
from mailwarden.transaction import Transaction

from fakedns import FakeDNS

SPF_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
SUITE = Path(__file__).resolve().parents[1] / "data" / "spf-suite" / "rfc7208-tests.yml"


def suite_records() -> list[str]:
    """Every TXT record of the openspf RFC 7208 suite: 197 more tricky seeds."""
    found: set[str] = set()
    for scenario in yaml.safe_load_all(SUITE.read_text(encoding="utf-8")):
        for records in (scenario.get("zonedata") or {}).values():
            for record in records:
                if isinstance(record, dict) and isinstance(record.get("TXT"), str | list):
                    text = record["TXT"]
                    found.add(text if isinstance(text, str) else "".join(text))
    return sorted(found)


RECORD_SEEDS = corpus("spf_record") + suite_records()
MACRO_SEEDS = corpus("spf_macro")
SPF_FRAGMENTS = [*HOSTILE, "v=spf1", "all", "-all", "~all", "ip4:", "ip6:", "a", "a:", "mx",
                 "mx:", "ptr", "ptr:", "include:", "exists:", "redirect=", "exp=", "%{d}",
                 "%{i}", "%{ir}", "%{l1r-}", "%{p}", "%{S}", "%{L}", "%{h}", "%{d2}",
                 "%{c}", "/24", "//64", "192.0.2.1", "2001:db8::", "include:inc.fuzz.example",
                 "redirect=red.fuzz.example", "exp=exp.fuzz.example", "a:fuzz.example",
                 "exists:%{i}.fuzz.example", "mx:fuzz.example/24"]


def printable(text: str) -> bool:
    return all(ch.isprintable() for ch in text)


# -- the record parser -------------------------------------------------------------------
def check_record(text: str) -> Record | RecordError:
    parsed = parse_record(text)
    assert isinstance(parsed, Record | RecordError)
    assert parse_record(text) == parsed
    if isinstance(parsed, RecordError):
        # §4.6: a syntax error is a permerror with a cause, and the cause is one line
        assert parsed.cause
        assert printable(str(parsed)), str(parsed)
        assert parsed.term == "" or parsed.term in text.split(" ")
        return parsed
    assert is_spf_record(text) and text.isascii()
    terms = [t for t in text[6:].split(" ") if t]
    modifiers = (len(parsed.unknown_modifiers) + (parsed.redirect is not None)
                 + (parsed.exp is not None))
    assert len(parsed.directives) + modifiers == len(terms)
    for directive in parsed.directives:
        assert directive.text in terms
        assert directive.qualifier in QUALIFIERS
        assert directive.result in ("pass", "fail", "softfail", "neutral")
        assert directive.mechanism in MECHANISMS
        assert 0 <= directive.cidr4 <= 32 and 0 <= directive.cidr6 <= 128
        if directive.mechanism in ("ip4", "ip6"):
            assert directive.network is not None
            assert directive.network.version == (4 if directive.mechanism == "ip4" else 6)
        else:
            assert directive.network is None
        if directive.mechanism in ("include", "exists"):
            assert directive.domain_spec is not None
        if directive.mechanism == "all":
            assert directive.domain_spec is None
    for spec in (parsed.redirect, parsed.exp, *(d.domain_spec for d in parsed.directives)):
        if spec is not None:
            assert isinstance(spec, MacroString) and spec.text
    return parsed


@pytest.mark.parametrize("text", examples("spf_record"))
def test_parse_record_corpus(text: str) -> None:
    check_record(text)


def test_parse_record_suite_records() -> None:
    for text in suite_records():
        check_record(text)


@budget(600)
@given(fuzzed(RECORD_SEEDS, SPF_FRAGMENTS))
@example("v=spf1 a:%\n.example.com -all")
@example("v=spf1 " + "a:%{d}.example.com " * 3000)
def test_parse_record_fuzzed(text: str) -> None:
    check_record(text)


def test_huge_record_is_parsed_quickly_and_not_cached() -> None:
    text = "v=spf1 " + " ".join(f"ip4:192.0.2.{i % 256} a:%{{d}}.x{i}.example" for i in range(4000))
    assert len(text) > CACHED_LENGTH
    before = _parse_cached.cache_info().currsize
    started = time.process_time()
    parsed = check_record(text)
    assert isinstance(parsed, Record) and len(parsed.directives) == 8000
    assert time.process_time() - started < 2
    assert _parse_cached.cache_info().currsize == before


@pytest.mark.parametrize("text", [
    "v=spf1 a:%\n.example.com -all", "v=spf1 a:%\r.example.com -all", "v=spf1 a:%\0.x.example"])
def test_macro_error_cause_is_one_printable_line(text: str) -> None:
    # regression: the cause quoted '%' and the character after it raw
    parsed = parse_record(text)
    assert isinstance(parsed, RecordError)
    assert printable(str(parsed)) and "\\" in parsed.cause


# -- the macro expander --------------------------------------------------------------------
class Calls:
    def __init__(self, name: str) -> None:
        self.name, self.count = name, 0

    def __call__(self) -> str:
        self.count += 1
        return self.name


@st.composite
def contexts(draw: st.DrawFn) -> MacroContext:
    ip = draw(st.one_of(st.sampled_from([ipaddress.ip_address("192.0.2.1"),
                                         ipaddress.ip_address("2001:db8::cb01")]),
                        st.ip_addresses()))
    sender = draw(fuzzed(corpus("mail_from")))
    local, _, domain = sender.rpartition("@")
    return MacroContext(
        sender=sender, local_part=local or "postmaster", sender_domain=domain,
        domain=draw(st.one_of(st.just("example.com"), fuzzed(corpus("helo")))),
        ip_macro=ip_macro_value(ip.packed), ip_readable=str(ip),
        ip_version="in-addr" if ip.version == 4 else "ip6",
        helo=draw(fuzzed(corpus("helo"))), receiver=draw(fuzzed(["mx.example.com"])),
        timestamp=draw(st.integers(0, 2**40)),
        validated_name=Calls(draw(st.sampled_from(["mail.example.com", "unknown", "é.x"]))),
    )


def reference_truncate(name: str, limit: int = 253) -> str:
    """§7.3 as written: drop the left-most label until the name fits."""
    while len(name) > limit:
        dot = name.find(".")
        if dot < 0:
            return name[len(name) - limit :]
        name = name[dot + 1 :]
    return name


def check_macro(text: str, exp: bool, ctx: MacroContext) -> None:
    parsed = parse_macro_string(text, exp=exp)
    assert isinstance(parsed, MacroString | MacroError)
    if isinstance(parsed, MacroError):
        assert parsed.cause and printable(parsed.cause), parsed.cause
        return
    expanded = expand(parsed, ctx)
    macros = [t for t in parsed.tokens if isinstance(t, Macro)]
    calls = ctx.validated_name
    assert isinstance(calls, Calls)
    if not any(m.letter == "p" for m in macros):
        assert calls.count == 0  # %{p} costs DNS queries: only when used (§7.3)
    # each value at most triples per UTF-8 byte when URL-escaped (§7.3), four bytes a char
    bound = sum(len(t) for t in parsed.tokens if isinstance(t, str))
    bound += sum(12 * len(ctx.value(m.letter)) for m in macros)
    assert len(expanded) <= bound
    if text.isascii() and all(m.url_escape or ctx.value(m.letter).isascii() for m in macros):
        assert expanded.isascii()
    name = truncate_domain(expanded.rstrip("."))
    assert len(name) <= 253
    assert expanded.rstrip(".").endswith(name)
    if len(expanded) < 20_000:
        assert name == reference_truncate(expanded.rstrip("."))


@pytest.mark.parametrize("text", examples("spf_macro"))
def test_macro_corpus(text: str) -> None:
    senders = ["user@example.com", "\udcff\u00e9;\r\n@example.com", "a." * 200 + "@x.example",
               '"q;(\\"@example.com', "\udf00\udcff@\ud800.example"]
    for sender in senders:
        local, _, domain = sender.rpartition("@")
        for exp in (False, True):
            ctx = MacroContext(sender, local, domain, "example.com", "192.0.2.1",
                               "192.0.2.1", "in-addr", "helo\r\n.example", "mx.example.com", 0,
                               Calls("mail.example.com"))
            check_macro(text, exp, ctx)


@budget(500)
@given(fuzzed(MACRO_SEEDS, SPF_FRAGMENTS), st.booleans(), contexts())
def test_macro_fuzzed(text: str, exp: bool, ctx: MacroContext) -> None:
    check_macro(text, exp, ctx)


@pytest.mark.parametrize("letter", ["S", "L", "O"])
def test_url_escape_of_undecodable_sender_bytes(letter: str) -> None:
    # regression: a lone surrogate (a non-UTF-8 byte the milter kept) raised UnicodeEncodeError
    parsed = parse_macro_string(f"%{{{letter}}}")
    assert isinstance(parsed, MacroString)
    ctx = MacroContext("a\udcff@b\udcfe.example", "a\udcff", "b\udcfe.example", "d.example",
                       "1.2.0.192", "192.0.2.1", "in-addr", "h", "r", 0, Calls("p"))
    expected = {"S": "a%FF%40b%FE.example", "L": "a%FF", "O": "b%FE.example"}[letter]
    assert expand(parsed, ctx) == expected
    # found by atheris: a surrogate surrogateescape cannot encode (no MTA sends one)
    ctx.sender = ctx.local_part = ctx.sender_domain = "\udf00"
    assert expand(parsed, ctx) == "%ED%BC%80"


def test_truncate_domain_is_linear() -> None:
    started = time.process_time()
    assert truncate_domain("a." * 2_000_000 + "example.com") == "a." * 121 + "example.com"
    assert truncate_domain("x" * 1_000_000) == "x" * 253
    assert time.process_time() - started < 1


@budget(300)
@given(st.text(alphabet="ab.", max_size=80), st.integers(0, 40))
def test_truncate_domain_matches_the_rfc_wording(name: str, limit: int) -> None:
    assert truncate_domain(name, limit) == reference_truncate(name, limit)


# -- the whole spf check ---------------------------------------------------------------------
AUTHSERV = "mx.example.com"
CONFIG = parse(f"authserv_id: {AUTHSERV}\nrules:\n  mail:\n    - name: spf\n      check: spf\n")
CLIENTS = ["192.0.2.1", "198.51.100.7", "2001:db8::cb01", "::ffff:192.0.2.1"]
TARGETS = ["fuzz.example", "inc.fuzz.example", "red.fuzz.example", "mail.fuzz.example",
           "temp.fuzz.example", "nx.fuzz.example", "%{d}", "%{o}", "%{h}", "%{i}.fuzz.example",
           "%{ir}.%{v}.fuzz.example", "%{l1r-}.fuzz.example", "%{p}", "%{S}.fuzz.example",
           "%{d2}", "%{s}"]
term = st.builds(
    lambda qualifier, mechanism, target, cidr: (
        qualifier + mechanism + (":" + target if target and mechanism not in ("all",) else "")
        + (cidr if mechanism in ("a", "mx") else "")),
    st.sampled_from(["", "+", "-", "~", "?"]),
    st.sampled_from(["a", "mx", "ptr", "include", "exists", "all"]),
    st.one_of(st.none(), st.sampled_from(TARGETS)),
    st.sampled_from(["", "/24", "//64", "/0//0", "/32//128"]),
) | st.sampled_from(["ip4:192.0.2.0/24", "ip6:2001:db8::/32", "-ip4:192.0.2.1", "?ip6:::/0",
                     "redirect=red.fuzz.example", "exp=exp.fuzz.example", "redirect=%{d}",
                     "exp=%{ir}.exp.fuzz.example"])
# grammar-shaped records reach the evaluation; mutated and soup ones the error paths
grammar_records = st.lists(term, max_size=8).map(lambda terms: "v=spf1 " + " ".join(terms))
records = st.one_of(
    grammar_records, grammar_records, grammar_records,
    st.sampled_from(RECORD_SEEDS),
    mutated(RECORD_SEEDS, SPF_FRAGMENTS),
    fuzzed(RECORD_SEEDS, SPF_FRAGMENTS),
)
senders = st.one_of(
    st.sampled_from(["u@fuzz.example", "<u@fuzz.example>", "", "<>", "u@temp.fuzz.example"]),
    fuzzed(["user", "a.b-c+d", "\udcff", "x;y", '"q"']).map(lambda local: local + "@fuzz.example"),
    fuzzed(corpus("mail_from")),
)


def zone(main: str, include: str, redirect: str, explanation: str) -> dict[str, Any]:
    return {
        "fuzz.example": {"TXT": [main], "A": ["192.0.2.1"], "AAAA": ["2001:db8::cb01"],
                         "MX": [(10, "mail.fuzz.example")]},
        "mail.fuzz.example": {"A": ["192.0.2.1"], "AAAA": ["2001:db8::cb01"]},
        "inc.fuzz.example": {"TXT": [include]},
        "red.fuzz.example": {"TXT": [redirect]},
        "exp.fuzz.example": {"TXT": [explanation]},
        "1.2.0.192.in-addr.arpa": {"PTR": ["mail.fuzz.example"]},
        "helo.fuzz.example": {"TXT": [include]},
        "fuzz.example.fuzz.example": {"A": ["192.0.2.1"]},
        "1.2.0.192.fuzz.example": {"A": ["127.0.0.2"]},
        "temp.fuzz.example": "TEMPERROR",
    }


def check_spf(dns: FakeDNS, client: str, helo: str, mail_from: str) -> None:
    ctx: Context = Engine(CONFIG, dns).ctx
    txn = Transaction.for_client(client, "client.example.net", 40000)
    txn.helo = helo
    txn.new_message()
    txn.mail_from = mail_from
    outcome = CHECKS["spf"].run(ctx, txn, SPFArgs())
    assert outcome.decisive in SPF_RESULTS
    assert outcome.results
    for result in outcome.results:
        assert result.method == "spf" and result.result in SPF_RESULTS
        assert [k for k, _ in result.properties] in (["smtp.helo"], ["smtp.mailfrom"])
    assert outcome.results[-1].result == outcome.decisive
    [(name, value)] = outcome.headers
    assert name == "Received-SPF"
    written, _, pairs = strict_received_spf(value)
    assert written == outcome.decisive
    assert pairs["identity"] == "mailfrom"
    check_ar(list(outcome.results))


@budget(250)
@given(main=st.one_of(grammar_records, mutated(RECORD_SEEDS, SPF_FRAGMENTS)),
       include=records, redirect=records,
       explanation=fuzzed(MACRO_SEEDS, SPF_FRAGMENTS),
       client=st.sampled_from(CLIENTS),
       helo=st.one_of(st.sampled_from(["helo.fuzz.example", "fuzz.example"]),
                      fuzzed(corpus("helo"))),
       mail_from=senders)
def test_spf_check_fuzzed(main: str, include: str, redirect: str, explanation: str,
                          client: str, helo: str, mail_from: str) -> None:
    check_spf(FakeDNS(zone(main, include, redirect, explanation)), client, helo, mail_from)


@pytest.mark.parametrize("record", examples("spf_record"))
def test_spf_check_corpus_records(record: str) -> None:
    dns = FakeDNS(zone(record, record, "v=spf1 -all", "%{i} is not allowed: %{S}"))
    for client in CLIENTS[:3]:
        check_spf(dns, client, "helo.fuzz.example", "u\udcff;\r\n@fuzz.example")


@pytest.mark.parametrize("mail_from", examples("mail_from"))
def test_spf_check_corpus_senders(mail_from: str) -> None:
    dns = FakeDNS(zone("v=spf1 exists:%{L}.%{S}.fuzz.example include:inc.fuzz.example "
                       "-all exp=exp.fuzz.example", "v=spf1 ?all", "", "%{S} %{c} %{r}"))
    check_spf(dns, "192.0.2.1", "helo.fuzz.example", mail_from)
