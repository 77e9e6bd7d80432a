"""One DNS exchange on the wire: the query as bytes, sent over UDP, and over TCP when the
answer is truncated (RFC 7766), each socket operation waiting only for what is left of a
`Deadline`. What the answer means -- records, NXDOMAIN, the cache -- is `mailwarden.dns`."""

from __future__ import annotations

import socket
import struct

from mailwarden.deadline import Deadline

# Queries are built by hand (a fixed header, the question, an EDNS OPT record): measurably
# cheaper than dns.message.make_query() for every uncached lookup. Answers are parsed by dnspython.
_HEADER = struct.Struct("!HHHHHH")
_QUERY_FLAGS = 0x0100 | 0x0020  # RD, and AD to ask for the AD bit (RFC 6840 §5.7)
# EDNS(0) OPT pseudo-RR (RFC 6891 §6.1.2): root owner, type 41, UDP payload 1232, no options.
_EDNS_SIZE = 1232
_OPT = b"\x00" + struct.pack("!HHIH", 41, _EDNS_SIZE, 0, 0)
_MAX_UDP = 65535


def query(qid: int, question: bytes) -> bytes:
    """A recursive query with id `qid` for the wire-format `question` (name, type, class)."""
    return _HEADER.pack(qid, _QUERY_FLAGS, 1, 0, 0, 1) + question + _OPT


def _matches(data: bytes, qid: int, question: bytes) -> bool:
    """An answer to our query: same id, QR set, and our question echoed (case-insensitively)."""
    if len(data) < 12 + len(question):
        return False
    rid, flags, qdcount = struct.unpack_from("!HHH", data)
    return (rid == qid and bool(flags & 0x8000) and qdcount == 1
            and data[12 : 12 + len(question)].lower() == question.lower())


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _wait(sock: socket.socket, until: Deadline) -> None:
    """The timeout of the next socket operation: what is left, or TimeoutError now."""
    remaining = until.remaining()
    if remaining <= 0:
        raise TimeoutError
    sock.settimeout(remaining)


def udp_exchange(wire: bytes, qid: int, question: bytes, address: tuple[str, int],
                  until: Deadline) -> bytes:
    """Send over a connected UDP socket (fresh source port per query, RFC 5452 §9.2) and
    return the first datagram that answers it; stray datagrams (another id, another
    question) are ignored. A datagram over the EDNS size we advertised breaks RFC 6891
    §6.2.5: the server's answer is not used."""
    with socket.socket(_family(address[0]), socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.send(wire)
        while True:
            _wait(sock, until)
            data = sock.recv(_MAX_UDP)
            if _matches(data, qid, question):
                if len(data) > _EDNS_SIZE:
                    raise ValueError(f"a UDP answer of {len(data)} octets, over the "
                                     f"{_EDNS_SIZE} advertised (RFC 6891 §6.2.5)")
                return data


def tcp_exchange(wire: bytes, qid: int, question: bytes, address: tuple[str, int],
                  until: Deadline) -> bytes:
    """RFC 7766: the same query over TCP, with its two-octet length prefix; the connect and
    every read wait only for what is left of `until`."""
    remaining = until.remaining()
    if remaining <= 0:
        raise TimeoutError
    with socket.create_connection(address, timeout=remaining) as sock:
        _wait(sock, until)
        sock.sendall(struct.pack("!H", len(wire)) + wire)
        (length,) = struct.unpack("!H", _recv_exactly(sock, 2, until))
        data = _recv_exactly(sock, length, until)
    if not _matches(data, qid, question):
        raise ValueError("TCP answer does not match the query")
    return data


def _recv_exactly(sock: socket.socket, size: int, until: Deadline) -> bytes:
    chunks: list[bytes] = []
    while size:
        _wait(sock, until)
        chunk = sock.recv(size)
        if not chunk:
            raise EOFError("connection closed by the server")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)
