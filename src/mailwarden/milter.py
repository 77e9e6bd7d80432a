"""The pymilter adapter: libmilter callbacks -> Transaction -> engine -> replies and header edits.

One `Session` per SMTP connection. Negotiation asks only for the stages and macros the rules
need and marks as no-reply every stage that never answers, so a message costs the MTA as few
round trips as possible. Every callback is guarded: an exception is logged and the message is
tempfailed, never lost, and the process keeps serving.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import Milter

from mailwarden.checks import CHECKS
from mailwarden.config import STAGES, Config
from mailwarden.headers import AR
from mailwarden.policy.engine import Engine, Verdict, describe
from mailwarden.transaction import Transaction

log = logging.getLogger("mailwarden.milter")

F = TypeVar("F", bound=Callable[..., Any])

# Header bytes kept per message for checks; Authentication-Results fields are always kept
# (their positions decide which ones to delete).
MAX_HEADER_BYTES = 4 * 1024 * 1024

_MACRO_STAGE = {"connect": Milter.M_CONNECT, "helo": Milter.M_HELO, "mail": Milter.M_ENVFROM,
                "rcpt": Milter.M_ENVRCPT, "eom": Milter.M_EOM}
# Macros we always want: the queue id, our host name, the client's address as the MTA saw it.
_BASE_MACROS = {"connect": ("j", "{daemon_name}", "{client_addr}"), "mail": ("i",),
                "eom": ("i",)}


@dataclass(frozen=True, slots=True)
class Plan:
    """What to negotiate, derived once from the configuration."""

    protocol: int  # SMFIP_* flags to ask for: P_NO* (don't send that stage), P_NR* (no reply)
    macros: dict[str, tuple[str, ...]]

    @classmethod
    def for_config(cls, config: Config) -> Plan:
        stages_with_rules = {stage for stage in STAGES if config.stage_rules(stage)}
        # connect: replies cannot be set there (smfi_setreply is not allowed in xxfi_connect),
        # so a refusal decided at connect is given at HELO, or at MAIL FROM.
        answers_helo = bool(stages_with_rules & {"connect", "helo"})
        needs_body = any(CHECKS[rule.check].needs_body for rule in config.all_rules())
        # Header values with their leading white space, exactly as received (DKIM "simple"
        # canonicalization needs them), and ours sent back the same way.
        off = Milter.P_NR_CONN | Milter.P_NR_HDR | Milter.P_NOEOH | Milter.P_HDR_LEADSPC
        off |= Milter.P_NOUNKNOWN | Milter.P_NODATA | Milter.P_NR_BODY
        if not needs_body:
            off |= Milter.P_NOBODY
        if not answers_helo:
            off |= Milter.P_NR_HELO
        if "mail" not in stages_with_rules and not answers_helo:
            off |= Milter.P_NR_MAIL
        if "rcpt" not in stages_with_rules:
            off |= Milter.P_NR_RCPT
        macros: dict[str, set[str]] = {stage: set(names) for stage, names in
                                       _BASE_MACROS.items()}
        macros.setdefault("mail", set()).add("{auth_authen}")
        for rule in config.all_rules():
            for stage, names in CHECKS[rule.check].macros.items():
                macros.setdefault(stage, set()).update(names)
        return cls(off, {stage: tuple(sorted(names)) for stage, names in macros.items()})


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
    """Sessions in progress in this process (a drain waits for zero)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self, delta: int) -> None:
        with self._lock:
            self.value += delta


ACTIVE = SessionCount()


def guarded(refusable: bool) -> Callable[[F], F]:
    """Turn an exception in a callback into a logged tempfail (or a continue where the
    protocol allows no reply)."""

    def wrap(func: F) -> F:
        @functools.wraps(func)
        def run(self: Session, *args: Any) -> Any:
            try:
                return func(self, *args)
            except Exception:
                log.exception("internal error in %s (client %s)", func.__name__,
                              self.txn.client)
                if refusable and not self._no_reply(func.__name__):
                    try:
                        self._reply(451, "4.3.0", "Internal error, try again later")
                    except Exception:  # the MTA may be gone already
                        log.debug("could not set the reply", exc_info=True)
                    return Milter.TEMPFAIL
                return Milter.CONTINUE
        return run  # type: ignore[return-value]

    return wrap


_NR_BITS = {"connect": Milter.P_NR_CONN, "hello": Milter.P_NR_HELO, "envfrom": Milter.P_NR_MAIL,
            "envrcpt": Milter.P_NR_RCPT, "header": Milter.P_NR_HDR, "body": Milter.P_NR_BODY}


class Session(Milter.Base):  # type: ignore[misc]
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.engine = runtime.engine
        self.txn = Transaction()
        self.pending: Verdict | None = None
        self.in_message = False
        self._header_size = 0
        self._protocol = 0
        ACTIVE.add(1)

    # -- negotiation -----------------------------------------------------------------------
    def negotiate(self, opts: list[int]) -> int:
        try:
            self._actions, protocol, _, _ = opts
            for stage, names in self.runtime.plan.macros.items():
                self._ctx.setsymlist(_MACRO_STAGE[stage], " ".join(names))
            opts[1] = self._protocol = protocol & self.runtime.plan.protocol
            opts[2] = opts[3] = 0
        except Exception:
            log.exception("negotiation failed; asking for everything")
            return int(Milter.ALL_OPTS)
        return int(Milter.CONTINUE)

    def _no_reply(self, callback: str) -> bool:
        return bool(self._protocol & _NR_BITS.get(callback, 0))

    def _answer(self, callback: str, status: int) -> int:
        """NOREPLY where the stage was negotiated as no-reply, else `status`."""
        return int(Milter.NOREPLY) if self._no_reply(callback) else status

    def _macros(self, stage: str) -> None:
        for name in self.runtime.plan.macros.get(stage, ()):
            value = self.getsymval(name)
            if value is not None:
                self.txn.macros[name] = value

    def _reply(self, code: int, status: str, text: str) -> None:
        self.setreply(str(code), status, text)

    def _refuse(self, verdict: Verdict, stage: str) -> int:
        if log.isEnabledFor(logging.INFO):
            log.info(describe(self.txn, stage, verdict))
        if verdict.action == "discard":
            return int(Milter.DISCARD)
        if verdict.reply is not None:
            self._reply(verdict.reply.code, verdict.reply.status, verdict.reply.text)
        return int(Milter.REJECT if verdict.action == "reject" else Milter.TEMPFAIL)

    def _pending(self, callback: str) -> int | None:
        """A refusal decided at connect, given at the first stage that can answer."""
        if self.pending is None or self._no_reply(callback):
            return None
        verdict, self.pending = self.pending, None
        return self._refuse(verdict, "connect")

    # -- callbacks ---------------------------------------------------------------------------
    @guarded(refusable=False)
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        address = None
        port = 0
        if family in (socket.AF_INET, socket.AF_INET6) and hostaddr:
            address, port = str(hostaddr[0]), int(hostaddr[1])
        self.txn = Transaction.for_client(address, hostname or "", port)
        self._macros("connect")
        if self.txn.client_ip is None and self.txn.macros.get("{client_addr}"):
            self.txn = Transaction.for_client(self.txn.macros["{client_addr}"], hostname or "")
            self._macros("connect")
        verdict = self.engine.run_stage("connect", self.txn)
        if verdict.refuses:
            self.pending = verdict
        return self._answer("connect", int(Milter.CONTINUE))

    @guarded(refusable=True)
    def hello(self, heloname: str) -> int:
        self.txn.helo = heloname
        self._macros("helo")
        pending = self._pending("hello")
        if pending is not None:
            return pending
        verdict = self.engine.run_stage("helo", self.txn)
        if verdict.refuses and not self._no_reply("hello"):
            return self._refuse(verdict, "helo")
        if verdict.refuses:
            self.pending = verdict
        return self._answer("hello", int(Milter.CONTINUE))

    @guarded(refusable=True)
    def envfrom(self, mailfrom: str, *params: str) -> int:
        self.txn.new_message()
        self.txn.spool_threshold = self.runtime.config.spool_threshold
        self.in_message = True
        self._header_size = 0
        self.txn.mail_from = mailfrom.strip().removeprefix("<").removesuffix(">")
        self.txn.mail_params = tuple(params)
        self._macros("mail")
        self.txn.queue_id = self.txn.macros.get("i", "")
        pending = self._pending("envfrom")
        if pending is not None:
            return pending
        verdict = self.engine.run_stage("mail", self.txn)
        if verdict.refuses:
            self.in_message = False
            return self._refuse(verdict, "mail")
        return self._answer("envfrom", int(Milter.CONTINUE))

    @guarded(refusable=True)
    def envrcpt(self, to: str, *params: str) -> int:
        self.txn.rcpts.append(to.strip().removeprefix("<").removesuffix(">"))
        self._macros("rcpt")
        verdict = self.engine.run_stage("rcpt", self.txn)
        if verdict.refuses:
            code = self._refuse(verdict, "rcpt")
            if verdict.action != "discard":
                self.txn.rcpts.pop()  # the MTA drops this recipient only
            return code
        return self._answer("envrcpt", int(Milter.CONTINUE))

    @guarded(refusable=False)
    def header(self, name: str, value: str) -> int:
        size = len(name) + len(value)
        if name.lower() == AR.lower() or self._header_size + size <= MAX_HEADER_BYTES:
            self.txn.headers.append((name, value))
            self._header_size += size
        return self._answer("header", int(Milter.CONTINUE))

    @guarded(refusable=False)
    def body(self, chunk: bytes) -> int:
        self.txn.add_body(chunk)
        return self._answer("body", int(Milter.CONTINUE))

    @guarded(refusable=True)
    def eom(self) -> int:
        self._macros("eom")
        self.txn.queue_id = self.txn.macros.get("i", self.txn.queue_id)
        self.in_message = False
        verdict, edits = self.engine.end_of_message(self.txn)
        if verdict.refuses:
            return self._refuse(verdict, "eom")
        for position in sorted(edits.delete, reverse=True):
            self.chgheader(AR, position, "")
        leading = bool(self._protocol & Milter.P_HDR_LEADSPC)
        for name, value in reversed(edits.insert):
            if leading and not value.startswith((" ", "\t")):
                value = " " + value
            elif not leading:
                value = value.lstrip(" \t")
            self.addheader(name, value, 0)
        if self.txn.quarantine:
            self.quarantine(self.txn.quarantine)
        if log.isEnabledFor(logging.INFO):  # the line is not built when nobody reads it
            log.info(describe(self.txn, "eom", verdict))
        return int(Milter.ACCEPT if verdict.action == "accept" else Milter.CONTINUE)

    @guarded(refusable=False)
    def abort(self) -> int:
        if self.in_message and log.isEnabledFor(logging.INFO):
            log.info(describe(self.txn, "abort", Verdict("continue", reason="aborted by MTA")))
        self.in_message = False
        return int(Milter.CONTINUE)

    def close(self) -> int:
        try:
            if self.in_message:
                log.warning(describe(self.txn, "close", Verdict(
                    "continue", reason="connection closed in the middle of a message")))
        except Exception:
            log.exception("internal error in close")
        finally:
            ACTIVE.add(-1)
        return int(Milter.CONTINUE)
