"""opendkim.conf-style settings: a name, then its value after spaces or tabs."""

from __future__ import annotations

from pathlib import Path

from mailwarden.migrate.conffile import name_value, read_settings


def test_name_and_value_split_at_the_first_run_of_whitespace() -> None:
    assert name_value("Domain example.com") == ("Domain", "example.com")
    assert name_value("Domain\t \texample.com") == ("Domain", "example.com")
    # a tab-separated setting whose value holds a space: the name is the first word
    assert name_value("ReportAddress\t\"DMARC Reports\" <r@example.com>") == (
        "ReportAddress", '"DMARC Reports" <r@example.com>')
    assert name_value("Syslog") == ("Syslog", "")


def test_read_settings_keeps_the_line_of_each(tmp_path: Path) -> None:
    conf = tmp_path / "opendkim.conf"
    conf.write_text("# comment\nMode\tsv\nReportAddress\tPostmaster <p@example.com> # x\n")
    settings = read_settings(str(conf))
    assert settings.values == {"mode": ("sv", 2),
                               "reportaddress": ("Postmaster <p@example.com>", 3)}
