"""The Sendmail milter wire protocol (version 6, as spoken by Postfix and Sendmail 8.14+).

Pure encoding and decoding, no I/O. A packet is a 4-byte big-endian length (of what follows),
a command byte and its data; strings are NUL-terminated. The MTA sends commands (`SMFIC_*`),
the filter answers with replies (`SMFIR_*`). Names follow libmilter's `mfdef.h`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

VERSION = 6

# -- MTA -> filter commands ----------------------------------------------------------------
C_ABORT = ord("A")
C_BODY = ord("B")
C_CONNECT = ord("C")
C_MACRO = ord("D")
C_EOB = ord("E")
C_HELO = ord("H")
C_QUIT_NC = ord("K")
C_HEADER = ord("L")
C_MAIL = ord("M")
C_EOH = ord("N")
C_OPTNEG = ord("O")
C_QUIT = ord("Q")
C_RCPT = ord("R")
C_DATA = ord("T")
C_UNKNOWN = ord("U")

# -- filter -> MTA replies -----------------------------------------------------------------
R_ACCEPT = b"a"
R_CONTINUE = b"c"
R_DISCARD = b"d"
R_ADDHEADER = b"h"
R_INSHEADER = b"i"
R_CHGHEADER = b"m"
R_PROGRESS = b"p"
R_QUARANTINE = b"q"
R_REJECT = b"r"
R_TEMPFAIL = b"t"
R_REPLYCODE = b"y"
R_OPTNEG = b"O"

# -- actions the filter may take (SMFIF_*) -------------------------------------------------
F_ADDHDRS = 0x01
F_CHGBODY = 0x02
F_ADDRCPT = 0x04
F_DELRCPT = 0x08
F_CHGHDRS = 0x10
F_QUARANTINE = 0x20
F_CHGFROM = 0x40
F_ADDRCPT_PAR = 0x80
F_SETSYMLIST = 0x100

# -- protocol steps (SMFIP_*): stages not sent (NO*), stages without a reply (NR_*) --------
P_NOCONNECT = 0x01
P_NOHELO = 0x02
P_NOMAIL = 0x04
P_NORCPT = 0x08
P_NOBODY = 0x10
P_NOHDRS = 0x20
P_NOEOH = 0x40
P_NR_HDR = 0x80
P_NOUNKNOWN = 0x100
P_NODATA = 0x200
P_SKIP = 0x400
P_RCPT_REJ = 0x800
P_NR_CONN = 0x1000
P_NR_HELO = 0x2000
P_NR_MAIL = 0x4000
P_NR_RCPT = 0x8000
P_NR_DATA = 0x10000
P_NR_UNKN = 0x20000
P_NR_EOH = 0x40000
P_NR_BODY = 0x80000
P_HDR_LEADSPC = 0x100000

# -- macro stages in the option negotiation reply (SMFIM_*) --------------------------------
M_CONNECT, M_HELO, M_ENVFROM, M_ENVRCPT, M_DATA, M_EOM, M_EOH = range(7)

# The no-reply bit of each command that normally gets an answer.
NO_REPLY_BIT = {C_CONNECT: P_NR_CONN, C_HELO: P_NR_HELO, C_MAIL: P_NR_MAIL, C_RCPT: P_NR_RCPT,
                C_DATA: P_NR_DATA, C_UNKNOWN: P_NR_UNKN, C_HEADER: P_NR_HDR, C_EOH: P_NR_EOH,
                C_BODY: P_NR_BODY}

# Larger body chunks (libmilter's mfdef.h): offered by the MTA, taken by the filter.
P_MDS_256K = 0x10000000
P_MDS_1M = 0x20000000
# The body chunk a packet may carry: 64 KiB - 1 (MILTER_CHUNK_SIZE), or what was negotiated.
CHUNK_DEFAULT, CHUNK_256K, CHUNK_1M = 65535, 256 * 1024 - 1, 1024 * 1024 - 1
# The largest packet read at all (a 1 MiB body chunk and some room); anything larger is a
# broken peer, before the negotiated limit is even looked at.
MAX_PACKET = 1024 * 1024 + 64
# The oldest protocol version taken (libmilter's SMFI_PROT_VERSION_MIN).
MIN_VERSION = 2

_LENGTH = struct.Struct(">I")
_OPTNEG = struct.Struct(">III")


class ProtocolError(Exception):
    """The peer broke the protocol; the connection cannot continue."""


@dataclass(frozen=True, slots=True)
class Options:
    """The MTA's offer in SMFIC_OPTNEG."""

    version: int
    actions: int
    protocol: int


def packet(reply: bytes, data: bytes = b"") -> bytes:
    return _LENGTH.pack(len(data) + 1) + reply + data


def split_packets(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Remove and return the complete packets at the start of `buffer`; a partial one stays."""
    found: list[tuple[int, bytes]] = []
    offset = 0
    size = len(buffer)
    while size - offset >= 5:
        (length,) = _LENGTH.unpack_from(buffer, offset)
        if length == 0 or length > MAX_PACKET:
            raise ProtocolError(f"packet length {length} out of range")
        end = offset + 4 + length
        if end > size:
            break
        found.append((buffer[offset + 4], bytes(buffer[offset + 5:end])))
        offset = end
    if offset:
        del buffer[:offset]
    return found


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def strings(data: bytes) -> list[str]:
    """NUL-terminated strings, decoded as UTF-8 with undecodable bytes kept as surrogates."""
    if not data:
        return []
    parts = data.split(b"\0")
    if parts[-1] == b"":
        parts.pop()
    return [_text(part) for part in parts]


def parse_options(data: bytes) -> Options:
    if len(data) < _OPTNEG.size:
        raise ProtocolError(f"option negotiation of {len(data)} bytes, expected 12")
    return Options(*_OPTNEG.unpack_from(data))


def options_reply(version: int, actions: int, protocol: int,
                  macros: dict[int, str] | None = None) -> bytes:
    """SMFIC_OPTNEG's answer: what we take of the offer, then the macro list per stage."""
    data = _OPTNEG.pack(version, actions, protocol)
    for stage, names in sorted((macros or {}).items()):
        data += _LENGTH.pack(stage) + names.encode() + b"\0"
    return packet(R_OPTNEG, data)


@dataclass(frozen=True, slots=True)
class Connect:
    hostname: str
    family: str  # "4", "6", "L" (unix socket) or "U" (unknown)
    port: int
    address: str


def parse_connect(data: bytes) -> Connect:
    """SMFIC_CONNECT: hostname NUL, family byte, then for 4/6/L a port and an address."""
    end = data.find(b"\0")
    if end < 0 or end + 1 >= len(data):
        raise ProtocolError("connect without a family")
    hostname = _text(data[:end])
    family = chr(data[end + 1])
    if family == "U" or len(data) < end + 4:
        return Connect(hostname, family, 0, "")
    (port,) = struct.unpack_from(">H", data, end + 2)
    address = _text(data[end + 4:].split(b"\0", 1)[0])
    if family == "6" and address[:5].lower() == "ipv6:":  # Sendmail's form
        address = address[5:]
    return Connect(hostname, family, port, address)


def parse_macros(data: bytes) -> tuple[int, dict[str, str]]:
    """SMFIC_MACRO: the command the macros belong to, then name NUL value NUL pairs.
    Names are stored without braces: `{auth_authen}` and `auth_authen` are one macro."""
    if not data:
        raise ProtocolError("empty macro packet")
    values = strings(data[1:])
    return data[0], {macro_key(name): value for name, value in zip(values[::2], values[1::2],
                                                                     strict=False)}


def macro_key(name: str) -> str:
    return name[1:-1] if name.startswith("{") and name.endswith("}") else name


def parse_header(data: bytes) -> tuple[str, str]:
    name, sep, rest = data.partition(b"\0")
    if not sep:
        raise ProtocolError("header without a value")
    return _text(name), _text(rest[:-1] if rest.endswith(b"\0") else rest)


def reply_code(code: int, status: str, text: str) -> bytes:
    """SMFIR_REPLYCODE "ddd x.y.z text". The text comes from `policy.codes.smtp_text`, with
    every '%' doubled already (Sendmail reads it as a format string; Postfix undoes the
    doubling); a line break would end the reply, so none gets through."""
    clean = text.replace("\r", " ").replace("\n", " ")
    return packet(R_REPLYCODE, f"{code} {status} {clean}".encode("utf-8", "surrogateescape")
                  + b"\0")


def header_edit(reply: bytes, name: str, value: str, index: int | None = None) -> bytes:
    """SMFIR_ADDHEADER (no index), SMFIR_INSHEADER or SMFIR_CHGHEADER (with one); an empty
    value with SMFIR_CHGHEADER deletes the `index`-th field of that name (1-based)."""
    data = b"" if index is None else _LENGTH.pack(index)
    data += name.encode("utf-8", "surrogateescape") + b"\0"
    data += value.encode("utf-8", "surrogateescape") + b"\0"
    return packet(reply, data)


def quarantine(reason: str) -> bytes:
    return packet(R_QUARANTINE, reason.encode("utf-8", "surrogateescape") + b"\0")
