"""When the daemon makes a failure report at all (checks/failure_reports.py): only with
`dmarc.failure_reports` configured, a ruf= in the record, never for a psd=y record (RFC 9991
§2), in legacy mode only when rf= lists afrf (RFC 7489 §6.3), only for the configured domains,
never about internal sources or about a feedback report."""

from __future__ import annotations

import pytest

from mailwarden.checks.base import Context
from mailwarden.checks.failure_reports import _wanted
from mailwarden.config.build import parse
from mailwarden.dmarc.evaluate import DmarcResult
from mailwarden.dmarc.record import DmarcRecord
from mailwarden.dmarc.record import parse as parse_record
from mailwarden.findings import DmarcFinding
from mailwarden.results import Result
from mailwarden.transaction import Transaction

from fakedns import FakeDNS

BASE = """\
authserv_id: mx.ours.example
dmarc:
  mode: {mode}
  store: /var/lib/mailwarden/dmarc.db
  reports: {{org_name: Ours, email: d@ours.example, smarthost: "127.0.0.1:25"}}
{failures}
hosts:
  ours: [198.51.100.0/24]
"""
ON = "  failure_reports: {rate_limit: 5}"


def context(mode: str = "rfc9989", failures: str = ON) -> Context:
    """The context the engine makes: the host groups built once, from the configuration."""
    from mailwarden.policy.engine import Engine

    return Engine(parse(BASE.format(mode=mode, failures=failures)), FakeDNS()).ctx


def finding(record_text: str, result: Result = Result.FAIL,
            domain: str = "example.com") -> DmarcFinding:
    record = parse_record(record_text)
    assert isinstance(record, DmarcRecord)
    found = DmarcResult(result, "", domain, policy_domain=domain, record=record,
                        policy_tag="p")
    return DmarcFinding("dmarc", found, Result.REJECT)


def txn(ip: str = "203.0.113.9", content_type: str = "text/plain") -> Transaction:
    made = Transaction.for_client(ip)
    made.headers = [("From", " a@example.com"), ("Content-Type", f" {content_type}")]
    return made


RUF = "v=DMARC1; p=reject; ruf=mailto:f@example.com"


def test_a_record_with_ruf_and_the_feature_on_gets_a_report() -> None:
    assert _wanted(context(), txn(), finding(RUF)) is not None


@pytest.mark.parametrize(("ctx", "message", "found"), [
    pytest.param(lambda: context(failures=""), txn, lambda: finding(RUF), id="feature off"),
    pytest.param(context, txn, lambda: finding("v=DMARC1; p=reject; rua=mailto:a@example.com"),
                 id="no ruf"),
    pytest.param(context, txn, lambda: finding(RUF + "; psd=y"), id="psd=y"),
    pytest.param(lambda: context("legacy"), txn, lambda: finding(RUF + "; rf=iodef"),
                 id="legacy rf without afrf"),
    pytest.param(lambda: context(failures="  failure_reports: {domains: [partner.example]}"),
                 txn, lambda: finding(RUF), id="not a configured domain"),
    pytest.param(context, lambda: txn("10.1.2.3"), lambda: finding(RUF), id="private source"),
    pytest.param(context, lambda: txn("198.51.100.7"), lambda: finding(RUF),
                 id="host group source"),
    pytest.param(context, lambda: txn(content_type="multipart/report; "
                                      "report-type=feedback-report"),
                 lambda: finding(RUF), id="a feedback report"),
    pytest.param(context, txn, lambda: finding(RUF, Result.TEMPERROR), id="temperror"),
])
def test_no_report(ctx: object, message: object, found: object) -> None:
    assert _wanted(ctx(), message(), found()) is None  # type: ignore[operator]


def test_legacy_with_afrf_listed_and_rfc9989_ignoring_rf_get_reports() -> None:
    assert _wanted(context("legacy"), txn(), finding(RUF + "; rf=iodef:afrf")) is not None
    assert _wanted(context(), txn(), finding(RUF + "; rf=iodef")) is not None  # rf= removed


def test_mailwarden_test_shows_the_report_and_queues_nothing() -> None:
    """`mailwarden test` judges a file without a store: the report it would make is noted in
    the findings (and printed), nothing is handed to a store."""
    from mailwarden.checks.failure_reports import queue_failure_report
    from mailwarden.dmarc import failures
    from mailwarden.offline import offline_config

    config = offline_config(context().config, None)
    ctx = Context(config, FakeDNS(), context().groups)
    message = txn()
    queuers = dict(failures._QUEUERS)
    queue_failure_report(ctx, message, finding(RUF), Result.REJECT)
    assert message.findings.failure_reports == [
        "dmarc failure report (fo=0) to mailto:f@example.com"]
    assert set(failures._QUEUERS) <= set(queuers)  # no queuer made
    passing = txn()
    queue_failure_report(ctx, passing, finding(RUF, Result.PASS), Result.NONE)
    assert passing.findings.failure_reports == []  # fo=0 asks only about DMARC failures
    from mailwarden.offline import Report, format_report

    shown = format_report(Report(failure_reports=message.findings.failure_reports))
    assert "dmarc failure report (fo=0) to mailto:f@example.com (the daemon queues it" in shown


def test_no_report_about_a_local_submission() -> None:
    """No client address: no Source-IP to report (the review found an empty field)."""
    assert _wanted(context(), Transaction.for_client(None), finding(RUF)) is None


@pytest.mark.parametrize("reports", ["", '  reports: {org_name: O, email: d@o.example, '
                                         'directory: /var/lib/mailwarden/reports}\n'])
def test_failure_reports_need_a_smarthost(reports: str) -> None:
    from mailwarden.config.reader import ConfigError

    text = ("authserv_id: mx.ours.example\ndmarc:\n  store: /var/lib/mailwarden/dmarc.db\n"
            f"{reports}  failure_reports: {{rate_limit: 5}}\n")
    with pytest.raises(ConfigError, match=r"dmarc\.failure_reports.*smarthost"):
        parse(text)


def test_check_config_shows_whether_failure_reports_are_made() -> None:
    from mailwarden.policy.describe import effective_policy, format_policy

    shown = format_policy(effective_policy(context().config))
    assert "dmarc failure reports on: at most 5 per destination and hour, redacted, " \
        "domains any with ruf=" in shown
    off = format_policy(effective_policy(context(failures="").config))
    assert "dmarc failure reports off" in off


def test_which_aligned_identifiers_failed() -> None:
    """RFC 9991 §4 Identity-Alignment, worked out off the milter path: a failing signature of
    the author's Organizational Domain and a failing aligned MAIL FROM are listed, a failing
    third party is not, and strict alignment counts only the exact domain."""
    from mailwarden.dmarc.evaluate import DkimInput, failed_aligned
    from mailwarden.dmarc.orgdomain import Discovery

    discovery = Discovery(FakeDNS(), "legacy")  # the Public Suffix List: no DNS
    record = parse_record("v=DMARC1; p=reject; ruf=mailto:f@example.com")
    strict = parse_record("v=DMARC1; p=reject; adkim=s; aspf=s")
    assert isinstance(record, DmarcRecord) and isinstance(strict, DmarcRecord)
    dkim = (DkimInput("other.example", "o1", Result.FAIL),
            DkimInput("example.com", "s1", Result.FAIL))
    assert failed_aligned(discovery, "news.example.com", record, "bounce.example.com",
                          Result.SOFTFAIL, dkim) == (("dkim", "spf"), ("example.com", "s1"))
    assert failed_aligned(discovery, "news.example.com", strict, "bounce.example.com",
                          Result.SOFTFAIL, dkim) == ((), None)
    assert failed_aligned(discovery, "news.example.com", record, "news.example.com",
                          Result.PASS, dkim[:1]) == ((), None)
