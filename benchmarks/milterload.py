r"""Milter load driver: the MTA side of the milter protocol (version 6), spoken directly.

No MTA and no miltertest: this module talks the libmilter wire protocol itself, so it can push
one milter (OpenDKIM, mailwarden, anything on a "unix:" or "inet:" socket) as hard as the milter
can go, and it can check exactly what the milter answered.

One connection, blocking (tests)::

    with MilterClient("unix:/run/x/opendkim.sock") as client:
        result = client.send_message(client_ip="127.0.0.1", helo="client.example.org",
                                     mail_from="alice@example.org", rcpts=["bob@example.net"],
                                     message=raw_bytes)
    result.action          # "accept", "continue", "reject", "tempfail", "discard", ...
    result.headers_added   # [("DKIM-Signature", "v=1; a=rsa-sha256; ..."), ...]
    signed = result.apply(raw_bytes)   # the message as the MTA would pass it on

Load (benchmarks)::

    report = run_load("unix:/run/x/opendkim.sock", [Message(make_message(4096))],
                      connections=16, duration=10)
    print(report.summary())

CLI::

    python benchmarks/milterload.py --socket unix:/path --connections 16 --duration 10 \
        --message FILE.eml [--message ...] [--messages-per-connection N] [--processes P]

prints one line: messages/s, p50/p90/p99 latency, errors, final actions and the driver's own CPU
use. ``--json`` prints the whole report as JSON instead.

Protocol, as implemented (libmilter 8.17 / Postfix semantics)
=============================================================
* OPTNEG offers version 6, every action (SMFIF_* 0x1FF) and every protocol step
  (SMFIP_* 0x1FFFFF: all NO*, NR*, SKIP, RCPT_REJ, HDR_LEADSPC; no MDS_* sizes). Steps the milter
  negotiates away (SMFIP_NO*) are not sent, with their macros; for steps marked SMFIP_NR* no
  reply is awaited, and such packets are sent together with the next one that needs a reply.
  Macro lists the milter asks for (smfi_setsymlist, after the three words of its OPTNEG reply)
  restrict the macros sent at that stage.
* Per SMTP session: macros + CONNECT (family '4' or '6', port, address), macros + HELO. Per
  message: macros + MAIL (``<sender>``), macros + RCPT per recipient, DATA, one HEADER per header
  field, EOH, BODY chunks of at most 65535 bytes, macros + EOM.
  Header values are sent like Postfix does: leading white space removed unless the milter
  negotiated SMFIP_HDR_LEADSPC; folded lines joined with a bare "\n". The body is sent with
  CRLF line ends (the input message may use LF or CRLF).
* After EOM every modification is collected until the final reply: SMFIR_ADDHEADER 'h',
  SMFIR_INSHEADER 'i', SMFIR_CHGHEADER 'm', SMFIR_ADDRCPT '+', SMFIR_ADDRCPT_PAR '2',
  SMFIR_DELRCPT '-', SMFIR_CHGFROM 'e', SMFIR_REPLBODY 'b', SMFIR_QUARANTINE 'q',
  SMFIR_PROGRESS 'p' (also honoured before EOM). Final replies: 'a' accept, 'c' continue,
  'r' reject, 't' tempfail, 'd' discard, 'y' reply code (action "reject" for 5xx, "tempfail"
  for 4xx, the text in ``reply``), 'f' connfail, '4' shutdown.
* A decision before EOM ends the message there (``stage`` tells where); the client then sends
  SMFIC_ABORT, like Postfix on RSET. A rejected RCPT only drops that recipient; the message
  ends when no recipient is left. 's' (SMFIR_SKIP) to a BODY chunk stops the body.
  A decision at CONNECT or HELO ends the SMTP session (the next message opens a new milter
  connection).
* Connection reuse: consecutive messages with the same client_ip and helo share one SMTP
  session on one milter connection (MAIL follows the previous EOM, as when a client sends
  several messages in one SMTP session). A message with another client_ip/helo closes the
  milter connection (SMFIC_QUIT) and opens a new one, as Postfix does per SMTP session.
  SMFIC_QUIT_NC is never sent: libmilter 8.17 returns to its HELO state after a message ends in
  accept/reject/discard/tempfail, and from there it silently ignores QUIT_NC and the CONNECT
  that follows (no reply: the MTA side would wait forever; seen with OpenDKIM).
  ``--messages-per-connection N`` closes the milter connection (SMFIC_QUIT) after N messages
  and opens a new one; 0 keeps each connection for the whole run. SMFIC_ABORT after a decision
  before EOM is ignored by libmilter for the same reason, harmlessly (it has no reply).

Macros
======
Defaults, as Postfix sends them: CONNECT ``j`` (``mta_name``, default "mx.test.example"),
``{daemon_name}`` ("milterload"), ``{client_addr}``, ``{client_name}``; MAIL ``i`` (a fresh
queue id per message), ``{mail_addr}``, and with ``auth_authen`` given ``{auth_authen}`` and
``{auth_type}`` ("PLAIN"; OpenDKIM looks only at {auth_type}); RCPT ``{rcpt_addr}``;
DATA and EOM ``i``. ``macros`` adds to or overrides them, either per stage
(``{"connect": {...}, "mail": {...}, "eom": {...}}``; stages connect, helo, mail, rcpt, data,
header, eoh, body, eom, or the SMFIC_* letter) or flat (``{"j": ..., "{auth_authen}": ...}``):
j, v, _, {daemon_name}, {if_*} and {client_*} go to CONNECT, {rcpt_*} to RCPT, i to MAIL, DATA
and EOM, everything else to MAIL. A macro set to None is not sent.

Efficiency
==========
The protocol logic is sans-I/O: generators that yield the bytes to send and receive the next
packet. ``MilterClient`` drives one with a blocking socket; ``run_load`` drives all its
connections from one thread with a selector (epoll), and optionally splits them over several
worker processes (``processes``). Packets that need no reply are coalesced into one send().
The driver's cost is dominated by system calls: each step the milter must answer is one send()
and one recv() (with the wake-up of the milter's thread charged to the sender). Measured on 2
vCPUs against a no-op libmilter milter in C that answers all 14 steps of a 4 KiB message:
about 200 us of driver CPU per message (about 100 us of it Python); 1,200-2,300 msg/s on one
connection; 3,400-3,600 msg/s on 16-32 connections with the driver at 45-80 % of one core and
the CPUs saturated; 4,300 msg/s on 16 connections split over 2 processes. Against OpenDKIM
(12 answered steps) 300-500 us/msg, 20-35 % of a core: far from the bottleneck. A thread per
connection with MilterClient is much slower (about 1,900 msg/s on 32 threads). Every run
reports its own cost (``LoadReport.driver_cpu``). Use a warm-up (``warmup``/``--warmup``), and
read p50/p99 rather than max: with the CPUs saturated, libmilter milters (the C no-op and
OpenDKIM alike) now and then stall all connections at once for 0.5-2 s, with the threaded
client as well, so it is not this event loop.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import itertools
import json
import multiprocessing
import os
import selectors
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from miltercodec import (
    CLIENT_PORT,
    FINAL_REPLIES,
    MILTER_CHUNK_SIZE,
    MILTER_VERSION,
    SMFIF_ALL,
    SMFIP_ALL,
    SMFIP_HDR_LEADSPC,
    SMFIP_NOBODY,
    SMFIP_NOCONNECT,
    SMFIP_NODATA,
    SMFIP_NOEOH,
    SMFIP_NOHDRS,
    SMFIP_NOHELO,
    SMFIP_NOMAIL,
    SMFIP_NORCPT,
    SMFIP_NR_BODY,
    SMFIP_NR_CONN,
    SMFIP_NR_DATA,
    SMFIP_NR_EOH,
    SMFIP_NR_HDR,
    SMFIP_NR_HELO,
    SMFIP_NR_MAIL,
    SMFIP_NR_RCPT,
    STAGES,
    MilterProtocolError,
    Packet,
    PacketReader,
    connect_socket,
    cstr,
    decode,
    packet,
    parse_socket,
    split_cstrs,
)

__all__ = [
    "LoadReport",
    "Message",
    "MilterClient",
    "MilterProtocolError",
    "MilterResult",
    "make_message",
    "parse_socket",
    "run_load",
]

_CONNECT_MACROS = frozenset({"j", "v", "_", "{daemon_name}", "{daemon_addr}", "{daemon_port}"})
_Socket = socket.socket  # MilterClient's parameter `socket` shadows the module
MacroSpec = Mapping[str, Any]


# ---- messages ----------------------------------------------------------------------------------


@dataclass(eq=False)
class Message:
    """One message with its envelope, as a load run sends it."""

    data: bytes
    mail_from: str = "sender@example.org"
    rcpts: Sequence[str] = ("rcpt@example.net",)
    client_ip: str = "127.0.0.1"
    helo: str = "client.example.org"
    macros: MacroSpec | None = None
    _parsed: _ParsedMessage | None = field(default=None, repr=False)

    def parsed(self) -> _ParsedMessage:
        if self._parsed is None:
            self._parsed = _ParsedMessage(self.data)
        return self._parsed


class _ParsedMessage:
    """Header fields and CRLF body of a message, with the HEADER/BODY packets cached."""

    def __init__(self, data: bytes) -> None:
        text = data.replace(b"\r\n", b"\n")
        head, sep, body = text.partition(b"\n\n")
        if not sep:
            if text.startswith(b"\n"):
                head, body = b"", text[1:]
            else:
                head, body = text, b""
        self.headers: list[tuple[bytes, bytes]] = []
        for line in head.split(b"\n") if head else []:
            if line[:1] in (b" ", b"\t") and self.headers:
                name, value = self.headers[-1]
                self.headers[-1] = (name, value + b"\n" + line)
            elif b":" in line:
                name, _, value = line.partition(b":")
                self.headers.append((name.rstrip(b" \t"), value))
            # a line that is neither a header nor a continuation is dropped, as MTAs do
        self.body = body.replace(b"\n", b"\r\n")
        self._header_packets: dict[bool, list[bytes]] = {}
        self.body_packets = [
            packet(b"B", self.body[i:i + MILTER_CHUNK_SIZE])
            for i in range(0, len(self.body), MILTER_CHUNK_SIZE)
        ]

    def header_packets(self, leadspc: bool) -> list[bytes]:
        packets = self._header_packets.get(leadspc)
        if packets is None:
            packets = [
                packet(b"L", name + b"\0" + (value if leadspc else value.lstrip(b" \t")) + b"\0")
                for name, value in self.headers
            ]
            self._header_packets[leadspc] = packets
        return packets


def make_message(size: int = 4096, *, from_addr: str = "alice@example.org",
                 to_addr: str = "bob@example.net", subject: str = "milterload test message",
                 seq: int = 0) -> bytes:
    """A plain-text RFC 5322 message of about `size` bytes (CRLF line ends)."""
    head = (
        f"From: Alice Example <{from_addr}>\r\n"
        f"To: Bob Example <{to_addr}>\r\n"
        f"Subject: {subject} {seq}\r\n"
        "Date: Sat, 22 Nov 2025 10:00:00 +0000\r\n"
        f"Message-ID: <milterload.{seq}.{size}@{from_addr.rpartition('@')[2]}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog; 0123456789 abcdefghij.\r\n"
    body_size = max(size - len(head), len(line))
    body = (line * (body_size // len(line) + 1))[:body_size]
    body = body[: body.rfind(b"\r\n") + 2] if b"\r\n" in body else body + b"\r\n"
    return head + body


# ---- results -----------------------------------------------------------------------------------


@dataclass
class MilterResult:
    """What the milter decided for one message, and what it asked to change."""

    action: str  # accept continue reject tempfail discard connfail shutdown
    reply: str | None  # the SMTP reply text of an SMFIR_REPLYCODE, e.g. "550 5.7.1 No"
    headers_added: list[tuple[str, str]]  # from SMFIR_ADDHEADER and SMFIR_INSHEADER, in order
    latency: float  # seconds, first byte sent for this message to the final reply
    stage: str = "eom"  # where the decision fell: connect helo mail rcpt data header eoh body eom
    # every modification in order: ("h", name, value), ("i", index, name, value),
    # ("m", index, name, value), ("+", rcpt, args), ("-", rcpt), ("e", sender, args),
    # ("b", chunk), ("q", reason)
    modifications: list[tuple[Any, ...]] = field(default_factory=list)
    quarantine: str | None = None
    rcpts_rejected: int = 0
    leadspc: bool = False  # SMFIP_HDR_LEADSPC was negotiated: values carry their leading space

    def apply(self, message: bytes) -> bytes:
        """`message` with the header changes applied (CRLF line ends), as an MTA would relay it:
        'i' inserts at the index (0 = first), 'h' appends after the last header, 'm' replaces
        the index-th (1-based) header of that name, or deletes it when the value is empty."""
        text = message.replace(b"\r\n", b"\n")
        head, sep, body = text.partition(b"\n\n")
        if not sep:
            head, body = text.rstrip(b"\n"), b""
        fields: list[bytes] = []
        for line in head.split(b"\n") if head else []:
            if line[:1] in (b" ", b"\t") and fields:
                fields[-1] += b"\n" + line
            else:
                fields.append(line)

        def render(name: str, value: str) -> bytes:
            raw = value.encode("utf-8", "surrogateescape").replace(b"\r\n", b"\n")
            return name.encode() + (b":" if self.leadspc else b": ") + raw

        for mod in self.modifications:
            if mod[0] == "h":
                fields.append(render(mod[1], mod[2]))
            elif mod[0] == "i":
                fields.insert(min(mod[1], len(fields)), render(mod[2], mod[3]))
            elif mod[0] == "m":
                _, index, name, value = mod
                seen = 0
                for pos, existing in enumerate(fields):
                    if existing.split(b":", 1)[0].strip().lower() == name.lower().encode():
                        seen += 1
                        if seen == index:
                            if value:
                                fields[pos] = render(name, value)
                            else:
                                del fields[pos]
                            break
                else:
                    if value:
                        fields.append(render(name, value))
            elif mod[0] == "b":
                pass  # body replacement: see _replaced_body
        replaced = [mod[1] for mod in self.modifications if mod[0] == "b"]
        if replaced:
            body = b"".join(replaced).replace(b"\r\n", b"\n")
        out = b"\n".join(fields) + b"\n\n" + body
        return out.replace(b"\n", b"\r\n")


# ---- the sans-I/O protocol engine --------------------------------------------------------------

_queue_ids = itertools.count(1)
_QID_PREFIX = f"{os.getpid() & 0xFFFFF:05X}"


def _new_queue_id() -> str:
    return f"{_QID_PREFIX}{next(_queue_ids):07X}"


def _norm_macro(name: str) -> str:
    return name[1:-1] if name.startswith("{") and name.endswith("}") else name


def _stage_code(stage: str) -> bytes:
    if stage in STAGES:
        return STAGES[stage]
    if len(stage) == 1 and stage.encode() in STAGES.values():
        return stage.encode()
    raise ValueError(f"unknown macro stage {stage!r}; use one of {', '.join(STAGES)}")


def _macro_stages(spec: MacroSpec | None) -> dict[bytes, dict[str, str | None]]:
    """Per-stage macros from a per-stage or a flat mapping (see the module docstring)."""
    out: dict[bytes, dict[str, str | None]] = {}
    if not spec:
        return out
    if all(isinstance(v, Mapping) for v in spec.values()):
        for stage, macros in spec.items():
            out.setdefault(_stage_code(stage), {}).update(macros)
        return out
    for name, value in spec.items():
        bare = _norm_macro(name)
        if name in _CONNECT_MACROS or bare.startswith(("if_", "client_", "daemon_")):
            stages = [b"C"]
        elif bare.startswith("rcpt_"):
            stages = [b"R"]
        elif bare == "i":
            stages = [b"M", b"T", b"E"]
        else:
            stages = [b"M"]
        for code in stages:
            out.setdefault(code, {})[name] = value
    return out


class MilterSession:
    """Protocol state of one milter connection, independent of any I/O.

    The *_gen methods are generators: each yields the bytes to send (possibly empty) and is then
    sent the next packet the milter wrote. Packets that need no reply are buffered in ``pending``
    and go out with the next yield; ``take_pending()`` hands over what is left (e.g. an ABORT).
    """

    def __init__(self, *, mta_name: str = "mx.test.example", daemon_name: str = "milterload",
                 actions: int = SMFIF_ALL, protocol: int = SMFIP_ALL) -> None:
        self.mta_name = mta_name
        self.daemon_name = daemon_name
        self.offer_actions = actions
        self.offer_protocol = protocol
        self.version = 0
        self.actions = 0
        self.protocol = 0
        self.symlists: dict[bytes, set[str]] = {}
        self.pending = bytearray()
        self.smtp_session: tuple[str, str] | None = None  # (client_ip, helo) of the open one
        self.session_over = False  # the milter decided at CONNECT/HELO
        self.negotiated = False

    def needs_new_connection(self, msg: Message) -> bool:
        """Whether `msg` belongs to another SMTP session than the one open on this connection
        (then QUIT and reconnect: see "Connection reuse" in the module docstring)."""
        return self.session_over or (
            self.smtp_session is not None and self.smtp_session != (msg.client_ip, msg.helo))

    # -- helpers

    def _has(self, flag: int) -> bool:
        return bool(self.protocol & flag)

    def take_pending(self) -> bytes:
        data = bytes(self.pending)
        self.pending.clear()
        return data

    def _macros(self, stage: bytes, macros: Mapping[str, str | None] | None) -> None:
        if not macros:
            return
        wanted = self.symlists.get(stage)
        payload = bytearray(stage)
        for name, value in macros.items():
            if value is None or (wanted is not None and _norm_macro(name) not in wanted):
                continue
            payload += cstr(name) + cstr(value)
        if len(payload) > 1:
            self.pending += packet(b"D", bytes(payload))

    def _request(self, wire: bytes, needs_reply: bool) -> Generator[bytes, Packet, Packet | None]:
        """Queue `packet`; if a reply is due, flush and return the first non-progress one."""
        self.pending += wire
        if not needs_reply:
            return None
        reply = yield self.take_pending()
        while reply[0] == b"p":  # SMFIR_PROGRESS: keep waiting
            reply = yield b""
        return reply

    # -- negotiation

    def negotiate_gen(self) -> Generator[bytes, Packet, None]:
        reply = yield packet(b"O", struct.pack(">III", MILTER_VERSION, self.offer_actions,
                                                self.offer_protocol))
        cmd, data = reply
        if cmd != b"O" or len(data) < 12:
            raise MilterProtocolError(f"bad OPTNEG reply {cmd!r} {data[:40]!r}")
        self.version, self.actions, self.protocol = struct.unpack_from(">III", data)
        if self.version < 2:
            raise MilterProtocolError(f"milter protocol version {self.version} is too old")
        unknown = self.protocol & ~self.offer_protocol & ~0x30000000
        if unknown:
            raise MilterProtocolError(f"milter wants protocol flags 0x{unknown:x} not offered")
        rest = data[12:]
        while len(rest) >= 4:  # smfi_setsymlist: (stage word, "name name ...\0")*
            (where,) = struct.unpack_from(">I", rest)
            names, _, rest = rest[4:].partition(b"\0")
            stage = {0: b"C", 1: b"H", 2: b"M", 3: b"R", 4: b"T", 5: b"E", 6: b"N"}.get(where)
            if stage is not None:
                self.symlists[stage] = {_norm_macro(n) for n in decode(names).split()}
        self.negotiated = True

    # -- one message

    def default_macros(self, msg: Message, client_ip: str, auth_authen: str | None,
                       queue_id: str) -> dict[bytes, dict[str, str | None]]:
        return {
            b"C": {"j": self.mta_name, "{daemon_name}": self.daemon_name,
                   "{client_addr}": client_ip, "{client_name}": f"[{client_ip}]"},
            b"M": {"i": queue_id, "{mail_addr}": msg.mail_from.strip("<>"),
                   "{auth_type}": "PLAIN" if auth_authen else None,
                   "{auth_authen}": auth_authen},
            b"T": {"i": queue_id},
            b"E": {"i": queue_id},
        }

    def message_gen(self, msg: Message, *, auth_authen: str | None = None,
                    client_name: str | None = None,
                    ) -> Generator[bytes, Packet, MilterResult]:
        """Send one message (and the SMTP session start if needed); return the decision."""
        leadspc = self._has(SMFIP_HDR_LEADSPC)
        result = MilterResult("continue", None, [], 0.0, leadspc=leadspc)
        user = _macro_stages(msg.macros)
        queue_id = user.get(b"M", {}).get("i") or _new_queue_id()  # one id for the message
        macros = self.default_macros(msg, msg.client_ip, auth_authen, queue_id)
        for stage, extra in user.items():
            macros.setdefault(stage, {}).update(extra)

        def decided(reply: Packet, stage: str) -> bool:
            """Record a non-continue reply; True if it ends the message."""
            cmd, data = reply
            if cmd == b"c":
                return False
            if cmd == b"s" and stage == "body":
                return False
            result.stage = stage
            if cmd == b"y":
                text = decode(data.rstrip(b"\0"))
                result.reply = text
                result.action = "tempfail" if text.startswith("4") else "reject"
            elif cmd in FINAL_REPLIES:
                result.action = FINAL_REPLIES[cmd]
            else:
                raise MilterProtocolError(f"unexpected reply {cmd!r} at {stage}")
            return True

        if self.needs_new_connection(msg):
            raise MilterProtocolError("a new SMTP session needs a new milter connection")
        if self.smtp_session is None:
            self.smtp_session = (msg.client_ip, msg.helo)
            if not self._has(SMFIP_NOCONNECT):
                self._macros(b"C", macros.get(b"C"))
                try:
                    family = b"%d" % ipaddress.ip_address(msg.client_ip).version
                    data = (cstr(client_name or f"[{msg.client_ip}]") + family
                            + struct.pack(">H", CLIENT_PORT) + cstr(msg.client_ip))
                except ValueError:  # not an IP address: family unknown
                    data = cstr(client_name or "unknown") + b"U"
                reply = yield from self._request(packet(b"C", data),
                                                 not self._has(SMFIP_NR_CONN))
                if reply is not None and decided(reply, "connect"):
                    self.session_over = True
                    return result
            if not self._has(SMFIP_NOHELO):
                self._macros(b"H", macros.get(b"H"))
                reply = yield from self._request(packet(b"H", cstr(msg.helo)),
                                                 not self._has(SMFIP_NR_HELO))
                if reply is not None and decided(reply, "helo"):
                    self.session_over = True
                    return result

        def abort() -> MilterResult:
            self.pending += packet(b"A")
            return result

        if not self._has(SMFIP_NOMAIL):
            self._macros(b"M", macros.get(b"M"))
            sender = msg.mail_from if msg.mail_from.startswith("<") else f"<{msg.mail_from}>"
            reply = yield from self._request(packet(b"M", cstr(sender)),
                                             not self._has(SMFIP_NR_MAIL))
            if reply is not None and decided(reply, "mail"):
                return abort()
        if not self._has(SMFIP_NORCPT):
            accepted = 0
            for rcpt in msg.rcpts:
                self._macros(b"R", {**macros.get(b"R", {}), "{rcpt_addr}": rcpt.strip("<>")})
                addr = rcpt if rcpt.startswith("<") else f"<{rcpt}>"
                reply = yield from self._request(packet(b"R", cstr(addr)),
                                                 not self._has(SMFIP_NR_RCPT))
                if reply is not None and reply[0] != b"c":
                    if reply[0] in (b"r", b"t", b"y"):
                        result.rcpts_rejected += 1
                        if reply[0] == b"y":
                            result.reply = decode(reply[1].rstrip(b"\0"))
                        continue
                    decided(reply, "rcpt")
                    return abort()
                accepted += 1
            if accepted == 0 and msg.rcpts:
                result.stage = "rcpt"
                result.action = "tempfail" if (result.reply or "").startswith("4") else "reject"
                return abort()
        if not self._has(SMFIP_NODATA) and self.version >= 4:
            self._macros(b"T", macros.get(b"T"))
            reply = yield from self._request(packet(b"T"), not self._has(SMFIP_NR_DATA))
            if reply is not None and decided(reply, "data"):
                return abort()
        parsed = msg.parsed()
        if not self._has(SMFIP_NOHDRS):
            self._macros(b"L", macros.get(b"L"))
            needs = not self._has(SMFIP_NR_HDR)
            for wire in parsed.header_packets(leadspc):
                reply = yield from self._request(wire, needs)
                if reply is not None and decided(reply, "header"):
                    return abort()
        if not self._has(SMFIP_NOEOH):
            self._macros(b"N", macros.get(b"N"))
            reply = yield from self._request(packet(b"N"), not self._has(SMFIP_NR_EOH))
            if reply is not None and decided(reply, "eoh"):
                return abort()
        if not self._has(SMFIP_NOBODY):
            self._macros(b"B", macros.get(b"B"))
            needs = not self._has(SMFIP_NR_BODY)
            for wire in parsed.body_packets:
                reply = yield from self._request(wire, needs)
                if reply is not None:
                    if reply[0] == b"s":
                        break
                    if decided(reply, "body"):
                        return abort()
        self._macros(b"E", macros.get(b"E"))
        reply = yield from self._request(packet(b"E"), True)
        assert reply is not None
        while True:
            cmd, data = reply
            if cmd in (b"h", b"i", b"m"):
                if cmd != b"h":
                    (index,) = struct.unpack_from(">I", data)
                    data = data[4:]
                parts = split_cstrs(data)
                name = decode(parts[0]) if parts else ""
                value = decode(parts[1]) if len(parts) > 1 else ""
                if cmd == b"h":
                    result.modifications.append(("h", name, value))
                    result.headers_added.append((name, value))
                elif cmd == b"i":
                    result.modifications.append(("i", index, name, value))
                    result.headers_added.append((name, value))
                else:
                    result.modifications.append(("m", index, name, value))
            elif cmd in (b"+", b"2", b"e"):
                args = [decode(p) for p in split_cstrs(data)]
                result.modifications.append((cmd.decode(), args[0] if args else "",
                                             " ".join(args[1:])))
            elif cmd == b"-":
                result.modifications.append(("-", decode(data.rstrip(b"\0"))))
            elif cmd == b"b":
                result.modifications.append(("b", data))
            elif cmd == b"q":
                result.quarantine = decode(data.rstrip(b"\0"))
                result.modifications.append(("q", result.quarantine))
            elif cmd == b"p":
                pass
            else:
                decided(reply, "eom")
                if cmd == b"c":
                    result.stage, result.action = "eom", "continue"
                return result
            reply = yield b""

    def quit_bytes(self) -> bytes:
        return self.take_pending() + packet(b"Q")


# ---- one blocking connection -------------------------------------------------------------------


class MilterClient:
    """One milter connection, blocking; the MTA side (see the module docstring)."""

    def __init__(self, socket: str, timeout: float = 30, *, mta_name: str = "mx.test.example",
                 daemon_name: str = "milterload", actions: int = SMFIF_ALL,
                 protocol: int = SMFIP_ALL) -> None:
        self.socket_spec = socket
        self.timeout = timeout
        self.session = MilterSession(mta_name=mta_name, daemon_name=daemon_name,
                                     actions=actions, protocol=protocol)
        self._sock: _Socket | None = None
        self._reader = PacketReader()
        self._buf = bytearray(65536)

    @property
    def negotiated(self) -> tuple[int, int, int]:
        """(version, actions, protocol flags) the milter answered in OPTNEG."""
        return self.session.version, self.session.actions, self.session.protocol

    def _drive(self, gen: Generator[bytes, Packet, Any]) -> Any:
        sock = self._sock
        if sock is None:
            raise MilterProtocolError("not connected")
        try:
            out = next(gen)
            while True:
                if out:
                    sock.sendall(out)
                out = gen.send(self._readpacket(sock))
        except StopIteration as stop:
            return stop.value
        except OSError as exc:
            self.close(quit=False)
            raise MilterProtocolError(f"milter connection failed: {exc}") from exc
        except MilterProtocolError:
            self.close(quit=False)
            raise

    def _readpacket(self, sock: socket.socket) -> Packet:
        while True:
            got = self._reader.pop()
            if got is not None:
                return got
            n = sock.recv_into(self._buf)
            if n == 0:
                raise MilterProtocolError("the milter closed the connection")
            self._reader.feed(memoryview(self._buf)[:n])

    def connect(self) -> None:
        if self._sock is None:
            self._sock = connect_socket(self.socket_spec, self.timeout)

    def negotiate(self, actions: int | None = None, protocol: int | None = None,
                  ) -> tuple[int, int, int]:
        """Connect if needed and do OPTNEG (offering `actions`/`protocol` if given)."""
        self.connect()
        if actions is not None:
            self.session.offer_actions = actions
        if protocol is not None:
            self.session.offer_protocol = protocol
        self._drive(self.session.negotiate_gen())
        return self.negotiated

    def send_message(self, *, client_ip: str = "127.0.0.1", helo: str = "client.example.org",
                     mail_from: str, rcpts: Sequence[str], message: bytes,
                     macros: MacroSpec | None = None, auth_authen: str | None = None,
                     client_name: str | None = None) -> MilterResult:
        """Send one message through the milter and return its decision and modifications."""
        msg = Message(message, mail_from, tuple(rcpts), client_ip, helo, macros)
        if self.session.needs_new_connection(msg):
            self.close()
        if not self.session.negotiated:
            self.negotiate()
        start = time.perf_counter()
        result: MilterResult = self._drive(
            self.session.message_gen(msg, auth_authen=auth_authen, client_name=client_name))
        result.latency = time.perf_counter() - start
        return result

    def close(self, quit: bool = True) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        with contextlib.suppress(OSError):
            if quit and self.session.negotiated:
                sock.sendall(self.session.quit_bytes())
        sock.close()
        self.session = MilterSession(mta_name=self.session.mta_name,
                                     daemon_name=self.session.daemon_name,
                                     actions=self.session.offer_actions,
                                     protocol=self.session.offer_protocol)
        self._reader = PacketReader()

    def __enter__(self) -> MilterClient:
        self.connect()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# ---- load --------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """The outcome of run_load."""

    messages: int  # completed within the measured window
    errors: int  # failed connection attempts and failed exchanges (protocol error, timeout)
    elapsed: float  # seconds of the measured window
    messages_per_second: float
    latency_p50: float  # seconds
    latency_p90: float
    latency_p99: float
    latency_max: float
    actions: dict[str, int]
    connections: int
    processes: int
    driver_cpu: float  # CPU seconds (user+system) the driver's load loops used
    error_samples: list[str] = field(default_factory=list)
    results_sample: list[MilterResult] = field(default_factory=list)

    @property
    def driver_cpu_per_message(self) -> float:
        total = self.messages + self.errors
        return self.driver_cpu / total if total else 0.0

    def summary(self) -> str:
        acts = " ".join(f"{k}={v}" for k, v in sorted(self.actions.items())) or "none"
        return (
            f"milterload: {self.messages} messages in {self.elapsed:.2f} s = "
            f"{self.messages_per_second:.1f} msg/s; latency p50 {self.latency_p50 * 1e3:.2f} ms "
            f"p90 {self.latency_p90 * 1e3:.2f} ms p99 {self.latency_p99 * 1e3:.2f} ms "
            f"max {self.latency_max * 1e3:.2f} ms; errors {self.errors}; {acts}; "
            f"connections {self.connections} in {self.processes} process(es); driver CPU "
            f"{self.driver_cpu / self.elapsed * 100 if self.elapsed else 0:.0f}% of a core "
            f"({self.driver_cpu_per_message * 1e6:.0f} us/msg)"
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["driver_cpu_per_message"] = self.driver_cpu_per_message
        data["results_sample"] = [
            {**asdict(r), "modifications": [[str(x) for x in m] for m in r.modifications]}
            for r in self.results_sample
        ]
        return data


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


@dataclass
class _WorkerOutput:
    latencies: list[float]
    actions: Counter[str]
    errors: int
    error_samples: list[str]
    samples: list[MilterResult]
    cpu: float
    first_start: float
    last_end: float


class _LoopConn:
    """One non-blocking connection of the load loop."""

    __slots__ = ("gen", "msg_start", "next_msg", "out", "reader", "sent", "session", "sock",
                 "waiting_since", "writing")

    def __init__(self, sock: socket.socket, session: MilterSession) -> None:
        self.sock = sock
        self.session = session
        self.reader = PacketReader()
        self.out = bytearray()
        self.gen: Generator[bytes, Packet, Any] | None = None
        self.msg_start = 0.0
        self.sent = 0
        self.waiting_since = 0.0
        self.next_msg: Message | None = None
        self.writing = False  # registered for EVENT_WRITE


def _load_loop(socket_spec: str, messages: Sequence[Message], connections: int, start: float,
               measure_from: float, deadline: float, per_connection: int, timeout: float,
               session_options: Mapping[str, Any], auth_authen: str | None, sample: int,
               offset: int) -> _WorkerOutput:
    """Drive `connections` milter connections from one thread until `deadline`."""
    cpu0 = time.process_time()
    sel = selectors.DefaultSelector()
    out = _WorkerOutput([], Counter(), 0, [], [], 0.0, 0.0, 0.0)
    picker = itertools.cycle(range(len(messages)))
    for _ in range(offset % max(1, len(messages))):
        next(picker)
    buf = bytearray(262144)
    view = memoryview(buf)
    conns: set[_LoopConn] = set()
    retry_at: list[float] = []  # connections waiting to be reopened after an error

    def error(text: str) -> None:
        out.errors += 1
        if len(out.error_samples) < 10:
            out.error_samples.append(text)

    def open_conn(next_msg: Message | None = None) -> bool:
        try:
            sock = connect_socket(socket_spec, timeout)
        except OSError as exc:
            error(f"connect: {exc}")
            return False
        sock.setblocking(False)
        conn = _LoopConn(sock, MilterSession(**session_options))
        conn.next_msg = next_msg
        conns.add(conn)
        sel.register(sock, selectors.EVENT_READ, conn)
        conn.gen = conn.session.negotiate_gen()
        advance(conn, None)
        return True

    def close_conn(conn: _LoopConn, quit: bool) -> None:
        if conn not in conns:
            return
        conns.discard(conn)
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(conn.sock)
        if quit:
            with contextlib.suppress(OSError):
                conn.sock.send(bytes(conn.out) + conn.session.quit_bytes())
        conn.sock.close()

    def fail(conn: _LoopConn, text: str) -> None:
        error(text)
        close_conn(conn, quit=False)
        if time.perf_counter() < deadline:
            retry_at.append(time.perf_counter() + 0.05)

    def start_message(conn: _LoopConn) -> bool:
        """Start the next message; False if it needed a new connection (opened instead)."""
        msg = conn.next_msg or messages[next(picker)]
        conn.next_msg = None
        if conn.session.needs_new_connection(msg):
            close_conn(conn, quit=True)
            if not open_conn(msg):
                retry_at.append(time.perf_counter() + 0.05)
            return False
        conn.msg_start = time.perf_counter()
        conn.gen = conn.session.message_gen(msg, auth_authen=auth_authen)
        return True

    def advance(conn: _LoopConn, got: Packet | None) -> None:
        """Feed `packet` to the connection's generator; on completion, start the next step."""
        while True:
            gen = conn.gen
            assert gen is not None
            try:
                data = next(gen) if got is None else gen.send(got)
            except StopIteration as stop:
                now = time.perf_counter()
                value = stop.value
                if isinstance(value, MilterResult):
                    value.latency = now - conn.msg_start
                    if conn.msg_start >= measure_from and now <= deadline:
                        out.latencies.append(value.latency)
                        out.actions[value.action] += 1
                        out.last_end = now
                        if len(out.samples) < sample:
                            out.samples.append(value)
                    conn.sent += 1
                if now >= deadline:
                    close_conn(conn, quit=True)
                    return
                if per_connection and conn.sent >= per_connection:
                    close_conn(conn, quit=True)
                    open_conn()
                    return
                if not start_message(conn):
                    return
                got = None
                continue
            except MilterProtocolError as exc:
                fail(conn, str(exc))
                return
            conn.out += data
            conn.waiting_since = time.perf_counter()
            flush(conn)
            return

    def flush(conn: _LoopConn) -> None:
        if not conn.out:
            return
        try:
            n = conn.sock.send(conn.out)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            fail(conn, f"send: {exc}")
            return
        del conn.out[:n]
        writing = bool(conn.out)
        if writing != conn.writing:
            conn.writing = writing
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
            with contextlib.suppress(KeyError, ValueError):
                sel.modify(conn.sock, events, conn)

    now = time.perf_counter()
    if start > now:
        time.sleep(start - now)
    for _ in range(connections):
        if not open_conn():
            retry_at.append(time.perf_counter() + 0.05)
    out.first_start = time.perf_counter()
    last_timeout_check = out.first_start
    while conns or (retry_at and time.perf_counter() < deadline):
        now = time.perf_counter()
        if retry_at and min(retry_at) <= now and now < deadline:
            due = [t for t in retry_at if t <= now]
            for t in due:
                retry_at.remove(t)
                if not open_conn():
                    retry_at.append(now + 0.05)
        # after the deadline, give in-flight messages up to `timeout` to finish
        if now > deadline + timeout:
            for conn in list(conns):
                close_conn(conn, quit=False)
            break
        for key, mask in sel.select(timeout=0.05):
            conn = key.data
            if conn not in conns:
                continue
            if mask & selectors.EVENT_WRITE:
                flush(conn)
                if conn not in conns:
                    continue
            if mask & selectors.EVENT_READ:
                try:
                    n = conn.sock.recv_into(buf)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    fail(conn, f"recv: {exc}")
                    continue
                if n == 0:
                    fail(conn, "the milter closed the connection")
                    continue
                conn.reader.feed(view[:n])
                while conn in conns:
                    try:
                        got = conn.reader.pop()
                    except MilterProtocolError as exc:
                        fail(conn, str(exc))
                        break
                    if got is None:
                        break
                    advance(conn, got)
        if now - last_timeout_check > 0.5:
            last_timeout_check = now
            for conn in list(conns):
                if now - conn.waiting_since > timeout:
                    fail(conn, f"no reply within {timeout} s")
    sel.close()
    out.cpu = time.process_time() - cpu0
    return out


def _worker_entry(conn: Any, args: tuple[Any, ...]) -> None:
    try:
        conn.send(_load_loop(*args))
    except BaseException as exc:  # report, do not hang the parent
        conn.send(exc)
    finally:
        conn.close()


def run_load(socket: str, messages: Sequence[Message], *, connections: int, duration: float,
             messages_per_connection: int = 0, processes: int = 1, warmup: float = 0.0,
             timeout: float = 30.0, auth_authen: str | None = None,
             mta_name: str = "mx.test.example", daemon_name: str = "milterload",
             sample: int = 5) -> LoadReport:
    """Keep `connections` milter connections busy for `duration` seconds (after `warmup`),
    each sending the messages round-robin, and report throughput and latency.

    messages_per_connection: close (SMFIC_QUIT) and reopen a connection after that many
    messages; 0 = one connection for the whole run. processes > 1 splits the connections over
    that many worker processes (fork), each running its own selector loop."""
    if not messages:
        raise ValueError("no messages to send")
    if connections < 1:
        raise ValueError("connections must be >= 1")
    for msg in messages:
        msg.parsed()  # parse once, before any fork
    processes = max(1, min(processes, connections))
    session_options = {"mta_name": mta_name, "daemon_name": daemon_name}
    start = time.perf_counter() + (0.2 if processes > 1 else 0.0)
    measure_from = start + warmup
    deadline = measure_from + duration
    shares = [connections // processes + (1 if i < connections % processes else 0)
              for i in range(processes)]
    outputs: list[_WorkerOutput] = []
    if processes == 1:
        outputs.append(_load_loop(socket, messages, connections, start, measure_from, deadline,
                                  messages_per_connection, timeout, session_options,
                                  auth_authen, sample, 0))
    else:
        ctx = multiprocessing.get_context("fork")
        workers = []
        for i, share in enumerate(shares):
            parent_end, child_end = ctx.Pipe(duplex=False)
            args = (socket, messages, share, start, measure_from, deadline,
                    messages_per_connection, timeout, session_options, auth_authen, sample,
                    i * 7)
            proc = ctx.Process(target=_worker_entry, args=(child_end, args), daemon=True)
            proc.start()
            child_end.close()
            workers.append((proc, parent_end))
        for proc, parent_end in workers:
            try:
                got = parent_end.recv()
            except EOFError:
                got = RuntimeError(f"load worker {proc.pid} died (exit {proc.exitcode})")
            proc.join(10)
            if isinstance(got, BaseException):
                raise RuntimeError(f"load worker failed: {got!r}") from got
            outputs.append(got)
    latencies = sorted(itertools.chain.from_iterable(o.latencies for o in outputs))
    actions: Counter[str] = Counter()
    for o in outputs:
        actions.update(o.actions)
    ends = [o.last_end for o in outputs if o.latencies]
    elapsed = (max(ends) - measure_from) if ends else duration
    elapsed = max(elapsed, min(duration, 1e-3))
    count = len(latencies)
    return LoadReport(
        messages=count,
        errors=sum(o.errors for o in outputs),
        elapsed=elapsed,
        messages_per_second=count / elapsed if elapsed > 0 else 0.0,
        latency_p50=_percentile(latencies, 0.50),
        latency_p90=_percentile(latencies, 0.90),
        latency_p99=_percentile(latencies, 0.99),
        latency_max=latencies[-1] if latencies else 0.0,
        actions=dict(actions),
        connections=connections,
        processes=processes,
        driver_cpu=sum(o.cpu for o in outputs),
        error_samples=[e for o in outputs for e in o.error_samples][:10],
        results_sample=[r for o in outputs for r in o.samples][:sample],
    )


# ---- CLI ---------------------------------------------------------------------------------------


def _parse_macros(items: Iterable[str]) -> dict[str, str]:
    macros = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--macro wants NAME=VALUE, got {item!r}")
        macros[name] = value
    return macros


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", required=True,
                        help="unix:/path, inet:PORT@HOST or inet:HOST:PORT")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds to measure")
    parser.add_argument("--warmup", type=float, default=0.0, help="seconds before measuring")
    parser.add_argument("--message", action="append", default=[], type=Path,
                        help="message file (repeatable; sent round-robin)")
    parser.add_argument("--size", type=int, default=4096,
                        help="size of the generated message when no --message is given")
    parser.add_argument("--mail-from", default="alice@example.org")
    parser.add_argument("--rcpt", action="append", default=[])
    parser.add_argument("--client-ip", default="127.0.0.1")
    parser.add_argument("--helo", default="client.example.org")
    parser.add_argument("--auth-authen", default=None,
                        help="{auth_authen} (and {auth_type}=PLAIN) macros at MAIL")
    parser.add_argument("--macro", action="append", default=[], metavar="NAME=VALUE",
                        help="extra macro, placed by name (see the module docstring)")
    parser.add_argument("--mta-name", default="mx.test.example", help="the j macro")
    parser.add_argument("--messages-per-connection", type=int, default=0,
                        help="QUIT and reconnect after N messages (0: never)")
    parser.add_argument("--processes", type=int, default=1,
                        help="worker processes sharing the connections")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    args = parser.parse_args(argv)

    macros = _parse_macros(args.macro) or None
    rcpts = tuple(args.rcpt) or ("bob@example.net",)
    datas = [p.read_bytes() for p in args.message] or [make_message(args.size,
                                                                    from_addr=args.mail_from)]
    messages = [Message(d, args.mail_from, rcpts, args.client_ip, args.helo, macros)
                for d in datas]
    report = run_load(args.socket, messages, connections=args.connections,
                      duration=args.duration, messages_per_connection=args.messages_per_connection,
                      processes=args.processes, warmup=args.warmup, timeout=args.timeout,
                      auth_authen=args.auth_authen, mta_name=args.mta_name)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    else:
        print(report.summary())
        for text in report.error_samples[:3]:
            print(f"  error: {text}", file=sys.stderr)
    if report.messages == 0:
        return 1
    return 0 if report.errors == 0 else 2


if __name__ == "__main__":
    sys.exit(main())
