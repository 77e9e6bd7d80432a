"""The native transport's session: milter protocol commands -> the stage API -> reply packets.

One `Session` per MTA connection, fed the decoded commands of `milterproto` by the server and
answering with reply packets; it does no I/O itself, and no policy: each stage goes to the
transport-neutral `stage.Connection`, and its `Decision` is encoded here. Negotiation asks only
for the stages and macros the rules need and marks as no-reply every stage that never answers,
so a message costs the MTA as few round trips as possible.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mailwarden import metrics
from mailwarden import milterproto as mp
from mailwarden.headerbudget import AR_HEAD, HeaderBudget
from mailwarden.policy.codes import INTERNAL_ERROR
from mailwarden.stage import ACTIVE, Connection, Decision, Plan, Runtime
from mailwarden.transaction import Transaction
from mailwarden.transports.edits import DeleteHeader, EditPlanner, InsertHeader
from mailwarden.verdict import Action, Mode, Stage

__all__ = ["ACTIVE", "AR_HEAD", "MACRO_STAGE", "HeaderBudget", "Runtime", "Session",
           "protocol_flags"]

log = logging.getLogger("mailwarden.milter")

MACRO_STAGE = {Stage.CONNECT: mp.M_CONNECT, Stage.HELO: mp.M_HELO, Stage.MAIL: mp.M_ENVFROM,
                Stage.RCPT: mp.M_ENVRCPT, Stage.EOM: mp.M_EOM}


def protocol_flags(plan: Plan) -> int:
    """Header values with their leading white space, exactly as received (DKIM "simple"
    canonicalization needs them), and ours sent back the same way; no reply where the policy
    has nothing to say; DATA, end of headers and unknown commands not sent at all."""
    off = mp.P_NR_CONN | mp.P_NR_HDR | mp.P_NOEOH | mp.P_HDR_LEADSPC
    off |= mp.P_NOUNKNOWN | mp.P_NODATA | mp.P_NR_BODY | mp.P_MDS_1M | mp.P_MDS_256K
    if not plan.needs_body:
        off |= mp.P_NOBODY
    for stage, flag in ((Stage.HELO, mp.P_NR_HELO), (Stage.MAIL, mp.P_NR_MAIL),
                        (Stage.RCPT, mp.P_NR_RCPT)):
        if stage not in plan.answers:
            off |= flag
    return off


# Actions we may ask for: add our header, delete forged ones, quarantine, choose the macros.
WANTED_ACTIONS = mp.F_ADDHDRS | mp.F_CHGHDRS | mp.F_QUARANTINE | mp.F_SETSYMLIST
_CONTINUE = mp.packet(mp.R_CONTINUE)
_ACCEPT = mp.packet(mp.R_ACCEPT)
_REJECT = mp.packet(mp.R_REJECT)
_TEMPFAIL = mp.packet(mp.R_TEMPFAIL)
_DISCARD = mp.packet(mp.R_DISCARD)
_INTERNAL_ERROR = mp.reply_code(INTERNAL_ERROR.code, INTERNAL_ERROR.status, INTERNAL_ERROR.text)
# Where a macro is looked for: the newest stage first (libmilter's smfi_getsymval order).
_LOOKUP = (mp.C_EOB, mp.C_EOH, mp.C_DATA, mp.C_RCPT, mp.C_MAIL, mp.C_HELO, mp.C_CONNECT)
# Macros that belong to one message, forgotten when the next one starts.
_MESSAGE_MACROS = (mp.C_MAIL, mp.C_RCPT, mp.C_DATA, mp.C_EOH, mp.C_EOB, mp.C_HEADER, mp.C_BODY)
# Commands that belong to a message: after MAIL, before its end or abort.
_IN_MESSAGE = frozenset({mp.C_RCPT, mp.C_DATA, mp.C_HEADER, mp.C_EOH, mp.C_BODY, mp.C_EOB})
# Commands whose failure can be answered with a tempfail (connect can't carry a reply text).
_REFUSABLE = frozenset({mp.C_HELO, mp.C_MAIL, mp.C_RCPT, mp.C_EOB})


class Session:
    """One MTA connection: `handle()` takes each command and returns the reply bytes."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.connection = Connection(runtime)
        self._protocol = 0
        self._actions = 0
        self._negotiated = False
        self._version = 0
        self._open = False  # the MTA has a message open with us (MAIL sent, not yet ended)
        self._chunk = mp.CHUNK_DEFAULT
        self._symbols: dict[int, dict[str, str]] = {}
        self._planner = EditPlanner()
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

    @property
    def txn(self) -> Transaction:
        return self.connection.txn

    @property
    def progress_interval(self) -> float:
        return self.runtime.config.progress_interval

    def awaits_reply(self, command: int) -> bool:
        """Whether the MTA waits for this command's reply, and may be told meanwhile that we
        are alive (SMFIR_PROGRESS, protocol version 6)."""
        return self._version >= 6 and command in _REFUSABLE and not self._no_reply(command)

    # -- the server's interface --------------------------------------------------------------
    def handle(self, command: int, data: bytes) -> bytes | None:
        """The reply to one command (None when it gets none). Raises `ProtocolError` when the
        MTA broke the protocol and `EOFError` when it quit."""
        handler = self._handlers.get(command)
        self._check_order(command)
        if handler is None:
            if command == mp.C_QUIT:
                raise EOFError
            if command == mp.C_QUIT_NC:  # this SMTP session ends, another one follows
                self.connection.close()
                self.connection = Connection(self.runtime)
                self._symbols.clear()  # the negotiation stands (libmilter: CONNECT comes next)
                return None
            raise mp.ProtocolError(f"unknown command {command!r}")
        try:
            return handler(data)
        except mp.ProtocolError:
            raise
        except Exception:  # a bug of this codec: the stage API guards its own
            log.exception("internal error at command %r (client %s)", chr(command),
                          self.txn.client)
            metrics.METRICS.error("session")
            if self._no_reply(command) or command in (mp.C_MACRO, mp.C_ABORT):
                return None
            if command in _REFUSABLE and self.runtime.config.mode is not Mode.MONITOR:
                if command in (mp.C_MAIL, mp.C_EOB):
                    self._open = False
                return _INTERNAL_ERROR
            return _CONTINUE

    def close(self) -> None:
        """The connection is gone (or the MTA quit)."""
        self.connection.close()

    # -- helpers -----------------------------------------------------------------------------
    def _check_order(self, command: int) -> None:
        """The command order libmilter's engine enforces: option negotiation first and once
        per connection (QUIT_NC keeps it), and the commands of a message only inside one
        (after MAIL)."""
        if command == mp.C_OPTNEG:
            if self._negotiated:
                raise mp.ProtocolError("option negotiation again on a negotiated connection")
            return
        if command == mp.C_QUIT:
            return
        if not self._negotiated:
            raise mp.ProtocolError(f"command {chr(command)!r} before option negotiation")
        if command in _IN_MESSAGE and not self._open:
            raise mp.ProtocolError(f"command {chr(command)!r} outside a message (no MAIL)")

    def _no_reply(self, command: int) -> bool:
        return bool(self._protocol & mp.NO_REPLY_BIT.get(command, 0))

    def _answer(self, command: int, reply: bytes = _CONTINUE) -> bytes | None:
        """Nothing where the stage was negotiated as no-reply, else `reply`."""
        return None if self._no_reply(command) else reply

    def _decided(self, command: int, decision: Decision) -> bytes | None:
        if self._no_reply(command):
            return None
        if decision.action is Action.DISCARD:
            return _DISCARD
        if decision.refuses:
            if decision.reply is not None:
                reply = decision.reply
                return mp.reply_code(reply.code, reply.status, reply.text)
            return _REJECT if decision.action is Action.REJECT else _TEMPFAIL
        return _ACCEPT if decision.action is Action.ACCEPT else _CONTINUE

    def _symval(self, name: str) -> str | None:
        key = mp.macro_key(name)
        for command in _LOOKUP:
            values = self._symbols.get(command)
            if values is not None and key in values:
                return values[key]
        return None

    def _macros(self, stage: Stage) -> dict[str, str]:
        found = {}
        for name in self.runtime.plan.macros.get(stage, ()):
            value = self._symval(name)
            if value is not None:
                found[name] = value
        return found

    # -- commands ----------------------------------------------------------------------------
    def _negotiate(self, data: bytes) -> bytes:
        offer = mp.parse_options(data)
        if offer.version < mp.MIN_VERSION:
            raise mp.ProtocolError(f"protocol version {offer.version} is older than "
                                   f"{mp.MIN_VERSION}")
        self._negotiated = True
        self._version = min(offer.version, mp.VERSION)
        self._actions = offer.actions & WANTED_ACTIONS
        wanted = protocol_flags(self.runtime.plan)
        self._protocol = offer.protocol & wanted
        if self._protocol & mp.P_MDS_1M:
            self._protocol &= ~mp.P_MDS_256K
            self._chunk = mp.CHUNK_1M
        elif self._protocol & mp.P_MDS_256K:
            self._chunk = mp.CHUNK_256K
        if wanted & mp.P_HDR_LEADSPC and not self._protocol & mp.P_HDR_LEADSPC:
            log.warning("the MTA does not pass header values with their leading white space "
                        "(SMFIP_HDR_LEADSPC): DKIM signatures with simple header "
                        "canonicalization may fail to verify")
        macros = None
        if self._actions & mp.F_SETSYMLIST:
            macros = {MACRO_STAGE[stage]: " ".join(names)
                      for stage, names in self.runtime.plan.macros.items()}
        return mp.options_reply(self._version, self._actions, self._protocol, macros)

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
        self.connection.connect(info.hostname, address, info.port,
                                self._macros(Stage.CONNECT))
        return self._answer(mp.C_CONNECT)

    def _helo(self, data: bytes) -> bytes | None:
        names = mp.strings(data)
        decision = self.connection.helo(names[0] if names else "", self._macros(Stage.HELO))
        return self._decided(mp.C_HELO, decision)

    def _mail(self, data: bytes) -> bytes | None:
        args = mp.strings(data) or [""]
        decision = self.connection.mail(args[0], args[1:], self._macros(Stage.MAIL))
        reply = self._decided(mp.C_MAIL, decision)
        # a refusal or an accept the MTA hears ends the message on its side
        self._open = reply is None or decision.action is Action.CONTINUE
        return reply

    def _rcpt(self, data: bytes) -> bytes | None:
        args = mp.strings(data) or [""]
        decision = self.connection.rcpt(args[0], args[1:], self._macros(Stage.RCPT))
        reply = self._decided(mp.C_RCPT, decision)
        if reply is not None and decision.action is Action.ACCEPT:
            self._open = False  # an accept the MTA hears ends the message on its side
        return reply

    def _header(self, data: bytes) -> bytes | None:
        limit = self.runtime.config.limits.header_field_bytes
        if len(data) > limit + 1024:  # cut before decoding: a huge field costs no more than
            data = data[:data.find(b"\0") + 2 + limit] + b"\0"  # a long one (still cut)
        name, value = mp.parse_header(data)
        self.connection.header(name, value)
        return self._answer(mp.C_HEADER)

    def _body(self, data: bytes) -> bytes | None:
        if len(data) > self._chunk:
            raise mp.ProtocolError(f"body chunk of {len(data)} bytes, more than the "
                                   f"{self._chunk} negotiated")
        self.connection.body(data)
        return self._answer(mp.C_BODY)

    def _eob(self, data: bytes) -> bytes:
        self._open = False
        if data:
            self.connection.body(data)
        decision = self.connection.end_of_message(self._macros(Stage.EOM))
        self._forget_message_macros()
        if decision.action is not Action.CONTINUE and decision.action is not Action.ACCEPT:
            reply = self._decided(mp.C_EOB, decision)
            assert reply is not None
            return reply
        replies: list[bytes] = []
        for step in self._planner.steps(decision, self._actions, self._protocol,
                                        self.txn.client):
            if isinstance(step, DeleteHeader):
                replies.append(mp.header_edit(mp.R_CHGHEADER, step.name, "", step.position))
            elif isinstance(step, InsertHeader):
                replies.append(mp.header_edit(mp.R_INSHEADER, step.name, step.value, 0))
            else:
                replies.append(mp.quarantine(step.reason))
        replies.append(_ACCEPT if decision.action is Action.ACCEPT else _CONTINUE)
        return b"".join(replies)

    def _abort(self, data: bytes) -> None:
        self._open = False
        self.connection.abort()
        self._forget_message_macros()
        return None

    def _forget_message_macros(self) -> None:
        """The message is over: its macros must not answer for the next one (whose MAIL may
        come without any, as Postfix sends no queue id before the queue file exists)."""
        for stale in _MESSAGE_MACROS:
            self._symbols.pop(stale, None)

