"""The `dmarc` check (RFC 9989), at end of message.

Results the rule acts on: pass, none, temperror, permerror, `fail` (failed, but the policy asks
for nothing: p=none, t=y softening, or a local override), `quarantine` and `reject` (failed,
and that is what the policy asks), and `unusable_from` (no From, several From domains, or an
unparseable From; RFC 9989 §4.4 lets a receiver reject such mail).

Arguments: `enforce` (default true: reject 550 5.7.1 naming the domain, or quarantine; false:
monitor only, the header is written and nothing else), `never_reject` (host groups whose mail
is never refused by DMARC), `trusted_sealers` (ARC sealers whose arc=pass chain lets a failing
message through). Overrides are recorded as `local_policy`.
"""

from __future__ import annotations

import dataclasses
import email.utils
import functools
import logging
import os
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailwarden.checks.base import CheckOutcome, CheckSpec, Context
from mailwarden.checks.failure_reports import queue_failure_report
from mailwarden.config.model import Outcome
from mailwarden.dmarc.evaluate import DkimInput, DmarcResult, evaluate
from mailwarden.findings import DmarcFinding, SpfIdentity
from mailwarden.relay import Membership
from mailwarden.results import Result
from mailwarden.transaction import CheckResult, Transaction
from mailwarden.verdict import Action, Reply, Stage

if TYPE_CHECKING:
    from mailwarden.config.model import Config
    from mailwarden.config.reader import Section

log = logging.getLogger("mailwarden.dmarc")

# an author domain DNS can be asked about: LDH labels (and '_'), two or more (RFC 9989 §4.4)
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")
RESULTS = (Result.PASS, Result.FAIL, Result.QUARANTINE, Result.REJECT, Result.NONE,
           Result.TEMPERROR, Result.PERMERROR, Result.UNUSABLE_FROM)
_REFUSING = (Result.REJECT, Result.QUARANTINE)  # the dispositions a policy can ask


@dataclass(frozen=True, slots=True)
class DmarcArgs:
    enforce: bool = True
    never_reject: tuple[str, ...] = ()
    trusted_sealers: tuple[str, ...] = ()


def parse_args(section: Section, config: Config) -> DmarcArgs:
    groups = section.str_list("never_reject")
    for group in groups:
        if group not in config.hosts:
            raise section.error("never_reject", f"no host group named {group!r} in hosts:")
    sealers = tuple(s.lower().rstrip(".") for s in section.str_list("trusted_sealers"))
    return DmarcArgs(section.boolean("enforce", True), groups, sealers)


def outcomes(args: DmarcArgs) -> Mapping[Result, Outcome]:
    if not args.enforce:
        return {}
    return {Result.REJECT: Outcome(Action.REJECT), Result.QUARANTINE: Outcome(Action.QUARANTINE),
            Result.UNUSABLE_FROM: Outcome(Action.REJECT)}


def author_domain(txn: Transaction) -> tuple[str, str]:
    """(domain, problem): RFC 9989 §4.4 needs exactly one author domain."""
    values = txn.header_values("From")
    if not values:
        return "", "no From header field"
    if len(values) > 1:
        return "", f"{len(values)} From header fields"
    domains = set()
    for value in values:
        if not value.strip():
            return "", "no address in From"
        # Python releases differ on broken input (some yield ("", ""), some drop it): any
        # empty or odd address makes the whole field unparseable.
        pairs = email.utils.getaddresses([value])
        if not pairs or any(not address for _, address in pairs):
            return "", f"unparseable From {value.strip()[:100]!r}"
        for _, address in pairs:
            local, at, domain_part = address.rpartition("@")
            if not at or not local or "@" in local:
                return "", f"unparseable From address {address!r}"
            domains.add(domain_part.lower().rstrip(".>"))
    if not domains:
        return "", "no address in From"
    if len(domains) > 1:
        return "", f"From names several domains ({', '.join(sorted(domains))})"
    domain = domains.pop()
    if not domain or "." not in domain:
        return "", f"unusable From domain {domain!r}"
    if not domain.isascii():
        try:  # RFC 9989 §5.3.1: the A-label form is what DNS is asked for
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return "", f"unusable From domain {domain!r}"
    if not _DOMAIN.fullmatch(domain):  # no control characters, spaces or specials in DNS
        return "", f"unusable From domain {domain!r}"
    return domain, ""


def _spf(txn: Transaction) -> tuple[str, Result, tuple[tuple[str, str, str], ...]]:
    """The MAIL FROM identity's domain and SPF result (RFC 9989 uses only that identity),
    and every SPF result for the report."""
    found = txn.findings.spf
    mailfrom = found.get(SpfIdentity.MAILFROM)
    reported = tuple((f.domain, "mfrom" if f.identity is SpfIdentity.MAILFROM else "helo",
                      str(f.result)) for f in found.values())
    if mailfrom is None:
        return "", Result.NONE, reported
    return mailfrom.domain, mailfrom.result, reported


def run(ctx: Context, txn: Transaction, args: DmarcArgs) -> CheckOutcome:
    domain, problem = author_domain(txn)
    if problem:
        record = CheckResult("", "dmarc", Result.PERMERROR, problem)
        if _ours(ctx, txn, args):
            # never_reject covers every refusal of this rule: cron and monitoring mail from
            # our own hosts often has no From at all
            return CheckOutcome(Result.PERMERROR, (record,),
                                text=wording(Result.PERMERROR, "-", problem))
        return CheckOutcome(Result.UNUSABLE_FROM, (record,),
                            text=wording(Result.UNUSABLE_FROM, "-", problem))
    spf_domain, spf_result, spf_reported = _spf(txn)
    verified = txn.findings.dkim  # the engine verifies first when no dkim_verify rule did
    signatures = verified.signatures if verified is not None else ()
    dkim = [DkimInput(s.domain, s.selector, s.result) for s in signatures if s.domain]
    found = evaluate(ctx.dns, domain, spf_domain=spf_domain, spf_result=spf_result,
                     dkim=dkim, mode=ctx.config.dmarc.mode, deadline=txn.deadline,
                     sample=_sampler())
    decisive, overrides = found.result, []
    if found.result is Result.FAIL:
        decisive = found.disposition if found.disposition in _REFUSING else Result.FAIL
        why = _override(ctx, txn, args)
        if why and decisive is not Result.FAIL:
            overrides.append(("local_policy", why))
            decisive = Result.FAIL
    asked = decisive if decisive in _REFUSING else Result.NONE
    finding = DmarcFinding("", found, asked, spf_reported, tuple(overrides))
    props = [("header.from", domain)]
    if found.record is not None:
        props += [("polrec.p", found.record.p), ("polrec.sp", found.record.sp),
                  ("polrec.np", found.record.np), ("polrec.domain", found.policy_domain)]
    result = CheckResult("", "dmarc", found.result, found.reason, tuple(props),
                         comment=_comment(found, asked, bool(overrides), ctx.config.dmarc.mode))
    text = wording(decisive if decisive in (Result.REJECT, Result.QUARANTINE) else found.result,
                   domain, found.reason)
    return CheckOutcome(decisive, (result,), text=text, findings=(finding,))


@functools.cache
def _seeded(seed: str) -> random.Random:
    return random.Random(seed)


def _sampler() -> Callable[[], float]:
    """The draws of legacy pct= sampling (RFC 7489 §6.6.4): fresh randomness in each worker,
    or, with MAILWARDEN_PCT_SEED set, one fixed sequence per process (tests, and reproducing
    which failures a run sampled out)."""
    seed = os.environ.get("MAILWARDEN_PCT_SEED")
    if not seed:
        return random.random
    return _seeded(seed).random


def wording(result: Result, domain: str, reason: str) -> str:
    """The reply text (for a quarantine: the reason given to the MTA) of a result."""
    if result is Result.REJECT:
        return f"Unauthenticated mail from {domain} is refused by its DMARC policy ({reason})"
    if result is Result.QUARANTINE:
        return f"DMARC quarantine: {domain} ({reason})"
    if result is Result.UNUSABLE_FROM:
        return f"Message refused: {reason} (RFC 9989 needs one author domain)"
    return f"DMARC {result} for {domain}: {reason}"


def _comment(found: DmarcResult, disposition: Result, overridden: bool,
             mode: str) -> str | None:
    """The Authentication-Results comment: the policy that applied, the disposition, and in
    legacy mode which rules decided (RFC 7489, and its pct= when it is not 100)."""
    comment = None
    if found.record is not None:
        comment = f"{found.policy_tag}={getattr(found.record, found.policy_tag, '')} " \
                  f"dis={disposition}"
        if mode == "legacy":
            pct = f" pct={found.record.pct}" if found.record.pct < 100 else ""
            comment += f" mode=rfc7489{pct}"
    if overridden:
        comment = (comment or "") + " override=local_policy"
    return comment


def _ours(ctx: Context, txn: Transaction, args: DmarcArgs) -> bool:
    """The client is in one of the rule's never_reject host groups."""
    return any(ctx.client_in(txn, (group,)) is Membership.IN for group in args.never_reject)


def _override(ctx: Context, txn: Transaction, args: DmarcArgs) -> str:
    if _ours(ctx, txn, args):
        # what goes into reports to other domains: no name of ours (issue 15 #8)
        return "the client is one of the receiver's own hosts"
    arc = txn.findings.arc
    if arc is not None and arc.result is Result.PASS and arc.sealers:
        latest = arc.sealers[-1].lower().rstrip(".")
        if latest in args.trusted_sealers:
            return f"arc=pass, sealed by trusted {latest}"
    return ""


def finish(ctx: Context, txn: Transaction, finding: DmarcFinding,
           applied: Result | None) -> None:
    """After the verdict: the disposition actually applied to the message (`applied`: none,
    quarantine or reject; None when the message was tempfailed and will be tried again) goes
    into our Authentication-Results and into the report store (RFC 9990 §2.1: the final
    disposition). A refusal held back by monitor mode is recorded as `none`, with a
    local_policy override saying so."""
    overrides = finding.overrides
    if applied is not None and applied != finding.asked and not overrides:
        overrides = (("local_policy", "monitor mode: the policy was not enforced"),)
    shown = applied if applied is not None else finding.asked
    for index, result in enumerate(txn.results):
        if result.method == "dmarc" and result.rule == finding.rule:
            txn.results[index] = dataclasses.replace(
                result, comment=_comment(finding.evaluation, shown, bool(overrides),
                                         ctx.config.dmarc.mode))
    if applied is not None:
        _record(ctx, txn, finding, applied, overrides)
        try:
            queue_failure_report(ctx, txn, finding, applied)
        except Exception:
            # a report is not worth a verdict: the evaluation stands and is already recorded
            log.exception("could not make the DMARC failure report for %s",
                          finding.evaluation.author_domain)


def _record(ctx: Context, txn: Transaction, finding: DmarcFinding, disposition: Result,
            overrides: tuple[tuple[str, str], ...]) -> None:
    """Every final evaluation with a policy goes to the report store (RFC 9990); a temperror
    is not final (the message may be retried and evaluated again)."""
    found = finding.evaluation
    if found.record is None or found.result is Result.TEMPERROR or not ctx.config.dmarc.store:
        return
    from mailwarden.dmarc.store import Evaluation

    record = found.record
    verified = txn.findings.dkim
    signatures = verified.signatures if verified is not None else ()
    if found.sampled_out:
        # RFC 7489's sampled_out is not a reason type of RFC 9990's schema, in which our
        # reports are written: "other" with the legacy name in the comment
        overrides += (("other", f"sampled_out: pct={record.pct} (RFC 7489 section 6.6.4)"),)
    evaluation = Evaluation(
        time=time.time(), source_ip=str(txn.client_ip or ""), header_from=found.author_domain,
        envelope_from=txn.sender_domain, envelope_to=(txn.rcpt_domains or [""])[0],
        policy_domain=found.policy_domain, p=record.p, sp=record.sp, np=record.np,
        adkim=record.adkim, aspf=record.aspf, testing=record.testing, psd=record.psd,
        disposition=str(disposition),
        dkim_aligned="pass" if found.dkim_aligned else "fail",
        spf_aligned="pass" if found.spf_aligned else "fail",
        dkim=tuple((s.domain, s.selector, str(s.result)) for s in signatures if s.domain),
        spf=finding.spf_reported, overrides=overrides, rua=record.rua,
        policy_tag=found.policy_tag,
    )
    try:
        ctx.store().record(evaluation, txn.deadline)
    except Exception:
        # A report row is not worth refusing mail for: the evaluation still stands.
        log.exception("could not record the DMARC evaluation for %s", found.author_domain)


SPEC = CheckSpec(
    name="dmarc", stages=(Stage.EOM,), results=RESULTS, parse_args=parse_args, run=run,
    outcomes=outcomes, needs_dkim=True,
    replies={Result.REJECT: Reply(550, "5.7.1",
                                  "Message refused by the sender domain's DMARC policy"),
             Result.UNUSABLE_FROM: Reply(550, "5.7.1", "Message has no usable From header field"),
             Result.TEMPERROR: Reply(451, "4.7.1", "DMARC evaluation failed, try again later")},
    worded={result: wording(result, "DOMAIN", "REASON") for result in RESULTS},
    needs_body=True,
)
