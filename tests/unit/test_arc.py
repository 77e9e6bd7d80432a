"""ARC (RFC 8617) checks, `mailwarden.checks.arc`: `run_seal` adds an ARC set for the message
and our Authentication-Results, `run_verify` validates the chain of the next hop; keys come from
the in-memory DNS of fakedns.py, the configuration from `config.parse`."""

from __future__ import annotations

import os
from pathlib import Path

import dkim
import dkim.util
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from mailwarden.checks import Context
from mailwarden.checks.arc import NoArgs, SealArgs, dnsfunc, run_seal, run_verify
from mailwarden.config import Config, ConfigError
from mailwarden.config.build import parse
from mailwarden.dkim.keys import generate, public_record, write_private
from mailwarden.findings import ArcFinding
from mailwarden.policy.engine import Engine
from mailwarden.results import Result
from mailwarden.transaction import CheckResult, Transaction
from mailwarden.verdict import Action

from fakedns import FakeDNS

ORIGINAL = [
    ("From", " Alice <alice@example.com>"),
    ("To", " list@lists.example.org"),
    ("Subject", " Picnic on Saturday"),
    ("Date", " Sat, 07 Nov 2026 08:00:00 +0000"),
    ("Message-ID", " <picnic-3@example.com>"),
]
BODY = b"Bring a blanket.\r\n"
AR_FIRST = ("mx.example.org; spf=pass smtp.mailfrom=alice@example.com; "
            "dkim=pass header.d=example.com")
KEY_NAMES = {"example.org": "arc._domainkey.example.org",
             "relay.example.net": "seal._domainkey.relay.example.net"}


@pytest.fixture(scope="module")
def rsa_keys() -> dict[str, rsa.RSAPrivateKey]:
    return {domain: rsa.generate_private_key(65537, 2048) for domain in KEY_NAMES}


def write_key(tmp_path: Path, name: str, key: object) -> str:
    path = str(tmp_path / name)
    write_private(key, path)  # type: ignore[arg-type]
    assert os.stat(path).st_mode & 0o777 == 0o600
    return path


def make_config(tmp_path: Path, rsa_keys: dict[str, rsa.RSAPrivateKey],
                authserv_id: str = "mx.example.org") -> Config:
    directory = tmp_path / authserv_id
    directory.mkdir(mode=0o700)
    first = write_key(directory, "org.pem", rsa_keys["example.org"])
    second = write_key(directory, "net.pem", rsa_keys["relay.example.net"])
    return parse(f"""authserv_id: {authserv_id}
signing:
  keys:
    - domain: example.org
      selector: arc
      key: {first}
    - domain: relay.example.net
      selector: seal
      key: {second}
""")


@pytest.fixture
def dns(rsa_keys: dict[str, rsa.RSAPrivateKey]) -> FakeDNS:
    return FakeDNS({name: {"TXT": [public_record(rsa_keys[domain])]}
                    for domain, name in KEY_NAMES.items()})


@pytest.fixture
def ctx(tmp_path: Path, rsa_keys: dict[str, rsa.RSAPrivateKey], dns: FakeDNS) -> Context:
    return Context(make_config(tmp_path, rsa_keys), dns, {})


@pytest.fixture
def relay_ctx(tmp_path: Path, rsa_keys: dict[str, rsa.RSAPrivateKey], dns: FakeDNS) -> Context:
    """The second hop: another ADMD, another authserv-id."""
    return Context(make_config(tmp_path, rsa_keys, "mx.relay.example.net"), dns, {})


def transaction(headers: list[tuple[str, str]], body: bytes = BODY) -> Transaction:
    txn = Transaction.for_client("192.0.2.10", "sender.example.com", 25000)
    txn.new_message()
    txn.mail_from = "alice@example.com"
    txn.headers = list(headers)
    txn.add_body(body)
    return txn


def seal(ctx: Context, headers: list[tuple[str, str]], domain: str, ar: str,
         body: bytes = BODY) -> list[tuple[str, str]]:
    """Seal as the engine does after writing `ar`; the header fields of the delivered message
    (the ARC set on top, then our Authentication-Results, then what we received)."""
    txn = transaction(headers, body)
    txn.authentication_results = ar
    outcome = run_seal(ctx, txn, SealArgs(domain))
    assert outcome.decisive == "sealed", outcome.text
    assert [name for name, _ in outcome.headers] == [
        "ARC-Seal", "ARC-Message-Signature", "ARC-Authentication-Results"]
    return [*outcome.headers, ("Authentication-Results", " " + ar), *headers]


def tags(headers: list[tuple[str, str]], name: str) -> dict[bytes, bytes]:
    value = next(v for n, v in headers if n == name)
    parsed: dict[bytes, bytes] = dkim.util.parse_tag_value(value.encode())
    return parsed


# -- sealing -----------------------------------------------------------------------------------
def test_seal_adds_instance_1_with_our_results(ctx: Context) -> None:
    sealed = seal(ctx, ORIGINAL, "example.org", AR_FIRST)
    arc_seal = tags(sealed, "ARC-Seal")
    assert (arc_seal[b"i"], arc_seal[b"cv"], arc_seal[b"d"], arc_seal[b"s"]) == (
        b"1", b"none", b"example.org", b"arc")
    assert arc_seal[b"a"] == b"rsa-sha256"  # RFC 8617 §4.1.3 / §4.1.2
    assert b"h" not in arc_seal  # RFC 8617 §4.1.3: no h= in ARC-Seal
    ams = tags(sealed, "ARC-Message-Signature")
    assert (ams[b"i"], ams[b"d"], ams[b"s"]) == (b"1", b"example.org", b"arc")
    signed = [h.strip().lower() for h in ams[b"h"].split(b":")]
    assert b"from" in signed and b"subject" in signed
    assert b"authentication-results" not in signed and b"arc-seal" not in signed
    aar = next(v for n, v in sealed if n == "ARC-Authentication-Results")
    assert aar.split(";")[0].strip() == "i=1"
    assert "mx.example.org" in aar and "spf=pass" in aar and "dkim=pass" in aar


def test_sealed_values_fold_with_lf_only(ctx: Context) -> None:
    sealed = seal(ctx, ORIGINAL, "example.org", AR_FIRST)
    for _, value in sealed[:3]:
        assert "\r" not in value
        assert not value.endswith("\n")
    assert any("\n" in value for _, value in sealed[:3])


def test_sealed_message_verifies_with_dkimpy(ctx: Context, dns: FakeDNS) -> None:
    sealed = transaction(seal(ctx, ORIGINAL, "example.org", AR_FIRST)).message()
    cv, results, reason = dkim.arc_verify(sealed, dnsfunc=dnsfunc(dns, []))
    assert (cv, reason) == (b"pass", "success")
    assert [r["as-domain"] for r in results] == [b"example.org"]


# -- verifying ---------------------------------------------------------------------------------
def test_verify_sealed_message_passes_and_names_the_sealer(ctx: Context,
                                                           relay_ctx: Context) -> None:
    txn = transaction(seal(ctx, ORIGINAL, "example.org", AR_FIRST))
    outcome = run_verify(relay_ctx, txn, NoArgs())
    assert outcome.decisive == "pass"
    [result] = outcome.results
    assert (result.method, result.result, result.reason) == ("arc", "pass", "success")
    assert result.properties == (("arc.chain", "example.org"),)
    assert outcome.findings == (ArcFinding("pass", ("example.org",)),)
    assert outcome.text == "ARC pass"


def test_two_hop_chain_names_both_sealers_oldest_first(ctx: Context,
                                                       relay_ctx: Context) -> None:
    first = seal(ctx, ORIGINAL, "example.org", AR_FIRST)
    # the relay validates the chain and seals with its result (cv=pass, instance 2)
    txn = transaction(first)
    assert run_verify(relay_ctx, txn, NoArgs()).decisive == "pass"
    second = seal(relay_ctx, first, "relay.example.net",
                  "mx.relay.example.net; arc=pass header.oldest-pass=0")
    arc_seals = [dkim.util.parse_tag_value(v.encode()) for n, v in second if n == "ARC-Seal"]
    assert [(s[b"i"], s[b"cv"]) for s in arc_seals] == [(b"2", b"pass"), (b"1", b"none")]
    final = transaction(second)
    outcome = run_verify(ctx, final, NoArgs())
    assert outcome.decisive == "pass"
    assert outcome.results[0].properties == (("arc.chain", "example.org:relay.example.net"),)
    assert outcome.findings == (ArcFinding("pass", ("example.org", "relay.example.net")),)


def test_unsealed_message_is_none(ctx: Context, dns: FakeDNS) -> None:
    txn = transaction(ORIGINAL)
    outcome = run_verify(ctx, txn, NoArgs())
    assert outcome.decisive == "none"
    [result] = outcome.results
    assert (result.method, result.result, result.properties) == ("arc", "none", ())
    assert outcome.findings == (ArcFinding("none"),)
    assert dns.queries == []  # nothing to look up


@pytest.mark.parametrize("change", ["body", "signed header", "added From"])
def test_tampered_sealed_message_fails(ctx: Context, relay_ctx: Context, change: str) -> None:
    sealed = seal(ctx, ORIGINAL, "example.org", AR_FIRST)
    body = BODY
    if change == "body":
        body = b"Bring two blankets.\r\n"
    elif change == "signed header":
        sealed = [(n, " Picnic cancelled" if n == "Subject" else v) for n, v in sealed]
    else:
        # From is signed once more than present in the AMS, so a second one breaks it
        sealed = [("From", " Mallory <mallory@example.net>"), *sealed]
    txn = transaction(sealed, body)
    outcome = run_verify(relay_ctx, txn, NoArgs())
    assert outcome.decisive == "fail"
    assert outcome.results[0].result == "fail"
    assert "ARC-Message-Signature" in outcome.results[0].reason
    assert [f.result for f in outcome.findings if isinstance(f, ArcFinding)] == ["fail"]


def test_tampered_arc_seal_fails(ctx: Context, relay_ctx: Context) -> None:
    sealed = seal(ctx, ORIGINAL, "example.org", AR_FIRST)
    # change what the seal covers: the AAR's results
    sealed = [(n, v.replace("spf=pass", "spf=fail") if n == "ARC-Authentication-Results" else v)
              for n, v in sealed]
    outcome = run_verify(relay_ctx, transaction(sealed), NoArgs())
    assert outcome.decisive == "fail"
    assert "ARC-Seal[1] did not validate" in outcome.results[0].reason


def test_missing_sealer_key_fails(ctx: Context, relay_ctx: Context, dns: FakeDNS) -> None:
    sealed = seal(ctx, ORIGINAL, "example.org", AR_FIRST)
    del dns.zone[KEY_NAMES["example.org"]]
    outcome = run_verify(relay_ctx, transaction(sealed), NoArgs())
    assert outcome.decisive == "fail"


def test_dnsfunc_maps_the_answers(dns: FakeDNS, rsa_keys: dict[str, rsa.RSAPrivateKey]) -> None:
    lookup = dnsfunc(dns, [])
    record = public_record(rsa_keys["example.org"]).encode()
    assert lookup(b"arc._domainkey.example.org.") == record
    assert lookup(b"missing._domainkey.example.org.") is None
    dns.add("slow._domainkey.example.org", "TEMPERROR")
    with pytest.raises(dkim.DKIMException, match="DNS error"):
        lookup(b"slow._domainkey.example.org.")


def test_key_lookup_temperror_is_temperror(ctx: Context, relay_ctx: Context,
                                           dns: FakeDNS) -> None:
    sealed = seal(ctx, ORIGINAL, "example.org", AR_FIRST)
    dns.add(KEY_NAMES["example.org"], "TEMPERROR")
    outcome = run_verify(relay_ctx, transaction(sealed), NoArgs())
    assert outcome.decisive == "temperror", outcome


def test_chain_with_cv_fail_is_fail(ctx: Context, relay_ctx: Context) -> None:
    first = seal(ctx, ORIGINAL, "example.org", AR_FIRST)
    tampered_body = b"Bring two blankets.\r\n"
    assert run_verify(relay_ctx, transaction(first, tampered_body), NoArgs()).decisive == "fail"
    # the relay found the chain broken and seals that (cv=fail, RFC 8617 §5.1.2)
    second = seal(relay_ctx, first, "relay.example.net", "mx.relay.example.net; arc=fail",
                  tampered_body)
    assert tags(second, "ARC-Seal")[b"cv"] == b"fail"
    outcome = run_verify(ctx, transaction(second, tampered_body), NoArgs())
    assert outcome.decisive == "fail"


# -- configuration, and the engine's order ------------------------------------------------------
def test_arc_seal_needs_an_rsa_key_for_its_domain(tmp_path: Path) -> None:
    ed = str(tmp_path / "ed.pem")
    write_private(generate("ed25519"), ed)
    text = f"""authserv_id: mx.example.org
signing:
  keys:
    - {{domain: example.org, selector: ed, key: {ed}}}
rules:
  eom:
    - name: seal
      check: arc_seal
      domain: example.org
"""
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert info.value.key == "rules.eom[0].domain"
    assert "RFC 8617" in info.value.message
    assert info.value.line == 9


def sealing_config(key: str) -> Config:
    """arc_verify, then arc_seal for example.org, at the end of message."""
    return parse(f"""authserv_id: mx.example.org
signing:
  keys:
    - {{domain: example.org, selector: arc, key: {key}}}
rules:
  eom:
    - name: arc
      check: arc_verify
    - name: seal
      check: arc_seal
      domain: example.org
""")


def test_engine_seals_after_writing_authentication_results(
        tmp_path: Path, rsa_keys: dict[str, rsa.RSAPrivateKey], dns: FakeDNS,
        relay_ctx: Context) -> None:
    """Through the engine: arc_verify and arc_seal at eom; the ARC set goes on top of our
    Authentication-Results, and the next hop validates it."""
    config = sealing_config(write_key(tmp_path, "k.pem", rsa_keys["example.org"]))
    txn = transaction(ORIGINAL)
    verdict, edits = Engine(config, dns).end_of_message(txn)
    assert verdict.action == "continue"
    names = [name for name, _ in edits.insert]
    assert names == ["ARC-Seal", "ARC-Message-Signature", "ARC-Authentication-Results",
                     "Authentication-Results"]
    ar = edits.insert[3][1]
    assert "arc=none" in ar
    aar = edits.insert[2][1]
    assert "arc=none" in aar and "i=1" in aar
    delivered = transaction([*edits.insert, *ORIGINAL])
    outcome = run_verify(relay_ctx, delivered, NoArgs())
    assert outcome.decisive == "pass"
    assert outcome.results[0].properties == (("arc.chain", "example.org"),)


def test_folded_results_are_sealed_as_folded(
        tmp_path: Path, rsa_keys: dict[str, rsa.RSAPrivateKey], dns: FakeDNS,
        relay_ctx: Context) -> None:
    """Authentication-Results and ARC-Authentication-Results long enough to be folded at 78
    (RFC 5322 §2.1.1): the next hop validates the chain over the fields as the MTA inserts
    them, folding included."""
    config = sealing_config(write_key(tmp_path, "k.pem", rsa_keys["example.org"]))
    txn = transaction(ORIGINAL)
    sender, helo = "a.rather.long.local.part@sub.sub.example.net", "relay" * 8 + ".example"
    txn.results += [CheckResult("spf", "spf", Result.PASS, "", (("smtp.mailfrom", sender),)),
                    CheckResult("spf", "spf", Result.NONE, "", (("smtp.helo", helo),))]
    verdict, edits = Engine(config, dns).end_of_message(txn)
    assert verdict.action is Action.CONTINUE
    fields = dict(edits.insert)
    for name in ("Authentication-Results", "ARC-Authentication-Results"):
        lines = f"{name}: {fields[name].lstrip()}".split("\n")
        assert len(lines) > 1 and all(len(line) <= 78 for line in lines), lines
    delivered = transaction([*edits.insert, *ORIGINAL])
    outcome = run_verify(relay_ctx, delivered, NoArgs())
    assert outcome.decisive is Result.PASS
