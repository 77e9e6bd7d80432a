"""After a DMARC verdict: the failure report (RFC 9991) of the message, when
`dmarc.failure_reports` is on and the sender's record asks for one (see dmarc/failures.py for
every condition). The report is built from the transaction here and written to the store by a
background thread: nothing in it can delay, change or fail the verdict."""

from __future__ import annotations

import ipaddress
import logging
import time
from functools import partial
from typing import TYPE_CHECKING

from mailwarden import metrics
from mailwarden.dmarc.afrf import Failure, is_feedback_report, triggers
from mailwarden.dmarc.report import is_internal
from mailwarden.findings import SpfIdentity
from mailwarden.headers import authentication_results
from mailwarden.relay import HostGroup
from mailwarden.results import Result

if TYPE_CHECKING:
    from mailwarden.checks.base import Context
    from mailwarden.config.model import FailureReportsConfig
    from mailwarden.dmarc.store import Store
    from mailwarden.findings import DmarcFinding
    from mailwarden.transaction import Transaction

log = logging.getLogger("mailwarden.dmarc")

_FAILED_DKIM = (Result.FAIL, Result.PERMERROR, Result.POLICY)


def _wanted(ctx: Context, txn: Transaction, finding: DmarcFinding) -> FailureReportsConfig | None:
    settings = ctx.config.dmarc.failure_reports
    found = finding.evaluation
    record = found.record
    if settings is None or record is None or not record.ruf:
        return None
    if found.result not in (Result.PASS, Result.FAIL) or record.psd == "y":
        return None  # RFC 9991 §2: no ruf= of a Public Suffix Domain's record
    if ctx.config.dmarc.mode == "legacy" and "afrf" not in record.rf:
        return None  # RFC 7489 §6.3: a format we do not produce
    if settings.domains and found.policy_domain not in settings.domains:
        return None
    if is_feedback_report(txn.headers) or txn.client_ip is None:
        return None  # no loops; no Source-IP to report (local submission)
    if not ctx.config.dmarc.reports.get("include_internal_sources"):
        networks = [ipaddress.ip_network(net, strict=False) for name, entries
                    in ctx.config.hosts.items()
                    for net in HostGroup.from_entries(name, entries).networks]
        if is_internal(str(txn.client_ip or ""), networks):
            return None
    return settings


def queue_failure_report(ctx: Context, txn: Transaction, finding: DmarcFinding,
                         applied: Result) -> None:
    """Hand the failure report of this message to the store's writer, if one is wanted, and
    note it in the transaction's findings (what `mailwarden test` shows)."""
    settings = _wanted(ctx, txn, finding)
    if settings is None:
        return
    found = finding.evaluation
    record = found.record
    assert record is not None
    verified = txn.findings.dkim
    signatures = verified.signatures if verified is not None else ()
    mailfrom = txn.findings.spf.get(SpfIdentity.MAILFROM)
    passes = (("dkim",) if found.dkim_aligned else ()) + (("spf",) if found.spf_aligned else ())
    failure = Failure(
        policy_domain=found.policy_domain, author_domain=found.author_domain,
        source_ip=str(txn.client_ip or ""), mail_from=txn.mail_from or "",
        rcpts=tuple(txn.rcpts), arrival=time.time(), headers=tuple(txn.headers),
        authentication_results=authentication_results(
            ctx.config.authserv_id,
            [r for r in txn.results if r.method in ("dmarc", "dkim", "spf")]),
        dmarc_failed=found.result is Result.FAIL, failed_aligned=found.failed_aligned,
        aligned_passes=passes, failed_dkim=found.failed_dkim,
        dkim_failures=tuple((s.domain, s.selector, s.reason) for s in signatures
                            if s.domain and s.result in _FAILED_DKIM),
        spf_failed=mailfrom is not None and mailfrom.result in (Result.FAIL, Result.SOFTFAIL),
        spf_domain=mailfrom.domain if mailfrom is not None else "",
        spf_record="", delivery=str(applied),
        legacy=ctx.config.dmarc.mode == "legacy",
        dkim_identities=tuple((s.domain, s.selector, s.identity) for s in signatures
                              if s.domain))
    kinds = triggers(record.fo, failure)
    if not kinds:
        return
    txn.findings.failure_reports.append(
        f"{kinds[0]} failure report (fo={record.fo}) to {', '.join(record.ruf)}")
    if not ctx.config.dmarc.store:
        return  # `mailwarden test`: shown, not queued
    org_name = str(ctx.config.dmarc.reports.get("org_name", ""))
    job = partial(_write, ctx, failure, record.fo, record.ruf, settings, org_name)
    from mailwarden.dmarc.failures import queuer_for

    queuer_for(ctx.config.dmarc.store).submit(job)


def _write(ctx: Context, failure: Failure, fo: str, ruf: tuple[str, ...],
           settings: FailureReportsConfig, org_name: str, store: Store) -> None:
    import dataclasses

    from mailwarden.dmarc.failures import queue_report

    if failure.spf_domain and ("spf" in failure.failed_aligned or failure.spf_failed):
        answer = ctx.dns.txt(failure.spf_domain)  # cached since the SPF check
        record = next((t for t in answer.records if t.lower().startswith("v=spf1")), "")
        failure = dataclasses.replace(failure, spf_record=record)
    for destination, result in queue_report(store, failure, fo=fo, ruf=ruf,
                                            rate_limit=settings.rate_limit,
                                            redact=settings.redact, org_name=org_name):
        metrics.METRICS.failure_report(result.partition(":")[0])
        log.info("failure report for %s to %s: %s", failure.author_domain, destination, result)
