"""The vocabulary of decisions, shared by the configuration, the policy engine, the stage API
and the transports: the SMTP stages a rule can run at, enforce or monitor, the actions a verdict
can take, and SMTP replies."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: code, RFC 3463 enhanced status code and text."""

    code: int
    status: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"


class Stage(StrEnum):
    """Where in the SMTP transaction a rule runs, or a verdict falls."""

    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    EOM = "eom"
    ABORT = "abort"
    CLOSE = "close"


class Mode(StrEnum):
    """Whether a rule's refusals are applied (`enforce`) or only logged and counted."""

    ENFORCE = "enforce"
    MONITOR = "monitor"


class Action(StrEnum):
    """What a verdict does with the message (or recipient, or connection)."""

    CONTINUE = "continue"  # no decision: the next rule, the next stage
    ACCEPT = "accept"  # let it through: no later check runs (transformations still do)
    TEMPFAIL = "tempfail"  # 4xx
    REJECT = "reject"  # 5xx
    QUARANTINE = "quarantine"  # accept, and ask the MTA to hold it (Postfix: the hold queue)
    DISCARD = "discard"  # accept and drop

    @property
    def refuses(self) -> bool:
        return self in (Action.TEMPFAIL, Action.REJECT, Action.DISCARD)

    @property
    def decisive(self) -> bool:
        return self is not Action.CONTINUE


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one rule (or the first decisive rule of a stage) decided."""

    action: Action
    reply: Reply | None = None
    rule: str = ""
    reason: str = ""
    check: str = ""  # the deciding rule's check

    @property
    def refuses(self) -> bool:
        return self.action.refuses

    def __str__(self) -> str:
        text = str(self.action)
        if self.rule:
            text += f" by rule {self.rule!r}"
        if self.reply is not None:
            text += f' reply="{self.reply}"'
        elif self.reason:
            text += f' reason="{self.reason}"'
        return text


CONTINUE = Verdict(Action.CONTINUE)
