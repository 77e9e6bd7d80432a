"""The MTA side of the milter wire protocol (version 6): constants, packet framing, the data of
each command, and the reading of replies.

The one encoder every MTA-side client here uses: `milterload.MilterClient` (tests and
benchmarks), `verify_bench`'s chained lanes, and the protocol tests that need to send a single
packet by hand -- a malformed one included. It knows nothing of mailwarden.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

MILTER_VERSION = 6
MILTER_CHUNK_SIZE = 65535
MAX_PACKET = 16 * 1024 * 1024
CLIENT_PORT = 40000  # the SMTP client's port in SMFIC_CONNECT

SMFIF_ALL = 0x1FF  # ADDHDRS CHGBODY ADDRCPT DELRCPT CHGHDRS QUARANTINE CHGFROM ADDRCPT_PAR
#                   SETSYMLIST

SMFIP_NOCONNECT = 0x01
SMFIP_NOHELO = 0x02
SMFIP_NOMAIL = 0x04
SMFIP_NORCPT = 0x08
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_SKIP = 0x400
SMFIP_RCPT_REJ = 0x800
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
SMFIP_HDR_LEADSPC = 0x100000
SMFIP_ALL = 0x1FFFFF  # every v6 step flag; the MDS_* data-size bits are not offered

FINAL_REPLIES = {
    b"a": "accept", b"c": "continue", b"r": "reject", b"t": "tempfail", b"d": "discard",
    b"f": "connfail", b"4": "shutdown",
}
STAGES = {
    "connect": b"C", "helo": b"H", "mail": b"M", "rcpt": b"R", "data": b"T", "header": b"L",
    "eoh": b"N", "body": b"B", "eom": b"E", "unknown": b"U",
}

Packet = tuple[bytes, bytes]  # (command byte, data)


class MilterProtocolError(Exception):
    """The milter broke the protocol, closed the connection, or did not answer in time."""


# -- writing -------------------------------------------------------------------------------------
def packet(cmd: bytes, data: bytes = b"") -> bytes:
    """One packet: 32-bit network-order length (command byte included), command, data."""
    return struct.pack(">I", len(data) + 1) + cmd + data


def cstr(value: str | bytes) -> bytes:
    """A NUL-terminated string (NULs inside are dropped: the protocol cannot carry them)."""
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
    return raw.replace(b"\0", b"") + b"\0"


def optneg(actions: int = SMFIF_ALL, protocol: int = SMFIP_ALL,
           version: int = MILTER_VERSION) -> bytes:
    """SMFIC_OPTNEG data: version, the actions and the protocol steps offered."""
    return struct.pack(">III", version, actions, protocol)


def connect_data(name: str, address: str | None, port: int = CLIENT_PORT) -> bytes:
    """SMFIC_CONNECT data: host name, family ('4', '6', or 'U' with no address), port,
    address."""
    if address is None:
        return cstr(name) + b"U"
    family = b"6" if ":" in address else b"4"
    return cstr(name) + family + struct.pack(">H", port) + cstr(address)


def macro_data(stage: bytes, macros: dict[str, str]) -> bytes:
    """SMFIC_MACRO data: the command the macros belong to, then name/value pairs."""
    return stage + b"".join(cstr(name) + cstr(value) for name, value in macros.items())


def header_data(name: str | bytes, value: str | bytes) -> bytes:
    """SMFIC_HEADER data: name and value."""
    return cstr(name) + cstr(value)


# -- reading -------------------------------------------------------------------------------------
def decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def split_cstrs(data: bytes) -> list[bytes]:
    parts = data.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return parts


def split_packets(raw: bytes) -> list[Packet]:
    """Every packet of `raw`, which must end on a packet boundary."""
    reader = PacketReader()
    reader.feed(raw)
    found = []
    while (item := reader.pop()) is not None:
        found.append(item)
    if len(reader):
        raise MilterProtocolError(f"{len(reader)} bytes after the last whole packet")
    return found


def index_edit(data: bytes) -> tuple[int, str, str]:
    """SMFIR_INSHEADER / SMFIR_CHGHEADER data: index, name, value."""
    (index,) = struct.unpack_from(">I", data)
    parts = split_cstrs(data[4:])
    if len(parts) != 2:
        raise MilterProtocolError(f"a header edit of {len(parts)} strings: {data!r}")
    return index, decode(parts[0]), decode(parts[1])


class PacketReader:
    """Splits a byte stream into milter packets."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def pop(self) -> Packet | None:
        buf = self._buf
        if len(buf) < 5:
            return None
        (size,) = struct.unpack_from(">I", buf)
        if size < 1 or size > MAX_PACKET:
            raise MilterProtocolError(f"bad packet length {size}")
        if len(buf) < 4 + size:
            return None
        cmd = bytes(buf[4:5])
        data = bytes(buf[5:4 + size])
        del buf[:4 + size]
        return cmd, data

    def __len__(self) -> int:
        return len(self._buf)


def read_packet(sock: socket.socket) -> Packet:
    """One whole packet from a blocking socket."""
    def exactly(size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                raise MilterProtocolError("the milter closed the connection")
            data += chunk
        return data

    (size,) = struct.unpack(">I", exactly(4))
    if size < 1 or size > MAX_PACKET:
        raise MilterProtocolError(f"bad packet length {size}")
    raw = exactly(size)
    return raw[:1], raw[1:]


# -- sockets -------------------------------------------------------------------------------------
def parse_socket(spec: str) -> tuple[int, Any]:
    """(address family, address) for a milter socket in libmilter or Postfix syntax:
    ``unix:/p``, ``local:/p``, ``/p``, ``inet:PORT@HOST``, ``inet:PORT`` (127.0.0.1),
    ``inet:HOST:PORT`` (Postfix), ``inet6:PORT@HOST``."""
    if spec.startswith("/"):
        return socket.AF_UNIX, spec
    kind, sep, rest = spec.partition(":")
    if not sep:
        raise ValueError(f"bad milter socket {spec!r}")
    kind = kind.lower()
    if kind in ("unix", "local"):
        return socket.AF_UNIX, rest
    if kind in ("inet", "inet6"):
        family = socket.AF_INET6 if kind == "inet6" else socket.AF_INET
        if "@" in rest:
            port, _, host = rest.partition("@")
        elif kind == "inet" and rest.count(":") == 1:
            host, _, port = rest.partition(":")
        else:
            port, host = rest, ("::1" if kind == "inet6" else "127.0.0.1")
        return family, (host.strip("[]"), int(port))
    raise ValueError(f"bad milter socket {spec!r}")


def connect_socket(spec: str, timeout: float | None) -> socket.socket:
    family, address = parse_socket(spec)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    if family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
