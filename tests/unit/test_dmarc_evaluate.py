"""DMARC evaluation (RFC 9989 §4.4, §4.7, §4.10.1, §5.3) with `mailwarden.dmarc.evaluate`, and
the `dmarc` check (`checks.dmarc.run`, `author_domain`, `outcomes`) run directly and through
`Engine.end_of_message`, with configurations from `config.parse` and fakedns.py. No report
store is configured."""

from __future__ import annotations

from typing import Any

import pytest

from mailwarden.checks import Context
from mailwarden.checks import dmarc as dmarc_check
from mailwarden.checks.dmarc import DmarcArgs, author_domain, outcomes
from mailwarden.config import Outcome
from mailwarden.config.build import parse
from mailwarden.dkim.verify import SignatureResult
from mailwarden.dmarc.evaluate import DkimInput, DmarcResult, evaluate, non_existent
from mailwarden.dmarc.orgdomain import TemporaryError
from mailwarden.findings import ArcFinding, DkimFinding, SpfFinding, SpfIdentity
from mailwarden.headers import unfold
from mailwarden.policy.engine import CONTINUE, Engine
from mailwarden.results import Result
from mailwarden.transaction import CheckResult, Transaction

from fakedns import TEMPERROR, FakeDNS

HOST = {"A": ["192.0.2.10"]}


def zone(records: dict[str, str], **names: Any) -> dict[str, Any]:
    """_dmarc TXT records for `records`, plus other names (keyword: dots as '__')."""
    result: dict[str, Any] = {f"_dmarc.{domain}": {"TXT": [text]}
                              for domain, text in records.items()}
    result["example.com"] = HOST
    for key, entry in names.items():
        result[key.replace("__", ".")] = entry
    return result


def run_eval(records: dict[str, str], author: str = "example.com", *, spf: str = "",
             spf_result: str = "pass", dkim: tuple[DkimInput, ...] = (), mode: str = "rfc9989",
             extra: dict[str, Any] | None = None) -> tuple[DmarcResult, FakeDNS]:
    dns = FakeDNS({**zone(records), **(extra or {})})
    result = evaluate(dns, author, spf_domain=spf, spf_result=Result(spf_result),
                      dkim=list(dkim), mode=mode)
    return result, dns


def sig(domain: str, result: str = "pass", selector: str = "s1") -> DkimInput:
    return DkimInput(domain, selector, Result(result))


REJECT = {"example.com": "v=DMARC1; p=reject"}


# -- pass ------------------------------------------------------------------------------------
def test_pass_by_aligned_spf_only() -> None:
    result, _ = run_eval(REJECT, spf="bounce.example.com")
    assert result.result == "pass"
    assert (result.spf_aligned, result.dkim_aligned) == (True, False)
    assert result.reason == "aligned SPF pass"
    assert result.disposition == "none"
    assert (result.policy_domain, result.policy_tag) == ("example.com", "p")
    assert result.record is not None and result.record.p == "reject"


def test_pass_by_aligned_dkim_only() -> None:
    result, _ = run_eval(REJECT, spf="evil.example.net", dkim=(sig("example.com"),))
    assert result.result == "pass"
    assert (result.spf_aligned, result.dkim_aligned) == (False, True)
    assert result.aligned_dkim_domain == "example.com"
    assert result.reason == "aligned DKIM pass"


def test_pass_by_both() -> None:
    result, _ = run_eval(REJECT, spf="example.com", dkim=(sig("mail.example.com"),))
    assert result.result == "pass"
    assert result.spf_aligned and result.dkim_aligned
    assert result.aligned_dkim_domain == "mail.example.com"


def test_any_aligned_dkim_signature_is_enough() -> None:
    result, _ = run_eval(REJECT, spf_result="fail", spf="example.com",
                         dkim=(sig("esp.example.net"), sig("example.com", "fail"),
                               sig("news.example.com")))
    assert result.result == "pass"
    assert result.aligned_dkim_domain == "news.example.com"


@pytest.mark.parametrize("spf_result", ["fail", "softfail", "neutral", "none", "permerror"])
def test_aligned_spf_that_did_not_pass_does_not_count(spf_result: str) -> None:
    result, _ = run_eval(REJECT, spf="example.com", spf_result=spf_result)
    assert result.result == "fail"
    assert not result.spf_aligned


@pytest.mark.parametrize("dkim_result", ["fail", "neutral", "permerror", "policy"])
def test_aligned_dkim_that_did_not_pass_does_not_count(dkim_result: str) -> None:
    result, _ = run_eval(REJECT, spf="", dkim=(sig("example.com", dkim_result),))
    assert result.result == "fail"
    assert not result.dkim_aligned and result.aligned_dkim_domain == ""


# An aligned identifier whose check failed temporarily might still pass: no final result, so
# temperror (a 4xx or a delivery with dmarc=temperror), never the policy's rejection.
@pytest.mark.parametrize("domain", ["example.com", "mail.example.com"])
def test_aligned_dkim_temperror_is_temperror_not_fail(domain: str) -> None:
    result, _ = run_eval(REJECT, spf="esp.example.net",
                         dkim=(sig("esp.example.net"), sig(domain, "temperror")))
    assert result.result == "temperror"
    assert result.reason == (f"DKIM verification for d={domain} failed temporarily: "
                             "no final result yet")
    assert result.disposition == "none" and result.record is not None


def test_aligned_spf_temperror_is_temperror_not_fail() -> None:
    result, _ = run_eval(REJECT, spf="bounce.example.com", spf_result="temperror")
    assert result.result == "temperror"
    assert result.reason.startswith("SPF for bounce.example.com failed temporarily")


def test_strict_alignment_temperror_of_a_subdomain_is_still_a_fail() -> None:
    result, _ = run_eval({"example.com": "v=DMARC1; p=reject; adkim=s; aspf=s"},
                         spf="bounce.example.com", spf_result="temperror",
                         dkim=(sig("mail.example.com", "temperror"),))
    assert result.result == "fail" and result.disposition == "reject"


def test_unaligned_temperror_does_not_hold_up_the_verdict() -> None:
    result, _ = run_eval(REJECT, spf="esp.example.net", spf_result="temperror",
                         dkim=(sig("esp.example.net", "temperror"),))
    assert result.result == "fail" and result.disposition == "reject"


def test_an_aligned_pass_wins_over_an_aligned_temperror() -> None:
    result, _ = run_eval(REJECT, spf="example.com", spf_result="temperror",
                         dkim=(sig("example.com", "temperror"), sig("example.com", "pass", "s2")))
    assert result.result == "pass"


def test_dkim_pass_from_an_unaligned_domain_does_not_count() -> None:
    result, _ = run_eval(REJECT, spf="", dkim=(sig("mailer.example.net"),
                                               sig("examplecom.example.org")))
    assert result.result == "fail"
    assert not result.dkim_aligned


def test_spf_pass_from_an_unaligned_domain_does_not_count() -> None:
    result, _ = run_eval(REJECT, spf="bounces.example.net")
    assert result.result == "fail"
    assert not result.spf_aligned


def test_empty_spf_domain_never_aligns() -> None:
    result, _ = run_eval(REJECT, spf="", spf_result="pass")
    assert result.result == "fail"


# -- fail: the policy asked for --------------------------------------------------------------
@pytest.mark.parametrize("policy", ["reject", "quarantine", "none"])
def test_fail_disposition_is_the_p_policy(policy: str) -> None:
    result, _ = run_eval({"example.com": f"v=DMARC1; p={policy}"}, spf="other.example.net")
    assert result.result == "fail"
    assert result.policy_tag == "p"
    assert result.disposition == policy
    assert result.reason == f"no aligned SPF or DKIM pass; p={policy}"


def test_sp_applies_to_an_existing_subdomain() -> None:
    result, dns = run_eval({"example.com": "v=DMARC1; p=none; sp=reject; np=quarantine"},
                           "sub.example.com", spf="x.example.net",
                           extra={"sub.example.com": HOST})
    assert (result.result, result.policy_tag, result.disposition) == ("fail", "sp", "reject")
    assert result.policy_domain == "example.com"
    assert result.reason == "no aligned SPF or DKIM pass; sp=reject"
    assert dns.count("sub.example.com", "A") == 1


@pytest.mark.parametrize("entry", [{"A": ["192.0.2.1"]}, {"AAAA": ["2001:db8::1"]},
                                   {"MX": [(10, "mx.example.net")]}])
def test_a_subdomain_with_a_aaaa_or_mx_exists(entry: dict[str, Any]) -> None:
    result, _ = run_eval({"example.com": "v=DMARC1; p=none; sp=quarantine; np=reject"},
                         "sub.example.com", extra={"sub.example.com": entry})
    assert (result.policy_tag, result.disposition) == ("sp", "quarantine")


def test_np_applies_to_a_non_existent_subdomain() -> None:
    result, dns = run_eval({"example.com": "v=DMARC1; p=none; sp=quarantine; np=reject"},
                           "ghost.example.com", spf="x.example.net")
    assert (result.result, result.policy_tag, result.disposition) == ("fail", "np", "reject")
    assert result.reason == "no aligned SPF or DKIM pass; np=reject"
    # RFC 9989 §3.2.13: non-existent means NXDOMAIN; one A query tells.
    assert dns.count("ghost.example.com", "A") == 1
    assert dns.count("ghost.example.com", "MX") == 0


@pytest.mark.parametrize(("record", "tag", "policy"), [
    ("v=DMARC1; p=reject; sp=quarantine", "np", "quarantine"),  # np defaults to sp
    ("v=DMARC1; p=reject", "np", "reject"),  # ... and sp to p
    ("v=DMARC1; p=none; np=reject", "np", "reject"),
])
def test_np_defaults(record: str, tag: str, policy: str) -> None:
    result, _ = run_eval({"example.com": record}, "ghost.example.com")
    assert (result.policy_tag, result.disposition) == (tag, policy)


def test_sp_defaults_to_p_for_an_existing_subdomain() -> None:
    result, _ = run_eval({"example.com": "v=DMARC1; p=quarantine; np=reject"},
                         "sub.example.com", extra={"sub.example.com": HOST})
    assert (result.policy_tag, result.disposition) == ("sp", "quarantine")


def test_existence_is_not_checked_when_the_policy_is_the_authors_own() -> None:
    result, dns = run_eval({"sub.example.com": "v=DMARC1; p=quarantine; sp=reject; np=none"},
                           "sub.example.com")
    assert (result.policy_tag, result.disposition) == ("p", "quarantine")
    assert dns.count("sub.example.com", "A") == 0


def test_non_existent_helper() -> None:
    dns = FakeDNS({"a.example": {"A": ["192.0.2.1"]}, "txt.example": {"TXT": ["x"]},
                   "slow.example": {"A": TEMPERROR}})
    assert not non_existent(dns, "a.example")
    assert dns.queries == [("a.example", "A")]  # stops at the first answer
    assert non_existent(dns, "missing.example")
    with pytest.raises(TemporaryError):
        non_existent(dns, "slow.example")


def test_org_domain_fallback_by_the_tree_walk() -> None:
    result, dns = run_eval({"example.com": "v=DMARC1; p=reject; sp=quarantine"},
                           "a.b.mail.example.com", spf="bounce.example.com",
                           spf_result="fail", extra={"a.b.mail.example.com": HOST})
    assert (result.result, result.policy_domain) == ("fail", "example.com")
    assert (result.policy_tag, result.disposition) == ("sp", "quarantine")
    txt = [name for name, rdtype in dns.queries if rdtype == "TXT"]
    assert txt[:4] == ["_dmarc.a.b.mail.example.com", "_dmarc.b.mail.example.com",
                       "_dmarc.mail.example.com", "_dmarc.example.com"]


def test_relaxed_alignment_of_a_deep_subdomain_through_the_walk() -> None:
    result, _ = run_eval({"example.com": "v=DMARC1; p=reject"}, "a.b.mail.example.com",
                         spf="bounce.example.com", extra={"a.b.mail.example.com": HOST})
    assert result.result == "pass"


def test_public_suffix_domain_policy_and_alignment() -> None:
    records = {"example": "v=DMARC1; p=none; sp=reject; psd=y"}
    result, _ = run_eval(records, "brand.example", spf="other.example",
                         extra={"brand.example": HOST})
    assert (result.result, result.policy_domain) == ("fail", "example")
    assert (result.policy_tag, result.disposition) == ("sp", "reject")
    result, _ = run_eval(records, "brand.example", spf="mail.brand.example",
                         extra={"brand.example": HOST})
    assert result.result == "pass"


# -- strict and relaxed alignment ----------------------------------------------------------
@pytest.mark.parametrize(("aspf", "spf", "outcome"), [
    ("r", "bounce.example.com", "pass"),
    ("s", "bounce.example.com", "fail"),
    ("s", "example.com", "pass"),
    ("s", "EXAMPLE.COM.", "pass"),
    ("r", "example.net", "fail"),
])
def test_spf_alignment_modes(aspf: str, spf: str, outcome: str) -> None:
    result, _ = run_eval({"example.com": f"v=DMARC1; p=reject; aspf={aspf}"}, spf=spf)
    assert result.result == outcome


@pytest.mark.parametrize(("adkim", "domain", "outcome"), [
    ("r", "mail.example.com", "pass"),
    ("s", "mail.example.com", "fail"),
    ("s", "example.com", "pass"),
    ("s", "Example.Com", "pass"),
    ("r", "example.org", "fail"),
])
def test_dkim_alignment_modes(adkim: str, domain: str, outcome: str) -> None:
    result, _ = run_eval({"example.com": f"v=DMARC1; p=reject; adkim={adkim}"},
                         dkim=(sig(domain),))
    assert result.result == outcome


def test_alignment_modes_are_independent() -> None:
    records = {"example.com": "v=DMARC1; p=reject; aspf=s; adkim=r"}
    assert run_eval(records, spf="bounce.example.com")[0].result == "fail"
    assert run_eval(records, dkim=(sig("mail.example.com"),))[0].result == "pass"
    records = {"example.com": "v=DMARC1; p=reject; aspf=r; adkim=s"}
    assert run_eval(records, spf="bounce.example.com")[0].result == "pass"
    assert run_eval(records, dkim=(sig("mail.example.com"),))[0].result == "fail"


def test_strict_subdomain_author_with_org_domain_identifier_fails() -> None:
    result, _ = run_eval({"example.com": "v=DMARC1; p=reject; aspf=s; adkim=s"},
                         "news.example.com", spf="example.com", dkim=(sig("example.com"),),
                         extra={"news.example.com": HOST})
    assert result.result == "fail"


# -- t=y (§4.7: one level less strict) -----------------------------------------------------
@pytest.mark.parametrize(("policy", "disposition"), [("reject", "quarantine"),
                                                     ("quarantine", "none"), ("none", "none")])
def test_testing_mode_is_one_level_less_strict(policy: str, disposition: str) -> None:
    result, _ = run_eval({"example.com": f"v=DMARC1; p={policy}; t=y"})
    assert result.result == "fail"
    assert result.disposition == disposition
    assert result.reason == (f"no aligned SPF or DKIM pass; p={policy} "
                             f"(t=y: one level less strict)")


def test_testing_mode_softens_sp_and_np_too() -> None:
    records = {"example.com": "v=DMARC1; p=none; sp=reject; np=quarantine; t=y"}
    result, _ = run_eval(records, "sub.example.com", extra={"sub.example.com": HOST})
    assert (result.policy_tag, result.disposition) == ("sp", "quarantine")
    result, _ = run_eval(records, "ghost.example.com")
    assert (result.policy_tag, result.disposition) == ("np", "none")


def test_t_n_applies_the_policy_as_is() -> None:
    result, _ = run_eval({"example.com": "v=DMARC1; p=reject; t=n"})
    assert result.disposition == "reject"


# -- none, temperror ------------------------------------------------------------------------
def test_no_record_is_none() -> None:
    result, dns = run_eval({}, "mail.example.org", spf="mail.example.org")
    assert result.result == "none"
    assert result.reason == "no DMARC policy record"
    assert result.record is None and result.policy_domain == ""
    assert result.queries == dns.count(rdtype="TXT") == 3


def test_no_record_for_a_long_domain_takes_8_queries() -> None:
    author = ".".join(f"l{i}" for i in range(11)) + ".example.org"
    result, dns = run_eval({}, author)
    assert result.result == "none"
    assert result.queries == dns.count(rdtype="TXT") == 8


def test_temperror_on_the_policy_record() -> None:
    result, _ = run_eval({}, "example.com", spf="example.com",
                         extra={"_dmarc.example.com": TEMPERROR})
    assert result.result == "temperror"
    assert result.reason.startswith("DNS error: _dmarc.example.com")
    assert result.record is None


def test_temperror_on_a_parent_during_the_walk() -> None:
    result, _ = run_eval({}, "mail.example.com", extra={"_dmarc.example.com": {"TXT": TEMPERROR}})
    assert result.result == "temperror"


def test_temperror_during_the_existence_check() -> None:
    result, _ = run_eval({"example.com": "v=DMARC1; p=reject"}, "sub.example.com",
                         extra={"sub.example.com": {"A": TEMPERROR}})
    assert result.result == "temperror"


def test_temperror_during_relaxed_alignment() -> None:
    result, _ = run_eval({"example.com": "v=DMARC1; p=reject"}, spf="bounce.example.com",
                         extra={"_dmarc.bounce.example.com": TEMPERROR})
    assert result.result == "temperror"


def test_several_records_at_the_author_domain_fall_back_to_the_parent() -> None:
    dns = FakeDNS({"_dmarc.mail.example.com": {"TXT": ["v=DMARC1; p=none",
                                                       "v=DMARC1; p=reject"]},
                   "_dmarc.example.com": {"TXT": ["v=DMARC1; p=quarantine"]},
                   "mail.example.com": HOST})
    result = evaluate(dns, "mail.example.com", spf_domain="", spf_result=Result.NONE, dkim=[])
    assert (result.policy_domain, result.policy_tag, result.disposition) == (
        "example.com", "sp", "quarantine")


# -- details -------------------------------------------------------------------------------
def test_author_domain_is_normalized() -> None:
    result, _ = run_eval(REJECT, "Example.COM.", spf="example.com")
    assert result.result == "pass"
    assert result.author_domain == "example.com"


def test_record_warnings_are_passed_on() -> None:
    result, _ = run_eval({"example.com": "v=DMARC1; p=reject; pct=10"})
    assert result.warnings == ("pct= was removed by RFC 9989 and is ignored "
                               "(dmarc.mode: legacy honours it)",)
    assert result.disposition == "reject"  # pct= is ignored


def test_queries_are_counted() -> None:
    result, dns = run_eval(REJECT, "example.com", spf="bounce.example.com")
    assert result.queries == dns.count(rdtype="TXT")


def test_legacy_mode_uses_the_psl_organizational_domain() -> None:
    records = {"b.example.co.uk": "v=DMARC1; p=none", "example.co.uk": "v=DMARC1; p=reject"}
    result, _ = run_eval(records, "a.b.example.co.uk", spf="bounce.example.co.uk",
                         spf_result="fail", mode="legacy",
                         extra={"a.b.example.co.uk": HOST})
    assert (result.result, result.policy_domain, result.disposition) == (
        "fail", "example.co.uk", "reject")
    result, _ = run_eval(records, "a.b.example.co.uk", spf="bounce.example.co.uk",
                         mode="legacy", extra={"a.b.example.co.uk": HOST})
    assert result.result == "pass"


# -- legacy pct= (RFC 7489 §6.6.4): a refusal where the sender asked for less loses mail -------
@pytest.mark.parametrize(("record", "draw", "disposition"), [
    ("v=DMARC1; p=reject; pct=0", 0.0, "quarantine"),  # pct=0: never the policy itself
    ("v=DMARC1; p=reject; pct=50", 0.49, "reject"),  # sampled in
    ("v=DMARC1; p=reject; pct=50", 0.50, "quarantine"),  # sampled out
    ("v=DMARC1; p=quarantine; pct=10", 0.9, "none"),
    ("v=DMARC1; p=reject; pct=100", 0.999, "reject"),
    ("v=DMARC1; p=reject", 0.999, "reject"),
    ("v=DMARC1; p=reject; t=y", 0.999, "reject"),  # RFC 7489 has no t=
    ("v=DMARC1; p=reject; pct=abc", 0.999, "reject"),  # invalid: 100
])
def test_legacy_mode_samples_by_pct(record: str, draw: float, disposition: str) -> None:
    dns = FakeDNS(zone({"example.com": record}))
    result = evaluate(dns, "example.com", spf_domain="bounce.example.org",
                      spf_result=Result.PASS, dkim=[], mode="legacy", sample=lambda: draw)
    assert (result.result, result.disposition) == ("fail", disposition), result.reason


def test_rfc9989_mode_ignores_pct() -> None:
    dns = FakeDNS(zone({"example.com": "v=DMARC1; p=reject; pct=0"}))
    result = evaluate(dns, "example.com", spf_domain="bounce.example.org",
                      spf_result=Result.PASS, dkim=[], sample=lambda: 0.99)
    assert result.disposition == "reject"
    assert any("pct= was removed by RFC 9989" in w for w in result.warnings)


# ================================================================================================
# The `dmarc` check
# ================================================================================================
AUTHSERV = "mx.example.com"
CLIENT = "192.0.2.1"
OUTSIDE = "198.51.100.7"
BASE = f"authserv_id: {AUTHSERV}\ndomains: [example.org]\nhosts:\n  partners: [192.0.2.0/24]\n"

CHECK_ZONE: dict[str, Any] = {
    "_dmarc.example.com": {"TXT": ["v=DMARC1; p=reject; sp=quarantine; np=reject"]},
    "example.com": HOST,
    "news.example.com": HOST,
    "_dmarc.quarantine.example": {"TXT": ["v=DMARC1; p=quarantine"]},
    "_dmarc.none.example": {"TXT": ["v=DMARC1; p=none"]},
    "_dmarc.testing.example": {"TXT": ["v=DMARC1; p=reject; t=y"]},
    "_dmarc.slow.example": TEMPERROR,
}


def rule(**args: str) -> str:
    lines = "".join(f"      {key}: {value}\n" for key, value in args.items())
    return f"rules:\n  eom:\n    - name: dmarc\n      check: dmarc\n{lines}"


def make(**args: str) -> tuple[Engine, FakeDNS]:
    dns = FakeDNS(CHECK_ZONE)
    return Engine(parse(BASE + rule(**args)), dns), dns


def context() -> tuple[Context, FakeDNS]:
    engine, dns = make()
    return engine.ctx, dns


def message(*from_values: str, ip: str | None = CLIENT, spf: tuple[str, str] | None = None,
            dkim: tuple[str, str] | None = None,
            arc: tuple[str, tuple[str, ...]] | None = None) -> Transaction:
    """A transaction at end of message; spf and dkim are (domain, result)."""
    t = Transaction.for_client(ip, "client.example.net", 40000)
    t.helo = "client.example.net"
    t.new_message()
    t.mail_from = f"bounce@{spf[0]}" if spf else ""
    t.rcpts.append("rcpt@example.org")
    t.headers = [("Subject", " hello")] + [("From", f" {value}") for value in from_values]
    if spf is not None:
        t.findings.add(SpfFinding(SpfIdentity.MAILFROM, spf[0], Result(spf[1])))
    if dkim is not None:
        t.findings.add(DkimFinding((SignatureResult(Result(dkim[1]), "", domain=dkim[0],
                                                    selector="s1"),)))
    if arc is not None:
        t.findings.add(ArcFinding(Result(arc[0]), arc[1]))
    return t


def dmarc_result(t: Transaction) -> CheckResult:
    found = [r for r in t.results if r.method == "dmarc"]
    assert len(found) == 1
    return found[0]


# -- author_domain (§5.3.1, §4.4) ------------------------------------------------------------
@pytest.mark.parametrize(("values", "problem"), [
    ((), "no From header field"),
    (("a@example.com", "b@example.com"), "2 From header fields"),
    (("a@example.com, b@example.org",), "From names several domains (example.com, example.org)"),
    (("a@example.com, c@sub.example.com",),
     "From names several domains (example.com, sub.example.com)"),
    (("Undisclosed recipients:;",), "unparseable From 'Undisclosed recipients:;'"),
    (("a@b@example.com",), "unparseable From 'a@b@example.com'"),
    (("justaname",), "unparseable From address 'justaname'"),
    (("",), "no address in From"),
    (("root@localhost",), "unusable From domain 'localhost'"),
])
def test_author_domain_problems(values: tuple[str, ...], problem: str) -> None:
    t = Transaction()
    t.headers = [("From", value) for value in values]
    assert author_domain(t) == ("", problem)


@pytest.mark.parametrize(("value", "domain"), [
    ("a@example.com", "example.com"),
    ("Alice <alice@Example.COM>", "example.com"),
    ("<a@example.com.>", "example.com"),
    ('"bob@evil.example" <bob@example.com>', "example.com"),
    ("=?utf-8?q?J=C3=B6rg?= <j@example.com>", "example.com"),
    ("a@example.com, B <b@EXAMPLE.com>", "example.com"),  # several addresses, one domain
    ("a@example.com (comment)", "example.com"),
])
def test_author_domain(value: str, domain: str) -> None:
    t = Transaction()
    t.headers = [("Received", "x"), ("from", value)]
    assert author_domain(t) == (domain, "")


def test_author_domain_u_label_becomes_an_a_label() -> None:
    t = Transaction()
    t.headers = [("From", "a@Bücher.example")]
    assert author_domain(t) == ("xn--bcher-kva.example", "")


@pytest.mark.parametrize("values", [
    (), ("a@example.com", "b@example.com"), ("a@example.com, b@example.org",),
    ("not an address",), ("a@b@example.com",),
])
def test_run_unusable_from(values: tuple[str, ...]) -> None:
    ctx, dns = context()
    t = message(*values, spf=("example.com", "pass"))
    outcome = dmarc_check.run(ctx, t, DmarcArgs())
    assert outcome.decisive == "unusable_from"
    (result,) = outcome.results
    assert (result.method, result.result) == ("dmarc", "permerror")
    assert result.reason == author_domain(t)[1]
    assert outcome.text.startswith("Message refused: ")
    assert outcome.text.endswith("(RFC 9989 needs one author domain)")
    assert dns.queries == []


def test_run_same_domain_multiple_addresses_is_evaluated() -> None:
    ctx, _ = context()
    t = message("a@example.com, Bee <b@Example.com>", spf=("bounce.example.com", "pass"))
    outcome = dmarc_check.run(ctx, t, DmarcArgs())
    assert outcome.decisive == "pass"
    assert outcome.results[0].properties[0] == ("header.from", "example.com")


# -- run: decisive results -------------------------------------------------------------------
@pytest.mark.parametrize(("author", "decisive", "result", "comment"), [
    ("example.com", "reject", "fail", "p=reject dis=reject"),
    ("news.example.com", "quarantine", "fail", "sp=quarantine dis=quarantine"),
    ("ghost.example.com", "reject", "fail", "np=reject dis=reject"),
    ("quarantine.example", "quarantine", "fail", "p=quarantine dis=quarantine"),
    ("none.example", "fail", "fail", "p=none dis=none"),
    ("testing.example", "quarantine", "fail", "p=reject dis=quarantine"),
])
def test_run_decisive_results(author: str, decisive: str, result: str, comment: str) -> None:
    ctx, _ = context()
    outcome = dmarc_check.run(ctx, message(f"a@{author}", spf=("evil.example.net", "pass")),
                              DmarcArgs())
    assert outcome.decisive == decisive
    (ar,) = outcome.results
    assert (ar.method, ar.result, ar.comment) == ("dmarc", result, comment)
    if decisive == "reject":
        assert outcome.text.startswith(f"Unauthenticated mail from {author} is refused by its "
                                       "DMARC policy (no aligned SPF or DKIM pass;")
    elif decisive == "quarantine":
        assert outcome.text.startswith(f"DMARC quarantine: {author} (")
    else:
        assert outcome.text.startswith(f"DMARC fail for {author}: ")


def test_run_pass_by_spf() -> None:
    ctx, _ = context()
    outcome = dmarc_check.run(ctx, message("a@example.com", spf=("bounce.example.com", "pass")),
                              DmarcArgs())
    assert outcome.decisive == "pass"
    assert outcome.results[0].comment == "p=reject dis=none"
    assert outcome.text == "DMARC pass for example.com: aligned SPF pass"


def test_run_pass_by_dkim_from_the_transaction() -> None:
    ctx, _ = context()
    t = message("a@example.com", spf=("evil.example.net", "pass"),
                dkim=("mail.example.com", "pass"))
    assert dmarc_check.run(ctx, t, DmarcArgs()).decisive == "pass"


def test_run_unaligned_dkim_pass_fails() -> None:
    ctx, _ = context()
    t = message("a@example.com", dkim=("evil.example.net", "pass"))
    assert dmarc_check.run(ctx, t, DmarcArgs()).decisive == "reject"


def test_run_helo_spf_pass_does_not_count() -> None:
    ctx, _ = context()
    t = message("a@example.com")
    t.findings.add(SpfFinding(SpfIdentity.HELO, "example.com", Result.PASS))
    t.findings.add(SpfFinding(SpfIdentity.MAILFROM, "x.example", Result.NONE))
    assert dmarc_check.run(ctx, t, DmarcArgs()).decisive == "reject"


def test_without_a_dkim_verify_rule_the_engine_verifies_once_for_dmarc() -> None:
    """DMARC reads the pipeline's DKIM findings; with no dkim_verify rule the engine's own
    verification step provides them (a signature that passes makes DMARC pass)."""
    engine, _ = make()
    t = message("a@example.com", spf=("evil.example.net", "pass"))
    assert t.findings.dkim is None
    verdict, _ = engine.end_of_message(t)
    assert verdict.action == "reject"
    assert t.findings.dkim is not None and t.findings.dkim.signatures == ()


@pytest.mark.parametrize(("author", "result"), [("nobody.example", "none"),
                                                 ("slow.example", "temperror")])
def test_run_none_and_temperror(author: str, result: str) -> None:
    ctx, _ = context()
    outcome = dmarc_check.run(ctx, message(f"a@{author}"), DmarcArgs())
    assert outcome.decisive == result
    (ar,) = outcome.results
    assert ar.result == result
    assert ar.properties == (("header.from", author),)
    assert ar.comment is None


def test_run_authentication_results_properties() -> None:
    ctx, _ = context()
    outcome = dmarc_check.run(ctx, message("a@news.example.com"), DmarcArgs())
    (ar,) = outcome.results
    assert ar.properties == (("header.from", "news.example.com"), ("polrec.p", "reject"),
                             ("polrec.sp", "quarantine"), ("polrec.np", "reject"),
                             ("polrec.domain", "example.com"))
    assert ar.reason == "no aligned SPF or DKIM pass; sp=quarantine"


# -- outcomes --------------------------------------------------------------------------------
def test_outcomes_enforce() -> None:
    assert outcomes(DmarcArgs()) == {"reject": Outcome("reject"),
                                     "quarantine": Outcome("quarantine"),
                                     "unusable_from": Outcome("reject")}


def test_outcomes_monitor_only() -> None:
    assert dict(outcomes(DmarcArgs(enforce=False))) == {}


# -- overrides: never_reject, trusted_sealers -------------------------------------------------
@pytest.mark.parametrize("author", ["example.com", "quarantine.example"])
def test_never_reject_group_turns_a_refusal_into_fail(author: str) -> None:
    ctx, _ = context()
    outcome = dmarc_check.run(ctx, message(f"a@{author}", ip=CLIENT),
                              DmarcArgs(never_reject=("partners",)))
    assert outcome.decisive == "fail"
    (ar,) = outcome.results
    assert ar.result == "fail"
    assert ar.comment is not None and ar.comment.endswith("dis=none override=local_policy")
    # what the aggregate report will say: no name of ours (the group's is "partners")
    (finding,) = outcome.findings
    assert finding.overrides == (("local_policy", "the client is one of the receiver's own "
                                                  "hosts"),), finding.overrides


@pytest.mark.parametrize("from_values", [(), ("",), ("a@example.com", "b@example.com")])
def test_never_reject_covers_an_unusable_from(from_values: tuple[str, ...]) -> None:
    """cron and monitoring mail from our own hosts often has no From: never_reject keeps it
    from the 550 an unusable From gets from anyone else (issue 15 #2)."""
    ctx, _ = context()
    args = DmarcArgs(never_reject=("partners",))
    ours = dmarc_check.run(ctx, message(*from_values, ip=CLIENT), args)
    assert ours.decisive is Result.PERMERROR
    assert dmarc_check.outcomes(args).get(ours.decisive) is None  # continue
    theirs = dmarc_check.run(ctx, message(*from_values, ip="198.51.100.99"), args)
    assert theirs.decisive is Result.UNUSABLE_FROM


def test_never_reject_does_not_apply_outside_the_group() -> None:
    ctx, _ = context()
    outcome = dmarc_check.run(ctx, message("a@example.com", ip=OUTSIDE),
                              DmarcArgs(never_reject=("partners",)))
    assert outcome.decisive == "reject"
    assert "override" not in (outcome.results[0].comment or "")


def test_never_reject_without_client_address() -> None:
    ctx, _ = context()
    outcome = dmarc_check.run(ctx, message("a@example.com", ip=None),
                              DmarcArgs(never_reject=("partners",)))
    assert outcome.decisive == "reject"


def test_no_override_recorded_when_the_policy_asks_nothing() -> None:
    ctx, _ = context()
    outcome = dmarc_check.run(ctx, message("a@none.example", ip=CLIENT),
                              DmarcArgs(never_reject=("partners",)))
    assert outcome.decisive == "fail"
    assert outcome.results[0].comment == "p=none dis=none"


@pytest.mark.parametrize(("arc", "decisive"), [
    (("pass", ("sealer.example",)), "fail"),
    (("pass", ("first.example", "sealer.example")), "fail"),  # the latest sealer counts
    (("pass", ("sealer.example", "other.example")), "reject"),
    (("pass", ("other.example",)), "reject"),
    (("fail", ("sealer.example",)), "reject"),
    (("none", ()), "reject"),
    (("pass", ()), "reject"),
    (None, "reject"),
])
def test_trusted_sealers(arc: tuple[str, tuple[str, ...]] | None, decisive: str) -> None:
    ctx, _ = context()
    outcome = dmarc_check.run(ctx, message("a@example.com", ip=OUTSIDE, arc=arc),
                              DmarcArgs(trusted_sealers=("sealer.example",)))
    assert outcome.decisive == decisive
    (ar,) = outcome.results
    assert ar.result == "fail"
    if decisive == "fail":
        assert ar.comment == "p=reject dis=none override=local_policy"
    else:
        assert ar.comment == "p=reject dis=reject"


def test_trusted_sealer_comparison_ignores_case() -> None:
    ctx, _ = context()
    outcome = dmarc_check.run(ctx, message("a@example.com", ip=OUTSIDE,
                                           arc=("pass", ("Sealer.Example",))),
                              DmarcArgs(trusted_sealers=("sealer.example",)))
    assert outcome.decisive == "fail"


# -- through the engine ------------------------------------------------------------------------
def test_engine_rejects_550_5_7_1() -> None:
    engine, _ = make()
    verdict, edits = engine.end_of_message(message("a@example.com",
                                                   spf=("evil.example.net", "pass")))
    assert verdict.action == "reject"
    assert verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.status) == (550, "5.7.1")
    assert "example.com" in verdict.reply.text and "DMARC" in verdict.reply.text
    assert edits.insert == ()


def test_engine_quarantines() -> None:
    engine, _ = make()
    t = message("a@quarantine.example")
    verdict, edits = engine.end_of_message(t)
    assert verdict.action == "quarantine"
    assert t.quarantine is not None and t.quarantine.startswith("DMARC quarantine:")
    assert "dmarc=fail" in dict(edits.insert)["Authentication-Results"]


def test_engine_p_none_fail_continues_with_the_header() -> None:
    engine, _ = make()
    verdict, edits = engine.end_of_message(message("a@none.example"))
    assert verdict == CONTINUE
    ar = unfold(dict(edits.insert)["Authentication-Results"])
    assert "dmarc=fail" in ar
    assert "header.from=none.example" in ar
    assert "polrec.p=none" in ar and "polrec.domain=none.example" in ar


def test_engine_pass_header() -> None:
    engine, _ = make()
    t = message("a@example.com", spf=("bounce.example.com", "pass"))
    verdict, edits = engine.end_of_message(t)
    assert verdict == CONTINUE
    ar = unfold(dict(edits.insert)["Authentication-Results"])
    assert "dmarc=pass (p=reject dis=none) header.from=example.com" in ar


def test_engine_unusable_from_is_rejected() -> None:
    engine, _ = make()
    verdict, _ = engine.end_of_message(message("a@example.com", "b@example.com"))
    assert verdict.action == "reject"
    assert verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.status) == (550, "5.7.1")


def test_engine_monitor_only_never_refuses() -> None:
    engine, _ = make(enforce="false")
    for t in (message("a@example.com"), message("a@quarantine.example"),
              message("a@example.com", "b@example.com")):
        verdict, edits = engine.end_of_message(t)
        assert verdict == CONTINUE
        assert t.quarantine is None
        assert "dmarc=" in dict(edits.insert)["Authentication-Results"]


def test_engine_never_reject_group_from_config() -> None:
    engine, _ = make(never_reject="partners")
    verdict, edits = engine.end_of_message(message("a@example.com", ip=CLIENT))
    assert verdict == CONTINUE
    assert "override=local_policy" in dict(edits.insert)["Authentication-Results"]
    verdict, _ = engine.end_of_message(message("a@example.com", ip=OUTSIDE))
    assert verdict.action == "reject"


def test_engine_trusted_sealer_from_config() -> None:
    engine, _ = make(trusted_sealers="[Sealer.Example.]")
    t = message("a@example.com", ip=OUTSIDE, arc=("pass", ("sealer.example",)))
    verdict, edits = engine.end_of_message(t)
    assert verdict == CONTINUE
    assert "dmarc=fail (p=reject dis=none override=local_policy)" in unfold(dict(
        edits.insert)["Authentication-Results"])


def test_engine_temperror_continues_by_default_and_tempfails_when_asked() -> None:
    engine, _ = make()
    verdict, edits = engine.end_of_message(message("a@slow.example"))
    assert verdict == CONTINUE
    assert "dmarc=temperror" in dict(edits.insert)["Authentication-Results"]
    engine, _ = make(on="{temperror: reject}")
    verdict, _ = engine.end_of_message(message("a@slow.example"))
    assert verdict.action == "tempfail"
    assert verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.status) == (451, "4.7.1")


def test_legacy_pct_0_under_p_reject_quarantines_through_the_engine() -> None:
    """RFC 7489 §6.6.4 in dmarc.mode: legacy: pct=0 never applies p=reject itself, so the
    message is quarantined (delivered, held), not refused; A-R says which rules decided."""
    zone_ = dict(CHECK_ZONE)
    zone_["_dmarc.sampled.example"] = {"TXT": ["v=DMARC1; p=reject; pct=0"]}
    engine = Engine(parse(BASE + "dmarc:\n  mode: legacy\n" + rule()), FakeDNS(zone_))
    t = message("a@sampled.example", spf=("evil.example.net", "pass"))
    verdict, _ = engine.end_of_message(t)
    assert verdict.action == "quarantine", verdict
    assert dmarc_result(t).comment == "p=reject dis=quarantine mode=rfc7489 pct=0"
