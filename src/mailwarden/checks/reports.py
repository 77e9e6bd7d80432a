"""The `dmarc_reports` check: aggregate reports other receivers send to our rua= addresses
(RFC 9990 §3), stored in the DMARC store as the mail arrives (`dmarc.received`), once per
reporter and report id.

pass: every report in the message stored (or already there), and every recipient is a
report address; neutral: the same with other recipients too (never discarded for them);
none: not addressed to a report address; fail: the message holds no usable report (the
reason is logged; by default the mail is delivered, nothing is lost); temperror: the store
could not be written just now (by default 451: the reporter sends it again)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailwarden import metrics
from mailwarden.checks.base import CheckOutcome, CheckSpec, Context
from mailwarden.config.model import Outcome
from mailwarden.results import Result
from mailwarden.transaction import CheckResult, Transaction
from mailwarden.verdict import Action, Reply, Stage

if TYPE_CHECKING:
    from mailwarden.config.model import Config
    from mailwarden.config.reader import Section

RESULTS = (Result.PASS, Result.NEUTRAL, Result.NONE, Result.FAIL, Result.TEMPERROR)


@dataclass(frozen=True, slots=True)
class ReportsArgs:
    addresses: tuple[str, ...]
    keep: bool = True  # deliver the report mail after storing it (false: discard it)


def parse_args(section: Section, config: Config) -> ReportsArgs:
    addresses = tuple(a.lower().strip() for a in section.str_list("addresses"))
    if not addresses or any("@" not in a for a in addresses):
        raise section.error("addresses", "the rua= mailboxes, such as dmarc@example.com")
    if not config.dmarc.store:
        raise section.error("check", "dmarc_reports needs dmarc.store")
    return ReportsArgs(addresses, section.boolean("keep", True))


def outcomes(args: ReportsArgs | None) -> Mapping[Result, Outcome]:
    """The default actions (`args` None: the rule's defaults, keep: true)."""
    table = {Result.TEMPERROR: Outcome(Action.TEMPFAIL)}
    if args is not None and not args.keep:
        table[Result.PASS] = Outcome(Action.DISCARD)
    return table


def _result(decisive: Result, reason: str) -> CheckOutcome:
    record = CheckResult("", "dmarc_reports", decisive, reason, report=False)
    return CheckOutcome(decisive, (record,), text=reason)


def run(ctx: Context, txn: Transaction, args: ReportsArgs) -> CheckOutcome:
    from mailwarden.dmarc.received import read_reports
    from mailwarden.dmarc.received_store import store_report
    from mailwarden.dmarc.store import StoreError

    rcpts = [r.lower() for r in txn.rcpts]
    if not any(r in args.addresses for r in rcpts):
        return _result(Result.NONE, "not addressed to a report address")
    reports, refused = read_reports(txn.message())
    if refused:
        metrics.METRICS.received_report("refused")
        return _result(Result.FAIL, f"no usable report: {refused[0].reason}")
    store = ctx.store().store()
    if store is None:
        return _result(Result.TEMPERROR, "the DMARC store is not available")
    told = []
    try:
        for report in reports:
            new = store_report(store, report, f"smtp {txn.queue_id or '-'}", time.time())
            metrics.METRICS.received_report("stored" if new else "duplicate")
            told.append(f"{'stored' if new else 'duplicate'} {report.report_id} from "
                        f"{report.org_name} for {report.domain}")
    except StoreError as exc:
        return _result(Result.TEMPERROR, f"the DMARC store failed: {exc}")
    decisive = Result.PASS if all(r in args.addresses for r in rcpts) else Result.NEUTRAL
    return _result(decisive, "; ".join(told))


SPEC = CheckSpec(
    name="dmarc_reports", stages=(Stage.EOM,), results=RESULTS,
    parse_args=parse_args, run=run, outcomes=outcomes,
    replies={Result.TEMPERROR: Reply(451, "4.3.0", "Report not stored, try again later"),
             Result.FAIL: Reply(550, "5.6.0", "No usable DMARC aggregate report")},
    needs_body=True,
)
