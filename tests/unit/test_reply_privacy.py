"""What goes to the SMTP client names nothing internal (issue 15 #8): a temporary DNS failure
is answered with the check's own text, never with the resolver's error, which names the
resolver's address and port. The log line keeps the whole cause."""

from __future__ import annotations

import pytest

from mailwarden.config.build import parse
from mailwarden.dns import Resolver, parse_nameserver
from mailwarden.policy.engine import Engine
from mailwarden.policy.logline import describe
from mailwarden.transaction import Transaction
from mailwarden.verdict import Action, Stage

RESOLVER = "127.0.0.1:9"  # nothing listens: every lookup fails at once, naming this address


def engine(rules: str) -> Engine:
    config = parse(f"authserv_id: mx.example.net\n"
                   f"dns: {{nameservers: [\"{RESOLVER}\"], timeout: 0.2, lifetime: 0.4}}\n"
                   f"rules:\n{rules}")
    return Engine(config, Resolver([parse_nameserver(RESOLVER)], timeout=0.2, lifetime=0.4))


def message(mail_from: str = "alice@sender.example") -> Transaction:
    txn = Transaction.for_client("192.0.2.1", "client.example.org", 40000)
    txn.helo = "client.example.org"
    txn.new_message()
    txn.mail_from = mail_from
    txn.rcpts.append("bob@ours.example")
    txn.headers = [("From", " <alice@sender.example>"), ("Subject", " hi"),
                   ("DKIM-Signature", " v=1; a=rsa-sha256; d=sender.example; s=s1; h=from; "
                                      "bh=AAAA; b=AAAA")]
    txn.add_body(b"body\r\n")
    return txn


@pytest.mark.parametrize(("stage", "rules", "status"), [
    (Stage.MAIL, "  mail:\n    - {name: spf, check: spf}\n", "4.7.24"),
    (Stage.MAIL, "  mail:\n    - {name: iprev, check: iprev, on: {temperror: tempfail}}\n",
     "4.7.25"),
    (Stage.EOM, "  eom:\n    - {name: dkim, check: dkim_verify, on: {temperror: tempfail}}\n",
     "4.7.20"),
    (Stage.EOM, "  eom:\n    - {name: dmarc, check: dmarc, on: {temperror: tempfail}}\n",
     "4.7.1"),
])
def test_a_temporary_dns_failure_is_answered_without_the_resolvers_error(
        stage: Stage, rules: str, status: str) -> None:
    txn = message()
    verdict = engine(rules).run_stage(stage, txn)
    assert verdict.action is Action.TEMPFAIL, verdict
    assert verdict.reply is not None and verdict.reply.status == status
    assert "127.0.0.1" not in verdict.reply.text and "Connection" not in verdict.reply.text, \
        verdict.reply
    # the admin still sees why
    assert RESOLVER in describe(txn, stage, verdict) or \
        any(RESOLVER in r.reason for r in txn.results), [r.reason for r in txn.results]
