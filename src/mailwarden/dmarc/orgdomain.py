"""Policy discovery and the Organizational Domain.

RFC 9989 (default): the DNS Tree Walk (§4.10). Names are queried from the domain upwards; a
domain of 8 or more labels jumps, after its own query, straight to its last 7 labels, so no walk
makes more than 8 queries. Policy discovery takes the first valid record. The Organizational
Domain is the first domain whose record says psd=n; or, for a record saying psd=y, the domain
one label below it; otherwise the domain with the fewest labels that has a record; and the
domain itself when there is none.

Legacy (RFC 7489 §3.2): the Organizational Domain is the registrable domain under the Public
Suffix List (publicsuffixlist, with its data), and a policy is looked up at the domain, then at
the Organizational Domain.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from publicsuffixlist import PublicSuffixList

from mailwarden.deadline import Deadline
from mailwarden.dmarc.record import DmarcRecord, is_dmarc, parse
from mailwarden.dns import DNSClient, Status

MAX_QUERIES = 8


class TemporaryError(Exception):
    """A DMARC record lookup failed temporarily (turned into temperror by the caller)."""


def walk_names(domain: str) -> list[str]:
    """The names the tree walk queries, in order (at most 8)."""
    labels = domain.lower().rstrip(".").split(".")
    names = [".".join(labels)]
    rest = labels[-7:] if len(labels) >= 8 else labels[1:]
    while rest:
        names.append(".".join(rest))
        rest = rest[1:]
    return names[:MAX_QUERIES]


@dataclass(frozen=True, slots=True)
class Found:
    domain: str
    record: DmarcRecord


def fetch(dns: DNSClient, domain: str, deadline: Deadline | None = None) -> DmarcRecord | None:
    """The one valid DMARC record at _dmarc.DOMAIN (RFC 9989 §4.10: several records, or none
    valid, mean none). Raises TemporaryError."""
    answer = dns.txt(f"_dmarc.{domain}", deadline)
    if answer.status is Status.TEMPERROR:
        raise TemporaryError(f"_dmarc.{domain}: {answer.error}")
    candidates = [text for text in answer.records if is_dmarc(text)]
    if len(candidates) != 1:
        return None
    record = parse(candidates[0])
    return record if isinstance(record, DmarcRecord) else None


class Discovery:
    """Policy and Organizational Domain lookups for one evaluation (answers come from the
    shared resolver's cache across evaluations)."""

    def __init__(self, dns: DNSClient, mode: str = "rfc9989",
                 deadline: Deadline | None = None) -> None:
        self.dns, self.mode, self.deadline = dns, mode, deadline
        self.queries = 0
        self._records: dict[str, DmarcRecord | None] = {}

    def record(self, domain: str) -> DmarcRecord | None:
        if domain not in self._records:
            self.queries += 1
            self._records[domain] = fetch(self.dns, domain, self.deadline)
        return self._records[domain]

    def policy(self, domain: str) -> Found | None:
        """The record that governs mail from `domain`, and where it was found."""
        names = walk_names(domain) if self.mode == "rfc9989" else \
            list(dict.fromkeys([domain, self.organizational_domain(domain)]))
        for name in names:
            record = self.record(name)
            if record is not None:
                return Found(name, record)
        return None

    def organizational_domain(self, domain: str) -> str:
        domain = domain.lower().rstrip(".")
        if self.mode != "rfc9989":
            return legacy_organizational_domain(domain)
        labels = domain.split(".")
        last_found = ""
        for name in walk_names(domain):
            record = self.record(name)
            if record is None:
                continue
            if record.psd == "n":
                return name
            if record.psd == "y":
                size = name.count(".") + 1
                return ".".join(labels[-(size + 1):]) if size < len(labels) else name
            last_found = name
        return last_found or domain

    def aligned(self, identifier: str, author: str, mode: str) -> bool:
        """RFC 9989 §4.4: strict is equality; relaxed is the same Organizational Domain."""
        identifier, author = identifier.lower().rstrip("."), author.lower().rstrip(".")
        if not identifier:
            return False
        if identifier == author:
            return True
        if mode == "s":
            return False
        return self.organizational_domain(identifier) == self.organizational_domain(author)


@functools.lru_cache(maxsize=1)
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


def legacy_organizational_domain(domain: str) -> str:
    """RFC 7489 §3.2: the public suffix plus one label (private-section entries included)."""
    private = _psl().privatesuffix(domain.lower().rstrip("."))
    return private or domain.lower().rstrip(".")
