"""The one DNS resolver every check uses.

A `Resolver` sends queries itself (dnspython's wire layer, not its stub resolver) so that it can
give every caller the same typed answer: records, NXDOMAIN, NODATA (the name exists but has no
records of that type) or a temporary error (timeout, SERVFAIL, REFUSED, network failure). SPF
needs that distinction to count void lookups (RFC 7208 §4.6.4) and to tell `temperror` from
"no match".

Answers are cached for their TTL in one bounded LRU cache shared by every transaction; negative
answers are cached for the SOA-derived negative TTL (RFC 2308 §5). Temporary errors are never
cached. The DNSSEC AD bit of the upstream answer is kept as `authentic` (RFC 4035 §3.2.3, asked
for with the AD bit in the query as RFC 6840 §5.7 allows).
"""

from __future__ import annotations

import enum
import ipaddress
import math
import secrets
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from mailwarden import dnswire, metrics
from mailwarden.deadline import Deadline

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Status(enum.StrEnum):
    """What a lookup found."""

    OK = "ok"
    NXDOMAIN = "nxdomain"
    NODATA = "nodata"
    TEMPERROR = "temperror"


@dataclass(frozen=True, slots=True)
class MX:
    """One MX record (RFC 5321 §5.1)."""

    preference: int
    exchange: str


@dataclass(frozen=True, slots=True)
class Answer(Generic[T_co]):
    """The typed result of one lookup.

    `records` is empty unless `status` is OK. `error` says why for TEMPERROR (and for a name
    that cannot exist in the DNS, reported as NXDOMAIN). `authentic` is the DNSSEC AD bit.
    """

    name: str
    rdtype: str
    status: Status
    records: tuple[T_co, ...] = ()
    authentic: bool = False
    error: str = ""
    from_cache: bool = False

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    @property
    def void(self) -> bool:
        """NXDOMAIN or NODATA: a "void lookup" in the sense of RFC 7208 §4.6.4."""
        return self.status in (Status.NXDOMAIN, Status.NODATA)


class DNSClient(Protocol):
    """The lookups the checks need; `Resolver` implements it, unit tests may fake it."""

    def a(self, name: str, deadline: Deadline | None = None
          ) -> Answer[ipaddress.IPv4Address]: ...
    def aaaa(self, name: str, deadline: Deadline | None = None
             ) -> Answer[ipaddress.IPv6Address]: ...
    def mx(self, name: str, deadline: Deadline | None = None) -> Answer[MX]: ...
    def ptr(self, name: str, deadline: Deadline | None = None) -> Answer[str]: ...
    def txt(self, name: str, deadline: Deadline | None = None) -> Answer[str]: ...


@dataclass(frozen=True, slots=True)
class Nameserver:
    host: str
    port: int = 53

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_nameserver(text: str, default_port: int = 53) -> Nameserver:
    """Parse `HOST`, `HOST:PORT`, `[V6]:PORT` or a bare IPv6 address."""
    text = text.strip()
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unbalanced '[' in nameserver {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"unexpected {rest!r} after ']' in nameserver {text!r}")
            port = _parse_port(rest[1:], text)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = _parse_port(port_text, text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"nameserver {text!r} is not an IP address") from None
    return Nameserver(host, port)


def _parse_port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port {text!r} in nameserver {whole!r}")
    return int(text)


def system_nameservers() -> list[Nameserver]:
    """The nameservers of /etc/resolv.conf, or 127.0.0.1 when there is none."""
    try:
        found = dns.resolver.Resolver(configure=True).nameservers
    except (dns.resolver.NoResolverConfiguration, OSError):
        found = []
    servers = [Nameserver(str(ns)) for ns in found if _is_ip(str(ns))]
    return servers or [Nameserver("127.0.0.1")]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_address_like(name: str) -> bool:
    """A name whose last label is all digits (`198.51.100.150`) is an address written as a
    name, not a domain (RFC 1123 §2.1, RFC 3696 §2: no top-level domain is all-numeric)."""
    return name.rstrip(".").rpartition(".")[2].isdigit()


def reverse_name(ip: IPAddress) -> str:
    """The in-addr.arpa / ip6.arpa name of an address (RFC 1035 §3.5, RFC 3596 §2.5)."""
    return ip.reverse_pointer


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    queries_sent: int = 0
    tcp_retries: int = 0


_TYPES: dict[str, dns.rdatatype.RdataType] = {
    "A": dns.rdatatype.A,
    "AAAA": dns.rdatatype.AAAA,
    "MX": dns.rdatatype.MX,
    "PTR": dns.rdatatype.PTR,
    "TXT": dns.rdatatype.TXT,
    "CNAME": dns.rdatatype.CNAME,
}


@dataclass
class Resolver:
    """A caching DNS client over dnspython; safe to share between threads.

    timeout: seconds for one query to one server; lifetime: seconds for one lookup across every
    retry and server; a caller's `deadline` shortens both. Every socket operation (the UDP
    receive, the TCP connect, each TCP read) waits at most what is left of them.
    """

    nameservers: Sequence[Nameserver] = field(default_factory=system_nameservers)
    timeout: float = 2.0
    lifetime: float = 5.0
    cache_size: int = 10_000
    max_ttl: int = 86_400
    max_negative_ttl: int = 900
    default_negative_ttl: int = 60
    clock: Callable[[], float] = time.monotonic
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        if not self.nameservers:
            raise ValueError("at least one nameserver is required")
        self._cache: OrderedDict[tuple[str, str], tuple[float, Answer[object]]] = OrderedDict()
        self._lock = threading.Lock()

    # -- typed lookups -------------------------------------------------------------------
    def a(self, name: str, deadline: Deadline | None = None) -> Answer[ipaddress.IPv4Address]:
        return self.lookup(name, "A", deadline)  # type: ignore[return-value]

    def aaaa(self, name: str, deadline: Deadline | None = None
             ) -> Answer[ipaddress.IPv6Address]:
        return self.lookup(name, "AAAA", deadline)  # type: ignore[return-value]

    def mx(self, name: str, deadline: Deadline | None = None) -> Answer[MX]:
        return self.lookup(name, "MX", deadline)  # type: ignore[return-value]

    def ptr(self, name: str, deadline: Deadline | None = None) -> Answer[str]:
        return self.lookup(name, "PTR", deadline)  # type: ignore[return-value]

    def txt(self, name: str, deadline: Deadline | None = None) -> Answer[str]:
        return self.lookup(name, "TXT", deadline)  # type: ignore[return-value]

    # -- cache ---------------------------------------------------------------------------
    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def cache_len(self) -> int:
        with self._lock:
            return len(self._cache)

    def _cached(self, key: tuple[str, str]) -> Answer[object] | None:
        with self._lock:
            entry = self._cache.get(key)
            if entry is None:
                self.stats.misses += 1
                metrics.METRICS.dns_cache(False)
                return None
            expires, answer = entry
            if expires <= self.clock():
                del self._cache[key]
                self.stats.misses += 1
                metrics.METRICS.dns_cache(False)
                return None
            self._cache.move_to_end(key)
            self.stats.hits += 1
            metrics.METRICS.dns_cache(True)
            return answer

    def _store(self, key: tuple[str, str], answer: Answer[object], ttl: int) -> None:
        if ttl <= 0 or self.cache_size <= 0:
            return
        cached = Answer(
            answer.name, answer.rdtype, answer.status, answer.records, answer.authentic,
            answer.error, from_cache=True,
        )
        with self._lock:
            self._cache[key] = (self.clock() + ttl, cached)
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    # -- the lookup ----------------------------------------------------------------------
    def lookup(self, name: str, rdtype: str, deadline: Deadline | None = None
               ) -> Answer[object]:
        """Look `name` up, from the cache when a live entry exists."""
        name = name.lower().rstrip(".")
        key = (name, rdtype)
        hit = self._cached(key)
        if hit is not None:
            return hit
        try:
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
            # A name that cannot be encoded cannot exist (RFC 1035 §2.3.4 limits).
            return Answer(name, rdtype, Status.NXDOMAIN, error=f"invalid domain name: {exc}")
        started = time.perf_counter()
        answer, ttl = self._resolve(name, qname, rdtype, deadline)
        metrics.METRICS.dns_lookup(rdtype, answer.status.value, time.perf_counter() - started)
        if answer.status is not Status.TEMPERROR:
            self._store(key, answer, ttl)
        return answer

    def _resolve(
        self, name: str, qname: dns.name.Name, rdtype: str, deadline: Deadline | None
    ) -> tuple[Answer[object], int]:
        limit = Deadline.within(self.lifetime, self.clock).earlier(deadline)
        qtype = _TYPES[rdtype]
        wire_name = qname.to_wire()
        assert wire_name is not None  # to_wire() returns bytes when given no file
        question = wire_name + struct.pack("!HH", qtype, dns.rdataclass.IN)
        last_error = "no nameserver answered"
        failed: set[Nameserver] = set()
        # Bounded by the attempts that fit in the lifetime, whatever the clock does.
        attempts = len(self.nameservers) * max(1, math.ceil(self.lifetime / self.timeout))
        while len(failed) < len(self.nameservers):
            for server in self.nameservers:
                if server in failed:
                    continue
                if limit.expired or attempts <= 0:
                    return self._temperror(name, rdtype, f"timeout ({last_error})"), 0
                attempts -= 1
                response, error = self._exchange(question, server, limit)
                if response is None:
                    last_error = f"{server}: {error}"
                    if error != "timeout":
                        failed.add(server)
                    continue
                rcode = response.rcode()
                if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                    return self._to_answer(name, rdtype, response)
                last_error = f"{server}: {dns.rcode.to_text(rcode)}"
                failed.add(server)
        return self._temperror(name, rdtype, last_error), 0

    def _exchange(
        self, question: bytes, server: Nameserver, limit: Deadline
    ) -> tuple[dns.message.Message | None, str]:
        """One query to one server over UDP, and over TCP when the UDP answer is truncated;
        each within `timeout` and what is left of `limit`."""
        self.stats.queries_sent += 1
        qid = secrets.randbits(16)
        wire = dnswire.query(qid, question)
        address = (server.host, server.port)
        try:
            data = dnswire.udp_exchange(wire, qid, question, address,
                                        Deadline.within(self.timeout, self.clock).earlier(limit))
            response = dns.message.from_wire(data)
            if response.flags & dns.flags.TC:
                self.stats.tcp_retries += 1
                data = dnswire.tcp_exchange(
                    wire, qid, question, address,
                    Deadline.within(self.timeout, self.clock).earlier(limit))
                response = dns.message.from_wire(data)
        except TimeoutError:
            return None, "timeout"
        except (OSError, EOFError, ValueError, dns.exception.DNSException) as exc:
            return None, f"{type(exc).__name__}: {exc}"
        return response, ""

    def _temperror(self, name: str, rdtype: str, error: str) -> Answer[object]:
        return Answer(name, rdtype, Status.TEMPERROR, error=error)

    def _to_answer(
        self, name: str, rdtype: str, response: dns.message.Message
    ) -> tuple[Answer[object], int]:
        authentic = bool(response.flags & dns.flags.AD)
        if not isinstance(response, dns.message.QueryMessage):
            return self._temperror(name, rdtype, "answer is not a query response"), 0
        try:
            chain = response.resolve_chaining()
        except dns.exception.DNSException as exc:
            return self._temperror(name, rdtype, f"unusable answer: {exc}"), 0
        if chain.answer is not None and len(chain.answer) > 0:
            records = tuple(_convert(rdtype, rd) for rd in chain.answer)
            ttl = min(chain.minimum_ttl, self.max_ttl)
            return Answer(name, rdtype, Status.OK, records, authentic), ttl
        status = Status.NXDOMAIN if response.rcode() == dns.rcode.NXDOMAIN else Status.NODATA
        has_soa = any(rrset.rdtype == dns.rdatatype.SOA for rrset in response.authority)
        ttl = chain.minimum_ttl if has_soa else self.default_negative_ttl
        return Answer(name, rdtype, status, (), authentic), min(ttl, self.max_negative_ttl)


def _convert(rdtype: str, rdata: object) -> object:
    if rdtype == "TXT":
        # RFC 7208 §3.3: the character-strings of one record are joined without spaces.
        # Latin-1 keeps every octet as one character, so non-ASCII stays detectable.
        return b"".join(rdata.strings).decode("latin-1")  # type: ignore[attr-defined]
    if rdtype == "A":
        return ipaddress.IPv4Address(rdata.address)  # type: ignore[attr-defined]
    if rdtype == "AAAA":
        return ipaddress.IPv6Address(rdata.address)  # type: ignore[attr-defined]
    if rdtype == "MX":
        exchange = rdata.exchange.to_text(omit_final_dot=True).lower()  # type: ignore[attr-defined]
        return MX(int(rdata.preference), "" if exchange == "@" else exchange)  # type: ignore[attr-defined]
    return rdata.target.to_text(omit_final_dot=True).lower()  # type: ignore[attr-defined]
