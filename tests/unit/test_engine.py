"""The policy engine (`mailwarden.policy.engine`): rule order, `when:`, `on:`, the RFC 7372
default replies, accept/quarantine scope, end-of-message header edits and the log line — all
with configurations from `config.parse` and the in-memory DNS of fakedns.py."""

from __future__ import annotations

import re
from typing import Any

import pytest

from mailwarden.config import Config, Reply
from mailwarden.config.build import parse
from mailwarden.dns import Answer
from mailwarden.headers import unfold
from mailwarden.policy.engine import CONTINUE, Engine, Verdict, describe
from mailwarden.transaction import Transaction
from mailwarden.verdict import Action, Stage

from fakedns import FakeDNS

AUTHSERV = "mx.example.com"
BASE = f"authserv_id: {AUTHSERV}\ndomains: [example.com]\n"
CLIENT = "192.0.2.1"  # iprev pass: mail.example.net
LIAR = "192.0.2.2"  # iprev fail: its PTR name does not resolve back
NO_PTR = "192.0.2.3"  # iprev permerror
SLOW_PTR = "192.0.2.4"  # iprev temperror
OUTSIDE = "198.51.100.7"
CLIENT6 = "2001:db8::25"
HELO = "helo.example.net"

ZONE: dict[str, Any] = {
    "1.2.0.192.in-addr.arpa": {"PTR": ["mail.example.net"]},
    "mail.example.net": {"A": [CLIENT]},
    "2.2.0.192.in-addr.arpa": {"PTR": ["liar.example.net"]},
    "liar.example.net": {"A": ["203.0.113.9"]},
    "4.2.0.192.in-addr.arpa": "TEMPERROR",
    "relay.example.net": {"A": [CLIENT], "AAAA": [CLIENT6]},
    "slow.example.net": "TEMPERROR",
    "pass.example.org": {"TXT": ["v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 -all"]},
    "fail.example.org": {"TXT": ["v=spf1 -all"]},
    "soft.example.org": {"TXT": ["v=spf1 ~all"]},
    "neutral.example.org": {"TXT": ["v=spf1 ?all"]},
    "perm.example.org": {"TXT": ["v=spf1 ip4:300.1.1.1 -all"]},
    "temp.example.org": "TEMPERROR",
    "example.com": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},
}


def make(rules: str, extra: str = "", zone: dict[str, Any] | None = None) -> tuple[Engine, FakeDNS]:
    config = parse(BASE + extra + "rules:\n" + rules)
    dns = FakeDNS(ZONE if zone is None else zone)
    return Engine(config, dns), dns


def engine(rules: str, extra: str = "") -> Engine:
    return make(rules, extra)[0]


def txn(ip: str | None = CLIENT, mail_from: str | None = None, rcpts: tuple[str, ...] = (),
        auth: str = "", helo: str | None = HELO) -> Transaction:
    t = Transaction.for_client(ip, "client.example.net", 40000)
    t.helo = helo
    if auth:
        t.macros["{auth_authen}"] = auth
    t.new_message()
    if mail_from is not None:
        t.mail_from = mail_from
    t.rcpts.extend(rcpts)
    return t


def spf_rule(name: str = "spf", stage: str = "mail", **extra: str) -> str:
    lines = [f"  {stage}:\n", f"    - name: {name}\n", "      check: spf\n"]
    lines += [f"      {key}: {value}\n" for key, value in extra.items()]
    return "".join(lines)


def methods(t: Transaction) -> list[tuple[str, str, str]]:
    return [(r.rule, r.method, r.result) for r in t.results]


# -- order, continue ------------------------------------------------------------------------
def test_rules_run_in_order_and_first_decisive_verdict_wins() -> None:
    e = engine("""
  mail:
    - name: first
      check: spf
      on: {fail: tempfail}
    - name: second
      check: spf
""")
    t = txn(mail_from="u@fail.example.org")
    verdict = e.run_stage(Stage.MAIL, t)
    assert verdict.action == "tempfail"
    assert verdict.rule == "first"
    # the second rule never ran: only the first one's results are recorded
    assert {rule for rule, _, _ in methods(t)} == {"first"}


def test_accept_ends_the_stage_before_a_later_reject() -> None:
    e = engine("""
  mail:
    - name: known host
      check: iprev
      on: {pass: accept}
    - name: spf
      check: spf
""")
    t = txn(mail_from="u@fail.example.org")
    verdict = e.run_stage(Stage.MAIL, t)
    assert (verdict.action, verdict.rule) == ("accept", "known host")
    assert methods(t) == [("known host", "iprev", "pass")]


def test_continue_goes_on_to_the_next_rule() -> None:
    e = engine("""
  mail:
    - name: rdns
      check: iprev
      on: {fail: continue}
    - name: spf
      check: spf
""")
    t = txn(ip=LIAR, mail_from="u@fail.example.org")
    verdict = e.run_stage(Stage.MAIL, t)
    assert (verdict.action, verdict.rule) == ("reject", "spf")
    assert ("rdns", "iprev", "fail") in methods(t)
    assert ("spf", "spf", "fail") in methods(t)


def test_no_decisive_rule_gives_continue() -> None:
    e = engine(spf_rule())
    t = txn(mail_from="u@pass.example.org")
    assert e.run_stage(Stage.MAIL, t) == CONTINUE
    assert e.run_stage(Stage.RCPT, t) == CONTINUE  # a stage without rules


# -- when: ----------------------------------------------------------------------------------
GROUPS = """hosts:
  nets: [192.0.2.0/24, '2001:db8::/32']
  v6only: ['2001:db8::/32']
  names: [relay.example.net]
  slow: [slow.example.net]
"""


def when_rule(when: str, stage: str = "mail", check: str = "spf") -> str:
    return (f"  {stage}:\n    - name: guarded\n      check: {check}\n"
            f"      when: {when}\n")


@pytest.mark.parametrize(("group", "ip", "applies"), [
    ("nets", CLIENT, True),
    ("nets", OUTSIDE, False),
    ("nets", CLIENT6, True),
    ("nets", "::ffff:192.0.2.1", True),  # IPv4-mapped IPv6 client
    ("v6only", CLIENT, False),
    ("v6only", CLIENT6, True),
    ("names", CLIENT, True),
    ("names", CLIENT6, True),
    ("names", OUTSIDE, False),
    ("names", "2001:db8::99", False),
])
def test_when_client_in(group: str, ip: str, applies: bool) -> None:
    e, dns = make(when_rule(f"{{client_in: {group}}}"), GROUPS)
    t = txn(ip=ip, mail_from="u@fail.example.org")
    verdict = e.run_stage(Stage.MAIL, t)
    assert verdict.action == ("reject" if applies else "continue")
    if group == "names":
        rdtype = "AAAA" if ":" in ip and not ip.startswith("::ffff:") else "A"
        assert dns.count("relay.example.net", rdtype) >= 1


def test_when_client_in_without_a_client_address_does_not_hold() -> None:
    e = engine(when_rule("{client_in: nets}"), GROUPS)
    t = txn(ip=None, mail_from="u@fail.example.org")
    assert e.run_stage(Stage.MAIL, t) == CONTINUE


def test_when_client_in_any_of_several_groups() -> None:
    e = engine(when_rule("{client_in: [v6only, names]}"), GROUPS)
    verdict = e.run_stage(Stage.MAIL, txn(ip=CLIENT, mail_from="u@fail.example.org"))
    assert verdict.action is Action.REJECT


@pytest.mark.parametrize(("auth", "wanted", "applies"), [
    ("alice", "true", True), ("", "true", False), ("alice", "false", False), ("", "false", True),
])
def test_when_authenticated_reads_the_auth_authen_macro(auth: str, wanted: str,
                                                        applies: bool) -> None:
    e = engine(when_rule(f"{{authenticated: {wanted}}}"))
    t = txn(mail_from="u@fail.example.org", auth=auth)
    assert e.run_stage(Stage.MAIL, t).action == ("reject" if applies else "continue")


@pytest.mark.parametrize(("listed", "sender", "applies"), [
    ("[fail.example.org]", "u@fail.example.org", True),
    ("[example.org]", "u@fail.example.org", True),  # subdomain
    ("[example.org]", "u@FAIL.Example.ORG.", True),
    ("[ample.org]", "u@fail.example.org", False),  # not a label boundary
    ("[other.org]", "u@fail.example.org", False),
])
def test_when_sender_domain_in(listed: str, sender: str, applies: bool) -> None:
    e = engine(when_rule(f"{{sender_domain_in: {listed}}}"))
    t = txn(mail_from=sender)
    verdict = e.run_stage(Stage.MAIL, t)
    assert (verdict.action != "continue") is applies


def test_when_sender_domain_in_never_holds_for_the_null_reverse_path() -> None:
    # with MAIL FROM:<> SPF checks postmaster@HELO (RFC 7208 §2.4): here a fail
    assert engine(spf_rule()).run_stage(Stage.MAIL, txn(mail_from="", helo="fail.example.org")
                                        ).action == "reject"
    e = engine(when_rule("{sender_domain_in: [fail.example.org]}"))
    assert e.run_stage(Stage.MAIL, txn(mail_from="", helo="fail.example.org")) == CONTINUE


@pytest.mark.parametrize(("sender", "applies"), [
    ("u@example.com", True), ("u@sub.example.com", True), ("u@example.org", False),
])
def test_when_sender_domain_in_ours(sender: str, applies: bool) -> None:
    # mail_relay refuses any sender of ours from outside the allowed hosts
    e = engine(when_rule("{sender_domain_in: ours}", check="mail_relay"))
    verdict = e.run_stage(Stage.MAIL, txn(ip=OUTSIDE, mail_from=sender))
    assert verdict.action == ("reject" if applies else "continue")


def test_when_rcpt_domain_in_at_rcpt_looks_at_the_current_recipient_only() -> None:
    e = engine(when_rule("{rcpt_domain_in: [example.org]}", stage="rcpt"))
    t = txn(mail_from="u@fail.example.org", rcpts=("a@example.org",))
    assert e.run_stage(Stage.RCPT, t).action == "reject"
    t = txn(mail_from="u@fail.example.org", rcpts=("a@example.org", "b@example.net"))
    assert e.run_stage(Stage.RCPT, t) == CONTINUE  # the current one is b@example.net


def test_when_rcpt_domain_in_at_eom_looks_at_any_recipient() -> None:
    e = engine(when_rule("{rcpt_domain_in: [example.org]}", stage="eom"))
    t = txn(mail_from="u@fail.example.org", rcpts=("a@sub.example.org", "b@example.net"))
    verdict, _ = e.end_of_message(t)
    assert verdict.action == "reject"
    t = txn(mail_from="u@fail.example.org", rcpts=("b@example.net",))
    assert e.end_of_message(t)[0] == CONTINUE


def test_when_rcpt_domain_in_ours() -> None:
    e = engine(when_rule("{rcpt_domain_in: ours}", stage="rcpt"))
    assert e.run_stage(Stage.RCPT, txn(mail_from="u@fail.example.org",
                                   rcpts=("x@Mail.Example.com",))).action == "reject"


def test_when_not_negates() -> None:
    e = engine(when_rule("{not: {client_in: nets}}"), GROUPS)
    assert e.run_stage(Stage.MAIL, txn(ip=CLIENT, mail_from="u@fail.example.org")) == CONTINUE
    verdict = e.run_stage(Stage.MAIL, txn(ip=OUTSIDE, mail_from="u@fail.example.org"))
    assert verdict.action is Action.REJECT


def test_when_every_test_must_hold() -> None:
    e = engine(when_rule("{client_in: nets, authenticated: true}"), GROUPS)
    assert e.run_stage(Stage.MAIL, txn(mail_from="u@fail.example.org")) == CONTINUE
    verdict = e.run_stage(Stage.MAIL, txn(mail_from="u@fail.example.org", auth="bob"))
    assert verdict.action is Action.REJECT


@pytest.mark.parametrize("when", ["{client_in: slow}", "{not: {client_in: slow}}",
                                  "{client_in: [slow, v6only]}"])
def test_when_with_dns_temperror_in_a_host_group_tempfails_never_rejects(when: str) -> None:
    e = engine(when_rule(when), GROUPS)
    t = txn(mail_from="u@fail.example.org")
    verdict = e.run_stage(Stage.MAIL, t)
    assert verdict.action == "tempfail"
    assert verdict.reply == Reply(451, "4.4.3", "Temporary DNS failure, try again later")
    assert verdict.rule == "guarded"
    assert t.results == []  # the check itself did not run


def test_when_with_dns_temperror_but_another_group_matches_holds() -> None:
    e = engine(when_rule("{client_in: [slow, nets]}"), GROUPS)
    assert e.run_stage(Stage.MAIL, txn(mail_from="u@fail.example.org")).action == "reject"


def test_when_definitely_false_is_not_tempfailed_by_an_unresolvable_group() -> None:
    e = engine(when_rule("{client_in: slow, authenticated: true}"), GROUPS)
    assert e.run_stage(Stage.MAIL, txn(mail_from="u@fail.example.org")) == CONTINUE


# -- on: overrides -------------------------------------------------------------------------
def test_on_override_with_action_only_keeps_the_default_reply() -> None:
    e = engine(spf_rule(on="{softfail: reject}"))
    verdict = e.run_stage(Stage.MAIL, txn(mail_from="u@soft.example.org"))
    assert verdict.action == "reject"
    assert verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.status) == (550, "5.7.23")
    assert verdict.reply.text.startswith("SPF softfail")


def test_on_override_with_action_code_status_and_text() -> None:
    e = engine(spf_rule(on="{fail: {action: reject, code: 553, status: 5.7.26, "
                           "text: Go away}}"))
    verdict = e.run_stage(Stage.MAIL, txn(mail_from="u@fail.example.org"))
    assert verdict == Verdict("reject", Reply(553, "5.7.26", "Go away"), "spf", "spf=fail",
                             "spf")


def test_on_override_tempfail_turns_the_default_5xx_into_4xx() -> None:
    e = engine(spf_rule(on="{fail: tempfail}"))
    verdict = e.run_stage(Stage.MAIL, txn(mail_from="u@fail.example.org"))
    assert verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.status) == (451, "4.7.23")


def test_on_override_to_continue_silences_a_default_refusal() -> None:
    e = engine(spf_rule(on="{fail: continue}"))
    assert e.run_stage(Stage.MAIL, txn(mail_from="u@fail.example.org")) == CONTINUE


def test_on_reject_of_a_result_without_a_specific_reply_uses_the_generic_one() -> None:
    e = engine("  connect:\n    - name: r\n      check: iprev\n      on: {pass: reject}\n")
    verdict = e.run_stage(Stage.CONNECT, txn())
    assert verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.status) == (550, "5.7.1")


# -- default replies (RFC 7372 §3.2, RFC 3463) ---------------------------------------------
@pytest.mark.parametrize(("policy", "sender", "expected"), [
    ("soft", "u@fail.example.org", ("reject", 550, "5.7.23")),
    ("soft", "u@temp.example.org", ("tempfail", 451, "4.7.24")),
    ("soft", "u@soft.example.org", ("continue", None, None)),
    ("soft", "u@perm.example.org", ("continue", None, None)),
    ("soft", "u@neutral.example.org", ("continue", None, None)),
    ("soft", "u@nothing.example.org", ("continue", None, None)),
    ("soft", "u@pass.example.org", ("continue", None, None)),
    ("strict", "u@fail.example.org", ("reject", 550, "5.7.23")),
    ("strict", "u@soft.example.org", ("reject", 550, "5.7.23")),
    ("strict", "u@perm.example.org", ("reject", 550, "5.7.24")),
    ("strict", "u@temp.example.org", ("tempfail", 451, "4.7.24")),
    ("strict", "u@neutral.example.org", ("continue", None, None)),
])
def test_spf_default_verdicts_rfc7372(policy: str, sender: str,
                                      expected: tuple[str, int | None, str | None]) -> None:
    e = engine(spf_rule(policy=policy))
    verdict = e.run_stage(Stage.MAIL, txn(mail_from=sender))
    got = (verdict.action, verdict.reply.code if verdict.reply else None,
           verdict.reply.status if verdict.reply else None)
    assert got == expected


def test_spf_fail_reply_carries_the_explanation_rfc7208_8_4() -> None:
    e = engine(spf_rule())
    verdict = e.run_stage(Stage.MAIL, txn(mail_from="u@fail.example.org"))
    assert verdict.reply is not None
    assert verdict.reply.text == "SPF fail: 192.0.2.1 is not allowed to send mail for " \
                                 "fail.example.org"


def test_iprev_is_recorded_only_by_default() -> None:
    e = engine("  connect:\n    - name: r\n      check: iprev\n")
    t = txn(ip=LIAR)
    assert e.run_stage(Stage.CONNECT, t) == CONTINUE
    assert methods(t) == [("r", "iprev", "fail")]


@pytest.mark.parametrize("ip", [LIAR, NO_PTR])
def test_iprev_fail_with_on_reject_is_550_5_7_25_rfc7372(ip: str) -> None:
    e = engine("  connect:\n    - name: r\n      check: iprev\n"
               "      on: {fail: reject, permerror: reject}\n")
    verdict = e.run_stage(Stage.CONNECT, txn(ip=ip))
    assert verdict.action == "reject"
    assert verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.status) == (550, "5.7.25")


def test_relay_denied_is_554_5_7_1() -> None:
    e = engine("  rcpt:\n    - name: relay\n      check: rcpt_relay\n")
    t = txn(ip=OUTSIDE, mail_from="u@pass.example.org", rcpts=("x@elsewhere.net",))
    verdict = e.run_stage(Stage.RCPT, t)
    assert verdict.action == "reject"
    assert verdict.reply == Reply(554, "5.7.1", "<x@elsewhere.net>: Relay access denied")
    t = txn(ip=OUTSIDE, mail_from="u@pass.example.org", rcpts=("x@sub.example.com",))
    assert e.run_stage(Stage.RCPT, t) == CONTINUE


def test_relay_allowed_for_authenticated_and_allowed_hosts() -> None:
    e = engine("  rcpt:\n    - name: relay\n      check: rcpt_relay\n      allowed_hosts: nets\n",
               GROUPS)
    rcpts = ("x@elsewhere.net",)
    assert e.run_stage(Stage.RCPT, txn(ip=CLIENT, rcpts=rcpts)) == CONTINUE
    assert e.run_stage(Stage.RCPT, txn(ip=OUTSIDE, rcpts=rcpts, auth="bob")) == CONTINUE
    assert e.run_stage(Stage.RCPT, txn(ip=OUTSIDE, rcpts=rcpts)).action == "reject"


def test_relay_with_unresolvable_allowed_hosts_tempfails() -> None:
    e = engine("  rcpt:\n    - name: relay\n      check: rcpt_relay\n      allowed_hosts: slow\n",
               GROUPS)
    verdict = e.run_stage(Stage.RCPT, txn(ip=OUTSIDE, rcpts=("x@elsewhere.net",)))
    assert verdict.action == "tempfail"
    assert verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.status) == (451, "4.4.3")


def test_mail_relay_refuses_our_domain_from_outside_554_5_7_1() -> None:
    e = engine("  mail:\n    - name: spoof\n      check: mail_relay\n      allowed_hosts: nets\n",
               GROUPS)
    verdict = e.run_stage(Stage.MAIL, txn(ip=OUTSIDE, mail_from="ceo@example.com"))
    assert verdict.action == "reject"
    assert verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.status) == (554, "5.7.1")
    assert e.run_stage(Stage.MAIL, txn(ip=CLIENT, mail_from="ceo@example.com")) == CONTINUE


# -- a DNS temporary error is never a permanent refusal ------------------------------------
def test_reject_asked_for_spf_temperror_is_downgraded_to_tempfail() -> None:
    e = engine(spf_rule(on="{temperror: reject}"))
    verdict = e.run_stage(Stage.MAIL, txn(mail_from="u@temp.example.org"))
    assert verdict.action == "tempfail"
    assert verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.status) == (451, "4.7.24")


def test_reject_asked_for_iprev_temperror_is_downgraded_to_tempfail() -> None:
    e = engine("  connect:\n    - name: r\n      check: iprev\n      on: {temperror: reject}\n")
    verdict = e.run_stage(Stage.CONNECT, txn(ip=SLOW_PTR))
    assert verdict.action == "tempfail"
    assert verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.status) == (451, "4.7.25")


def test_reject_asked_for_relay_temperror_is_downgraded_to_tempfail() -> None:
    e = engine("  rcpt:\n    - name: relay\n      check: rcpt_relay\n      allowed_hosts: slow\n"
               "      on: {temperror: reject}\n", GROUPS)
    verdict = e.run_stage(Stage.RCPT, txn(ip=OUTSIDE, rcpts=("x@elsewhere.net",)))
    assert verdict.action == "tempfail"
    assert verdict.reply is not None and verdict.reply.code == 451


def test_downgraded_temperror_never_keeps_a_5xx_code() -> None:
    e = engine(spf_rule(on="{temperror: {action: reject, code: 550, status: 5.7.24}}"))
    verdict = e.run_stage(Stage.MAIL, txn(mail_from="u@temp.example.org"))
    assert verdict.action == "tempfail"
    assert verdict.reply is not None
    assert verdict.reply.code // 100 == 4
    assert verdict.reply.status.startswith("4.")


# -- accept and quarantine scope -----------------------------------------------------------
ACCEPT_AT_CONNECT = """
  connect:
    - name: trusted
      check: iprev
      on: {pass: accept}
  helo:
    - name: helo rdns
      check: iprev
      on: {pass: reject}
  mail:
    - name: spf
      check: spf
  rcpt:
    - name: relay
      check: rcpt_relay
"""


def test_accept_at_connect_skips_every_later_rule_of_every_message() -> None:
    e = engine(ACCEPT_AT_CONNECT)
    t = Transaction.for_client(CLIENT, "c")
    assert e.run_stage(Stage.CONNECT, t).action == "accept"
    t.helo = HELO
    assert e.run_stage(Stage.HELO, t) == CONTINUE
    for number in range(2):
        t.new_message()
        t.mail_from = "u@fail.example.org"
        assert e.run_stage(Stage.MAIL, t) == CONTINUE, number
        t.rcpts.append("x@elsewhere.net")
        assert e.run_stage(Stage.RCPT, t) == CONTINUE
        assert e.end_of_message(t)[0] == CONTINUE
    assert [r.method for r in t.results] == ["iprev"]  # only the connect-time result


def test_no_accept_at_connect_for_another_client() -> None:
    e = engine(ACCEPT_AT_CONNECT)
    t = Transaction.for_client(LIAR, "c")
    assert e.run_stage(Stage.CONNECT, t) == CONTINUE
    t.helo = HELO
    t.new_message()
    t.mail_from = "u@fail.example.org"
    assert e.run_stage(Stage.MAIL, t).action == "reject"


def test_accept_at_mail_skips_later_rules_of_that_message_only() -> None:
    e = engine("""
  mail:
    - name: partner
      check: iprev
      when: {sender_domain_in: [pass.example.org]}
      on: {pass: accept}
  rcpt:
    - name: relay
      check: rcpt_relay
""")
    t = Transaction.for_client(CLIENT, "c")
    t.helo = HELO
    t.new_message()
    t.mail_from = "u@pass.example.org"
    assert e.run_stage(Stage.MAIL, t).action == "accept"
    t.rcpts.append("x@elsewhere.net")
    assert e.run_stage(Stage.RCPT, t) == CONTINUE
    # the next message on the same connection gets every rule again
    t.new_message()
    t.mail_from = "u@pass.example.org"
    assert not t.accepted
    assert e.run_stage(Stage.MAIL, t).action == "accept"
    t.new_message()
    t.mail_from = "u@other.example.org"
    assert e.run_stage(Stage.MAIL, t) == CONTINUE
    t.rcpts.append("x@elsewhere.net")
    assert e.run_stage(Stage.RCPT, t).action == "reject"


def test_quarantine_records_the_reason_and_ends_the_message() -> None:
    e = engine("""
  mail:
    - name: hold
      check: spf
      on: {softfail: {action: quarantine, text: SPF softfail held}}
  rcpt:
    - name: relay
      check: rcpt_relay
""")
    t = txn(mail_from="u@soft.example.org")
    verdict = e.run_stage(Stage.MAIL, t)
    assert verdict.action == "quarantine"
    assert not verdict.refuses
    assert t.quarantine == "SPF softfail held"
    t.rcpts.append("x@elsewhere.net")
    assert e.run_stage(Stage.RCPT, t) == CONTINUE
    _, edits = e.end_of_message(t)
    assert t.quarantine == "SPF softfail held"
    assert edits.insert  # the message is delivered (to quarantine) with our headers
    t.new_message()
    assert t.quarantine is None


def test_quarantine_without_text_uses_the_check_text() -> None:
    e = engine(spf_rule(stage="eom", on="{fail: quarantine}"))
    t = txn(mail_from="u@fail.example.org")
    verdict, _ = e.end_of_message(t)
    assert verdict.action == "quarantine"
    assert t.quarantine is not None and t.quarantine.startswith("SPF fail")


def test_quarantine_at_connect_applies_to_the_connections_messages() -> None:
    e = engine("  connect:\n    - name: hold\n      check: iprev\n"
               "      on: {fail: quarantine}\n")
    t = Transaction.for_client(LIAR, "c")
    assert e.run_stage(Stage.CONNECT, t).action == "quarantine"
    t.helo = HELO
    t.new_message()
    t.mail_from = "u@pass.example.org"
    e.run_stage(Stage.MAIL, t)
    e.end_of_message(t)
    assert t.quarantine


# -- a check that raises ---------------------------------------------------------------------
class BrokenDNS(FakeDNS):
    def ptr(self, name: str, deadline: float | None = None) -> Answer[str]:
        raise RuntimeError("resolver bug")


def test_a_check_that_raises_gives_tempfail_451_4_3_0(caplog: pytest.LogCaptureFixture) -> None:
    config = parse(BASE + "rules:\n  connect:\n    - name: r\n      check: iprev\n"
                   "  mail:\n    - name: spf\n      check: spf\n")
    e = Engine(config, BrokenDNS(ZONE))
    t = txn()
    verdict = e.run_stage(Stage.CONNECT, t)
    assert verdict.action == "tempfail"
    assert verdict.reply == Reply(451, "4.3.0", "Internal error, try again later")
    assert verdict.rule == "r"
    assert "resolver bug" in caplog.text  # the traceback is logged


# -- end of message ------------------------------------------------------------------------
def full_message(header: str = "both") -> tuple[Engine, Transaction]:
    e = engine(f"""
  connect:
    - name: rdns
      check: iprev
  mail:
    - name: spf
      check: spf
      header: {header}
""")
    t = Transaction.for_client(CLIENT, "mail.example.net")
    e.run_stage(Stage.CONNECT, t)
    t.helo = HELO
    t.new_message()
    t.queue_id = "4ABC123"
    t.mail_from = "user@pass.example.org"
    assert e.run_stage(Stage.MAIL, t) == CONTINUE
    t.rcpts.append("rcpt@example.com")
    return e, t


def test_end_of_message_adds_one_authentication_results_rfc8601() -> None:
    e, t = full_message()
    verdict, edits = e.end_of_message(t)
    assert verdict == CONTINUE
    ar = [unfold(value) for name, value in edits.insert if name == "Authentication-Results"]
    assert len(ar) == 1
    assert edits.insert[0][0] == "Authentication-Results"  # ours goes on top
    assert ar[0] == (
        "mx.example.com; iprev=pass (mail.example.net) policy.iprev=192.0.2.1; "
        "spf=none smtp.helo=helo.example.net; spf=pass smtp.mailfrom=user@pass.example.org")


@pytest.mark.parametrize(("header", "received_spf", "spf_in_ar"), [
    ("both", True, True), ("spf", True, False), ("auth", False, True), ("none", False, False),
])
def test_received_spf_only_when_header_is_spf_or_both(header: str, received_spf: bool,
                                                       spf_in_ar: bool) -> None:
    e, t = full_message(header)
    _, edits = e.end_of_message(t)
    names = [name for name, _ in edits.insert]
    assert names.count("Received-SPF") == (1 if received_spf else 0)
    assert names.count("Authentication-Results") == 1
    ar = dict(edits.insert)["Authentication-Results"]
    assert ("spf=" in ar) is spf_in_ar
    if received_spf:
        value = dict(edits.insert)["Received-SPF"]
        assert value.startswith("pass ")
        assert "envelope-from=" in value and "client-ip=192.0.2.1;" in value


def test_end_of_message_without_reported_results_adds_no_field() -> None:
    """Outbound mail, or mail no check reported on: no empty "authserv-id; none" field."""
    e = engine("  rcpt:\n    - name: relay\n      check: rcpt_relay\n")
    t = txn(mail_from="u@example.org", rcpts=("x@example.com",))
    assert e.run_stage(Stage.RCPT, t) == CONTINUE
    assert t.results  # relay results are recorded for the log ...
    _, edits = e.end_of_message(t)
    assert edits.insert == ()  # ... not in Authentication-Results


def test_end_of_message_deletes_forged_authentication_results_rfc8601_5() -> None:
    e, t = full_message()
    t.headers = [
        ("Received", "from somewhere"),
        ("Authentication-Results", "other.example.net; spf=pass smtp.mailfrom=a@b.c"),
        ("Authentication-Results", "MX.Example.COM; spf=pass smtp.mailfrom=a@b.c"),
        ("Subject", "mx.example.com; hello"),
        ("authentication-results", "(forged) mx.example.com; dkim=pass"),
    ]
    _, edits = e.end_of_message(t)
    assert edits.delete == (2, 3)


def test_end_of_message_refusal_makes_no_header_edits() -> None:
    e = engine(spf_rule(stage="eom"))
    t = txn(mail_from="u@fail.example.org")
    t.headers = [("Authentication-Results", "mx.example.com; spf=pass")]
    verdict, edits = e.end_of_message(t)
    assert verdict.action == "reject"
    assert edits.delete == () and edits.insert == ()


# -- describe: the log line -----------------------------------------------------------------
def test_describe_is_one_line_with_everything() -> None:
    e, t = full_message()
    t.rcpts.append("second@example.com")
    verdict, _ = e.end_of_message(t)
    line = describe(t, "eom", verdict)
    assert "\n" not in line and "\r" not in line
    for part in ("queue_id=4ABC123", "client=mail.example.net[192.0.2.1]",
                 f"helo={HELO}", "from=<user@pass.example.org>",
                 "rcpts=<rcpt@example.com>,<second@example.com>", "stage=eom",
                 "iprev=pass", "spf=pass(user@pass.example.org)", "verdict=continue"):
        assert part in line


def test_describe_with_a_refusal_shows_rule_and_reply() -> None:
    e = engine(spf_rule())
    t = txn(mail_from="u@fail.example.org")
    verdict = e.run_stage(Stage.MAIL, t)
    line = describe(t, "mail", verdict)
    assert "verdict=reject rule=spf check=spf reply=\"550 5.7.23 SPF fail:" in line
    assert "queue_id=-" in line and "rcpts=-" in line


def test_describe_with_null_sender_and_no_mail_from() -> None:
    t = txn()
    assert "from=-" in describe(t, "connect", CONTINUE)
    t.mail_from = ""
    assert "from=<>" in describe(t, "mail", CONTINUE)


def test_describe_stays_one_printable_line_for_hostile_envelopes() -> None:
    e = engine("  rcpt:\n    - name: relay\n      check: rcpt_relay\n")
    t = Transaction.for_client(OUTSIDE, "evil\r\nX-Injected: 1")
    t.helo = "h\u00e9lo\r\n.example"
    t.new_message()
    t.queue_id = "Q\nID"
    t.mail_from = "a\r\nb@\u00fcnicode.example"
    t.rcpts.append("x\x00y\n@elsewhere.net")
    verdict = e.run_stage(Stage.RCPT, t)
    line = describe(t, "rcpt", verdict)
    assert re.fullmatch(r"[\x20-\x7e]+", line), line
    assert "queue_id=Q?ID" in line
    assert "verdict=reject" in line


def test_describe_lists_at_most_ten_recipients() -> None:
    t = txn(mail_from="a@b.example", rcpts=tuple(f"r{i}@example.com" for i in range(12)))
    line = describe(t, "rcpt", CONTINUE)
    assert "<r9@example.com>..." in line
    assert "r10@example.com" not in line


def test_describe_names_the_author_domain_and_message_id() -> None:
    """What admins search mail logs by (issue 15 #7): from_domain= and msgid=."""
    t = txn(mail_from="bounce@esp.example")
    assert "from_domain=" not in describe(t, "mail", CONTINUE)  # no header yet
    t.headers = [("From", ' "Alice" <alice@Example.COM>'), ("Message-ID", " <a b@x>")]
    line = describe(t, "eom", CONTINUE)
    assert 'from_domain=example.com msgid="<a b@x>" stage=eom' in line, line
    t.headers = [("Subject", " no author")]
    assert "from_domain=- msgid=- stage=eom" in describe(t, "eom", CONTINUE)


def test_describe_shows_quarantine() -> None:
    t = txn()
    t.quarantine = "held\r\nfor review"
    line = describe(t, "eom", Verdict(Action.QUARANTINE, None, "q", "held"))
    assert 'quarantine="held??for review"' in line


# -- reply texts are SMTP-safe ---------------------------------------------------------------
def test_reply_text_from_envelope_is_smtp_safe_and_percent_doubled() -> None:
    e = engine("  rcpt:\n    - name: relay\n      check: rcpt_relay\n")
    t = txn(ip=OUTSIDE, mail_from="a@b.example", rcpts=("100%s\r\nX: y\u00e9@elsewhere.net",))
    verdict = e.run_stage(Stage.RCPT, t)
    assert verdict.reply is not None
    text = verdict.reply.text
    assert re.fullmatch(r"[\x20-\x7e]+", text)
    assert "100%%s" in text
    assert re.search(r"(?<!%)%(?!%)", text.replace("%%", "")) is None  # no lone '%'


def test_configured_reply_text_percent_is_doubled_for_libmilter() -> None:
    e = engine(spf_rule(on="{fail: {action: reject, text: '100% refused'}}"))
    verdict = e.run_stage(Stage.MAIL, txn(mail_from="u@fail.example.org"))
    assert verdict.reply is not None
    assert verdict.reply.text == "100%% refused"


def test_long_reply_text_is_bounded() -> None:
    e = engine("  rcpt:\n    - name: relay\n      check: rcpt_relay\n")
    t = txn(ip=OUTSIDE, mail_from="a@b.example", rcpts=("x" * 2000 + "@elsewhere.net",))
    verdict = e.run_stage(Stage.RCPT, t)
    assert verdict.reply is not None
    assert len(verdict.reply.text) <= 400
    assert verdict.reply.text.endswith("...")


def test_verdict_refuses() -> None:
    assert Verdict(Action.REJECT).refuses and Verdict(Action.TEMPFAIL).refuses
    assert Verdict(Action.DISCARD).refuses
    assert not Verdict(Action.ACCEPT).refuses and not Verdict(Action.QUARANTINE).refuses
    assert not CONTINUE.refuses


def test_engine_builds_host_groups_from_the_config() -> None:
    config: Config = parse(BASE + GROUPS)
    e = Engine(config, FakeDNS())
    assert set(e.ctx.groups) == {"nets", "v6only", "names", "slow"}
    assert e.ctx.groups["names"].included.hostnames == ("relay.example.net",)


def test_client_without_a_verified_name_is_not_shown_twice() -> None:
    # Postfix passes "[198.51.100.7]" as the name of a client whose reverse DNS failed
    assert Transaction.for_client(OUTSIDE, f"[{OUTSIDE}]").client == f"unknown[{OUTSIDE}]"
    assert Transaction.for_client(OUTSIDE, "mx.example.net").client == \
        f"mx.example.net[{OUTSIDE}]"


def test_an_address_as_helo_name_is_not_checked_by_spf() -> None:
    """RFC 7208 §2.3: the HELO identity is checked only when it is a multi-label domain
    name; `198.51.100.150` is an address written as a name (no TLD is all-numeric)."""
    e, dns = make(spf_rule())
    t = txn(mail_from="u@pass.example.org", helo="198.51.100.150")
    e.run_stage(Stage.MAIL, t)
    assert [(r.method, r.properties[0][0]) for r in t.results] == [("spf", "smtp.mailfrom")]
    assert not any("198.51.100.150" in str(q) for q in dns.queries)
