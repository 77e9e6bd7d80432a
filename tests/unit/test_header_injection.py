"""Header injection through the whole engine: HELO names, MAIL FROM addresses and From fields
holding CR, LF, "CRLF X-Injected: yes", `;`, `"`, `(`, `\\`, NUL and non-ASCII never reach the
fields mailwarden adds (Authentication-Results, Received-SPF, the ARC set) unescaped, and the
log line stays one printable line.

Each message runs the `spf` rule at MAIL FROM and `dmarc` plus `arc_seal` at end of message,
as a real configuration would, over the in-memory DNS of fakedns.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import authres
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from test_fuzz_corpus import budget, corpus, examples, fuzzed
from test_fuzz_headers import (
    expected_value,
    read_pvalue,
    spf_clean,
    strict_ar,
    strict_received_spf,
)

from mailwarden.config import Config
from mailwarden.config.build import parse
from mailwarden.dkim.keys import public_record, write_private
from mailwarden.headers import FOLD_WIDTH, LINE_LIMIT, _words, authserv_id_of
from mailwarden.policy.engine import Engine, HeaderEdits, Verdict, describe
from mailwarden.transaction import Transaction
from mailwarden.verdict import Stage

from fakedns import FakeDNS

AUTHSERV = "mx.example.com"
CLIENT = "192.0.2.1"
ZONE: dict[str, Any] = {
    "1.2.0.192.in-addr.arpa": {"PTR": ["mail.example.net"]},
    "mail.example.net": {"A": [CLIENT], "TXT": ["v=spf1 a -all"]},
    "helo.example.net": {"TXT": ["v=spf1 -all"]},
    "pass.example.org": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},
    "fail.example.org": {"TXT": ["v=spf1 -all exp=why.fail.example.org"]},
    "why.fail.example.org": {"TXT": ["%{s} from %{h} is not allowed"]},
    "soft.example.org": {"TXT": ["v=spf1 ~all"]},
    "perm.example.org": {"TXT": ["v=spf1 a:%{l}\"bad -all"]},
    "temp.example.org": "TEMPERROR",
    "_dmarc.pass.example.org": {"TXT": ["v=DMARC1; p=reject"]},
    "_dmarc.fail.example.org": {"TXT": ["v=DMARC1; p=quarantine"]},
    "_dmarc.example.com": {"TXT": ["v=DMARC1; p=none"]},
}
RULES = """rules:
  mail:
    - name: spf
      check: spf
      on: {fail: continue, softfail: continue, permerror: continue, temperror: continue}
  eom:
    - name: dmarc
      check: dmarc
      enforce: false
    - name: seal
      check: arc_seal
      domain: example.com
"""
ARC_SET = ["ARC-Seal", "ARC-Message-Signature", "ARC-Authentication-Results"]
OURS = ["Authentication-Results", "Received-SPF"]
FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, FakeDNS]:
    key = rsa.generate_private_key(65537, 2048)
    directory: Path = tmp_path_factory.mktemp("keys")
    directory.chmod(0o700)
    path = str(directory / "seal.pem")
    write_private(key, path)
    config = parse(f"authserv_id: {AUTHSERV}\nsigning:\n  keys:\n    - domain: example.com\n"
                   f"      selector: seal\n      key: {path}\n" + RULES)
    zone = dict(ZONE)
    zone["seal._domainkey.example.com"] = {"TXT": [public_record(key)]}
    return config, FakeDNS(zone)


def deliver(setup: tuple[Config, FakeDNS], helo: str, mail_from: str, from_value: str,
            extra: tuple[tuple[str, str], ...] = ()) -> tuple[Transaction, Verdict, HeaderEdits]:
    config, dns = setup
    engine = Engine(config, dns)
    txn = Transaction.for_client(CLIENT, "mail.example.net", 40000)
    txn.helo = helo
    txn.new_message()
    txn.mail_from = mail_from
    assert engine.run_stage(Stage.MAIL, txn).action == "continue"
    txn.rcpts.append("rcpt@example.com")
    txn.headers = [*extra, ("From", from_value), ("To", " rcpt@example.com"),
                   ("Subject", " hello")]
    txn.add_body(b"Hello.\r\n")
    verdict, edits = engine.end_of_message(txn)
    return txn, verdict, edits


def unfold(value: str) -> str:
    return re.sub(r"\r?\n(?=[ \t])", "", value)


def check_delivery(setup: tuple[Config, FakeDNS], helo: str, mail_from: str,
                   from_value: str) -> None:
    txn, verdict, edits = deliver(setup, helo, mail_from, from_value)
    assert not verdict.refuses
    line = describe(txn, "eom", verdict)
    assert re.fullmatch(r"[\x20-\x7e]*", line), line
    names = [name for name, _ in edits.insert]
    # dkimpy cannot seal a message whose header block is broken (a bare LF in a field that
    # is not folding); the rule then gives "error" and only the ARC set is missing
    assert names in (ARC_SET + OURS, OURS)
    for name, value in edits.insert:
        assert FIELD_NAME.fullmatch(name)
        assert "\r" not in value and "\0" not in value
        # LF only as folding (the ARC set folds with LF + whitespace, as libmilter wants)
        assert re.fullmatch(r"(?:[\x20-\x7e]|\n(?=[ \t]))*", value), (name, value)
        block = f"{name}:{value}"
        assert not re.search(r"\n[^ \t]", block)  # so no line can start a field of its own
        # RFC 5322 §2.1.1: no line over 998; ours folded at 78 wherever a word ends there
        lines = f"{name}: {value.lstrip(' ')}".split("\n")
        assert all(len(line) <= LINE_LIMIT for line in lines), (name, value)
        if name in ("Authentication-Results", "Received-SPF", "ARC-Authentication-Results"):
            for line in lines:
                assert len(line) <= FOLD_WIDTH or len(_words(line.strip())) == 1, (name, line)

    fields = dict(edits.insert)
    spf_results = [r for r in txn.results if r.method == "spf"]
    # Authentication-Results: strictly our grammar, authres agrees, hostile text quoted
    authserv_id, clauses = strict_ar(unfold(fields["Authentication-Results"]))
    assert authserv_id == AUTHSERV
    assert [m for m, _, _, _ in clauses] == [r.method for r in txn.results]
    for (_, result, _, props), given_result in zip(clauses, txn.results, strict=True):
        assert result == given_result.result
        for (key, text), (_, original) in zip(props, given_result.properties, strict=True):
            assert key in ("smtp.helo", "smtp.mailfrom", "header.from", "polrec.p", "polrec.sp",
                           "polrec.np", "polrec.domain")
            assert read_pvalue(text) == expected_value(original)
    parsed = authres.AuthenticationResultsHeader.parse(
        "Authentication-Results: " + fields["Authentication-Results"])
    assert [(r.method, r.result) for r in parsed.results] == \
        [(r.method, r.result) for r in txn.results]

    # Received-SPF: the MAIL FROM identity's result, every value a dot-atom or quoted-string
    result, _, pairs = strict_received_spf(unfold(fields["Received-SPF"]).strip())
    assert result == spf_results[-1].result
    assert pairs["helo"] == spf_clean(helo)
    assert pairs["envelope-from"] == spf_clean(spf_results[-1].properties[0][1])

    # ARC-Authentication-Results: dkimpy re-serialised our results through authres; no more
    # resinfos than we wrote, the same methods and results
    if "ARC-Authentication-Results" not in fields:
        assert re.search(r"\n[^ \t]", from_value)
        return
    aar = unfold(fields["ARC-Authentication-Results"]).strip()
    instance, _, rest = aar.partition(";")
    assert instance == "i=1"
    sealed = authres.AuthenticationResultsHeader.parse("Authentication-Results: " + rest.strip())
    assert sealed.authserv_id == AUTHSERV
    assert [(r.method, r.result) for r in sealed.results] == \
        [(r.method, r.result) for r in txn.results]

BENIGN_HELO, BENIGN_FROM, BENIGN_HEADER = "helo.example.net", "u@fail.example.org", \
    " u@fail.example.org"


@pytest.mark.parametrize("helo", examples("helo"))
def test_hostile_helo(setup: tuple[Config, FakeDNS], helo: str) -> None:
    check_delivery(setup, helo, BENIGN_FROM, BENIGN_HEADER)


@pytest.mark.parametrize("mail_from", examples("mail_from"))
def test_hostile_mail_from(setup: tuple[Config, FakeDNS], mail_from: str) -> None:
    check_delivery(setup, BENIGN_HELO, mail_from, BENIGN_HEADER)


@pytest.mark.parametrize("from_value", examples("from_header"))
def test_hostile_from(setup: tuple[Config, FakeDNS], from_value: str) -> None:
    check_delivery(setup, BENIGN_HELO, BENIGN_FROM, from_value)


@pytest.mark.parametrize(("helo", "mail_from", "from_value"), [
    ("x.example\r\nX-Injected: yes", "a\r\nX-Injected: yes@fail.example.org",
     " m@fail.example.org\r\nX-Injected: yes"),
    ('h"; dkim=pass (x.example', 'x;dkim=pass header.d=bank.example@evil.example',
     ' "Bank; dkim=pass" <m@fail.example.org>'),
    ("h\\(\\).example", "\"q\\\"\\\\\"@pass.example.org", " q\\@pass.example.org"),
    ("n\x00ul.example", "n\x00ul@pass.example.org", " n\x00ul@pass.example.org"),
    ("ünï.example", "ü@pass.example.org\udcff", " Ünï <ü@pass.example.org>"),
])
def test_everything_hostile_at_once(setup: tuple[Config, FakeDNS], helo: str, mail_from: str,
                                    from_value: str) -> None:
    check_delivery(setup, helo, mail_from, from_value)


@budget(40)
@given(helo=fuzzed(corpus("helo")), mail_from=fuzzed(corpus("mail_from")),
       from_value=fuzzed(corpus("from_header")))
def test_hostile_envelope_fuzzed(setup: tuple[Config, FakeDNS], helo: str, mail_from: str,
                                 from_value: str) -> None:
    check_delivery(setup, helo, mail_from, from_value)


def test_injected_semicolon_stays_inside_the_quoted_local_part(
        setup: tuple[Config, FakeDNS]) -> None:
    _, _, edits = deliver(setup, BENIGN_HELO, "x;dkim=pass header.d=bank.example@evil.example",
                          BENIGN_HEADER)
    fields = dict(edits.insert)
    assert 'smtp.mailfrom="x;dkim=pass header.d=bank.example"@evil.example' in \
        fields["Authentication-Results"]
    assert 'smtp.mailfrom="x;dkim=pass header.d=bank.example"@evil.example' in \
        unfold(fields["ARC-Authentication-Results"])
    assert 'envelope-from="x;dkim=pass header.d=bank.example@evil.example";' in \
        fields["Received-SPF"]


def test_forged_results_are_not_sealed(setup: tuple[Config, FakeDNS]) -> None:
    forged = ("Authentication-Results", f" {AUTHSERV}; dkim=pass header.d=bank.example")
    _, _, edits = deliver(setup, BENIGN_HELO, BENIGN_FROM, BENIGN_HEADER, extra=(forged,))
    assert edits.delete == (1,)
    assert authserv_id_of(forged[1]) == AUTHSERV
    assert "bank.example" not in dict(edits.insert)["ARC-Authentication-Results"]


@pytest.mark.parametrize("helo", ["a\r\nb.example", "a\x00b.example", "\u202eevil.example"])
def test_log_line_is_one_printable_line(setup: tuple[Config, FakeDNS], helo: str) -> None:
    txn, verdict, _ = deliver(setup, helo, f"x\r\n{helo}@fail.example.org",
                              f" m@fail.example.org\r\n{helo}")
    txn.rcpts.append("evil\r\nX-Injected: yes@example.com")
    txn.queue_id = "Q\r\nX"
    line = describe(txn, "eom", verdict)
    assert re.fullmatch(r"[\x20-\x7e]+", line), line


@pytest.mark.parametrize("mail_from", ["u@fail.example.org\x00x", "u@x\r\nX-Injected: y.example"])
def test_quarantine_reason_is_one_printable_line(mail_from: str) -> None:
    config = parse(f"authserv_id: {AUTHSERV}\nrules:\n  mail:\n    - name: spf\n"
                   "      check: spf\n      on: {fail: quarantine, none: quarantine}\n")
    txn = Transaction.for_client(CLIENT, "mail.example.net", 40000)
    txn.helo = BENIGN_HELO
    txn.new_message()
    txn.mail_from = mail_from
    assert Engine(config, FakeDNS(ZONE)).run_stage(Stage.MAIL, txn).action == "quarantine"
    assert txn.quarantine is not None
    assert re.fullmatch(r"[\x20-\x7e]+", txn.quarantine), txn.quarantine
