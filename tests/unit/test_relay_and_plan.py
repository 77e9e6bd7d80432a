"""Host groups (`mailwarden.relay`) and the negotiation plan (`mailwarden.stage.Plan`, in the
milter protocol's flags by `transports.native.protocol_flags`)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from mailwarden import milterproto as mp
from mailwarden.config.build import load, parse
from mailwarden.relay import HostGroup, Membership, check_host_entry
from mailwarden.stage import Plan
from mailwarden.transports.native import protocol_flags

from fakedns import FakeDNS

ROOT = Path(__file__).resolve().parents[2]
BASE = "authserv_id: mx.example.com\n"


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


# -- check_host_entry ----------------------------------------------------------------------
@pytest.mark.parametrize("entry", [
    "192.0.2.1", "192.0.2.0/24", "10.0.0.0/8", "0.0.0.0/0", "::1", "2001:db8::/32",
    "2001:db8::25", "::ffff:192.0.2.1", "mx.example.com", "MX.Example.COM.", "a-b.example.net",
    "1.2.3.example",
])
def test_check_host_entry_accepts_addresses_ranges_and_host_names(entry: str) -> None:
    assert check_host_entry(entry) is None


@pytest.mark.parametrize(("entry", "fragment"), [
    ("10.0.0.0/33", "not an address or CIDR range"),
    ("300.1.2.3", "not an address or CIDR range"),
    ("1.2.3", "not an address or CIDR range"),
    ("192.0.2.1/abc", "not an address or CIDR range"),
    ("2001:db8::/129", "not an address or CIDR range"),
    ("2001:db8:::1", "not an address or CIDR range"),
    ("bad_name.example.com", "not an address, CIDR range or host name"),
    ("-dash.example.com", "not an address, CIDR range or host name"),
    ("dash-.example.com", "not an address, CIDR range or host name"),
    ("a..example.com", "not an address, CIDR range or host name"),
    ("", "not an address, CIDR range or host name"),
    ("x" * 64 + ".example.com", "not an address, CIDR range or host name"),
    ("example.123", "not an address, CIDR range or host name"),
])
def test_check_host_entry_explains_bad_entries(entry: str, fragment: str) -> None:
    problem = check_host_entry(entry)
    assert problem is not None
    assert fragment in problem


def test_host_group_from_entries_sorts_networks_and_names() -> None:
    group = HostGroup.from_entries("g", ("192.0.2.0/24", "MX.Example.NET.", "::1",
                                         "198.51.100.7"))
    assert group.networks == (ipaddress.ip_network("192.0.2.0/24"),
                              ipaddress.ip_network("::1/128"),
                              ipaddress.ip_network("198.51.100.7/32"))
    assert group.included.hostnames == ("mx.example.net",)


def test_host_group_from_entries_rejects_bad_entries() -> None:
    with pytest.raises(ValueError, match="bad_name"):
        HostGroup.from_entries("g", ("192.0.2.1", "bad_name!"))


# -- membership ----------------------------------------------------------------------------
NETS = HostGroup.from_entries("nets", ("192.0.2.0/24", "198.51.100.7", "2001:db8::/32"))


@pytest.mark.parametrize(("client", "member"), [
    ("192.0.2.1", Membership.IN),
    ("192.0.2.255", Membership.IN),
    ("192.0.3.1", Membership.OUT),
    ("198.51.100.7", Membership.IN),
    ("198.51.100.8", Membership.OUT),
    ("2001:db8::1", Membership.IN),
    ("2001:db8:ffff::1", Membership.IN),
    ("2001:db9::1", Membership.OUT),
    ("::ffff:192.0.2.9", Membership.IN),  # IPv4-mapped IPv6 client
    ("::ffff:203.0.113.1", Membership.OUT),
    ("::1", Membership.OUT),
])
def test_membership_by_address_and_cidr(client: str, member: Membership) -> None:
    dns = FakeDNS()
    assert NETS.membership(ip(client), dns) is member
    assert dns.queries == []  # no host names, no lookups


def test_ipv4_address_never_matches_an_ipv6_range_and_vice_versa() -> None:
    group = HostGroup.from_entries("g", ("::/0",))
    assert group.membership(ip("192.0.2.1"), FakeDNS()) is Membership.OUT
    group = HostGroup.from_entries("g", ("0.0.0.0/0",))
    assert group.membership(ip("2001:db8::1"), FakeDNS()) is Membership.OUT
    assert group.membership(ip("::ffff:10.1.2.3"), FakeDNS()) is Membership.IN


ZONE: dict[str, Any] = {
    "relay.example.net": {"A": ["192.0.2.10", "192.0.2.11"], "AAAA": ["2001:db8::10"]},
    "v4only.example.net": {"A": ["203.0.113.5"]},
    "slow.example.net": "TEMPERROR",
    "halfslow.example.net": {"A": ["203.0.113.6"], "AAAA": "TEMPERROR"},
}


@pytest.mark.parametrize(("client", "member", "query"), [
    ("192.0.2.10", Membership.IN, ("relay.example.net", "A")),
    ("192.0.2.11", Membership.IN, ("relay.example.net", "A")),
    ("192.0.2.12", Membership.OUT, ("relay.example.net", "A")),
    ("2001:db8::10", Membership.IN, ("relay.example.net", "AAAA")),
    ("2001:db8::11", Membership.OUT, ("relay.example.net", "AAAA")),
    ("::ffff:192.0.2.10", Membership.IN, ("relay.example.net", "A")),
])
def test_membership_by_host_name_through_dns(client: str, member: Membership,
                                             query: tuple[str, str]) -> None:
    dns = FakeDNS(ZONE)
    group = HostGroup.from_entries("g", ("Relay.Example.NET.",))
    assert group.membership(ip(client), dns) is member
    assert query in dns.queries


def test_membership_unknown_on_dns_temperror() -> None:
    dns = FakeDNS(ZONE)
    group = HostGroup.from_entries("g", ("slow.example.net",))
    assert group.membership(ip("192.0.2.10"), dns) is Membership.UNKNOWN
    group = HostGroup.from_entries("g", ("halfslow.example.net",))
    assert group.membership(ip("2001:db8::10"), dns) is Membership.UNKNOWN
    assert group.membership(ip("203.0.113.6"), dns) is Membership.IN


def test_membership_in_wins_over_unknown() -> None:
    dns = FakeDNS(ZONE)
    group = HostGroup.from_entries("g", ("slow.example.net", "relay.example.net"))
    assert group.membership(ip("192.0.2.10"), dns) is Membership.IN
    dns.reset()
    group = HostGroup.from_entries("g", ("slow.example.net", "192.0.2.0/24"))
    assert group.membership(ip("192.0.2.10"), dns) is Membership.IN
    assert dns.queries == []  # the address matched before any lookup


def test_membership_unknown_host_name_is_out() -> None:
    dns = FakeDNS(ZONE)
    group = HostGroup.from_entries("g", ("gone.example.net", "v4only.example.net"))
    assert group.membership(ip("192.0.2.10"), dns) is Membership.OUT
    assert group.membership(ip("2001:db8::10"), dns) is Membership.OUT


def test_membership_passes_the_deadline_to_dns() -> None:
    dns = FakeDNS(ZONE)
    group = HostGroup.from_entries("g", ("relay.example.net",))
    group.membership(ip("192.0.2.99"), dns, deadline=123.0)
    assert dns.deadlines == [123.0]


# -- Plan.for_config -----------------------------------------------------------------------
ALWAYS = (mp.P_NR_CONN | mp.P_NR_HDR | mp.P_NOEOH | mp.P_NR_BODY
          | mp.P_NOUNKNOWN | mp.P_NODATA | mp.P_HDR_LEADSPC)
RULES = {
    "connect": "  connect:\n    - name: c\n      check: iprev\n",
    "helo": "  helo:\n    - name: h\n      check: iprev\n",
    "mail": "  mail:\n    - name: m\n      check: spf\n",
    "rcpt": "  rcpt:\n    - name: r\n      check: rcpt_relay\n",
    "eom": "  eom:\n    - name: e\n      check: spf\n",
}


def plan(*stages: str) -> Plan:
    text = BASE
    if stages:
        text += "rules:\n" + "".join(RULES[stage] for stage in stages)
    return Plan.for_config(parse(text))


def flags(p: Plan) -> set[str]:
    names = ("P_NR_CONN", "P_NR_HDR", "P_NOEOH", "P_NOBODY", "P_NOUNKNOWN", "P_NODATA",
             "P_NR_HELO", "P_NR_MAIL", "P_NR_RCPT", "P_NOCONNECT", "P_NOHELO", "P_NOMAIL",
             "P_NORCPT", "P_NOHDRS", "P_NR_EOH", "P_NR_BODY", "P_NR_DATA", "P_NR_UNKN",
             "P_SKIP", "P_RCPT_REJ", "P_HDR_LEADSPC")
    return {name for name in names if protocol_flags(p) & getattr(mp, name)}


@pytest.mark.parametrize("stages", [(), ("connect",), ("helo",), ("mail",), ("rcpt",), ("eom",),
                                    ("connect", "helo", "mail", "rcpt", "eom")])
def test_plan_always_asks_no_reply_for_connect_and_headers_and_skips_unused_stages(
        stages: tuple[str, ...]) -> None:
    p = plan(*stages)
    assert protocol_flags(p) & ALWAYS == ALWAYS
    # the headers themselves are needed (forged Authentication-Results), and every stage
    # that carries data for the checks is sent
    assert not flags(p) & {"P_NOHDRS", "P_NOCONNECT", "P_NOHELO", "P_NOMAIL", "P_NORCPT"}


@pytest.mark.parametrize(("stages", "expected"), [
    ((), {"P_NR_HELO", "P_NR_MAIL", "P_NR_RCPT"}),
    (("connect",), {"P_NR_RCPT"}),
    (("helo",), {"P_NR_RCPT"}),
    (("mail",), {"P_NR_HELO", "P_NR_RCPT"}),
    (("rcpt",), {"P_NR_HELO", "P_NR_MAIL"}),
    (("eom",), {"P_NR_HELO", "P_NR_MAIL", "P_NR_RCPT"}),
    (("mail", "rcpt"), {"P_NR_HELO"}),
    (("connect", "rcpt"), set()),
    (("helo", "mail", "rcpt", "eom"), set()),
])
def test_plan_no_reply_flags_follow_the_stages_with_rules(stages: tuple[str, ...],
                                                           expected: set[str]) -> None:
    p = plan(*stages)
    optional = {"P_NR_HELO", "P_NR_MAIL", "P_NR_RCPT"}
    assert flags(p) & optional == expected
    assert flags(p) - optional == {"P_NR_CONN", "P_NR_HDR", "P_NOEOH", "P_NOBODY",
                                   "P_NOUNKNOWN", "P_NODATA", "P_NR_BODY", "P_HDR_LEADSPC"}


def test_plan_asks_for_the_body_only_when_a_rule_needs_it() -> None:
    """Without DKIM or ARC rules the body is not sent at all (SMFIP_NOBODY)."""
    assert "P_NOBODY" in flags(plan("mail"))
    with_dkim = Plan.for_config(parse(BASE + "rules:\n  eom:\n    - name: d\n"
                                      "      check: dkim_verify\n"))
    assert "P_NOBODY" not in flags(with_dkim)
    assert "P_NR_BODY" in flags(with_dkim)


def test_plan_macros_per_stage() -> None:
    p = plan()
    assert set(p.macros["connect"]) == {"j", "{daemon_name}", "{client_addr}"}
    assert "i" in p.macros["mail"]
    assert "{auth_authen}" in p.macros["mail"]
    assert "i" in p.macros["eom"]
    assert set(p.macros) <= {"connect", "helo", "mail", "rcpt", "eom"}
    for names in p.macros.values():
        assert list(names) == sorted(set(names))  # no duplicates, stable order


def test_plan_macros_include_those_the_checks_read() -> None:
    p = plan("mail", "rcpt")
    assert p.macros["mail"].count("{auth_authen}") == 1
    assert "i" in p.macros["mail"]


def test_plan_for_the_shipped_config() -> None:
    p = Plan.for_config(load(ROOT / "conf" / "mailwarden.yaml"))
    # connect, mail and rcpt rules: HELO, MAIL and RCPT may answer
    assert flags(p) & {"P_NR_HELO", "P_NR_MAIL", "P_NR_RCPT"} == set()
    assert protocol_flags(p) & ALWAYS == ALWAYS
    assert set(p.macros["mail"]) == {"i", "{auth_authen}"}
    assert p.macros["eom"] == ("i",)


# -- exclusions and localhost (OpenDKIM's peer-list syntax, issue 16) ------------------------
@pytest.mark.parametrize(("client", "member"), [
    ("10.1.2.3", Membership.IN),
    ("10.9.0.1", Membership.OUT),  # excluded range inside the included one
    ("10.9.9.9", Membership.OUT),
    ("192.0.2.10", Membership.OUT),  # excluded by name: relay.example.net
    ("127.0.0.1", Membership.IN),  # localhost, never looked up
    ("127.3.4.5", Membership.IN),
    ("::1", Membership.IN),
    ("203.0.113.9", Membership.OUT),
])
def test_exclusions_win_and_localhost_is_loopback(client: str, member: Membership) -> None:
    group = HostGroup.from_entries("g", ("10.0.0.0/8", "!10.9.0.0/16", "192.0.2.0/24",
                                         "!relay.example.net", "localhost"))
    dns = FakeDNS(ZONE)
    assert group.membership(ip(client), dns) is member
    assert all("localhost" not in str(q) for q in dns.queries)


def test_an_exclusion_that_cannot_be_looked_up_leaves_an_included_client_unknown() -> None:
    group = HostGroup.from_entries("g", ("192.0.2.0/24", "!slow.example.net"))
    assert group.membership(ip("192.0.2.1"), FakeDNS(ZONE)) is Membership.UNKNOWN
    assert group.membership(ip("203.0.113.1"), FakeDNS(ZONE)) is Membership.OUT


@pytest.mark.parametrize("entry", ["!10.0.0.0/8", "!mx.example.net", "localhost", "!localhost"])
def test_check_host_entry_accepts_exclusions_and_localhost(entry: str) -> None:
    assert check_host_entry(entry) is None
