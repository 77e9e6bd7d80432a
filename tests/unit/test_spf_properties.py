"""Property tests: the SPF code never raises and keeps its RFC 7208 §4.6.4 bounds on any input."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_spf_check import parse_received_spf

from mailwarden.spf import Limits, Result, SPFResult, check_host
from mailwarden.spf.macro import (
    Macro,
    MacroContext,
    MacroError,
    MacroString,
    expand,
    parse_macro_string,
    truncate_domain,
)
from mailwarden.spf.received import received_spf
from mailwarden.spf.record import Record, RecordError, parse_record

from fakedns import FakeDNS

PROPERTY = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# -- (a) parse_record ------------------------------------------------------------------------

FRAGMENTS = [
    "v=spf1", " ", "  ", "all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists",
    "redirect", "exp", "=", ":", "/", "//", "%{", "}", "%%", "%_", "%-", "%", "d", "i", "l", "r",
    "c", "t", "D", "1", "0", "24", "32", "128", "33", ".", "..", "-", "+", "~", "?", "_",
    "example.com", "com", "192.0.2.1", "2001:db8::", "::", "\t", "\x00", "é", "\u2028", "\"",
    "(", ")", ";", "\r\n", "v=spf10", "unknown-mod",
]
# grammar-shaped macro-expands (§7.1), valid and not: letter, digits, "r", delimiters
macro_expand = st.builds(
    lambda letter, digits, reverse, delims: "%{" + letter + digits + reverse + delims + "}",
    st.sampled_from("slodiphcrtvSLODIPHCRTVxz"),
    st.text("0123456789", max_size=3),
    st.sampled_from(["", "r", "R"]),
    st.text(".-+,/_=!", max_size=2),
)
spf_ish = st.lists(st.one_of(st.sampled_from(FRAGMENTS), macro_expand), max_size=40).map("".join)
record_text = st.one_of(
    st.text(),
    st.text().map(lambda t: "v=spf1 " + t),
    spf_ish,
    spf_ish.map(lambda t: "v=spf1 " + t),
    st.lists(spf_ish, max_size=8).map(lambda ts: "v=spf1 " + " ".join(ts)),
)


@PROPERTY
@given(record_text)
def test_parse_record_never_raises(text: str) -> None:
    parsed = parse_record(text)
    assert isinstance(parsed, Record | RecordError)
    if isinstance(parsed, Record):
        assert parsed.text == text
        assert text[:6].lower() == "v=spf1"
        assert text.isascii()
        terms = text[6:].split(" ")
        for directive in parsed.directives:
            assert directive.text in terms
            assert directive.result in ("pass", "fail", "softfail", "neutral")
            assert 0 <= directive.cidr4 <= 32
            assert 0 <= directive.cidr6 <= 128
    else:
        assert parsed.cause
        assert parsed.term == "" or parsed.term in text.split(" ")
        assert isinstance(str(parsed), str)


# -- (b) macros ------------------------------------------------------------------------------

MACRO_FRAGMENTS = ["%{", "}", "%%", "%_", "%-", "%", "s", "l", "o", "d", "i", "p", "h", "c",
                   "r", "t", "v", "S", "L", "I", "R", "x", "1", "2", "9", "0", "r", ".", "-",
                   "+", ",", "/", "_", "=", " ", "é", "\n", "example.com"]
macro_text = st.one_of(
    st.text(),
    st.lists(st.one_of(st.sampled_from(MACRO_FRAGMENTS), macro_expand), max_size=30)
    .map("".join),
)


@st.composite
def contexts(draw: st.DrawFn) -> MacroContext:
    ip = draw(st.ip_addresses())
    packed = ip.packed
    validated = draw(st.text())
    return MacroContext(
        sender=draw(st.text()),
        local_part=draw(st.text()),
        sender_domain=draw(st.text()),
        domain=draw(st.text()),
        ip_macro=".".join(str(b) for b in packed) if ip.version == 4 else ".".join(packed.hex()),
        ip_readable=str(ip),
        ip_version="in-addr" if ip.version == 4 else "ip6",
        helo=draw(st.text()),
        receiver=draw(st.text()),
        timestamp=draw(st.integers(min_value=0, max_value=2**40)),
        validated_name=lambda: validated,
    )


@PROPERTY
@given(macro_text, st.booleans(), contexts())
def test_parse_and_expand_never_raise(text: str, exp: bool, ctx: MacroContext) -> None:
    parsed = parse_macro_string(text, exp=exp)
    assert isinstance(parsed, MacroString | MacroError)
    if isinstance(parsed, MacroError):
        assert parsed.cause
        return
    out = expand(parsed, ctx)
    assert isinstance(out, str)
    if "%" not in text:
        assert out == text
    macros = [tok for tok in parsed.tokens if isinstance(tok, Macro)]
    if parsed.ends_with_macro:
        # the last thing parsed was a macro-expand: "%{...}", "%%", "%_" or "%-"
        assert text.endswith(("}", "%%", "%_", "%-"))
    elif text:
        assert not text.endswith(("%_", "%-")) or text.endswith(("%%_", "%%-"))
    if not exp:
        # §7.2: c, r and t only in exp text
        assert all(m.letter not in "crt" for m in macros)
    for m in macros:
        assert m.digits is None or m.digits > 0
        assert m.delimiters and set(m.delimiters) <= set(".-+,/_=")


@PROPERTY
@given(st.text(alphabet="!#$&'*+,./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ^_`abcdefghijklmn"
                         "opqrstuvwxyz|~-", max_size=60))
def test_text_without_percent_is_its_own_expansion(text: str) -> None:
    parsed = parse_macro_string(text)
    assert isinstance(parsed, MacroString)
    assert parsed.literal
    ctx = MacroContext("s", "l", "o", "d", "i", "c", "in-addr", "h", "r", 0, lambda: "p")
    assert expand(parsed, ctx) == text


@PROPERTY
@given(st.text(alphabet="ab.", max_size=600), st.integers(min_value=1, max_value=300))
def test_truncate_domain_fits_and_keeps_the_right_side(name: str, limit: int) -> None:
    got = truncate_domain(name, limit)
    assert len(got) <= limit
    assert name.endswith(got)
    if len(name) <= limit:
        assert got == name
    elif "." in name[len(name) - len(got) - 1 :]:
        # whole labels were removed, so the kept part starts right after a dot ...
        assert name[len(name) - len(got) - 1] == "."


# -- (c) check_host on generated zones ----------------------------------------------------------

CLIENTS = ["192.0.2.1", "2001:db8::1", "::ffff:192.0.2.1", "198.51.100.7"]
NAMES = ["example.com", "a.example.com", "b.example.net", "c.example.org", "loop.example.com",
         "inc.example.net", "explain.example.com", "mx1.example.com", "mx2.example.com"]
REVERSE = [ipaddress.ip_address(ip).reverse_pointer for ip in CLIENTS[:2] + CLIENTS[3:]]
TARGETS = [*NAMES, "nx.example.com", "%{d}", "%{o}", "x.%{d}", "%{l}.example.com",
           "%{ir}.%{v}.example.com", "%{p}.example.com", "%{d2}", "%{h}", "%{s}.example.com",
           "%{l}" + ".x" * 130 + ".example.com"]
qualifier = st.sampled_from(["", "+", "-", "~", "?"])
target = st.one_of(st.sampled_from(TARGETS), st.sampled_from(TARGETS),
                   macro_expand.map(lambda m: m + ".example.com"))
cidr = st.sampled_from(["", "/24", "//64", "/0", "/32//128", "/16//48"])
good_term = st.one_of(
    st.builds(lambda q: f"{q}all", qualifier),
    st.builds(lambda q, t: f"{q}include:{t}", qualifier, target),
    st.builds(lambda q, c: f"{q}a{c}", qualifier, cidr),
    st.builds(lambda q, t, c: f"{q}a:{t}{c}", qualifier, target, cidr),
    st.builds(lambda q, c: f"{q}mx{c}", qualifier, cidr),
    st.builds(lambda q, t, c: f"{q}mx:{t}{c}", qualifier, target, cidr),
    st.builds(lambda q: f"{q}ptr", qualifier),
    st.builds(lambda q, t: f"{q}ptr:{t}", qualifier, target),
    st.builds(lambda q, t: f"{q}exists:{t}", qualifier, target),
    st.builds(lambda q, ip, n: f"{q}ip4:{ip}/{n}", qualifier, st.ip_addresses(v=4),
              st.integers(0, 32)),
    st.builds(lambda q, ip, n: f"{q}ip6:{ip}/{n}", qualifier, st.ip_addresses(v=6),
              st.integers(0, 128)),
    st.builds(lambda q, ip: f"{q}ip4:{ip}", qualifier, st.sampled_from(["192.0.2.1",
                                                                         "198.51.100.7"])),
)
junk_term = st.one_of(st.text(max_size=12), spf_ish)
# mostly well-formed records (so evaluation goes deep), now and then one with a junk term
spf_record = st.builds(
    lambda terms, redirect, exp: "v=spf1 " + " ".join(terms + redirect + exp),
    st.one_of(st.lists(good_term, max_size=14), st.lists(good_term, max_size=14),
              st.lists(good_term, max_size=14),
              st.lists(st.one_of(good_term, junk_term), max_size=10)),
    st.lists(target.map(lambda t: f"redirect={t}"), max_size=1),
    st.lists(target.map(lambda t: f"exp={t}"), max_size=1),
)
HUGE = ("v=spf1 " + " ".join(f"ip4:10.{i // 256}.{i % 256}.0/24" for i in range(600))
        + " include:loop.example.com -all")
txt_records = st.one_of(
    st.lists(spf_record, min_size=1, max_size=1),
    st.lists(spf_record, min_size=1, max_size=1),
    st.lists(spf_record, min_size=1, max_size=1),
    st.lists(st.one_of(
        spf_record, st.text(max_size=40), st.just(HUGE),
        st.just("%{i} may not send for %{s}: see %{d} %{c} %{r} %{t}"),
        st.lists(st.text(max_size=300), min_size=2, max_size=4),  # several character-strings
    ), max_size=3),
)
addresses4 = st.lists(st.one_of(st.sampled_from(["192.0.2.1", "198.51.100.7"]),
                                st.ip_addresses(v=4).map(str)), max_size=3)
addresses6 = st.lists(st.one_of(st.just("2001:db8::1"), st.ip_addresses(v=6).map(str)),
                      max_size=3)
mx_hosts = st.lists(
    st.tuples(st.integers(0, 65535), st.sampled_from([*NAMES, "nx.example.com", "."])),
    max_size=13)
ptr_names = st.lists(st.sampled_from([*NAMES, "host.example.com", "nx.example.com"]),
                     max_size=13)
temperror = st.just("TEMPERROR")
record_entry = st.fixed_dictionaries(
    {"TXT": st.one_of(txt_records, txt_records, txt_records, txt_records, temperror)},
    optional={
        "A": st.one_of(addresses4, addresses4, addresses4, temperror),
        "AAAA": st.one_of(addresses6, addresses6, addresses6, temperror),
        "MX": st.one_of(mx_hosts, mx_hosts, mx_hosts, temperror),
    },
)
name_entry = st.one_of(record_entry, record_entry, record_entry, record_entry, temperror,
                       st.fixed_dictionaries({}, optional={"A": addresses4, "AAAA": addresses6}))
reverse_entry = st.one_of(st.fixed_dictionaries({"PTR": ptr_names}), temperror)


@st.composite
def zones(draw: st.DrawFn) -> dict[str, Any]:
    zone: dict[str, Any] = {"example.com": draw(record_entry)}
    zone.update(draw(st.dictionaries(st.sampled_from(NAMES[1:]), name_entry, max_size=8)))
    zone.update(draw(st.dictionaries(st.sampled_from(REVERSE), reverse_entry, max_size=3)))
    return zone


def _bound_on_queries(limits: Limits) -> int:
    """The most DNS queries one evaluation may send under §4.6.4: the first TXT, then per
    DNS-querying term one query plus up to 10 address lookups (mx/ptr), one TXT for exp and
    the PTR + address lookups behind %{p} (done once)."""
    per_term = 1 + max(limits.mx_names, limits.ptr_names)
    return 1 + limits.dns_terms * per_term + 1 + 1 + limits.ptr_names


@PROPERTY
@given(
    zone=zones(),
    ip=st.one_of(st.sampled_from(CLIENTS), st.ip_addresses().map(str)),
    domain=st.sampled_from(["example.com"] * 8
                           + [*NAMES, "nx.example.com", "localhost", "", "[192.0.2.1]"]),
    sender=st.one_of(st.sampled_from(["user@example.com", "example.com", "@example.com"]),
                     st.text(max_size=30)),
    helo=st.text(max_size=30),
    authentic=st.sets(st.sampled_from(NAMES + REVERSE), max_size=12),
)
def test_check_host_always_returns_a_result_within_limits(
    zone: dict[str, Any], ip: str, domain: str, sender: str, helo: str, authentic: set[str]
) -> None:
    dns = FakeDNS(zone, authentic=authentic)
    limits = Limits()
    res = check_host(dns, ip, domain, sender, helo=helo, limits=limits)

    assert isinstance(res, SPFResult)
    assert res.result in set(Result)
    # §4.6.4: at most 10 DNS-querying terms and 2 void lookups; the void lookup that trips the
    # limit was answered, so it is counted.
    assert res.lookups <= limits.dns_terms
    if res.void_lookups > limits.void_lookups:
        assert res.result is Result.PERMERROR
        assert res.void_lookups == limits.void_lookups + 1
        assert "void lookups" in res.cause
    assert len(dns.queries) <= _bound_on_queries(limits)
    if res.result is not Result.FAIL:
        assert res.explanation is None
    if res.explanation is not None:
        assert res.explanation.isascii()
    if res.authentic:
        def failed(name: str, rdtype: str) -> bool:
            entry = zone.get(name)
            return entry == "TEMPERROR" or (isinstance(entry, dict)
                                            and entry.get(rdtype) == "TEMPERROR")

        answered = {name for name, rdtype in dns.queries if not failed(name, rdtype)}
        assert answered
        assert answered <= {n.lower() for n in authentic}
    if res.result in (Result.TEMPERROR, Result.PERMERROR):
        assert res.cause
    header_result, _, pairs = parse_received_spf(res.received_spf)
    assert header_result == str(res.result)
    assert pairs["identity"] == "mailfrom"


@PROPERTY
@given(st.lists(st.sampled_from(NAMES), min_size=1, max_size=9, unique=True),
       st.sampled_from(["include", "redirect"]))
def test_include_and_redirect_cycles_end_in_permerror(names: list[str], how: str) -> None:
    zone: dict[str, Any] = {}
    for here, there in zip(names, names[1:] + names[:1], strict=True):
        record = (f"v=spf1 include:{there} -all" if how == "include"
                  else f"v=spf1 redirect={there}")
        zone[here] = {"TXT": [record]}
    dns = FakeDNS(zone)
    res = check_host(dns, "192.0.2.1", names[0], "user@example.com")
    assert res.result is Result.PERMERROR
    assert "4.6.4" in res.cause
    assert dns.count(rdtype="TXT") == 11


# -- Received-SPF --------------------------------------------------------------------------

@PROPERTY
@given(
    result=st.sampled_from([str(r) for r in Result]),
    values=st.lists(st.text(), min_size=6, max_size=6),
    mechanism=st.one_of(st.none(), st.text()),
)
def test_received_spf_always_parses_back(
    result: str, values: list[str], mechanism: str | None
) -> None:
    receiver, ip, sender, helo, identity, problem = values
    header = received_spf(result, receiver=receiver, ip=ip, sender=sender, helo=helo,
                          identity=identity, mechanism=mechanism, problem=problem)
    parsed_result, _, pairs = parse_received_spf(header)
    assert parsed_result == result

    def clean(value: str) -> str:
        value = re.sub(r"[^\x20-\x7e]", "?", value)
        return value if len(value) <= 256 else value[:253] + "..."

    assert pairs["receiver"] == clean(receiver)
    assert pairs["client-ip"] == clean(ip)
    assert pairs["envelope-from"] == clean(sender)
    assert pairs["helo"] == clean(helo)
    assert pairs["identity"] == clean(identity)
    if mechanism:
        assert pairs["mechanism"] == clean(mechanism)
    else:
        assert "mechanism" not in pairs
    if problem and result in ("temperror", "permerror"):
        assert pairs["problem"] == clean(problem)
    else:
        assert "problem" not in pairs
