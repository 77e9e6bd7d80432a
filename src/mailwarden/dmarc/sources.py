"""Who sends as our domains, as other receivers saw it: the received aggregate reports summed
per source IP, with a verdict per source and per domain on whether p=quarantine or p=reject
is safe yet (the question to answer before tightening a policy)."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from mailwarden.dmarc.store import Store


class Verdict(StrEnum):
    ALIGNED = "aligned"  # passes DMARC with DKIM (survives forwarding)
    NEEDS_DKIM = "needs DKIM"  # passes only by SPF: forwarding breaks it; sign its mail
    PARTLY = "partly failing"  # some of its mail fails: a misconfigured service
    UNKNOWN = "unknown sender"  # (almost) never passes: probably spoofing


@dataclass
class Source:
    ip: str
    messages: int = 0
    dkim_pass: int = 0
    spf_pass: int = 0
    failing: int = 0  # neither aligned
    reporters: set[str] = field(default_factory=set)
    dkim_domains: set[str] = field(default_factory=set)
    spf_domains: set[str] = field(default_factory=set)
    name: str = ""  # reverse DNS, when looked up

    @property
    def verdict(self) -> Verdict:
        if self.failing * 10 >= self.messages * 9:
            return Verdict.UNKNOWN
        if self.failing:
            return Verdict.PARTLY
        if self.dkim_pass == self.messages:
            return Verdict.ALIGNED
        return Verdict.NEEDS_DKIM

    def as_dict(self) -> dict[str, Any]:
        return {"ip": self.ip, "name": self.name, "messages": self.messages,
                "dkim_aligned": self.dkim_pass, "spf_aligned": self.spf_pass,
                "failing": self.failing, "verdict": str(self.verdict),
                "reporters": sorted(self.reporters), "dkim_domains": sorted(self.dkim_domains),
                "spf_domains": sorted(self.spf_domains)}


@dataclass
class DomainSources:
    domain: str
    policy: str  # p= of the latest report
    sources: list[Source]

    @property
    def blocking(self) -> list[Source]:
        """Sources that a stricter policy would hurt: legitimate but not (only) aligned."""
        return [s for s in self.sources if s.verdict in (Verdict.NEEDS_DKIM, Verdict.PARTLY)]

    def advice(self) -> str:
        blocking = self.blocking
        if not self.sources:
            return f"{self.domain}: no reports received in the window"
        stricter = "reject" if self.policy == "quarantine" else "quarantine or reject"
        if not blocking:
            state = ("is at p=reject, and every legitimate source passes aligned with DKIM"
                     if self.policy == "reject" else
                     f"p={stricter} is safe: every legitimate source passes aligned with DKIM")
            return f"{self.domain}: {state}"
        names = ", ".join(f"{s.ip} ({s.verdict})" for s in blocking[:5])
        more = f" and {len(blocking) - 5} more" if len(blocking) > 5 else ""
        if self.policy == "reject":
            return f"{self.domain}: at p=reject, these legitimate sources are refused: " \
                   f"{names}{more}"
        return f"{self.domain}: not yet safe for p={stricter}: {names}{more} still fail"


def collect(store: Store, since: float, domain: str | None = None) -> list[DomainSources]:
    """The received reports whose period ended after `since`, per policy domain."""
    sql = ("SELECT r.policy_domain, r.reporter, r.policy, c.source_ip, c.count, c.dkim_eval, "
           "c.spf_eval, c.dkim, c.spf, r.period_end FROM received_records c JOIN "
           "received_reports r ON r.id = c.report WHERE r.period_end >= ?")
    params: list[object] = [since]
    if domain:
        sql += " AND r.policy_domain = ?"
        params.append(domain.lower().rstrip("."))
    per_domain: dict[str, dict[str, Source]] = defaultdict(dict)
    latest: dict[str, tuple[float, str]] = {}
    for (policy_domain, reporter, policy, ip, count, dkim_eval, spf_eval, dkim, spf,
         end) in store.read(sql, params):
        source = per_domain[policy_domain].setdefault(ip, Source(ip))
        count = int(count)
        source.messages += count
        source.reporters.add(reporter)
        dkim_ok, spf_ok = dkim_eval == "pass", spf_eval == "pass"
        source.dkim_pass += count if dkim_ok else 0
        source.spf_pass += count if spf_ok else 0
        source.failing += 0 if dkim_ok or spf_ok else count
        source.dkim_domains |= {d for d, _, r in json.loads(dkim) if r == "pass"}
        source.spf_domains |= {d for d, _, r in json.loads(spf) if r == "pass"}
        if end >= latest.get(policy_domain, (-1.0, ""))[0]:
            latest[policy_domain] = (end, json.loads(policy).get("p", "none"))
    return [DomainSources(name, latest[name][1],
                          sorted(sources.values(), key=lambda s: -s.messages))
            for name, sources in sorted(per_domain.items())]
