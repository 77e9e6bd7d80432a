"""The `spf` check: both identities (HELO and MAIL FROM, RFC 7208 §2.3/§2.4); the rule acts on
the MAIL FROM result.

Arguments (after vSMTP's check_spf): `header` — which headers to add: `spf` (Received-SPF),
`auth` (our Authentication-Results), `both` or `none`; `policy` — `soft` rejects only `fail`,
`strict` rejects `fail` and `softfail` (and `permerror`). A `temperror` tempfails under both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailwarden.checks.base import CheckOutcome, CheckSpec, Context
from mailwarden.config.model import Outcome
from mailwarden.dns import is_address_like
from mailwarden.findings import SpfFinding, SpfIdentity
from mailwarden.policy import codes
from mailwarden.results import Result
from mailwarden.spf import Limits, SPFResult, check_helo, check_mailfrom
from mailwarden.spf.check import Result as SPFOutcome
from mailwarden.spf.check import valid_domain
from mailwarden.transaction import CheckResult, Transaction
from mailwarden.verdict import Action, Stage

if TYPE_CHECKING:
    from mailwarden.config.model import Config
    from mailwarden.config.reader import Section

RESULTS = (Result.PASS, Result.FAIL, Result.SOFTFAIL, Result.NEUTRAL, Result.NONE,
           Result.TEMPERROR, Result.PERMERROR)
ERRORS = (Result.TEMPERROR, Result.PERMERROR)


@dataclass(frozen=True, slots=True)
class SPFArgs:
    header: str = "both"
    policy: str = "soft"


def parse_args(section: Section, config: Config) -> SPFArgs:
    return SPFArgs(section.string("header", "both", choices=("spf", "auth", "both", "none")),
                   section.string("policy", "soft", choices=("soft", "strict")))


def outcomes(args: SPFArgs) -> Mapping[Result, Outcome]:
    table = {Result.FAIL: Outcome(Action.REJECT), Result.TEMPERROR: Outcome(Action.TEMPFAIL)}
    if args.policy == "strict":
        table[Result.SOFTFAIL] = Outcome(Action.REJECT)
        table[Result.PERMERROR] = Outcome(Action.REJECT)
    return table


def run(ctx: Context, txn: Transaction, args: SPFArgs) -> CheckOutcome:
    if txn.client_ip is None:
        return CheckOutcome(Result.NONE, text="no client address")
    helo = txn.helo or ""
    limits = spf_limits(ctx.config)
    receiver = ctx.config.authserv_id
    report = args.header in ("auth", "both")
    results: list[CheckResult] = []
    findings: list[SpfFinding] = []
    # RFC 7208 §2.3: the HELO identity is checked only when it is a multi-label domain name
    if helo and valid_domain(helo) is None and not is_address_like(helo):
        helo_result = check_helo(ctx.dns, txn.client_ip, helo, receiver=receiver, limits=limits,
                                 clock=ctx.clock, deadline=txn.deadline)
        results.append(_record(helo_result, "smtp.helo", helo, report))
        findings.append(SpfFinding(SpfIdentity.HELO, helo.lower().rstrip("."),
                                   Result(helo_result.result)))
    mail_from = txn.mail_from or ""
    result = check_mailfrom(ctx.dns, txn.client_ip, mail_from, helo, receiver=receiver,
                            limits=limits, clock=ctx.clock, deadline=txn.deadline)
    results.append(_record(result, "smtp.mailfrom", result.sender, report))
    findings.append(SpfFinding(SpfIdentity.MAILFROM,
                               result.sender.rpartition("@")[2].lower().rstrip("."),
                               Result(result.result)))
    headers = (result.header(),) if args.header in ("spf", "both") else ()
    return CheckOutcome(Result(result.result), tuple(results), headers, _reply_text(result),
                        tuple(findings))


def spf_limits(config: Config) -> Limits:
    """The RFC 7208 §4.6.4 limits as configured (`limits.spf_*`) and the time budget."""
    limits = config.limits
    return Limits(dns_terms=limits.spf_dns_lookups, void_lookups=limits.spf_void_lookups,
                  mx_names=limits.spf_mx_names, ptr_names=limits.spf_ptr_names,
                  budget=config.spf_budget)


def _record(result: SPFResult, prop: str, value: str, report: bool) -> CheckResult:
    return CheckResult("", "spf", Result(result.result), result.cause, ((prop, value),),
                       report=report)


def _reply_text(result: SPFResult) -> str:
    detail = (result.explanation if result.result is SPFOutcome.FAIL else result.cause) or ""
    return wording(Result(result.result), str(result.ip), result.domain, detail)


def wording(result: Result, ip: str, domain: str, detail: str = "") -> str:
    """The reply text of a result. RFC 7208 §8.4: a fail reply SHOULD carry the explanation
    (`detail`: the domain's exp= text for a fail, the cause of an error)."""
    if result is Result.FAIL:
        return f"SPF fail: {detail or f'{ip} is not allowed to send mail for {domain}'}"
    if result is Result.SOFTFAIL:
        return f"SPF softfail: {ip} is not allowed to send mail for {domain}"
    if result in (Result.TEMPERROR, Result.PERMERROR):
        return f"SPF {result} for {domain}: {detail}"
    return f"SPF {result} for {domain}"


SPEC = CheckSpec(
    name="spf",
    stages=(Stage.MAIL, Stage.RCPT, Stage.EOM),
    results=RESULTS,
    parse_args=parse_args,
    run=run,
    outcomes=outcomes,
    replies={Result.FAIL: codes.SPF_FAIL, Result.SOFTFAIL: codes.SPF_FAIL,
             Result.TEMPERROR: codes.SPF_TEMPERROR, Result.PERMERROR: codes.SPF_PERMERROR},
    # a fail's text is the domain's exp= explanation when it has one (RFC 7208 §6.2)
    worded={result: wording(result, "IP", "DOMAIN", "REASON" if result in ERRORS else "")
            for result in RESULTS},
)
