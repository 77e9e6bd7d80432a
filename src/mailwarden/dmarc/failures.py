"""DMARC failure reports (RFC 9991): queued by the daemon in the store, sent by
`mailwarden dmarc failures` through the same path as aggregate reports.

Off unless `dmarc.failure_reports` is configured; then a report is made for a message only
when its policy record has ruf= (and psd=y is not set: RFC 9991 §2), its policy domain is
among `domains` (when given), fo= asks for it (afrf.triggers), the source is not internal
(as for aggregate reports), and the message is not itself a feedback report. One report per
message, for each ruf= address, at most `rate_limit` per address and hour (RFC 9991 §2: a
report generator MUST rate-limit); past it, the report is dropped and counted.

Queueing never delays or changes a verdict: the worker hands the report to a background
thread (at most QUEUE_LIMIT waiting; beyond, dropped) which writes it to the store. Sending
verifies external destinations (RFC 9991 §5: RFC 9990's procedure with ruf=) and records
each (report, destination) in the ledger, so a report goes out once.
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
from mailwarden.dmarc.afrf import Content, Failure, content, failure_mail, redactor, triggers
from mailwarden.dmarc.backends import _PG_REPORT_LOCK
from mailwarden.dmarc.destinations import Destination, Verifier, parse_uri
from mailwarden.dmarc.report import ReportSettings
from mailwarden.dmarc.store import Store

if TYPE_CHECKING:
    from mailwarden.dmarc.sending import SendOutcome

log = logging.getLogger("mailwarden.dmarc")

QUEUE_LIMIT = 1000
_RATE_LOCK = _PG_REPORT_LOCK ^ 2
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


def queue_report(store: Store, failure: Failure, *, fo: str, ruf: tuple[str, ...],
                 rate_limit: int, redact: bool, org_name: str,
                 now: float | None = None) -> list[tuple[str, str]]:
    """Store the failure report of one message for each ruf= URI within the rate limit;
    returns (destination, "queued" | "rate-limited" | "unusable: why") per URI, or nothing
    when fo= asks for no report."""
    kinds = triggers(fo, failure)
    if not kinds:
        return []
    now = time.time() if now is None else now
    item = content(kinds[0], failure, redactor(redaction_key(store) if redact else None),
                   org_name)
    report_id = hashlib.sha256(
        f"{store.instance_id}\0{now}\0{os.getpid()}\0{threading.get_ident()}\0"
        f"{failure.author_domain}\0{failure.source_ip}".encode()).hexdigest()[:32]
    text = json.dumps(item.as_json(), sort_keys=True)
    outcomes: list[tuple[str, str]] = []

    def work(db: Any) -> None:
        if store.dialect == "postgresql":
            db.execute("SELECT pg_advisory_xact_lock(?)", (_RATE_LOCK,))
        for uri in dict.fromkeys(ruf):
            parsed = parse_uri(uri)
            if isinstance(parsed, str):
                outcomes.append((uri, f"unusable: {parsed}"))
                continue
            if db.execute(_COUNT, (parsed.key, now - 3600))[0][0] >= rate_limit:
                outcomes.append((parsed.key, "rate-limited"))
                continue
            db.execute(_INSERT, (report_id, parsed.key, now, failure.policy_domain, text))
            outcomes.append((parsed.key, "queued"))

    store.transaction(work)
    return outcomes


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
    """The worker's hand-off: `submit` never blocks; one thread writes to the store."""

    def __init__(self, store: Callable[[], Store | None]) -> None:
        self._store = store
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

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                store = self._store()
                if store is None:
                    metrics.METRICS.failure_report("dropped")
                else:
                    job(store)
            except Exception:
                metrics.METRICS.failure_report("dropped")
                log.exception("could not queue a DMARC failure report")
            finally:
                self._queue.task_done()


_QUEUERS: dict[int, Queuer] = {}


def queuer_for(recorder: Any) -> Queuer:
    """The queuer that writes through `recorder`'s store (one per recorder)."""
    found = _QUEUERS.get(id(recorder))
    if found is None:
        found = _QUEUERS[id(recorder)] = Queuer(recorder.store)
    return found


# --------------------------------------------------------------------------- sending


def send_failures(store: Store, settings: ReportSettings, dns: Any, *,
                  dry_run: bool = False) -> list[SendOutcome]:
    """Send every queued report to its destination once (see the module docstring); one
    outcome per report and destination. A report whose destinations all ended (sent, or not
    usable) leaves the queue; one that failed is tried again by the next run."""
    from mailwarden.dmarc.sending import Item, Sender, SendOutcome, deliver_once

    sender = Sender(store, settings) if settings.smarthost else None
    verifier = Verifier(dns)
    outcomes: list[SendOutcome] = []
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
            done = [deliver_once(store, sender, item, dest,
                                 functools.partial(_mail, queued, settings, dest),
                                 dry_run=dry_run, honour_limit=False) for dest in found]
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
