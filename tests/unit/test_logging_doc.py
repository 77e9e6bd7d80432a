"""docs/logging.md against the code: its example lines are decision lines as the parser reads
them, its field table names every field the log line can carry and no other, and the
Fail2Ban filter it documents matches its example refusals as it says."""

from __future__ import annotations

import re
from pathlib import Path

from mailwarden.findings import SigningFinding, SignStatus
from mailwarden.logparse import fields
from mailwarden.policy.logline import describe
from mailwarden.results import Result
from mailwarden.transaction import CheckResult, Monitored, Transaction
from mailwarden.verdict import Action, Reply, Stage, Verdict

ROOT = Path(__file__).resolve().parents[2]
LOGGING = (ROOT / "docs" / "logging.md").read_text(encoding="utf-8")
FILTER = (ROOT / "conf" / "fail2ban" / "filter.d" / "mailwarden.conf").read_text()


def example_lines() -> list[str]:
    block = re.search(r"## The decision line\n\n```\n(.*?)```", LOGGING, re.DOTALL)
    assert block is not None
    return block.group(1).splitlines()


def documented_fields() -> set[str]:
    table = LOGGING.split("| Field | Present | Meaning |", 1)[1].split("\n\n", 1)[0]
    names: set[str] = set()
    for row in table.splitlines()[2:]:
        names |= set(re.findall(r"`([a-z_]+)`", row.split("|")[1]))
    return names


def every_field_lines() -> list[str]:
    t = Transaction.for_client("192.0.2.1", "mail.example.net")
    t.helo = "mail.example.net"
    t.new_message()
    t.queue_id = "4XyZ1"
    t.mail_from = "a@example.net"
    t.rcpts.append("b@example.com")
    t.headers = [("From", " a@example.net"), ("Message-ID", " <1@example.net>")]
    t.results.append(CheckResult("dmarc", "dmarc", Result.FAIL, "p=reject"))
    t.findings.add(SigningFinding("sign", "dkim_sign", SignStatus.SIGNED, "example.net", "s",
                                  "rsa-sha256"))
    t.findings.add(SigningFinding("sign", "dkim_sign", SignStatus.SIGNED, "example.net", "e",
                                  "ed25519-sha256"))
    t.findings.add(SigningFinding("seal", "arc_seal", SignStatus.NONE, reason="no key"))
    t.header_cut = "over"
    t.quarantine = "held"
    t.monitored.append(Monitored(Stage.MAIL, Action.REJECT, "spf", reply="550 5.7.23 no"))
    line = describe(t, "eom", Verdict(Action.REJECT, Reply(550, "5.7.1", "no"), "dmarc",
                                      "dmarc=fail", "dmarc"))
    t.results.append(CheckResult("reports", "dmarc_reports", Result.FAIL, "no usable report",
                                 report=False))
    return [line, describe(t, "abort", Verdict(Action.CONTINUE, reason="aborted"))]


def test_the_examples_are_decision_lines() -> None:
    lines = example_lines()
    assert len(lines) >= 4
    for line in lines:
        assert fields(line) is not None, line


def test_the_field_table_is_what_the_line_can_carry() -> None:
    emitted = {key for line in every_field_lines() for key in fields(line) or {}}
    in_examples = {key for line in example_lines() for key in fields(line) or {}}
    assert documented_fields() == emitted, (documented_fields() ^ emitted)
    assert in_examples <= emitted


def test_the_filter_matches_the_documented_refusals_it_says() -> None:
    """The filter's core (after Fail2Ban's own prefix): the relay refusal, not the SPF one,
    and the client address whatever an attacker puts in the other fields."""
    definition = FILTER.split("[Definition]", 1)[1]
    value = re.search(r"^_value = (.*)$", definition, re.M)
    checks = re.search(r"^checks = (.*)$", definition, re.M)
    core = re.search(r"\)s(\(\?:\(\?:DEBUG.*)$", definition, re.M)
    assert value and checks and core
    pattern = (core.group(1).replace("%(_value)s", value.group(1))
               .replace("%(checks)s", checks.group(1))
               .replace("<HOST>", r"(?P<host>[0-9a-fA-F.:]+)"))
    found = {}
    for line in example_lines():
        match = re.search(pattern, line)
        if match:
            found[fields(line)["check"]] = match.group("host")  # type: ignore[index]
    assert found == {"rcpt_relay": "203.0.113.5"}
    forged = ('queue_id=- client=unknown[192.0.2.8] helo="x verdict=reject rule=a '
              'check=rcpt_relay" from=<a@b> rcpts=- stage=mail results=- verdict=reject '
              'rule=spf check=spf reply="550 5.7.23 x"')
    assert re.search(pattern, forged) is None


def test_one_field_per_signing_check() -> None:
    signed = fields(every_field_lines()[0])
    assert signed is not None
    assert signed["dkim_sign"] == ("signed(d=example.net s=s a=rsa-sha256) "
                                   "signed(d=example.net s=e a=ed25519-sha256)")
    assert signed["arc_seal"] == "none(no key)"

