"""DMARC failure reports (RFC 9991): queued by the daemon in the store, sent by
`mailwarden dmarc failures` through the same path as aggregate reports.

Off unless `dmarc.failure_reports` is configured; then a report is made for a message only
when its policy record has ruf= (and psd=y is not set: RFC 9991 §2), its policy domain is
among `domains` (when given), fo= asks for it (afrf.triggers), the source is not internal
(as for aggregate reports), and the message is not itself a feedback report. One report per
message, for each ruf= address, at most `rate_limit` per address and hour (RFC 9991 §2: a
report generator MUST rate-limit); past it, the report is dropped and counted.

Queueing never delays or changes a verdict: the worker hands the report to a background
thread (at most QUEUE_LIMIT waiting; beyond, dropped) which writes it to the store over a
connection of its own. Sending verifies external destinations (RFC 9991 §5: RFC 9990's
procedure with ruf=) and records each (report, destination) in the ledger, so a report goes
out once; one not delivered within MAX_AGE is given up, and ended ones are deleted after KEEP.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mailwarden import metrics
from mailwarden.dmarc.afrf import Content, Failure, content, failure_mail, redactor
from mailwarden.dmarc.destinations import Destination, Verifier, parse_uri
from mailwarden.dmarc.report import ReportSettings
from mailwarden.dmarc.store import Store, StoreError

if TYPE_CHECKING:
    from mailwarden.dmarc.sending import SendOutcome

log = logging.getLogger("mailwarden.dmarc")

QUEUE_LIMIT = 1000
MAX_AGE = 3 * 86400  # a report not delivered by then is given up
KEEP = 30 * 86400  # ended reports (their headers) are deleted after this
_RATE_LOCK_CLASS = 0x6D77_6672  # "mwfr": pg_advisory_xact_lock(int4, int4) keys per destination
_COUNT = "SELECT count(*) FROM failure_reports WHERE destination = ? AND created >= ?"
_INSERT = ("INSERT INTO failure_reports (report_id, destination, created, policy_domain, "
           "content) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING")


@dataclass(frozen=True, slots=True)
class Queued:
    """A failure report waiting for one destination."""

    report_id: str
    destination: str  # the ruf= URI
    created: float
    policy_domain: str
    content: Content


def redaction_key(store: Store) -> bytes:
    """The store's own key for RFC 6590 hashes: the same on every MTA of a fleet, never
    sent anywhere (report ids hash the instance id differently)."""
    return hashlib.sha256(f"redact\0{store.instance_id}".encode()).digest()


def queue_report(store: Store, failure: Failure, *, kind: str, ruf: tuple[str, ...],
                 rate_limit: int, redact: bool, org_name: str,
                 now: float | None = None) -> list[tuple[str, str]]:
    """Store the failure report of one message (of `kind`, what fo= asked: afrf.triggers)
    for each ruf= URI within the rate limit; returns (destination, "queued" |
    "rate-limited" | "unusable: why") per URI."""
    now = time.time() if now is None else now
    item = content(kind, failure, redactor(redaction_key(store) if redact else None),
                   org_name)
    report_id = hashlib.sha256(
        f"{store.instance_id}\0{now}\0{os.getpid()}\0{threading.get_ident()}\0"
        f"{failure.author_domain}\0{failure.source_ip}".encode()).hexdigest()[:32]
    text = json.dumps(item.as_json(), sort_keys=True)
    outcomes: list[tuple[str, str]] = []

    def work(db: Any) -> None:
        if store.dialect == "postgresql":
            # a fleet counts together: one destination's count is serialised across MTAs,
            # and a lock not had in 5 s drops the report rather than waiting on
            db.execute("SET LOCAL lock_timeout = '5s'")
        for uri in dict.fromkeys(ruf):
            parsed = parse_uri(uri)
            if isinstance(parsed, str):
                outcomes.append((uri, f"unusable: {parsed}"))
                continue
            if store.dialect == "postgresql":
                db.execute("SELECT pg_advisory_xact_lock(?, hashtext(?))",
                           (_RATE_LOCK_CLASS, parsed.key))
            if db.execute(_COUNT, (parsed.key, now - 3600))[0][0] >= rate_limit:
                outcomes.append((parsed.key, "rate-limited"))
                continue
            db.execute(_INSERT, (report_id, parsed.key, now, failure.policy_domain, text))
            outcomes.append((parsed.key, "queued"))

    store.transaction(work)
    return outcomes


def expire(store: Store, now: float) -> list[tuple[str, str, str]]:
    """Give up reports still queued MAX_AGE after they were made (a destination that refuses
    them for good, or a run that may have sent one: RFC 9991 asks for them "almost
    immediately", a week later they help nobody), and forget those ended KEEP ago; returns
    (report_id, destination, policy_domain) of the reports given up."""
    def work(db: Any) -> list[tuple[str, str, str]]:
        rows = db.execute("SELECT report_id, destination, policy_domain FROM failure_reports "
                          "WHERE state = 'queued' AND created < ?", (now - MAX_AGE,))
        db.execute("UPDATE failure_reports SET state = 'expired' WHERE state = 'queued' AND "
                   "created < ?", (now - MAX_AGE,))
        db.execute("DELETE FROM failure_reports WHERE state <> 'queued' AND created < ?",
                   (now - KEEP,))
        return [(str(a), str(b), str(c)) for a, b, c in rows]

    return store.transaction(work)


def pending(store: Store) -> list[Queued]:
    """The reports still to send, oldest first."""
    rows = store.read(
        "SELECT f.report_id, f.destination, f.created, f.policy_domain, f.content "
        "FROM failure_reports f WHERE f.state = 'queued' "
        "ORDER BY f.created, f.report_id, f.destination")
    return [Queued(r[0], r[1], float(r[2]), r[3], Content.from_json(json.loads(r[4])))
            for r in rows]


# --------------------------------------------------------------------------- the daemon side


class Queuer:
    """The worker's hand-off: `submit` never blocks; one thread writes to the store, on a
    connection of its own (a slow write or lock here never holds the evaluations' writer,
    which the milter waits for)."""

    RETRY_OPEN = 60.0

    def __init__(self, url: str) -> None:
        self.url = url
        self._store: Store | None = None
        self._next_open = 0.0
        self._queue: queue.Queue[Callable[[Store], None]] = queue.Queue(QUEUE_LIMIT)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job: Callable[[Store], None]) -> bool:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            metrics.METRICS.failure_report("dropped")
            return False
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="dmarc-failure-reports")
                self._thread.start()
        return True

    def drain(self, timeout: float = 10.0) -> None:
        """Wait until what was submitted is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def _open(self) -> Store | None:
        if self._store is None and time.monotonic() >= self._next_open:
            try:
                self._store = Store.open(self.url)
            except Exception as exc:
                self._next_open = time.monotonic() + self.RETRY_OPEN
                log.error("failure reports: the DMARC store cannot be opened (%s); reports "
                          "are dropped until it can", exc)
        return self._store

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                store = self._open()
                if store is None:
                    metrics.METRICS.failure_report("dropped")
                else:
                    job(store)
            except Exception:
                metrics.METRICS.failure_report("dropped")
                log.exception("could not queue a DMARC failure report")
            finally:
                self._queue.task_done()


_QUEUERS: dict[str, Queuer] = {}
_QUEUERS_LOCK = threading.Lock()


def queuer_for(url: str) -> Queuer:
    """This process's queuer for the store at `url`."""
    with _QUEUERS_LOCK:
        found = _QUEUERS.get(url)
        if found is None:
            found = _QUEUERS[url] = Queuer(url)
        return found


# --------------------------------------------------------------------------- sending


def send_failures(store: Store, settings: ReportSettings, dns: Any, *,
                  dry_run: bool = False, now: float | None = None) -> list[SendOutcome]:
    """Send every queued report to its destination once (see the module docstring); one
    outcome per report and destination. A report whose destinations all ended (sent, or not
    usable) leaves the queue; one that failed is tried again by the next run."""
    from mailwarden.dmarc.sending import Item, Sender, SendOutcome, deliver_once

    sender = Sender(store, settings) if settings.smarthost else None
    verifier = Verifier(dns)
    outcomes: list[SendOutcome] = []
    if not dry_run:
        for report_id, destination, domain in expire(store, time.time() if now is None else now):
            metrics.METRICS.failure_report("expired")
            outcomes.append(SendOutcome(report_id, domain, destination, "expired",
                                        f"not delivered within {MAX_AGE // 3600} hours: "
                                        "given up"))
    for queued in pending(store):
        item = Item(queued.report_id, queued.policy_domain,
                    f"<{queued.report_id}@{settings.submitter}>")
        parsed = parse_uri(queued.destination)
        found = parsed if isinstance(parsed, str) else \
            verifier.destinations(queued.policy_domain, parsed, kind="ruf")
        if isinstance(found, (str, tuple)):
            status, detail = ("skipped", found) if isinstance(found, str) else found
            done = [SendOutcome(item.report_id, item.policy_domain, queued.destination, status,
                                detail)]
        else:
            try:
                done = [deliver_once(store, sender, item, dest,
                                     functools.partial(_mail, queued, settings, dest),
                                     dry_run=dry_run, honour_limit=False) for dest in found]
            except (StoreError, OSError):
                raise
            except Exception as exc:  # one broken report never blocks the queue behind it
                log.exception("failure report %s could not be made", queued.report_id)
                done = [SendOutcome(item.report_id, item.policy_domain, queued.destination,
                                    "failed", f"could not be made: {exc}")]
        for outcome in done:
            metrics.METRICS.failure_report(outcome.status)
        outcomes.extend(done)
        if not dry_run and all(o.status in ("sent", "already-sent", "skipped") for o in done):
            store.transaction(functools.partial(_done, queued))
    return outcomes


def _done(queued: Queued, db: Any) -> None:
    db.execute("UPDATE failure_reports SET state = 'done' WHERE report_id = ? AND "
               "destination = ?", (queued.report_id, queued.destination))


def _mail(item: Queued, settings: ReportSettings, dest: Destination) -> bytes:
    from mailwarden.dmarc.reportmail import finish_mail

    data = failure_mail(item.content, item.report_id, settings.sender, settings.submitter,
                        dest.address)
    return finish_mail(data, settings)
