"""DMARC aggregate reports (RFC 9990): sending each report exactly once.

Sending (`send_reports`): each report is gzipped (deterministically: the same bytes on every
run) and mailed, one SMTP transaction per destination, through the smarthost, as a
multipart/mixed message with the ``application/gzip`` attachment
``receiver!policy-domain!begin!end!report-id.xml.gz`` and the Subject ``Report Domain: D
Submitter: S Report-ID: ID`` (S: the domain of ``settings.email``). With ``settings.directory``
set, the ``.xml.gz`` files are written there instead (atomically), and nothing is mailed.
A rua= URI is used when it is ``mailto:`` (its ``!size`` limit is honoured); when its host is
not in the policy domain's Organizational Domain (the RFC 9989 tree walk of orgdomain.py), the
destination must first be authorised by a TXT record ``v=DMARC1...`` at
``<policy-domain>._report._dmarc.<host>`` (RFC 9990, "Verifying External Destinations"); a
rua= in that record replaces the destination when it names the same host, and makes the
destination unusable when it does not.
A missing record skips the destination (status ``skipped``); a temporary DNS error fails it for
this run (``failed``: a later run tries again).

Exactly once: the ledger in the store holds one entry per (report_id, destination). SMTP's
commit point is the final "." of DATA: a server takes responsibility for a message only when it
answers it with 250, and drops the transaction if the connection ends before the "." arrives.
So a destination is sent like this: MAIL, RCPT, DATA, the whole message except the final ".";
then the entry ``committing`` is committed to the store; then the "." is sent; on 250 the entry
becomes ``sent``, on a refusal ``failed``. A later run sends a destination again only when its
entry is missing or ``failed`` -- both mean the message was never accepted. An entry left at
``committing`` means the process died (or the connection broke) in the window between the "."
and the ledger update, where the message may or may not have been accepted: it is NOT sent
again (status ``uncertain``, exit status 1) unless `send_reports` is called with
``resend_uncertain=True`` after an operator has looked at the smarthost's log. That is the
choice: at most once inside that window (one round trip), exactly once everywhere else -- never
a duplicate. (Should an operator resend, the copy carries the same Report-ID, Message-ID and
filename, by which RFC 9990 lets the receiver recognise and discard a duplicate.) Two runs never
overlap: the store's report lock is held while sending. A dry run reads the ledger and verifies
destinations, and sends and writes nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import math
import os
import smtplib
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from mailwarden.dmarc.destinations import Destination, Verifier, parse_uri
from mailwarden.dmarc.ledger import LedgerEntry, ledger_get, ledger_put
from mailwarden.dmarc.report import SMTP_TIMEOUT, Report, ReportSettings, build_reports
from mailwarden.dmarc.reportmail import report_mail
from mailwarden.dmarc.store import LockBusy, Store, StoreError
from mailwarden.dns import DNSClient

__all__ = ["Item", "SendOutcome", "deliver_once", "parse_period", "run_report_command",
           "send_reports"]

@dataclass(frozen=True, slots=True)
class SendOutcome:
    """What happened to one report for one destination.

    status: ``sent`` (accepted by the smarthost), ``written`` (file written), ``already-sent``
    (the ledger says so: nothing done), ``would-send`` (dry run), ``skipped`` (not a usable or
    not an authorised destination: expected, not an error), ``failed`` (not sent this time; a
    later run tries again), ``uncertain`` (a previous run may have sent it: not re-sent).
    """

    report_id: str
    policy_domain: str
    destination: str
    status: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status not in ("failed", "uncertain")


# --------------------------------------------------------------------------- sending


def _hostport(text: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest.lstrip(":") or 25)
    host, sep, port = text.rpartition(":")
    return (host, int(port)) if sep and port.isdigit() else (text, 25)


class Sender:
    """Sends one report to one address with the ledger protocol of the module docstring."""

    def __init__(self, store: Store, settings: ReportSettings) -> None:
        self.store, self.settings = store, settings
        if not settings.smarthost:
            raise ValueError("no smarthost configured")
        self.host, self.port = _hostport(settings.smarthost)

    def send(self, item: Item, dest: Destination, data: bytes) -> SendOutcome:
        def outcome(status: str, detail: str) -> SendOutcome:
            return SendOutcome(item.report_id, item.policy_domain, dest.key, status, detail)

        def ledger(state: str, detail: str) -> None:
            ledger_put(self.store, LedgerEntry(
                item.report_id, dest.key, state, item.policy_domain, item.message_id, detail))

        committing = False
        in_data = False  # between DATA's 354 and the answer to the final "."
        smtp = smtplib.SMTP(timeout=SMTP_TIMEOUT, local_hostname=socket.gethostname())
        try:
            smtp.connect(self.host, self.port)
            smtp.ehlo_or_helo_if_needed()
            code, reply = smtp.mail(self.settings.sender)
            if code != 250:
                return self._refused(ledger, outcome, "MAIL", code, reply)
            code, reply = smtp.rcpt(dest.address)
            if code not in (250, 251):
                return self._refused(ledger, outcome, "RCPT", code, reply)
            code, reply = smtp.docmd("DATA")
            if code != 354:
                return self._refused(ledger, outcome, "DATA", code, reply)
            in_data = True
            smtp.send(data)
            ledger("committing", f"final '.' being sent to {self.settings.smarthost}")
            committing = True
            smtp.send(b".\r\n")
            code, reply = smtp.getreply()
            in_data = False
            if code != 250:
                return self._refused(ledger, outcome, "end of DATA", code, reply)
            answer = reply.decode("utf-8", "replace")
            ledger("sent", f"{self.settings.smarthost}: {code} {answer}")
            return outcome("sent", f"{code} {answer}")
        except StoreError as exc:
            if committing:  # accepted, or not, but the ledger cannot say "sent"
                return outcome("uncertain", f"ledger update failed after the final '.': {exc}")
            return outcome("failed", f"ledger write failed, message not sent: {exc}")
        except (OSError, smtplib.SMTPException) as exc:
            if committing:
                return outcome("uncertain", f"connection lost after the final '.' ({exc}): "
                                            "the message may have been accepted; not re-sent")
            with contextlib.suppress(StoreError):
                ledger("failed", f"{type(exc).__name__}: {exc}")
            return outcome("failed", f"{self.settings.smarthost}: {type(exc).__name__}: {exc}")
        finally:
            if in_data:
                smtp.close()  # a connection closed before the "." abandons the message
            else:
                try:
                    smtp.quit()
                except (OSError, smtplib.SMTPException):
                    smtp.close()

    @staticmethod
    def _refused(ledger: Callable[[str, str], None],
                 outcome: Callable[[str, str], SendOutcome], stage: str, code: int,
                 reply: bytes) -> SendOutcome:
        detail = f"{stage} refused: {code} {reply.decode('utf-8', 'replace')}"
        with contextlib.suppress(StoreError):
            ledger("failed", detail)
        return outcome("failed", detail)


def _write_file(directory: str, report: Report) -> Path:
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / report.filename
    fd, tmp = tempfile.mkstemp(prefix=".report-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(report.gz)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o640)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def send_reports(store: Store, reports: Iterable[Report], settings: ReportSettings,
                 dns: DNSClient, *, dry_run: bool = False,
                 resend_uncertain: bool = False) -> list[SendOutcome]:
    """Deliver every report to each of its destinations at most once (see the module
    docstring); returns one outcome per report and destination."""
    reports = list(reports)
    if dry_run:
        return _send_all(store, reports, settings, dns, dry_run=True,
                         resend_uncertain=resend_uncertain)
    try:
        with store.report_lock():
            return _send_all(store, reports, settings, dns, dry_run=False,
                             resend_uncertain=resend_uncertain)
    except LockBusy as exc:
        return [SendOutcome(r.report_id, r.policy_domain, "", "failed", str(exc))
                for r in reports]


def _send_all(store: Store, reports: list[Report], settings: ReportSettings, dns: DNSClient,
              *, dry_run: bool, resend_uncertain: bool) -> list[SendOutcome]:
    outcomes: list[SendOutcome] = []
    if settings.directory:
        for report in reports:
            outcomes.append(_to_directory(store, report, settings.directory, dry_run=dry_run))
        return outcomes
    sender = Sender(store, settings) if settings.smarthost else None
    verifier = Verifier(dns)
    for report in reports:
        def result(key: str, status: str, detail: str, report: Report = report) -> None:
            outcomes.append(SendOutcome(report.report_id, report.policy_domain, key, status,
                                        detail))

        if not report.rua:
            result("", "skipped", "the policy has no rua= destination")
            continue
        targets: list[Destination] = []
        for uri in report.rua:
            parsed = parse_uri(uri)
            if isinstance(parsed, str):
                result(uri, "skipped", parsed)
                continue
            found = verifier.destinations(report.policy_domain, parsed)
            if isinstance(found, tuple):
                result(parsed.key, *found)
                continue
            targets.extend(dest for dest in found if dest not in targets)
        item = Item(report.report_id, report.policy_domain,
                    f"<{report.report_id}@{report.submitter}>")
        for dest in dict.fromkeys(targets):
            outcomes.append(deliver_once(
                store, sender, item, dest,
                functools.partial(report_mail, report, settings, dest.address),
                dry_run=dry_run, resend_uncertain=resend_uncertain))
    return outcomes


@dataclass(frozen=True, slots=True)
class Item:
    """What the ledger needs to know of a report (aggregate or failure)."""

    report_id: str
    policy_domain: str
    message_id: str


def deliver_once(store: Store, sender: Sender | None, item: Item, dest: Destination,
                 build: Callable[[], bytes], *, dry_run: bool,
                 resend_uncertain: bool = False, honour_limit: bool = True) -> SendOutcome:
    """Send one report to one destination unless the ledger says it was (or may have
    been) sent; `build` makes the mail. `honour_limit`: skip a mail over the URI's !size."""
    def result(status: str, detail: str) -> SendOutcome:
        return SendOutcome(item.report_id, item.policy_domain, dest.key, status, detail)

    entry = ledger_get(store, item.report_id, dest.key)
    if entry is not None and entry.state == "sent":
        return result("already-sent", entry.detail)
    if entry is not None and entry.state == "committing" and not resend_uncertain:
        return result("uncertain",
                      "a previous run stopped after handing over the final '.' and before "
                      "recording the answer: the message may have been accepted; not "
                      "re-sent (check the smarthost's log, then resend_uncertain)")
    data = build()
    if honour_limit and dest.limit is not None and len(data) > dest.limit:
        return result("skipped",
                      f"report mail of {len(data)} bytes exceeds the URI's limit {dest.limit}")
    if dry_run:
        where = sender.settings.smarthost if sender is not None else "no smarthost"
        return result("would-send", f"{len(data)} bytes via {where}")
    if sender is None:
        return result("failed", "no smarthost configured")
    return sender.send(item, dest, data)


def _to_directory(store: Store, report: Report, directory: str, *,
                  dry_run: bool) -> SendOutcome:
    path = Path(directory) / report.filename
    key = f"file:{path}"

    def outcome(status: str, detail: str = "") -> SendOutcome:
        return SendOutcome(report.report_id, report.policy_domain, key, status, detail)

    entry = ledger_get(store, report.report_id, key)
    if entry is not None and entry.state == "sent":
        return outcome("already-sent", entry.detail)
    if dry_run:
        return outcome("would-send", f"{len(report.gz)} bytes")
    try:
        _write_file(directory, report)
        ledger_put(store, LedgerEntry(report.report_id, key, "sent", report.policy_domain, "",
                                     f"{len(report.gz)} bytes written"))
    except (OSError, StoreError) as exc:
        return outcome("failed", str(exc))
    return outcome("written", f"{len(report.gz)} bytes")


# --------------------------------------------------------------------------- the command


def _instant(text: str) -> float:
    text = text.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an ISO date or date-time: {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def parse_period(period: str, now: float) -> tuple[float, float]:
    """[start, end) of "yesterday" (the previous UTC day), "last-hour" (the previous whole UTC
    hour) or "START..END" (ISO dates or date-times, UTC unless they say otherwise; END is
    excluded: 2026-05-01..2026-05-02 is the day of May 1st)."""
    text = (period or "yesterday").strip()
    if text.lower() == "yesterday":
        today = math.floor(now / 86400) * 86400
        return float(today - 86400), float(today)
    if text.lower() == "last-hour":
        hour = math.floor(now / 3600) * 3600
        return float(hour - 3600), float(hour)
    start_text, sep, end_text = text.partition("..")
    if not sep:
        raise ValueError(f"period {period!r}: use yesterday, last-hour or START..END")
    start, end = _instant(start_text), _instant(end_text)
    if end <= start:
        raise ValueError(f"period {period!r}: END is not after START")
    return start, end


def run_report_command(*, store_url: str, settings: ReportSettings, dns: DNSClient,
                       period: str, dry_run: bool, now: float | None = None) -> int:
    """``mailwarden dmarc report``: build the reports of `period` and send them; prints one
    line per report and per destination; 0 when nothing failed, else 1."""
    try:
        start, end = parse_period(period, time.time() if now is None else now)
    except ValueError as exc:
        print(f"dmarc report: {exc}", file=sys.stderr)
        return 1
    span = (f"{dt.datetime.fromtimestamp(start, dt.UTC):%Y-%m-%dT%H:%M:%SZ}.."
            f"{dt.datetime.fromtimestamp(end, dt.UTC):%Y-%m-%dT%H:%M:%SZ}")
    try:
        store = Store.open(store_url)
    except (StoreError, ValueError) as exc:
        print(f"dmarc report: {exc}", file=sys.stderr)
        return 1
    try:
        reports = build_reports(store, period_start=start, period_end=end, settings=settings)
        if not reports:
            print(f"no DMARC evaluations in {span}: no report")
            return 0
        for report in reports:
            part = f" part {report.part}/{report.parts}" if report.parts > 1 else ""
            print(f"report {report.report_id} for {report.policy_domain}{part} ({span}): "
                  f"{report.records} records, {report.messages} messages")
        outcomes = send_reports(store, reports, settings, dns, dry_run=dry_run)
        for item in outcomes:
            detail = f": {item.detail}" if item.detail else ""
            print(f"{item.status} {item.policy_domain} report {item.report_id} -> "
                  f"{item.destination or '-'}{detail}")
        return 0 if all(item.ok for item in outcomes) else 1
    except (StoreError, ValueError, OSError) as exc:
        print(f"dmarc report: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
