"""Fuzzing DMARC (RFC 9989): the policy record parser (`mailwarden.dmarc.record`) and the whole
`dmarc` check over a fake DNS serving fuzzed `_dmarc` records, with fuzzed From fields.

Any text gives a record whose every tag holds one of its allowed values, or a reason it is not
one, in linear time; the check always ends in one of its results with an
Authentication-Results clause that reads back."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from test_fuzz_corpus import HOSTILE, budget, corpus, examples, fuzzed
from test_fuzz_headers import check_ar

from mailwarden.checks import CHECKS, CheckOutcome, Context
from mailwarden.checks.dmarc import DmarcArgs
from mailwarden.config.build import parse as parse_config
from mailwarden.dmarc.record import POLICIES, DmarcRecord, NotARecord, is_dmarc, parse
from mailwarden.policy.engine import Engine
from mailwarden.transaction import CheckResult, Transaction

from fakedns import FakeDNS

SEEDS = corpus("dmarc_record")
DMARC_FRAGMENTS = [*HOSTILE, "v=DMARC1", "; ", ";", "p=", "sp=", "np=", "none", "reject",
                   "quarantine", "adkim=s", "aspf=r", "psd=y", "t=y", "fo=1:d", "pct=50",
                   "rua=", "ruf=", "mailto:", "dmarc@example.com", "!10m", ",", " \t"]
MAILTO = re.compile(r"mailto:[^@\s,;!]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z0-9-]{2,}(?:![0-9]+[kmgt]?)?",
                    re.IGNORECASE)


# -- the record parser -------------------------------------------------------------------
def check_record(text: str) -> DmarcRecord | NotARecord:
    started = time.process_time()
    parsed = parse(text)
    assert time.process_time() - started < 0.5, "the parse must stay linear"
    assert isinstance(parsed, DmarcRecord | NotARecord)
    if isinstance(parsed, NotARecord):
        assert parsed.reason
        return parsed
    assert is_dmarc(text) and parsed.text == text
    assert parsed.p in POLICIES and parsed.sp in POLICIES and parsed.np in POLICIES
    assert parsed.adkim in ("r", "s") and parsed.aspf in ("r", "s")
    assert parsed.psd in ("y", "n", "u")
    assert isinstance(parsed.testing, bool)
    assert re.fullmatch(r"[01ds](?::[01ds])*", parsed.fo), parsed.fo
    for uri in (*parsed.rua, *parsed.ruf):
        assert MAILTO.fullmatch(uri), uri
    if not parsed.p_explicit:
        assert parsed.rua and parsed.p == "none"  # §4.7: p= from a valid rua=
    # the warnings `mailwarden dmarc check` prints: one printable line each
    assert all(w and w.isprintable() for w in parsed.warnings), parsed.warnings
    return parsed


# The tag pattern before the fix: the same tags, found in quadratic time on long whitespace.
OLD_TAG = re.compile(r"\s*([A-Za-z][A-Za-z0-9_]*)\s*=\s*(.*?)\s*\Z", re.DOTALL)
NEW_TAG = re.compile(r"\s*([A-Za-z][A-Za-z0-9_]*)\s*=(.*)", re.DOTALL)


def check_same_tags(text: str) -> None:
    for part in text.split(";"):
        old, new = OLD_TAG.match(part), NEW_TAG.match(part)
        assert (old is None) == (new is None)
        if old is not None and new is not None:
            assert (old.group(1), old.group(2)) == (new.group(1), new.group(2).strip())


@pytest.mark.parametrize("text", examples("dmarc_record"))
def test_record_corpus(text: str) -> None:
    check_record(text)
    if len(text) < 1000:
        check_same_tags(text)


@budget(500)
@given(fuzzed(SEEDS, DMARC_FRAGMENTS))
@example("v=DMARC1; p=a" + " " * 30000 + "x")
def test_record_fuzzed(text: str) -> None:
    check_record(text)
    if len(text) < 1000:
        check_same_tags(text)


def test_long_whitespace_in_a_tag_is_linear() -> None:
    # regression: `(.*?)\s*\Z` made 60000 spaces cost ~40 s of CPU
    for text in ("v=DMARC1; p=a" + " " * 200_000 + "x",
                 "v=DMARC1; p=none; rua=mailto:a@example.com" + "\t" * 200_000 + "!"):
        started = time.process_time()
        assert isinstance(parse(text), NotARecord | DmarcRecord)
        assert time.process_time() - started < 1


# -- the whole dmarc check -------------------------------------------------------------------
AUTHSERV = "mx.example.com"
CONFIG = parse_config(f"authserv_id: {AUTHSERV}\nrules:\n  eom:\n"
                      "    - name: dmarc\n      check: dmarc\n")
DMARC_RESULTS = ("pass", "fail", "none", "temperror", "permerror")
records = fuzzed(SEEDS, DMARC_FRAGMENTS)
from_values = st.one_of(
    fuzzed(corpus("from_header")),
    fuzzed([" a@fuzz.example", " A <a@sub.fuzz.example>", " a@nx.fuzz.example",
            " a@temp.fuzz.example"]),
)


def zone(record: str, org_record: str) -> dict[str, Any]:
    return {
        "_dmarc.fuzz.example": {"TXT": [record]},
        "_dmarc.sub.fuzz.example": {"TXT": [org_record]},
        "fuzz.example": {"A": ["192.0.2.1"]},
        "sub.fuzz.example": {"A": ["192.0.2.1"]},
        "_dmarc.fail.example.org": {"TXT": [record]},
        "_dmarc.temp.fuzz.example": "TEMPERROR",
        "_dmarc.example.com": {"TXT": [org_record]},
    }


def check_dmarc(dns: FakeDNS, from_values: list[str], spf: tuple[str, str] | None,
                skip_dkim: bool) -> CheckOutcome:
    ctx: Context = Engine(CONFIG, dns).ctx
    txn = Transaction.for_client("192.0.2.1", "client.example.net", 40000)
    txn.helo = "helo.fuzz.example"
    txn.new_message()
    txn.mail_from = "u@fuzz.example"
    txn.headers = [("From", value) for value in from_values] + [("Subject", " fuzz")]
    txn.add_body(b"body\r\n")
    if spf is not None:
        txn.results.append(CheckResult("spf", "spf", spf[1], properties=(
            ("smtp.mailfrom", spf[0]),)))
    if skip_dkim:
        txn.results.append(CheckResult("dkim", "dkim", "none"))
    outcome = CHECKS["dmarc"].run(ctx, txn, DmarcArgs())
    assert outcome.decisive in CHECKS["dmarc"].results
    for result in outcome.results:
        assert result.method == "dmarc" and result.result in DMARC_RESULTS
    check_ar([*txn.results, *outcome.results])
    return outcome


@budget(200)
@given(record=records, org_record=records, froms=st.lists(from_values, min_size=0, max_size=2),
       spf=st.one_of(st.none(), st.tuples(st.sampled_from(["u@fuzz.example", "u@other.example",
                                                             "u@sub.fuzz.example"]),
                                          st.sampled_from(["pass", "fail", "none"]))),
       skip_dkim=st.booleans())
def test_dmarc_check_fuzzed(record: str, org_record: str, froms: list[str],
                            spf: tuple[str, str] | None, skip_dkim: bool) -> None:
    check_dmarc(FakeDNS(zone(record, org_record)), froms, spf, skip_dkim)


@pytest.mark.parametrize("from_value", examples("from_header"))
def test_dmarc_check_corpus_from(from_value: str) -> None:
    dns = FakeDNS(zone("v=DMARC1; p=reject; rua=mailto:d@fuzz.example", "v=DMARC1; p=none"))
    for skip_dkim in (True, False):
        check_dmarc(dns, [from_value], ("u@fuzz.example", "fail"), skip_dkim)


@pytest.mark.parametrize("record", examples("dmarc_record"))
def test_dmarc_check_corpus_record(record: str) -> None:
    dns = FakeDNS(zone(record, record))
    for from_value in (" a@fuzz.example", " a@sub.fuzz.example", " a@nx.sub.fuzz.example"):
        check_dmarc(dns, [from_value], ("u@other.example", "pass"), True)


@pytest.mark.parametrize("from_value", [" m@fail.example.org\x00", " <m@fail.example.org\x01>"])
def test_from_domain_with_control_characters_is_unusable(from_value: str) -> None:
    # The domain reached the DNS query, the AR property (cleaned there) and the check's text,
    # which becomes the quarantine reason sent to the MTA as is.
    dns = FakeDNS(zone("v=DMARC1; p=quarantine", "v=DMARC1; p=none"))
    outcome = check_dmarc(dns, [from_value], ("u@fuzz.example", "fail"), True)
    assert outcome.decisive == "unusable_from"
    assert not re.search(r"[\x00-\x1f\x7f]", outcome.text)
