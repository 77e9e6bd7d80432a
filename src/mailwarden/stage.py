"""The stage API: one `Connection` per MTA connection, one method per SMTP stage, each returning
an immutable `Decision`. It knows no transport: the libmilter callback class, our native
protocol server, `mailwarden test` and the unit tests all drive it with plain values (names,
addresses, macros, header fields, body chunks) and turn each Decision into what they speak.

It keeps the connection state, the message state (in a `Transaction`) and the typed findings
apart, runs the policy engine at each stage, logs one line per final decision and counts it.
Every stage is guarded: an exception is logged and the message is tempfailed (or, under a
global monitor mode, let through), never lost, and the process keeps serving.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from mailwarden import metrics
from mailwarden.checks import CHECKS
from mailwarden.config import STAGES, Config, Reply
from mailwarden.deadline import Deadline
from mailwarden.findings import SigningFinding
from mailwarden.headerbudget import HeaderBudget
from mailwarden.policy.codes import INTERNAL_ERROR
from mailwarden.policy.engine import Engine, HeaderEdits
from mailwarden.policy.logline import describe
from mailwarden.transaction import Monitored, Transaction
from mailwarden.verdict import Action, Mode, Stage, Verdict

log = logging.getLogger("mailwarden.milter")

# Macros we always want: the queue id, our host name, the client's address as the MTA saw it.
_BASE_MACROS = {Stage.CONNECT: ("j", "{daemon_name}", "{client_addr}"),
                Stage.MAIL: ("i", "{auth_authen}"), Stage.EOM: ("i",)}


@dataclass(frozen=True, slots=True)
class Plan:
    """What a transport negotiates with the MTA, derived once from the configuration: the
    stages whose reply can matter, whether the body is needed, and the macros per stage."""

    answers: frozenset[Stage]
    needs_body: bool
    macros: Mapping[Stage, tuple[str, ...]]
    message_macros: frozenset[str]  # those of one message, forgotten when the next starts

    @classmethod
    def for_config(cls, config: Config) -> Plan:
        with_rules = {stage for stage in STAGES if config.stage_rules(stage)}
        answers = {Stage.EOM}
        # connect cannot carry a reply (smfi_setreply is not allowed in xxfi_connect): a
        # refusal decided at connect is given at HELO, or at MAIL FROM.
        if with_rules & {Stage.CONNECT, Stage.HELO}:
            answers |= {Stage.HELO, Stage.MAIL}
        if Stage.MAIL in with_rules:
            answers.add(Stage.MAIL)
        if Stage.RCPT in with_rules:
            answers.add(Stage.RCPT)
        names: dict[Stage, set[str]] = {stage: set(found)
                                        for stage, found in _BASE_MACROS.items()}
        for rule in config.all_rules():
            for stage, found in CHECKS[rule.check].macros.items():
                names.setdefault(Stage(stage), set()).update(found)
        per_message = frozenset().union(*(names.get(stage, ()) for stage in
                                          (Stage.MAIL, Stage.RCPT, Stage.EOM)))
        needs_body = any(CHECKS[rule.check].needs_body for rule in config.all_rules())
        return cls(frozenset(answers), needs_body,
                   {stage: tuple(sorted(found)) for stage, found in names.items()},
                   per_message)


@dataclass(frozen=True)
class Runtime:
    """What every connection of one configuration shares."""

    config: Config
    engine: Engine
    plan: Plan

    @classmethod
    def build(cls, config: Config, engine: Engine) -> Runtime:
        return cls(config, engine, Plan.for_config(config))


class ConnectionCount:
    """Connections in progress in this process (a drain waits for zero)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0
        self.publish: Callable[[int], None] | None = None  # tells the other workers

    def add(self, delta: int) -> None:
        metrics.METRICS.connections(delta)
        with self._lock:
            self.value += delta
            if self.publish is not None:
                self.publish(self.value)


ACTIVE = ConnectionCount()


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one stage: the action (a refusal at RCPT refuses that recipient only),
    the SMTP reply of a refusal, and at end of message the header edits, the quarantine
    reason, and what signing did and monitor mode held back."""

    action: Action
    stage: Stage
    reply: Reply | None = None
    rule: str = ""
    reason: str = ""
    edits: HeaderEdits = field(default_factory=HeaderEdits)
    quarantine: str | None = None
    signing: tuple[SigningFinding, ...] = ()
    monitored: tuple[Monitored, ...] = ()

    @property
    def refuses(self) -> bool:
        return self.action.refuses


_CONTINUE = {stage: Decision(Action.CONTINUE, stage) for stage in Stage}


class Connection:
    """One MTA connection, stage by stage."""

    def __init__(self, runtime: Runtime, explain: bool = False) -> None:
        self.runtime = runtime
        self.explain = explain  # note why rules did not run (`mailwarden test`)
        self.engine = runtime.engine
        self.txn = Transaction()
        self.pending: Verdict | None = None  # a refusal decided where it could not be given
        self.in_message = False
        self.header_budget = HeaderBudget()
        self._closed = False
        ACTIVE.add(1)

    # -- the stages --------------------------------------------------------------------------
    def connect(self, hostname: str, address: str | None, port: int = 0,
                macros: Mapping[str, str] | None = None) -> Decision:
        """The client's name and address as the MTA saw them (address None: not an IP
        connection, then the {client_addr} macro is used)."""
        def run() -> Decision:
            deadline = self.txn.deadline
            self.txn = Transaction.for_client(address, hostname, port)
            self._macros(macros)
            if self.txn.client_ip is None and self.txn.macros.get("{client_addr}"):
                known = dict(self.txn.macros)
                self.txn = Transaction.for_client(known["{client_addr}"], hostname)
                self.txn.macros.update(known)
            self.txn.deadline, self.txn.explain = deadline, self.explain
            verdict = self.engine.run_stage(Stage.CONNECT, self.txn)
            if verdict.refuses:
                self.pending = verdict
            return _CONTINUE[Stage.CONNECT]
        return self._guard(Stage.CONNECT, run)

    def helo(self, name: str, macros: Mapping[str, str] | None = None) -> Decision:
        def run() -> Decision:
            self.txn.helo = name
            self._macros(macros)
            if self.pending is not None and Stage.HELO in self.runtime.plan.answers:
                return self._give_pending()
            verdict = self.engine.run_stage(Stage.HELO, self.txn)
            if verdict.refuses and Stage.HELO in self.runtime.plan.answers:
                return self._refuse(verdict, Stage.HELO)
            if verdict.refuses:
                self.pending = verdict
            return _CONTINUE[Stage.HELO]
        return self._guard(Stage.HELO, run)

    def mail(self, sender: str, args: Sequence[str] = (),
             macros: Mapping[str, str] | None = None) -> Decision:
        """MAIL FROM starts a message (the reverse-path with or without its angle brackets)."""
        def run() -> Decision:
            config = self.runtime.config
            self.txn.new_message()
            self.txn.spool_threshold = config.spool_threshold
            self.txn.spool_dir = config.spool_directory
            self.in_message = True
            self.header_budget = HeaderBudget()
            self.txn.mail_from = sender.strip().removeprefix("<").removesuffix(">")
            self.txn.mail_params = tuple(args)
            for stale in self.runtime.plan.message_macros:  # the previous message's values
                self.txn.macros.pop(stale, None)
            self._macros(macros)
            self.txn.queue_id = self.txn.macros.get("i", "")
            if self.pending is not None and Stage.MAIL in self.runtime.plan.answers:
                self.in_message = False
                return self._give_pending()
            verdict = self.engine.run_stage(Stage.MAIL, self.txn)
            if verdict.refuses:
                self.in_message = False
                return self._refuse(verdict, Stage.MAIL)
            return _CONTINUE[Stage.MAIL]
        return self._guard(Stage.MAIL, run)

    def rcpt(self, recipient: str, args: Sequence[str] = (),
             macros: Mapping[str, str] | None = None) -> Decision:
        """One RCPT TO; a refusal refuses this recipient only (the MTA drops it)."""
        def run() -> Decision:
            self.txn.rcpts.append(recipient.strip().removeprefix("<").removesuffix(">"))
            try:
                self._macros(macros)
                verdict = self.engine.run_stage(Stage.RCPT, self.txn)
            except Exception:
                self.txn.rcpts.pop()  # answered with a tempfail: the MTA drops it
                raise
            if verdict.refuses:
                decision = self._refuse(verdict, Stage.RCPT)
                if verdict.action is not Action.DISCARD:
                    self.txn.rcpts.pop()
                return decision
            return _CONTINUE[Stage.RCPT]
        return self._guard(Stage.RCPT, run, message_ends=False)

    def header(self, name: str, value: str) -> Decision:
        """One header field, its value as received (leading white space, folded lines)."""
        config = self.runtime.config
        kept = self.header_budget.take(name, value, config.limits, config.authserv_id)
        if kept is not None:
            self.txn.headers.append(kept)
        return _CONTINUE[Stage.EOM]

    def end_of_headers(self) -> Decision:
        return _CONTINUE[Stage.EOM]

    def body(self, chunk: bytes) -> Decision:
        """A piece of the body, with CRLF line ends as the MTA sends it."""
        self.txn.add_body(chunk)
        return _CONTINUE[Stage.EOM]

    def end_of_message(self, macros: Mapping[str, str] | None = None) -> Decision:
        """The verdict on the message, and its header edits when it is not refused."""
        def run() -> Decision:
            txn = self.txn
            self._macros(macros)
            txn.queue_id = txn.macros.get("i", txn.queue_id)
            if self.header_budget.over:
                txn.header_cut = self.header_budget.describe()
                log.info("queue_id=%s client=%s: %s", txn.queue_id or "-", txn.client,
                         txn.header_cut)
            self.in_message = False
            verdict, edits = self.engine.end_of_message(txn)
            if verdict.refuses:
                return self._refuse(verdict, Stage.EOM)
            if log.isEnabledFor(logging.INFO):  # the line is not built when nobody reads it
                log.info(describe(txn, Stage.EOM, verdict))
            applied = Action.QUARANTINE if txn.quarantine else verdict.action
            metrics.METRICS.transaction(str(applied), Stage.EOM)
            action = Action.ACCEPT if verdict.action is Action.ACCEPT else Action.CONTINUE
            return Decision(action, Stage.EOM, None, verdict.rule, verdict.reason, edits,
                            txn.quarantine, tuple(txn.findings.signing),
                            tuple(txn.monitored))
        return self._guard(Stage.EOM, run)

    def abort(self) -> Decision:
        """The MTA gave up on the message (RSET, a lost client, another milter's refusal)."""
        if self.in_message and log.isEnabledFor(logging.INFO):
            log.info(describe(self.txn, Stage.ABORT,
                              Verdict(Action.CONTINUE, reason="aborted by MTA")))
        self.in_message = False
        return _CONTINUE[Stage.ABORT]

    def close(self) -> None:
        """The connection is gone (or the MTA quit): a spooled body is removed now."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.in_message:
                log.warning(describe(self.txn, Stage.CLOSE, Verdict(
                    Action.CONTINUE, reason="connection closed in the middle of a message")))
        except Exception:
            log.exception("internal error at the end of a connection")
        finally:
            self.in_message = False
            self.txn.new_message()
            ACTIVE.add(-1)

    # -- helpers -----------------------------------------------------------------------------
    def _macros(self, macros: Mapping[str, str] | None) -> None:
        if macros:
            self.txn.macros.update(macros)

    def _guard(self, stage: Stage, run: Callable[[], Decision],
               message_ends: bool = True) -> Decision:
        self.txn.deadline = Deadline.within(self.runtime.config.stage_budget)
        self.txn.explain = self.explain
        try:
            return run()
        except Exception:
            log.exception("internal error at %s (client %s)", stage, self.txn.client)
            metrics.METRICS.error("session")
            if self.runtime.config.mode is Mode.MONITOR or stage is Stage.CONNECT:
                return _CONTINUE[stage]
            if message_ends and stage in (Stage.MAIL, Stage.EOM):
                self.in_message = False
            return Decision(Action.TEMPFAIL, stage, INTERNAL_ERROR, reason="internal error")

    def _refuse(self, verdict: Verdict, stage: Stage) -> Decision:
        metrics.METRICS.transaction(str(verdict.action), stage)
        if log.isEnabledFor(logging.INFO):
            log.info(describe(self.txn, stage, verdict))
        return Decision(verdict.action, stage, verdict.reply, verdict.rule, verdict.reason,
                        monitored=tuple(self.txn.monitored))

    def _give_pending(self) -> Decision:
        """A refusal decided at connect (or at a HELO that cannot answer), given now."""
        assert self.pending is not None
        verdict, self.pending = self.pending, None
        return self._refuse(verdict, Stage.CONNECT)
