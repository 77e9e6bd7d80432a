"""The mail that carries an aggregate report (RFC 9990 §3): a short text part and the gzip
attachment, From the reporting address, Message-ID from the Report-ID (a re-sent report is
recognisably the same), DKIM-signed with the keys the signing table gives that address so
that it passes DMARC where it arrives."""

from __future__ import annotations

import datetime as dt
import email.policy
import re
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formatdate

from mailwarden.dmarc.report import Report, ReportSettings


def report_mail(report: Report, settings: ReportSettings, address: str) -> bytes:
    """The mail carrying `report` to `address`, DKIM-signed when `settings` has keys, ready
    for SMTP DATA (CRLF, dot-stuffed)."""
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
    return finish_mail(message.as_bytes(policy=email.policy.SMTP.clone(max_line_length=None)),
                       settings)


def finish_mail(data: bytes, settings: ReportSettings) -> bytes:
    """A report mail signed (when `settings` has keys) and ready for SMTP DATA (CRLF,
    dot-stuffed): aggregate and failure reports alike."""
    if settings.signing_keys:
        data = _signed(data, settings)
    data = re.sub(rb"(?m)^\.", b"..", data)  # SMTP dot-stuffing (RFC 5321 §4.5.2)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def _signed(data: bytes, settings: ReportSettings) -> bytes:
    """The report mail with a DKIM-Signature per key (RFC 6376), made before dot-stuffing:
    the signature covers the message, not its transport encoding."""
    from mailwarden.dkim.sign import SignOptions, sign_message

    options = settings.sign_options or SignOptions()
    fields = sign_message(data, list(settings.signing_keys), options)
    head = b"".join(f"{name}:{value}".replace("\n", "\r\n").encode() + b"\r\n"
                    for name, value in fields)
    return head + data
