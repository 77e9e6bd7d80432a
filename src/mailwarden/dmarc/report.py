"""DMARC aggregate reports (RFC 9990): build them from the store, and send each exactly once.

Building (`build_reports`): one report per policy domain and period, from the evaluations
recorded with ``period_start <= time < period_end``; ``<date_range>`` is ``begin =
floor(period_start)``, ``end = ceil(period_end) - 1`` (inclusive, as in the RFC's sample). The
policy published and the rua= destinations are those of the domain's latest evaluation in the
period (RFC 9990: "note only the final configuration observed"). Evaluations that agree on
every reported field (source IP, identifiers, disposition, aligned results, override reasons,
DKIM and SPF results) become one ``<record>`` whose ``<count>`` is their number. Details:

* ``disposition`` is ``pass`` (RFC 9990's "no action, passing DMARC with an enforcing policy")
  when the evaluation applied none, DMARC passed and the policy that applies (p for the policy
  domain itself, sp for its subdomains) is quarantine or reject;
* DKIM results are listed in the RFC's order of preference (passing and aligned first) and at
  most 100 per row; SPF: the ``mfrom`` result, or for a null reverse-path the ``helo`` one (RFC
  7208 §2.4 defines the MAIL FROM identity as postmaster@HELO then); the schema knows only
  scope ``mfrom``;
* results outside the schema's vocabularies are mapped (``error``/``unknown`` of old SPF
  libraries to ``temperror``/``permerror``; anything else to ``permerror``); override types
  other than the five of the schema are reported as ``other``, their name kept in the comment.

Report-ID: 32 hex digits, a hash of the store's instance id, the policy domain, the period and
the part number: the same report gets the same id on every run, which is what makes the ledger
work (and what RFC 9990 asks of a re-sent report); it is used unchanged as ``<report_id>``, in
the Subject and as the filename's unique-id. A report whose compressed size would make a mail
larger than ``max_size`` is split into several reports (parts) of the same period.

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
import email.policy
import gzip
import hashlib
import math
import os
import re
import smtplib
import socket
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formatdate
from pathlib import Path
from urllib.parse import unquote

from mailwarden import __version__
from mailwarden.dmarc.orgdomain import Discovery, TemporaryError
from mailwarden.dmarc.store import Evaluation, LedgerEntry, LockBusy, Store, StoreError
from mailwarden.dns import DNSClient, Status

__all__ = [
    "NAMESPACE",
    "Report",
    "ReportSettings",
    "SendOutcome",
    "build_reports",
    "parse_period",
    "run_report_command",
    "send_reports",
]

NAMESPACE = "urn:ietf:params:xml:ns:dmarc-2.0"
MAX_DKIM_PER_ROW = 100
SMTP_TIMEOUT = 60.0
_MIME_OVERHEAD = 4096  # headers and the text part, on top of the base64 attachment

_POLICIES = ("none", "quarantine", "reject")
_DKIM_RESULTS = ("none", "pass", "fail", "policy", "neutral", "temperror", "permerror")
_SPF_RESULTS = ("none", "pass", "fail", "softfail", "policy", "neutral", "temperror",
                "permerror")
_RESULT_ALIASES = {"error": "temperror", "unknown": "permerror", "hardfail": "fail"}
_OVERRIDES = ("local_policy", "mailing_list", "other", "policy_test_mode", "trusted_forwarder")
# Characters XML 1.0 does not allow (they would make the report unparseable).
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


@dataclass(frozen=True, slots=True)
class ReportSettings:
    org_name: str
    email: str  # the reporter (<report_metadata>)
    extra_contact_info: str = ""
    smarthost: str | None = None  # "HOST:PORT" to send through (plain SMTP)
    mail_from: str = ""  # envelope/header From of report mails (default: `email`)
    directory: str | None = None  # write .xml.gz files here instead of mailing
    max_size: int = 10 * 1024 * 1024

    @property
    def submitter(self) -> str:
        """The Mail Receiver's domain (Subject "Submitter:", the filename's receiver)."""
        address = self.email or self.mail_from
        return address.rpartition("@")[2].strip().lower().rstrip(".") or "localhost"

    @property
    def sender(self) -> str:
        return self.mail_from or self.email


@dataclass(frozen=True, slots=True)
class Report:
    """One aggregate report: the XML, and what is needed to send it."""

    report_id: str
    policy_domain: str
    begin: int  # <date_range>, inclusive
    end: int
    submitter: str
    rua: tuple[str, ...]
    xml: bytes
    gz: bytes  # gzip of `xml`, deterministic (mtime 0)
    records: int  # <record> elements
    messages: int  # messages counted (sum of <count>)
    part: int = 1
    parts: int = 1

    @property
    def filename(self) -> str:
        """RFC 9990's attachment name: receiver!policy-domain!begin!end!unique-id.xml.gz"""
        return (f"{self.submitter}!{self.policy_domain}!{self.begin}!{self.end}"
                f"!{self.report_id}.xml.gz")

    @property
    def subject(self) -> str:
        return (f"Report Domain: {self.policy_domain} Submitter: {self.submitter} "
                f"Report-ID: {self.report_id}")


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


# --------------------------------------------------------------------------- building


def _norm(domain: str) -> str:
    return domain.strip().lower().rstrip(".")


def _result(value: str, allowed: tuple[str, ...]) -> str:
    value = value.strip().lower()
    value = _RESULT_ALIASES.get(value, value)
    return value if value in allowed else "permerror"


def _under(child: str, parent: str) -> bool:
    return bool(child) and (child == parent or child.endswith("." + parent))


def _dkim_rank(signature: tuple[str, str, str], header_from: str) -> int:
    """RFC 9990's order of preference for DKIM signatures: passing strictly aligned, passing
    relaxed (here: a parent or child of the author domain), other passing, the rest."""
    domain, _, result = signature
    if result != "pass":
        return 3
    if domain == header_from:
        return 0
    if _under(domain, header_from) or _under(header_from, domain):
        return 1
    return 2


# A row key: source_ip, header_from, envelope_from, envelope_to, disposition, dkim, spf,
# reasons, dkim results, spf result (or None).
_Row = tuple[str, str, str, str, str, str, str, tuple[tuple[str, str], ...],
             tuple[tuple[str, str, str], ...], tuple[str, str] | None]


def _row(ev: Evaluation) -> _Row:
    header_from = _norm(ev.header_from)
    envelope_from = _norm(ev.envelope_from)
    policy_domain = _norm(ev.policy_domain)
    dkim_eval = "pass" if ev.dkim_aligned.strip().lower() == "pass" else "fail"
    spf_eval = "pass" if ev.spf_aligned.strip().lower() == "pass" else "fail"
    disposition = ev.disposition.strip().lower()
    if disposition not in _POLICIES:
        disposition = "none"
    applied = ev.p if header_from == policy_domain else (ev.sp or ev.p)
    if disposition == "none" and "pass" in (dkim_eval, spf_eval) and \
            applied.strip().lower() in ("quarantine", "reject"):
        disposition = "pass"
    reasons = []
    for kind, comment in ev.overrides:
        kind = kind.strip().lower()
        if kind not in _OVERRIDES:
            comment = f"{kind}: {comment}" if comment else kind
            kind = "other"
        reasons.append((kind, comment))
    signatures = [(_norm(domain), selector, _result(result, _DKIM_RESULTS))
                  for domain, selector, result in ev.dkim]
    signatures.sort(key=lambda sig: (_dkim_rank(sig, header_from), sig))
    spf: tuple[str, str] | None = None
    for wanted in ("mfrom", "helo"):
        if wanted == "helo" and envelope_from:
            break
        match = [(_norm(domain), _result(result, _SPF_RESULTS))
                 for domain, scope, result in ev.spf if scope.strip().lower() == wanted]
        if match:
            spf = match[0]
            break
    return (ev.source_ip.strip(), header_from, envelope_from, _norm(ev.envelope_to),
            disposition, dkim_eval, spf_eval, tuple(reasons),
            tuple(signatures[:MAX_DKIM_PER_ROW]), spf)


def _text(value: str) -> str:
    return _XML_ILLEGAL.sub("", value)


def _sub(parent: ET.Element, tag: str, text: str | None = None) -> ET.Element:
    element = ET.SubElement(parent, tag)
    if text is not None:
        element.text = _text(text)
    return element


def _render(settings: ReportSettings, report_id: str, begin: int, end: int,
            policy: Evaluation, rows: Sequence[tuple[_Row, int]]) -> bytes:
    root = ET.Element("feedback", {"xmlns": NAMESPACE})
    _sub(root, "version", "1.0")
    meta = _sub(root, "report_metadata")
    _sub(meta, "org_name", settings.org_name)
    _sub(meta, "email", settings.email)
    if settings.extra_contact_info:
        _sub(meta, "extra_contact_info", settings.extra_contact_info)
    _sub(meta, "report_id", report_id)
    date_range = _sub(meta, "date_range")
    _sub(date_range, "begin", str(begin))
    _sub(date_range, "end", str(end))
    _sub(meta, "generator", f"mailwarden {__version__}")

    published = _sub(root, "policy_published")
    _sub(published, "domain", _norm(policy.policy_domain))
    p = policy.p.strip().lower()
    _sub(published, "p", p if p in _POLICIES else "none")
    for tag, value, allowed in (("sp", policy.sp, _POLICIES), ("np", policy.np, _POLICIES),
                                ("adkim", policy.adkim, ("r", "s")),
                                ("aspf", policy.aspf, ("r", "s"))):
        value = value.strip().lower()
        if value in allowed:
            _sub(published, tag, value)
    _sub(published, "testing", "y" if policy.testing else "n")

    for row, count in rows:
        (source_ip, header_from, envelope_from, envelope_to, disposition, dkim_eval, spf_eval,
         reasons, signatures, spf) = row
        record = _sub(root, "record")
        row_element = _sub(record, "row")
        _sub(row_element, "source_ip", source_ip)
        _sub(row_element, "count", str(count))
        evaluated = _sub(row_element, "policy_evaluated")
        _sub(evaluated, "disposition", disposition)
        _sub(evaluated, "dkim", dkim_eval)
        _sub(evaluated, "spf", spf_eval)
        for kind, comment in reasons:
            reason = _sub(evaluated, "reason")
            _sub(reason, "type", kind)
            if comment:
                _sub(reason, "comment", comment)
        identifiers = _sub(record, "identifiers")
        _sub(identifiers, "header_from", header_from)
        _sub(identifiers, "envelope_from", envelope_from)  # empty for the null reverse-path
        if envelope_to:
            _sub(identifiers, "envelope_to", envelope_to)
        auth = _sub(record, "auth_results")
        for domain, selector, result in signatures:
            dkim = _sub(auth, "dkim")
            _sub(dkim, "domain", domain)
            _sub(dkim, "selector", selector)
            _sub(dkim, "result", result)
        if spf is not None:
            spf_element = _sub(auth, "spf")
            _sub(spf_element, "domain", spf[0])
            _sub(spf_element, "scope", "mfrom")
            _sub(spf_element, "result", spf[1])
    ET.indent(root)
    xml: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return xml + b"\n"


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def _mail_size(gz: bytes) -> int:
    return math.ceil(len(gz) / 57) * 78 + _MIME_OVERHEAD  # base64 lines of 76 + CRLF


def _report_id(store: Store, policy_domain: str, begin: int, end: int, part: int,
               parts: int) -> str:
    key = f"{store.instance_id}\0{policy_domain}\0{begin}\0{end}\0{part}/{parts}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def build_reports(store: Store, *, period_start: float, period_end: float,
                  settings: ReportSettings) -> list[Report]:
    """The aggregate reports of [period_start, period_end): one per policy domain (more when
    one would exceed `settings.max_size`), sorted by policy domain."""
    if period_end <= period_start:
        raise ValueError("the period ends before it starts")
    begin, end = math.floor(period_start), math.ceil(period_end) - 1
    reports: list[Report] = []
    for domain in store.policy_domains(period_start, period_end):
        counts: dict[_Row, int] = {}
        latest: Evaluation | None = None
        for ev in store.iter_evaluations(period_start, period_end, domain):
            key = _row(ev)
            counts[key] = counts.get(key, 0) + 1
            if latest is None or ev.time >= latest.time:
                latest = ev
        if latest is None:
            continue
        rows = sorted(counts.items())
        chunks = _split(settings, latest, rows, begin, end)
        for index, chunk in enumerate(chunks, start=1):
            report_id = _report_id(store, _norm(domain), begin, end, index, len(chunks))
            xml = _render(settings, report_id, begin, end, latest, chunk)
            reports.append(Report(
                report_id=report_id, policy_domain=_norm(domain), begin=begin, end=end,
                submitter=settings.submitter, rua=tuple(latest.rua), xml=xml, gz=_gzip(xml),
                records=len(chunk), messages=sum(count for _, count in chunk),
                part=index, parts=len(chunks),
            ))
    return reports


def _split(settings: ReportSettings, policy: Evaluation, rows: list[tuple[_Row, int]],
           begin: int, end: int) -> list[list[tuple[_Row, int]]]:
    """`rows` cut into chunks whose reports each fit in `settings.max_size` (halving)."""
    gz = _gzip(_render(settings, "0" * 32, begin, end, policy, rows))
    if _mail_size(gz) <= settings.max_size or len(rows) <= 1:
        return [rows]
    middle = len(rows) // 2
    return (_split(settings, policy, rows[:middle], begin, end)
            + _split(settings, policy, rows[middle:], begin, end))


# --------------------------------------------------------------------------- destinations

_MAILTO = re.compile(r"^mailto:([^?!]+)(?:\?[^!]*)?(?:!(\d+)([kmgt]?))?$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass(frozen=True, slots=True)
class _Destination:
    address: str
    limit: int | None  # bytes, from the URI's "!size"

    @property
    def host(self) -> str:
        return self.address.rpartition("@")[2]

    @property
    def key(self) -> str:
        return f"mailto:{self.address}"


def _parse_uri(uri: str) -> _Destination | str:
    """A mailto: destination, or why the URI cannot be used."""
    match = _MAILTO.match(uri.strip())
    if match is None:
        scheme = uri.partition(":")[0]
        if not uri.lower().startswith("mailto:"):
            return f"unsupported URI scheme {scheme!r}"
        return "malformed mailto: URI"
    address = unquote(match.group(1)).strip()
    local, at, host = address.rpartition("@")
    if not at or not local or "." not in host or any(c.isspace() for c in address):
        return "malformed mailto: address"
    limit = None
    if match.group(2):
        limit = int(match.group(2)) * _UNITS[match.group(3).lower()]
    return _Destination(f"{local}@{_norm(host)}", limit)


def _is_dmarc_tags(text: str) -> dict[str, str] | None:
    """The tags of a verification record, or None if it does not start with v=DMARC1."""
    parts = text.split(";")
    if parts[0].replace(" ", "").replace("\t", "") != "v=DMARC1":
        return None
    tags: dict[str, str] = {}
    for part in parts[1:]:
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


class _Verifier:
    """RFC 9990's verification of external destinations; answers are kept for one run."""

    def __init__(self, dns: DNSClient) -> None:
        self.dns = dns
        self.discovery = Discovery(dns)
        self._org: dict[str, str] = {}

    def org(self, domain: str) -> str:
        if domain not in self._org:
            self._org[domain] = self.discovery.organizational_domain(domain)
        return self._org[domain]

    def destinations(self, policy_domain: str,
                     dest: _Destination) -> list[_Destination] | tuple[str, str]:
        """The destinations to use for `dest` (itself, or the override of its verification
        record), or (status, why) when it cannot be used."""
        try:
            if self.org(policy_domain) == self.org(dest.host):
                return [dest]
        except TemporaryError as exc:
            return ("failed", f"temporary DNS error finding Organizational Domains: {exc}")
        try:
            a_label = policy_domain.encode("idna").decode("ascii")
        except UnicodeError:
            return ("skipped", f"policy domain {policy_domain!r} has no A-label form")
        name = f"{a_label}._report._dmarc.{dest.host}"
        if len(name) > 253 or any(not 0 < len(label) <= 63 for label in name.split(".")):
            return ("skipped", f"verification name {name} exceeds DNS limits")
        answer = self.dns.txt(name)
        if answer.status is Status.TEMPERROR:
            return ("failed", f"temporary DNS error verifying {name}: {answer.error}")
        records = [tags for tags in (_is_dmarc_tags(text) for text in answer.records)
                   if tags is not None]
        if not records:
            return ("skipped", f"external destination not authorised: no v=DMARC1 record at "
                               f"{name} ({answer.status})")
        overrides: list[_Destination] = []
        for tags in records:
            for uri in (u.strip() for u in tags.get("rua", "").split(",") if u.strip()):
                parsed = _parse_uri(uri)
                if isinstance(parsed, str):
                    continue
                if parsed.host != dest.host:
                    return ("skipped", f"the verification record at {name} redirects to "
                                       f"{parsed.host}, another host: neither is used")
                overrides.append(parsed)
        return list(dict.fromkeys(overrides)) or [dest]


# --------------------------------------------------------------------------- sending


def _message(report: Report, settings: ReportSettings, address: str) -> bytes:
    message = MIMEMultipart()
    message["From"] = settings.sender
    message["To"] = address
    message["Subject"] = report.subject
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = f"<{report.report_id}@{report.submitter}>"
    message["Auto-Submitted"] = "auto-generated"
    start = dt.datetime.fromtimestamp(report.begin, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    stop = dt.datetime.fromtimestamp(report.end, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    part = f" (part {report.part} of {report.parts})" if report.parts > 1 else ""
    text = (f"This is a DMARC aggregate report (RFC 9990){part} from {settings.org_name} "
            f"for {report.policy_domain},\ncovering {start} to {stop} UTC: "
            f"{report.messages} messages in {report.records} records.\n"
            f"Report-ID: {report.report_id}\n")
    message.attach(MIMEText(text, "plain", "us-ascii"))
    attachment = MIMEApplication(report.gz, "gzip")
    attachment.add_header("Content-Disposition", "attachment", filename=report.filename)
    message.attach(attachment)
    # No header folding, so the filename stays one plain parameter (not RFC 2231 pieces).
    data = message.as_bytes(policy=email.policy.SMTP.clone(max_line_length=None))
    data = re.sub(rb"(?m)^\.", b"..", data)  # SMTP dot-stuffing (RFC 5321 §4.5.2)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def _hostport(text: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest.lstrip(":") or 25)
    host, sep, port = text.rpartition(":")
    return (host, int(port)) if sep and port.isdigit() else (text, 25)


class _Sender:
    """Sends one report to one address with the ledger protocol of the module docstring."""

    def __init__(self, store: Store, settings: ReportSettings) -> None:
        self.store, self.settings = store, settings
        if not settings.smarthost:
            raise ValueError("no smarthost configured")
        self.host, self.port = _hostport(settings.smarthost)

    def send(self, report: Report, dest: _Destination, data: bytes) -> SendOutcome:
        def outcome(status: str, detail: str) -> SendOutcome:
            return SendOutcome(report.report_id, report.policy_domain, dest.key, status, detail)

        def ledger(state: str, detail: str) -> None:
            self.store.ledger_put(LedgerEntry(
                report.report_id, dest.key, state, report.policy_domain,
                f"<{report.report_id}@{report.submitter}>", detail))

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
    sender = _Sender(store, settings) if settings.smarthost else None
    verifier = _Verifier(dns)
    for report in reports:
        def result(key: str, status: str, detail: str, report: Report = report) -> None:
            outcomes.append(SendOutcome(report.report_id, report.policy_domain, key, status,
                                        detail))

        if not report.rua:
            result("", "skipped", "the policy has no rua= destination")
            continue
        targets: list[_Destination] = []
        for uri in report.rua:
            parsed = _parse_uri(uri)
            if isinstance(parsed, str):
                result(uri, "skipped", parsed)
                continue
            found = verifier.destinations(report.policy_domain, parsed)
            if isinstance(found, tuple):
                result(parsed.key, *found)
                continue
            targets.extend(dest for dest in found if dest not in targets)
        for dest in dict.fromkeys(targets):
            entry = store.ledger_get(report.report_id, dest.key)
            if entry is not None and entry.state == "sent":
                result(dest.key, "already-sent", entry.detail)
                continue
            if entry is not None and entry.state == "committing" and not resend_uncertain:
                result(dest.key, "uncertain",
                       "a previous run stopped after handing over the final '.' and before "
                       "recording the answer: the message may have been accepted; not "
                       "re-sent (check the smarthost's log, then resend_uncertain)")
                continue
            data = _message(report, settings, dest.address)
            if dest.limit is not None and len(data) > dest.limit:
                result(dest.key, "skipped",
                       f"report mail of {len(data)} bytes exceeds the URI's limit {dest.limit}")
                continue
            if dry_run:
                result(dest.key, "would-send", f"{len(data)} bytes via {settings.smarthost}")
                continue
            if sender is None:
                result(dest.key, "failed", "no smarthost and no directory configured")
                continue
            outcomes.append(sender.send(report, dest, data))
    return outcomes


def _to_directory(store: Store, report: Report, directory: str, *,
                  dry_run: bool) -> SendOutcome:
    path = Path(directory) / report.filename
    key = f"file:{path}"

    def outcome(status: str, detail: str = "") -> SendOutcome:
        return SendOutcome(report.report_id, report.policy_domain, key, status, detail)

    entry = store.ledger_get(report.report_id, key)
    if entry is not None and entry.state == "sent":
        return outcome("already-sent", entry.detail)
    if dry_run:
        return outcome("would-send", f"{len(report.gz)} bytes")
    try:
        _write_file(directory, report)
        store.ledger_put(LedgerEntry(report.report_id, key, "sent", report.policy_domain, "",
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
