"""Aggregate reports other receivers send about our domains (RFC 9990, and RFC 7489 Appendix
C's older format): found in a message or a file, unpacked within limits, parsed without DTDs
or entities, and read into typed records. Every refusal is a value with its reason.

Limits (checked before anything is unpacked or parsed): an input of at most 20 MiB; a
decompressed report of at most 50 MiB, read in bounded steps, so a gzip or zip bomb stops at
the limit; a zip archive holds at most 4 entries and one report."""

from __future__ import annotations

import email
import email.policy
import gzip
import io
import zipfile
import zlib
from dataclasses import dataclass, field
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

MAX_INPUT = 20 * 1024 * 1024
MAX_XML = 50 * 1024 * 1024
MAX_ZIP_ENTRIES = 4
NAMESPACES = ("urn:ietf:params:xml:ns:dmarc-2.0", "")  # RFC 9990; RFC 7489 had none
_REPORT_TYPES = ("application/gzip", "application/x-gzip", "application/zip",
                 "application/x-zip-compressed", "application/x-zip", "text/xml",
                 "application/xml", "application/octet-stream")


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str


@dataclass(frozen=True, slots=True)
class ReceivedRecord:
    source_ip: str
    count: int
    disposition: str
    dkim_eval: str  # pass | fail, as the reporter evaluated alignment
    spf_eval: str
    header_from: str
    envelope_from: str = ""
    dkim: tuple[tuple[str, str, str], ...] = ()  # (domain, selector, result)
    spf: tuple[tuple[str, str, str], ...] = ()  # (domain, scope, result)
    reasons: tuple[tuple[str, str], ...] = ()  # (type, comment)


@dataclass(frozen=True, slots=True)
class ReceivedReport:
    org_name: str
    email: str
    report_id: str
    begin: int
    end: int
    domain: str
    policy: dict[str, str] = field(default_factory=dict)  # p, sp, np, adkim, aspf, pct, t
    records: tuple[ReceivedRecord, ...] = ()
    version: str = "rfc9990"  # or "rfc7489"


def reports_in(data: bytes) -> list[bytes] | Refused:
    """The report documents (XML) in `data`: a bare .xml, .xml.gz or .zip file, or a message
    with the report attached or as its body."""
    if len(data) > MAX_INPUT:
        return Refused(f"{len(data)} bytes: more than {MAX_INPUT} (refused before unpacking)")
    if _kind(data):
        unpacked = _unpack(data, "")
        return unpacked if isinstance(unpacked, Refused) else [unpacked]
    message = email.message_from_bytes(data, policy=email.policy.compat32)
    found: list[bytes] = []
    for part in message.walk():
        if part.is_multipart():
            continue
        name = (part.get_filename() or "").lower()
        kind = part.get_content_type()
        if kind not in _REPORT_TYPES and not name.endswith((".xml", ".gz", ".zip")):
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes) or not payload:
            continue
        unpacked = _unpack(payload, name)
        if isinstance(unpacked, Refused):
            return Refused(f"attachment {name or kind}: {unpacked.reason}")
        found.append(unpacked)
    return found or Refused("no report in the message (no XML, gzip or zip part)")


def read_reports(data: bytes) -> tuple[list[ReceivedReport], list[Refused]]:
    """The reports in `data` (a file or a message), and why each unusable part was
    refused."""
    documents = reports_in(data)
    if isinstance(documents, Refused):
        return [], [documents]
    parsed = [parse_report(xml) for xml in documents]
    return ([p for p in parsed if not isinstance(p, Refused)],
            [p for p in parsed if isinstance(p, Refused)])


def _kind(data: bytes) -> str:
    """"gzip", "zip" or "xml" by the data's first bytes, or "" for none of them."""
    if data[:2] == b"\x1f\x8b":
        return "gzip"
    if data[:4] == b"PK\x03\x04":
        return "zip"
    return "xml" if data.lstrip()[:1] == b"<" else ""


def _unpack(data: bytes, name: str) -> bytes | Refused:
    kind = _kind(data)
    if kind == "gzip":
        return _gunzip(data)
    if kind == "zip":
        return _unzip(data)
    if kind == "xml":
        return data
    return Refused(f"{name or 'the data'} is neither XML, gzip nor zip")


def _gunzip(data: bytes) -> bytes | Refused:
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
            out = stream.read(MAX_XML + 1)
    except (OSError, EOFError, zlib.error) as exc:
        return Refused(f"broken gzip data: {exc}")
    if len(out) > MAX_XML:
        return Refused(f"gzip data unpacks to more than {MAX_XML} bytes (refused)")
    return out


def _unzip(data: bytes) -> bytes | Refused:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = [e for e in archive.infolist() if not e.is_dir()]
            if not entries or len(entries) > MAX_ZIP_ENTRIES:
                return Refused(f"a zip archive with {len(entries)} files; a report has one")
            entry = entries[0]
            if entry.file_size > MAX_XML:
                return Refused(f"zip entry {entry.filename!r} declares {entry.file_size} "
                               f"bytes: more than {MAX_XML}")
            with archive.open(entry) as stream:
                out = stream.read(MAX_XML + 1)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, RuntimeError) as exc:
        return Refused(f"broken zip data: {exc}")
    if len(out) > MAX_XML:
        return Refused(f"zip data unpacks to more than {MAX_XML} bytes (refused)")
    return out


def _text(parent: Element, path: str, ns: str) -> str:
    node = parent.find("/".join(ns + part for part in path.split("/")))
    return (node.text or "").strip() if node is not None else ""


def parse_report(xml: bytes) -> ReceivedReport | Refused:
    """An aggregate report document, or why it is not one."""
    try:
        root = SafeET.fromstring(xml, forbid_dtd=True, forbid_entities=True,
                                 forbid_external=True)
    except DefusedXmlException as exc:
        return Refused(f"XML with a DTD or entities is refused: {type(exc).__name__}")
    except SafeET.ParseError as exc:
        return Refused(f"not well-formed XML: {exc}")
    namespace = root.tag[1:].partition("}")[0] if root.tag.startswith("{") else ""
    local = root.tag.rpartition("}")[2]
    if local != "feedback" or namespace not in NAMESPACES:
        return Refused(f"not a DMARC aggregate report: root <{local}> in namespace "
                       f"{namespace or '(none)'}")
    ns = f"{{{namespace}}}" if namespace else ""
    meta = root.find(ns + "report_metadata")
    published = root.find(ns + "policy_published")
    if meta is None or published is None:
        return Refused("no <report_metadata> or <policy_published>")
    org, mail = _text(meta, "org_name", ns), _text(meta, "email", ns)
    report_id = _text(meta, "report_id", ns)
    domain = _text(published, "domain", ns).lower().rstrip(".")
    if not (org and report_id and domain):
        return Refused("org_name, report_id and the policy domain are required")
    try:
        begin = int(_text(meta, "date_range/begin", ns))
        end = int(_text(meta, "date_range/end", ns))
    except ValueError:
        return Refused("<date_range> begin and end must be integers (Unix time)")
    policy = {tag: value for tag in ("p", "sp", "np", "adkim", "aspf", "pct", "testing")
              if (value := _text(published, tag, ns))}
    records = []
    for record in root.findall(ns + "record"):
        parsed = _record(record, ns)
        if isinstance(parsed, Refused):
            return parsed
        records.append(parsed)
    return ReceivedReport(org, mail, report_id, begin, end, domain, policy, tuple(records),
                          "rfc9990" if namespace else "rfc7489")


def _record(record: Element, ns: str) -> ReceivedRecord | Refused:
    row = record.find(ns + "row")
    if row is None:
        return Refused("a <record> without <row>")
    try:
        count = int(_text(row, "count", ns))
    except ValueError:
        return Refused("<count> must be an integer")
    dkim: list[tuple[str, str, str]] = []
    spf: list[tuple[str, str, str]] = []
    auth = record.find(ns + "auth_results")
    if auth is not None:
        for node in auth.findall(ns + "dkim"):
            dkim.append((_text(node, "domain", ns).lower(), _text(node, "selector", ns),
                         _text(node, "result", ns).lower()))
        for node in auth.findall(ns + "spf"):
            spf.append((_text(node, "domain", ns).lower(), _text(node, "scope", ns) or "mfrom",
                        _text(node, "result", ns).lower()))
    evaluated = row.find(ns + "policy_evaluated")
    reasons = tuple((_text(r, "type", ns), _text(r, "comment", ns))
                    for r in (evaluated.findall(ns + "reason") if evaluated is not None else ()))
    return ReceivedRecord(
        source_ip=_text(row, "source_ip", ns), count=count,
        disposition=_text(row, "policy_evaluated/disposition", ns) or "none",
        dkim_eval=_text(row, "policy_evaluated/dkim", ns) or "fail",
        spf_eval=_text(row, "policy_evaluated/spf", ns) or "fail",
        header_from=_text(record, "identifiers/header_from", ns).lower(),
        envelope_from=_text(record, "identifiers/envelope_from", ns).lower(),
        dkim=tuple(dkim), spf=tuple(spf), reasons=reasons)
