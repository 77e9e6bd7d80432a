"""The stage API (`mailwarden.stage.Connection`) driven with plain values, as every transport
drives it: each stage returns an immutable Decision, and no milter packet is involved."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest

from mailwarden.config.build import parse
from mailwarden.policy.engine import Engine
from mailwarden.stage import INTERNAL_ERROR, Connection, Decision, Runtime
from mailwarden.verdict import Action, Reply, Stage

from fakedns import FakeDNS

AUTHSERV = "mx.example.com"
ZONE: dict[str, Any] = {
    "1.2.0.192.in-addr.arpa": {"PTR": ["good.example.net"]},
    "good.example.net": {"A": ["192.0.2.1"]},
    "2.2.0.192.in-addr.arpa": {"PTR": ["liar.example.net"]},
    "liar.example.net": {"A": ["203.0.113.9"]},
}
CONFIG = f"""\
authserv_id: {AUTHSERV}
domains: [ours.example]
hosts: {{internal: [10.0.0.0/8]}}
rules:
  connect:
    - {{name: iprev, check: iprev, on: {{fail: reject}}}}
  rcpt:
    - {{name: relay, check: rcpt_relay, allowed_hosts: internal}}
"""
FORGED = f" {AUTHSERV}; dmarc=pass header.from=bank.example"


def runtime(text: str = CONFIG) -> Runtime:
    config = parse(text)
    return Runtime.build(config, Engine(config, FakeDNS(ZONE)))


@pytest.fixture
def connection() -> Iterator[Connection]:
    conn = Connection(runtime())
    yield conn
    conn.close()


def test_every_stage_returns_an_immutable_decision(connection: Connection) -> None:
    decision = connection.connect("good.example.net", "192.0.2.1", 4000, {"j": AUTHSERV})
    assert decision == Decision(Action.CONTINUE, Stage.CONNECT)
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.action = Action.REJECT  # type: ignore[misc]
    assert connection.helo("good.example.net").action is Action.CONTINUE
    assert connection.mail("<alice@sender.example>", (), {"i": "Q1"}).action is Action.CONTINUE
    assert connection.rcpt("<bob@ours.example>").action is Action.CONTINUE


def test_a_refused_recipient_is_refused_alone(connection: Connection) -> None:
    connection.connect("good.example.net", "192.0.2.1")
    connection.helo("good.example.net")
    connection.mail("<alice@sender.example>")
    refused = connection.rcpt("<victim@elsewhere.example>")
    assert (refused.action, refused.stage, refused.rule) == (Action.REJECT, Stage.RCPT, "relay")
    assert refused.reply == Reply(554, "5.7.1", "<victim@elsewhere.example>: Relay access denied")
    assert connection.rcpt("<bob@ours.example>").action is Action.CONTINUE
    assert connection.txn.rcpts == ["bob@ours.example"]  # the refused one is gone


def test_a_refusal_decided_at_connect_is_given_at_helo(connection: Connection) -> None:
    assert connection.connect("liar.example.net", "192.0.2.2").action is Action.CONTINUE
    given = connection.helo("liar.example.net")
    assert (given.action, given.stage) == (Action.REJECT, Stage.CONNECT)
    assert given.reply is not None and given.reply.status == "5.7.25"


def test_end_of_message_carries_the_header_edits(connection: Connection) -> None:
    connection.connect("good.example.net", "192.0.2.1")
    connection.helo("good.example.net")
    connection.mail("<alice@sender.example>")
    connection.rcpt("<bob@ours.example>")
    connection.header("Authentication-Results", FORGED)
    connection.header("Subject", " hello")
    connection.end_of_headers()
    decision = connection.end_of_message({"i": "Q1"})
    assert decision.action is Action.CONTINUE and decision.stage is Stage.EOM
    assert decision.edits.delete == (1,)
    [(name, value)] = decision.edits.insert
    assert name == "Authentication-Results" and value.startswith(f"{AUTHSERV};")
    assert "iprev=pass" in value and "dmarc=pass" not in value
    assert decision.signing == () and decision.quarantine is None


def test_a_bug_in_a_stage_is_a_451_and_the_connection_goes_on(
        connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    connection.connect("good.example.net", "192.0.2.1")
    connection.helo("good.example.net")
    connection.mail("<alice@sender.example>")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a check blew up")

    monkeypatch.setattr(connection.engine, "end_of_message", broken)
    decision = connection.end_of_message()
    assert (decision.action, decision.reply) == (Action.TEMPFAIL, INTERNAL_ERROR)
    assert not connection.in_message
    monkeypatch.undo()
    assert connection.mail("<alice@sender.example>").action is Action.CONTINUE


def test_under_a_global_monitor_mode_a_bug_refuses_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    conn = Connection(runtime("mode: monitor\n" + CONFIG))
    try:
        conn.connect("good.example.net", "192.0.2.1")
        conn.mail("<alice@sender.example>")

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a check blew up")

        monkeypatch.setattr(conn.engine, "run_stage", broken)
        assert conn.rcpt("<bob@ours.example>").action is Action.CONTINUE
    finally:
        conn.close()
