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

Sending them is `dmarc.sending`; the rua= destinations and their verification are
`dmarc.destinations`.
"""

from __future__ import annotations

import gzip
import hashlib
import ipaddress
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mailwarden import __version__
from mailwarden.dmarc.orgdomain import legacy_organizational_domain
from mailwarden.dmarc.store import Evaluation, Store
from mailwarden.dns import is_address_like

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

__all__ = ["NAMESPACE", "Report", "ReportSettings", "build_reports"]

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
    # Sources left out unless this is set: private-use addresses (RFC 1918, RFC 6598, RFC 4193,
    # loopback, link-local) and `internal_networks` (the networks of the configured host
    # groups): how mail moves inside our network is nobody else's business.
    include_internal_sources: bool = False
    internal_networks: tuple[str, ...] = ()
    # DKIM keys that sign the report mails (the daemon's signing table for `sender`), and
    # the options: a report that passes DMARC at the receiver is one it believes
    signing_keys: tuple[Any, ...] = ()
    sign_options: Any = None  # mailwarden.dkim.sign.SignOptions

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


# --------------------------------------------------------------------------- building


def normalize_domain(domain: str) -> str:
    return domain.strip().lower().rstrip(".")


def _result(value: str, allowed: tuple[str, ...]) -> str:
    value = value.strip().lower()
    value = _RESULT_ALIASES.get(value, value)
    return value if value in allowed else "permerror"


def _under(child: str, parent: str) -> bool:
    return bool(child) and (child == parent or child.endswith("." + parent))


def _dkim_rank(signature: tuple[str, str, str], header_from: str) -> int:
    """RFC 9990's order of preference for DKIM signatures: passing strictly aligned, passing
    relaxed-aligned (the same Organizational Domain: siblings such as mail.example.com and
    news.example.com too), other passing, the rest. The Organizational Domain is taken from
    the Public Suffix List here: ordering needs no DNS, and the two methods agree on it for
    all but private registries."""
    domain, _, result = signature
    if result != "pass":
        return 3
    if domain == header_from:
        return 0
    if _under(domain, header_from) or _under(header_from, domain) or \
            legacy_organizational_domain(domain) == legacy_organizational_domain(header_from):
        return 1
    return 2


def _is_domain(name: str) -> bool:
    """RFC 9990 reports domains: not an address literal, nor an address written as a name
    (a HELO of `198.51.100.150`)."""
    return bool(name) and not name.startswith("[") and not is_address_like(name) and \
        ":" not in name


# A row key: source_ip, header_from, envelope_from, envelope_to, disposition, dkim, spf,
# reasons, dkim results, spf result (or None).
_Row = tuple[str, str, str, str, str, str, str, tuple[tuple[str, str], ...],
             tuple[tuple[str, str, str], ...], tuple[str, str] | None]


def _row(ev: Evaluation) -> _Row:
    header_from = normalize_domain(ev.header_from)
    envelope_from = normalize_domain(ev.envelope_from)
    policy_domain = normalize_domain(ev.policy_domain)
    dkim_eval = "pass" if ev.dkim_aligned.strip().lower() == "pass" else "fail"
    spf_eval = "pass" if ev.spf_aligned.strip().lower() == "pass" else "fail"
    disposition = ev.disposition.strip().lower()
    if disposition not in _POLICIES:
        disposition = "none"
    # the policy the record asked of this message (p, sp or np, as the evaluation found)
    applied = {"p": ev.p, "sp": ev.sp, "np": ev.np}.get(ev.policy_tag) or (
        ev.p if header_from == policy_domain else (ev.sp or ev.p))
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
    if ev.testing and disposition not in ("pass", applied.strip().lower()) and \
            not any(kind == "policy_test_mode" for kind, _ in reasons):
        # RFC 9990: a disposition that differs from the published policy carries its reason
        reasons.append(("policy_test_mode", "t=y"))
    signatures = [(normalize_domain(domain), selector, _result(result, _DKIM_RESULTS))
                  for domain, selector, result in ev.dkim]
    signatures.sort(key=lambda sig: (_dkim_rank(sig, header_from), sig))
    spf: tuple[str, str] | None = None
    for wanted in ("mfrom", "helo"):
        if wanted == "helo" and envelope_from:
            break
        match = [(normalize_domain(domain), _result(result, _SPF_RESULTS))
                 for domain, scope, result in ev.spf if scope.strip().lower() == wanted
                 and _is_domain(normalize_domain(domain))]
        if match:
            spf = match[0]
            break
    return (ev.source_ip.strip(), header_from, envelope_from, normalize_domain(ev.envelope_to),
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
    _sub(published, "domain", normalize_domain(policy.policy_domain))
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


_PRIVATE_USE = tuple(ipaddress.ip_network(net) for net in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "127.0.0.0/8",
    "169.254.0.0/16", "0.0.0.0/8", "::1/128", "::/128", "fc00::/7", "fe80::/10"))


def is_internal(source: str, networks: Sequence[IPNetwork]) -> bool:
    """A private-use address, or one in our own host groups' networks."""
    try:
        ip = ipaddress.ip_address(source.strip())
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in (*_PRIVATE_USE, *networks))


def build_reports(store: Store, *, period_start: float, period_end: float,
                  settings: ReportSettings) -> list[Report]:
    """The aggregate reports of [period_start, period_end): one per policy domain (more when
    one would exceed `settings.max_size`), sorted by policy domain."""
    if period_end <= period_start:
        raise ValueError("the period ends before it starts")
    begin, end = math.floor(period_start), math.ceil(period_end) - 1
    internal = [ipaddress.ip_network(net, strict=False) for net in settings.internal_networks]
    reports: list[Report] = []
    for domain in store.policy_domains(period_start, period_end):
        counts: dict[_Row, int] = {}
        latest: Evaluation | None = None
        for ev in store.iter_evaluations(period_start, period_end, domain):
            if not settings.include_internal_sources and is_internal(ev.source_ip, internal):
                continue
            key = _row(ev)
            counts[key] = counts.get(key, 0) + 1
            if latest is None or ev.time >= latest.time:
                latest = ev
        if latest is None:
            continue
        rows = sorted(counts.items())
        chunks = _split(settings, latest, rows, begin, end)
        for index, chunk in enumerate(chunks, start=1):
            report_id = _report_id(store, normalize_domain(domain), begin, end, index, len(chunks))
            xml = _render(settings, report_id, begin, end, latest, chunk)
            reports.append(Report(
                report_id=report_id, policy_domain=normalize_domain(domain), begin=begin, end=end,
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


