"""`mailwarden dmarc ingest` on a corpus written here, as large receivers send reports and as
attackers would: RFC 9990 reports (our own, round trip) and RFC 7489 Appendix C ones, bare,
gzip, zip and as mail attachments; and broken ones: truncated gzip, a zip bomb, entity
expansion, a DTD, a wrong namespace, a duplicate. Good reports are stored once, bad ones are
refused with their reason."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import time
import zipfile
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path
from typing import Any

import pytest
from test_dmarc_reports import DAY, SETTINGS, fill

from mailwarden.devtools.devdns import DevDNSServer
from mailwarden.dmarc.received import MAX_XML, Refused, parse_report, reports_in
from mailwarden.dmarc.received_store import received_count
from mailwarden.dmarc.report import build_reports
from mailwarden.dmarc.store import Store

RFC7489 = b"""<?xml version="1.0" encoding="UTF-8" ?>
<feedback>
  <report_metadata>
    <org_name>acme.com</org_name>
    <email>noreply-dmarc-support@acme.com</email>
    <extra_contact_info>http://acme.com/dmarc/support</extra_contact_info>
    <report_id>9391651994964116463</report_id>
    <date_range><begin>1335571200</begin><end>1335657599</end></date_range>
  </report_metadata>
  <policy_published>
    <domain>example.com</domain><adkim>r</adkim><aspf>r</aspf>
    <p>none</p><sp>none</sp><pct>100</pct>
  </policy_published>
  <record>
    <row>
      <source_ip>72.150.241.94</source_ip><count>2</count>
      <policy_evaluated><disposition>none</disposition><dkim>fail</dkim><spf>pass</spf>
      </policy_evaluated>
    </row>
    <identifiers><header_from>example.com</header_from></identifiers>
    <auth_results>
      <dkim><domain>example.com</domain><result>fail</result>
        <human_result></human_result></dkim>
      <spf><domain>example.com</domain><result>pass</result></spf>
    </auth_results>
  </record>
</feedback>
"""
LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
          b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>'
          b"<feedback>&lol2;</feedback>")


def zipped(name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return out.getvalue()


def mail(attachment: bytes, filename: str, kind: str) -> bytes:
    message = MIMEMultipart()
    message["From"] = "noreply-dmarc-support@acme.com"
    message["To"] = "dmarc@example.com"
    message["Subject"] = "Report Domain: example.com Submitter: acme.com"
    message.attach(MIMEText("This is an aggregate report.", "plain"))
    part = MIMEApplication(attachment, kind)
    part.add_header("Content-Disposition", "attachment", filename=filename)
    message.attach(part)
    return message.as_bytes()


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """Reports mailwarden itself builds (RFC 9990 namespace), for the round trip."""
    store = Store.open(str(tmp_path_factory.mktemp("ours") / "ours.db"))
    fill(store)
    reports = build_reports(store, period_start=DAY, period_end=DAY + 86400, settings=SETTINGS)
    store.close()
    return [r.xml for r in reports]


def corpus(where: Path, ours: list[bytes]) -> dict[str, bytes]:
    files = {
        "ours-1.xml": ours[0],
        "ours-2.xml.gz": gzip.compress(ours[1]),
        "acme.xml": RFC7489,
        "acme-again.zip": zipped("acme.xml", RFC7489),  # the same report: a duplicate
        "acme-mail.eml": mail(gzip.compress(RFC7489.replace(b"9391651994964116463", b"77")),
                              "acme.com!example.com!1335571200!1335657599.xml.gz",
                              "gzip"),
        "broken-truncated.xml.gz": gzip.compress(RFC7489)[:60],
        "broken-bomb.zip": zipped("bomb.xml", b"<feedback>" + b" " * (MAX_XML + 10)),
        "broken-laughs.xml": LAUGHS,
        "broken-namespace.xml": RFC7489.replace(b"<feedback>",
                                                b'<feedback xmlns="urn:example:other">'),
        "broken-not-a-report.eml": b"From: a@b\r\nSubject: hi\r\n\r\nJust text.\r\n",
    }
    for name, data in files.items():
        (where / name).write_bytes(data)
    return files


def test_the_bomb_is_refused_at_the_limit() -> None:
    bomb = zipped("bomb.xml", b" " * (MAX_XML + 10))
    assert len(bomb) < 200_000
    found = reports_in(bomb)
    assert isinstance(found, Refused) and "more than" in found.reason


def test_ingest_stores_good_reports_once_and_refuses_bad_ones(tmp_path: Path,
                                                               ours: list[bytes]) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    corpus(inbox, ours)
    store = tmp_path / "store.db"
    done = subprocess.run([sys.executable, "-m", "mailwarden", "dmarc", "ingest", "--store",
                           str(store), "--json", str(inbox)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 1, done.stderr  # some inputs were refused
    outcomes = {Path(o["input"]).name: o for o in json.loads(done.stdout)["reports"]}
    statuses = {name: o["status"] for name, o in outcomes.items()}
    # the same report as a bare file and zipped: stored once, whichever is read first
    assert {statuses.pop("acme.xml"), statuses.pop("acme-again.zip")} == {"stored", "duplicate"}
    assert statuses == {
        "ours-1.xml": "stored", "ours-2.xml.gz": "stored", "acme-mail.eml": "stored",
        "broken-truncated.xml.gz": "refused", "broken-bomb.zip": "refused",
        "broken-laughs.xml": "refused", "broken-namespace.xml": "refused",
        "broken-not-a-report.eml": "refused"}
    reasons = {name: o.get("reason", "") for name, o in outcomes.items()}
    assert "broken gzip data" in reasons["broken-truncated.xml.gz"]
    assert "more than" in reasons["broken-bomb.zip"]
    assert "DTD or entities" in reasons["broken-laughs.xml"]
    assert "urn:example:other" in reasons["broken-namespace.xml"]
    assert "no report in the message" in reasons["broken-not-a-report.eml"]
    opened = Store.open(str(store))
    assert received_count(opened)[0] == 4
    opened.close()


def test_our_own_reports_read_back_field_for_field(ours: list[bytes]) -> None:
    """Round trip: what we send parses into what we wrote."""
    import xml.etree.ElementTree as ET

    for xml in ours:
        report = parse_report(xml)
        assert not isinstance(report, Refused), report
        root = ET.fromstring(xml)
        ns = "{urn:ietf:params:xml:ns:dmarc-2.0}"
        assert report.report_id == root.findtext(f"{ns}report_metadata/{ns}report_id")
        assert report.org_name == SETTINGS.org_name and report.version == "rfc9990"
        rows = root.findall(f"{ns}record")
        assert len(report.records) == len(rows)
        for record, row in zip(report.records, rows, strict=True):
            assert record.source_ip == row.findtext(f"{ns}row/{ns}source_ip")
            assert str(record.count) == row.findtext(f"{ns}row/{ns}count")
            assert record.header_from == row.findtext(f"{ns}identifiers/{ns}header_from")
            assert len(record.dkim) == len(row.findall(f"{ns}auth_results/{ns}dkim"))


def test_a_maildir_and_standard_input(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    (maildir / "new" / "1.eml").write_bytes(mail(zipped("r.xml", RFC7489), "r.zip", "zip"))
    (maildir / "tmp" / "partial.eml").write_bytes(b"being delivered")  # not read
    store = tmp_path / "store.db"
    done = subprocess.run([sys.executable, "-m", "mailwarden", "dmarc", "ingest", "--store",
                           str(store), "--maildir", str(maildir)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("stored 9391651994964116463 from acme.com for example.com "
                                  "(1 records)")
    again = subprocess.run([sys.executable, "-m", "mailwarden", "dmarc", "ingest", "--store",
                            str(store), "-"], input=RFC7489, capture_output=True,
                           timeout=60, check=False)
    assert again.returncode == 0 and again.stdout.startswith(b"duplicate 9391651994964116463")


def report_xml(org: str, report_id: str, policy: str, rows: list[tuple[str, int, str, str]],
               domain: str = "example.com") -> bytes:
    """An RFC 9990 report: rows of (source IP, count, dkim alignment, spf alignment)."""
    records = "".join(
        f"<record><row><source_ip>{ip}</source_ip><count>{count}</count><policy_evaluated>"
        f"<disposition>none</disposition><dkim>{dkim}</dkim><spf>{spf}</spf>"
        f"</policy_evaluated></row><identifiers><header_from>{domain}</header_from>"
        f"</identifiers><auth_results><dkim><domain>{domain}</domain><selector>s</selector>"
        f"<result>{dkim}</result></dkim><spf><domain>{domain}</domain><scope>mfrom</scope>"
        f"<result>{spf}</result></spf></auth_results></record>"
        for ip, count, dkim, spf in rows)
    now = int(time.time())
    return (f'<?xml version="1.0"?><feedback xmlns="urn:ietf:params:xml:ns:dmarc-2.0">'
            f"<version>1.0</version><report_metadata><org_name>{org}</org_name>"
            f"<email>dmarc@{org}</email><report_id>{report_id}</report_id><date_range>"
            f"<begin>{now - 86400}</begin><end>{now - 60}</end></date_range>"
            f"</report_metadata><policy_published><domain>{domain}</domain><p>{policy}</p>"
            f"</policy_published>{records}</feedback>").encode()


def sources(store: Path, dns_port: int, *extra: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "mailwarden", "dmarc", "sources", "--store",
                           str(store), "--json", "--nameserver", f"127.0.0.1:{dns_port}",
                           *extra], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def test_sources_say_who_fails_and_whether_reject_is_safe(tmp_path: Path,
                                                          dns_server: DevDNSServer) -> None:
    dns_server.load({"10.2.0.192.in-addr.arpa": [{"PTR": "mail.example.com"}]})
    store = tmp_path / "store.db"
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    # our own server (DKIM), a newsletter service without our DKIM, a spoofer
    (inbox / "google.xml").write_bytes(report_xml("google.com", "g1", "quarantine", [
        ("192.0.2.10", 120, "pass", "pass"), ("198.51.100.5", 40, "fail", "pass"),
        ("203.0.113.66", 9, "fail", "fail")]))
    (inbox / "microsoft.xml").write_bytes(report_xml("microsoft.com", "m1", "quarantine", [
        ("192.0.2.10", 30, "pass", "pass"), ("203.0.113.66", 3, "fail", "fail")]))
    subprocess.run([sys.executable, "-m", "mailwarden", "dmarc", "ingest", "--store",
                    str(store), str(inbox)], check=True, capture_output=True, timeout=60)
    (domain,) = sources(store, dns_server.port)["domains"]
    verdicts = {s["ip"]: (s["messages"], s["verdict"], s["name"]) for s in domain["sources"]}
    assert verdicts == {"192.0.2.10": (150, "aligned", "mail.example.com"),
                        "198.51.100.5": (40, "needs DKIM", ""),
                        "203.0.113.66": (12, "unknown sender", "")}
    assert domain["policy"] == "quarantine"
    assert domain["advice"] == ("example.com: not yet safe for p=reject: 198.51.100.5 "
                                "(needs DKIM) still fail")
    # one report of the newsletter signing with our key is not enough: the window still holds
    (inbox / "google2.xml").write_bytes(report_xml("google.com", "g2", "quarantine", [
        ("198.51.100.5", 10, "pass", "pass")]))
    subprocess.run([sys.executable, "-m", "mailwarden", "dmarc", "ingest", "--store",
                    str(store), str(inbox / "google2.xml")], check=True, capture_output=True,
                   timeout=60)
    (domain,) = sources(store, dns_server.port)["domains"]
    needs = {s["ip"]: s["verdict"] for s in domain["sources"]}["198.51.100.5"]
    assert needs == "needs DKIM"  # 40 of its 50 messages passed by SPF only
