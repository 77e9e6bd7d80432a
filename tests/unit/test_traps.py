"""check-config's warning about `accept` (issue 15 #3): a rule that accepts for mail that may
be unauthenticated skips every later check for it; the warning names the rules it skips."""

from __future__ import annotations

from mailwarden.config.build import parse
from mailwarden.policy.traps import accept_traps

BASE = """authserv_id: mx.example.net
hosts: {internal: [10.0.0.0/8]}
domains: [example.net]
rules:
  mail:
"""
LATER = """    - {name: relay, check: rcpt_relay, allowed_hosts: internal}
  eom:
    - {name: dkim, check: dkim_verify}
    - {name: dmarc, check: dmarc}
"""


def traps(first: str, later: str = LATER) -> list[str]:
    rcpt = "  rcpt:\n" if "rcpt_relay" in later else ""
    text = BASE + f"    - {first}\n" + rcpt + later
    return accept_traps(parse(text, "mailwarden.yaml"))


def test_accept_for_anybody_names_the_checks_it_skips() -> None:
    (warning,) = traps("{name: spf, check: spf, on: {pass: accept, none: accept}}")
    assert warning.startswith("mailwarden.yaml:6: rule 'spf' (mail) accepts on pass, none")
    assert "'relay' (rcpt), 'dkim' (eom), 'dmarc' (eom)" in warning
    assert "use `continue`" in warning


def test_accept_only_for_authenticated_users_is_no_trap() -> None:
    assert traps("{name: submission, check: mail_relay, allowed_hosts: internal, "
                 "on: {pass: accept}, when: {authenticated: true}}") == []


def test_continue_or_accept_of_the_last_check_is_no_trap() -> None:
    assert traps("{name: spf, check: spf, on: {pass: continue}}") == []
    assert traps("{name: spf, check: spf, on: {pass: accept}}", later="") == []
