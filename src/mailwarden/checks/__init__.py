"""The checks a rule can run. Each is a `CheckSpec`: where it may run, the results it gives,
how its arguments are read from the config, the verdict each result gets by default, and the
function that does the work (pure logic over the Transaction and the shared resolver)."""

from __future__ import annotations

from mailwarden.checks import arc, dkim, dmarc, iprev, relay, reports, spf
from mailwarden.checks.base import CheckOutcome, CheckSpec, Context

__all__ = ["CHECKS", "CheckOutcome", "CheckSpec", "Context"]

# Every check a rule can name, by that name.
CHECKS: dict[str, CheckSpec] = {spec.name: spec for spec in (
    spf.SPEC, relay.MAIL_RELAY, relay.RCPT_RELAY, iprev.SPEC, dkim.VERIFY, dkim.SIGN,
    arc.VERIFY, arc.SEAL, dmarc.SPEC, reports.SPEC)}
