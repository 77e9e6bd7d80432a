"""The failure-report queue in the store (dmarc/failures.py): the rate limit per destination,
reports given up after MAX_AGE and forgotten after KEEP, and one report that cannot be made
never blocks the others."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mailwarden.dmarc import afrf, failures
from mailwarden.dmarc.report import ReportSettings
from mailwarden.dmarc.store import Store

from fakedns import FakeDNS

NOW = 1_800_000_000.0
FAILURE = afrf.Failure(
    policy_domain="example.com", author_domain="example.com", source_ip="192.0.2.7",
    mail_from="x@evil.example", rcpts=("alice@ours.example",), arrival=NOW,
    headers=(("From", " a@example.com"),), authentication_results="mx; dmarc=fail",
    dmarc_failed=True, failed_aligned=(), aligned_passes=(), failed_dkim=None,
    dkim_failures=(), spf_failed=False, spf_domain="", spf_record="", delivery="reject")
SETTINGS = ReportSettings(org_name="Ours", email="d@ours.example", smarthost="127.0.0.1:9")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(str(tmp_path / "dmarc.db"))


def queue(store: Store, now: float, ruf: tuple[str, ...] = ("mailto:f@example.com",),
          domain: str = "example.com") -> list[tuple[str, str]]:
    return failures.queue_report(store, dataclasses.replace(FAILURE, author_domain=domain),
                                 kind="dmarc", ruf=ruf, rate_limit=2, redact=True, org_name="Ours",
                                 now=now)


def test_the_rate_limit_counts_per_destination_and_hour(store: Store) -> None:
    assert queue(store, NOW) == [("mailto:f@example.com", "queued")]
    assert queue(store, NOW + 1) == [("mailto:f@example.com", "queued")]
    assert queue(store, NOW + 2) == [("mailto:f@example.com", "rate-limited")]
    # another destination has its own budget; an hour later the first has one again
    assert queue(store, NOW + 3, ("mailto:g@example.com", "mailto:f@example.com")) == [
        ("mailto:g@example.com", "queued"), ("mailto:f@example.com", "rate-limited")]
    assert queue(store, NOW + 3601) == [("mailto:f@example.com", "queued")]
    assert queue(store, NOW, ("http://x.example/",)) == [
        ("http://x.example/", "unusable: unsupported URI scheme 'http'")]


def test_old_reports_are_given_up_then_forgotten(store: Store) -> None:
    queue(store, NOW)
    later = NOW + failures.MAX_AGE + 1
    outcomes = failures.send_failures(store, SETTINGS, FakeDNS(), now=later)
    assert [(o.status, o.destination) for o in outcomes] == [("expired",
                                                              "mailto:f@example.com")]
    assert failures.pending(store) == []
    assert store.read("SELECT state FROM failure_reports") == [("expired",)]
    failures.send_failures(store, SETTINGS, FakeDNS(), now=NOW + failures.KEEP + 1)
    assert store.read("SELECT count(*) FROM failure_reports") == [(0,)]


def test_a_report_that_cannot_be_made_does_not_block_the_next(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    queue(store, NOW, domain="broken.example.com")
    queue(store, NOW + 1)
    made = afrf.failure_mail

    def failure_mail(item: afrf.Content, *args: str) -> bytes:
        if item.author_domain == "broken.example.com":
            raise ValueError("cannot encode")
        return made(item, *args)

    monkeypatch.setattr(failures, "failure_mail", failure_mail)
    outcomes = failures.send_failures(store, SETTINGS, FakeDNS(), dry_run=True, now=NOW + 2)
    assert [o.status for o in outcomes] == ["failed", "would-send"], outcomes
    assert outcomes[0].detail == "could not be made: cannot encode"
