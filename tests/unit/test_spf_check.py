"""check_host() (RFC 7208 §4, §5, §6), identity selection (§2.3, §2.4) and Received-SPF (§9.1),
all through the in-memory DNS of fakedns.py."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import pytest

from mailwarden.spf import Limits, Result, SPFResult, check_helo, check_host, check_mailfrom
from mailwarden.spf.received import received_spf

from fakedns import FakeDNS

CLIENT = "192.0.2.1"
CLIENT6 = "2001:db8::1"
PTR4 = "1.2.0.192.in-addr.arpa"
SENDER = "user@example.com"
HELO = "mail.example.org"


def run(
    zone: dict[str, Any],
    ip: str = CLIENT,
    domain: str = "example.com",
    sender: str = SENDER,
    *,
    authentic: tuple[str, ...] = (),
    **kwargs: Any,
) -> tuple[SPFResult, FakeDNS]:
    dns = FakeDNS(zone, authentic=authentic)
    result = check_host(dns, ip, domain, sender, helo=HELO, **kwargs)
    return result, dns


def spf(record: str, **extra: Any) -> dict[str, Any]:
    """A zone where example.com publishes `record`, plus `extra` names."""
    zone: dict[str, Any] = {"example.com": {"TXT": [record]}}
    zone.update(extra)
    return zone


def result_of(record: str, ip: str = CLIENT, **extra: Any) -> Result:
    return run(spf(record, **extra), ip=ip)[0].result


# -- §2.6 / §4.6.2: results and qualifiers ------------------------------------------------------

@pytest.mark.parametrize(
    ("record", "result"),
    [("v=spf1 all", Result.PASS), ("v=spf1 +all", Result.PASS), ("v=spf1 -all", Result.FAIL),
     ("v=spf1 ~all", Result.SOFTFAIL), ("v=spf1 ?all", Result.NEUTRAL),
     ("V=SPF1 -ALL", Result.FAIL)],
)
def test_s5_1_all_with_each_qualifier(record: str, result: Result) -> None:
    res, _ = run(spf(record))
    assert res.result is result
    assert res.mechanism == record.split()[1]
    assert res.mechanism in res.cause
    assert res.lookups == 0


def test_s4_7_no_match_is_neutral_with_no_mechanism() -> None:
    res, _ = run(spf("v=spf1 ip4:198.51.100.1"))
    assert res.result is Result.NEUTRAL
    assert res.mechanism is None
    assert "4.7" in res.cause


def test_s4_6_2_first_matching_directive_wins() -> None:
    res, dns = run(spf("v=spf1 ~ip4:192.0.2.0/24 -ip4:192.0.2.1 +all a:never.example.com"))
    assert res.result is Result.SOFTFAIL
    assert res.mechanism == "~ip4:192.0.2.0/24"
    # nothing after the match is evaluated
    assert dns.queries == [("example.com", "TXT")]


# -- §5.6 ip4 / ip6 ---------------------------------------------------------------------

@pytest.mark.parametrize(
    ("record", "ip", "result"),
    [("v=spf1 ip4:192.0.2.1 -all", CLIENT, Result.PASS),
     ("v=spf1 ip4:192.0.2.2 -all", CLIENT, Result.FAIL),
     ("v=spf1 ip4:192.0.2.0/24 -all", CLIENT, Result.PASS),
     ("v=spf1 ip4:192.0.3.0/24 -all", CLIENT, Result.FAIL),
     ("v=spf1 ip4:0.0.0.0/0 -all", CLIENT, Result.PASS),
     ("v=spf1 ip6:2001:db8::1 -all", CLIENT6, Result.PASS),
     ("v=spf1 ip6:2001:db8::/32 -all", CLIENT6, Result.PASS),
     ("v=spf1 ip6:2001:db9::/32 -all", CLIENT6, Result.FAIL),
     ("v=spf1 ip6:::/0 -all", CLIENT, Result.FAIL),
     ("v=spf1 ip4:0.0.0.0/0 -all", CLIENT6, Result.FAIL),
     ("v=spf1 -ip6:::/0 ip4:192.0.2.1 ~all", CLIENT, Result.PASS)],
)
def test_s5_6_ip_mechanisms(record: str, ip: str, result: Result) -> None:
    res, dns = run(spf(record), ip=ip)
    assert res.result is result
    assert res.lookups == 0
    assert dns.queries == [("example.com", "TXT")]


# -- §5.3 a ---------------------------------------------------------------------------------

def test_s5_3_a_matches_current_domain() -> None:
    res, dns = run(spf("v=spf1 a -all") | {"example.com": {"TXT": ["v=spf1 a -all"],
                                                          "A": ["198.51.100.9", CLIENT]}})
    assert res.result is Result.PASS
    assert res.mechanism == "a"
    assert ("example.com", "A") in dns.queries
    assert res.lookups == 1


def test_s5_3_a_not_matching() -> None:
    res, _ = run({"example.com": {"TXT": ["v=spf1 a -all"], "A": ["192.0.2.2"]}})
    assert res.result is Result.FAIL
    assert res.mechanism == "-all"
    assert res.lookups == 1


def test_s5_3_a_with_domain_and_cidr4() -> None:
    zone = spf("v=spf1 a:web.example.com/24 -all", **{"web.example.com": {"A": ["192.0.2.200"]}})
    assert run(zone)[0].result is Result.PASS
    zone = spf("v=spf1 a:web.example.com/25 -all", **{"web.example.com": {"A": ["192.0.2.200"]}})
    assert run(zone)[0].result is Result.FAIL
    zone = spf("v=spf1 a:web.example.com/0 -all", **{"web.example.com": {"A": ["203.0.113.1"]}})
    assert run(zone)[0].result is Result.PASS


def test_s5_3_a_nxdomain_and_nodata_do_not_match_and_are_void() -> None:
    res, _ = run(spf("v=spf1 a:nx.example.com a:nodata.example.com ?all",
                     **{"nodata.example.com": {"MX": [(10, "mx.example.com")]}}))
    assert res.result is Result.NEUTRAL
    assert res.mechanism == "?all"
    assert res.void_lookups == 2
    assert res.lookups == 2


def test_s5_3_a_temperror() -> None:
    res, _ = run(spf("v=spf1 a:slow.example.com -all", **{"slow.example.com": "TEMPERROR"}))
    assert res.result is Result.TEMPERROR
    assert "'a:slow.example.com'" in res.cause
    assert "slow.example.com" in res.cause


def test_s5_3_a_temperror_only_on_that_type() -> None:
    zone = spf("v=spf1 a:half.example.com -all",
               **{"half.example.com": {"A": "TEMPERROR", "AAAA": ["2001:db8::1"]}})
    assert run(zone)[0].result is Result.TEMPERROR
    assert run(zone, ip=CLIENT6)[0].result is Result.PASS


def test_s5_3_a_with_macro_domain() -> None:
    zone = spf("v=spf1 a:%{l}.hosts.example.com -all",
               **{"user.hosts.example.com": {"A": [CLIENT]}})
    res, dns = run(zone)
    assert res.result is Result.PASS
    assert ("user.hosts.example.com", "A") in dns.queries


# -- §5.4 mx ---------------------------------------------------------------------------------

def _mx_zone(
    record: str, *addresses: str, mx: list[tuple[int, str]] | None = None
) -> dict[str, Any]:
    zone = spf(record)
    zone["example.com"]["MX"] = mx if mx is not None else [(10, "mx1.example.com"),
                                                           (20, "mx2.example.com")]
    zone["mx1.example.com"] = {"A": ["198.51.100.1"], "AAAA": ["2001:db8:1::1"]}
    zone["mx2.example.com"] = {"A": list(addresses) or ["198.51.100.2"],
                               "AAAA": ["2001:db8:2::2"]}
    return zone


def test_s5_4_mx_matches_an_exchange_address() -> None:
    res, dns = run(_mx_zone("v=spf1 mx -all", CLIENT))
    assert res.result is Result.PASS
    assert res.mechanism == "mx"
    assert res.lookups == 1
    assert dns.count("example.com", "MX") == 1
    assert dns.count(rdtype="AAAA") == 0


def test_s5_4_mx_not_matching() -> None:
    res, dns = run(_mx_zone("v=spf1 mx -all"))
    assert res.result is Result.FAIL
    assert dns.count("mx1.example.com", "A") == 1
    assert dns.count("mx2.example.com", "A") == 1


def test_s5_4_mx_cidr4() -> None:
    assert run(_mx_zone("v=spf1 mx/24 -all", "192.0.2.99"))[0].result is Result.PASS
    assert run(_mx_zone("v=spf1 mx/32 -all", "192.0.2.99"))[0].result is Result.FAIL


def test_s5_4_mx_of_other_domain() -> None:
    zone = spf("v=spf1 mx:example.net -all",
               **{"example.net": {"MX": [(0, "smtp.example.net")]},
                  "smtp.example.net": {"A": [CLIENT]}})
    assert run(zone)[0].result is Result.PASS


def test_s5_4_mx_without_records_is_void_and_no_match() -> None:
    res, _ = run(spf("v=spf1 mx ?all"))
    assert res.result is Result.NEUTRAL
    assert res.void_lookups == 1


def test_s5_4_null_mx_is_ignored() -> None:
    res, dns = run(_mx_zone("v=spf1 mx -all", mx=[(0, ".")]))
    assert res.result is Result.FAIL
    assert dns.count(rdtype="A") == 0


def test_s5_4_mx_exchange_without_address_does_not_match() -> None:
    zone = spf("v=spf1 mx -all")
    zone["example.com"]["MX"] = [(10, "gone.example.com"), (20, "ok.example.com")]
    zone["ok.example.com"] = {"A": [CLIENT]}
    assert run(zone)[0].result is Result.PASS


def test_s5_4_mx_temperror() -> None:
    zone = spf("v=spf1 mx -all")
    zone["example.com"]["MX"] = "TEMPERROR"
    assert run(zone)[0].result is Result.TEMPERROR
    zone = _mx_zone("v=spf1 mx -all")
    zone["mx1.example.com"] = "TEMPERROR"
    res, _ = run(zone)
    assert res.result is Result.TEMPERROR
    assert "'mx'" in res.cause
    assert "mx1.example.com" in res.cause


def _mx_names(count: int, matching: int | None) -> dict[str, Any]:
    zone = spf("v=spf1 mx -all")
    zone["example.com"]["MX"] = [(i, f"mx{i:02d}.example.com") for i in range(count)]
    for i in range(count):
        address = CLIENT if i == matching else f"198.51.100.{i + 1}"
        zone[f"mx{i:02d}.example.com"] = {"A": [address]}
    return zone


def test_s4_6_4_ten_mx_names_are_fine() -> None:
    res, dns = run(_mx_names(10, matching=9))
    assert res.result is Result.PASS
    assert dns.count(rdtype="A") == 10


def test_s4_6_4_more_than_ten_mx_names_is_permerror() -> None:
    res, dns = run(_mx_names(11, matching=0))
    assert res.result is Result.PERMERROR
    assert "11 MX records" in res.cause
    assert "4.6.4" in res.cause
    assert dns.count(rdtype="A") == 0


def test_s4_6_4_mx_limit_cause_names_the_term() -> None:
    zone = _mx_names(11, matching=0)
    zone["example.com"]["TXT"] = ["v=spf1 mx:example.com -all"]
    res, _ = run(zone)
    assert res.result is Result.PERMERROR
    assert "mx:example.com" in res.cause


def test_s4_6_4_mx_limit_is_configurable() -> None:
    res, _ = run(_mx_names(3, matching=0), limits=Limits(mx_names=2))
    assert res.result is Result.PERMERROR


# -- §5.5 ptr ----------------------------------------------------------------------------

def _ptr_zone(record: str, names: list[str], forward: dict[str, list[str]]) -> dict[str, Any]:
    zone = spf(record)
    zone[PTR4] = {"PTR": names}
    for name, addresses in forward.items():
        zone[name] = {"A": addresses}
    return zone


def test_s5_5_ptr_matches_validated_subdomain() -> None:
    zone = _ptr_zone("v=spf1 ptr -all", ["mail.example.com"], {"mail.example.com": [CLIENT]})
    res, dns = run(zone)
    assert res.result is Result.PASS
    assert res.mechanism == "ptr"
    assert (PTR4, "PTR") in dns.queries
    assert res.lookups == 1


def test_s5_5_ptr_matches_domain_itself() -> None:
    zone = _ptr_zone("v=spf1 ptr -all", ["example.com"], {"example.com": [CLIENT]})
    zone["example.com"]["TXT"] = ["v=spf1 ptr -all"]
    assert run(zone)[0].result is Result.PASS


def test_s5_5_ptr_with_domain() -> None:
    zone = _ptr_zone("v=spf1 ptr:example.net -all", ["a.example.com", "b.example.net"],
                     {"a.example.com": [CLIENT], "b.example.net": [CLIENT]})
    res, dns = run(zone)
    assert res.result is Result.PASS
    assert dns.count("a.example.com", "A") == 0


def test_s5_5_ptr_name_must_validate_forward() -> None:
    zone = _ptr_zone("v=spf1 ptr -all", ["mail.example.com"],
                     {"mail.example.com": ["192.0.2.2"]})
    assert run(zone)[0].result is Result.FAIL


def test_s5_5_ptr_suffix_must_be_on_a_label_boundary() -> None:
    zone = _ptr_zone("v=spf1 ptr -all", ["mailexample.com", "example.com.evil.net"],
                     {"mailexample.com": [CLIENT], "example.com.evil.net": [CLIENT]})
    res, dns = run(zone)
    assert res.result is Result.FAIL
    assert dns.count(rdtype="A") == 0


def test_s5_5_ptr_dns_error_means_no_match() -> None:
    zone = spf("v=spf1 ptr ?all")
    zone[PTR4] = "TEMPERROR"
    res, _ = run(zone)
    assert res.result is Result.NEUTRAL
    assert res.mechanism == "?all"


def test_s5_5_ptr_forward_error_skips_the_name() -> None:
    zone = _ptr_zone("v=spf1 ptr -all", ["a.example.com", "b.example.com"],
                     {"b.example.com": [CLIENT]})
    zone["a.example.com"] = "TEMPERROR"
    assert run(zone)[0].result is Result.PASS


def test_s5_5_ptr_nxdomain_is_void() -> None:
    res, _ = run(spf("v=spf1 ptr ?all"))
    assert res.result is Result.NEUTRAL
    assert res.void_lookups == 1


def _many_ptr(count: int, matching: int) -> dict[str, Any]:
    names = [f"h{i:02d}.example.com" for i in range(count)]
    forward = {name: [CLIENT if i == matching else "198.51.100.1"]
               for i, name in enumerate(names)}
    return _ptr_zone("v=spf1 ptr -all", names, forward)


def test_s4_6_4_ptr_tenth_name_is_used() -> None:
    res, dns = run(_many_ptr(11, matching=9))
    assert res.result is Result.PASS
    assert dns.count(rdtype="A") == 10


def test_s4_6_4_ptr_names_after_the_tenth_are_ignored() -> None:
    res, dns = run(_many_ptr(12, matching=10))
    assert res.result is Result.FAIL
    assert dns.count(rdtype="A") == 10
    assert dns.count("h10.example.com") == 0
    assert dns.count("h11.example.com") == 0


def test_s5_5_ptr_ipv6_client() -> None:
    rev = ipaddress.ip_address(CLIENT6).reverse_pointer
    zone = spf("v=spf1 ptr -all", **{rev: {"PTR": ["v6.example.com"]},
                                     "v6.example.com": {"AAAA": [CLIENT6]}})
    res, dns = run(zone, ip=CLIENT6)
    assert res.result is Result.PASS
    assert ("v6.example.com", "AAAA") in dns.queries


# -- §5.7 exists -----------------------------------------------------------------------------

def test_s5_7_exists_matches_any_a_record() -> None:
    zone = spf("v=spf1 exists:%{ir}.%{v}._spf.%{d} -all",
               **{"1.2.0.192.in-addr._spf.example.com": {"A": ["127.0.0.2"]}})
    res, dns = run(zone)
    assert res.result is Result.PASS
    assert res.mechanism == "exists:%{ir}.%{v}._spf.%{d}"
    assert ("1.2.0.192.in-addr._spf.example.com", "A") in dns.queries


def test_s5_7_exists_nxdomain_no_match_and_void() -> None:
    res, _ = run(spf("v=spf1 exists:%{l}.nx.example.com ?all"))
    assert res.result is Result.NEUTRAL
    assert res.void_lookups == 1


def test_s5_7_exists_uses_a_even_for_ipv6_client() -> None:
    zone = spf("v=spf1 exists:allowed.example.com -all",
               **{"allowed.example.com": {"A": ["127.0.0.1"]}})
    res, dns = run(zone, ip=CLIENT6)
    assert res.result is Result.PASS
    assert dns.count(rdtype="AAAA") == 0
    assert dns.count("allowed.example.com", "A") == 1


def test_s5_7_exists_temperror() -> None:
    zone = spf("v=spf1 exists:slow.example.com -all", **{"slow.example.com": "TEMPERROR"})
    assert run(zone)[0].result is Result.TEMPERROR


# -- §5.2 include ----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("included", "result", "mechanism"),
    [("v=spf1 +all", Result.FAIL, "-include:inc.example.net"),
     ("v=spf1 -all", Result.SOFTFAIL, "~all"),
     ("v=spf1 ~all", Result.SOFTFAIL, "~all"),
     ("v=spf1 ?all", Result.SOFTFAIL, "~all"),
     ("v=spf1", Result.SOFTFAIL, "~all")],
)
def test_s5_2_include_result_mapping(included: str, result: Result, mechanism: str) -> None:
    zone = spf("v=spf1 -include:inc.example.net ~all",
               **{"inc.example.net": {"TXT": [included]}})
    res, _ = run(zone)
    assert res.result is result
    assert res.mechanism == mechanism


def test_s5_2_include_temperror_propagates() -> None:
    zone = spf("v=spf1 include:inc.example.net -all", **{"inc.example.net": "TEMPERROR"})
    res, _ = run(zone)
    assert res.result is Result.TEMPERROR
    zone = spf("v=spf1 include:inc.example.net -all",
               **{"inc.example.net": {"TXT": ["v=spf1 a:slow.example.net -all"]},
                  "slow.example.net": "TEMPERROR"})
    assert run(zone)[0].result is Result.TEMPERROR


def test_s5_2_include_permerror_propagates() -> None:
    zone = spf("v=spf1 include:inc.example.net -all",
               **{"inc.example.net": {"TXT": ["v=spf1 bogus -all"]}})
    res, _ = run(zone)
    assert res.result is Result.PERMERROR
    assert "bogus" in res.cause


@pytest.mark.parametrize(
    "target",
    [{}, {"TXT": ["not spf"]}, {"A": ["192.0.2.1"]}],
)
def test_s5_2_include_of_domain_without_record_is_permerror(target: dict[str, Any]) -> None:
    zone = spf("v=spf1 include:inc.example.net -all")
    if target:
        zone["inc.example.net"] = target
    res, _ = run(zone)
    assert res.result is Result.PERMERROR
    assert "include:inc.example.net" in res.cause
    assert "5.2" in res.cause


def test_s5_2_include_of_malformed_domain_is_permerror() -> None:
    res, _ = run(spf("v=spf1 include:%{l}.x..example.net -all"))
    assert res.result is Result.PERMERROR


def test_s5_2_include_changes_d_for_the_included_record() -> None:
    zone = spf("v=spf1 include:inc.example.net -all",
               **{"inc.example.net": {"TXT": ["v=spf1 exists:%{d}.check.example.org -all"]},
                  "inc.example.net.check.example.org": {"A": ["127.0.0.1"]}})
    res, dns = run(zone)
    assert res.result is Result.PASS
    assert ("inc.example.net.check.example.org", "A") in dns.queries


def test_s5_2_outer_d_is_restored_after_include() -> None:
    zone = spf("v=spf1 include:inc.example.net exists:%{d}.after.example.org -all",
               **{"inc.example.net": {"TXT": ["v=spf1 a:%{d} -all"]},
                  "example.com.after.example.org": {"A": ["127.0.0.1"]}})
    res, dns = run(zone)
    assert res.result is Result.PASS
    assert ("example.com.after.example.org", "A") in dns.queries


def test_s5_2_include_loop_ends_in_permerror() -> None:
    zone = spf("v=spf1 include:example.com -all")
    res, _ = run(zone)
    assert res.result is Result.PERMERROR
    assert res.lookups == 10


# -- §6.1 redirect -----------------------------------------------------------------------

def test_s6_1_redirect_used_when_nothing_matched() -> None:
    zone = spf("v=spf1 ip4:198.51.100.0/24 redirect=_spf.example.net",
               **{"_spf.example.net": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]}})
    res, _ = run(zone)
    assert res.result is Result.PASS
    assert res.mechanism == "ip4:192.0.2.0/24"
    assert res.lookups == 1


def test_s6_1_redirect_not_used_when_a_directive_matched() -> None:
    zone = spf("v=spf1 ip4:192.0.2.1 redirect=_spf.example.net",
               **{"_spf.example.net": {"TXT": ["v=spf1 -all"]}})
    res, dns = run(zone)
    assert res.result is Result.PASS
    assert dns.count("_spf.example.net") == 0
    assert res.lookups == 0


def test_s6_1_redirect_ignored_when_all_present() -> None:
    zone = spf("v=spf1 redirect=_spf.example.net ?all",
               **{"_spf.example.net": {"TXT": ["v=spf1 -all"]}})
    res, dns = run(zone)
    assert res.result is Result.NEUTRAL
    assert dns.count("_spf.example.net") == 0


def test_s6_1_redirect_result_is_the_targets_result() -> None:
    for target, want in [("v=spf1 -all", Result.FAIL), ("v=spf1 ~all", Result.SOFTFAIL),
                         ("v=spf1", Result.NEUTRAL), ("v=spf1 bogus", Result.PERMERROR)]:
        zone = spf("v=spf1 redirect=_spf.example.net", **{"_spf.example.net": {"TXT": [target]}})
        assert run(zone)[0].result is want, target


@pytest.mark.parametrize("target", [{}, {"TXT": ["hello"]}, {"A": [CLIENT]}])
def test_s6_1_redirect_to_domain_without_record_is_permerror(target: dict[str, Any]) -> None:
    zone = spf("v=spf1 redirect=_spf.example.net")
    if target:
        zone["_spf.example.net"] = target
    res, _ = run(zone)
    assert res.result is Result.PERMERROR
    assert "redirect=_spf.example.net" in res.cause
    assert res.lookups == 1


def test_s6_1_redirect_to_malformed_domain_is_permerror() -> None:
    res, _ = run(spf("v=spf1 redirect=%{l}..example.net"))
    assert res.result is Result.PERMERROR


def test_s6_1_redirect_temperror() -> None:
    zone = spf("v=spf1 redirect=_spf.example.net", **{"_spf.example.net": "TEMPERROR"})
    assert run(zone)[0].result is Result.TEMPERROR


def test_s6_1_redirect_changes_d() -> None:
    zone = spf("v=spf1 redirect=_spf.%{d}",
               **{"_spf.example.com": {"TXT": ["v=spf1 exists:%{d}.ok.example.org -all"]},
                  "_spf.example.com.ok.example.org": {"A": ["127.0.0.1"]}})
    res, dns = run(zone)
    assert res.result is Result.PASS
    assert ("_spf.example.com", "TXT") in dns.queries
    assert ("_spf.example.com.ok.example.org", "A") in dns.queries
    # %{o} still names the sender's domain
    zone["_spf.example.com"]["TXT"] = ["v=spf1 exists:%{o}.ok.example.org -all"]
    zone["example.com.ok.example.org"] = {"A": ["127.0.0.1"]}
    assert run(zone)[0].result is Result.PASS


def test_s6_1_redirect_loop_ends_in_permerror() -> None:
    res, _ = run(spf("v=spf1 redirect=example.com"))
    assert res.result is Result.PERMERROR
    assert "4.6.4" in res.cause


# -- §6.2 exp ----------------------------------------------------------------------------

EXPLAIN = {"explain.example.com": {"TXT": ["%{i} is not allowed to send for %{s} (%{d})"]}}


def test_s6_2_explanation_for_fail() -> None:
    res, _ = run(spf("v=spf1 -all exp=explain.example.com", **EXPLAIN))
    assert res.result is Result.FAIL
    assert res.explanation == "192.0.2.1 is not allowed to send for user@example.com (example.com)"
    assert res.lookups == 0


@pytest.mark.parametrize("qualifier", ["+", "~", "?"])
def test_s6_2_no_explanation_unless_fail(qualifier: str) -> None:
    res, dns = run(spf(f"v=spf1 {qualifier}all exp=explain.example.com", **EXPLAIN))
    assert res.result is not Result.FAIL
    assert res.explanation is None
    assert dns.count("explain.example.com") == 0


def test_s6_2_exp_text_macros_c_r_t() -> None:
    zone = spf("v=spf1 -all exp=%{d}.explain.example.com",
               **{"example.com.explain.example.com": {"TXT": ["%{c} %{r} %{t} %{h} %{l}"]}})
    dns = FakeDNS(zone)
    res = check_host(dns, CLIENT6, "example.com", SENDER, helo=HELO, receiver="mx.example.net")
    assert res.result is Result.FAIL
    assert res.explanation is not None
    c, r, t, h, local = res.explanation.split(" ")
    assert (c, r, h, local) == (CLIENT6, "mx.example.net", HELO, "user")
    assert t.isdigit()


def test_s6_2_exp_text_from_multiple_strings_is_joined() -> None:
    zone = spf("v=spf1 -all exp=explain.example.com",
               **{"explain.example.com": {"TXT": [["See http://", "example.com/why"]]}})
    assert run(zone)[0].explanation == "See http://example.com/why"


@pytest.mark.parametrize(
    "explain",
    [{},  # NXDOMAIN
     {"A": ["192.0.2.1"]},  # NODATA
     {"TXT": ["one", "two"]},  # more than one record
     {"TXT": ["bad %x macro"]},  # syntax error
     {"TXT": ["%{z}"]},
     {"TXT": "TEMPERROR"}],
)
def test_s6_2_exp_problems_mean_no_explanation(explain: dict[str, Any]) -> None:
    zone = spf("v=spf1 -all exp=explain.example.com")
    if explain:
        zone["explain.example.com"] = explain
    res, _ = run(zone)
    assert res.result is Result.FAIL
    assert res.explanation is None


def test_s6_2_exp_per_name_temperror_means_no_explanation() -> None:
    res, _ = run(spf("v=spf1 -all exp=explain.example.com",
                     **{"explain.example.com": "TEMPERROR"}))
    assert res.result is Result.FAIL
    assert res.explanation is None


def test_s6_2_exp_domain_expanding_to_bad_name_means_no_explanation() -> None:
    res, dns = run(spf("v=spf1 -all exp=%{l}..example.com"))
    assert res.result is Result.FAIL
    assert res.explanation is None
    assert dns.queries == [("example.com", "TXT")]


def test_s6_2_non_ascii_expansion_means_no_explanation() -> None:
    zone = spf("v=spf1 -all exp=explain.example.com",
               **{"explain.example.com": {"TXT": ["bad sender %{s}"]}})
    res, _ = run(zone, sender="jösé@example.com")
    assert res.result is Result.FAIL
    assert res.explanation is None


def test_s6_2_exp_from_the_redirect_target() -> None:
    zone = spf("v=spf1 redirect=_spf.example.net exp=outer.example.com",
               **{"_spf.example.net": {"TXT": ["v=spf1 -all exp=inner.example.net"]},
                  "inner.example.net": {"TXT": ["inner says no for %{d}"]},
                  "outer.example.com": {"TXT": ["outer says no"]}})
    res, dns = run(zone)
    assert res.result is Result.FAIL
    assert res.explanation == "inner says no for _spf.example.net"
    assert dns.count("outer.example.com") == 0


def test_s6_2_original_exp_not_used_after_redirect() -> None:
    zone = spf("v=spf1 redirect=_spf.example.net exp=outer.example.com",
               **{"_spf.example.net": {"TXT": ["v=spf1 -all"]},
                  "outer.example.com": {"TXT": ["outer says no"]}})
    res, _ = run(zone)
    assert res.result is Result.FAIL
    assert res.explanation is None


def test_s6_2_included_exp_not_used() -> None:
    zone = spf("v=spf1 include:inc.example.net -all",
               **{"inc.example.net": {"TXT": ["v=spf1 -all exp=inner.example.net"]},
                  "inner.example.net": {"TXT": ["inner"]}})
    res, dns = run(zone)
    assert res.result is Result.FAIL
    assert res.explanation is None
    assert dns.count("inner.example.net") == 0


def test_s6_2_exp_does_not_count_as_lookup() -> None:
    zone = spf("v=spf1 " + " ".join(f"a:h{i}.example.com" for i in range(10))
               + " -all exp=explain.example.com", **EXPLAIN)
    for i in range(10):
        zone[f"h{i}.example.com"] = {"A": ["198.51.100.1"]}
    res, _ = run(zone)
    assert res.result is Result.FAIL
    assert res.lookups == 10
    assert res.explanation is not None


# -- §4.6.4 limits -------------------------------------------------------------------------

def _terms_zone(red_terms: int) -> dict[str, Any]:
    """example.com: 4 a + include (2 a inside) + redirect (`red_terms` a): 8 + red_terms terms."""
    hosts = [f"h{i}.example.com" for i in range(6 + red_terms)]
    zone: dict[str, Any] = {name: {"A": ["198.51.100.1"]} for name in hosts}
    zone["example.com"] = {"TXT": [
        "v=spf1 " + " ".join(f"a:{h}" for h in hosts[:4])
        + " include:inc.example.com redirect=red.example.com"]}
    zone["inc.example.com"] = {"TXT": [f"v=spf1 a:{hosts[4]} a:{hosts[5]} ?all"]}
    zone["red.example.com"] = {"TXT": [
        "v=spf1 " + " ".join(f"a:{h}" for h in hosts[6:]) + " -all"]}
    return zone


def test_s4_6_4_ten_dns_terms_across_include_and_redirect_are_fine() -> None:
    res, _ = run(_terms_zone(red_terms=2))
    assert res.result is Result.FAIL
    assert res.mechanism == "-all"
    assert res.lookups == 10


def test_s4_6_4_eleventh_dns_term_is_permerror() -> None:
    res, dns = run(_terms_zone(red_terms=3))
    assert res.result is Result.PERMERROR
    assert "'a:h8.example.com'" in res.cause
    assert "4.6.4" in res.cause
    # the 11th term is refused before its query is sent
    assert dns.count("h8.example.com") == 0


def test_s4_6_4_reported_lookups_never_exceed_limit() -> None:
    res, _ = run(_terms_zone(red_terms=3))
    assert res.result is Result.PERMERROR
    assert res.lookups <= 10


def test_s4_6_4_terms_without_dns_do_not_count() -> None:
    record = ("v=spf1 " + " ".join(f"ip4:198.51.100.{i}" for i in range(30))
              + " " + " ".join(f"a:h{i}.example.com" for i in range(10)) + " ip6:::1 -all")
    zone = spf(record)
    for i in range(10):
        zone[f"h{i}.example.com"] = {"A": ["198.51.100.1"]}
    res, _ = run(zone)
    assert res.result is Result.FAIL
    assert res.lookups == 10


def test_s4_6_4_dns_term_limit_is_configurable() -> None:
    zone = spf("v=spf1 a:h0.example.com a:h1.example.com a:h2.example.com -all",
               **{f"h{i}.example.com": {"A": ["198.51.100.1"]} for i in range(3)})
    assert run(zone, limits=Limits(dns_terms=3))[0].result is Result.FAIL
    res, _ = run(zone, limits=Limits(dns_terms=2))
    assert res.result is Result.PERMERROR
    assert "a:h2.example.com" in res.cause


def test_s4_6_4_two_void_lookups_are_fine() -> None:
    res, _ = run(spf("v=spf1 a:nx1.example.com exists:nx2.example.com -all"))
    assert res.result is Result.FAIL
    assert res.void_lookups == 2


def test_s4_6_4_third_void_lookup_is_permerror() -> None:
    res, _ = run(spf("v=spf1 a:nx1.example.com mx:nx2.example.com exists:nx3.example.com -all"))
    assert res.result is Result.PERMERROR
    assert "void" in res.cause
    assert "exists:nx3.example.com" in res.cause
    assert res.void_lookups == 3


def test_s4_6_4_void_lookups_count_across_include() -> None:
    zone = spf("v=spf1 a:nx1.example.com include:inc.example.net -all",
               **{"inc.example.net": {"TXT": ["v=spf1 a:nx2.example.net a:nx3.example.net"]}})
    res, _ = run(zone)
    assert res.result is Result.PERMERROR
    assert "'a:nx3.example.net'" in res.cause


def test_s4_6_4_nodata_is_void_too() -> None:
    zone = spf("v=spf1 a:n1.example.com a:n2.example.com a:n3.example.com -all",
               **{f"n{i}.example.com": {"TXT": ["x"]} for i in range(1, 4)})
    assert run(zone)[0].result is Result.PERMERROR


def test_s4_6_4_void_limit_is_configurable() -> None:
    res, _ = run(spf("v=spf1 a:nx1.example.com -all"), limits=Limits(void_lookups=0))
    assert res.result is Result.PERMERROR


# -- §5: the client address ------------------------------------------------------------------

def test_s5_ipv4_mapped_ipv6_client_is_evaluated_as_ipv4() -> None:
    zone = spf("v=spf1 a:web.example.com exists:%{ir}.%{v}.list.example.com -all",
               **{"web.example.com": {"A": ["198.51.100.1"], "AAAA": ["::ffff:192.0.2.1"]},
                  "1.2.0.192.in-addr.list.example.com": {"A": ["127.0.0.2"]}})
    res, dns = run(zone, ip="::ffff:192.0.2.1")
    assert res.result is Result.PASS
    assert res.mechanism == "exists:%{ir}.%{v}.list.example.com"
    assert res.ip == CLIENT
    assert dns.count(rdtype="AAAA") == 0
    assert "client-ip=192.0.2.1;" in res.received_spf


def test_s5_ipv4_mapped_matches_ip4_not_ip6() -> None:
    assert result_of("v=spf1 ip4:192.0.2.1 -all", ip="::ffff:192.0.2.1") is Result.PASS
    assert result_of("v=spf1 ip6:::ffff:0:0/96 -all", ip="::ffff:192.0.2.1") is Result.FAIL
    mapped = ipaddress.IPv6Address("::ffff:192.0.2.1")
    res = check_host(FakeDNS(spf("v=spf1 ip4:192.0.2.1 -all")), mapped, "example.com", SENDER)
    assert res.result is Result.PASS


def test_s5_ipv6_client_a_uses_aaaa_and_cidr6() -> None:
    zone = spf("v=spf1 a/24//64 -all")
    zone["example.com"]["A"] = ["192.0.2.1"]
    zone["example.com"]["AAAA"] = ["2001:db8::ffff"]
    res, dns = run(zone, ip=CLIENT6)
    assert res.result is Result.PASS
    assert dns.count(rdtype="A") == 0
    assert dns.count("example.com", "AAAA") == 1
    zone["example.com"]["TXT"] = ["v=spf1 a/24 -all"]  # default cidr6 is /128
    assert run(zone, ip=CLIENT6)[0].result is Result.FAIL
    zone["example.com"]["TXT"] = ["v=spf1 a//0 -all"]
    assert run(zone, ip="2001:db9::1")[0].result is Result.PASS


def test_s5_ipv6_client_mx_uses_aaaa_and_cidr6() -> None:
    zone = _mx_zone("v=spf1 mx//48 -all")
    res, dns = run(zone, ip="2001:db8:2::abcd")
    assert res.result is Result.PASS
    assert dns.count(rdtype="A") == 0
    zone["example.com"]["TXT"] = ["v=spf1 mx -all"]
    assert run(zone, ip="2001:db8:2::abcd")[0].result is Result.FAIL


def test_s5_ipv6_client_does_not_match_ipv4_a_records() -> None:
    zone = spf("v=spf1 a -all")
    zone["example.com"]["A"] = ["0.0.0.0"]
    assert run(zone, ip="::")[0].result is Result.FAIL


def test_s4_1_bad_client_address_is_permerror() -> None:
    res, dns = run(spf("v=spf1 +all"), ip="not-an-ip")
    assert res.result is Result.PERMERROR
    assert "not-an-ip" in res.cause
    assert dns.queries == []
    assert res.authentic is False


# -- §2.3 / §2.4 identities ----------------------------------------------------------------

def _identity_zone() -> dict[str, Any]:
    return {
        "example.com": {"TXT": ["v=spf1 exists:%{l}.%{o}.ok.example.net -all"]},
        "mail.example.org": {"TXT": ["v=spf1 exists:%{l}.%{o}.ok.example.net -all"]},
        "postmaster.mail.example.org.ok.example.net": {"A": ["127.0.0.1"]},
        "postmaster.example.com.ok.example.net": {"A": ["127.0.0.1"]},
        "user.example.com.ok.example.net": {"A": ["127.0.0.1"]},
    }


def test_s2_4_mailfrom_identity() -> None:
    dns = FakeDNS(_identity_zone())
    res = check_mailfrom(dns, CLIENT, "<user@example.com>", HELO)
    assert res.result is Result.PASS
    assert (res.identity, res.domain, res.sender) == ("mailfrom", "example.com", SENDER)
    assert dns.queries[0] == ("example.com", "TXT")


@pytest.mark.parametrize("mail_from", ["<>", "", "  <>  "])
def test_s2_4_null_reverse_path_uses_postmaster_at_helo(mail_from: str) -> None:
    dns = FakeDNS(_identity_zone())
    res = check_mailfrom(dns, CLIENT, mail_from, HELO)
    assert res.result is Result.PASS
    assert res.sender == "postmaster@mail.example.org"
    assert res.domain == HELO
    assert res.identity == "mailfrom"
    assert dns.queries[0] == (HELO, "TXT")


@pytest.mark.parametrize("mail_from", ["@example.com", "<@example.com>", "example.com"])
def test_s4_3_sender_without_local_part_uses_postmaster(mail_from: str) -> None:
    dns = FakeDNS(_identity_zone())
    res = check_mailfrom(dns, CLIENT, mail_from, HELO)
    assert res.result is Result.PASS
    assert res.sender == "postmaster@example.com"
    assert res.domain == "example.com"


def test_s4_3_check_host_l_is_postmaster_without_local_part() -> None:
    zone = _identity_zone()
    res, _ = run(zone, sender="example.com")
    assert res.result is Result.PASS


def test_s4_3_check_host_s_gets_postmaster_without_local_part() -> None:
    zone = spf("v=spf1 exists:%{s}.ok.example.net -all",
               **{"postmaster@example.com.ok.example.net": {"A": ["127.0.0.1"]}})
    res, dns = run(zone, sender="example.com")
    assert ("postmaster@example.com.ok.example.net", "A") in dns.queries
    assert res.result is Result.PASS


def test_s2_3_helo_identity() -> None:
    dns = FakeDNS(_identity_zone())
    res = check_helo(dns, CLIENT, HELO)
    assert res.result is Result.PASS
    assert res.identity == "helo"
    assert res.sender == "postmaster@mail.example.org"
    assert res.domain == HELO
    assert res.helo == HELO
    assert "identity=helo;" in res.received_spf


@pytest.mark.parametrize("helo", ["localhost", "[192.0.2.1]", "", "bad..example.com"])
def test_s2_3_helo_not_a_domain_is_none(helo: str) -> None:
    dns = FakeDNS(_identity_zone())
    res = check_helo(dns, CLIENT, helo)
    assert res.result is Result.NONE
    assert dns.queries == []


def test_s7_3_h_macro_is_the_helo() -> None:
    zone = spf("v=spf1 exists:%{h}.helo.example.net -all",
               **{"mail.example.org.helo.example.net": {"A": ["127.0.0.1"]}})
    dns = FakeDNS(zone)
    assert check_mailfrom(dns, CLIENT, SENDER, HELO).result is Result.PASS


# -- §4.3 initial processing / §4.4, §4.5 record lookup -------------------------------------

@pytest.mark.parametrize(
    "domain",
    ["localhost", "com", "", ".", "a..example.com", ".example.com", "x" * 64 + ".example.com",
     "[192.0.2.1]", "[IPv6:2001:db8::1]", ("a" * 60 + ".") * 4 + "example.com"],
)
def test_s4_3_malformed_domain_is_none_without_dns(domain: str) -> None:
    res, dns = run({"example.com": {"TXT": ["v=spf1 +all"]}}, domain=domain)
    assert res.result is Result.NONE
    assert dns.queries == []
    assert "4.3" in res.cause
    assert res.lookups == 0


def test_s4_3_label_of_63_and_trailing_dot_are_fine() -> None:
    name = "x" * 63 + ".example.com"
    res, dns = run({name: {"TXT": ["v=spf1 +all"]}}, domain=name + ".")
    assert res.result is Result.PASS
    assert dns.queries == [(name, "TXT")]


def test_s4_3_domain_is_case_insensitive() -> None:
    res, dns = run(spf("v=spf1 +all"), domain="EXAMPLE.Com")
    assert res.result is Result.PASS
    assert dns.queries == [("example.com", "TXT")]


@pytest.mark.parametrize(
    "texts",
    [None, [], ["not spf"], ["v=spf10 +all"], ["v=spf1x"], ["spf1 +all", "v=DKIM1; p=abc"]],
)
def test_s4_4_no_spf_record_is_none(texts: list[str] | None) -> None:
    zone: dict[str, Any] = {}
    if texts is not None:
        zone["example.com"] = {"TXT": texts} if texts else {"A": [CLIENT]}
    res, _ = run(zone)
    assert res.result is Result.NONE
    assert res.mechanism is None


def test_s4_5_spf_record_among_other_txt() -> None:
    res, _ = run({"example.com": {"TXT": ["google-site-verification=abc", "v=spf1 -all",
                                          "v=spf10 +all"]}})
    assert res.result is Result.FAIL


@pytest.mark.parametrize(
    "texts",
    [["v=spf1 -all", "v=spf1 +all"], ["v=spf1 -all", "V=SPF1 -all"], ["v=spf1", "v=spf1"]],
)
def test_s4_5_multiple_spf_records_is_permerror(texts: list[str]) -> None:
    res, _ = run({"example.com": {"TXT": texts}})
    assert res.result is Result.PERMERROR
    assert "4.5" in res.cause


def test_s3_3_record_split_over_strings_is_joined() -> None:
    res, _ = run({"example.com": {"TXT": [["v=spf1 ip4:192.0.", "2.1 -all"]]}})
    assert res.result is Result.PASS


def test_s4_4_txt_temperror_is_temperror() -> None:
    res, _ = run({"example.com": "TEMPERROR"})
    assert res.result is Result.TEMPERROR
    assert "example.com" in res.cause
    res, _ = run({"example.com": {"TXT": "TEMPERROR", "A": [CLIENT]}})
    assert res.result is Result.TEMPERROR


# -- permerror causes name the term --------------------------------------------------------

@pytest.mark.parametrize(
    ("record", "term"),
    [("v=spf1 a:foo -all", "a:foo"), ("v=spf1 ip4:192.0.2.1/33 -all", "ip4:192.0.2.1/33"),
     ("v=spf1 frobnicate:example.com -all", "frobnicate:example.com"),
     ("v=spf1 -all exp=a.example.com exp=b.example.com", "exp=b.example.com"),
     ("v=spf1 exists:%{x}.example.com", "exists:%{x}.example.com")],
)
def test_s4_6_syntax_error_permerror_names_the_term(record: str, term: str) -> None:
    res, _ = run(spf(record))
    assert res.result is Result.PERMERROR
    assert repr(term) in res.cause
    assert "example.com" in res.cause


@pytest.mark.parametrize("where", ["top", "include"])
def test_s7_3_zero_transformer_in_published_record_is_permerror(where: str) -> None:
    bad = "v=spf1 exists:%{d0}.example.net -all"
    if where == "top":
        zone = spf(bad)
    else:
        zone = spf("v=spf1 include:inc.example.net -all", **{"inc.example.net": {"TXT": [bad]}})
    res, _ = run(zone)
    assert res.result is Result.PERMERROR
    assert "exists:%{d0}.example.net" in res.cause


def test_s7_3_long_expansion_is_truncated_to_whole_labels() -> None:
    zone = spf("v=spf1 exists:%{l}.%{l}.%{l}.%{l}.%{l}.example.com -all")
    res, dns = run(zone, sender="x" * 60 + "@example.com")
    assert res.result is Result.FAIL
    name, rdtype = dns.queries[1]
    assert rdtype == "A"
    assert len(name) <= 253
    assert name == ".".join(["x" * 60] * 3 + ["example.com"])


def test_s7_3_trailing_dot_does_not_count_towards_253() -> None:
    rest = ".".join(["b" * 63, "c" * 63, "d" * 61]) + "."
    res, dns = run(spf("v=spf1 exists:%{l}." + rest + " -all"), sender="a" * 63 + "@example.com")
    assert res.result is Result.FAIL
    name, _ = dns.queries[1]
    assert name == "a" * 63 + "." + rest.rstrip(".")
    assert len(name) == 253


def test_s4_6_syntax_error_after_match_is_still_permerror() -> None:
    res, _ = run(spf("v=spf1 +all a:foo"))
    assert res.result is Result.PERMERROR


def test_s4_6_non_ascii_record_is_permerror() -> None:
    res, _ = run(spf("v=spf1 a:exämple.com +all"))
    assert res.result is Result.PERMERROR
    assert "non-ASCII" in res.cause


# -- DNSSEC authentic ------------------------------------------------------------------------

def test_authentic_when_every_answer_is_authentic() -> None:
    zone = spf("v=spf1 a:web.example.com include:inc.example.net -all",
               **{"web.example.com": {"A": ["198.51.100.1"]},
                  "inc.example.net": {"TXT": ["v=spf1 ip4:192.0.2.1"]}})
    res, _ = run(zone, authentic=("example.com", "web.example.com", "inc.example.net"))
    assert res.result is Result.PASS
    assert res.authentic is True


@pytest.mark.parametrize("insecure", ["example.com", "web.example.com", "inc.example.net"])
def test_not_authentic_when_any_answer_is_not(insecure: str) -> None:
    zone = spf("v=spf1 a:web.example.com include:inc.example.net -all",
               **{"web.example.com": {"A": ["198.51.100.1"]},
                  "inc.example.net": {"TXT": ["v=spf1 ip4:192.0.2.1"]}})
    names = {"example.com", "web.example.com", "inc.example.net"} - {insecure}
    res, _ = run(zone, authentic=tuple(names))
    assert res.result is Result.PASS
    assert res.authentic is False


def test_authentic_negative_answer_counts() -> None:
    zone = spf("v=spf1 a:nx.example.com -all")
    assert run(zone, authentic=("example.com", "nx.example.com"))[0].authentic is True
    assert run(zone, authentic=("example.com",))[0].authentic is False


def test_not_authentic_without_any_answer() -> None:
    res, _ = run(spf("v=spf1 +all"), domain="localhost", authentic=("localhost",))
    assert res.result is Result.NONE
    assert res.authentic is False


# -- wall-clock budget ---------------------------------------------------------------------

class SteppingClock:
    """A monotonic clock that advances `step` seconds on every read."""

    def __init__(self, start: float = 1000.0, step: float = 1.0) -> None:
        self.now = start
        self.step = step
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        self.now += self.step
        return self.now


def _slow_zone() -> dict[str, Any]:
    hosts = [f"h{i}.example.com" for i in range(8)]
    zone = spf("v=spf1 " + " ".join(f"a:{h}" for h in hosts) + " -all")
    for h in hosts:
        zone[h] = {"A": ["198.51.100.1"]}
    return zone


def test_budget_exceeded_is_temperror_naming_the_budget() -> None:
    clock = SteppingClock(step=1.0)
    res, dns = run(_slow_zone(), clock=clock, limits=Limits(budget=5))
    assert res.result is Result.TEMPERROR
    assert "budget" in res.cause
    assert "5 s" in res.cause
    assert len(dns.queries) < 8
    assert "budget" in res.received_spf


def test_budget_not_exceeded_with_a_fast_clock() -> None:
    clock = SteppingClock(step=0.001)
    res, dns = run(_slow_zone(), clock=clock, limits=Limits(budget=5))
    assert res.result is Result.FAIL
    assert len(dns.queries) == 9


def test_budget_deadline_passed_to_every_lookup() -> None:
    clock = SteppingClock(start=500.0, step=0.0)
    res, dns = run(_slow_zone(), clock=clock, limits=Limits(budget=7.5))
    assert res.result is Result.FAIL
    assert dns.deadlines
    assert {d.at for d in dns.deadlines if d is not None} == {507.5}
    assert None not in dns.deadlines


def test_budget_exceeded_during_a_lookup() -> None:
    clock = SteppingClock(step=0.0)
    zone = _slow_zone()
    zone["h3.example.com"] = "TEMPERROR"
    dns = FakeDNS(zone)

    def slow_query(name: str, rdtype: str) -> None:
        if name == "h3.example.com":
            clock.now += 100  # the lookup used up the rest of the budget
    dns.hook = slow_query
    res = check_host(dns, CLIENT, "example.com", SENDER, clock=clock, limits=Limits(budget=10))
    assert res.result is Result.TEMPERROR
    assert "budget" in res.cause


def test_budget_stops_an_include_chain() -> None:
    zone: dict[str, Any] = {}
    for i in range(5):
        zone[f"d{i}.example.com"] = {"TXT": [f"v=spf1 include:d{i + 1}.example.com -all"]}
    zone["d5.example.com"] = {"TXT": ["v=spf1 +all"]}
    clock = SteppingClock(step=1.0)
    res, _ = run(zone, domain="d0.example.com", clock=clock, limits=Limits(budget=4))
    assert res.result is Result.TEMPERROR
    assert "budget" in res.cause


# -- §9.1 Received-SPF -----------------------------------------------------------------------

_RESULTS = "pass|fail|softfail|neutral|none|temperror|permerror"
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_QUOTED = re.compile(r'"((?:[^"\\\r\n]|\\[\x20-\x7e])*)"')
_KEY = re.compile(r"([A-Za-z][A-Za-z0-9-]*)=")


def parse_received_spf(value: str) -> tuple[str, str, dict[str, str]]:
    """Parse a Received-SPF value back: (result, comment text, key -> unquoted value).

    Fails the test when the value is not one line of printable ASCII shaped like
    `result SP "(" comment ")" *( SP key "=" ( dot-atom / quoted-string ) ";" )` (§9.1)."""
    assert all(0x20 <= ord(ch) <= 0x7E for ch in value), repr(value)
    match = re.match(rf"({_RESULTS}) \(", value)
    assert match is not None, value
    result = match.group(1)
    pos = match.end()
    comment: list[str] = []
    while True:
        assert pos < len(value), f"unterminated comment in {value!r}"
        ch = value[pos]
        if ch == "\\":
            comment.append(value[pos + 1])
            pos += 2
            continue
        assert ch != "(", f"unescaped '(' inside the comment of {value!r}"
        pos += 1
        if ch == ")":
            break
        comment.append(ch)
    pairs: dict[str, str] = {}
    while pos < len(value):
        assert value[pos] == " ", value[pos:]
        pos += 1
        key = _KEY.match(value, pos)
        assert key is not None, value[pos:]
        pos = key.end()
        quoted = _QUOTED.match(value, pos)
        if quoted is not None:
            text = re.sub(r"\\(.)", r"\1", quoted.group(1))
            pos = quoted.end()
        else:
            atom = _DOT_ATOM.match(value, pos)
            assert atom is not None, value[pos:]
            text = atom.group(0)
            pos = atom.end()
        assert value[pos] == ";", value[pos:]
        pos += 1
        assert key.group(1) not in pairs
        pairs[key.group(1)] = text
    return result, "".join(comment), pairs


def test_s9_1_received_spf_structure_for_pass() -> None:
    res, _ = run(spf("v=spf1 ip4:192.0.2.0/24 -all"))
    result, comment, pairs = parse_received_spf(res.received_spf)
    assert result == "pass"
    assert res.received_spf.startswith("pass ")
    assert comment.startswith("unknown: ")
    assert "user@example.com" in comment
    assert pairs == {"receiver": "unknown", "client-ip": CLIENT, "envelope-from": SENDER,
                     "helo": HELO, "identity": "mailfrom", "mechanism": "ip4:192.0.2.0/24"}
    assert res.header() == ("Received-SPF", res.received_spf)
    assert res.as_dict()["received_spf"] == "Received-SPF: " + res.received_spf


@pytest.mark.parametrize("record", ["v=spf1 -all", "v=spf1 ~all", "v=spf1 ?all", "v=spf1",
                                    "v=spf1 bogus", "v=spf1 +all"])
def test_s9_1_result_keyword_first(record: str) -> None:
    res, _ = run(spf(record))
    result, _, pairs = parse_received_spf(res.received_spf)
    assert result == str(res.result)
    assert res.received_spf.split(" ", 1)[0] == str(res.result)
    if res.result is Result.PERMERROR:
        assert "bogus" in pairs["problem"]
    else:
        assert "problem" not in pairs


def test_s9_1_none_and_temperror_structure() -> None:
    res, _ = run({}, domain="example.com")
    assert parse_received_spf(res.received_spf)[0] == "none"
    res, _ = run({"example.com": "TEMPERROR"})
    result, _, pairs = parse_received_spf(res.received_spf)
    assert result == "temperror"
    assert "example.com" in pairs["problem"]
    res, _ = run({}, ip="2001:db8::1")
    assert parse_received_spf(res.received_spf)[2]["client-ip"] == "2001:db8::1"


HOSTILE = [
    'evil"; client-ip=203.0.113.9; x="',
    "a\r\nX-Injected: yes",
    "a\nb\rc",
    "tab\there",
    "paren) (nested (comment",
    "semi;colon",
    "back\\slash\\",
    "jösé\u2028ü",
    "\x00\x1b[31m",
    '"',
    "(",
    ")",
    "",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_s9_1_hostile_envelope_values_cannot_break_the_header(value: str) -> None:
    zone = spf("v=spf1 -all")
    dns = FakeDNS(zone)
    sender = f"{value}@example.com"
    res = check_host(dns, CLIENT, "example.com", sender, helo=value, receiver=value,
                     identity="mailfrom")
    header = res.received_spf
    assert "\r" not in header
    assert "\n" not in header
    result, comment, pairs = parse_received_spf(header)
    assert result == "fail"
    assert set(pairs) == {"receiver", "client-ip", "envelope-from", "helo", "identity",
                          "mechanism"}
    assert pairs["client-ip"] == CLIENT
    assert pairs["identity"] == "mailfrom"
    assert pairs["mechanism"] == "-all"
    cleaned = re.sub(r"[^\x20-\x7e]", "?", value)
    assert pairs["helo"] == cleaned
    assert pairs["receiver"] == cleaned
    # §4.3: an empty local-part stands for postmaster.
    assert pairs["envelope-from"] == (cleaned or "postmaster") + "@example.com"
    assert comment.startswith(cleaned + ": ")
    assert cleaned + "@example.com" in comment


@pytest.mark.parametrize("value", HOSTILE)
def test_s9_1_hostile_problem_text_cannot_break_the_header(value: str) -> None:
    # the problem text repeats the expanded include target, so carries the hostile local-part
    res = check_host(FakeDNS(spf("v=spf1 include:%{l}.x.example.net -all")), CLIENT,
                     "example.com", f"{value}@example.com", helo=value)
    assert res.result is Result.PERMERROR
    assert "include:%{l}.x.example.net" in res.cause
    header = res.received_spf
    assert "\r" not in header
    assert "\n" not in header
    result, _, pairs = parse_received_spf(header)
    assert result == "permerror"
    assert pairs["problem"] == re.sub(r"[^\x20-\x7e]", "?", res.cause)
    assert pairs["helo"] == re.sub(r"[^\x20-\x7e]", "?", value)
    assert "envelope-from" in pairs


def test_s9_1_syntax_error_problem_with_specials() -> None:
    res, _ = run(spf('v=spf1 a:x"(;) -all'))
    assert res.result is Result.PERMERROR
    result, _, pairs = parse_received_spf(res.received_spf)
    assert result == "permerror"
    assert pairs["problem"] == res.cause
    assert 'a:x"(;)' in pairs["problem"]


def test_s9_1_hostile_record_term_in_mechanism() -> None:
    zone = spf('v=spf1 exists:%{l}.x"y(z);w.example.com -all')
    res, _ = run(zone, sender="ok@example.com")
    result, _, pairs = parse_received_spf(res.received_spf)
    assert result == "fail"
    assert pairs["mechanism"] == "-all"
    zone = spf('v=spf1 -exists:ok.x"y(z);w.example.com')
    zone['ok.x"y(z);w.example.com'] = {"A": ["127.0.0.1"]}
    res, _ = run(zone)
    result, _, pairs = parse_received_spf(res.received_spf)
    assert result == "fail"
    assert pairs["mechanism"] == '-exists:ok.x"y(z);w.example.com'


def test_s9_1_long_values_are_shortened_but_well_formed() -> None:
    value = "x" * 1000 + '"'
    header = received_spf("pass", receiver=value, ip=CLIENT, sender=value, helo=value,
                          identity="helo", mechanism=None, problem=None)
    result, comment, pairs = parse_received_spf(header)
    assert result == "pass"
    assert comment.endswith("...")
    assert len(pairs["helo"]) <= 256
    assert pairs["helo"].endswith("...")
    assert "mechanism" not in pairs
    assert len(header) < 2000


def test_s9_1_problem_only_for_errors() -> None:
    header = received_spf("fail", receiver="r", ip=CLIENT, sender="s@x.example", helo="h",
                          identity="mailfrom", mechanism="-all", problem="ignored")
    assert "problem" not in parse_received_spf(header)[2]
    assert "ignored" not in header
    header = received_spf("permerror", receiver="r", ip=CLIENT, sender="", helo="h",
                          identity="mailfrom", mechanism=None, problem="bad (thing)")
    result, comment, pairs = parse_received_spf(header)
    assert result == "permerror"
    assert pairs["problem"] == "bad (thing)"
    assert pairs["envelope-from"] == ""
    assert "<>" in comment


# -- result object ---------------------------------------------------------------------------

def test_as_dict_round_trips_the_fields() -> None:
    res, _ = run(spf("v=spf1 -all exp=explain.example.com", **EXPLAIN))
    data = res.as_dict()
    assert data["result"] == "fail"
    assert data["mechanism"] == "-all"
    assert data["explanation"] == res.explanation
    assert data["domain"] == "example.com"
    assert data["lookups"] == 0
    assert data["authentic"] is False


# -- the fake DNS these tests rely on (§4.6.4 needs NXDOMAIN vs NODATA vs TEMPERROR) ---------

def test_fakedns_statuses_types_and_query_log() -> None:
    dns = FakeDNS({"Example.COM.": {"TXT": ["v=spf1 -all", ["a", "b"]], "A": ["192.0.2.1"],
                                    "MX": [(10, "MX.Example.com.")], "AAAA": "TEMPERROR"},
                   "slow.example.com": "TEMPERROR"}, authentic={"EXAMPLE.com."})
    txt = dns.txt("EXAMPLE.com.")
    assert txt.ok
    assert txt.records == ("v=spf1 -all", "ab")
    assert txt.authentic
    assert dns.a("example.com").records == (ipaddress.IPv4Address("192.0.2.1"),)
    mx = dns.mx("example.com").records[0]
    assert (mx.preference, mx.exchange) == (10, "mx.example.com")
    assert dns.aaaa("example.com").status == "temperror"
    assert dns.ptr("example.com").void
    assert dns.ptr("example.com").status == "nodata"
    assert dns.a("nx.example.com").status == "nxdomain"
    assert dns.txt("slow.example.com", deadline=5.0).status == "temperror"
    assert dns.queries[0] == ("example.com", "TXT")
    assert dns.count("example.com") == 6
    assert dns.count(rdtype="A") == 2
    assert dns.deadlines[-1] == 5.0
