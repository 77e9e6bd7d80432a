"""Policy discovery and the Organizational Domain (RFC 9989 §4.10 DNS Tree Walk, §4.10.1,
§4.10.2; legacy RFC 7489 §3.2 with the Public Suffix List): `walk_names`, `fetch`, `Discovery`
and `legacy_organizational_domain`, with the in-memory DNS of fakedns.py."""

from __future__ import annotations

from typing import Any

import pytest

from mailwarden.dmarc.orgdomain import (
    MAX_QUERIES,
    Discovery,
    TemporaryError,
    fetch,
    legacy_organizational_domain,
    walk_names,
)

from fakedns import TEMPERROR, FakeDNS


def name_of(labels: int) -> str:
    """A domain of `labels` labels: l<n>. ... .l2.com."""
    return ".".join([f"l{i}" for i in range(labels, 1, -1)] + ["com"])


def expected_walk(domain: str) -> list[str]:
    """§4.10 steps 1-7, written independently of the code under test."""
    labels = domain.split(".")
    names = [domain]
    # step 4: x < 8 drops one label; x >= 8 drops labels until 7 remain
    keep = 7 if len(labels) >= 8 else len(labels) - 1
    labels = labels[len(labels) - keep:]
    while labels:
        names.append(".".join(labels))
        labels = labels[1:]
    return names


def dmarc_zone(records: dict[str, str | list[str]], **extra: Any) -> FakeDNS:
    zone: dict[str, Any] = {}
    for domain, text in records.items():
        if text == TEMPERROR:
            zone[f"_dmarc.{domain}"] = TEMPERROR
        else:
            zone[f"_dmarc.{domain}"] = {"TXT": [text] if isinstance(text, str) else text}
    zone.update(extra)
    return FakeDNS(zone)


def txt_queries(dns: FakeDNS) -> list[str]:
    return [name.removeprefix("_dmarc.") for name, rdtype in dns.queries if rdtype == "TXT"]


# -- walk_names (§4.10) ----------------------------------------------------------------------
@pytest.mark.parametrize("labels", range(1, 13))
def test_walk_names_for_1_to_12_labels(labels: int) -> None:
    domain = name_of(labels)
    names = walk_names(domain)
    assert names == expected_walk(domain)
    assert len(names) == min(labels, MAX_QUERIES) == min(labels, 8)
    assert names[0] == domain
    assert names[-1] == "com"
    if labels >= 8:  # the second query jumps to the last 7 labels
        assert names[1].count(".") + 1 == 7
    assert len(set(names)) == len(names)


def test_walk_names_rfc_example_of_thirteen_labels() -> None:
    assert walk_names("a.b.c.d.e.f.g.h.i.j.mail.example.com") == [
        "a.b.c.d.e.f.g.h.i.j.mail.example.com",
        "g.h.i.j.mail.example.com",
        "h.i.j.mail.example.com",
        "i.j.mail.example.com",
        "j.mail.example.com",
        "mail.example.com",
        "example.com",
        "com",
    ]


def test_walk_names_rfc_example_of_a_zone_cut_that_is_never_queried() -> None:
    # §5.1.8: b.c.d.e.f.g.example.com is skipped by the jump
    names = walk_names("mail.a.b.c.d.e.f.g.example.com")
    assert names == ["mail.a.b.c.d.e.f.g.example.com", "c.d.e.f.g.example.com",
                     "d.e.f.g.example.com", "e.f.g.example.com", "f.g.example.com",
                     "g.example.com", "example.com", "com"]
    assert "b.c.d.e.f.g.example.com" not in names


def test_walk_names_lower_cases_and_drops_the_trailing_dot() -> None:
    assert walk_names("A.Mail.Example.COM.") == ["a.mail.example.com", "mail.example.com",
                                                 "example.com", "com"]


# -- fetch (§4.10 step 2: non-DMARC records dropped, several DMARC records = none) -----------
def test_fetch_ignores_other_txt_records() -> None:
    dns = dmarc_zone({"example.com": ["v=spf1 -all", "v=DMARC1; p=reject", "hello"]})
    found = fetch(dns, "example.com")
    assert found is not None and found.p == "reject"
    assert dns.queries == [("_dmarc.example.com", "TXT")]


@pytest.mark.parametrize("texts", [
    ["v=DMARC1; p=reject", "v=DMARC1; p=none"],
    ["v=DMARC1; p=reject", "v=DMARC1; p=reject"],
    ["v=DMARC1; p=reject", "v=DMARC1; p=bogus"],
])
def test_fetch_several_dmarc_records_mean_none(texts: list[str]) -> None:
    assert fetch(dmarc_zone({"example.com": texts}), "example.com") is None


def test_fetch_txt_record_of_several_strings_is_joined() -> None:
    dns = FakeDNS({"_dmarc.example.com": {"TXT": [("v=DMARC1; p=re", "ject")]}})
    found = fetch(dns, "example.com")
    assert found is not None and found.p == "reject"


@pytest.mark.parametrize("zone", [
    {},  # NXDOMAIN
    {"_dmarc.example.com": {"A": ["192.0.2.1"]}},  # NODATA
    {"_dmarc.example.com": {"TXT": ["v=DMARC1; p=bogus"]}},  # no usable record
    {"_dmarc.example.com": {"TXT": ["v=spf1 -all"]}},
])
def test_fetch_no_record(zone: dict[str, Any]) -> None:
    assert fetch(FakeDNS(zone), "example.com") is None


@pytest.mark.parametrize("entry", [TEMPERROR, {"TXT": TEMPERROR}])
def test_fetch_temporary_error_raises(entry: Any) -> None:
    with pytest.raises(TemporaryError, match=r"_dmarc\.example\.com"):
        fetch(FakeDNS({"_dmarc.example.com": entry}), "example.com")


def test_fetch_passes_the_deadline_on() -> None:
    dns = dmarc_zone({"example.com": "v=DMARC1; p=none"})
    fetch(dns, "example.com", 123.0)
    assert dns.deadlines == [123.0]


# -- Discovery.policy (§4.10.1) -------------------------------------------------------------
def test_policy_at_the_author_domain_takes_one_query() -> None:
    dns = dmarc_zone({"mail.example.com": "v=DMARC1; p=quarantine",
                      "example.com": "v=DMARC1; p=reject"})
    discovery = Discovery(dns)
    found = discovery.policy("mail.example.com")
    assert found is not None
    assert (found.domain, found.record.p) == ("mail.example.com", "quarantine")
    assert txt_queries(dns) == ["mail.example.com"]
    assert discovery.queries == 1


def test_policy_is_the_first_record_found_while_walking_up() -> None:
    dns = dmarc_zone({"mail.example.com": "v=DMARC1; p=quarantine",
                      "example.com": "v=DMARC1; p=reject"})
    found = Discovery(dns).policy("a.b.mail.example.com")
    assert found is not None
    assert (found.domain, found.record.p) == ("mail.example.com", "quarantine")
    assert txt_queries(dns) == ["a.b.mail.example.com", "b.mail.example.com",
                                "mail.example.com"]


def test_policy_falls_back_to_the_organizational_domain() -> None:
    dns = dmarc_zone({"example.com": "v=DMARC1; p=reject"})
    found = Discovery(dns).policy("a.b.mail.example.com")
    assert found is not None and found.domain == "example.com"


def test_policy_from_a_public_suffix_domain() -> None:
    dns = dmarc_zone({"example": "v=DMARC1; p=reject; psd=y"})
    found = Discovery(dns).policy("brand.example")
    assert found is not None and (found.domain, found.record.psd) == ("example", "y")


def test_policy_skips_an_unusable_record_and_goes_on() -> None:
    # a v=DMARC1 record with no valid p= and no rua= is no record (see the report about
    # RFC 9989 §4.10.1 "applies no DMARC processing")
    dns = dmarc_zone({"mail.example.com": "v=DMARC1; p=bogus", "example.com": "v=DMARC1; p=none"})
    found = Discovery(dns).policy("mail.example.com")
    assert found is not None and found.domain == "example.com"


@pytest.mark.parametrize("labels", range(1, 13))
def test_policy_without_any_record_queries_at_most_8_names(labels: int) -> None:
    dns = FakeDNS()
    discovery = Discovery(dns)
    assert discovery.policy(name_of(labels)) is None
    assert txt_queries(dns) == expected_walk(name_of(labels))
    assert dns.count(rdtype="TXT") == discovery.queries == min(labels, 8)


def test_policy_record_at_the_jump_target_of_a_long_domain() -> None:
    domain = name_of(12)
    target = walk_names(domain)[1]
    dns = dmarc_zone({target: "v=DMARC1; p=reject"})
    found = Discovery(dns).policy(domain)
    assert found is not None and found.domain == target
    assert dns.count(rdtype="TXT") == 2


def test_policy_temporary_error_raises() -> None:
    dns = dmarc_zone({"example.com": TEMPERROR})
    with pytest.raises(TemporaryError):
        Discovery(dns).policy("a.example.com")
    assert txt_queries(dns) == ["a.example.com", "example.com"]


def test_policy_temporary_error_after_a_found_record_is_not_reached() -> None:
    dns = dmarc_zone({"example.com": "v=DMARC1; p=none", "com": TEMPERROR})
    found = Discovery(dns).policy("example.com")
    assert found is not None and found.domain == "example.com"


def test_policy_deadline_reaches_every_query() -> None:
    dns = FakeDNS()
    Discovery(dns, deadline=99.0).policy("a.b.example.com")
    assert dns.deadlines == [99.0] * 4


# -- legacy mode (RFC 7489 §6.6.3: the domain, then the PSL Organizational Domain) ---------
def test_legacy_policy_looks_at_domain_then_psl_org_domain_only() -> None:
    dns = dmarc_zone({"b.example.co.uk": "v=DMARC1; p=quarantine",
                      "example.co.uk": "v=DMARC1; p=reject", "co.uk": "v=DMARC1; p=none"})
    found = Discovery(dns, "legacy").policy("a.b.example.co.uk")
    assert found is not None and (found.domain, found.record.p) == ("example.co.uk", "reject")
    assert txt_queries(dns) == ["a.b.example.co.uk", "example.co.uk"]


def test_legacy_policy_of_an_org_domain_is_one_query() -> None:
    dns = FakeDNS()
    assert Discovery(dns, "legacy").policy("example.co.uk") is None
    assert txt_queries(dns) == ["example.co.uk"]


def test_legacy_policy_ignores_a_public_suffix_record() -> None:
    dns = dmarc_zone({"co.uk": "v=DMARC1; p=reject; psd=y"})
    assert Discovery(dns, "legacy").policy("a.example.co.uk") is None
    assert txt_queries(dns) == ["a.example.co.uk", "example.co.uk"]


def test_legacy_organizational_domain_makes_no_query() -> None:
    dns = dmarc_zone({"example.com": "v=DMARC1; p=none; psd=n"})
    assert Discovery(dns, "legacy").organizational_domain("a.b.example.com") == "example.com"
    assert dns.queries == []


@pytest.mark.parametrize(("domain", "org"), [
    ("example.com", "example.com"),
    ("a.b.example.com", "example.com"),
    ("example.co.uk", "example.co.uk"),
    ("a.b.example.co.uk", "example.co.uk"),
    ("Mail.Example.CO.UK.", "example.co.uk"),
    ("co.uk", "co.uk"),  # a public suffix is its own
    ("com", "com"),
    # private section of the shipped PSL
    ("foo.github.io", "foo.github.io"),
    ("a.b.foo.github.io", "foo.github.io"),
    ("github.io", "github.io"),
    ("x.blogspot.com", "x.blogspot.com"),
    ("www.x.blogspot.com", "x.blogspot.com"),
    ("blogspot.com", "blogspot.com"),
    # wildcard and exception rules (*.kawasaki.jp, !city.kawasaki.jp)
    ("a.b.kawasaki.jp", "a.b.kawasaki.jp"),
    ("x.city.kawasaki.jp", "city.kawasaki.jp"),
])
def test_legacy_organizational_domain(domain: str, org: str) -> None:
    assert legacy_organizational_domain(domain) == org


# -- organizational_domain (§4.10.2) --------------------------------------------------------
@pytest.mark.parametrize(("records", "domain", "org", "queried"), [
    # no record anywhere: the domain itself
    ({}, "a.mail.example.com", "a.mail.example.com",
     ["a.mail.example.com", "mail.example.com", "example.com", "com"]),
    # the record with the fewest labels (RFC example)
    ({"mail.example.com": "v=DMARC1; p=none", "example.com": "v=DMARC1; p=none"},
     "a.mail.example.com", "example.com",
     ["a.mail.example.com", "mail.example.com", "example.com", "com"]),
    # only the start domain has a record
    ({"a.mail.example.com": "v=DMARC1; p=none"}, "a.mail.example.com", "a.mail.example.com",
     ["a.mail.example.com", "mail.example.com", "example.com", "com"]),
    # psd=n stops the walk: that domain (RFC example)
    ({"mail.example.com": "v=DMARC1; p=none; psd=n", "example.com": "v=DMARC1; p=none"},
     "a.mail.example.com", "mail.example.com", ["a.mail.example.com", "mail.example.com"]),
    # psd=n at the start domain
    ({"a.mail.example.com": "v=DMARC1; p=none; psd=n", "example.com": "v=DMARC1; p=none"},
     "a.mail.example.com", "a.mail.example.com", ["a.mail.example.com"]),
    # psd=y: one label below it (RFC example: only _dmarc.com, psd=y)
    ({"com": "v=DMARC1; p=none; psd=y"}, "a.mail.example.com", "example.com",
     ["a.mail.example.com", "mail.example.com", "example.com", "com"]),
    # psd=y at example.com (RFC example): mail.example.com
    ({"example.com": "v=DMARC1; p=reject; psd=y"}, "a.mail.example.com", "mail.example.com",
     ["a.mail.example.com", "mail.example.com", "example.com"]),
    # psd=y stops the walk before a lower record with fewer labels
    ({"example.com": "v=DMARC1; p=none; psd=y", "com": "v=DMARC1; p=none"},
     "mail.example.com", "mail.example.com", ["mail.example.com", "example.com"]),
    # psd=y at the start domain: it stops there and is its own Organizational Domain
    ({"example.com": "v=DMARC1; p=none; psd=y", "com": "v=DMARC1; p=none"},
     "example.com", "example.com", ["example.com"]),
    # a psd=u record below a PSD record: the walk goes on to the psd=y record
    ({"mail.example.com": "v=DMARC1; p=none", "com": "v=DMARC1; p=none; psd=y"},
     "a.mail.example.com", "example.com",
     ["a.mail.example.com", "mail.example.com", "example.com", "com"]),
    # several records at one name count as none
    ({"example.com": ["v=DMARC1; p=none", "v=DMARC1; p=reject"],
      "mail.example.com": "v=DMARC1; p=none"},
     "a.mail.example.com", "mail.example.com",
     ["a.mail.example.com", "mail.example.com", "example.com", "com"]),
])
def test_organizational_domain(records: dict[str, Any], domain: str, org: str,
                               queried: list[str]) -> None:
    dns = dmarc_zone(records)
    assert Discovery(dns).organizational_domain(domain) == org
    assert txt_queries(dns) == queried


def test_organizational_domain_normalizes_its_input() -> None:
    dns = dmarc_zone({"example.com": "v=DMARC1; p=none"})
    assert Discovery(dns).organizational_domain("A.Mail.Example.COM.") == "example.com"


def test_organizational_domain_of_a_long_domain_psd_y_at_the_jump_target() -> None:
    domain = name_of(10)
    target = walk_names(domain)[1]  # 7 labels
    dns = dmarc_zone({target: "v=DMARC1; p=none; psd=y"})
    org = Discovery(dns).organizational_domain(domain)
    assert org == ".".join(domain.split(".")[-8:])  # one label below, from the author domain
    assert org.endswith("." + target)
    assert dns.count(rdtype="TXT") == 2


@pytest.mark.parametrize("labels", range(1, 13))
def test_organizational_domain_walk_never_exceeds_8_queries(labels: int) -> None:
    dns = FakeDNS()
    assert Discovery(dns).organizational_domain(name_of(labels)) == name_of(labels)
    assert dns.count(rdtype="TXT") == min(labels, 8)


def test_discovery_caches_answers_between_policy_and_org_domain() -> None:
    dns = dmarc_zone({"example.com": "v=DMARC1; p=none"})
    discovery = Discovery(dns)
    discovery.policy("a.b.example.com")
    assert discovery.organizational_domain("a.b.example.com") == "example.com"
    assert discovery.organizational_domain("b.example.com") == "example.com"
    assert txt_queries(dns) == ["a.b.example.com", "b.example.com", "example.com", "com"]
    assert discovery.queries == 4


def test_organizational_domain_temporary_error_raises() -> None:
    dns = dmarc_zone({"example.com": "v=DMARC1; p=none", "com": TEMPERROR})
    with pytest.raises(TemporaryError):
        Discovery(dns).organizational_domain("mail.example.com")


# -- aligned (§4.4, §3.2.10) ------------------------------------------------------------------
ALIGN_ZONE = {"example.com": "v=DMARC1; p=reject", "example.net": "v=DMARC1; p=none"}


@pytest.mark.parametrize(("identifier", "author", "mode", "aligned"), [
    ("sub.example.com", "example.com", "r", True),
    ("sub.example.com", "example.com", "s", False),
    ("example.com", "sub.example.com", "r", True),
    ("example.com", "sub.example.com", "s", False),
    ("foo.example.com", "news.example.com", "r", True),  # RFC Table 1
    ("news.example.com", "news.example.com", "s", True),
    ("foo.example.net", "news.example.com", "r", False),
    ("example.com", "example.com", "s", True),
    ("EXAMPLE.com.", "example.COM", "s", True),  # case-insensitive (RFC 4343)
    ("Sub.Example.Com", "example.com", "r", True),
    ("example.net", "example.com", "r", False),
    ("evilexample.com", "example.com", "r", False),
    ("com", "example.com", "r", False),
    ("", "example.com", "r", False),
    ("", "example.com", "s", False),
    ("", "", "s", False),
])
def test_aligned(identifier: str, author: str, mode: str, aligned: bool) -> None:
    assert Discovery(dmarc_zone(ALIGN_ZONE)).aligned(identifier, author, mode) is aligned


def test_strict_alignment_needs_no_query() -> None:
    dns = dmarc_zone(ALIGN_ZONE)
    discovery = Discovery(dns)
    assert not discovery.aligned("a.example.com", "example.com", "s")
    assert discovery.aligned("example.com", "example.com", "r")
    assert dns.queries == []


def test_relaxed_alignment_under_a_public_suffix_domain() -> None:
    dns = dmarc_zone({"example": "v=DMARC1; p=reject; psd=y"})
    discovery = Discovery(dns)
    assert discovery.aligned("mail.brand.example", "brand.example", "r")
    assert discovery.aligned("a.brand.example", "b.brand.example", "r")
    assert not discovery.aligned("other.example", "brand.example", "r")


def test_relaxed_alignment_across_a_psd_n_boundary() -> None:
    dns = dmarc_zone({"example.com": "v=DMARC1; p=none",
                      "dept.example.com": "v=DMARC1; p=none; psd=n"})
    discovery = Discovery(dns)
    assert discovery.aligned("mail.dept.example.com", "dept.example.com", "r")
    assert not discovery.aligned("mail.dept.example.com", "example.com", "r")
    assert discovery.aligned("other.example.com", "example.com", "r")


@pytest.mark.parametrize(("identifier", "author", "aligned"), [
    ("bounce.example.co.uk", "example.co.uk", True),
    ("a.foo.github.io", "foo.github.io", True),
    ("foo.github.io", "bar.github.io", False),  # private-section suffix: different owners
    ("a.blogspot.com", "b.blogspot.com", False),
    ("example.co.uk", "other.co.uk", False),
])
def test_relaxed_alignment_in_legacy_mode_uses_the_psl(identifier: str, author: str,
                                                       aligned: bool) -> None:
    dns = FakeDNS()
    assert Discovery(dns, "legacy").aligned(identifier, author, "r") is aligned
    assert dns.queries == []
