"""The one log line per transaction decision: key=value fields, printable ASCII only."""

from __future__ import annotations

import re

from mailwarden.transaction import Transaction
from mailwarden.verdict import Verdict


def describe(txn: Transaction, stage: str, verdict: Verdict) -> str:
    """The one log line for a transaction's decision: who, what the checks found, the
    verdict, what signing did, and what monitor mode held back."""
    rcpts = ",".join(f"<{r}>" for r in txn.rcpts[:10]) + ("..." if len(txn.rcpts) > 10 else "")
    results = " ".join(r.short() for r in txn.results)
    sender = "-" if txn.mail_from is None else f"<{txn.mail_from}>"
    parts = [
        f"queue_id={txn.queue_id or '-'}",
        f"client={txn.client}",
        f"helo={txn.helo or '-'}",
        f"from={sender}",
        f"rcpts={rcpts or '-'}",
        *_message_fields(txn),
        f"stage={stage}",
        f"results=[{results}]",
        f"verdict={verdict}",
    ]
    if verdict.action.refuses and verdict.rule:
        # why, in full: the reply to the client does not carry a DNS error (it names our
        # resolver), the log line does
        causes = [r.reason for r in txn.results if r.rule == verdict.rule and r.reason]
        if causes:
            parts.append(f'cause="{causes[-1]}"')
    parts.extend(finding.short() for finding in txn.findings.signing)
    if txn.header_cut:
        parts.append("headers=over_limit")
    if txn.quarantine:
        parts.append(f'quarantine="{txn.quarantine}"')
    if txn.monitored:
        parts.append(f"monitor=[{'; '.join(str(m) for m in txn.monitored)}]")
    return " ".join(printable(p) for p in parts)


_DOMAIN = re.compile(r"@([A-Za-z0-9.-]+)>?\s*$")
_SPACE = re.compile(r"\s")


def _message_fields(txn: Transaction) -> list[str]:
    """from_domain= and msgid= once the header is known: what an admin searches mail logs
    by (the author's domain, as DMARC sees it; the Message-ID, as the MTA logs it)."""
    if not txn.headers:
        return []
    fields = []
    authors = txn.header_values("From")
    found = _DOMAIN.search(authors[0]) if len(authors) == 1 else None
    fields.append(f"from_domain={found.group(1).lower().rstrip('.') if found else '-'}")
    ids = txn.header_values("Message-ID")
    msgid = _SPACE.sub("?", ids[0][:200]) if ids else "-"
    fields.append(f"msgid={msgid}")
    return fields


def printable(text: str) -> str:
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)
