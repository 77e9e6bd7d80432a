"""`mailwarden test`: one message file through the configured policy, as the daemon would judge it.

The message goes through the daemon's own milter session (`milter.Session`, the same engine and
rules) stage by stage, the way Postfix drives a milter: option negotiation, connect, HELO, MAIL
FROM, each RCPT TO, the header fields, the body, end of message. The replies are decoded back
into verdicts and header edits. Nothing is written to the DMARC store.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import struct
from dataclasses import dataclass, field
from typing import Any

from mailwarden import milterproto as mp
from mailwarden.config import Config
from mailwarden.dns import Nameserver
from mailwarden.findings import SigningFinding, SignStatus
from mailwarden.milter import Runtime, Session
from mailwarden.transaction import CheckResult

# What Postfix offers: protocol version 6, every action, every protocol step.
_OFFER = struct.pack(">III", mp.VERSION, 0x1FF, 0x1FFFFF)
_BODY_CHUNK = 65535


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
class Stage:
    """One SMTP stage: what was sent, the rules' results, and the reply."""

    name: str
    sent: str
    results: list[CheckResult] = field(default_factory=list)
    reply: str = ""  # "continue", "reject 550 5.7.1 ...", "(no reply: negotiated away)"


@dataclass
class Report:
    stages: list[Stage] = field(default_factory=list)
    verdict: str = "continue"  # continue | accept | reject | tempfail | discard
    reply: str = ""  # the SMTP reply of a refusal
    stage: str = ""  # where the verdict fell
    monitored: list[str] = field(default_factory=list)  # what enforcement would have done
    added: list[tuple[str, str]] = field(default_factory=list)  # top to bottom
    removed: list[tuple[str, int]] = field(default_factory=list)  # (name, 1-based index)
    quarantine: str | None = None
    rcpts_refused: list[tuple[str, str]] = field(default_factory=list)
    signing: list[SigningFinding] = field(default_factory=list)  # what signing/sealing did

    def as_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict, "reply": self.reply or None, "stage": self.stage,
            "monitored": self.monitored, "quarantine": self.quarantine,
            "rcpts_refused": [{"rcpt": r, "reply": why} for r, why in self.rcpts_refused],
            "stages": [{"stage": s.name, "sent": s.sent, "reply": s.reply,
                        "results": [_result_dict(r) for r in s.results]} for s in self.stages],
            "headers": {"added": [{"name": n, "value": v} for n, v in self.added],
                        "removed": [{"name": n, "index": i} for n, i in self.removed]},
            "signing": [finding.as_dict() for finding in self.signing],
        }


def _result_dict(result: CheckResult) -> dict[str, Any]:
    return {"rule": result.rule, "method": result.method, "result": result.result,
            "reason": result.reason, "properties": dict(result.properties)}


def offline_config(config: Config, nameservers: list[Nameserver] | None) -> Config:
    """The configuration as the test runs it: other DNS servers if given, no DMARC store."""
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


def _z(*parts: str) -> bytes:
    return b"".join(part.encode("utf-8", "surrogateescape") + b"\0" for part in parts)


def _macros(command: int, values: dict[str, str]) -> bytes:
    pairs = [item for name, value in values.items() for item in (name, value)]
    return bytes([command]) + _z(*pairs)


class _Driver:
    """Feeds one Session like an MTA and decodes its replies."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.protocol = 0

    def send(self, command: int, data: bytes) -> list[tuple[bytes, bytes]]:
        reply = self.session.handle(command, data)
        if reply is None:
            return []
        return [(bytes([code]), body) for code, body in mp.split_packets(bytearray(reply))]

    def negotiate(self) -> None:
        (reply,) = self.send(mp.C_OPTNEG, _OFFER)
        _, _, self.protocol = struct.unpack_from(">III", reply[1])

    def has(self, bit: int) -> bool:
        """The session negotiated this protocol bit (a stage not sent, or not answered)."""
        return bool(self.protocol & bit)


def _decision(replies: list[tuple[bytes, bytes]]) -> tuple[str, str]:
    """(action, SMTP reply) of a stage's final reply."""
    for code, data in replies:
        if code == mp.R_REPLYCODE:
            text = data.rstrip(b"\0").decode("utf-8", "replace").replace("%%", "%")
            return ("reject" if text.startswith("5") else "tempfail"), text
        if code in (mp.R_REJECT, mp.R_TEMPFAIL, mp.R_DISCARD, mp.R_ACCEPT, mp.R_CONTINUE):
            action = {mp.R_REJECT: "reject", mp.R_TEMPFAIL: "tempfail", mp.R_DISCARD: "discard",
                      mp.R_ACCEPT: "accept", mp.R_CONTINUE: "continue"}[code]
            default = {"reject": "550 5.7.1 Command rejected",
                       "tempfail": "451 4.7.1 Service unavailable"}.get(action, "")
            return action, default
    return "continue", ""


def run_offline(runtime: Runtime, raw: bytes, envelope: Envelope) -> Report:
    """Judge one message as the daemon would; `runtime` from `offline_runtime`."""
    session = Session(runtime)
    try:
        return _run(session, raw, envelope)
    finally:
        session.close()


def offline_runtime(config: Config) -> Runtime:
    """The daemon's own runtime for `config` (its resolver, engine and negotiation plan)."""
    from mailwarden.daemon import build_runtime

    return build_runtime(config)


def _run(session: Session, raw: bytes, envelope: Envelope) -> Report:
    report = Report()
    driver = _Driver(session)
    driver.negotiate()
    ip = ipaddress.ip_address(envelope.ip)
    family = "4" if ip.version == 4 else "6"
    client = f"{envelope.client_name}[{ip}]"
    stage_of = {rule.name: rule.stage for rule in session.runtime.config.all_rules()}

    def step(name: str, sent: str, command: int, data: bytes, macros: dict[str, str],
             no_reply: int) -> tuple[str, str]:
        driver.send(mp.C_MACRO, _macros(command, macros))
        replies = driver.send(command, data)
        stage = Stage(name, sent)
        report.stages.append(stage)
        if driver.has(no_reply):
            stage.reply = "(no reply asked: the policy has nothing to say here)"
            return "continue", ""
        action, text = _decision(replies)
        stage.reply = f"{action} {text}".strip()
        return action, text

    def refused(action: str, text: str, stage: str) -> bool:
        if action in ("reject", "tempfail", "discard"):
            report.verdict, report.reply, report.stage = action, text, stage
            return True
        if action == "accept":  # the MTA asks this milter nothing more about the message
            report.verdict, report.stage = action, stage
            return True
        return False

    connect = {"j": session.runtime.config.authserv_id, "{daemon_name}": "mailwarden-test",
               "_": f"{envelope.client_name} [{ip}]", "{client_addr}": str(ip),
               "{client_name}": envelope.client_name, "{client_port}": "25000"}
    done = False
    action, text = step("connect", client, mp.C_CONNECT,
                        _z(envelope.client_name) + family.encode()
                        + struct.pack(">H", 25000) + _z(str(ip)), connect, mp.P_NR_CONN)
    done = refused(action, text, "connect")
    if not done:
        action, text = step("helo", envelope.helo, mp.C_HELO, _z(envelope.helo), {},
                            mp.P_NR_HELO)
        done = refused(action, text, "helo")
    if not done:
        mail = {"i": envelope.queue_id, "{mail_addr}": envelope.mail_from}
        if envelope.auth_user:
            mail["{auth_authen}"] = envelope.auth_user
            mail["{auth_type}"] = "PLAIN"
        action, text = step("mail", f"<{envelope.mail_from}>", mp.C_MAIL,
                            _z(f"<{envelope.mail_from}>"), mail, mp.P_NR_MAIL)
        done = refused(action, text, "mail")
    if not done:
        accepted = 0
        for rcpt in envelope.rcpts:
            action, text = step("rcpt", f"<{rcpt}>", mp.C_RCPT, _z(f"<{rcpt}>"),
                                {"{rcpt_addr}": rcpt}, mp.P_NR_RCPT)
            if action in ("reject", "tempfail"):
                report.rcpts_refused.append((rcpt, text))
                continue
            if refused(action, text, "rcpt"):
                break
            accepted += 1
        if report.verdict in ("discard", "accept"):
            done = True
        elif not accepted:
            report.verdict, report.stage = "reject", "rcpt"
            report.reply = report.rcpts_refused[-1][1] if report.rcpts_refused else ""
            done = True
    if not done:
        fields, body = split_message(raw)
        if not driver.has(mp.P_NODATA):
            driver.send(mp.C_DATA, b"")
        leading = driver.has(mp.P_HDR_LEADSPC)
        if not driver.has(mp.P_NOHDRS):
            for name, value in fields:
                driver.send(mp.C_HEADER, _z(name, value if leading else value.lstrip(" \t")))
        if not driver.has(mp.P_NOEOH):
            driver.send(mp.C_EOH, b"")
        if not driver.has(mp.P_NOBODY):
            for start in range(0, len(body), _BODY_CHUNK):
                driver.send(mp.C_BODY, body[start:start + _BODY_CHUNK])
        driver.send(mp.C_MACRO, _macros(mp.C_EOB, {"i": envelope.queue_id}))
        replies = driver.send(mp.C_EOB, b"")
        eom = Stage("eom", f"{len(fields)} header fields, {len(body)} body bytes")
        report.stages.append(eom)
        action, text = _decision(replies)
        eom.reply = f"{action} {text}".strip()
        if not refused(action, text, "eom"):
            _edits(replies, report)
            if report.stage == "":
                report.stage = "eom"
    txn = session.txn
    for result in txn.results:
        stage_name = stage_of.get(result.rule, "")
        for stage in reversed(report.stages):
            if stage.name == stage_name:
                stage.results.append(result)
                break
    report.monitored = [str(m) for m in txn.monitored]
    report.signing = list(txn.findings.signing)
    return report


def _edits(replies: list[tuple[bytes, bytes]], report: Report) -> None:
    for code, data in replies:
        if code in (mp.R_INSHEADER, mp.R_CHGHEADER):
            (index,) = struct.unpack_from(">I", data)
            name, value = mp.strings(data[4:]) + [""] * (2 - len(mp.strings(data[4:])))
            if code == mp.R_CHGHEADER and not value:
                report.removed.append((name, index))
            else:
                report.added.append((name, value.strip()))
        elif code == mp.R_ADDHEADER:
            name, value = mp.strings(data)
            report.added.append((name, value.strip()))
        elif code == mp.R_QUARANTINE:
            report.quarantine = mp.strings(data)[0] if data else ""
    # insertions at index 0 arrive bottom-up; show them as they will stand, top first
    report.added.reverse()


def format_report(report: Report) -> str:
    lines: list[str] = []
    for stage in report.stages:
        lines.append(f"{stage.name:<8} {stage.sent}")
        for result in stage.results:
            props = " ".join(f"{k}={v}" for k, v in result.properties)
            reason = f" ({result.reason})" if result.reason else ""
            lines.append(f"           rule {result.rule!r}: {result.method}={result.result}"
                         f"{reason}{'  ' + props if props else ''}")
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
    if report.removed:
        lines.append("headers removed:")
        lines.extend(f"  {name} #{index} (claims our authserv-id: forged)"
                     for name, index in report.removed)
    if report.added:
        lines.append("headers added (top of the message):")
        lines.extend(f"  {name}: {value}" for name, value in report.added)
    return "\n".join(lines)


def _signing_line(finding: SigningFinding) -> str:
    head = f"{finding.check} by rule {finding.rule!r}: {finding.status}"
    if finding.status in (SignStatus.SIGNED, SignStatus.SEALED):
        return f"{head} d={finding.domain} s={finding.selector} a={finding.algorithm}"
    return f"{head} ({finding.reason})"


def quiet_logging() -> None:
    """The command prints its report; the daemon's per-message log lines would repeat it."""
    logging.getLogger("mailwarden").setLevel(logging.WARNING)
