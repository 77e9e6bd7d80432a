"""The milter adapter: protocol commands -> Transaction -> engine -> replies and header edits.

One `Session` per MTA connection, fed the decoded commands of `milterproto` by the server and
answering with reply packets; it does no I/O itself. Negotiation asks only for the stages and
macros the rules need and marks as no-reply every stage that never answers, so a message costs
the MTA as few round trips as possible. Every command is guarded: an exception is logged and the
message is tempfailed, never lost, and the process keeps serving.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from mailwarden import metrics
from mailwarden import milterproto as mp
from mailwarden.checks import CHECKS
from mailwarden.config import STAGES, Config, LimitsConfig
from mailwarden.headers import AR, authserv_id_of
from mailwarden.policy.engine import Engine, Verdict, describe
from mailwarden.transaction import Transaction
from mailwarden.verdict import Action

log = logging.getLogger("mailwarden.milter")

# An Authentication-Results field over the header limits is kept as no more than this much of
# its beginning: enough to read whose it is (RFC 8601 §5: ours are deleted, by position).
AR_HEAD = 1024
# From fields kept past the header limits: DMARC needs the author, and two tell it there are
# several (RFC 9989 §4.4).
FROM_OVER_LIMIT = 2

_MACRO_STAGE = {"connect": mp.M_CONNECT, "helo": mp.M_HELO, "mail": mp.M_ENVFROM,
                "rcpt": mp.M_ENVRCPT, "eom": mp.M_EOM}
# Macros we always want: the queue id, our host name, the client's address as the MTA saw it.
_BASE_MACROS = {"connect": ("j", "{daemon_name}", "{client_addr}"), "mail": ("i",),
                "eom": ("i",)}


@dataclass(frozen=True, slots=True)
class Plan:
    """What to negotiate, derived once from the configuration."""

    protocol: int  # SMFIP_* flags to ask for: P_NO* (don't send that stage), P_NR_* (no reply)
    macros: dict[str, tuple[str, ...]]
    message_macros: frozenset[str]  # those of one message, forgotten when the next starts

    @classmethod
    def for_config(cls, config: Config) -> Plan:
        stages_with_rules = {stage for stage in STAGES if config.stage_rules(stage)}
        # connect: replies cannot be set there (smfi_setreply is not allowed in xxfi_connect),
        # so a refusal decided at connect is given at HELO, or at MAIL FROM.
        answers_helo = bool(stages_with_rules & {"connect", "helo"})
        needs_body = any(CHECKS[rule.check].needs_body for rule in config.all_rules())
        # Header values with their leading white space, exactly as received (DKIM "simple"
        # canonicalization needs them), and ours sent back the same way.
        off = mp.P_NR_CONN | mp.P_NR_HDR | mp.P_NOEOH | mp.P_HDR_LEADSPC
        off |= mp.P_NOUNKNOWN | mp.P_NODATA | mp.P_NR_BODY
        if not needs_body:
            off |= mp.P_NOBODY
        if not answers_helo:
            off |= mp.P_NR_HELO
        if "mail" not in stages_with_rules and not answers_helo:
            off |= mp.P_NR_MAIL
        if "rcpt" not in stages_with_rules:
            off |= mp.P_NR_RCPT
        macros: dict[str, set[str]] = {stage: set(names) for stage, names in
                                       _BASE_MACROS.items()}
        macros.setdefault("mail", set()).add("{auth_authen}")
        for rule in config.all_rules():
            for stage, names in CHECKS[rule.check].macros.items():
                macros.setdefault(stage, set()).update(names)
        per_message = frozenset().union(*(macros.get(stage, ()) for stage in
                                          ("mail", "rcpt", "eom")))
        return cls(off, {stage: tuple(sorted(names)) for stage, names in macros.items()},
                   per_message)


@dataclass(frozen=True)
class Runtime:
    """What every session of one configuration shares."""

    config: Config
    engine: Engine
    plan: Plan

    @classmethod
    def build(cls, config: Config, engine: Engine) -> Runtime:
        return cls(config, engine, Plan.for_config(config))


class SessionCount:
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


ACTIVE = SessionCount()

# Actions we may ask for: add our header, delete forged ones, quarantine, choose the macros.
WANTED_ACTIONS = mp.F_ADDHDRS | mp.F_CHGHDRS | mp.F_QUARANTINE | mp.F_SETSYMLIST
_CONTINUE = mp.packet(mp.R_CONTINUE)
_ACCEPT = mp.packet(mp.R_ACCEPT)
_REJECT = mp.packet(mp.R_REJECT)
_TEMPFAIL = mp.packet(mp.R_TEMPFAIL)
_DISCARD = mp.packet(mp.R_DISCARD)
_INTERNAL_ERROR = mp.reply_code(451, "4.3.0", "Internal error, try again later")
# Where a macro is looked for: the newest stage first (libmilter's smfi_getsymval order).
_LOOKUP = (mp.C_EOB, mp.C_EOH, mp.C_DATA, mp.C_RCPT, mp.C_MAIL, mp.C_HELO, mp.C_CONNECT)
# Macros that belong to one message, forgotten when the next one starts.
_MESSAGE_MACROS = (mp.C_MAIL, mp.C_RCPT, mp.C_DATA, mp.C_EOH, mp.C_EOB, mp.C_HEADER, mp.C_BODY)
# Commands whose failure can be answered with a tempfail (connect can't carry a reply text).
_REFUSABLE = frozenset({mp.C_HELO, mp.C_MAIL, mp.C_RCPT, mp.C_EOB})


class HeaderBudget:
    """The header fields of one message as `limits.header_*` lets the checks keep them.

    A field longer than `header_field_bytes` is cut to that length. From the first field past
    `header_fields` fields or `header_bytes` bytes on, fields are counted and not kept (so what
    the checks see is the top of the header, whole), except the first two From fields
    (DMARC must see the author) and every Authentication-Results field (its position decides
    which to delete), which is then kept as its first `AR_HEAD` bytes; one whose authserv-id
    cannot be read there counts as claiming ours, so that a forgery cannot hide behind its
    size. The message itself is never refused for its header."""

    def __init__(self) -> None:
        self.fields = 0  # seen
        self.kept = 0
        self.size = 0  # bytes kept
        self.dropped = 0  # fields not kept (or kept as a stand-in)
        self.cut = 0  # fields cut to header_field_bytes
        self.from_fields = 0
        self.full = False  # a field did not fit: no later one is kept either (but see above)

    @property
    def over(self) -> bool:
        return bool(self.dropped or self.cut)

    def take(self, data: bytes, limits: LimitsConfig, authserv_id: str
             ) -> tuple[str, str] | None:
        """The (name, value) to keep of one SMFIC_HEADER packet, or None."""
        self.fields += 1
        name_end = data.find(b"\0")
        whole = name_end < 0 or len(data) - name_end - 2 <= limits.header_field_bytes
        if not whole:  # cut before decoding: a huge field costs no more than a long one
            self.cut += 1
            data = data[: name_end + 1 + limits.header_field_bytes] + b"\0"
        name, value = mp.parse_header(data)
        size = len(data)
        lower = name.lower()
        self.full = self.full or self.kept >= limits.header_fields or \
            self.size + size > limits.header_bytes
        fits = not self.full
        if lower == "from":
            self.from_fields += 1
            fits = fits or self.from_fields <= FROM_OVER_LIMIT
        elif lower == _AR_LOWER and (not fits or not whole):
            value = _ar_stand_in(value, whole, authserv_id)
            size = len(name) + len(value)
            fits = True
            self.dropped += 1
        if not fits:
            self.dropped += 1
            return None
        self.kept += 1
        self.size += size
        return name, value

    def describe(self) -> str:
        parts = []
        if self.dropped:
            parts.append(f"{self.dropped} of {self.fields} header fields left out of the "
                         "checks (limits.header_fields, limits.header_bytes)")
        if self.cut:
            parts.append(f"{self.cut} header fields cut to limits.header_field_bytes")
        return "; ".join(parts)


_AR_LOWER = AR.lower()


def _ar_stand_in(value: str, whole: bool, authserv_id: str) -> str:
    """What is kept of an Authentication-Results field over the limits: its first AR_HEAD
    characters when they show its authserv-id, else a value that claims ours."""
    head = value[:AR_HEAD]
    claimed = authserv_id_of(head)
    complete = whole and len(head) == len(value)
    if claimed and (complete or not head.rstrip().lower().endswith(claimed)):
        return head
    return f" {authserv_id}; none"


class Session:
    """One MTA connection: `handle()` takes each command and returns the reply bytes."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.engine = runtime.engine
        self.txn = Transaction()
        self.pending: Verdict | None = None
        self.in_message = False
        self.header_budget = HeaderBudget()
        self._protocol = 0
        self._actions = 0
        self._symbols: dict[int, dict[str, str]] = {}
        self._handlers: dict[int, Callable[[bytes], bytes | None]] = {
            mp.C_OPTNEG: self._negotiate, mp.C_MACRO: self._macro, mp.C_CONNECT: self._connect,
            mp.C_HELO: self._helo, mp.C_MAIL: self._mail, mp.C_RCPT: self._rcpt,
            mp.C_HEADER: self._header, mp.C_BODY: self._body, mp.C_EOB: self._eob,
            mp.C_ABORT: self._abort,
            # DATA, the end of the headers, an unknown SMTP command: nothing to do but answer
            mp.C_DATA: lambda data: self._answer(mp.C_DATA),
            mp.C_EOH: lambda data: self._answer(mp.C_EOH),
            mp.C_UNKNOWN: lambda data: self._answer(mp.C_UNKNOWN),
        }
        self._closed = False
        ACTIVE.add(1)

    # -- the server's interface --------------------------------------------------------------
    def handle(self, command: int, data: bytes) -> bytes | None:
        """The reply to one command (None when it gets none). Raises `ProtocolError` when the
        MTA broke the protocol and `EOFError` when it quit."""
        handler = self._handlers.get(command)
        if handler is None:
            if command == mp.C_QUIT:
                raise EOFError
            if command == mp.C_QUIT_NC:  # this SMTP session ends, another one follows
                self._end_connection()
                self.txn = Transaction()
                self.pending = None
                self._symbols.clear()
                return None
            raise mp.ProtocolError(f"unknown command {command!r}")
        try:
            return handler(data)
        except mp.ProtocolError:
            raise
        except Exception:
            log.exception("internal error at command %r (client %s)", chr(command),
                          self.txn.client)
            metrics.METRICS.error("session")
            if self._no_reply(command) or command in (mp.C_MACRO, mp.C_ABORT):
                return None
            if command in _REFUSABLE and self.runtime.config.mode != "monitor":
                if command in (mp.C_MAIL, mp.C_EOB):
                    self.in_message = False
                return _INTERNAL_ERROR
            return _CONTINUE

    def close(self) -> None:
        """The connection is gone (or the MTA quit)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._end_connection()
        finally:
            ACTIVE.add(-1)

    # -- helpers -----------------------------------------------------------------------------
    def _end_connection(self) -> None:
        try:
            if self.in_message:
                log.warning(describe(self.txn, "close", Verdict(
                    Action.CONTINUE, reason="connection closed in the middle of a message")))
        except Exception:
            log.exception("internal error at the end of a connection")
        self.in_message = False
        self.txn.new_message()  # removes a spooled body now

    def _no_reply(self, command: int) -> bool:
        return bool(self._protocol & mp.NO_REPLY_BIT.get(command, 0))

    def _answer(self, command: int, reply: bytes = _CONTINUE) -> bytes | None:
        """Nothing where the stage was negotiated as no-reply, else `reply`."""
        return None if self._no_reply(command) else reply

    def _symval(self, name: str) -> str | None:
        key = mp.macro_key(name)
        for command in _LOOKUP:
            values = self._symbols.get(command)
            if values is not None and key in values:
                return values[key]
        return None

    def _macros(self, stage: str) -> None:
        for name in self.runtime.plan.macros.get(stage, ()):
            value = self._symval(name)
            if value is not None:
                self.txn.macros[name] = value

    def _refuse(self, verdict: Verdict, stage: str) -> bytes:
        metrics.METRICS.transaction(verdict.action, stage)
        if log.isEnabledFor(logging.INFO):
            log.info(describe(self.txn, stage, verdict))
        if verdict.action == "discard":
            return _DISCARD
        if verdict.reply is not None:
            return mp.reply_code(verdict.reply.code, verdict.reply.status, verdict.reply.text)
        return _REJECT if verdict.action == "reject" else _TEMPFAIL

    def _pending(self, command: int) -> bytes | None:
        """A refusal decided at connect, given at the first stage that can answer."""
        if self.pending is None or self._no_reply(command):
            return None
        verdict, self.pending = self.pending, None
        return self._refuse(verdict, "connect")

    # -- commands ----------------------------------------------------------------------------
    def _negotiate(self, data: bytes) -> bytes:
        offer = mp.parse_options(data)
        self._actions = offer.actions & WANTED_ACTIONS
        self._protocol = offer.protocol & self.runtime.plan.protocol
        macros = None
        if self._actions & mp.F_SETSYMLIST:
            macros = {_MACRO_STAGE[stage]: " ".join(names)
                      for stage, names in self.runtime.plan.macros.items()}
        return mp.options_reply(min(offer.version, mp.VERSION), self._actions, self._protocol,
                                macros)

    def _macro(self, data: bytes) -> None:
        command, values = mp.parse_macros(data)
        if command == mp.C_MAIL:
            for stale in _MESSAGE_MACROS:
                self._symbols.pop(stale, None)
        self._symbols[command] = values
        return None

    def _connect(self, data: bytes) -> bytes | None:
        info = mp.parse_connect(data)
        address = info.address if info.family in ("4", "6") else None
        self.txn = Transaction.for_client(address, info.hostname, info.port)
        self._macros("connect")
        if self.txn.client_ip is None and self.txn.macros.get("{client_addr}"):
            self.txn = Transaction.for_client(self.txn.macros["{client_addr}"], info.hostname)
            self._macros("connect")
        verdict = self.engine.run_stage("connect", self.txn)
        if verdict.refuses:
            self.pending = verdict
        return self._answer(mp.C_CONNECT)

    def _helo(self, data: bytes) -> bytes | None:
        names = mp.strings(data)
        self.txn.helo = names[0] if names else ""
        self._macros("helo")
        pending = self._pending(mp.C_HELO)
        if pending is not None:
            return pending
        verdict = self.engine.run_stage("helo", self.txn)
        if verdict.refuses and not self._no_reply(mp.C_HELO):
            return self._refuse(verdict, "helo")
        if verdict.refuses:
            self.pending = verdict
        return self._answer(mp.C_HELO)

    def _mail(self, data: bytes) -> bytes | None:
        args = mp.strings(data) or [""]
        self.txn.new_message()
        self.txn.spool_threshold = self.runtime.config.spool_threshold
        self.txn.spool_dir = self.runtime.config.spool_directory
        self.in_message = True
        self.header_budget = HeaderBudget()
        self.txn.mail_from = args[0].strip().removeprefix("<").removesuffix(">")
        self.txn.mail_params = tuple(args[1:])
        for name in self.runtime.plan.message_macros:  # the previous message's values
            self.txn.macros.pop(name, None)
        self._macros("mail")
        self.txn.queue_id = self.txn.macros.get("i", "")
        pending = self._pending(mp.C_MAIL)
        if pending is not None:
            return pending
        verdict = self.engine.run_stage("mail", self.txn)
        if verdict.refuses:
            self.in_message = False
            return self._refuse(verdict, "mail")
        return self._answer(mp.C_MAIL)

    def _rcpt(self, data: bytes) -> bytes | None:
        args = mp.strings(data) or [""]
        self.txn.rcpts.append(args[0].strip().removeprefix("<").removesuffix(">"))
        try:
            self._macros("rcpt")
            verdict = self.engine.run_stage("rcpt", self.txn)
        except Exception:
            self.txn.rcpts.pop()  # answered with a tempfail: the MTA drops this recipient
            raise
        if verdict.refuses:
            reply = self._refuse(verdict, "rcpt")
            if verdict.action != "discard":
                self.txn.rcpts.pop()  # the MTA drops this recipient only
            return reply
        return self._answer(mp.C_RCPT)

    def _header(self, data: bytes) -> bytes | None:
        config = self.runtime.config
        kept = self.header_budget.take(data, config.limits, config.authserv_id)
        if kept is not None:
            self.txn.headers.append(kept)
        return self._answer(mp.C_HEADER)

    def _body(self, data: bytes) -> bytes | None:
        self.txn.add_body(data)
        return self._answer(mp.C_BODY)

    def _eob(self, data: bytes) -> bytes:
        if data:
            self.txn.add_body(data)
        self._macros("eom")
        self.txn.queue_id = self.txn.macros.get("i", self.txn.queue_id)
        if self.header_budget.over:
            reason = self.header_budget.describe()
            self.txn.header_cut = reason
            log.info("queue_id=%s client=%s: %s", self.txn.queue_id or "-", self.txn.client,
                     reason)
        self.in_message = False
        self._forget_message_macros()
        verdict, edits = self.engine.end_of_message(self.txn)
        if verdict.refuses:
            return self._refuse(verdict, "eom")
        replies: list[bytes] = []
        if edits.delete and self._granted(mp.F_CHGHDRS, "delete forged headers"):
            for position in sorted(edits.delete, reverse=True):
                replies.append(mp.header_edit(mp.R_CHGHEADER, AR, "", position))
        if edits.insert and self._granted(mp.F_ADDHDRS, "add headers"):
            leading = bool(self._protocol & mp.P_HDR_LEADSPC)
            for name, value in reversed(edits.insert):
                if leading and not value.startswith((" ", "\t")):
                    value = " " + value
                elif not leading:
                    value = value.lstrip(" \t")
                replies.append(mp.header_edit(mp.R_INSHEADER, name, value, 0))
        if self.txn.quarantine and self._granted(mp.F_QUARANTINE, "quarantine"):
            replies.append(mp.quarantine(self.txn.quarantine))
        if log.isEnabledFor(logging.INFO):  # the line is not built when nobody reads it
            log.info(describe(self.txn, "eom", verdict))
        applied = "quarantine" if self.txn.quarantine else verdict.action
        metrics.METRICS.transaction(applied, "eom")
        replies.append(_ACCEPT if verdict.action == "accept" else _CONTINUE)
        return b"".join(replies)

    def _granted(self, action: int, what: str) -> bool:
        if self._actions & action:
            return True
        log.warning("the MTA does not let milters %s; skipped (client %s)", what,
                    self.txn.client)
        return False

    def _abort(self, data: bytes) -> None:
        if self.in_message and log.isEnabledFor(logging.INFO):
            log.info(describe(self.txn, "abort", Verdict(Action.CONTINUE, reason="aborted by MTA")))
        self.in_message = False
        self._forget_message_macros()
        return None

    def _forget_message_macros(self) -> None:
        """The message is over: its macros must not answer for the next one (whose MAIL may
        come without any, as Postfix sends no queue id before the queue file exists)."""
        for stale in _MESSAGE_MACROS:
            self._symbols.pop(stale, None)
