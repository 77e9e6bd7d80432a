"""The shared resolver against a real DNS server on loopback."""

from __future__ import annotations

import ipaddress
import threading
import time

import pytest

from mailwarden.deadline import Deadline
from mailwarden.devtools.devdns import DevDNSServer
from mailwarden.dns import MX, Nameserver, Resolver, Status, parse_nameserver

from helpers import make_resolver

ZONE = {
    "example.com": [
        {"A": "192.0.2.1"},
        {"A": "192.0.2.2"},
        {"AAAA": "2001:db8::1"},
        {"MX": [10, "MX1.example.com."]},
        {"MX": [20, "mx2.example.com"]},
        {"TXT": ["v=spf1 ", "ip4:192.0.2.0/24", " -all"]},
        {"TXT": "other"},
    ],
    "1.2.0.192.in-addr.arpa": [{"PTR": "host.example.com"}],
    "alias.example.com": [{"CNAME": "target.example.com"}],
    "target.example.com": [{"A": "192.0.2.9"}],
    "short.example.com": [{"A": "192.0.2.5", "ttl": 5}],
    "signed.example.com": [{"A": "192.0.2.7"}, "AD"],
    "slow.example.com": ["TIMEOUT"],
    "broken.example.com": ["SERVFAIL"],
    "refusing.example.com": ["REFUSED"],
    "big.example.com": [{"TXT": f"{i:02d}" + "x" * 200} for i in range(20)],
    "latin.example.com": [{"TXT": "caf\u00e9"}],
}


@pytest.fixture
def server(dns_server: DevDNSServer) -> DevDNSServer:
    dns_server.load(ZONE)
    dns_server.clear_log()
    return dns_server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_typed_answers(server: DevDNSServer) -> None:
    resolver = make_resolver(server)
    a = resolver.a("example.com")
    assert a.status is Status.OK
    assert set(a.records) == {ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")}
    assert resolver.aaaa("example.com").records == (ipaddress.IPv6Address("2001:db8::1"),)
    assert set(resolver.mx("Example.COM.").records) == {MX(10, "mx1.example.com"),
                                                         MX(20, "mx2.example.com")}
    assert resolver.ptr("1.2.0.192.in-addr.arpa").records == ("host.example.com",)


def test_txt_strings_of_one_record_are_joined_without_spaces(server: DevDNSServer) -> None:
    """RFC 7208 §3.3: the character-strings of one TXT record are concatenated as they are."""
    records = make_resolver(server).txt("example.com").records
    assert sorted(records) == ["other", "v=spf1 ip4:192.0.2.0/24 -all"]


def test_non_ascii_txt_octets_survive(server: DevDNSServer) -> None:
    (text,) = make_resolver(server).txt("latin.example.com").records
    assert not text.isascii()
    assert text.encode("latin-1") == "caf\u00e9".encode()


def test_nxdomain_and_nodata_are_distinct(server: DevDNSServer) -> None:
    resolver = make_resolver(server)
    missing = resolver.a("nowhere.example.com")
    empty = resolver.aaaa("target.example.com")
    assert missing.status is Status.NXDOMAIN and missing.void
    assert empty.status is Status.NODATA and empty.void
    assert missing.records == () and empty.records == ()


def test_cname_chain_is_followed(server: DevDNSServer) -> None:
    answer = make_resolver(server).a("alias.example.com")
    assert answer.records == (ipaddress.IPv4Address("192.0.2.9"),)


@pytest.mark.parametrize(("name", "word"), [
    ("slow.example.com", "timeout"),
    ("broken.example.com", "SERVFAIL"),
    ("refusing.example.com", "REFUSED"),
])
def test_server_failures_are_temporary_errors(server: DevDNSServer, name: str, word: str) -> None:
    resolver = make_resolver(server, timeout=0.2, lifetime=0.5)
    started = time.monotonic()
    answer = resolver.txt(name)
    elapsed = time.monotonic() - started
    assert answer.status is Status.TEMPERROR
    assert word in answer.error
    assert elapsed < 1.5
    # Temporary errors are never cached: the next lookup asks again.
    before = len(server.queries)
    assert resolver.txt(name).status is Status.TEMPERROR
    assert len(server.queries) > before


def test_truncated_udp_answer_is_retried_over_tcp(server: DevDNSServer) -> None:
    resolver = make_resolver(server)
    answer = resolver.txt("big.example.com")
    assert answer.status is Status.OK
    assert len(answer.records) == 20
    assert resolver.stats.tcp_retries == 1
    protocols = [proto for name, rdtype, proto in server.queries if name == "big.example.com"]
    assert protocols == ["udp", "tcp"]


def test_answers_are_cached_for_their_ttl(server: DevDNSServer) -> None:
    clock = Clock()
    resolver = make_resolver(server, clock=clock)
    first = resolver.a("short.example.com")
    assert not first.from_cache
    clock.now += 4.0
    second = resolver.a("short.example.com")
    assert second.from_cache and second.records == first.records
    assert len(server.queries) == 1
    clock.now += 1.5  # past the 5 s TTL
    assert not resolver.a("short.example.com").from_cache
    assert len(server.queries) == 2


def test_negative_answers_are_cached_for_the_soa_negative_ttl() -> None:
    """RFC 2308 §5: NXDOMAIN and NODATA are cached for the SOA's negative TTL."""
    with DevDNSServer({"example.com": [{"A": "192.0.2.1"}]}, negative_ttl=30) as server:
        clock = Clock()
        resolver = make_resolver(server, clock=clock)
        assert resolver.a("gone.example.com").status is Status.NXDOMAIN
        assert resolver.aaaa("example.com").status is Status.NODATA
        clock.now += 29
        assert resolver.a("gone.example.com").from_cache
        assert resolver.aaaa("example.com").from_cache
        assert len(server.queries) == 2
        clock.now += 2
        assert not resolver.a("gone.example.com").from_cache
        assert len(server.queries) == 3


def test_cache_is_bounded_and_evicts_least_recently_used(server: DevDNSServer) -> None:
    resolver = make_resolver(server, cache_size=3)
    for name in ("example.com", "target.example.com", "short.example.com"):
        resolver.a(name)
    resolver.a("example.com")  # now the most recently used
    resolver.a("signed.example.com")  # evicts target.example.com
    assert resolver.cache_len() == 3
    assert resolver.a("example.com").from_cache
    assert not resolver.a("target.example.com").from_cache


def test_cache_is_shared_between_threads(server: DevDNSServer) -> None:
    resolver = make_resolver(server)
    results: list[Status] = []

    def work() -> None:
        for _ in range(20):
            results.append(resolver.a("example.com").status)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [Status.OK] * 160
    assert resolver.stats.hits >= 150


def test_dnssec_ad_bit_is_passed_through_as_authentic(server: DevDNSServer) -> None:
    resolver = make_resolver(server)
    assert resolver.a("signed.example.com").authentic
    assert resolver.a("signed.example.com").from_cache
    assert resolver.a("signed.example.com").authentic
    assert not resolver.a("example.com").authentic


def test_next_nameserver_is_tried_after_a_failure(server: DevDNSServer) -> None:
    with DevDNSServer({"example.com": ["SERVFAIL"]}) as failing:
        resolver = Resolver(
            nameservers=[Nameserver(failing.host, failing.port),
                         Nameserver(server.host, server.port)],
            timeout=0.3, lifetime=1.0,
        )
        answer = resolver.a("example.com")
        assert answer.status is Status.OK
        assert failing.queries and server.queries


def test_a_past_deadline_is_a_temporary_error_without_a_query(server: DevDNSServer) -> None:
    answer = make_resolver(server).a("example.com", deadline=Deadline.within(-1))
    assert answer.status is Status.TEMPERROR
    assert server.queries == []


def test_names_that_cannot_exist_are_nxdomain_without_a_query(server: DevDNSServer) -> None:
    answer = make_resolver(server).a("x" * 64 + ".example.com")
    assert answer.status is Status.NXDOMAIN
    assert "invalid domain name" in answer.error
    assert server.queries == []


def test_ipv6_loopback_server() -> None:
    try:
        server = DevDNSServer({"example.com": [{"A": "192.0.2.1"}]}, host="::1")
        server.start()
    except OSError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"no IPv6 loopback on this machine: {exc}")
    try:
        resolver = Resolver(nameservers=[parse_nameserver(f"[::1]:{server.port}")], timeout=0.5)
        assert resolver.a("example.com").ok
    finally:
        server.stop()


@pytest.mark.parametrize(("text", "host", "port"), [
    ("127.0.0.1", "127.0.0.1", 53),
    ("127.0.0.1:5353", "127.0.0.1", 5353),
    ("::1", "::1", 53),
    ("[::1]:5353", "::1", 5353),
])
def test_parse_nameserver(text: str, host: str, port: int) -> None:
    assert parse_nameserver(text) == Nameserver(host, port)


@pytest.mark.parametrize("text", ["localhost", "127.0.0.1:0", "127.0.0.1:x", "[::1", "[::1]x"])
def test_parse_nameserver_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_nameserver(text)


def test_retries_are_bounded_even_when_the_clock_stands_still(server: DevDNSServer) -> None:
    resolver = make_resolver(server, timeout=0.1, lifetime=0.3, clock=Clock())
    answer = resolver.txt("slow.example.com")
    assert answer.status is Status.TEMPERROR
    assert [q for q in server.queries if q[0] == "slow.example.com"] == [
        ("slow.example.com", "TXT", "udp")] * 3
