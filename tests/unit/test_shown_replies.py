"""What `check-config` says a rule replies is what the engine sends (issue 15 #4): the check's
own words with their variable parts in capitals, read here as a pattern and matched against
the reply of a real refusal by the same configuration."""

from __future__ import annotations

import re

import pytest
from test_engine import BASE, OUTSIDE, ZONE, txn

from mailwarden.config.build import parse
from mailwarden.policy.describe import effective_policy
from mailwarden.policy.engine import Engine
from mailwarden.verdict import Stage

from fakedns import FakeDNS

RULES = """\
  connect:
    - {name: rdns, check: iprev, on: {fail: reject}}
  mail:
    - {name: spoofing, check: mail_relay}
    - {name: spf, check: spf}
  rcpt:
    - {name: relay, check: rcpt_relay}
"""
LIAR = "192.0.2.2"


def pattern(shown: str) -> re.Pattern[str]:
    """`reject 550 5.7.23 SPF fail: IP is not ...` -> a pattern for the reply's text."""
    reply = shown.split(" ", 1)[1]
    parts = re.split(r"\b(IP|DOMAIN|ADDR|CLIENT|RCPT|REASON)\b", reply)
    return re.compile("".join(".+" if i % 2 else re.escape(p) for i, p in enumerate(parts)))


@pytest.mark.parametrize(("stage", "rule", "result", "kwargs"), [
    (Stage.CONNECT, "rdns", "fail", {"ip": LIAR}),
    (Stage.MAIL, "spoofing", "fail", {"ip": OUTSIDE, "mail_from": "ceo@example.com"}),
    (Stage.MAIL, "spf", "fail", {"mail_from": "u@fail.example.org"}),
    (Stage.RCPT, "relay", "fail", {"ip": OUTSIDE, "mail_from": "a@b.example",
                                   "rcpts": ("x@elsewhere.example",)}),
])
def test_the_shown_reply_is_the_sent_reply(stage: Stage, rule: str, result: str,
                                           kwargs: dict[str, object]) -> None:
    config = parse(BASE + "rules:\n" + RULES)
    shown = next(r for r in effective_policy(config)["rules"][str(stage)]
                 if r["name"] == rule)["results"][result]
    t = txn(**kwargs)  # type: ignore[arg-type]
    verdict = Engine(config, FakeDNS(ZONE)).run_stage(stage, t)
    assert verdict.rule == rule and verdict.reply is not None, verdict
    assert shown.startswith(f"reject {verdict.reply.code} {verdict.reply.status} "), shown
    assert pattern(shown).fullmatch(f"{verdict.reply.code} {verdict.reply.status} "
                                    f"{verdict.reply.text}"), (shown, str(verdict.reply))


def test_a_rule_text_is_shown_as_given() -> None:
    config = parse(BASE + "rules:\n  mail:\n    - {name: spf, check: spf, on: {fail: "
                   "{action: reject, text: Go away}}}\n")
    rules = effective_policy(config)["rules"]["mail"]
    assert rules[0]["results"]["fail"] == "reject 550 5.7.23 Go away"
