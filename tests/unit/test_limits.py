"""Amplification limits (`limits:`): their parsing and validation, the checks' defaults taken
from them, the header budget of the milter, and what the DKIM and ARC checks do past them.

The query counts at a real DNS server, through the running daemon, are in
tests/integration/test_amplification.py."""

from __future__ import annotations

import re
import struct
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import dkim as dkimpy
import pytest
from miltercodec import connect_data, cstr, header_data, optneg, split_packets

from mailwarden import milterproto as mp
from mailwarden.checks import CHECKS, Context
from mailwarden.checks.arc import chain_length
from mailwarden.checks.spf import spf_limits
from mailwarden.config import ConfigError, LimitsConfig
from mailwarden.config.build import parse
from mailwarden.daemon import build_runtime
from mailwarden.dkim.keys import generate, public_record, write_private
from mailwarden.dkim.verify import verify_message
from mailwarden.findings import ArcFinding
from mailwarden.transaction import Transaction
from mailwarden.transports.native import AR_HEAD, HeaderBudget, Session

from fakedns import FakeDNS

ROOT = Path(__file__).resolve().parents[2]
FILE = "limits.yaml"
BASE = "authserv_id: mx.example.com\n"
AUTHSERV = "mx.example.com"
AR = "Authentication-Results"


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text, FILE)
    return info.value


def limits_config(body: str) -> str:
    return BASE + "limits:\n" + textwrap.indent(textwrap.dedent(body).strip("\n"), "  ") + "\n"


# == configuration =============================================================================
def test_defaults_with_no_section_and_with_an_empty_one() -> None:
    expected = LimitsConfig(spf_dns_lookups=10, spf_void_lookups=2, spf_mx_names=10,
                            spf_ptr_names=10, iprev_names=10, dkim_signatures=8, arc_sets=50,
                            header_fields=1000, header_bytes=4 * 1024 * 1024,
                            header_field_bytes=64 * 1024)
    assert parse(BASE).limits == expected
    assert parse(BASE + "limits:\n").limits == expected
    assert parse(BASE + "limits: {}\n").limits == expected


def test_every_key_is_read() -> None:
    config = parse(limits_config("""
        spf_dns_lookups: 5
        spf_void_lookups: 0
        spf_mx_names: 3
        spf_ptr_names: 2
        iprev_names: 40
        dkim_signatures: 1
        arc_sets: 4
        header_fields: 10
        header_bytes: 65536
        header_field_bytes: 1024
    """))
    assert config.limits == LimitsConfig(5, 0, 3, 2, 40, 1, 4, 10, 65536, 1024)


@pytest.mark.parametrize(("body", "key", "message"), [
    ("spf_dns_lookups: 11", "limits.spf_dns_lookups",
     "must be at most 10: RFC 7208 §4.6.4 allows at most 10, it can only be lowered (got 11)"),
    ("spf_mx_names: 20", "limits.spf_mx_names", "RFC 7208 §4.6.4 allows at most 10"),
    ("spf_ptr_names: 11", "limits.spf_ptr_names", "it can only be lowered (got 11)"),
    ("arc_sets: 51", "limits.arc_sets", "RFC 8617 §4.2.1 allows at most 50"),
    ("spf_dns_lookups: 0", "limits.spf_dns_lookups", "must be at least 1 (got 0)"),
    ("spf_void_lookups: -1", "limits.spf_void_lookups", "must be at least 0 (got -1)"),
    ("iprev_names: 51", "limits.iprev_names", "must be at most 50 (got 51)"),
    ("dkim_signatures: 65", "limits.dkim_signatures", "must be at most 64 (got 65)"),
    ("dkim_signatures: 2.5", "limits.dkim_signatures", "expected a whole number"),
    ("header_fields: many", "limits.header_fields", "expected a number (got 'many')"),
    ("header_fields: 9", "limits.header_fields", "must be at least 10 (got 9)"),
    ("header_bytes: 1024", "limits.header_bytes", "must be at least 65536"),
    ("header_field_bytes: 100", "limits.header_field_bytes", "must be at least 1024"),
    ("header_field_bytes: 2097152", "limits.header_field_bytes", "must be at most 1048576"),
    ("header_bytes: 65536\nheader_field_bytes: 131072", "limits.header_field_bytes",
     "must not exceed limits.header_bytes (65536)"),
    ("spf_lookups: 5", "limits.spf_lookups", "unknown key"),
    ("header_fields: [1, 2]", "limits.header_fields", "expected a single value"),
])
def test_errors_name_the_file_line_and_key(body: str, key: str, message: str) -> None:
    text = limits_config("# the bad key is never on the first line\n" + body)
    exc = error(text)
    bad = body.splitlines()[-1].split(":")[0]
    line = next(n for n, text_line in enumerate(text.splitlines(), 1)
                if text_line.strip().startswith(bad + ":"))
    assert (exc.file, exc.line, exc.key) == (FILE, line, key)
    assert message in exc.message
    assert str(exc).startswith(f"{FILE}:{line}: {key}: ")


def test_a_limits_section_that_is_not_a_mapping() -> None:
    exc = error(BASE + "limits: 10\n")
    assert (exc.line, exc.key, exc.message) == (2, "limits", "expected a mapping")


def test_the_checks_take_their_defaults_from_the_limits() -> None:
    rules = """rules:
  connect:
    - {name: a, check: iprev}
    - {name: b, check: iprev, max_names: 30}
  eom:
    - {name: c, check: dkim_verify}
    - {name: d, check: dkim_verify, max_signatures: 12}
"""
    config = parse(BASE + "limits: {iprev_names: 4, dkim_signatures: 3}\n" + rules)
    connect, eom = config.stage_rules("connect"), config.stage_rules("eom")
    assert [rule.args.max_names for rule in connect] == [4, 30]  # the rule's own value wins
    assert [rule.args.max_signatures for rule in eom] == [3, 12]
    plain = parse(BASE + rules)
    assert plain.stage_rules("connect")[0].args.max_names == 10
    assert plain.stage_rules("eom")[0].args.max_signatures == 8


def test_the_spf_check_evaluates_with_the_configured_limits() -> None:
    config = parse(BASE + "spf: {budget: 7}\nlimits: {spf_dns_lookups: 6, "
                   "spf_void_lookups: 1, spf_mx_names: 4, spf_ptr_names: 3}\n")
    limits = spf_limits(config)
    assert (limits.dns_terms, limits.void_lookups, limits.mx_names, limits.ptr_names,
            limits.budget) == (6, 1, 4, 3, 7.0)
    default = spf_limits(parse(BASE))
    assert (default.dns_terms, default.void_lookups, default.mx_names,
            default.ptr_names) == (10, 2, 10, 10)


def test_documented_and_example_defaults_are_the_parsers() -> None:
    defaults = LimitsConfig()
    doc = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `limits\.(\w+)` \| [^|]+ \| `(\d+)` \|", doc, re.MULTILINE))
    assert {name: int(value) for name, value in rows.items()} == {
        name: getattr(defaults, name) for name in LimitsConfig.__dataclass_fields__}
    example = (ROOT / "conf" / "mailwarden.yaml").read_text(encoding="utf-8")
    block = re.search(r"^# limits:\n((?:#   .*\n)+)", example, re.MULTILINE)
    assert block is not None, "conf/mailwarden.yaml shows the limits, commented out"
    uncommented = "limits:\n" + "".join(line[1:] + "\n" for line in block.group(1).splitlines())
    assert parse(BASE + uncommented).limits == defaults


# == the header budget of the milter ===========================================================
LIMITS = LimitsConfig(header_fields=10, header_bytes=64 * 1024, header_field_bytes=1024)


def take_all(budget: HeaderBudget, fields: list[tuple[str, str]],
             limits: LimitsConfig = LIMITS) -> list[tuple[str, str]]:
    kept = (budget.take(name, value, limits, AUTHSERV) for name, value in fields)
    return [field for field in kept if field is not None]


def test_a_field_longer_than_the_limit_is_cut_before_it_is_decoded() -> None:
    budget = HeaderBudget()
    kept = take_all(budget, [("Subject", " " + "x" * 1_000_000), ("To", " bob@example.net")])
    assert kept == [("Subject", " " + "x" * 1023), ("To", " bob@example.net")]
    assert budget.over and budget.cut == 1 and budget.dropped == 0
    assert budget.describe() == "1 header fields cut to limits.header_field_bytes"
    # a multi-byte character cut in two does not break decoding
    cut = HeaderBudget().take("Subject", " " + "é" * 1000, LIMITS, AUTHSERV)
    assert cut is not None and len(cut[1].encode("utf-8", "surrogateescape")) == 1024


def test_fields_past_the_count_are_counted_not_kept_but_from_is() -> None:
    budget = HeaderBudget()
    fields = [(f"X-Filler-{i}", f" {i}") for i in range(12)]
    fields += [("From", " a@one.example"), ("Subject", " late"), ("From", " b@two.example"),
               ("From", " c@three.example")]
    kept = take_all(budget, fields)
    assert [name for name, _ in kept] == [f"X-Filler-{i}" for i in range(10)] + ["From", "From"]
    assert (budget.fields, budget.dropped, budget.cut) == (16, 4, 0)
    assert budget.describe() == ("4 of 16 header fields left out of the checks "
                                 "(limits.header_fields, limits.header_bytes)")


def test_fields_past_the_byte_budget_are_not_kept() -> None:
    budget = HeaderBudget()
    limits = LimitsConfig(header_bytes=64 * 1024, header_field_bytes=1024)
    kept = take_all(budget, [("X-Big", " " + "y" * 1000)] * 70 + [("X-Small", " z")], limits)
    assert len(kept) == 64 * 1024 // (len("X-Big") + 1001 + 2)
    assert ("X-Small", " z") not in kept  # what is kept is the top of the header, whole
    assert budget.dropped == 71 - len(kept)
    assert budget.size <= limits.header_bytes


def test_authentication_results_past_the_limits_keep_their_position() -> None:
    budget = HeaderBudget()
    comment = "(" + "c" * 2000 + ")"
    fields = [(f"X-Filler-{i}", " x") for i in range(10)]
    fields += [
        (AR, " other.example; spf=pass (" + "z" * 3000 + ")"),  # readable: its head is kept
        (AR, f" {comment} other.example; spf=pass"),  # its id is past AR_HEAD: counts as ours
        (AR, " " + "q" * 1500),  # one token that runs past AR_HEAD: unreadable
        (AR, " ; dkim=pass"),  # no authserv-id at all
    ]
    kept = take_all(budget, fields)
    ars = [value for name, value in kept if name == AR]
    assert ars[0] == (" other.example; spf=pass (" + "z" * 3000)[:AR_HEAD]
    assert ars[1:] == [f" {AUTHSERV}; none"] * 3
    assert budget.dropped == 4


def test_a_huge_authentication_results_within_the_count_is_cut_the_same_way() -> None:
    budget = HeaderBudget()
    kept = take_all(budget, [(AR, " " + "()" * 300_000 + f" {AUTHSERV}; spf=pass"),
                             (AR, " other.example; spf=fail (" + "w" * 5000 + ")")])
    assert kept == [(AR, f" {AUTHSERV}; none"),
                    (AR, (" other.example; spf=fail (" + "w" * 5000)[:AR_HEAD])]
    assert budget.cut == 2


# -- through the Session ------------------------------------------------------------------------
SESSION_CONFIG = f"""\
authserv_id: {AUTHSERV}
dns: {{nameservers: ["127.0.0.1:9"], timeout: 0.1, lifetime: 0.2}}
limits: {{header_fields: 10, header_field_bytes: 2048}}
rules:
  eom:
    - {{name: arc, check: arc_verify}}
"""


@pytest.fixture
def session() -> Iterator[Session]:
    s = Session(build_runtime(parse(SESSION_CONFIG)))
    yield s
    s.close()


def replies(raw: bytes | None) -> list[tuple[str, bytes]]:
    assert raw is not None
    return [(command.decode(), data) for command, data in split_packets(raw)]


def test_a_message_over_the_header_limits_is_checked_and_logged_not_refused(
        session: Session, caplog: pytest.LogCaptureFixture) -> None:
    session.handle(mp.C_OPTNEG, optneg())
    session.handle(mp.C_CONNECT, connect_data("client.example.net", "192.0.2.1"))
    session.handle(mp.C_HELO, cstr("helo.example.net"))
    session.handle(mp.C_MAIL, cstr("<alice@sender.example>"))
    session.handle(mp.C_RCPT, cstr("<bob@ours.example>"))
    fields = [(f"X-Filler-{i}", f" {i}") for i in range(30)]
    fields += [(AR, f" ({'c' * 3000}) {AUTHSERV}; spf=pass"), ("From", " a@sender.example"),
               (AR, " other.example; spf=pass"), ("Subject", " " + "s" * 100_000)]
    for name, value in fields:
        session.handle(mp.C_HEADER, header_data(name, value))
    with caplog.at_level("INFO", "mailwarden"):
        edits = replies(session.handle(mp.C_EOB, b""))
    # the forged field (its authserv-id hidden behind a long comment) is deleted; the other
    # Authentication-Results field, second by position, is not
    assert edits[0] == ("m", struct.pack(">I", 1) + AR.encode() + b"\0\0")
    assert [command for command, _ in edits] == ["m", "i", "c"]
    assert [name for name, _ in session.txn.headers][-3:] == [AR, "From", AR]
    assert "headers=over_limit" in caplog.text
    # 20 fillers and the Subject left out, both Authentication-Results fields kept in part
    assert "23 of 34 header fields left out of the checks" in caplog.text
    assert "2 header fields cut to limits.header_field_bytes" in caplog.text
    assert session.txn.header_cut.startswith("23 of 34 header fields")


# == the checks past their limits ==============================================================
MESSAGE = (b"From: Alice <alice@sender.example>\r\nTo: bob@ours.example\r\n"
           b"Subject: limits\r\n\r\nHello.\r\n")


@pytest.fixture(scope="module")
def rsa_key() -> tuple[bytes, str]:
    """A private key as PEM and its DKIM key record."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = generate("rsa", 1024)
    assert isinstance(key, rsa.RSAPrivateKey)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    return pem, public_record(key)


def sign(message: bytes, pem: bytes, domain: str, selector: str,
         headers: list[bytes] | None = None) -> bytes:
    field = dkimpy.sign(message, selector.encode(), domain.encode(), pem,
                        include_headers=headers or [b"from", b"to", b"subject"])
    return bytes(field) + message


def test_only_the_top_signatures_are_verified_and_the_rest_summed_up(
        rsa_key: tuple[bytes, str]) -> None:
    pem, record = rsa_key
    message, zone = MESSAGE, {}
    for i in range(20):
        message = sign(message, pem, f"d{i}.example", f"s{i}")
        zone[f"s{i}._domainkey.d{i}.example"] = {"TXT": [record]}
    dns = FakeDNS(zone)
    results = verify_message(message, dns, max_signatures=3)
    # the top three are the last three signed, each with its one key lookup
    assert dns.queries == [(f"s{i}._domainkey.d{i}.example", "TXT") for i in (19, 18, 17)]
    assert [r.result for r in results] == ["pass", "pass", "pass", "neutral"]
    assert results[3].reason == ("17 not evaluated: more than 3 signatures "
                                 "(limits.dkim_signatures)")
    assert results[3].domain == ""  # nothing of them was read, not even d=
    dns.reset()
    assert [r.result for r in verify_message(message, dns, max_signatures=20)] == ["pass"] * 20
    assert len(dns.queries) == 20


def test_a_long_h_list_of_absent_names_costs_no_scan_per_name(
        rsa_key: tuple[bytes, str]) -> None:
    pem, record = rsa_key
    filler = b"".join(b"X-Filler-%d: %d\r\n" % (i, i) for i in range(1000))
    absent = [b"x-absent-%d" % i for i in range(5000)]
    message = sign(filler + MESSAGE, pem, "sender.example", "sel",
                   [b"from", *absent, b"subject", b"from"])
    dns = FakeDNS({"sel._domainkey.sender.example": {"TXT": [record]}})
    started = time.perf_counter()
    results = verify_message(message, dns)
    elapsed = time.perf_counter() - started
    assert [r.result for r in results] == ["pass"]
    # measured: 0.01 s; scanning the 1,000 fields for each absent name took 0.9 s
    assert elapsed < 0.4, f"{elapsed:.2f} s"


def test_signing_and_sealing_refuse_a_header_not_kept_whole(tmp_path: Path) -> None:
    key_path = tmp_path / "example.com.pem"
    write_private(generate("rsa", 1024), str(key_path))
    config = parse(BASE + f"""signing:
  keys: [{{domain: example.com, selector: s1, key: {key_path}}}]
rules:
  eom:
    - {{name: sign, check: dkim_sign, authenticated: false}}
    - {{name: seal, check: arc_seal, domain: example.com}}
""")
    ctx = Context(config, FakeDNS(), {})
    sign_rule, seal_rule = config.stage_rules("eom")

    def run(txn: Transaction) -> tuple[str, str, str, str]:
        signed = CHECKS["dkim_sign"].run(ctx, txn, sign_rule.args)
        txn.authentication_results = f"{AUTHSERV}; none"
        sealed = CHECKS["arc_seal"].run(ctx, txn, seal_rule.args)
        return signed.decisive, signed.text, sealed.decisive, sealed.text

    txn = Transaction.for_client("192.0.2.1")
    txn.headers = [("From", " alice@example.com"), ("Subject", " hi")]
    assert run(txn)[0::2] == ("signed", "sealed")
    txn.header_cut = "2 header fields cut to limits.header_field_bytes"
    assert run(txn) == ("error", "cannot sign: 2 header fields cut to "
                        "limits.header_field_bytes", "error",
                        "cannot seal: 2 header fields cut to limits.header_field_bytes")


def arc_txn(sets: int, highest: int | None = None) -> Transaction:
    txn = Transaction.for_client("192.0.2.1")
    for i in range(sets, 0, -1):
        txn.headers += [
            ("ARC-Seal", f" i={i}; a=rsa-sha256; cv={'none' if i == 1 else 'pass'}; "
                         f"d=sealer{i}.example; s=s; b=AAAA"),
            ("ARC-Message-Signature", f" i={i}; a=rsa-sha256; c=relaxed/relaxed; "
                                      f"d=sealer{i}.example; s=s; h=from; bh=AAAA; b=AAAA"),
            ("ARC-Authentication-Results", f" i={i}; sealer{i}.example; spf=pass"),
        ]
    if highest is not None:
        txn.headers.append(("ARC-Authentication-Results", f" i={highest}; x.example; none"))
    txn.headers += [("From", " alice@sender.example"), ("Subject", " hi")]
    return txn


def test_chain_length_counts_seals_and_the_highest_instance() -> None:
    assert chain_length(Transaction()) == 0
    assert chain_length(arc_txn(3)) == 3
    assert chain_length(arc_txn(2, highest=900)) == 900


@pytest.mark.parametrize(("sets", "limit", "looked_up"), [(3, 2, False), (3, 3, True),
                                                          (2, 50, True), (51, 50, False)])
def test_an_arc_chain_longer_than_the_limit_fails_without_a_lookup(
        sets: int, limit: int, looked_up: bool) -> None:
    config = parse(BASE + f"limits: {{arc_sets: {limit}}}\n"
                   "rules: {eom: [{name: arc, check: arc_verify}]}\n")
    dns = FakeDNS()
    txn = arc_txn(sets)
    outcome = CHECKS["arc_verify"].run(Context(config, dns, {}), txn, None)
    assert outcome.decisive == "fail"  # these fake seals never validate
    assert bool(dns.queries) is looked_up
    if not looked_up:
        assert outcome.results[0].reason == (f"chain of {sets} ARC sets, more than {limit} "
                                             "(limits.arc_sets)")
        assert outcome.findings == (ArcFinding("fail"),)
