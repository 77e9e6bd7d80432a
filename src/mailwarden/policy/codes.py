"""Default SMTP replies: RFC 7372 enhanced status codes for email authentication, RFC 3463 for
the rest. Every one can be overridden per rule (`on: {RESULT: {action, code, status, text}}`)."""

from __future__ import annotations

from mailwarden.config.model import Outcome
from mailwarden.results import Result
from mailwarden.verdict import Reply

SPF_FAIL = Reply(550, "5.7.23", "SPF validation failed")
SPF_TEMPERROR = Reply(451, "4.7.24", "SPF validation error, try again later")
SPF_PERMERROR = Reply(550, "5.7.24", "SPF validation error")
IPREV_FAIL = Reply(550, "5.7.25", "Reverse DNS validation failed")
IPREV_TEMPERROR = Reply(451, "4.7.25", "Reverse DNS validation error, try again later")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
SENDER_DENIED = Reply(554, "5.7.1", "Sender address not allowed from this host")
DNS_TEMPERROR = Reply(451, "4.4.3", "Temporary DNS failure, try again later")
# A bug in mailwarden: never a loss, the MTA tries again (RFC 3463 4.3.0, other mail system).
INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error, try again later")
# When a rule asks for reject/tempfail for a result that has no specific reply.
GENERIC_REJECT = Reply(550, "5.7.1", "Message refused by policy")
GENERIC_TEMPFAIL = Reply(451, "4.7.1", "Temporary policy failure, try again later")


def smtp_text(text: str, limit: int = 400) -> str:
    """Reply text safe for SMTP and libmilter: printable ASCII, no CR/LF, bounded, and '%'
    doubled because smfi_setreply() treats the text as a format string."""
    clean = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    if len(clean) > limit:
        clean = clean[: limit - 3] + "..."
    return clean.replace("%", "%%")


def reply_for(default: Reply | None, chosen: Outcome, action: str) -> Reply:
    """The reply for a reject or tempfail: the rule's code/status/text over the check's
    default, with the class forced to match the action (a tempfail is never a 5xx)."""
    if default is None:
        default = GENERIC_REJECT if action == "reject" else GENERIC_TEMPFAIL
    code = chosen.code or default.code
    status = chosen.status or default.status
    klass = 4 if action == "tempfail" else 5
    if code // 100 != klass:
        code = 451 if klass == 4 else 550
    if status[0] != str(klass):
        status = f"{klass}{status[1:]}"
    return Reply(code, status, chosen.text or default.text)


def reply_text(chosen: Outcome, result: Result, worded: str, default: Reply) -> str:
    """The rule's text, else the check's own words for the case, else the default. A
    temperror's own words name a DNS failure, which names our resolver: the client gets the
    fixed text (the log line keeps the cause)."""
    return chosen.text or ("" if result is Result.TEMPERROR else worded) or default.text
