"""DMARC failure reports (RFC 9991) in the Authentication Failure Reporting Format (RFC 6591,
an ARF feedback report of RFC 5965): when the sender's fo= asks for one, what it says, and
the mail that carries it. Pure functions; queueing and sending are in failures.py.

The mail is multipart/report; report-type=feedback-report with three parts (RFC 5965 §2): a
human-readable text, the message/feedback-report fields, and the reported message's header
only, as text/rfc822-headers (RFC 9991 Appendix A: the body is never included here). With
redaction on, every local-part in that header (Message-ID excepted), in Original-Mail-From,
Original-Rcpt-To and DKIM-Identity is replaced by a keyed hash, the same one wherever the
address appears (RFC 6590 §4; RFC 9991 §7.1), so that the domain owner can correlate without
learning who received the mail.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.policy
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import format_datetime, formatdate

from mailwarden import __version__
from mailwarden.textout import printable

# an address in a header field: local-part (dot-atom or quoted) @ domain
# (non-ASCII local-parts included, RFC 6532), also percent-encoded in a URI (%40)
_ADDRESS = re.compile(r'(?P<local>"(?:[^"\\\r\n]|\\.)*"|[^\s"<>()\[\]\\,;:@%=?&/]+)'
                      r"(?:@|%40)(?P<domain>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)")
_URL = re.compile(r"\bhttp(s?)://", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Failure:
    """What is known of one failing message when its verdict is given."""

    policy_domain: str
    author_domain: str
    source_ip: str
    mail_from: str
    rcpts: tuple[str, ...]
    arrival: float  # unix time
    headers: tuple[tuple[str, str], ...]
    authentication_results: str  # our field's value (RFC 8601)
    dmarc_failed: bool  # no aligned pass (the policy's fail)
    failed_aligned: tuple[str, ...]  # "dkim", "spf": aligned identifiers that did not pass
    aligned_passes: tuple[str, ...]  # "dkim", "spf": aligned identifiers that passed
    failed_dkim: tuple[str, str] | None  # (domain, selector) of a failing aligned signature
    dkim_failures: tuple[tuple[str, str, str], ...]  # every failing signature (d, s, reason)
    spf_failed: bool  # SPF of the MAIL FROM identity failed (any alignment)
    spf_domain: str
    spf_record: str  # the SPF record at spf_domain, "" when unknown
    delivery: str  # none | quarantine | reject: what was done with the message
    legacy: bool = False  # dmarc.mode: legacy (RFC 7489 §7.3 semantics)
    # i= of the reported signature (domain, selector) -> identity; RFC 6376 §3.5: "@" + d= when
    # the signature has none
    dkim_identities: tuple[tuple[str, str, str], ...] = ()


def triggers(fo: str, failure: Failure) -> tuple[str, ...]:
    """RFC 9989 §4.7 fo=: the failure report types the record asks for this message: "dmarc"
    (0: every mechanism failed to produce an aligned pass; 1: any one did), "dkim" (d: a
    signature failed, aligned or not), "spf" (s: SPF failed, aligned or not)."""
    options = set(fo.split(":")) if fo else {"0"}
    wanted: list[str] = []
    if ("0" in options and failure.dmarc_failed) or \
            ("1" in options and len(failure.aligned_passes) < 2):
        wanted.append("dmarc")
    if "d" in options and failure.dkim_failures:
        wanted.append("dkim")
    if "s" in options and failure.spf_failed:
        wanted.append("spf")
    return tuple(wanted)


def auth_failure(kind: str, failure: Failure) -> str:
    """RFC 6591 §3.2.2 Auth-Failure: dmarc (RFC 9991 §4), or the mechanism's own failure."""
    if kind == "dmarc":
        return "dmarc"
    if kind == "spf":
        return "spf"
    reason = failure.dkim_failures[0][2].lower() if failure.dkim_failures else ""
    return "bodyhash" if "body hash" in reason else "signature"


def identity_alignment(failure: Failure) -> str:
    """RFC 9991 §4: the mechanisms that failed to authenticate an aligned identifier, or
    "none". RFC 7489 §7.3.1 (legacy) lists the opposite: those that produced one."""
    listed = failure.aligned_passes if failure.legacy else failure.failed_aligned
    return ", ".join(listed) if listed else "none"


def redactor(key: bytes | None) -> _Redact:
    return _Redact(key)


class _Redact:
    """RFC 6590 §4: a local-part becomes the base64 of a keyed hash of it; None: unchanged."""

    def __init__(self, key: bytes | None) -> None:
        self.key = key

    def local(self, local: str) -> str:
        if self.key is None or not local:
            return local
        digest = hmac.new(self.key, local.encode("utf-8", "replace"), hashlib.sha256).digest()
        return "redacted-" + base64.b32encode(digest[:10]).decode("ascii").lower()

    def address(self, address: str) -> str:
        local, at, domain = address.rpartition("@")
        return f"{self.local(local)}@{domain}" if at else address

    def text(self, text: str) -> str:
        return _ADDRESS.sub(lambda m: m[0].replace(m["local"], self.local(m["local"]), 1), text)


def _field(value: str) -> str:
    """Printable ASCII on one logical line (a feedback-report field is a header field)."""
    return printable(re.sub(r"[\r\n]+[ \t]*", " ", value))


def _folded(name: str, value: str) -> str:
    """`name: value` folded at spaces before 78 columns (RFC 5322 §2.2.3, §2.1.1)."""
    from mailwarden.headers import fold

    return f"{name}: " + fold(name, value, 78).replace("\n", "\r\n") + "\r\n"


def feedback_fields(kind: str, failure: Failure, redact: _Redact,
                    incidents: int = 1) -> list[tuple[str, str]]:
    """The message/feedback-report fields (RFC 5965 §3.1, RFC 6591 §3.1, RFC 9991 §4)."""
    fields = [("Feedback-Type", "auth-failure"), ("Version", "1"),
              ("User-Agent", f"mailwarden/{__version__}"),
              ("Auth-Failure", auth_failure(kind, failure)),
              ("Identity-Alignment", identity_alignment(failure)),
              ("Authentication-Results", redact.text(failure.authentication_results)),
              ("Original-Mail-From", f"<{redact.address(failure.mail_from)}>"),
              ("Arrival-Date", format_datetime(dt.datetime.fromtimestamp(failure.arrival,
                                                                         dt.UTC))),
              ("Source-IP", failure.source_ip),
              ("Reported-Domain", failure.author_domain),
              ("Delivery-Result", {"reject": "reject", "quarantine": "policy"}
               .get(failure.delivery, "delivered"))]
    fields[7:7] = [("Original-Rcpt-To", f"<{redact.address(rcpt)}>") for rcpt in failure.rcpts]
    reported = failure.dkim_failures[0][:2] if kind == "dkim" and failure.dkim_failures \
        else failure.failed_dkim  # the signature Auth-Failure speaks of
    if reported is not None:
        # RFC 9991 §4: DKIM-Domain, -Identity and -Selector for the failing signature
        domain, selector = reported
        identity = next((i for d, s, i in failure.dkim_identities
                         if (d, s) == (domain, selector) and i), f"@{domain}")
        fields += [("DKIM-Domain", domain), ("DKIM-Identity", redact.address(identity)),
                   ("DKIM-Selector", selector)]
    if ("spf" in failure.failed_aligned or kind == "spf") and failure.spf_record:
        fields.append(("SPF-DNS", f"txt : {failure.spf_domain} : {failure.spf_record}"))
    if incidents > 1:
        fields.append(("Incidents", str(incidents)))
    return [(name, _field(value)) for name, value in fields]


def headers_part(failure: Failure, redact: _Redact) -> str:
    """The reported header (RFC 5965 §2 (f): text/rfc822-headers), local-parts redacted and
    links defused (RFC 9991 §7.3: http becomes hxxp)."""
    lines = []
    for name, value in failure.headers:
        if name.lower() != "message-id":  # an identifier the owner's logs know, not an address
            value = redact.text(value)
        value = _URL.sub(lambda m: f"hxxp{m[1]}://", value)
        lines.append(f"{name}:{value}".replace("\r\n", "\n").replace("\n", "\r\n"))
    return "\r\n".join(lines) + "\r\n"


def summary_text(kind: str, failure: Failure, org_name: str) -> str:
    what = {"dmarc": "failed DMARC", "dkim": "carried a failing DKIM signature",
            "spf": "failed SPF"}[kind]
    return (f"This is an authentication failure report (RFC 9991, RFC 6591) from {org_name}.\n"
            f"A message with From domain {failure.author_domain}, from {failure.source_ip},\n"
            f"{what} at {format_datetime(dt.datetime.fromtimestamp(failure.arrival, dt.UTC))}."
            "\nIts header is attached; addresses' local-parts may be redacted.\n")


@dataclass(frozen=True, slots=True)
class Content:
    """What is queued: everything but the destination's own header fields."""

    kind: str
    policy_domain: str
    author_domain: str
    text: str
    feedback: tuple[tuple[str, str], ...]
    headers: str

    def as_json(self) -> dict[str, object]:
        return {"kind": self.kind, "policy_domain": self.policy_domain,
                "author_domain": self.author_domain, "text": self.text,
                "feedback": [list(pair) for pair in self.feedback], "headers": self.headers}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Content:
        feedback = data["feedback"]
        assert isinstance(feedback, list)
        return cls(str(data["kind"]), str(data["policy_domain"]), str(data["author_domain"]),
                   str(data["text"]), tuple((str(a), str(b)) for a, b in feedback),
                   str(data["headers"]))


def content(kind: str, failure: Failure, redact: _Redact, org_name: str) -> Content:
    return Content(kind, failure.policy_domain, failure.author_domain,
                   summary_text(kind, failure, org_name),
                   tuple(feedback_fields(kind, failure, redact)), headers_part(failure, redact))


def failure_mail(item: Content, report_id: str, sender: str, submitter: str,
                 address: str) -> bytes:
    """The report mail to `address` (unsigned, not dot-stuffed)."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = address
    message["Subject"] = (f"DMARC failure report for {item.author_domain} "
                          f"(Report-ID: {report_id})")
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = f"<{report_id}@{submitter}>"
    message["Auto-Submitted"] = "auto-generated"
    message["MIME-Version"] = "1.0"
    message.make_mixed()
    message.replace_header("Content-Type", "multipart/report")
    message.set_param("report-type", "feedback-report")
    text = EmailMessage()
    text.set_content(item.text, subtype="plain", charset="utf-8")  # org_name may be any text
    del text["MIME-Version"]
    message.attach(text)
    report = EmailMessage()
    report.set_payload("".join(_folded(name, value) for name, value in item.feedback))
    report["Content-Type"] = "message/feedback-report"
    report["Content-Transfer-Encoding"] = "7bit"
    message.attach(report)
    headers = EmailMessage()
    headers.set_payload(item.headers.encode("ascii", "replace").decode("ascii"))
    headers["Content-Type"] = "text/rfc822-headers"
    headers["Content-Transfer-Encoding"] = "7bit"
    message.attach(headers)
    return message.as_bytes(policy=email.policy.SMTP.clone(max_line_length=None))


def is_feedback_report(headers: Sequence[tuple[str, str]]) -> bool:
    """A failure report is never reported on: no report loops (RFC 9991 §5.1)."""
    return any(name.lower() == "content-type" and "multipart/report" in value.lower()
               for name, value in headers)
