"""After a DMARC verdict: the failure report (RFC 9991) of the message, when
`dmarc.failure_reports` is on and the sender's record asks for one (see dmarc/failures.py for
every condition). The report is built from the transaction here and written to the store by a
background thread: nothing in it can delay, change or fail the verdict."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from functools import partial
from typing import TYPE_CHECKING

from mailwarden import metrics
from mailwarden.dmarc.afrf import Failure, is_feedback_report, triggers
from mailwarden.dmarc.evaluate import DkimInput, failed_aligned
from mailwarden.dmarc.orgdomain import Discovery, TemporaryError
from mailwarden.dmarc.report import is_internal
from mailwarden.findings import SpfIdentity
from mailwarden.headers import authentication_results
from mailwarden.relay import internal_networks
from mailwarden.results import Result
from mailwarden.spf.record import is_spf_record

if TYPE_CHECKING:
    from mailwarden.checks.base import Context
    from mailwarden.config.model import FailureReportsConfig
    from mailwarden.dmarc.record import DmarcRecord
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
    if not ctx.config.dmarc.reports.get("include_internal_sources") and \
            is_internal(str(txn.client_ip), internal_networks(ctx.groups.values())):
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
        dmarc_failed=found.result is Result.FAIL, failed_aligned=(),
        aligned_passes=passes, failed_dkim=None,
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
    dkim = tuple(DkimInput(s.domain, s.selector, s.result) for s in signatures if s.domain)
    spf_result = mailfrom.result if mailfrom is not None else Result.NONE
    job = partial(_write, ctx, failure, kinds[0], record, dkim, spf_result, settings, org_name)
    from mailwarden.dmarc.failures import queuer_for

    queuer_for(ctx.config.dmarc.store).submit(job)


def _write(ctx: Context, failure: Failure, kind: str, record: DmarcRecord,
           dkim: tuple[DkimInput, ...], spf_result: Result, settings: FailureReportsConfig,
           org_name: str, store: Store) -> None:
    """In the background: what the report needs beyond the verdict's work (which aligned
    identifiers failed: the Organizational Domain walk; the SPF record), then queue it."""
    from mailwarden.dmarc.failures import queue_report

    discovery = Discovery(ctx.dns, ctx.config.dmarc.mode)
    with contextlib.suppress(TemporaryError):  # only the report's detail is missing then
        failed, failed_dkim = failed_aligned(discovery, failure.author_domain, record,
                                             failure.spf_domain, spf_result, dkim)
        failure = dataclasses.replace(failure, failed_aligned=failed, failed_dkim=failed_dkim)
    if failure.spf_domain and ("spf" in failure.failed_aligned or failure.spf_failed):
        answer = ctx.dns.txt(failure.spf_domain)  # cached since the SPF check
        spf = next((t for t in answer.records if is_spf_record(t)), "")
        failure = dataclasses.replace(failure, spf_record=spf)
    for destination, result in queue_report(store, failure, kind=kind, ruf=record.ruf,
                                            rate_limit=settings.rate_limit,
                                            redact=settings.redact, org_name=org_name):
        metrics.METRICS.failure_report(result.partition(":")[0])
        log.info("failure report for %s to %s: %s", failure.author_domain, destination, result)
