"""Zone data for the loopback DNS server (devdns.py), in the openspf SPF test-suite format: a
mapping from owner names to lists of entries, each entry either a ``{TYPE: value}`` mapping
(optionally with a ``ttl`` key) or a bare marker string (``TIMEOUT``, ``SERVFAIL``,
``REFUSED``, ``AD``)::

    example.com:
      - TXT: "v=spf1 -all"
      - MX: [10, mx.example.com]
      - TIMEOUT

compiled once into :class:`dns.rrset.RRset` objects per owner name (`compile_zone`), and read
from YAML files (`load_zone_file`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.CNAME
import dns.rdtypes.ANY.DNAME
import dns.rdtypes.ANY.NS
import dns.rdtypes.ANY.PTR
import dns.rdtypes.ANY.SPF
import dns.rdtypes.ANY.TXT
import dns.rdtypes.nsbase
import dns.rdtypes.txtbase
import dns.rrset
import yaml

__all__ = ["REFUSED", "SERVFAIL", "TIMEOUT", "Answer", "Node", "compile_zone", "load_zone_file",
           "lookup"]

DEFAULT_TTL: Final = 300
TIMEOUT: Final = "TIMEOUT"
SERVFAIL: Final = "SERVFAIL"
REFUSED: Final = "REFUSED"
_FAULTS: Final = frozenset({TIMEOUT, SERVFAIL, REFUSED})
_IN = dns.rdataclass.IN
_TXT = dns.rdatatype.TXT
_SPF = dns.rdatatype.SPF
_CNAME = dns.rdatatype.CNAME
_TXT_CLASSES: Final[dict[dns.rdatatype.RdataType, type[dns.rdtypes.txtbase.TXTBase]]] = {
    _TXT: dns.rdtypes.ANY.TXT.TXT,
    _SPF: dns.rdtypes.ANY.SPF.SPF,
}
_ANY = dns.rdatatype.ANY
MAX_CNAME_HOPS: Final = 8
_FAULT_RCODES: Final = {SERVFAIL: dns.rcode.SERVFAIL, REFUSED: dns.rcode.REFUSED}
_NAME_CLASSES: Final[dict[dns.rdatatype.RdataType, type[dns.rdtypes.nsbase.NSBase]]] = {
    _CNAME: dns.rdtypes.ANY.CNAME.CNAME,
    dns.rdatatype.PTR: dns.rdtypes.ANY.PTR.PTR,
    dns.rdatatype.NS: dns.rdtypes.ANY.NS.NS,
    dns.rdatatype.DNAME: dns.rdtypes.ANY.DNAME.DNAME,
}


@dataclass(frozen=True, slots=True)
class Node:
    """Compiled data for one owner name."""

    rrsets: dict[dns.rdatatype.RdataType, dns.rrset.RRset]
    target: dns.name.Name | None  # CNAME target
    fault: str | None  # first bare TIMEOUT/SERVFAIL/REFUSED marker, if any
    exempt: frozenset[dns.rdatatype.RdataType]  # types with records listed before ``fault``
    type_faults: dict[dns.rdatatype.RdataType, str]  # ``TXT: TIMEOUT`` style entries
    ad: bool

    def fault_for(self, rdtype: dns.rdatatype.RdataType) -> str | None:
        """Return the fault marker that applies to a query of *rdtype*, if any."""
        if rdtype in self.type_faults:
            return self.type_faults[rdtype]
        if self.fault is not None and rdtype not in self.exempt:
            return self.fault
        return None


def _chunks(value: object) -> list[bytes]:
    """Encode one TXT string (UTF-8) and split it into 255-byte character-strings."""
    if value is None:
        value = b""
    raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
    return [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]


def _make_rdata(rdtype: dns.rdatatype.RdataType, value: object) -> dns.rdata.Rdata:
    """Build one rdata of *rdtype* from a YAML value."""
    if rdtype in _TXT_CLASSES:
        items: Iterable[object] = value if isinstance(value, list | tuple) else [value]
        strings = [chunk for item in items for chunk in _chunks(item)] or [b""]
        return _TXT_CLASSES[rdtype](_IN, rdtype, strings)
    if rdtype in _NAME_CLASSES and not isinstance(value, list | tuple):
        return _NAME_CLASSES[rdtype](_IN, rdtype, dns.name.from_text(str(value)))
    if rdtype == dns.rdatatype.MX and isinstance(value, list | tuple) and len(value) == 2:
        pref, exchange = value
        exchange_name = dns.name.from_text(str(exchange) or ".")
        value = (int(pref), exchange_name.to_text())
    text = " ".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value)
    return dns.rdata.from_text(_IN, rdtype, text, origin=dns.name.root, relativize=False)


def _compile_node(owner: dns.name.Name, entries: Iterable[Any], spf_as_txt: bool) -> Node:
    """Compile the entry list of one owner name."""
    rdatas: dict[dns.rdatatype.RdataType, list[tuple[dns.rdata.Rdata, int]]] = {}
    listed: set[dns.rdatatype.RdataType] = set()
    fault: str | None = None
    exempt: frozenset[dns.rdatatype.RdataType] = frozenset()
    type_faults: dict[dns.rdatatype.RdataType, str] = {}
    ad = False
    mentions_txt = False
    for entry in entries:
        if isinstance(entry, str):
            marker = entry.strip().upper()
            if marker == "AD":
                ad = True
            elif marker in _FAULTS:
                if fault is None:
                    fault, exempt = marker, frozenset(listed)
            else:
                raise ValueError(f"{owner}: unknown marker {entry!r}")
            continue
        if not isinstance(entry, Mapping):
            raise ValueError(f"{owner}: bad entry {entry!r}")
        ttls = [v for k, v in entry.items() if str(k).lower() == "ttl"]
        ttl = int(ttls[0]) if ttls else DEFAULT_TTL
        for key, value in entry.items():
            if str(key).lower() == "ttl":
                continue
            rdtype = dns.rdatatype.from_text(str(key).upper())
            if rdtype == _TXT:
                mentions_txt = True
            if isinstance(value, str) and value.strip().upper() == "NONE":
                continue
            if isinstance(value, str) and value.strip().upper() in _FAULTS:
                type_faults.setdefault(rdtype, value.strip().upper())
                continue
            try:
                rdata = _make_rdata(rdtype, value)
            except Exception as exc:
                raise ValueError(f"{owner}: bad {key} value {value!r}: {exc}") from exc
            rdatas.setdefault(rdtype, []).append((rdata, ttl))
            listed.add(rdtype)
    if spf_as_txt and not mentions_txt and _SPF in rdatas:
        # Generated TXT copies count as listed last, i.e. after any fault marker.
        rdatas[_TXT] = [
            (dns.rdtypes.ANY.TXT.TXT(_IN, _TXT, rd.strings), ttl)
            for rd, ttl in rdatas[_SPF]
            if isinstance(rd, dns.rdtypes.txtbase.TXTBase)
        ]
    rrsets: dict[dns.rdatatype.RdataType, dns.rrset.RRset] = {}
    for rdtype, items in rdatas.items():
        rrset = dns.rrset.RRset(owner, _IN, rdtype)
        for rdata, ttl in items:
            rrset.add(rdata, ttl)
        rrsets[rdtype] = rrset
    target = None
    if _CNAME in rrsets:
        first = rrsets[_CNAME][0]
        assert isinstance(first, dns.rdtypes.nsbase.NSBase)
        target = first.target
    return Node(rrsets, target, fault, exempt, type_faults, ad)


def compile_zone(zone: Mapping[str, Any], spf_as_txt: bool) -> dict[dns.name.Name, Node]:
    """Compile a whole zone mapping (keys are case-insensitive owner names)."""
    merged: dict[dns.name.Name, list[Any]] = {}
    for key, entries in zone.items():
        try:
            owner = dns.name.from_text(str(key).lower())
        except dns.exception.DNSException as exc:
            raise ValueError(f"bad owner name {key!r}: {exc}") from exc
        if isinstance(entries, str | Mapping):  # a single entry not wrapped in a list
            entries = [entries]
        merged.setdefault(owner, []).extend(entries or ())
    return {owner: _compile_node(owner, entries, spf_as_txt) for owner, entries in merged.items()}


@dataclass(slots=True)
class Answer:
    """What the zone answers to one question."""

    rcode: dns.rcode.Rcode
    answer: list[dns.rrset.RRset]
    authority: list[dns.rrset.RRset]
    ad: bool


def lookup(zone: Mapping[dns.name.Name, Node], qname: dns.name.Name,
           qtype: dns.rdatatype.RdataType,
           negative: Callable[[dns.name.Name], dns.rrset.RRset]) -> Answer | None:
    """Look *qname*/*qtype* up in the compiled *zone*, following CNAMEs (at most
    MAX_CNAME_HOPS, loops stopped); *negative* gives the SOA of a negative answer; ``None``
    means drop the query (a TIMEOUT fault)."""
    answer: list[dns.rrset.RRset] = []
    ad = True
    seen: set[dns.name.Name] = set()
    name = qname
    while True:
        node = zone.get(name)
        if node is None:
            return Answer(dns.rcode.NXDOMAIN, answer, [negative(name)], False)
        ad = ad and node.ad
        chase = node.target is not None and qtype not in (_CNAME, _ANY)
        fault = node.fault_for(_CNAME if chase else qtype)
        if fault == TIMEOUT:
            return None
        if fault is not None:
            return Answer(_FAULT_RCODES[fault], [], [], False)
        if chase and node.target is not None:
            if len(answer) >= MAX_CNAME_HOPS:
                return Answer(dns.rcode.NOERROR, answer, [], ad)
            answer.append(node.rrsets[_CNAME])
            seen.add(name)
            name = node.target
            if name in seen:  # loop: stop with what we have
                return Answer(dns.rcode.NOERROR, answer, [], ad)
            continue
        if qtype == _ANY:
            found = list(node.rrsets.values())
        else:
            found = [node.rrsets[qtype]] if qtype in node.rrsets else []
        if not found:
            return Answer(dns.rcode.NOERROR, answer, [negative(name)], ad)
        return Answer(dns.rcode.NOERROR, answer + found, [], ad)


def load_zone_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML zone file: a bare mapping, or one document with a ``zonedata:`` key."""
    with open(path, encoding="utf-8") as fh:
        docs = [doc for doc in yaml.safe_load_all(fh) if doc is not None]
    if not docs:
        return {}
    if len(docs) > 1:
        raise ValueError(f"{path}: expected a single YAML document, found {len(docs)}")
    doc = docs[0]
    if isinstance(doc, Mapping) and isinstance(doc.get("zonedata"), Mapping):
        doc = doc["zonedata"]
    if not isinstance(doc, Mapping):
        raise ValueError(f"{path}: zone data must be a mapping")
    return {str(k): v for k, v in doc.items()}
