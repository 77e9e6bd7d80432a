"""The one log line per transaction decision: key=value fields, printable ASCII only."""

from __future__ import annotations

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


def printable(text: str) -> str:
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)
