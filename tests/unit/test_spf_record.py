"""SPF record syntax (RFC 7208 §4.5, §4.6, §5, §6): `parse_record` and `is_spf_record`."""

from __future__ import annotations

import ipaddress

import pytest

from mailwarden.spf.macro import Macro, MacroString
from mailwarden.spf.record import (
    Directive,
    Modifier,
    Record,
    RecordError,
    is_spf_record,
    parse_record,
)


def record(text: str) -> Record:
    parsed = parse_record(text)
    assert isinstance(parsed, Record), f"{text!r} should parse, got {parsed}"
    return parsed


def error(text: str) -> RecordError:
    parsed = parse_record(text)
    assert isinstance(parsed, RecordError), f"{text!r} should be a syntax error, got {parsed}"
    return parsed


def only(text: str) -> Directive:
    parsed = record(text)
    assert len(parsed.directives) == 1
    return parsed.directives[0]


def spec_text(directive: Directive) -> str | None:
    return directive.domain_spec.text if directive.domain_spec is not None else None


# -- §4.5: selecting records -------------------------------------------------------------------

@pytest.mark.parametrize("text", ["v=spf1", "v=spf1 ", "v=spf1 -all", "V=SPF1 -all", "v=SpF1 a"])
def test_s4_5_version_matches_case_insensitively_followed_by_space_or_end(text: str) -> None:
    assert is_spf_record(text)
    assert isinstance(parse_record(text), Record)


@pytest.mark.parametrize(
    "text",
    ["v=spf10", "v=spf10 -all", "v=spf1-all", "v=spf1\t-all", "v=spf2.0/pra -all", " v=spf1 -all",
     "spf1 -all", "v=spf", "", "v = spf1 -all", "x=spf1 -all"],
)
def test_s4_5_text_not_starting_with_exact_version_is_not_a_record(text: str) -> None:
    assert not is_spf_record(text)
    err = error(text)
    assert "v=spf1" in err.cause
    assert err.term == ""


def test_s4_5_empty_record_has_no_terms() -> None:
    parsed = record("v=spf1")
    assert parsed.directives == ()
    assert parsed.redirect is None
    assert parsed.exp is None
    assert parsed.unknown_modifiers == ()


def test_s4_6_multiple_spaces_between_terms_and_trailing_space_allowed() -> None:
    parsed = record("v=spf1   a    mx  -all   ")
    assert [d.mechanism for d in parsed.directives] == ["a", "mx", "all"]
    assert parsed.text == "v=spf1   a    mx  -all   "


def test_s4_6_directives_keep_record_order() -> None:
    parsed = record("v=spf1 ip4:192.0.2.1 include:_spf.example.com ~all")
    assert [d.text for d in parsed.directives] == [
        "ip4:192.0.2.1", "include:_spf.example.com", "~all"]


# -- §4.6.2 qualifiers and §5 mechanisms -----------------------------------------------------

@pytest.mark.parametrize(
    ("prefix", "qualifier", "result"),
    [("", "+", "pass"), ("+", "+", "pass"), ("-", "-", "fail"), ("~", "~", "softfail"),
     ("?", "?", "neutral")],
)
@pytest.mark.parametrize(
    "mechanism",
    ["all", "include:example.com", "a", "a:example.com", "mx", "mx:example.com", "ptr",
     "ptr:example.com", "ip4:192.0.2.1", "ip6:2001:db8::1", "exists:example.com"],
)
def test_s4_6_2_every_mechanism_with_every_qualifier(
    prefix: str, qualifier: str, result: str, mechanism: str
) -> None:
    directive = only(f"v=spf1 {prefix}{mechanism}")
    assert directive.qualifier == qualifier
    assert directive.result == result
    assert directive.mechanism == mechanism.split(":")[0]
    assert directive.text == prefix + mechanism


@pytest.mark.parametrize(
    ("term", "mechanism"),
    [("ALL", "all"), ("-All", "all"), ("INCLUDE:example.com", "include"), ("A", "a"),
     ("Mx", "mx"), ("PTR", "ptr"), ("IP4:192.0.2.1", "ip4"), ("Ip6:2001:DB8::1", "ip6"),
     ("EXISTS:example.com", "exists")],
)
def test_s4_6_1_mechanism_names_are_case_insensitive(term: str, mechanism: str) -> None:
    directive = only("v=spf1 " + term)
    assert directive.mechanism == mechanism
    assert directive.text == term


def test_s5_1_all_takes_no_arguments() -> None:
    for term in ("all:example.com", "all/24", "-all.", "all//64", "allx"):
        err = error(f"v=spf1 {term}")
        assert err.term == term
    # "all=" is name "=" macro-string: an unknown modifier (§4.6.1), not a broken "all"
    assert record("v=spf1 all=").unknown_modifiers == (Modifier("all=", "all", ""),)


def test_s5_2_include_requires_domain_spec() -> None:
    directive = only("v=spf1 include:_spf.example.com")
    assert spec_text(directive) == "_spf.example.com"
    assert error("v=spf1 include").term == "include"
    assert error("v=spf1 include:").term == "include:"
    assert error("v=spf1 include/24").term == "include/24"


def test_s5_2_include_does_not_take_a_cidr() -> None:
    assert error("v=spf1 include:example.com/24").term == "include:example.com/24"


def test_s5_3_a_defaults() -> None:
    directive = only("v=spf1 a")
    assert directive.domain_spec is None
    assert (directive.cidr4, directive.cidr6) == (32, 128)


def test_s5_3_a_with_domain() -> None:
    directive = only("v=spf1 a:mail.example.com")
    assert spec_text(directive) == "mail.example.com"
    assert (directive.cidr4, directive.cidr6) == (32, 128)


def test_s5_4_mx_defaults_and_domain() -> None:
    assert only("v=spf1 mx").domain_spec is None
    assert spec_text(only("v=spf1 mx:example.org")) == "example.org"


def test_s5_5_ptr_optional_domain_no_cidr() -> None:
    assert only("v=spf1 ptr").domain_spec is None
    assert spec_text(only("v=spf1 ptr:example.org")) == "example.org"
    assert error("v=spf1 ptr/24").term == "ptr/24"
    assert error("v=spf1 ptr:").term == "ptr:"
    assert error("v=spf1 ptrx").term == "ptrx"


def test_s5_7_exists_requires_domain_spec() -> None:
    directive = only("v=spf1 exists:%{ir}.%{v}._spf.%{d}")
    assert directive.domain_spec is not None
    assert not directive.domain_spec.literal
    assert error("v=spf1 exists").term == "exists"
    assert error("v=spf1 exists:").term == "exists:"


# -- §5.6 ip4 / ip6 ---------------------------------------------------------------------------

def test_s5_6_ip4_network() -> None:
    directive = only("v=spf1 ip4:192.0.2.0/24")
    assert directive.network == ipaddress.IPv4Network("192.0.2.0/24")
    assert only("v=spf1 ip4:192.0.2.1").network == ipaddress.IPv4Network("192.0.2.1/32")


def test_s5_6_ip4_host_bits_are_masked() -> None:
    assert only("v=spf1 ip4:192.0.2.77/24").network == ipaddress.IPv4Network("192.0.2.0/24")


def test_s5_6_ip6_network() -> None:
    assert only("v=spf1 ip6:2001:db8::/32").network == ipaddress.IPv6Network("2001:db8::/32")
    assert only("v=spf1 ip6:2001:db8::1").network == ipaddress.IPv6Network("2001:db8::1/128")
    assert only("v=spf1 ip6:::ffff:192.0.2.1").network == ipaddress.IPv6Network(
        "::ffff:192.0.2.1/128")


@pytest.mark.parametrize(("term", "prefix"), [("ip4:0.0.0.0/0", 0), ("ip6:::/0", 0),
                                              ("ip4:192.0.2.1/32", 32),
                                              ("ip6:2001:db8::1/128", 128)])
def test_s5_6_cidr_boundaries_accepted(term: str, prefix: int) -> None:
    network = only("v=spf1 " + term).network
    assert network is not None
    assert network.prefixlen == prefix


@pytest.mark.parametrize(
    "term",
    ["ip4:192.0.2.1/33", "ip4:192.0.2.1/032", "ip4:192.0.2.1/", "ip4:192.0.2.1/-1",
     "ip4:192.0.2.1/2a", "ip4:192.0.2.1/24//64", "ip4:192.0.2.1/24/",
     "ip6:2001:db8::/129", "ip6:2001:db8::/0128", "ip6:2001:db8::/", "ip6:2001:db8::/00"],
)
def test_s5_6_bad_ip_cidr(term: str) -> None:
    err = error("v=spf1 " + term + " -all")
    assert err.term == term
    assert "CIDR" in err.cause


@pytest.mark.parametrize(
    "term",
    ["ip4", "ip4:", "ip4:192.0.2", "ip4:192.0.2.256", "ip4:01.2.3.4", "ip4:192.0.2.1.5",
     "ip4:0x7f.0.0.1", "ip4:2001:db8::1", "ip4:[192.0.2.1]", "ip4:example.com",
     "ip6", "ip6:", "ip6:192.0.2.1", "ip6:2001:db8:::1", "ip6:2001:db8::g", "ip6:fe80::1%eth0",
     "ip6:1:2:3:4:5:6:7:8:9", "ip4=192.0.2.1x"],
)
def test_s5_6_bad_ip_literals(term: str) -> None:
    parsed = parse_record("v=spf1 " + term)
    if term == "ip4=192.0.2.1x":
        # name "=" macro-string is a modifier (§4.6.1), not a broken ip4
        assert isinstance(parsed, Record)
        assert parsed.unknown_modifiers == (Modifier(term, "ip4", "192.0.2.1x"),)
        return
    assert isinstance(parsed, RecordError)
    assert parsed.term == term


# -- §5.3/§5.4 dual-cidr-length -------------------------------------------------------------

@pytest.mark.parametrize(
    ("term", "spec", "cidr4", "cidr6"),
    [("a/24", None, 24, 128), ("mx/24", None, 24, 128), ("a//64", None, 32, 64),
     ("mx//64", None, 32, 64), ("a/24//64", None, 24, 64), ("a:example.com/24", "example.com",
     24, 128), ("a:example.com//64", "example.com", 32, 64),
     ("a:example.com/24//64", "example.com", 24, 64), ("mx:example.com/0//0", "example.com", 0, 0),
     ("a/32//128", None, 32, 128), ("-mx:%{d}/16", "%{d}", 16, 128)],
)
def test_s5_3_dual_cidr(term: str, spec: str | None, cidr4: int, cidr6: int) -> None:
    directive = only("v=spf1 " + term)
    assert spec_text(directive) == spec
    assert (directive.cidr4, directive.cidr6) == (cidr4, cidr6)


@pytest.mark.parametrize(
    "term",
    ["a/032", "a/33", "a/", "a//", "a//0128", "a//129", "mx/024", "mx//064", "mx/99999",
     "a:example.com/33", "a:example.com//129", "a:example.com//64/24", "a:example.com/24/",
     "a/24//", "a//64//64", "a/1a", "mx:/24"],
)
def test_s5_3_invalid_dual_cidr(term: str) -> None:
    assert error("v=spf1 " + term).term == term


# -- §4.6.1 / §7.1 domain-spec rules --------------------------------------------------------

@pytest.mark.parametrize(
    "term",
    ["a:foo", "a:1.2.3.4", "mx:example.123", "include:localhost", "exists:foo.com.-bar",
     "a:foo.com-", "a:foo.-com", "a:foo..", "a:foo.com..", "a:%{d}.", "a:foo.%{d}com",
     "include:foo.com/", "a:foo.c_m", "ptr:com", "redirect=foo", "exp=foo"],
)
def test_s4_6_1_domain_end_must_be_a_toplabel_or_macro(term: str) -> None:
    err = error("v=spf1 " + term)
    assert err.term == term


@pytest.mark.parametrize(
    "term",
    ["a:example.com.", "a:EXAMPLE.COM", "a:foo.1-2", "a:xn--p1ai.xn--p1ai", "a:foo.com1",
     "a:_spf.example.com", "a:foo.%{d}", "include:%{d}", "exists:%{i}.%{d2}", "a:%{l}",
     "a:foo.com%%", "a:foo.com%_", "a:foo.com%-", "redirect=%{d}", "exp=%{d}",
     "redirect=example.com.", "a:%{o}.example.com"],
)
def test_s4_6_1_valid_domain_ends(term: str) -> None:
    parsed = record("v=spf1 " + term)
    assert len(parsed.directives) + (parsed.redirect is not None) + (parsed.exp is not None) == 1


def test_s4_6_1_macro_at_end_is_recorded() -> None:
    spec = only("v=spf1 a:foo.%{d}").domain_spec
    assert spec is not None
    assert spec.ends_with_macro
    assert spec.tokens == ("foo.", Macro("d", False, None, False, "."))
    literal = only("v=spf1 a:example.com").domain_spec
    assert literal is not None
    assert literal.literal
    assert not literal.ends_with_macro


@pytest.mark.parametrize("term", ["a:%x.example.com", "a:%{z}.example.com", "include:%{",
                                  "a:%{c}.example.com",
                                  "exists:%{t}.example.com", "redirect=%{r}.example.com",
                                  "exp=%{c}.example.com"])
def test_s7_1_bad_macro_in_domain_spec(term: str) -> None:
    assert error("v=spf1 " + term).term == term


# -- §6 modifiers -----------------------------------------------------------------------------

def test_s6_1_redirect_parsed() -> None:
    parsed = record("v=spf1 mx redirect=_spf.example.com")
    assert parsed.redirect == MacroString("_spf.example.com", ("_spf.example.com",), False)
    assert parsed.exp is None
    assert [d.mechanism for d in parsed.directives] == ["mx"]


def test_s6_2_exp_parsed() -> None:
    parsed = record("v=spf1 -all exp=explain._spf.%{d}")
    assert parsed.exp is not None
    assert parsed.exp.text == "explain._spf.%{d}"


def test_s6_modifier_names_are_case_insensitive() -> None:
    parsed = record("v=spf1 REDIRECT=example.com Exp=explain.example.com")
    assert parsed.redirect is not None
    assert parsed.redirect.text == "example.com"
    assert parsed.exp is not None
    assert parsed.exp.text == "explain.example.com"


@pytest.mark.parametrize(
    ("text", "term"),
    [("v=spf1 redirect=a.example.com redirect=b.example.com", "redirect=b.example.com"),
     ("v=spf1 redirect=a.example.com REDIRECT=a.example.com", "REDIRECT=a.example.com"),
     ("v=spf1 exp=a.example.com -all exp=b.example.com", "exp=b.example.com"),
     ("v=spf1 Exp=a.example.com eXp=a.example.com", "eXp=a.example.com")],
)
def test_s6_redirect_or_exp_twice_is_an_error(text: str, term: str) -> None:
    err = error(text)
    assert err.term == term
    assert "more than once" in err.cause


def test_s6_empty_redirect_or_exp_is_an_error() -> None:
    assert error("v=spf1 redirect=").term == "redirect="
    assert error("v=spf1 -all exp=").term == "exp="


def test_s6_unknown_modifiers_are_kept_in_order() -> None:
    parsed = record("v=spf1 foo=bar -all x-y.z=%{d}.example.com Foo=baz empty=")
    assert parsed.unknown_modifiers == (
        Modifier("foo=bar", "foo", "bar"),
        Modifier("x-y.z=%{d}.example.com", "x-y.z", "%{d}.example.com"),
        Modifier("Foo=baz", "foo", "baz"),
        Modifier("empty=", "empty", ""),
    )
    assert [d.text for d in parsed.directives] == ["-all"]


def test_s6_unknown_modifier_value_must_be_a_macro_string() -> None:
    err = error("v=spf1 foo=%x -all")
    assert err.term == "foo=%x"
    err = error("v=spf1 -all foo=%{q}")
    assert err.term == "foo=%{q}"


def test_s6_unknown_modifier_value_needs_no_domain_end() -> None:
    parsed = record("v=spf1 moo=cow -all")
    assert parsed.unknown_modifiers == (Modifier("moo=cow", "moo", "cow"),)


# -- unknown / malformed terms -----------------------------------------------------------

@pytest.mark.parametrize(
    "term",
    ["foo", "foo:example.com", "-foo", "include2:example.com", "ip5:192.0.2.1", "aa",
     "mxx", "a-b", "spf1", "allow"],
)
def test_s4_6_unknown_mechanism_error_names_the_term(term: str) -> None:
    err = error(f"v=spf1 {term} -all")
    assert err.term == term
    assert "unknown mechanism" in err.cause
    assert term.lstrip("+-~?").split(":")[0].lower() in err.cause
    assert term in str(err)


@pytest.mark.parametrize("term", ["--all", "+-all", "!all", ":example.com", "=foo", "/24",
                                  "1a", "%{d}", "+", "-"])
def test_s4_6_malformed_term_error_names_the_term(term: str) -> None:
    err = error(f"v=spf1 a {term} -all")
    assert err.term == term
    assert term in str(err)


def test_s4_6_first_error_wins_and_is_named() -> None:
    err = error("v=spf1 a:foo mx:bar -all")
    assert err.term == "a:foo"


def test_s4_6_error_anywhere_makes_the_whole_record_an_error() -> None:
    # even after "all", the record is not valid (§4.6: syntax errors anywhere)
    assert error("v=spf1 -all foo:bar").term == "foo:bar"
    assert error("v=spf1 -all a:nodot").term == "a:nodot"


def test_s4_6_record_error_str_without_term_is_the_cause() -> None:
    assert str(RecordError("broken")) == "broken"
    assert str(RecordError("broken", "a:x")) == "broken in term 'a:x'"


# -- §3.1/§4.5 non-ASCII ------------------------------------------------------------------

@pytest.mark.parametrize(
    "text",
    ["v=spf1 a:exämple.com -all", "v=spf1 -all é", "v=spf1 ip4:192.0.2.1\u00a0-all",
     "v=spf1 include:xn--\u2603.com", "v=spf1 exp=\u00e9.example.com"],
)
def test_s3_1_non_ascii_is_an_error(text: str) -> None:
    err = error(text)
    assert "non-ASCII" in err.cause
    bad = next(ch for ch in text if not ch.isascii())
    assert repr(bad) in err.cause


def test_s3_1_non_ascii_error_names_the_term() -> None:
    assert error("v=spf1 a:exämple.com -all").term == "a:exämple.com"
    assert error("v=spf1 -all exp=é.example.com").term == "exp=é.example.com"


@pytest.mark.parametrize("term", ["exists:%{d0}.example.com", "a:%{l00}", "redirect=%{d0r}",
                                  "x-mod=%{i0}"])
def test_s7_3_zero_transformer_is_a_syntax_error_naming_the_term(term: str) -> None:
    err = error(f"v=spf1 {term} -all")
    assert err.term == term


@pytest.mark.parametrize("char", ["\t", "\x00", "\x7f", "\r", "\n"])
def test_s4_6_control_characters_are_errors(char: str) -> None:
    err = error(f"v=spf1 a:exa{char}mple.com -all")
    assert char in err.term


def test_s4_5_parse_record_is_pure_and_cached() -> None:
    first = parse_record("v=spf1 a -all")
    second = parse_record("v=spf1 a -all")
    assert first == second
    assert isinstance(first, Record)
