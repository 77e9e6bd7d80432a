"""The libmilter transport: a pymilter callback class (`Milter.Base` subclass) over Sendmail's
libmilter, the reference implementation of the milter protocol.

Each MTA connection gets one `Callbacks` object (pymilter's factory), holding one
`stage.Connection`; every libmilter callback calls the matching stage and turns its Decision
into pymilter's calls: `setreply` and the return code for a refusal, `chgheader` (delete) and
`addheader` with an insertion index for the header edits, `quarantine`. Negotiation asks for
the same stages, macros and no-reply flags as the native transport (derived from the same
`stage.Plan`), and header values with their leading white space.

Process model (`daemon`): the master registers the callbacks and opens libmilter's socket
(`smfi_opensocket`) with its start-up privileges, drops them, then forks the workers; each
worker runs `smfi_main`, libmilter's accept loop and thread per connection, while a thread of
ours reads the master's control pipe: a reload swaps the runtime that new connections get, a
drain stops the accepting, waits for the connections in progress and ends the worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any, ClassVar

import Milter
import milter

from mailwarden import milterproto as mp
from mailwarden.progress import TICKER
from mailwarden.stage import Connection, Decision, Runtime
from mailwarden.transports.edits import DeleteHeader, EditPlanner, InsertHeader
from mailwarden.transports.native import MACRO_STAGE, WANTED_ACTIONS, protocol_flags
from mailwarden.verdict import Action, Stage

log = logging.getLogger("mailwarden.libmilter")

_CODES = {Action.REJECT: milter.REJECT, Action.TEMPFAIL: milter.TEMPFAIL,
          Action.DISCARD: milter.DISCARD, Action.ACCEPT: milter.ACCEPT,
          Action.CONTINUE: milter.CONTINUE, Action.QUARANTINE: milter.CONTINUE}
# The SMFIF_* / SMFIP_* values are the protocol's own: pymilter's constants equal ours.
assert (milter.ADDHDRS, milter.CHGHDRS, milter.QUARANTINE, milter.SETSYMLIST) == (
    mp.F_ADDHDRS, mp.F_CHGHDRS, mp.F_QUARANTINE, mp.F_SETSYMLIST)
assert (milter.P_NR_HELO, milter.P_HDR_LEADSPC) == (mp.P_NR_HELO, mp.P_HDR_LEADSPC)
assert (milter.M_CONNECT, milter.M_EOM) == (mp.M_CONNECT, mp.M_EOM)


class Callbacks(Milter.Base):  # type: ignore[misc]
    """One MTA connection, as libmilter calls it back."""

    current: ClassVar[Runtime]  # the worker's current runtime: new connections take it

    def __init__(self) -> None:
        self.runtime = Callbacks.current
        self.connection = Connection(self.runtime)
        self._planner = EditPlanner()

    # -- negotiation -------------------------------------------------------------------------
    def negotiate(self, opts: list[int]) -> int:
        offered_actions, offered_protocol = opts[0], opts[1]
        self._actions = offered_actions & WANTED_ACTIONS
        self._protocol = offered_protocol & protocol_flags(self.runtime.plan)
        if self._actions & milter.SETSYMLIST:
            for stage, names in self.runtime.plan.macros.items():
                # the context's own call: pymilter 1.0.5's Base.setsymlist hands it bytes,
                # which its C side refuses
                self._ctx.setsymlist(MACRO_STAGE[stage], " ".join(names))
        opts[0], opts[1], opts[2], opts[3] = self._actions, self._protocol, 0, 0
        return int(milter.CONTINUE)

    # -- the stages --------------------------------------------------------------------------
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        address, port = None, 0
        if family in (socket.AF_INET, socket.AF_INET6) and isinstance(hostaddr, tuple):
            address, port = str(hostaddr[0]), int(hostaddr[1])
        self.connection.connect(hostname, address, port, self._macros(Stage.CONNECT))
        return self._no_reply(mp.P_NR_CONN, milter.CONTINUE)

    def hello(self, name: str) -> int:
        decision = self.connection.helo(name, self._macros(Stage.HELO))
        return self._answer(mp.P_NR_HELO, decision)

    def envfrom(self, sender: str, *args: str) -> int:
        decision = self.connection.mail(sender, args, self._macros(Stage.MAIL))
        return self._answer(mp.P_NR_MAIL, decision)

    def envrcpt(self, recipient: str, *args: str) -> int:
        decision = self.connection.rcpt(recipient, args, self._macros(Stage.RCPT))
        return self._answer(mp.P_NR_RCPT, decision)

    def header(self, name: str, value: str | bytes) -> int:
        if isinstance(value, bytes):  # pymilter passes bytes it could not decode
            value = value.decode("utf-8", "surrogateescape")
        self.connection.header(name, value)
        return self._no_reply(mp.P_NR_HDR, milter.CONTINUE)

    def eoh(self) -> int:
        self.connection.end_of_headers()
        return self._no_reply(mp.P_NR_EOH, milter.CONTINUE)

    def body(self, chunk: bytes) -> int:
        self.connection.body(chunk)
        return self._no_reply(mp.P_NR_BODY, milter.CONTINUE)

    def data(self) -> int:
        return self._no_reply(mp.P_NR_DATA, milter.CONTINUE)

    def unknown(self, command: bytes) -> int:
        return self._no_reply(mp.P_NR_UNKN, milter.CONTINUE)

    def eom(self) -> int:
        # smfi_progress is allowed at the end of message only (libmilter's rule)
        with TICKER.alive(self.progress, self.runtime.config.progress_interval):
            decision = self.connection.end_of_message(self._macros(Stage.EOM))
        if decision.action in (Action.CONTINUE, Action.ACCEPT):
            self._edit(decision)
        return self._code(decision)

    def abort(self) -> int:
        self.connection.abort()
        return int(milter.CONTINUE)

    def close(self) -> int:
        self.connection.close()
        return int(milter.CONTINUE)

    # -- helpers -----------------------------------------------------------------------------
    def _macros(self, stage: Stage) -> dict[str, str]:
        found = {}
        for name in self.runtime.plan.macros.get(stage, ()):
            value = self.getsymval(name)
            if value is not None:
                found[name] = value if isinstance(value, str) else str(value)
        return found

    def _no_reply(self, bit: int, code: int) -> int:
        """NOREPLY where that stage was negotiated as no-reply (the MTA expects nothing)."""
        return int(milter.NOREPLY) if self._protocol & bit else int(code)

    def _answer(self, bit: int, decision: Decision) -> int:
        if self._protocol & bit:
            return int(milter.NOREPLY)
        return self._code(decision)

    def _code(self, decision: Decision) -> int:
        if decision.refuses and decision.action is not Action.DISCARD and \
                decision.reply is not None:
            reply = decision.reply
            # policy.codes.smtp_text doubled every '%' already, as smfi_setreply wants
            self.setreply(str(reply.code), reply.status, reply.text)
        return int(_CODES[decision.action])

    def _edit(self, decision: Decision) -> None:
        client = self.connection.txn.client
        for step in self._planner.steps(decision, self._actions, self._protocol, client):
            if isinstance(step, DeleteHeader):
                self.chgheader(step.name, step.position, "")
            elif isinstance(step, InsertHeader):
                self.addheader(step.name, step.value, 0)
            else:
                self.quarantine(step.reason)


def register(name: str = "mailwarden") -> None:
    """Hand libmilter our callbacks (in the master, before the socket is opened)."""
    Milter.factory = Callbacks
    milter.set_flags(WANTED_ACTIONS)
    milter.set_exception_policy(milter.TEMPFAIL)
    milter.set_connect_callback(Milter.connect_callback)
    milter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    milter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    milter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    milter.set_close_callback(Milter.close_callback)
    milter.register(name, data=lambda ctx: ctx.getpriv().data(),
                    unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
                    negotiate=Milter.negotiate_callback)


def open_socket(listen: str, backlog: int) -> socket.socket:
    """libmilter's listening socket (`smfi_opensocket`, a stale unix socket replaced), and a
    socket object on the master's copy of it, so that the master can close it at a drain."""
    register()
    milter.setconn(listen)
    milter.setbacklog(backlog)
    before = _socket_fds()
    milter.opensocket(True)
    new = sorted(_socket_fds() - before)
    if len(new) != 1:
        raise OSError(f"cannot find libmilter's listening socket (new sockets: {new})")
    return socket.socket(fileno=new[0])


def _socket_fds() -> set[int]:
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                found.add(int(name))
    return found


def serve(runtime: Runtime, control: int, listener: socket.socket,
          on_command: Callable[[bytes], Runtime | None],
          drain: Callable[[], None]) -> None:
    """A worker: libmilter's loop until the master asks for a drain (or goes away).

    A drain does not start with `smfi_stop`: Debian's libmilter (built with its workers
    pool) drops every connection that is between two commands when it stops, which would cut
    the transactions in progress. Instead libmilter's listening socket is swapped for one
    nobody can reach (no new connection comes), the connections in progress finish (`drain`),
    and then the worker exits."""
    listen_fd = listener.detach()  # libmilter owns the socket in this process
    Callbacks.current = runtime

    def control_loop() -> None:
        # libmilter's signal thread is the only one that may take these
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGHUP,
                                                  signal.SIGINT})
        while True:
            try:
                command = os.read(control, 1)
            except InterruptedError:
                continue
            except OSError:
                command = b""
            new = on_command(command) if command else None
            if new is None:
                break
            Callbacks.current = new
        _stop_accepting(listen_fd)
        drain()
        # Nothing is left to finish; libmilter's loop would notice an smfi_stop only at its
        # next poll timeout (5 s).
        logging.shutdown()
        os._exit(0)

    threading.Thread(target=control_loop, name="control", daemon=True).start()
    milter.main()


def _stop_accepting(listen_fd: int) -> None:
    """Put a listening socket that nobody can connect to (an unnamed unix socket, never
    ready, non-blocking) in the place of libmilter's: its loop goes on, accepting nothing,
    and this process's copy of the real socket is closed."""
    quiet = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        quiet.bind("")  # an abstract address of the kernel's choosing
        quiet.listen(1)
        quiet.setblocking(False)
        os.dup2(quiet.fileno(), listen_fd)
    finally:
        quiet.close()
