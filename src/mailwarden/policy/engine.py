"""Rules per stage, in order; the first decisive verdict wins.

A rule in monitor mode (its own `mode:`, or the configuration's) runs and records everything,
but a refusal or quarantine it decides is only noted on the transaction (for the log line and
the metrics) and the rules go on; an `accept` refuses nothing and is applied in either mode.

A rule runs when its `when:` holds, maps its check's result to an action (its own `on:` first,
then the check's defaults, else continue), and refusals carry an SMTP reply. A DNS temporary
error is never turned into a permanent refusal. The engine knows nothing of the milter protocol.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mailwarden import metrics
from mailwarden.checks import CHECKS, CheckOutcome, CheckSpec, Context
from mailwarden.config import Condition, Config, Outcome, Reply, RuleConfig
from mailwarden.dns import DNSClient
from mailwarden.headers import AR, authentication_results, forged_indices
from mailwarden.policy import codes
from mailwarden.relay import HostGroup, Membership
from mailwarden.transaction import Monitored, Transaction

log = logging.getLogger("mailwarden.engine")

DECISIVE = ("accept", "tempfail", "reject", "quarantine", "discard")


@dataclass(frozen=True, slots=True)
class Verdict:
    action: str  # continue | accept | tempfail | reject | quarantine | discard
    reply: Reply | None = None
    rule: str = ""
    reason: str = ""

    @property
    def refuses(self) -> bool:
        return self.action in ("tempfail", "reject", "discard")

    def __str__(self) -> str:
        text = self.action
        if self.rule:
            text += f" by rule {self.rule!r}"
        if self.reply is not None:
            text += f' reply="{self.reply}"'
        elif self.reason:
            text += f' reason="{self.reason}"'
        return text


CONTINUE = Verdict("continue")


@dataclass(frozen=True, slots=True)
class HeaderEdits:
    """At end of message: Authentication-Results fields to delete (1-based positions among
    those fields) and fields to insert at the top, in top-to-bottom order."""

    delete: tuple[int, ...] = ()
    insert: tuple[tuple[str, str], ...] = ()


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
    def run_stage(self, stage: str, txn: Transaction, *, sealing: bool = False) -> Verdict:
        """Run the rules of `stage`; a refusal or an accept ends the stage. At eom the rules
        that must see our Authentication-Results (ARC sealing) run in a second pass."""
        if txn.accepted and not sealing:
            return CONTINUE
        for rule in self.config.stage_rules(stage):
            if CHECKS[rule.check].after_headers != sealing:
                continue
            holds = self._holds(rule.when, txn, stage)
            if holds is None:
                verdict = Verdict("tempfail", codes.DNS_TEMPERROR, rule.name,
                                  "a host group in when: could not be resolved")
            elif not holds:
                continue
            else:
                verdict = self._apply(rule, stage, txn)
            if verdict.action == "continue":
                continue
            if rule.mode == "monitor" and verdict.action != "accept":
                self._monitor(verdict, stage, txn)
                continue
            if verdict.action in ("accept", "quarantine"):
                txn.accepted = True
                if verdict.action == "quarantine":
                    txn.quarantine = verdict.reason
                if stage in ("connect", "helo"):
                    txn.connection_accepted = True
                    txn.connection_quarantine = txn.quarantine
            return verdict
        return CONTINUE

    def end_of_message(self, txn: Transaction) -> tuple[Verdict, HeaderEdits]:
        """The eom rules, then the header edits: forged Authentication-Results out, ours in."""
        verdict = self.run_stage("eom", txn)
        if verdict.refuses:
            return verdict, HeaderEdits()
        value = authentication_results(self.config.authserv_id, txn.results)
        txn.authentication_results = value
        signatures = list(txn.add_headers)
        txn.add_headers.clear()
        self.run_stage("eom", txn, sealing=True)
        insert = (*txn.add_headers, (AR, value), *signatures)
        delete = tuple(forged_indices(txn.headers, self.config.authserv_id))
        return verdict, HeaderEdits(delete, insert)

    def _monitor(self, verdict: Verdict, stage: str, txn: Transaction) -> None:
        """Monitor mode: the refusal (or quarantine) is noted for the log and the metrics,
        and the rules go on as if the check had said continue."""
        noted = Monitored(stage, verdict.action, verdict.rule,
                          str(verdict.reply) if verdict.reply is not None else "",
                          verdict.reason)
        txn.monitored.append(noted)
        if stage in ("connect", "helo"):
            txn.connection_monitored.append(noted)
        metrics.METRICS.monitored(verdict.action, verdict.rule)

    # -- one rule ----------------------------------------------------------------------------
    def _apply(self, rule: RuleConfig, stage: str, txn: Transaction) -> Verdict:
        spec = CHECKS[rule.check]
        started = time.perf_counter()
        try:
            outcome = spec.run(self.ctx, txn, rule.args)
        except Exception:
            # A bug must not lose mail: the message is tempfailed and the traceback logged.
            log.exception("check %s of rule %r failed", rule.check, rule.name)
            metrics.METRICS.error("check")
            return Verdict("tempfail", Reply(451, "4.3.0", "Internal error, try again later"),
                           rule.name, "internal error")
        recorder = metrics.METRICS
        recorder.check(rule.check, time.perf_counter() - started)
        for result in outcome.results:
            recorded = dataclasses.replace(result, rule=rule.name)
            txn.results.append(recorded)
            recorder.result(result.method, result.result)
            if stage in ("connect", "helo"):
                txn.connection_results.append(recorded)
        txn.add_headers.extend(outcome.headers)
        chosen = rule.on.get(outcome.decisive) or spec.outcomes(rule.args).get(outcome.decisive)
        chosen = chosen or Outcome("continue")
        action = chosen.action
        if outcome.decisive == "temperror" and action == "reject":
            action = "tempfail"  # a DNS temporary error never becomes a permanent rejection
        if action not in ("reject", "tempfail"):
            reason = f"{rule.check}={outcome.decisive}"
            if action == "quarantine":
                # sent to the MTA as the quarantine reason: one printable line
                reason = _printable(chosen.text or outcome.text or reason)
            return Verdict(action, None, rule.name, reason)
        return Verdict(action, _reply(spec, outcome, chosen, action), rule.name,
                       f"{rule.check}={outcome.decisive}")

    # -- when: -------------------------------------------------------------------------------
    def _holds(self, when: Condition | None, txn: Transaction, stage: str) -> bool | None:
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
            domains = txn.rcpt_domains[-1:] if stage == "rcpt" else txn.rcpt_domains
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


def _reply(spec: CheckSpec, outcome: CheckOutcome, chosen: Outcome, action: str) -> Reply:
    reply = codes.reply_for(spec.replies.get(outcome.decisive), chosen, action)
    return Reply(reply.code, reply.status,
                 codes.smtp_text(chosen.text or outcome.text or reply.text))


def describe(txn: Transaction, stage: str, verdict: Verdict) -> str:
    """The one log line for a transaction's decision."""
    rcpts = ",".join(f"<{r}>" for r in txn.rcpts[:10]) + ("..." if len(txn.rcpts) > 10 else "")
    results = " ".join(r.short() for r in txn.results)
    sender = "-" if txn.mail_from is None else f"<{txn.mail_from}>"
    parts = [
        f"queue_id={txn.queue_id or '-'}",
        f"client={txn.client}",
        f"helo={txn.helo or '-'}",
        f"from={sender}",
        f"rcpts={rcpts or '-'}",
        f"stage={stage}",
        f"results=[{results}]",
        f"verdict={verdict}",
    ]
    if txn.header_cut:
        parts.append("headers=over_limit")
    if txn.quarantine:
        parts.append(f'quarantine="{txn.quarantine}"')
    if txn.monitored:
        parts.append(f"monitor=[{'; '.join(str(m) for m in txn.monitored)}]")
    return " ".join(_printable(p) for p in parts)


def _printable(text: str) -> str:
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)
