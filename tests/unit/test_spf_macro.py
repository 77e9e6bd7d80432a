"""SPF macros (RFC 7208 §7): parsing, expansion, transformers, URL escaping and truncation."""

from __future__ import annotations

import ipaddress
import urllib.parse

import pytest

from mailwarden.spf.macro import (
    Macro,
    MacroContext,
    MacroError,
    MacroString,
    expand,
    ip_macro_value,
    parse_macro_string,
    transform,
    truncate_domain,
)

SENDER = "strong-bad@email.example.com"
IP4 = "192.0.2.3"
IP6 = "2001:db8::cb01"


def context(
    sender: str = SENDER,
    ip: str = IP4,
    domain: str = "email.example.com",
    helo: str = "mx.example.org",
    receiver: str = "receiver.example.net",
    timestamp: int = 1_234_567_890,
    validated: str = "mx.example.org",
) -> MacroContext:
    address = ipaddress.ip_address(ip)
    local, _, sender_domain = sender.rpartition("@")
    calls: list[str] = []

    def validated_name() -> str:
        calls.append(validated)
        return validated

    return MacroContext(
        sender=sender,
        local_part=local or "postmaster",
        sender_domain=sender_domain,
        domain=domain,
        ip_macro=ip_macro_value(address.packed),
        ip_readable=str(address),
        ip_version="in-addr" if address.version == 4 else "ip6",
        helo=helo,
        receiver=receiver,
        timestamp=timestamp,
        validated_name=validated_name,
    )


def parsed(text: str, *, exp: bool = False) -> MacroString:
    result = parse_macro_string(text, exp=exp)
    assert isinstance(result, MacroString), f"{text!r}: {result}"
    return result


def expanded(text: str, ctx: MacroContext | None = None, *, exp: bool = False) -> str:
    return expand(parsed(text, exp=exp), ctx or context())


# -- §7.4: the RFC's examples --------------------------------------------------------------

@pytest.mark.parametrize(
    ("macro", "expansion"),
    [
        ("%{s}", "strong-bad@email.example.com"),
        ("%{o}", "email.example.com"),
        ("%{d}", "email.example.com"),
        ("%{d4}", "email.example.com"),
        ("%{d3}", "email.example.com"),
        ("%{d2}", "example.com"),
        ("%{d1}", "com"),
        ("%{dr}", "com.example.email"),
        ("%{d2r}", "example.email"),
        ("%{l}", "strong-bad"),
        ("%{l-}", "strong.bad"),
        ("%{lr}", "strong-bad"),
        ("%{lr-}", "bad.strong"),
        ("%{l1r-}", "strong"),
    ],
)
def test_s7_4_single_macro_examples(macro: str, expansion: str) -> None:
    assert expanded(macro) == expansion


@pytest.mark.parametrize(
    ("macro_string", "expansion"),
    [
        ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
        ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
        ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
        ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
        ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
    ],
)
def test_s7_4_macro_string_examples_ipv4(macro_string: str, expansion: str) -> None:
    assert expanded(macro_string) == expansion


def test_s7_4_ipv6_example_upper_case_nibbles() -> None:
    # The RFC prints lower-case nibbles; this implementation renders them upper case on purpose
    # (DNS names compare case-insensitively; the openspf suite expects upper case).
    want = ("1.0.B.C.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.B.D.0.1.0.0.2"
            ".ip6._spf.example.com")
    got = expanded("%{ir}.%{v}._spf.%{d2}", context(ip=IP6))
    assert got == want
    assert got.lower() == want.lower()


# -- §7.3: every letter ----------------------------------------------------------------------

def test_s7_3_every_letter_ipv4() -> None:
    ctx = context()
    assert expanded("%{s}", ctx) == SENDER
    assert expanded("%{l}", ctx) == "strong-bad"
    assert expanded("%{o}", ctx) == "email.example.com"
    assert expanded("%{d}", ctx) == "email.example.com"
    assert expanded("%{i}", ctx) == "192.0.2.3"
    assert expanded("%{p}", ctx) == "mx.example.org"
    assert expanded("%{v}", ctx) == "in-addr"
    assert expanded("%{h}", ctx) == "mx.example.org"
    assert expanded("%{c}", ctx, exp=True) == "192.0.2.3"
    assert expanded("%{r}", ctx, exp=True) == "receiver.example.net"
    assert expanded("%{t}", ctx, exp=True) == "1234567890"


def test_s7_3_every_letter_ipv6() -> None:
    ctx = context(ip=IP6)
    nibbles = "2.0.0.1.0.D.B.8.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.C.B.0.1"
    assert expanded("%{i}", ctx) == nibbles
    assert len(expanded("%{i}", ctx).split(".")) == 32
    assert expanded("%{v}", ctx) == "ip6"
    assert expanded("%{c}", ctx, exp=True) == "2001:db8::cb01"


def test_s7_3_d_is_the_current_domain_not_the_sender_domain() -> None:
    ctx = context(domain="_spf.example.net")
    assert expanded("%{d}", ctx) == "_spf.example.net"
    assert expanded("%{o}", ctx) == "email.example.com"


def test_s7_3_p_is_computed_only_when_used() -> None:
    calls: list[int] = []

    def validated() -> str:
        calls.append(1)
        return "host.example.com"

    ctx = context()
    ctx.validated_name = validated
    assert expanded("%{d}.%{i}", ctx) == "email.example.com.192.0.2.3"
    assert calls == []
    assert expanded("%{p}", ctx) == "host.example.com"
    assert calls == [1]


def test_s7_3_letters_case_insensitive_apart_from_escaping() -> None:
    ctx = context(sender="a@example.com")
    for letter in "slodiphv":
        upper = expanded("%{" + letter.upper() + "}", ctx)
        lower = expanded("%{" + letter + "}", ctx)
        assert urllib.parse.unquote(upper) == lower
        assert upper == urllib.parse.quote(lower, safe="")


def test_s7_3_t_is_decimal_seconds() -> None:
    assert expanded("%{t}", context(timestamp=0), exp=True) == "0"
    assert expanded("%{t2}", context(timestamp=42), exp=True) == "42"


def test_s7_3_ip_macro_value_forms() -> None:
    assert ip_macro_value(bytes([10, 0, 0, 255])) == "10.0.0.255"
    assert ip_macro_value(ipaddress.IPv6Address("::1").packed) == ".".join("0" * 31 + "1")
    value = ip_macro_value(ipaddress.IPv6Address("ffff::").packed)
    assert value.startswith("F.F.F.F.0")


# -- §7.3 transformers ------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("macro", "value", "want"),
    [
        ("%{d}", "a.b.c", "a.b.c"),
        ("%{d1}", "a.b.c", "c"),
        ("%{d2}", "a.b.c", "b.c"),
        ("%{d3}", "a.b.c", "a.b.c"),
        ("%{d99}", "a.b.c", "a.b.c"),
        ("%{d12345678901234567890}", "a.b.c", "a.b.c"),
        ("%{dr}", "a.b.c", "c.b.a"),
        ("%{d1r}", "a.b.c", "a"),
        ("%{d2r}", "a.b.c", "b.a"),
        ("%{dR}", "a.b.c", "c.b.a"),
        ("%{d01}", "a.b.c", "c"),
        ("%{d-}", "a-b.c", "a.b.c"),
        ("%{d+}", "a+b+c", "a.b.c"),
        ("%{d,}", "a,b,c", "a.b.c"),
        ("%{d/}", "a/b/c", "a.b.c"),
        ("%{d_}", "a_b_c", "a.b.c"),
        ("%{d=}", "a=b=c", "a.b.c"),
        ("%{dr-}", "a-b.c", "b.c.a"),
        ("%{d1r-+}", "a-b+c", "a"),
        ("%{d2.-}", "a.b-c", "b.c"),
        ("%{dr.-+,/_=}", "a.b-c+d,e/f_g=h", "h.g.f.e.d.c.b.a"),
        ("%{dr}", "a..b", "b..a"),
        ("%{d1}", "trailing.", ""),
        ("%{d}", "", ""),
        ("%{dr}", "", ""),
    ],
)
def test_s7_3_transformers(macro: str, value: str, want: str) -> None:
    assert expanded(macro, context(domain=value)) == want


def test_s7_3_custom_delimiter_replaces_dot() -> None:
    # with "-" given, "." is no longer a delimiter: the dot stays inside the part
    assert expanded("%{d1-}", context(domain="a.b-c.d")) == "c.d"


def test_s7_3_transform_identity_shortcut() -> None:
    macro = Macro("d", False, None, False, ".")
    assert transform("x.y", macro) == "x.y"
    assert transform("x.y", Macro("d", False, 1, False, ".")) == "y"


# -- §7.3 URL escaping -------------------------------------------------------------------

def test_s7_3_upper_case_letter_url_escapes() -> None:
    ctx = context()
    assert expanded("%{S}", ctx) == "strong-bad%40email.example.com"
    assert expanded("%{L}", ctx) == "strong-bad"


def test_s7_3_url_escape_keeps_only_rfc3986_unreserved() -> None:
    local = "Az09-._~!$&'()*+,;=:/?#[]@ %\"<>\\^`{|}"
    ctx = context(sender=f"{local}@example.com")
    got = expanded("%{L}", ctx)
    assert got.startswith("Az09-._~")
    rest = got[len("Az09-._~"):]
    # every remaining character has become %XX with upper-case hex
    assert len(rest) == 3 * (len(local) - len("Az09-._~"))
    for i in range(0, len(rest), 3):
        assert rest[i] == "%"
        assert all(c in "0123456789ABCDEF" for c in rest[i + 1:i + 3])
    assert rest.startswith("%21%24%26%27%28%29%2A%2B%2C%3B%3D%3A%2F%3F%23%5B%5D%40%20%25")


def test_s7_3_url_escape_applies_after_transformation() -> None:
    ctx = context(sender="a+b@example.com")
    assert expanded("%{L}", ctx) == "a%2Bb"
    assert expanded("%{L+}", ctx) == "a.b"
    assert expanded("%{Lr+}", ctx) == "b.a"


def test_s7_3_url_escape_of_non_ascii_is_utf8() -> None:
    ctx = context(sender="jösé@example.com")
    assert expanded("%{L}", ctx) == "j%C3%B6s%C3%A9"
    assert expanded("%{l}", ctx) == "jösé"


def test_s7_3_ipv6_c_escaped() -> None:
    assert expanded("%{C}", context(ip=IP6), exp=True) == "2001%3Adb8%3A%3Acb01"


# -- §7.1 literal escapes and errors -----------------------------------------------------

def test_s7_1_percent_escapes() -> None:
    assert expanded("100%%") == "100%"
    assert expanded("a%_b") == "a b"
    assert expanded("a%-b") == "a%20b"
    assert expanded("%%%{d1}%%") == "%com%"
    assert expanded("%%{d}") == "%{d}"


def test_s7_1_escapes_count_as_macro_expand_for_domain_end() -> None:
    for text in ("x.com%%", "x.com%_", "x.com%-", "x.%{d}"):
        assert parsed(text).ends_with_macro
    for text in ("x.com", "%{d}.com", "%%x"):
        assert not parsed(text).ends_with_macro


def test_s7_1_tokens() -> None:
    ms = parsed("a.%{D2r-}.b")
    assert ms.tokens == ("a.", Macro("d", True, 2, True, "-"), ".b")
    assert not ms.literal
    assert parsed("plain.example.com").literal
    assert parsed("").tokens == ()


@pytest.mark.parametrize(
    "text",
    ["%x", "%", "abc%", "%{", "%{d", "%{}", "%{z}", "%{Z}", "%{1}", "%{d!}", "%{d }", "%{dr2}",
     "%{d-r}", "%{d.x}", "%{ d}", "%{dd}", "%{d2%}", "% {d}", "%D", "a b", "\t",
     "é.example.com", "x\x7f"],
)
def test_s7_1_syntax_errors(text: str) -> None:
    result = parse_macro_string(text)
    assert isinstance(result, MacroError)
    assert result.cause


@pytest.mark.parametrize("letter", ["c", "r", "t", "C", "R", "T"])
def test_s7_2_c_r_t_only_in_exp_text(letter: str) -> None:
    text = "%{" + letter + "}.example.com"
    err = parse_macro_string(text)
    assert isinstance(err, MacroError)
    assert "exp" in err.cause
    assert isinstance(parse_macro_string(text, exp=True), MacroString)


def test_s6_2_space_allowed_only_in_exp_text() -> None:
    assert isinstance(parse_macro_string("not allowed"), MacroError)
    assert expanded("%{i} is not one of %{d}'s servers", exp=True) == (
        "192.0.2.3 is not one of email.example.com's servers")


@pytest.mark.parametrize("text", ["%{d0}", "%{d00}", "%{d0r}", "%{D000-}", "x.%{l0}.example.com"])
def test_s7_3_zero_digit_transformer_is_a_syntax_error(text: str) -> None:
    err = parse_macro_string(text)
    assert isinstance(err, MacroError)
    assert "zero" in err.cause


def test_s7_3_zero_digit_transformer_is_an_error_even_in_exp() -> None:
    err = parse_macro_string("%{d0}", exp=True)
    assert isinstance(err, MacroError)
    assert "zero" in err.cause


def test_s7_1_leading_zero_digits_are_not_zero() -> None:
    assert expanded("%{d0000000000001}") == "com"
    assert expanded("%{d0002r}") == "example.email"


def test_s7_1_huge_digit_count_means_all_parts() -> None:
    assert expanded("%{d" + "9" * 400 + "}") == "email.example.com"
    assert expanded("%{d" + "0" * 50 + "1" + "0" * 50 + "r}") == "com.example.email"


# -- §7.3 truncation ---------------------------------------------------------------------

def test_s7_3_truncate_short_names_unchanged() -> None:
    assert truncate_domain("example.com") == "example.com"
    name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(name) == 253
    assert truncate_domain(name) == name


def test_s7_3_truncate_removes_whole_left_labels() -> None:
    labels = [f"l{i:02d}" + "x" * 6 for i in range(40)]  # 9 characters each
    name = ".".join(labels)
    assert len(name) > 253
    got = truncate_domain(name)
    assert len(got) <= 253
    assert name.endswith("." + got)
    # whole labels only, and no more removed than needed
    assert got.split(".") == labels[-len(got.split(".")):]
    one_more = labels[-len(got.split(".")) - 1] + "." + got
    assert len(one_more) > 253


def test_s7_3_truncate_254_becomes_next_label_boundary() -> None:
    name = "a." + ".".join(["b" * 63, "c" * 63, "d" * 63, "e" * 60])
    assert len(name) == 254
    assert truncate_domain(name) == name[2:]


def test_s7_3_truncate_custom_limit() -> None:
    assert truncate_domain("aa.bb.cc.dd", limit=5) == "cc.dd"
    assert truncate_domain("aa.bb.cc.dd", limit=4) == "dd"
    assert truncate_domain("aa.bb.cc.dd", limit=8) == "bb.cc.dd"


def test_s7_3_truncate_single_long_label_fits() -> None:
    got = truncate_domain("x" * 300)
    assert len(got) == 253


def test_s7_3_truncate_after_expansion() -> None:
    long_local = ".".join(["p" * 50] * 6)  # 305 characters
    ctx = context(sender=f"{long_local}@example.com")
    value = expanded("%{l}.example.com", ctx)
    assert len(value) > 253
    got = truncate_domain(value)
    assert len(got) <= 253
    assert got.endswith(".example.com")
    assert got.startswith("p")
