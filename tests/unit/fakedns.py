"""An in-memory `DNSClient` for the pure-logic SPF tests.

The zone is a dict of name -> {rdtype: [records]} or name -> "TEMPERROR":

    FakeDNS({
        "example.com": {"TXT": ["v=spf1 -all"], "A": ["192.0.2.1"],
                        "MX": [(10, "mx.example.com")]},
        "slow.example.com": "TEMPERROR",            # every type of this name fails
        "half.example.com": {"A": "TEMPERROR"},     # only A fails; other types: NODATA
    }, authentic={"example.com"})

A name that is not in the zone is NXDOMAIN; a name that is there without the asked type is
NODATA. Names are case-insensitive and a trailing dot is ignored. Every query is recorded in
`queries` as (name, rdtype), lower-cased and without the trailing dot, and the deadline each
lookup was given in `deadlines`.

Records come back typed like `mailwarden.dns.Resolver` returns them: IPv4Address for A,
IPv6Address for AAAA, `MX` for MX (exchange lower-cased, no trailing dot), str for PTR
(lower-cased, no trailing dot) and TXT (a list or tuple of strings is one record made of several
character-strings, joined without spaces as RFC 7208 §3.3 says).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from mailwarden.deadline import Deadline
from mailwarden.dns import MX, Answer, Status

TEMPERROR = "TEMPERROR"
RDTYPES = ("A", "AAAA", "MX", "PTR", "TXT")

ZoneEntry = Mapping[str, Sequence[Any] | str] | str
Zone = Mapping[str, ZoneEntry]


def normalize(name: str) -> str:
    return name.lower().rstrip(".")


def _convert(rdtype: str, value: Any) -> Any:
    if rdtype == "A":
        return ipaddress.IPv4Address(value)
    if rdtype == "AAAA":
        return ipaddress.IPv6Address(value)
    if rdtype == "MX":
        if isinstance(value, MX):
            return MX(value.preference, normalize(value.exchange))
        preference, exchange = value
        return MX(int(preference), normalize(str(exchange)))
    if rdtype == "PTR":
        return normalize(str(value))
    if isinstance(value, list | tuple):
        return "".join(value)
    return str(value)


class FakeDNS:
    """A `DNSClient` answering from a dict; see the module docstring."""

    def __init__(self, zone: Zone | None = None, authentic: Collection[str] = ()) -> None:
        self.zone: dict[str, dict[str, tuple[Any, ...] | str] | str] = {}
        self.authentic = {normalize(name) for name in authentic}
        self.queries: list[tuple[str, str]] = []
        self.deadlines: list[Deadline | None] = []
        # called as hook(name, rdtype) before each answer; tests use it to move a fake clock
        self.hook: Callable[[str, str], None] | None = None
        for name, entry in (zone or {}).items():
            self.add(name, entry)

    def add(self, name: str, entry: ZoneEntry) -> None:
        """Add (or replace) the data of one name."""
        if isinstance(entry, str):
            if entry != TEMPERROR:
                raise ValueError(f"unknown per-name status {entry!r}")
            self.zone[normalize(name)] = TEMPERROR
            return
        types: dict[str, tuple[Any, ...] | str] = {}
        for rdtype, values in entry.items():
            rdtype = rdtype.upper()
            if rdtype not in RDTYPES:
                raise ValueError(f"unsupported record type {rdtype!r}")
            if isinstance(values, str):
                if values != TEMPERROR:
                    raise ValueError(f"{rdtype} records must be a list, not {values!r}")
                types[rdtype] = TEMPERROR
            else:
                types[rdtype] = tuple(_convert(rdtype, value) for value in values)
        self.zone[normalize(name)] = types

    # -- the DNSClient protocol -----------------------------------------------------------
    def a(self, name: str, deadline: Deadline | None = None) -> Answer[ipaddress.IPv4Address]:
        return self._lookup(name, "A", deadline)

    def aaaa(self, name: str, deadline: Deadline | None = None) -> Answer[ipaddress.IPv6Address]:
        return self._lookup(name, "AAAA", deadline)

    def mx(self, name: str, deadline: Deadline | None = None) -> Answer[MX]:
        return self._lookup(name, "MX", deadline)

    def ptr(self, name: str, deadline: Deadline | None = None) -> Answer[str]:
        return self._lookup(name, "PTR", deadline)

    def txt(self, name: str, deadline: Deadline | None = None) -> Answer[str]:
        return self._lookup(name, "TXT", deadline)

    def _lookup(self, name: str, rdtype: str, deadline: float | None) -> Answer[Any]:
        key = normalize(name)
        self.queries.append((key, rdtype))
        self.deadlines.append(deadline)
        if self.hook is not None:
            self.hook(key, rdtype)
        authentic = key in self.authentic
        entry = self.zone.get(key)
        if entry is None:
            return Answer(key, rdtype, Status.NXDOMAIN, authentic=authentic)
        if entry == TEMPERROR:
            return Answer(key, rdtype, Status.TEMPERROR, error="fake SERVFAIL")
        assert isinstance(entry, dict)
        records = entry.get(rdtype)
        if records is None or records == ():
            return Answer(key, rdtype, Status.NODATA, authentic=authentic)
        if records == TEMPERROR:
            return Answer(key, rdtype, Status.TEMPERROR, error="fake timeout")
        assert isinstance(records, tuple)
        return Answer(key, rdtype, Status.OK, records, authentic=authentic)

    # -- helpers for assertions ------------------------------------------------------------
    def count(self, name: str | None = None, rdtype: str | None = None) -> int:
        """How many queries matched `name` and/or `rdtype` (None: any)."""
        want = normalize(name) if name is not None else None
        return sum(
            1 for qname, qtype in self.queries
            if (want is None or qname == want) and (rdtype is None or qtype == rdtype.upper())
        )

    def reset(self) -> None:
        self.queries.clear()
        self.deadlines.clear()
