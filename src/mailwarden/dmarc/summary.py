"""``mailwarden dmarc summary``: what the store says about each domain's senders.

Per policy domain, one row per sending source -- (RFC5322.From domain, source IP) -- with its
message count, how many passed DMARC (DKIM or SPF aligned and passing, RFC 9989), the DKIM- and
SPF-aligned pass counts, and the dispositions applied; the domain's published p= is the one of
its latest evaluation in the window. A domain whose every source passes every time is reported
as ready for p=reject; otherwise the failing sources are counted, for the administrator to look
at before tightening the policy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from mailwarden.dmarc.store import Store

__all__ = ["DomainSummary", "SourceSummary", "format_text", "summarize", "to_json"]

DAY = 86400.0


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


@dataclass(frozen=True, slots=True)
class SourceSummary:
    """The evaluations of one source (From domain, IP) of one policy domain."""

    policy_domain: str
    header_from: str
    source_ip: str
    messages: int
    dmarc_pass: int  # DKIM or SPF aligned pass
    dkim_pass: int  # DKIM aligned pass
    spf_pass: int  # SPF aligned pass
    none: int  # dispositions applied
    quarantine: int
    reject: int
    p: str  # the policy domain's published p=

    @property
    def dmarc_fail(self) -> int:
        return self.messages - self.dmarc_pass

    @property
    def pass_rate(self) -> float:
        return _rate(self.dmarc_pass, self.messages)

    @property
    def dkim_rate(self) -> float:
        return _rate(self.dkim_pass, self.messages)

    @property
    def spf_rate(self) -> float:
        return _rate(self.spf_pass, self.messages)

    def as_dict(self) -> dict[str, Any]:
        return {
            "header_from": self.header_from, "source_ip": self.source_ip,
            "messages": self.messages, "dmarc_pass": self.dmarc_pass,
            "dmarc_fail": self.dmarc_fail, "pass_rate": round(self.pass_rate, 4),
            "dkim_pass": self.dkim_pass, "dkim_rate": round(self.dkim_rate, 4),
            "spf_pass": self.spf_pass, "spf_rate": round(self.spf_rate, 4),
            "dispositions": {"none": self.none, "quarantine": self.quarantine,
                             "reject": self.reject},
        }


@dataclass(frozen=True, slots=True)
class DomainSummary:
    """One policy domain: its sources (most messages first) and their totals."""

    policy_domain: str
    p: str
    sources: tuple[SourceSummary, ...]

    @property
    def messages(self) -> int:
        return sum(s.messages for s in self.sources)

    @property
    def dmarc_pass(self) -> int:
        return sum(s.dmarc_pass for s in self.sources)

    @property
    def pass_rate(self) -> float:
        return _rate(self.dmarc_pass, self.messages)

    @property
    def failing(self) -> tuple[SourceSummary, ...]:
        """The sources with at least one message failing DMARC."""
        return tuple(s for s in self.sources if s.dmarc_fail)

    @property
    def ready(self) -> bool:
        """Every message of every source passed DMARC."""
        return not self.failing

    def verdict(self) -> str:
        if self.ready:
            return "ready for p=reject: every source passes DMARC"
        failing = self.failing
        noun = "source" if len(self.sources) == 1 else "sources"
        verb = "fails" if len(failing) == 1 else "fail"
        return (f"{len(failing)} of {len(self.sources)} {noun} {verb} DMARC "
                f"({_messages(sum(s.dmarc_fail for s in failing))}): "
                "check them before p=reject")

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy_domain": self.policy_domain, "p": self.p, "messages": self.messages,
            "dmarc_pass": self.dmarc_pass, "pass_rate": round(self.pass_rate, 4),
            "failing_sources": len(self.failing), "ready_for_reject": self.ready,
            "sources": [s.as_dict() for s in self.sources],
        }


def summarize(store: Store, days: float, *, now: float | None = None,
              policy_domain: str | None = None) -> list[DomainSummary]:
    """The evaluations of the last `days` days, per policy domain (of one if given): domains
    and, within each, sources sorted by message count, most first (ties by name)."""
    start = (time.time() if now is None else now) - days * DAY
    domain = policy_domain.lower().rstrip(".") if policy_domain else None
    rows = [SourceSummary(*row) for row in store.source_totals(start, domain)]
    by_domain: dict[str, list[SourceSummary]] = {}
    for row in rows:
        by_domain.setdefault(row.policy_domain, []).append(row)
    domains = [
        DomainSummary(name, sources[0].p, tuple(sorted(
            sources, key=lambda s: (-s.messages, s.header_from, s.source_ip))))
        for name, sources in by_domain.items()
    ]
    return sorted(domains, key=lambda d: (-d.messages, d.policy_domain))


def _percent(rate: float) -> str:
    return f"{100 * rate:.1f}%"


def _messages(n: int) -> str:
    return f"{n} message" if n == 1 else f"{n} messages"


def format_text(domains: list[DomainSummary], days: float) -> str:
    """A table per domain under a line with its total and its p=reject verdict."""
    if not domains:
        return f"no evaluations in the last {days:g} days"
    ip_width = max(len("source IP"), *(len(s.source_ip) for d in domains for s in d.sources))
    from_width = max(len("From domain"),
                     *(len(s.header_from) for d in domains for s in d.sources))
    blocks: list[str] = []
    for d in domains:
        lines = [
            f"{d.policy_domain} (p={d.p or '?'}): {_messages(d.messages)}, "
            f"{_percent(d.pass_rate)} pass DMARC; {d.verdict()}",
            f"  {'source IP':<{ip_width}}  {'From domain':<{from_width}}  {'messages':>8}  "
            f"{'DMARC':>6}  {'DKIM':>6}  {'SPF':>6}  none/quarantine/reject",
        ]
        for s in d.sources:
            lines.append(
                f"  {s.source_ip:<{ip_width}}  {s.header_from:<{from_width}}  "
                f"{s.messages:>8}  {_percent(s.pass_rate):>6}  {_percent(s.dkim_rate):>6}  "
                f"{_percent(s.spf_rate):>6}  {s.none}/{s.quarantine}/{s.reject}")
        blocks.append("\n".join(lines))
    return f"DMARC evaluations of the last {days:g} days\n\n" + "\n\n".join(blocks)


def to_json(domains: list[DomainSummary], days: float) -> dict[str, Any]:
    """The summary as one JSON-ready object."""
    return {"days": days, "messages": sum(d.messages for d in domains),
            "domains": [d.as_dict() for d in domains]}
