"""Relay checks.

`mail_relay`: a client outside `allowed_hosts` (and not authenticated, unless
`allow_authenticated: false`) may not use one of our own domains in MAIL FROM.
`rcpt_relay`: a client outside `allowed_hosts` and not authenticated may not send to a domain
that is not ours: no open relay.

A host group whose host names cannot be resolved just now gives `temperror` (a tempfail by
default), never a permanent refusal.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailwarden.checks.base import CheckOutcome, CheckSpec, Context
from mailwarden.config.model import Outcome
from mailwarden.policy import codes
from mailwarden.relay import Membership
from mailwarden.results import Result
from mailwarden.transaction import CheckResult, Transaction
from mailwarden.verdict import Action, Stage

if TYPE_CHECKING:
    from mailwarden.config.model import Config
    from mailwarden.config.reader import Section

RESULTS = (Result.PASS, Result.FAIL, Result.TEMPERROR)


@dataclass(frozen=True, slots=True)
class RelayArgs:
    allowed_hosts: tuple[str, ...] = ()
    allow_authenticated: bool = True


def parse_args(section: Section, config: Config) -> RelayArgs:
    groups = section.str_list("allowed_hosts")
    for group in groups:
        if group not in config.hosts:
            raise section.error("allowed_hosts", f"no host group named {group!r} in hosts:")
    return RelayArgs(groups, section.boolean("allow_authenticated", True))


def outcomes(args: RelayArgs) -> Mapping[Result, Outcome]:
    return {Result.FAIL: Outcome(Action.REJECT), Result.TEMPERROR: Outcome(Action.TEMPFAIL)}


def _outcome(method: str, result: Result, reason: str, prop: tuple[str, str], text: str
             ) -> CheckOutcome:
    record = CheckResult("", method, result, reason, (prop,), report=False)
    return CheckOutcome(result, (record,), text=text)


def _judge(method: str, ctx: Context, txn: Transaction, args: RelayArgs,
           prop: tuple[str, str], fail_reason: str, fail_text: str) -> CheckOutcome:
    """pass when the client is allowed (a host group, or authenticated), else fail; temperror
    when a host group could not be resolved."""
    allowed = ctx.client_in(txn, args.allowed_hosts, args.allow_authenticated)
    if allowed is Membership.IN:
        return _outcome(method, Result.PASS, "client is allowed", prop, "")
    if allowed is Membership.UNKNOWN:
        return _outcome(method, Result.TEMPERROR, "host group lookup failed", prop,
                        "Cannot verify the client just now, try again later")
    return _outcome(method, Result.FAIL, fail_reason, prop, fail_text)


def run_mail(ctx: Context, txn: Transaction, args: RelayArgs) -> CheckOutcome:
    sender = txn.mail_from or ""
    prop = ("smtp.mailfrom", sender or "<>")
    domain = txn.sender_domain
    if not domain or not ctx.config.is_our_domain(domain):
        return _outcome("mail_relay", Result.PASS, "sender domain is not ours", prop, "")
    return _judge("mail_relay", ctx, txn, args, prop, f"{txn.client} may not send as {domain}",
                  sender_denied(sender, txn.client))


def run_rcpt(ctx: Context, txn: Transaction, args: RelayArgs) -> CheckOutcome:
    rcpt = txn.rcpts[-1] if txn.rcpts else ""
    prop = ("smtp.rcptto", rcpt)
    domain = rcpt.rpartition("@")[2].lower().rstrip(".")
    if domain and ctx.config.is_our_domain(domain):
        return _outcome("rcpt_relay", Result.PASS, "recipient domain is ours", prop, "")
    return _judge("rcpt_relay", ctx, txn, args, prop,
                  f"relay to {domain or rcpt} denied for {txn.client}", relay_denied(rcpt))


def sender_denied(sender: str, client: str) -> str:
    return f"Sender address <{sender}> is not allowed from {client}"


def relay_denied(rcpt: str) -> str:
    return f"<{rcpt}>: Relay access denied"


MAIL_RELAY = CheckSpec(
    name="mail_relay", stages=(Stage.MAIL, Stage.RCPT, Stage.EOM), results=RESULTS,
    parse_args=parse_args, run=run_mail, outcomes=outcomes,
    replies={Result.FAIL: codes.SENDER_DENIED, Result.TEMPERROR: codes.DNS_TEMPERROR},
    worded={Result.FAIL: sender_denied("ADDR", "CLIENT")},
    macros={Stage.MAIL: ("{auth_authen}",)},
)
RCPT_RELAY = CheckSpec(
    name="rcpt_relay", stages=(Stage.RCPT,), results=RESULTS,
    parse_args=parse_args, run=run_rcpt, outcomes=outcomes,
    replies={Result.FAIL: codes.RELAY_DENIED, Result.TEMPERROR: codes.DNS_TEMPERROR},
    worded={Result.FAIL: relay_denied("RCPT")},
    macros={Stage.MAIL: ("{auth_authen}",)},
)
