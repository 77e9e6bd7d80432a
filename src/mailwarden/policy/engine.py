"""Rules per stage, in order; the first decisive verdict wins; then, at end of message, the
transformations.

A rule in monitor mode (its own `mode:`, or the configuration's) runs and records everything,
but a refusal or quarantine it decides is only noted on the transaction (for the log line and
the metrics) and the rules go on; an `accept` refuses nothing and is applied in either mode.

A rule runs when its `when:` holds, maps its check's result to an action (its own `on:` first,
then the check's defaults, else continue), and refusals carry an SMTP reply. A DNS temporary
error is never turned into a permanent refusal. An `accept` (or quarantine) ends the checks of
the message, never its transformations. The engine knows nothing of the milter protocol.

End of message is a pipeline: the verification checks (DKIM verified once, first, when a rule
needs its findings and no dkim_verify rule gave them), the verdict, then for every message not
refused: DKIM signing, the DMARC evaluations finished with the disposition actually applied
(Authentication-Results and the report store), our Authentication-Results, ARC sealing.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mailwarden import metrics
from mailwarden.checks import CHECKS, CheckOutcome, CheckSpec, Context
from mailwarden.checks import dkim as dkim_check
from mailwarden.checks import dmarc as dmarc_check
from mailwarden.config import Condition, Config, Outcome, Reply, RuleConfig
from mailwarden.dns import DNSClient
from mailwarden.findings import DmarcFinding, SigningFinding, SignStatus
from mailwarden.headers import AR, authentication_results, fold, forged_indices
from mailwarden.policy import codes
from mailwarden.policy.logline import describe
from mailwarden.relay import HostGroup, Membership
from mailwarden.results import Result
from mailwarden.textout import printable
from mailwarden.transaction import Monitored, Transaction
from mailwarden.verdict import CONTINUE, Action, Mode, Stage, Verdict

__all__ = ["CONTINUE", "Engine", "HeaderEdits", "Verdict", "describe"]

log = logging.getLogger("mailwarden.engine")

_UNRESOLVED = "a host group in when: could not be resolved"


@dataclass(frozen=True, slots=True)
class HeaderEdits:
    """At end of message: Authentication-Results fields to delete (1-based positions among
    those fields) and fields to insert at the top, in top-to-bottom order."""

    delete: tuple[int, ...] = ()
    insert: tuple[tuple[str, str], ...] = ()


def when_text(when: Condition | None) -> str:
    """A `when:` condition as the configuration writes it."""
    if when is None:
        return "{}"
    parts = []
    if when.client_in:
        parts.append(f"client_in: [{', '.join(when.client_in)}]")
    if when.authenticated is not None:
        parts.append(f"authenticated: {str(when.authenticated).lower()}")
    if when.sender_domain_in:
        parts.append(f"sender_domain_in: [{', '.join(when.sender_domain_in)}]")
    if when.rcpt_domain_in:
        parts.append(f"rcpt_domain_in: [{', '.join(when.rcpt_domain_in)}]")
    if when.negate is not None:
        parts.append(f"not: {when_text(when.negate)}")
    return "{" + ", ".join(parts) + "}"


def applied_disposition(verdict: Verdict, txn: Transaction) -> Result | None:
    """What was done with the message, in RFC 9990's words; None: tempfailed (it comes back)."""
    if verdict.action is Action.TEMPFAIL:
        return None
    if verdict.action in (Action.REJECT, Action.DISCARD):
        return Result.REJECT
    if verdict.action is Action.QUARANTINE or txn.quarantine:
        return Result.QUARANTINE
    return Result.NONE


# The fields we write whose folding is ours to choose (RFC 5322 §2.1.1). A DKIM-Signature keeps
# its signer's folding: under c=simple its header hash covers the exact lines.
_FOLDED = frozenset({AR, "Received-SPF", "ARC-Authentication-Results"})

@dataclass
class Engine:
    config: Config
    dns: DNSClient
    clock: Callable[[], float] = time.monotonic
    ctx: Context = field(init=False)

    def __post_init__(self) -> None:
        groups = {name: HostGroup.from_entries(name, entries)
                  for name, entries in self.config.hosts.items()}
        self.ctx = Context(self.config, self.dns, groups, self.clock)

    # -- stages ------------------------------------------------------------------------------
    def run_stage(self, stage: Stage, txn: Transaction) -> Verdict:
        """Run the checks of `stage`; a refusal or an accept ends the stage. After an accept
        (or quarantine) no check runs for this message."""
        if txn.accepted:
            if txn.explain:
                txn.skipped += [(str(stage), rule.name, "an earlier accept ended the checks")
                                for rule in self.config.stage_rules(stage)
                                if not CHECKS[rule.check].transform]
            return CONTINUE
        for rule in self.config.stage_rules(stage):
            if CHECKS[rule.check].transform:
                continue
            holds = self._holds(rule.when, txn, stage)
            if holds is None:
                verdict = Verdict(Action.TEMPFAIL, codes.DNS_TEMPERROR, rule.name, _UNRESOLVED,
                                  rule.check)
            elif not holds:
                if txn.explain:
                    txn.skipped.append((str(stage), rule.name,
                                        f"when: {when_text(rule.when)} does not hold"))
                continue
            else:
                verdict = self._apply(rule, stage, txn)
            if verdict.action is Action.CONTINUE:
                continue
            if rule.mode is Mode.MONITOR and verdict.action is not Action.ACCEPT:
                self._monitor(verdict, stage, txn)
                continue
            if verdict.action in (Action.ACCEPT, Action.QUARANTINE):
                txn.accepted = True
                if verdict.action is Action.QUARANTINE:
                    txn.quarantine = verdict.reason
                if stage in (Stage.CONNECT, Stage.HELO):
                    txn.connection_accepted = True
                    txn.connection_quarantine = txn.quarantine
            return verdict
        return CONTINUE

    def end_of_message(self, txn: Transaction) -> tuple[Verdict, HeaderEdits]:
        """The end-of-message pipeline: checks and verdict, then the transformations of every
        message not refused, and the header edits (forged Authentication-Results out, ours
        in)."""
        verdict = self.run_stage(Stage.EOM, txn)
        transforms = [] if verdict.refuses else self._transforms(txn)
        if transforms is None:
            verdict = Verdict(Action.TEMPFAIL, codes.DNS_TEMPERROR, "", _UNRESOLVED)
            transforms = []
        applied = applied_disposition(verdict, txn)
        for finding in txn.findings.dmarc:
            dmarc_check.finish(self.ctx, txn, finding, applied)
        if verdict.refuses:
            return verdict, HeaderEdits()
        below = list(txn.add_headers)  # Received-SPF, then the signatures
        for rule in transforms:
            if not CHECKS[rule.check].after_headers:
                below.extend(self._transform(rule, txn))
        value = authentication_results(self.config.authserv_id, txn.results)
        txn.authentication_results = value
        above: list[tuple[str, str]] = []
        sealing = False
        for rule in transforms:
            if CHECKS[rule.check].after_headers:
                above.extend(self._transform(rule, txn))
                sealing = True
        # No checks, no field: "authserv-id; none" (RFC 8601 §2.2) tells the next hop nothing
        # and would go out on every outbound message. An ARC seal needs ours all the same.
        ours = [(AR, value)] if sealing or any(r.report for r in txn.results) else []
        insert = tuple((name, fold(name, field) if name in _FOLDED else field)
                       for name, field in (*above, *ours, *below))
        delete = tuple(forged_indices(txn.headers, self.config.authserv_id))
        return verdict, HeaderEdits(delete, insert)

    def _transforms(self, txn: Transaction) -> list[RuleConfig] | None:
        """The transformation rules whose `when:` holds; None if one cannot be decided now."""
        chosen = []
        for rule in self.config.stage_rules(Stage.EOM):
            if not CHECKS[rule.check].transform:
                continue
            holds = self._holds(rule.when, txn, Stage.EOM)
            if holds is None:
                return None
            if holds:
                chosen.append(rule)
        return chosen

    def _monitor(self, verdict: Verdict, stage: Stage, txn: Transaction) -> None:
        """Monitor mode: the refusal (or quarantine) is noted for the log and the metrics,
        and the rules go on as if the check had said continue."""
        noted = Monitored(stage, verdict.action, verdict.rule,
                          str(verdict.reply) if verdict.reply is not None else "",
                          verdict.reason)
        txn.monitored.append(noted)
        if stage in (Stage.CONNECT, Stage.HELO):
            txn.connection_monitored.append(noted)
        metrics.METRICS.monitored(str(verdict.action), verdict.rule)

    # -- one rule ----------------------------------------------------------------------------
    def _run(self, rule: RuleConfig, stage: Stage, txn: Transaction) -> CheckOutcome | None:
        """Run the rule's check and file what it found; None when the check failed (a bug,
        logged with its traceback)."""
        spec = CHECKS[rule.check]
        started = time.perf_counter()
        try:
            if spec.needs_dkim and txn.findings.dkim is None:
                # the pipeline's verification step: once per message, whoever needs it
                txn.findings.dkim = dkim_check.verify(self.ctx, txn,
                                                      self.config.limits.dkim_signatures)
            outcome = spec.run(self.ctx, txn, rule.args)
        except Exception:
            log.exception("check %s of rule %r failed", rule.check, rule.name)
            metrics.METRICS.error("check")
            return None
        recorder = metrics.METRICS
        recorder.check(rule.check, time.perf_counter() - started)
        for result in outcome.results:
            recorded = dataclasses.replace(result, rule=rule.name)
            txn.results.append(recorded)
            recorder.result(result.method, result.result)
            if stage in (Stage.CONNECT, Stage.HELO):
                txn.connection_results.append(recorded)
        for finding in outcome.findings:
            if isinstance(finding, DmarcFinding | SigningFinding):
                finding = dataclasses.replace(finding, rule=rule.name)
            if isinstance(finding, SigningFinding):
                recorder.signing(finding.check, str(finding.status))
            txn.findings.add(finding)
        return outcome

    def _transform(self, rule: RuleConfig, txn: Transaction) -> tuple[tuple[str, str], ...]:
        """A signing or sealing rule: the fields it adds (none if it failed: the message
        still goes, unsigned, and the failure is logged)."""
        outcome = self._run(rule, Stage.EOM, txn)
        if outcome is None:
            txn.findings.add(SigningFinding(rule.name, rule.check, SignStatus.ERROR,
                                            reason="internal error"))
            return ()
        return outcome.headers

    def _apply(self, rule: RuleConfig, stage: Stage, txn: Transaction) -> Verdict:
        spec = CHECKS[rule.check]
        outcome = self._run(rule, stage, txn)
        if outcome is None:
            # A bug must not lose mail: the message is tempfailed and the traceback logged.
            return Verdict(Action.TEMPFAIL, codes.INTERNAL_ERROR, rule.name, "internal error",
                           rule.check)
        txn.add_headers.extend(outcome.headers)
        chosen = rule.on.get(outcome.decisive) or spec.outcomes(rule.args).get(outcome.decisive)
        chosen = chosen or Outcome(Action.CONTINUE)
        action = chosen.action
        if outcome.decisive is Result.TEMPERROR and action is Action.REJECT:
            action = Action.TEMPFAIL  # a DNS temporary error never becomes a permanent rejection
        if action not in (Action.REJECT, Action.TEMPFAIL):
            reason = f"{rule.check}={outcome.decisive}"
            if action is Action.QUARANTINE:
                # sent to the MTA as the quarantine reason: one printable line
                reason = printable(chosen.text or outcome.text or reason)
            return Verdict(action, None, rule.name, reason, rule.check)
        return Verdict(action, _reply(spec, outcome, chosen, action), rule.name,
                       f"{rule.check}={outcome.decisive}", rule.check)

    # -- when: -------------------------------------------------------------------------------
    def _holds(self, when: Condition | None, txn: Transaction, stage: Stage) -> bool | None:
        """True, False, or None when a host group could not be resolved just now."""
        if when is None:
            return True
        # The tests that need no DNS first: a group lookup failing must not matter when
        # the rule cannot apply anyway.
        if when.authenticated is not None and txn.authenticated != when.authenticated:
            return False
        if when.sender_domain_in and not self._domain_in(txn.sender_domain,
                                                         when.sender_domain_in):
            return False
        if when.rcpt_domain_in:
            domains = txn.rcpt_domains[-1:] if stage is Stage.RCPT else txn.rcpt_domains
            if not any(self._domain_in(d, when.rcpt_domain_in) for d in domains):
                return False
        if when.client_in:
            member = self.ctx.client_in(txn, when.client_in)
            if member is not Membership.IN:
                return None if member is Membership.UNKNOWN else False
        if when.negate is not None:
            inner = self._holds(when.negate, txn, stage)
            return None if inner is None else not inner
        return True

    def _domain_in(self, domain: str, listed: tuple[str, ...]) -> bool:
        """`domain` is listed, or a subdomain of one listed; `ours` means config `domains`."""
        if not domain:
            return False
        for entry in listed:
            if entry == "ours":
                if self.config.is_our_domain(domain):
                    return True
            elif domain == entry or domain.endswith("." + entry):
                return True
        return False


def _reply(spec: CheckSpec, outcome: CheckOutcome, chosen: Outcome, action: Action) -> Reply:
    """The reply a refusing rule sends (`codes.reply_text` chooses its text)."""
    reply = codes.reply_for(spec.replies.get(outcome.decisive), chosen, str(action))
    text = codes.reply_text(chosen, outcome.decisive, outcome.text, reply)
    return Reply(reply.code, reply.status, codes.smtp_text(text))
