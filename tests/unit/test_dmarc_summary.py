"""`mailwarden dmarc summary` on a real SQLite store: per-source counts and rates, ordering,
the window, the p=reject verdict, JSON, and the command's errors (which create nothing)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
import yaml

from mailwarden.cli import main
from mailwarden.dmarc.store import Evaluation, Store, StoreError
from mailwarden.dmarc.summary import SourceSummary, format_text, summarize, to_json

NOW = 1_800_000_000.0
DAY = 86400.0


def ev(t: float, ip: str, *, dkim: str = "pass", spf: str = "pass",
       disposition: str = "none", domain: str = "example.com", header_from: str = "",
       p: str = "none") -> Evaluation:
    return Evaluation(
        time=t, source_ip=ip, header_from=header_from or domain, envelope_from=domain,
        envelope_to="rcpt.example.net", policy_domain=domain, p=p, sp="", np="", adkim="r",
        aspf="r", testing=False, psd="", disposition=disposition, dkim_aligned=dkim,
        spf_aligned=spf, dkim=((domain, "s1", dkim),), spf=((domain, "mfrom", spf),))


def fill(store: Store, now: float) -> None:
    """example.com: 10 messages from 3 sources, 2 of which fail sometimes; example.org: 4
    messages, all passing; one old example.net evaluation outside a 7-day window."""
    recent = now - DAY
    for _ in range(4):  # the ESP: DKIM only
        store.record(ev(recent, "192.0.2.1", spf="fail", p="quarantine"))
    for _ in range(2):
        store.record(ev(recent, "192.0.2.1", dkim="fail", spf="fail",
                        disposition="quarantine", p="quarantine"))
    store.record(ev(recent, "198.51.100.9", dkim="fail", spf="fail", disposition="reject",
                    p="quarantine"))
    store.record(ev(recent, "198.51.100.9", dkim="fail", p="quarantine"))
    store.record(ev(recent - 60, "203.0.113.5", header_from="news.example.com", p="none"))
    # the latest evaluation of example.com publishes p=quarantine
    store.record(ev(recent + 60, "203.0.113.5", header_from="news.example.com", p="quarantine"))
    for _ in range(4):
        store.record(ev(recent, "2001:db8::25", domain="example.org", p="reject",
                        spf="fail"))
    store.record(ev(now - 10 * DAY, "192.0.2.200", domain="example.net", dkim="fail",
                    spf="fail", disposition="reject", p="reject"))


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "dmarc.db"
    with Store.open(str(path)) as store:
        fill(store, time.time())
    return path


def test_counts_rates_and_ordering(tmp_path: Path) -> None:
    with Store.open(str(tmp_path / "dmarc.db")) as store:
        fill(store, NOW)
        domains = summarize(store, 7, now=NOW)
    assert [d.policy_domain for d in domains] == ["example.com", "example.org"]
    com, org = domains
    assert com.p == "quarantine" and org.p == "reject"
    assert (com.messages, com.dmarc_pass) == (10, 7)
    assert com.sources == (
        SourceSummary("example.com", "example.com", "192.0.2.1", 6, 4, 4, 0, 4, 2, 0,
                      "quarantine"),
        SourceSummary("example.com", "example.com", "198.51.100.9", 2, 1, 0, 1, 1, 0, 1,
                      "quarantine"),
        SourceSummary("example.com", "news.example.com", "203.0.113.5", 2, 2, 2, 2, 2, 0, 0,
                      "quarantine"),
    )
    esp = com.sources[0]
    assert esp.pass_rate == pytest.approx(4 / 6) and esp.dmarc_fail == 2
    assert esp.dkim_rate == pytest.approx(4 / 6) and esp.spf_rate == 0.0
    assert com.sources[1].spf_rate == 0.5 and com.sources[1].dkim_rate == 0.0
    assert not com.ready and len(com.failing) == 2
    assert com.verdict() == ("2 of 3 sources fail DMARC (3 messages): "
                             "check them before p=reject")
    assert org.ready and org.messages == 4 and org.sources[0].dkim_pass == 4
    assert org.verdict() == "ready for p=reject: every source passes DMARC"


def test_window_and_domain_filter(tmp_path: Path) -> None:
    with Store.open(str(tmp_path / "dmarc.db")) as store:
        fill(store, NOW)
        month = summarize(store, 30, now=NOW)
        assert [(d.policy_domain, d.messages) for d in month] == [
            ("example.com", 10), ("example.org", 4), ("example.net", 1)]
        assert month[2].sources[0].reject == 1 and not month[2].ready
        assert summarize(store, 0.5, now=NOW) == []
        only = summarize(store, 7, now=NOW, policy_domain="Example.ORG.")
        assert [d.policy_domain for d in only] == ["example.org"]
        assert format_text([], 3) == "no evaluations in the last 3 days"


def test_text_and_json_formats(tmp_path: Path) -> None:
    with Store.open(str(tmp_path / "dmarc.db")) as store:
        fill(store, NOW)
        domains = summarize(store, 7, now=NOW)
    text = format_text(domains, 7).splitlines()
    assert text[0] == "DMARC evaluations of the last 7 days"
    assert text[2] == ("example.com (p=quarantine): 10 messages, 70.0% pass DMARC; 2 of 3 "
                       "sources fail DMARC (3 messages): check them before p=reject")
    assert text[4].split() == ["192.0.2.1", "example.com", "6", "66.7%", "66.7%", "0.0%",
                               "4/2/0"]
    assert text[8].startswith("example.org (p=reject): 4 messages, 100.0% pass DMARC; ready")
    data = json.loads(json.dumps(to_json(domains, 7)))
    assert data["messages"] == 14
    assert data["domains"][0]["failing_sources"] == 2
    assert data["domains"][1]["ready_for_reject"] is True
    assert data["domains"][0]["sources"][1] == {
        "header_from": "example.com", "source_ip": "198.51.100.9", "messages": 2,
        "dmarc_pass": 1, "dmarc_fail": 1, "pass_rate": 0.5, "dkim_pass": 0, "dkim_rate": 0.0,
        "spf_pass": 1, "spf_rate": 0.5,
        "dispositions": {"none": 1, "quarantine": 0, "reject": 1},
    }


def write_config(tmp_path: Path, store: str | None) -> Path:
    config: dict[str, object] = {"authserv_id": "mx.example.net"}
    if store is not None:
        config["dmarc"] = {"store": store}
    path = tmp_path / "mailwarden.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_reads_the_configured_store(store_path: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, str(store_path))
    assert main(["dmarc", "summary", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "example.com (p=quarantine): 10 messages, 70.0% pass DMARC; 2 of 3" in out
    assert "example.net" not in out
    assert main(["dmarc", "summary", "--config", str(config), "--days", "30", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(d["policy_domain"], d["messages"]) for d in data["domains"]] == [
        ("example.com", 10), ("example.org", 4), ("example.net", 1)]
    assert data["days"] == 30


def test_cli_store_option_domain_and_empty_window(store_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite://{store_path}"
    assert main(["dmarc", "summary", "--store", url, "--domain", "example.org",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["policy_domain"] for d in data["domains"]] == ["example.org"]
    assert data["domains"][0]["sources"][0]["spf_rate"] == 0.0
    assert main(["dmarc", "summary", "--store", url, "--days", "0.5"]) == 0
    assert capsys.readouterr().out == "no evaluations in the last 0.5 days\n"


def test_cli_errors_create_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "var" / "dmarc.db"
    assert main(["dmarc", "summary", "--store", str(missing)]) == 1
    assert "no DMARC store at" in capsys.readouterr().err
    assert main(["dmarc", "summary", "--config",
                 str(write_config(tmp_path, str(missing)))]) == 1
    assert str(missing) in capsys.readouterr().err
    assert not missing.parent.exists()

    assert main(["dmarc", "summary", "--config", str(write_config(tmp_path, None))]) == 2
    assert "no dmarc.store configured" in capsys.readouterr().err

    other = tmp_path / "other.db"  # an SQLite file, but not a store: left alone
    sqlite3.connect(other).close()
    assert main(["dmarc", "summary", "--store", str(other)]) == 1
    assert "not a mailwarden DMARC store" in capsys.readouterr().err
    conn = sqlite3.connect(other)
    try:
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)
    finally:
        conn.close()
    with pytest.raises(SystemExit):
        main(["dmarc", "summary", "--store", str(other), "--days", "0"])


def test_open_existing_reads_a_store_without_writing(store_path: Path) -> None:
    before = store_path.stat().st_mtime_ns, store_path.stat().st_size
    with Store.open_existing(str(store_path)) as store:
        assert store.count() == 15
    assert (store_path.stat().st_mtime_ns, store_path.stat().st_size) == before
    with pytest.raises(StoreError):
        Store.open_existing(str(store_path.parent / "absent.db"))
