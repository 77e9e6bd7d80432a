"""What receivers' parsers choke on in our aggregate reports (issue 17 #4), each checked in
the XML against the RFC 9990 schema: an IP-literal HELO name is no <spf><domain>, a t=y policy
applied less strictly says why (policy_test_mode), and the relaxed-aligned passing DKIM
signature comes first even when it is a sibling of the author domain."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from test_dmarc_reports import DAY, SETTINGS, evaluation, xmllint

from mailwarden.dmarc.report import build_reports
from mailwarden.dmarc.store import Store

NS = "{urn:ietf:params:xml:ns:dmarc-2.0}"


def one_report(tmp_path: Path, *evaluations: object) -> ET.Element:
    store = Store.open(str(tmp_path / "store.db"))
    for ev in evaluations:
        store.record(ev)  # type: ignore[arg-type]
    (report,) = build_reports(store, period_start=DAY, period_end=DAY + 86400,
                              settings=SETTINGS)
    store.close()
    xmllint(report.xml, tmp_path)
    return ET.fromstring(report.xml)


def test_a_bounce_with_an_ip_helo_reports_no_spf_domain(tmp_path: Path) -> None:
    root = one_report(tmp_path, evaluation(
        envelope_from="", dkim=(), dkim_aligned="fail", spf_aligned="fail",
        spf=(("198.51.100.150", "helo", "none"),)))
    assert root.findall(f".//{NS}auth_results/{NS}spf") == []
    assert "198.51.100.150" not in ET.tostring(root).decode()


def test_a_null_sender_with_a_real_helo_domain_still_reports_it(tmp_path: Path) -> None:
    root = one_report(tmp_path, evaluation(envelope_from="",
                                           spf=(("mx.example.com", "helo", "pass"),)))
    (domain,) = root.findall(f".//{NS}auth_results/{NS}spf/{NS}domain")
    assert domain.text == "mx.example.com"


def test_t_y_applied_less_strictly_gives_the_policy_test_mode_reason(tmp_path: Path) -> None:
    root = one_report(tmp_path, evaluation(
        testing=True, disposition="quarantine", dkim_aligned="fail", spf_aligned="fail",
        dkim=(("evil.example", "x", "fail"),), spf=(("evil.example", "mfrom", "fail"),)))
    (evaluated,) = root.findall(f".//{NS}policy_evaluated")
    assert evaluated.findtext(f"{NS}disposition") == "quarantine"
    assert [r.findtext(f"{NS}type") for r in evaluated.findall(f"{NS}reason")] == [
        "policy_test_mode"]


def test_the_sibling_aligned_signature_comes_first(tmp_path: Path) -> None:
    root = one_report(tmp_path, evaluation(
        header_from="mail.example.com", policy_domain="example.com",
        dkim=(("esp.example", "e1", "pass"), ("news.example.com", "n1", "pass"))))
    domains = [d.text for d in root.findall(f".//{NS}auth_results/{NS}dkim/{NS}domain")]
    assert domains == ["news.example.com", "esp.example"]
