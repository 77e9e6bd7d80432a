"""The report ledger: what is known about sending each report (aggregate or failure) to each
destination, kept in the store so that a report goes out once (see sending.py for how the
states make "exactly once" out of SMTP's commit point)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mailwarden.dmarc.store import Store

__all__ = ["LEDGER_STATES", "LedgerEntry", "ledger_entries", "ledger_get", "ledger_put"]

LEDGER_STATES = ("committing", "sent", "failed")


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """What is known about sending one report to one destination.

    state: ``committing`` -- the whole message was handed to the SMTP server and only the final
    "." (the commit point of SMTP) was still to be sent when this was written: if nothing
    follows, whether the server accepted the message is unknown; ``sent`` -- the server accepted
    it (250 after the final "."), or the file was written; ``failed`` -- the server refused it or
    the connection failed before the commit point (safe to try again).
    """

    report_id: str
    destination: str
    state: str
    policy_domain: str = ""
    message_id: str = ""
    detail: str = ""
    updated: float = 0.0


_COLUMNS = ("report_id", "destination", "state", "policy_domain", "message_id", "detail",
            "updated")
_UPSERT = (f"INSERT INTO report_ledger ({', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join('?' for _ in _COLUMNS)}) "
           "ON CONFLICT (report_id, destination) DO UPDATE SET state = excluded.state, "
           "policy_domain = excluded.policy_domain, message_id = excluded.message_id, "
           "detail = excluded.detail, updated = excluded.updated")


def _entry(row: Sequence[Any]) -> LedgerEntry:
    return LedgerEntry(report_id=row[0], destination=row[1], state=row[2],
                       policy_domain=row[3], message_id=row[4], detail=row[5],
                       updated=float(row[6]))


def ledger_get(store: Store, report_id: str, destination: str) -> LedgerEntry | None:
    rows = store.read(f"SELECT {', '.join(_COLUMNS)} FROM report_ledger "
                      "WHERE report_id = ? AND destination = ?", (report_id, destination))
    return _entry(rows[0]) if rows else None


def ledger_entries(store: Store, report_id: str | None = None) -> list[LedgerEntry]:
    sql = f"SELECT {', '.join(_COLUMNS)} FROM report_ledger"
    params: tuple[object, ...] = ()
    if report_id is not None:
        sql += " WHERE report_id = ?"
        params = (report_id,)
    return [_entry(row) for row in store.read(sql + " ORDER BY report_id, destination", params)]


def ledger_put(store: Store, entry: LedgerEntry) -> None:
    """Insert or replace the entry of (report_id, destination); committed and on disk."""
    if entry.state not in LEDGER_STATES:
        raise ValueError(f"unknown ledger state {entry.state!r}")
    values = (entry.report_id, entry.destination, entry.state, entry.policy_domain,
              entry.message_id, entry.detail, entry.updated or time.time())
    store.transaction(lambda db: db.execute(_UPSERT, values), durable=True)
