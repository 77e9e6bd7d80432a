"""Monitor mode: `mode: monitor` globally or per rule. Every check runs and records its
results; a refusal or quarantine is noted on the transaction (the log line, the metrics) and
never applied; `accept` is applied in either mode. Configurations through `config.parse`, DNS
from fakedns.py."""

from __future__ import annotations

import pytest

from mailwarden import metrics
from mailwarden.config import ConfigError
from mailwarden.config.build import parse
from mailwarden.policy.engine import Engine, describe
from mailwarden.transaction import Transaction
from mailwarden.verdict import Stage

from fakedns import FakeDNS

ZONE = {
    "fail.example.org": {"TXT": ["v=spf1 -all"]},
    "pass.example.org": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},
    "temp.example.org": "TEMPERROR",
}
BASE = "authserv_id: mx.example.com\ndomains: [example.com]\n"
RULES = """rules:
  mail:
    - name: spf
      check: spf
      header: auth
      {spf_mode}
    - name: relay
      check: mail_relay
      allowed_hosts: internal
hosts:
  internal: [10.0.0.0/8]
"""


class Recording(metrics.Recorder):
    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def monitored(self, verdict: str, rule: str) -> None:
        self.events.append(("monitored", verdict, rule))

    def result(self, method: str, result: str) -> None:
        self.events.append(("result", method, result))


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recording:
    rec = Recording()
    monkeypatch.setattr(metrics, "METRICS", rec)
    return rec


def build(global_mode: str = "", spf_mode: str = "") -> Engine:
    text = BASE + (f"mode: {global_mode}\n" if global_mode else "")
    text += RULES.format(spf_mode=f"mode: {spf_mode}" if spf_mode else "")
    return Engine(parse(text), FakeDNS(ZONE))


def message(sender: str, ip: str = "192.0.2.1") -> Transaction:
    txn = Transaction.for_client(ip, "client.example.net", 40000)
    txn.helo = "client.example.net"
    txn.new_message()
    txn.mail_from = sender
    return txn


def test_enforce_is_the_default_and_rejects() -> None:
    engine = build()
    assert engine.config.mode == "enforce"
    assert all(rule.mode == "enforce" for rule in engine.config.all_rules())
    txn = message("alice@fail.example.org")
    verdict = engine.run_stage(Stage.MAIL, txn)
    assert verdict.action == "reject" and verdict.reply is not None
    assert verdict.reply.code == 550 and verdict.reply.status == "5.7.23"
    assert txn.monitored == []


def test_global_monitor_notes_the_rejection_and_continues(recorder: Recording) -> None:
    engine = build(global_mode="monitor")
    txn = message("alice@fail.example.org")
    verdict = engine.run_stage(Stage.MAIL, txn)
    assert verdict.action == "continue"
    assert [(m.stage, m.action, m.rule) for m in txn.monitored] == [("mail", "reject", "spf")]
    assert txn.monitored[0].reply.startswith("550 5.7.23 ")
    # every check still ran and recorded its result
    recorded = [(r.rule, r.method, r.result) for r in txn.results]
    assert ("spf", "spf", "fail") in recorded  # MAIL FROM (the HELO identity: none)
    assert recorded[-1] == ("relay", "mail_relay", "pass")
    assert ("monitored", "reject", "spf") in recorder.events
    assert ("result", "spf", "fail") in recorder.events
    line = describe(txn, "eom", verdict)
    assert "verdict=continue" in line
    assert "monitor=\"reject by spf at mail: 550 5.7.23" in line


def test_monitor_never_tempfails_a_dns_error() -> None:
    engine = build(global_mode="monitor")
    txn = message("alice@temp.example.org")
    verdict = engine.run_stage(Stage.MAIL, txn)
    assert verdict.action == "continue"
    assert [(m.action, m.reply[:9]) for m in txn.monitored] == [("tempfail", "451 4.7.2")]


def test_per_rule_monitor_leaves_the_other_rules_enforcing() -> None:
    engine = build(spf_mode="monitor")
    spf, relay = engine.config.stage_rules("mail")
    assert (spf.mode, relay.mode) == ("monitor", "enforce")
    txn = message("alice@fail.example.org")
    assert engine.run_stage(Stage.MAIL, txn).action == "continue"
    assert [m.rule for m in txn.monitored] == ["spf"]
    # the enforcing relay rule still refuses someone outside claiming one of our domains
    spoof = message("ceo@example.com", ip="198.51.100.7")
    verdict = engine.run_stage(Stage.MAIL, spoof)
    assert verdict.action == "reject" and verdict.rule == "relay"


def test_a_rule_can_enforce_under_a_global_monitor() -> None:
    engine = build(global_mode="monitor", spf_mode="enforce")
    txn = message("alice@fail.example.org")
    assert engine.run_stage(Stage.MAIL, txn).action == "reject"


def test_accept_is_applied_in_monitor_mode() -> None:
    text = BASE + """mode: monitor
rules:
  mail:
    - name: trusted
      check: spf
      on: {pass: accept}
    - name: relay
      check: mail_relay
      allowed_hosts: internal
hosts:
  internal: [10.0.0.0/8]
"""
    engine = Engine(parse(text), FakeDNS(ZONE))
    txn = message("alice@pass.example.org")
    assert engine.run_stage(Stage.MAIL, txn).action == "accept"
    assert txn.accepted and txn.monitored == []


def test_monitored_quarantine_is_not_applied() -> None:
    text = BASE + """rules:
  mail:
    - name: spf
      check: spf
      mode: monitor
      on: {fail: {action: quarantine, text: "SPF fail"}}
"""
    engine = Engine(parse(text), FakeDNS(ZONE))
    txn = message("alice@fail.example.org")
    assert engine.run_stage(Stage.MAIL, txn).action == "continue"
    assert txn.quarantine is None and not txn.accepted
    assert [(m.action, m.reason) for m in txn.monitored] == [("quarantine", "SPF fail")]


def test_connection_stage_notes_last_for_every_message_of_the_connection() -> None:
    text = BASE + """mode: monitor
rules:
  connect:
    - name: rdns
      check: iprev
      on: {permerror: reject}
"""
    engine = Engine(parse(text), FakeDNS({}))
    txn = Transaction.for_client("192.0.2.9", "unknown", 1)
    assert engine.run_stage(Stage.CONNECT, txn).action == "continue"
    txn.new_message()
    txn.new_message()
    assert [(m.stage, m.action) for m in txn.monitored] == [("connect", "reject")]


@pytest.mark.parametrize("where, text", [
    ("mode", "mode: watch\n"),
    ("rules.mail[0].mode", "rules:\n  mail:\n    - {name: s, check: spf, mode: off}\n"),
])
def test_a_bad_mode_is_a_located_error(where: str, text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(BASE + text, "m.yaml")
    assert caught.value.key == where
    assert "must be one of enforce, monitor" in str(caught.value)
    assert caught.value.line > 0


@pytest.mark.parametrize("address, problem", [
    ("9894", "expected HOST:PORT"),
    ("127.0.0.1:0", "bad port"),
    ("::1:9894", "in brackets"),
    ("bad host!:9894", "bad host"),
])
def test_a_bad_metrics_address_is_a_located_error(address: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(BASE + f'metrics:\n  listen: "{address}"\n', "m.yaml")
    assert caught.value.key == "metrics.listen" and problem in str(caught.value)


@pytest.mark.parametrize("address, host", [("127.0.0.1:9894", "127.0.0.1"),
                                           ("[::1]:9894", "::1"),
                                           ("localhost:9894", "localhost")])
def test_metrics_addresses(address: str, host: str) -> None:
    assert parse(BASE + f'metrics:\n  listen: "{address}"\n').metrics_listen == address
    assert metrics.parse_address(address) == (host, 9894)
