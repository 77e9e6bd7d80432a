"""DMARC evaluation (RFC 9989 §4.4, §4.8, §5): identifier alignment of the SPF (MAIL FROM
identity) and DKIM results already in the transaction, the policy that applies (p, sp for
subdomains, np for non-existent subdomains: NXDOMAIN, RFC 9989 §3.2.13), and t=y testing
mode. In legacy mode (RFC 7489) t= does not exist and pct= sampling applies instead (§6.6.4):
a failing message outside the sampled percentage gets the next less strict policy."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mailwarden.deadline import Deadline
from mailwarden.dmarc.orgdomain import Discovery, TemporaryError
from mailwarden.dmarc.record import DmarcRecord
from mailwarden.dns import DNSClient, Status
from mailwarden.results import Result

LESS_STRICT = {Result.REJECT: Result.QUARANTINE, Result.QUARANTINE: Result.NONE,
               Result.NONE: Result.NONE}


@dataclass(frozen=True, slots=True)
class DkimInput:
    domain: str
    selector: str
    result: Result


@dataclass(frozen=True, slots=True)
class DmarcResult:
    result: Result  # pass | fail | none | temperror | permerror
    reason: str
    author_domain: str
    policy_domain: str = ""
    record: DmarcRecord | None = None
    policy_tag: str = ""  # which tag applied: p, sp or np
    # what the policy asks (after t=y): none | quarantine | reject
    disposition: Result = Result.NONE
    spf_aligned: bool = False
    dkim_aligned: bool = False
    aligned_dkim_domain: str = ""
    sampled_out: bool = False  # legacy pct=: this failure was outside the sample
    queries: int = 0
    warnings: tuple[str, ...] = field(default=())


def non_existent(dns: DNSClient, domain: str, deadline: Deadline | None = None) -> bool:
    """RFC 9989 np=: the author domain does not exist (NXDOMAIN)."""
    answer = dns.a(domain, deadline)
    if answer.status is Status.TEMPERROR:
        raise TemporaryError(f"{domain}: {answer.error}")
    return answer.status is Status.NXDOMAIN


def _undecided(discovery: Discovery, author: str, record: DmarcRecord, spf_domain: str,
               spf_result: Result, dkim: Sequence[DkimInput]) -> str:
    """An aligned identifier whose check could not finish (SPF or DKIM temperror: RFC 7208
    §2.6.6, RFC 6376 §6.1.2) might still pass: DMARC has no final result then, which is
    temperror ("a later attempt might produce a final result": RFC 9989's registration of
    the dmarc result codes), never
    the policy's fail. Names the first such identifier, or ''."""
    for sig in dkim:
        if sig.result is Result.TEMPERROR and discovery.aligned(sig.domain, author, record.adkim):
            return f"DKIM verification for d={sig.domain}"
    if spf_result is Result.TEMPERROR and discovery.aligned(spf_domain, author, record.aspf):
        return f"SPF for {spf_domain}"
    return ""


def failed_aligned(discovery: Discovery, author: str, record: DmarcRecord, spf_domain: str,
                   spf_result: Result, dkim: Sequence[DkimInput]
                   ) -> tuple[tuple[str, ...], tuple[str, str] | None]:
    """RFC 9991 §4 (failure reports): the mechanisms that failed to authenticate an
    identifier aligned with the author domain, and the first such DKIM signature (domain,
    selector). May raise TemporaryError (the Organizational Domain walk)."""
    failed_sig = next(((sig.domain, sig.selector) for sig in dkim if sig.result is not Result.PASS
                       and discovery.aligned(sig.domain, author, record.adkim)), None)
    spf_failed = bool(spf_domain) and spf_result is not Result.PASS and \
        discovery.aligned(spf_domain, author, record.aspf)
    return (("dkim",) if failed_sig else ()) + (("spf",) if spf_failed else ()), failed_sig


def evaluate(dns: DNSClient, author_domain: str, *, spf_domain: str, spf_result: Result,
             dkim: Sequence[DkimInput], mode: str = "rfc9989",
             deadline: Deadline | None = None,
             sample: Callable[[], float] = random.random) -> DmarcResult:
    """The DMARC result for a message whose author domain is `author_domain`. `sample`
    draws from [0, 1) for legacy pct= sampling."""
    author = author_domain.lower().rstrip(".")
    discovery = Discovery(dns, mode, deadline)
    try:
        found = discovery.policy(author)
        if found is None:
            return DmarcResult(Result.NONE, "no DMARC policy record", author,
                               queries=discovery.queries)
        record = found.record
        spf_ok = spf_result is Result.PASS and discovery.aligned(spf_domain, author, record.aspf)
        dkim_domain = next((sig.domain for sig in dkim if sig.result is Result.PASS
                            and discovery.aligned(sig.domain, author, record.adkim)), "")
        if not (spf_ok or dkim_domain):
            undecided = _undecided(discovery, author, record, spf_domain, spf_result, dkim)
            if undecided:
                return DmarcResult(
                    Result.TEMPERROR, f"{undecided} failed temporarily: no final result yet",
                    author, policy_domain=found.domain, record=record,
                    queries=discovery.queries, warnings=record.warnings)
        tag, policy = "p", record.p
        if found.domain != author:
            tag, policy = "sp", record.sp
            if not (spf_ok or dkim_domain) and non_existent(dns, author, deadline):
                tag, policy = "np", record.np
    except TemporaryError as exc:
        return DmarcResult(Result.TEMPERROR, f"DNS error: {exc}", author, queries=discovery.queries)
    base = DmarcResult(
        Result.FAIL, "", author, policy_domain=found.domain, record=record, policy_tag=tag,
        spf_aligned=spf_ok, dkim_aligned=bool(dkim_domain), aligned_dkim_domain=dkim_domain,
        queries=discovery.queries, warnings=record.warnings,
    )
    if spf_ok or dkim_domain:
        how = "DKIM" if dkim_domain else "SPF"
        return dataclasses.replace(base, result=Result.PASS, reason=f"aligned {how} pass")
    asked = Result(policy)  # p=, sp= and np= are none, quarantine or reject (record.py)
    reason = f"no aligned SPF or DKIM pass; {tag}={policy}"
    if mode == "legacy":
        # RFC 7489 §6.6.4: sampled out, the next less strict policy (pct=0: never the policy)
        sampled_out = record.pct < 100 and sample() * 100 >= record.pct
        disposition = LESS_STRICT[asked] if sampled_out else asked
        if sampled_out:
            reason += f" (legacy pct={record.pct}: sampled out, one level less strict)"
        base = dataclasses.replace(base, sampled_out=disposition is not asked)
    else:
        disposition = LESS_STRICT[asked] if record.testing else asked
        if record.testing:
            reason += " (t=y: one level less strict)"
    return dataclasses.replace(base, reason=reason, disposition=disposition)
