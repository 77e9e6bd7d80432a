"""`mailwarden test`: one message file through the configured policy, as the daemon would judge it.

The message goes through the daemon's own stage API (`stage.Connection`, the same engine, rules
and negotiation plan) stage by stage, the way an MTA drives a milter: connect, HELO, MAIL FROM,
each RCPT TO, the header fields, the body, end of message; each stage's Decision is reported
with the results its rules recorded. Nothing is written to the DMARC store.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any

from mailwarden.config import Config, Reply
from mailwarden.dns import Nameserver
from mailwarden.findings import SigningFinding, SignStatus
from mailwarden.stage import Connection, Decision, Runtime
from mailwarden.textout import shown
from mailwarden.transaction import CheckResult
from mailwarden.verdict import Action, Stage

_BODY_CHUNK = 65535
# What the MTA answers for a refusal without a reply of ours (Postfix's words).
_MTA_DEFAULT = {Action.REJECT: "550 5.7.1 Command rejected",
                Action.TEMPFAIL: "451 4.7.1 Service unavailable"}


@dataclass(frozen=True, slots=True)
class Envelope:
    ip: str
    helo: str
    mail_from: str
    rcpts: tuple[str, ...]
    client_name: str = "unknown"  # the name the MTA found for the client ("unknown": none)
    auth_user: str = ""  # SASL login name, as Postfix's {auth_authen}
    queue_id: str = "TEST"


@dataclass
class StageReport:
    """One SMTP stage: what was sent, the rules' results, and the reply."""

    name: str
    sent: str
    results: list[CheckResult] = field(default_factory=list)
    reply: str = ""  # "continue", "reject 550 5.7.1 ...", "(no reply: negotiated away)"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (rule, why it did not run)


@dataclass
class Report:
    stages: list[StageReport] = field(default_factory=list)
    verdict: str = "continue"  # continue | accept | reject | tempfail | discard
    reply: str = ""  # the SMTP reply of a refusal
    stage: str = ""  # where the verdict fell
    monitored: list[str] = field(default_factory=list)  # what enforcement would have done
    added: list[tuple[str, str]] = field(default_factory=list)  # top to bottom
    removed: list[tuple[str, int]] = field(default_factory=list)  # (name, 1-based index)
    quarantine: str | None = None
    rcpts_refused: list[tuple[str, str]] = field(default_factory=list)
    signing: list[SigningFinding] = field(default_factory=list)  # what signing/sealing did
    failure_reports: list[str] = field(default_factory=list)  # made, not sent by the test

    def as_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict, "reply": self.reply or None, "stage": self.stage,
            "monitored": self.monitored, "quarantine": self.quarantine,
            "rcpts_refused": [{"rcpt": r, "reply": why} for r, why in self.rcpts_refused],
            "stages": [{"stage": s.name, "sent": s.sent, "reply": s.reply,
                        "results": [_result_dict(r) for r in s.results],
                        "skipped": [{"rule": rule, "why": why} for rule, why in s.skipped]}
                       for s in self.stages],
            "headers": {"added": [{"name": n, "value": v} for n, v in self.added],
                        "removed": [{"name": n, "index": i} for n, i in self.removed]},
            "signing": [finding.as_dict() for finding in self.signing],
            "failure_reports": self.failure_reports,
        }


def _result_dict(result: CheckResult) -> dict[str, Any]:
    return {"rule": result.rule, "method": result.method, "result": result.result,
            "reason": result.reason, "properties": dict(result.properties)}


def offline_config(config: Config, nameservers: list[Nameserver] | None) -> Config:
    """The configuration as the test runs it: other DNS servers if given, no DMARC store
    (no evaluation recorded, no failure report queued: a report that would be made is
    shown)."""
    dns = config.dns
    if nameservers:
        dns = dataclasses.replace(dns, nameservers=tuple(nameservers))
    dmarc = dataclasses.replace(config.dmarc, store="")
    return dataclasses.replace(config, dns=dns, dmarc=dmarc)


def split_message(raw: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """Header fields as Postfix hands them to a milter (value with its leading space, folded
    lines joined by LF) and the body with CRLF line ends."""
    text = raw.replace(b"\r\n", b"\n")
    head, sep, body = text.partition(b"\n\n")
    if not sep and not text.endswith(b"\n"):
        head, body = text, b""
    fields: list[tuple[str, str]] = []
    for line in head.decode("utf-8", "surrogateescape").split("\n"):
        if not line:
            continue
        if line[0] in " \t" and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + "\n" + line)
        elif ":" in line:
            name, _, value = line.partition(":")
            fields.append((name.rstrip(), value))
        elif not line.startswith("From "):  # an mbox separator is not a header field
            fields.append((line, ""))
    return fields, body.replace(b"\n", b"\r\n")


def _reply_text(decision: Decision) -> str:
    reply: Reply | None = decision.reply
    if reply is None:
        return _MTA_DEFAULT.get(decision.action, "")
    return f"{reply.code} {reply.status} {reply.text.replace('%%', '%')}"


def run_offline(runtime: Runtime, raw: bytes, envelope: Envelope) -> Report:
    """Judge one message as the daemon would; `runtime` from `offline_runtime`."""
    connection = Connection(runtime, explain=True)
    try:
        return _run(connection, raw, envelope)
    finally:
        connection.close()


def offline_runtime(config: Config) -> Runtime:
    """The daemon's own runtime for `config` (its resolver, engine and negotiation plan)."""
    from mailwarden.daemon import build_runtime

    return build_runtime(config)


class _Recorder:
    """Each stage's Decision into the report, with the results its rules recorded."""

    def __init__(self, connection: Connection, report: Report) -> None:
        self.connection, self.report = connection, report
        self.seen = 0
        self.seen_skipped = 0

    def stage(self, name: Stage, sent: str, decision: Decision) -> Decision:
        results = self.connection.txn.results
        stage = StageReport(str(name), sent, list(results[self.seen:]))
        self.seen = len(results)
        skipped = self.connection.txn.skipped
        stage.skipped = [(rule, why) for _, rule, why in skipped[self.seen_skipped:]]
        self.seen_skipped = len(skipped)
        self.report.stages.append(stage)
        if name not in self.connection.runtime.plan.answers:
            stage.reply = "(no reply asked: the policy has nothing to say here)"
        else:
            stage.reply = f"{decision.action} {_reply_text(decision)}".strip()
        return decision

    def final(self, decision: Decision) -> bool:
        """Whether the message ends here (refused, or accepted: no more questions)."""
        if decision.action is Action.CONTINUE:
            return False
        report = self.report
        report.verdict, report.stage = str(decision.action), str(decision.stage)
        report.reply = _reply_text(decision) if decision.refuses else ""
        return True


def _run(connection: Connection, raw: bytes, envelope: Envelope) -> Report:
    report = Report()
    record = _Recorder(connection, report)
    config = connection.runtime.config
    ip = ipaddress.ip_address(envelope.ip)
    client = f"{envelope.client_name}[{ip}]"
    connect = {"j": config.authserv_id, "{daemon_name}": "mailwarden-test",
               "_": f"{envelope.client_name} [{ip}]", "{client_addr}": str(ip),
               "{client_name}": envelope.client_name, "{client_port}": "25000"}
    record.stage(Stage.CONNECT, client,
                 connection.connect(envelope.client_name, str(ip), 25000, connect))
    if record.final(record.stage(Stage.HELO, envelope.helo, connection.helo(envelope.helo))):
        return _finish(connection, report)
    mail = {"i": envelope.queue_id, "{mail_addr}": envelope.mail_from}
    if envelope.auth_user:
        mail["{auth_authen}"] = envelope.auth_user
        mail["{auth_type}"] = "PLAIN"
    decision = connection.mail(f"<{envelope.mail_from}>", (), mail)
    if record.final(record.stage(Stage.MAIL, f"<{envelope.mail_from}>", decision)):
        return _finish(connection, report)
    accepted = 0
    for rcpt in envelope.rcpts:
        decision = record.stage(Stage.RCPT, f"<{rcpt}>",
                                connection.rcpt(f"<{rcpt}>", (), {"{rcpt_addr}": rcpt}))
        if decision.action in (Action.REJECT, Action.TEMPFAIL):
            report.rcpts_refused.append((rcpt, _reply_text(decision)))
            continue
        if record.final(decision):  # discard or accept: no more recipients are asked about
            return _finish(connection, report)
        accepted += 1
    if not accepted:
        report.verdict, report.stage = "reject", "rcpt"
        report.reply = report.rcpts_refused[-1][1] if report.rcpts_refused else ""
        return _finish(connection, report)
    fields, body = split_message(raw)
    for name, value in fields:
        connection.header(name, value)
    connection.end_of_headers()
    if connection.runtime.plan.needs_body:
        for start in range(0, len(body), _BODY_CHUNK):
            connection.body(body[start:start + _BODY_CHUNK])
    decision = connection.end_of_message({"i": envelope.queue_id})
    record.stage(Stage.EOM, f"{len(fields)} header fields, {len(body)} body bytes", decision)
    if not record.final(decision) or not decision.refuses:
        report.stage = report.stage or "eom"
        report.added = [(name, value.strip()) for name, value in decision.edits.insert]
        report.removed = [("Authentication-Results", index)
                          for index in sorted(decision.edits.delete, reverse=True)]
        report.quarantine = decision.quarantine
    return _finish(connection, report)


def _finish(connection: Connection, report: Report) -> Report:
    txn = connection.txn
    report.monitored = [str(m) for m in txn.monitored]
    report.signing = list(txn.findings.signing)
    report.failure_reports = list(txn.findings.failure_reports)
    return report


def format_report(report: Report) -> str:
    lines: list[str] = []
    for stage in report.stages:
        lines.append(f"{stage.name:<8} {stage.sent}")
        for result in stage.results:
            props = " ".join(f"{k}={v}" for k, v in result.properties)
            reason = f" ({result.reason})" if result.reason else ""
            lines.append(f"           rule {result.rule!r}: {result.method}={result.result}"
                         f"{reason}{'  ' + props if props else ''}")
        lines.extend(f"           rule {rule!r}: skipped ({why})" for rule, why in stage.skipped)
        lines.append(f"           -> {stage.reply}")
    for rcpt, why in report.rcpts_refused:
        lines.append(f"recipient <{rcpt}> refused: {why}")
    verdict = report.verdict.upper() + (f" {report.reply}" if report.reply else "")
    lines.append("")
    lines.append(f"verdict: {verdict} (at {report.stage or 'eom'})")
    if report.quarantine is not None:
        lines.append(f"quarantined: {report.quarantine}")
    for note in report.monitored:
        lines.append(f"monitor mode, not applied: {note}")
    for finding in report.signing:
        lines.append(_signing_line(finding))
    for made in report.failure_reports:
        lines.append(f"{made} (the daemon queues it; mailwarden test sends nothing)")
    if report.removed:
        lines.append("headers removed:")
        lines.extend(f"  {name} #{index} (claims our authserv-id: forged)"
                     for name, index in report.removed)
    if report.added:
        lines.append("headers added (top of the message):")
        for name, value in report.added:  # as folded in the message
            first, *rest = value.strip().split("\n")
            lines.append(f"  {name}: {first}")
            lines.extend(f"  {line}" for line in rest)
    # what came from elsewhere (envelope, message, DNS) cannot break or forge a line
    return "\n".join(shown(line) for line in lines)


def _signing_line(finding: SigningFinding) -> str:
    head = f"{finding.check} by rule {finding.rule!r}: {finding.status}"
    if finding.status in (SignStatus.SIGNED, SignStatus.SEALED):
        return f"{head} d={finding.domain} s={finding.selector} a={finding.algorithm}"
    return f"{head} ({finding.reason})"


def quiet_logging() -> None:
    """The command prints its report; the daemon's per-message log lines would repeat it."""
    logging.getLogger("mailwarden").setLevel(logging.WARNING)
