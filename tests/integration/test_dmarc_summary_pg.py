"""`mailwarden dmarc summary` on a real PostgreSQL store (the server of test_dmarc_postgres):
the same GROUP BY as on SQLite, the same numbers, and no schema created by reading."""

from __future__ import annotations

import importlib
import json
import time
from typing import Any

import pytest
from test_dmarc_postgres import Server, evaluation, pg

from mailwarden.cli import main
from mailwarden.dmarc.store import Store, StoreError
from mailwarden.dmarc.summary import SourceSummary, summarize

__all__ = ["pg"]  # the module-scoped server fixture

DAY = 86400.0


def test_summary_on_postgresql(pg: Server, capsys: pytest.CaptureFixture[str]) -> None:
    url = pg.new_database()
    now = time.time()
    with Store.open(url) as store:
        # example.com: 5 from the MTA (3 DKIM+SPF, 2 failing both, rejected), 3 SPF-only
        for _ in range(3):
            store.record(evaluation("a", now - DAY, source_ip="192.0.2.1", spf_aligned="pass",
                                    p="none"))
        for _ in range(2):
            store.record(evaluation("b", now - DAY, source_ip="192.0.2.1", dkim_aligned="fail",
                                    disposition="reject", p="none"))
        for _ in range(3):
            store.record(evaluation("c", now - 2 * DAY, source_ip="2001:db8::7",
                                    header_from="lists.example.com", dkim_aligned="fail",
                                    spf_aligned="pass", p="none"))
        store.record(evaluation("d", now - 3600, source_ip="192.0.2.1", p="reject"))
        # example.org: one passing source; one evaluation too old for a week
        for _ in range(2):
            store.record(evaluation("e", now - DAY, source_ip="198.51.100.3",
                                    header_from="example.org", policy_domain="example.org"))
        store.record(evaluation("f", now - 9 * DAY, source_ip="203.0.113.9",
                                header_from="example.org", policy_domain="example.org",
                                dkim_aligned="fail", disposition="quarantine"))

    with Store.open_existing(url) as store:
        assert store.dialect == "postgresql"
        week = summarize(store, 7)
        month = summarize(store, 30)
    assert [(d.policy_domain, d.p, d.messages, d.dmarc_pass) for d in week] == [
        ("example.com", "reject", 9, 7), ("example.org", "quarantine", 2, 2)]
    assert week[0].sources == (
        SourceSummary("example.com", "example.com", "192.0.2.1", 6, 4, 4, 3, 4, 0, 2, "reject"),
        SourceSummary("example.com", "lists.example.com", "2001:db8::7", 3, 3, 0, 3, 3, 0, 0,
                      "reject"),
    )
    assert week[0].verdict() == ("1 of 2 sources fails DMARC (2 messages): "
                                 "check them before p=reject")
    assert week[1].ready
    org = month[1]
    assert (org.messages, org.dmarc_pass, len(org.failing)) == (3, 2, 1)
    assert org.sources[1] == SourceSummary("example.org", "example.org", "203.0.113.9", 1, 0,
                                           0, 0, 0, 1, 0, "quarantine")

    assert main(["dmarc", "summary", "--store", url, "--json", "--domain", "example.com"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["messages"] == 9
    source = data["domains"][0]["sources"][0]
    assert (source["pass_rate"], source["dkim_rate"], source["spf_rate"]) == (
        round(4 / 6, 4), round(4 / 6, 4), 0.5)
    assert main(["dmarc", "summary", "--store", url]) == 0
    assert "example.com (p=reject): 9 messages, 77.8% pass DMARC" in capsys.readouterr().out


def test_reading_an_empty_database_creates_no_schema(pg: Server,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    url = pg.new_database()
    with pytest.raises(StoreError, match="not a mailwarden DMARC store"):
        Store.open_existing(url)
    assert main(["dmarc", "summary", "--store", url]) == 1
    assert "not a mailwarden DMARC store" in capsys.readouterr().err
    psycopg: Any = importlib.import_module("psycopg")
    with psycopg.connect(url) as conn:
        tables = conn.execute("SELECT count(*) FROM information_schema.tables "
                              "WHERE table_schema = 'public'").fetchone()
    assert tables == (0,)
