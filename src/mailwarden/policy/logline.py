"""The one log line per transaction decision.

Grammar (docs/logging.md): fields separated by one space; a field is `key=value`; a value is
either a token (printable ASCII, no space, no `"`) or a quoted string (`"` ... `"`, where `\\"`
and `\\\\` stand for `"` and `\\`). Anything else the client sent is shown as `?`, so a line
is always one line of printable ASCII and parses back into the same fields (`logparse`).
"""

from __future__ import annotations

import re

from mailwarden.results import Result
from mailwarden.textout import printable
from mailwarden.transaction import Monitored, Transaction
from mailwarden.verdict import Verdict


def describe(txn: Transaction, stage: str, verdict: Verdict) -> str:
    """The one log line for a transaction's decision: who, what the checks found, the
    verdict, what signing did, and what monitor mode held back."""
    rcpts = ",".join(f"<{r}>" for r in txn.rcpts[:10]) + ("..." if len(txn.rcpts) > 10 else "")
    sender = "-" if txn.mail_from is None else f"<{txn.mail_from}>"
    fields: list[tuple[str, str]] = [
        ("queue_id", txn.queue_id or "-"),
        ("client", txn.client),
        ("helo", txn.helo or "-"),
        ("from", sender),
        ("rcpts", rcpts or "-"),
        *_message_fields(txn),
        ("stage", stage),
        ("results", " ".join(r.short() for r in txn.results) or "-"),
        ("verdict", str(verdict.action)),
    ]
    if verdict.rule:
        fields.append(("rule", verdict.rule))
    if verdict.check:
        fields.append(("check", verdict.check))
    if verdict.reply is not None:
        fields.append(("reply", str(verdict.reply)))
    elif verdict.reason:
        fields.append(("reason", verdict.reason))
    if verdict.action.refuses and verdict.rule:
        # why, in full: the reply to the client does not carry a DNS error (it names our
        # resolver), the log line does
        causes = [r.reason for r in txn.results if r.rule == verdict.rule and r.reason]
        if causes:
            fields.append(("cause", causes[-1]))
    # why a result that writes no header failed without a refusal (a report not stored)
    notes = [f"{r.method}: {r.reason}" for r in txn.results if not r.report and r.reason
             and r.result in (Result.FAIL, Result.TEMPERROR) and not verdict.action.refuses]
    if notes:
        fields.append(("notes", "; ".join(notes)))
    signing: dict[str, list[str]] = {}  # one field per check: one outcome per key
    for finding in txn.findings.signing:
        signing.setdefault(finding.check, []).append(finding.outcome())
    fields.extend((check, " ".join(outcomes)) for check, outcomes in signing.items())
    if txn.header_cut:
        fields.append(("headers", "over_limit"))
    if txn.quarantine:
        fields.append(("quarantine", txn.quarantine))
    if txn.monitored:
        fields.append(("monitor", "; ".join(_held_back(m) for m in txn.monitored)))
    return " ".join(f"{key}={value(text)}" for key, text in fields)


def _held_back(monitored: Monitored) -> str:
    """`reject by spf at mail: 550 5.7.23 ...`: what a monitored rule would have done."""
    what = f"{monitored.action} by {monitored.rule} at {monitored.stage}"
    detail = monitored.reply or monitored.reason
    return f"{what}: {detail}" if detail else what


_DOMAIN = re.compile(r"@([A-Za-z0-9.-]+)>?\s*$")


def _message_fields(txn: Transaction) -> list[tuple[str, str]]:
    """from_domain= and msgid= once the header is known: what an admin searches mail logs
    by (the author's domain, as DMARC sees it; the Message-ID, as the MTA logs it)."""
    if not txn.headers:
        return []
    authors = txn.header_values("From")
    found = _DOMAIN.search(authors[0]) if len(authors) == 1 else None
    ids = txn.header_values("Message-ID")
    return [("from_domain", found.group(1).lower().rstrip(".") if found else "-"),
            ("msgid", ids[0].strip()[:200] if ids and ids[0].strip() else "-")]


_TOKEN = re.compile(r'[!#-~]+')  # printable ASCII but space and '"'


def value(text: str) -> str:
    """`text` as a field value: a bare token when it is one, else a quoted string."""
    if _TOKEN.fullmatch(text):  # a token is printable already
        return text
    shown = printable(text)
    if _TOKEN.fullmatch(shown):
        return shown
    return '"' + shown.replace("\\", "\\\\").replace('"', '\\"') + '"'

