"""The aggregate reports other receivers sent about our domains, in the DMARC store (schema
version 2): one row per report, de-duplicated by reporter and report id (a report sent twice,
or to two of our rua= addresses, is stored once), and its records."""

from __future__ import annotations

import json
from typing import Any

from mailwarden.dmarc.received import ReceivedReport
from mailwarden.dmarc.store import Store

_REPORT = ("INSERT INTO received_reports (reporter, reporter_email, report_id, policy_domain, "
           "period_begin, period_end, policy, version, received, source) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
           "ON CONFLICT (reporter, reporter_email, report_id) DO NOTHING RETURNING id")
_RECORD = ("INSERT INTO received_records (report, source_ip, count, disposition, dkim_eval, "
           "spf_eval, header_from, envelope_from, dkim, spf, reasons) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def store_report(store: Store, report: ReceivedReport, source: str, now: float) -> bool:
    """Store `report`; False when the same reporter's report with this id is already in."""
    def work(db: Any) -> bool:
        rows = db.execute(_REPORT, (
            report.org_name, report.email, report.report_id, report.domain,
            float(report.begin), float(report.end), json.dumps(report.policy, sort_keys=True),
            report.version, now, source))
        if not rows:
            return False
        key = rows[0][0]
        db.executemany(_RECORD, [
            (key, r.source_ip, r.count, r.disposition, r.dkim_eval, r.spf_eval, r.header_from,
             r.envelope_from, json.dumps(r.dkim), json.dumps(r.spf), json.dumps(r.reasons))
            for r in report.records])
        return True

    return store.transaction(work)


def received_count(store: Store) -> tuple[int, int]:
    """(reports, records) stored."""
    reports = store.read("SELECT count(*) FROM received_reports")[0][0]
    records = store.read("SELECT count(*) FROM received_records")[0][0]
    return int(reports), int(records)
