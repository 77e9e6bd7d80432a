"""DMARC policy records (RFC 9989 §4.7, §4.8, §4.10.1): `mailwarden.dmarc.record.parse` and
`is_dmarc` — every tag valid, invalid and defaulted, the v=DMARC1 rule, whitespace, case,
duplicate and removed tags, mailto: URIs, and the warning texts `mailwarden dmarc check` prints."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailwarden.dmarc.record import POLICIES, DmarcRecord, NotARecord, is_dmarc, parse

NOT_V = "does not begin with v=DMARC1"
NO_P_NO_RUA = "no valid p= and no valid rua= (RFC 9989 §4.7)"
P_FROM_RUA = "p= missing or invalid: read as p=none because rua= is valid"


def record(text: str) -> DmarcRecord:
    parsed = parse(text)
    assert isinstance(parsed, DmarcRecord), f"{text!r} should parse, got {parsed}"
    return parsed


def rejected(text: str) -> str:
    parsed = parse(text)
    assert isinstance(parsed, NotARecord), f"{text!r} should not be a record, got {parsed}"
    return parsed.reason


# -- v=DMARC1 (§4.7 "v": first tag, value exactly DMARC1) --------------------------------
@pytest.mark.parametrize("text", [
    "v=DMARC1; p=reject",
    "v=DMARC1;p=reject",
    "v=DMARC1; p=reject;",
    " v = DMARC1 ; p = reject ; ",
    "v=DMARC1\t;\tp=reject",
    "v=DMARC1 ;p=reject",
])
def test_v_dmarc1_first_is_a_record(text: str) -> None:
    assert is_dmarc(text)
    assert record(text).p == "reject"


@pytest.mark.parametrize("text", [
    "p=reject; v=DMARC1",  # v= must be the first tag
    "p=reject",
    "v=DMARC2; p=reject",
    "v=DMARC10; p=reject",
    "v=dmarc1; p=reject",  # the value is case-sensitive (%s"DMARC1")
    "v=DMARC; p=reject",
    "v=spf1 -all",
    "",
    ";",
    "x=DMARC1; p=reject",
    "v=DMARC1 p=reject",  # no separator: the first tag's value is not DMARC1
])
def test_not_starting_with_v_dmarc1_is_not_a_record(text: str) -> None:
    assert not is_dmarc(text)
    assert rejected(text) == NOT_V


def test_space_inside_the_version_value_is_not_dmarc1() -> None:
    assert not is_dmarc("v=DMARC 1; p=reject")


def test_tab_around_the_version_equals_sign_is_allowed() -> None:
    assert is_dmarc("v\t=\tDMARC1; p=reject")


def test_upper_case_v_tag_name_is_allowed() -> None:
    assert is_dmarc("V=DMARC1; p=reject")


def test_record_keeps_its_text() -> None:
    text = "v=DMARC1; p=quarantine; rua=mailto:d@example.com"
    assert record(text).text == text


# -- p= (§4.7; §4.10.1: no valid p= -> p=none when rua= is valid, else no record) ----------
@pytest.mark.parametrize("policy", POLICIES)
def test_p_values(policy: str) -> None:
    parsed = record(f"v=DMARC1; p={policy}")
    assert (parsed.p, parsed.sp, parsed.np) == (policy, policy, policy)
    assert parsed.p_explicit
    assert parsed.warnings == ()


@pytest.mark.parametrize(("value", "expected"), [
    ("REJECT", "reject"), ("Quarantine", "quarantine"), ("NONE", "none"), ("rEjEcT", "reject"),
])
def test_p_value_is_case_insensitive(value: str, expected: str) -> None:
    assert record(f"v=DMARC1; p={value}").p == expected


@pytest.mark.parametrize("text", [
    "v=DMARC1",
    "v=DMARC1;",
    "v=DMARC1; p=",
    "v=DMARC1; p=bogus",
    "v=DMARC1; p=rejected",
    "v=DMARC1; sp=reject; adkim=s",
    "v=DMARC1; p=bogus; rua=https://example.com/reports",  # no valid (mailto:) rua
    "v=DMARC1; p=bogus; rua=not-a-uri",
    "v=DMARC1; ruf=mailto:f@example.com",  # ruf= does not count, only rua=
])
def test_no_valid_p_and_no_valid_rua_is_not_a_record(text: str) -> None:
    assert is_dmarc(text)
    assert rejected(text) == NO_P_NO_RUA


@pytest.mark.parametrize("text", [
    "v=DMARC1; rua=mailto:d@example.com",
    "v=DMARC1; p=bogus; rua=mailto:d@example.com",
    "v=DMARC1; p=; rua=mailto:d@example.com",
    "v=DMARC1; rua=https://example.com/x, mailto:d@example.com",  # one valid URI is enough
])
def test_no_valid_p_with_valid_rua_is_p_none(text: str) -> None:
    parsed = record(text)
    assert (parsed.p, parsed.sp, parsed.np) == ("none", "none", "none")
    assert not parsed.p_explicit
    assert P_FROM_RUA in parsed.warnings
    assert parsed.rua == ("mailto:d@example.com",)


def test_no_valid_p_with_rua_keeps_explicit_sp_and_np() -> None:
    parsed = record("v=DMARC1; sp=reject; np=quarantine; rua=mailto:d@example.com")
    assert (parsed.p, parsed.sp, parsed.np) == ("none", "reject", "quarantine")


# -- sp= and np= defaults (§4.7: np defaults to sp, sp to p) --------------------------------
@pytest.mark.parametrize(("tags", "p", "sp", "np"), [
    ("p=reject", "reject", "reject", "reject"),
    ("p=reject; sp=none", "reject", "none", "none"),
    ("p=reject; np=quarantine", "reject", "reject", "quarantine"),
    ("p=none; sp=quarantine; np=reject", "none", "quarantine", "reject"),
    ("p=quarantine; sp=REJECT; np=None", "quarantine", "reject", "none"),
])
def test_sp_and_np_defaults(tags: str, p: str, sp: str, np: str) -> None:
    parsed = record(f"v=DMARC1; {tags}")
    assert (parsed.p, parsed.sp, parsed.np) == (p, sp, np)


def test_invalid_sp_falls_back_to_p_with_a_warning() -> None:
    parsed = record("v=DMARC1; p=reject; sp=bogus")
    assert (parsed.sp, parsed.np) == ("reject", "reject")
    assert parsed.warnings == ("sp=bogus is not one of none/quarantine/reject; using reject",)


def test_invalid_np_falls_back_to_sp_with_a_warning() -> None:
    parsed = record("v=DMARC1; p=reject; sp=quarantine; np=never")
    assert parsed.np == "quarantine"
    assert parsed.warnings == ("np=never is not one of none/quarantine/reject; using quarantine",)


# -- adkim=, aspf= (r default), psd= (u default), t= (n default) ----------------------------
@pytest.mark.parametrize("tag", ["adkim", "aspf"])
@pytest.mark.parametrize(("value", "expected"), [("r", "r"), ("s", "s"), ("S", "s"), ("R", "r")])
def test_alignment_modes(tag: str, value: str, expected: str) -> None:
    parsed = record(f"v=DMARC1; p=none; {tag}={value}")
    assert getattr(parsed, tag) == expected
    assert parsed.warnings == ()


@pytest.mark.parametrize("tag", ["adkim", "aspf"])
@pytest.mark.parametrize("value", ["x", "strict", "relaxed", "rs", ""])
def test_invalid_alignment_mode_is_relaxed_with_a_warning(tag: str, value: str) -> None:
    parsed = record(f"v=DMARC1; p=none; {tag}={value}")
    assert getattr(parsed, tag) == "r"
    assert parsed.warnings == (f"{tag}={value} is not one of r/s; using r",)


@pytest.mark.parametrize(("value", "expected"), [("y", "y"), ("n", "n"), ("u", "u"), ("Y", "y")])
def test_psd_values(value: str, expected: str) -> None:
    assert record(f"v=DMARC1; p=none; psd={value}").psd == expected


def test_psd_invalid_is_u_with_a_warning() -> None:
    parsed = record("v=DMARC1; p=none; psd=yes")
    assert parsed.psd == "u"
    assert parsed.warnings == ("psd=yes is not one of y/n/u; using u",)


@pytest.mark.parametrize(("value", "testing"), [("y", True), ("Y", True), ("n", False),
                                               ("N", False)])
def test_t_values(value: str, testing: bool) -> None:
    parsed = record(f"v=DMARC1; p=reject; t={value}")
    assert parsed.testing is testing
    assert parsed.warnings == ()


def test_t_invalid_is_n_with_a_warning() -> None:
    parsed = record("v=DMARC1; p=reject; t=maybe")
    assert parsed.testing is False
    assert parsed.warnings == ("t=maybe is not one of y/n; using n",)


def test_defaults_of_a_minimal_record() -> None:
    parsed = record("v=DMARC1; p=quarantine")
    assert (parsed.adkim, parsed.aspf, parsed.psd, parsed.testing) == ("r", "r", "u", False)
    assert (parsed.rua, parsed.ruf, parsed.fo) == ((), (), "0")
    assert parsed.p_explicit and parsed.warnings == ()


# -- fo= ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "1", "d", "s", "0:d", "1:d:s", "d:s"])
def test_fo_valid_values_are_kept(value: str) -> None:
    parsed = record(f"v=DMARC1; p=none; ruf=mailto:f@example.com; fo={value}")
    assert parsed.fo == value
    assert parsed.warnings == ()


def test_fo_invalid_value_falls_back_to_0_with_a_warning() -> None:
    parsed = record("v=DMARC1; p=none; ruf=mailto:f@example.com; fo=x")
    assert parsed.fo == "0"
    assert parsed.warnings


# -- rua=, ruf= (§4.7, §4.8: mailto: URIs, obsolete !size suffix) --------------------------
@pytest.mark.parametrize("uri", [
    "mailto:dmarc@example.com",
    "MAILTO:dmarc@example.com",
    "mailto:dmarc+reports@sub.example.co.uk",
    "mailto:dmarc@example.com!10m",
    "mailto:dmarc@example.com!10M",
    "mailto:dmarc@example.com!500k",
    "mailto:dmarc@example.com!1g",
    "mailto:dmarc@example.com!2t",
    "mailto:dmarc@example.com!1000",
])
@pytest.mark.parametrize("tag", ["rua", "ruf"])
def test_valid_mailto_uris(tag: str, uri: str) -> None:
    parsed = record(f"v=DMARC1; p=none; {tag}={uri}")
    assert getattr(parsed, tag) == (uri,)
    assert parsed.warnings == ()


def test_uri_list_with_whitespace_around_commas() -> None:
    parsed = record("v=DMARC1; p=none; rua=mailto:a@example.com!10m ,  mailto:b@example.org,"
                    "mailto:c@example.net")
    assert parsed.rua == ("mailto:a@example.com!10m", "mailto:b@example.org",
                          "mailto:c@example.net")


@pytest.mark.parametrize("uri", [
    "dmarc@example.com",  # no scheme
    "https://example.com/reports",  # scheme we do not send to
    "mailto:",
    "mailto:dmarc",
    "mailto:@example.com",
    "mailto:dmarc@localhost",
    "mailto:dmarc@example.com!",
    "mailto:dmarc@example.com!m",
    "mailto:dmarc@example.com!10x",
])
@pytest.mark.parametrize("tag", ["rua", "ruf"])
def test_invalid_uris_are_ignored_with_a_warning(tag: str, uri: str) -> None:
    parsed = record(f"v=DMARC1; p=none; {tag}={uri}, mailto:ok@example.com")
    assert getattr(parsed, tag) == ("mailto:ok@example.com",)
    assert parsed.warnings == (f"{tag}= URI {uri!r} is not a valid mailto: URI; ignored",)


def test_empty_uri_list_entries_are_skipped() -> None:
    parsed = record("v=DMARC1; p=none; rua=,mailto:a@example.com,,")
    assert parsed.rua == ("mailto:a@example.com",)
    assert parsed.warnings == ()


def test_mailto_with_an_a_label_tld_is_valid() -> None:
    assert record("v=DMARC1; p=none; rua=mailto:d@example.xn--p1ai").rua == (
        "mailto:d@example.xn--p1ai",)


# -- tags: unknown, removed, duplicate, malformed, whitespace, case ------------------------
def test_unknown_tags_are_ignored_with_a_warning() -> None:
    parsed = record("v=DMARC1; p=reject; foo=bar; x_1=2")
    assert parsed.p == "reject"
    assert parsed.warnings == ("unknown tag foo= ignored", "unknown tag x_1= ignored")


@pytest.mark.parametrize(("tag", "value"), [("pct", "50"), ("rf", "afrf"), ("ri", "3600"),
                                            ("pct", "0"), ("pct", "bogus")])
def test_removed_tags_are_ignored_with_a_warning(tag: str, value: str) -> None:
    parsed = record(f"v=DMARC1; p=reject; {tag}={value}")
    assert parsed.p == "reject" and parsed.sp == "reject"  # pct=0 does not soften anything
    legacy = " (dmarc.mode: legacy honours it)" if tag in ("pct", "rf") else ""
    warnings = (f"{tag}= was removed by RFC 9989 and is ignored{legacy}",)
    if value == "bogus":
        warnings += ("pct=bogus is not an integer from 0 to 100; using 100",)
    assert parsed.warnings == warnings


def test_all_removed_tags_warn_in_order() -> None:
    parsed = record("v=DMARC1; ri=86400; p=none; rf=afrf; pct=100")
    assert parsed.warnings == ("pct= was removed by RFC 9989 and is ignored "
                               "(dmarc.mode: legacy honours it)",
                               "rf= was removed by RFC 9989 and is ignored "
                               "(dmarc.mode: legacy honours it)",
                               "ri= was removed by RFC 9989 and is ignored")


def test_rf_lists_the_failure_report_formats_for_legacy_mode() -> None:
    assert record("v=DMARC1; p=none").rf == ("afrf",)  # RFC 7489 §6.3 default
    assert record("v=DMARC1; p=none; rf=AFRF:iodef").rf == ("afrf", "iodef")
    assert record("v=DMARC1; p=none; rf=iodef").rf == ("iodef",)


def test_duplicate_tag_first_one_counts_with_a_warning() -> None:
    parsed = record("v=DMARC1; p=reject; p=none")
    assert parsed.p == "reject"
    assert parsed.warnings == ("tag p= repeated; the first one counts",)


def test_duplicate_tag_name_is_case_insensitive() -> None:
    parsed = record("v=DMARC1; p=none; ADKIM=s; adkim=r")
    assert parsed.adkim == "s"
    assert parsed.warnings == ("tag adkim= repeated; the first one counts",)


@pytest.mark.parametrize("part", ["garbage", "=x", "1p=reject", "p reject"])
def test_malformed_tags_are_ignored_with_a_warning(part: str) -> None:
    parsed = record(f"v=DMARC1; p=quarantine; {part}")
    assert parsed.p == "quarantine"
    assert parsed.warnings == (f"malformed tag {part!r} ignored",)


def test_empty_parts_are_ignored_silently() -> None:
    parsed = record("v=DMARC1;;  ; p=none;;")
    assert parsed.p == "none" and parsed.warnings == ()


def test_whitespace_around_tags_and_values() -> None:
    parsed = record("v=DMARC1 ;  p = reject ;\tsp\t=\tnone ; adkim= s ;aspf =s ; "
                    "rua = mailto:a@example.com ")
    assert (parsed.p, parsed.sp, parsed.adkim, parsed.aspf) == ("reject", "none", "s", "s")
    assert parsed.rua == ("mailto:a@example.com",)
    assert parsed.warnings == ()


def test_tag_names_are_case_insensitive() -> None:
    parsed = record("v=DMARC1; P=reject; SP=none; Adkim=s")
    assert (parsed.p, parsed.sp, parsed.adkim) == ("reject", "none", "s")


def test_the_order_of_tags_after_v_does_not_matter() -> None:
    a = record("v=DMARC1; p=reject; sp=none; adkim=s; rua=mailto:a@example.com")
    b = record("v=DMARC1; rua=mailto:a@example.com; adkim=s; sp=none; p=reject")
    assert (a.p, a.sp, a.adkim, a.rua) == (b.p, b.sp, b.adkim, b.rua)


def test_every_problem_gives_its_own_warning() -> None:
    parsed = record("v=DMARC1; p=reject; pct=20; sp=maybe; adkim=x; foo=1; sp=none; "
                    "rua=mailto:bad, mailto:ok@example.com; junk")
    assert set(parsed.warnings) == {
        "malformed tag 'junk' ignored",
        "tag sp= repeated; the first one counts",
        "pct= was removed by RFC 9989 and is ignored (dmarc.mode: legacy honours it)",
        "unknown tag foo= ignored",
        "rua= URI 'mailto:bad' is not a valid mailto: URI; ignored",
        "sp=maybe is not one of none/quarantine/reject; using reject",
        "adkim=x is not one of r/s; using r",
    }
    assert (parsed.sp, parsed.adkim, parsed.rua) == ("reject", "r", ("mailto:ok@example.com",))


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60))
def test_parse_never_raises_and_p_is_always_a_policy(tail: str) -> None:
    parsed = parse("v=DMARC1; " + tail)
    if isinstance(parsed, DmarcRecord):
        assert parsed.p in POLICIES and parsed.sp in POLICIES and parsed.np in POLICIES
        assert parsed.adkim in ("r", "s") and parsed.aspf in ("r", "s")
        assert parsed.psd in ("y", "n", "u")
