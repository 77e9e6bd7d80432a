"""Warnings `check-config` gives about policies that do something else than they seem to.

`accept` means "let it through and skip every later rule": on a rule that can hold for
unauthenticated mail, mapping a result to `accept` ("this one is fine") skips the relay, SPF,
DKIM and DMARC checks after it for anybody who can produce that result -- an open relay for
senders without SPF, unverified mail for the rest. `continue` is what lets mail through and
keeps checking.
"""

from __future__ import annotations

from mailwarden.checks import CHECKS
from mailwarden.config import STAGES, Config, RuleConfig
from mailwarden.config.model import Condition
from mailwarden.verdict import Action


def _only_authenticated(when: Condition | None) -> bool:
    return when is not None and when.authenticated is True


def accept_traps(config: Config) -> list[str]:
    """One warning per rule whose `accept` can skip later checks for unauthenticated mail."""
    ordered = [(stage, rule) for stage in STAGES for rule in config.stage_rules(stage)
               if not CHECKS[rule.check].transform]
    warnings = []
    for index, (stage, rule) in enumerate(ordered):
        accepting = _accepting_results(rule)
        if not accepting or _only_authenticated(rule.when):
            continue
        skipped = [f"{later.name!r} ({later_stage})" for later_stage, later in ordered[index + 1:]]
        if not skipped:
            continue
        warnings.append(
            f"{config.path}:{rule.line}: rule {rule.name!r} ({stage}) accepts on "
            f"{', '.join(accepting)}, for unauthenticated mail too: that skips every later "
            f"check for it: {', '.join(skipped)}. To let such mail through and keep checking, "
            f"use `continue`; to skip them only for your own users, add "
            f"`when: {{authenticated: true}}`.")
    return warnings


def _accepting_results(rule: RuleConfig) -> list[str]:
    spec = CHECKS[rule.check]
    defaults = spec.outcomes(rule.args)
    found = []
    for result in spec.results:
        outcome = rule.on.get(result) or defaults.get(result)
        if outcome is not None and outcome.action is Action.ACCEPT:
            found.append(str(result))
    return found
