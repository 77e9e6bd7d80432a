"""The decision line's grammar (docs/logging.md): whatever the client sent, the line is one
line of printable ASCII whose fields parse back to what was logged, behind any of the
prefixes a log target puts in front of it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mailwarden.logparse import client_address, decisions, fields
from mailwarden.policy.logline import describe
from mailwarden.textout import printable
from mailwarden.transaction import Monitored, Transaction
from mailwarden.verdict import Action, Reply, Stage, Verdict

hostile = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)


def transaction(helo: str, sender: str, rcpt: str, msgid: str) -> Transaction:
    t = Transaction.for_client("192.0.2.7", "mail.example.net")
    t.helo = helo
    t.new_message()
    t.mail_from = sender
    t.rcpts.append(rcpt)
    t.headers = [("From", " a@example.org"), ("Message-ID", " " + msgid)]
    return t


@settings(max_examples=300, deadline=None)
@given(helo=hostile, sender=hostile, rcpt=hostile, msgid=hostile, reason=hostile)
def test_every_field_parses_back(helo: str, sender: str, rcpt: str, msgid: str,
                                 reason: str) -> None:
    t = transaction(helo, sender, rcpt, msgid)
    t.monitored.append(Monitored(Stage.MAIL, Action.REJECT, "spf", reply=f"550 5.7.23 {reason}"))
    verdict = Verdict(Action.REJECT, Reply(550, "5.7.1", f'no "{reason}"\\'), rule="dmarc")
    line = describe(t, "eom", verdict)
    assert line.isascii() and line.isprintable(), line
    for prefix in ("", "Dec  7 10:00:00 mx mailwarden[812]: ", "mailwarden[812]: INFO ",
                   "<6>"):
        parsed = fields(prefix + line + "\n")
        assert parsed is not None, line
        assert parsed["client"] == "mail.example.net[192.0.2.7]"
        assert parsed["helo"] == (printable(helo) or "-")
        assert parsed["from"] == printable(f"<{sender}>")
        assert parsed["rcpts"] == printable(f"<{rcpt}>")
        assert parsed["from_domain"] == "example.org"
        assert parsed["msgid"] == (printable(msgid.strip()) or "-")
        assert parsed["verdict"] == "reject" and parsed["rule"] == "dmarc"
        assert parsed["reply"] == printable(f'550 5.7.1 no "{reason}"\\')
        assert parsed["monitor"] == printable(f"reject by spf at mail: 550 5.7.23 {reason}")


def test_other_lines_are_not_decisions() -> None:
    lines = [
        "mailwarden[812]: INFO listening on unix:/run/mailwarden/milter.sock",
        "Dec  7 10:00:00 mx postfix/smtpd[99]: connect from unknown[192.0.2.1]",
        "mailwarden[812]: INFO queue_id=Q1 client=x[192.0.2.1]: header limit reached",
        'queue_id=Q1 client=x[192.0.2.1] stage=eom verdict=continue reply="open',
    ]
    assert list(decisions(iter(lines))) == []


def test_the_client_address_inside_postfix_notation() -> None:
    assert client_address("mail.example.net[192.0.2.1]") == "192.0.2.1"
    assert client_address("unknown[2001:db8::1]") == "2001:db8::1"
