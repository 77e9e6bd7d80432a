"""check_host() (RFC 7208 §4) and identity selection (§2.3, §2.4): the entry points, and the
`SPFResult` with its Received-SPF field. The evaluation itself is in evaluate.py.

Every evaluation ends in an `SPFResult`; no input raises out of this module. Limits (§4.6.4)
and the wall-clock budget are parameters with the RFC's defaults.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mailwarden.deadline import Deadline
from mailwarden.dns import DNSClient, IPAddress
from mailwarden.spf.evaluate import Evaluation, Limits, Outcome, Result, valid_domain
from mailwarden.spf.received import received_spf

DEFAULT_LIMITS = Limits()  # the RFC's (frozen: one shared default)

__all__ = ["Limits", "Result", "SPFResult", "check_helo", "check_host", "check_mailfrom",
           "valid_domain"]


@dataclass(frozen=True, slots=True)
class SPFResult:
    """The outcome of one evaluation and how it was reached."""

    result: Result
    identity: str  # "mailfrom" or "helo"
    domain: str
    sender: str
    ip: str
    helo: str
    mechanism: str | None  # the term that decided: a directive, "redirect=...", or None
    cause: str  # why: the matched term, or the error
    explanation: str | None  # from exp= (§6.2), for "fail" only
    lookups: int
    void_lookups: int
    authentic: bool  # every DNS answer used carried the DNSSEC AD bit
    received_spf: str  # the Received-SPF header field value (§9.1)

    def header(self) -> tuple[str, str]:
        return ("Received-SPF", self.received_spf)

    def as_dict(self) -> dict[str, Any]:
        return {
            "result": str(self.result),
            "mechanism": self.mechanism,
            "cause": self.cause,
            "explanation": self.explanation,
            "domain": self.domain,
            "identity": self.identity,
            "sender": self.sender,
            "ip": self.ip,
            "helo": self.helo,
            "lookups": self.lookups,
            "void_lookups": self.void_lookups,
            "authentic": self.authentic,
            "received_spf": "Received-SPF: " + self.received_spf,
        }




def check_mailfrom(
    dns: DNSClient,
    ip: str | IPAddress,
    mail_from: str,
    helo: str,
    *,
    receiver: str = "unknown",
    limits: Limits = DEFAULT_LIMITS,
    clock: Callable[[], float] = time.monotonic,
    deadline: Deadline | None = None,
) -> SPFResult:
    """The MAIL FROM identity (§2.4); the null reverse-path stands for postmaster@HELO."""
    sender = mail_from.strip().strip("<>") or f"postmaster@{helo}"
    local, at, domain = sender.rpartition("@")
    if not at:
        domain = sender
    if not local:
        sender = f"postmaster@{domain}"
    return check_host(dns, ip, domain, sender, helo=helo, identity="mailfrom",
                      receiver=receiver, limits=limits, clock=clock, deadline=deadline)


def check_helo(
    dns: DNSClient,
    ip: str | IPAddress,
    helo: str,
    *,
    receiver: str = "unknown",
    limits: Limits = DEFAULT_LIMITS,
    clock: Callable[[], float] = time.monotonic,
    deadline: Deadline | None = None,
) -> SPFResult:
    """The HELO identity (§2.3): check_host() of the HELO name with sender postmaster@HELO."""
    return check_host(dns, ip, helo, f"postmaster@{helo}", helo=helo, identity="helo",
                      receiver=receiver, limits=limits, clock=clock, deadline=deadline)


def check_host(
    dns: DNSClient,
    ip: str | IPAddress,
    domain: str,
    sender: str,
    *,
    helo: str = "",
    identity: str = "mailfrom",
    receiver: str = "unknown",
    limits: Limits = DEFAULT_LIMITS,
    clock: Callable[[], float] = time.monotonic,
    deadline: Deadline | None = None,
) -> SPFResult:
    """Evaluate the SPF policy of `domain` for a message from `ip` (§4), within the time
    budget (`limits.budget`) and the caller's `deadline`, whichever ends first."""
    address = _parse_ip(ip)
    if address is None:
        outcome = Outcome(Result.PERMERROR, cause=f"client address {str(ip)!r} is not an IP")
        return _finish(outcome, None, domain, sender, str(ip), helo, identity, receiver)
    local, at, sender_domain = sender.rpartition("@")
    if not local:
        # §4.3: a sender without a local-part stands for postmaster@ its domain.
        sender = f"postmaster@{sender_domain if at else sender}"
    evaluation = Evaluation(dns, address, sender, helo, receiver, limits, clock, deadline)
    try:
        outcome = evaluation.run(domain)
    except RecursionError:
        outcome = Outcome(Result.PERMERROR, cause="evaluation nested too deeply")
    return _finish(outcome, evaluation, domain, sender, str(address), helo, identity, receiver)


def _parse_ip(ip: str | IPAddress) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # §5: an IPv4-mapped IPv6 address is evaluated as the IPv4 address.
        return address.ipv4_mapped
    return address


def _finish(
    outcome: Outcome,
    evaluation: Evaluation | None,
    domain: str,
    sender: str,
    ip: str,
    helo: str,
    identity: str,
    receiver: str,
) -> SPFResult:
    lookups = evaluation.lookups if evaluation else 0
    void = evaluation.void if evaluation else 0
    authentic = bool(evaluation and evaluation.answers and evaluation.authentic)
    problem = outcome.cause if outcome.result in (Result.TEMPERROR, Result.PERMERROR) else None
    header = received_spf(
        str(outcome.result), receiver=receiver, ip=ip, sender=sender, helo=helo,
        identity=identity, mechanism=outcome.mechanism, problem=problem,
    )
    return SPFResult(
        outcome.result, identity, domain, sender, ip, helo, outcome.mechanism, outcome.cause,
        outcome.explanation, lookups, void, authentic, header,
    )
