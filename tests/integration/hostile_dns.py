"""A DNS server on loopback that misbehaves on purpose, one way per instance.

Every query gets the same answer (`TXT "v=spf1 -all"` for its name), spoiled by `mode`:

* ``drip``: over UDP a truncated answer (TC), over TCP the right answer one byte per `pace`
  seconds;
* ``tcp-silent``: truncated over UDP; over TCP the connection is taken and never answered;
* ``tcp-unaccepted``: truncated over UDP; the TCP port's accept queue is kept full, so a
  connection is never completed (the SYN goes unanswered);
* ``wrong-id``: over UDP an answer whose id is not the query's;
* ``oversize``: over UDP an answer bigger than the EDNS size the query advertised (and no TC).

`queries` counts what came in, `open_tcp` the TCP connections the client has not closed yet;
`stop()` ends every thread it started.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time

import dns.flags
import dns.message
import dns.rdataclass
import dns.rdatatype
import dns.rrset

MODES = ("drip", "tcp-silent", "tcp-unaccepted", "wrong-id", "oversize")


class HostileDNS:
    def __init__(self, mode: str, pace: float = 0.5, host: str = "127.0.0.1") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.mode, self.pace, self.host = mode, pace, host
        self.queries = 0
        self.open_tcp = 0
        self._count = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self.udp, self.tcp = self._bind_pair(host)
        self.port = self.udp.getsockname()[1]
        self._socks += [self.udp, self.tcp]

    @staticmethod
    def _bind_pair(host: str) -> tuple[socket.socket, socket.socket]:
        """A UDP and a TCP socket on one port: the port the kernel picks for UDP may be held
        over TCP by another test's connection, so a few are tried."""
        for _ in range(20):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((host, 0))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((host, udp.getsockname()[1]))
            except OSError:
                udp.close()
                tcp.close()
                continue
            return udp, tcp
        raise OSError("no port free for both UDP and TCP")

    # -- life -------------------------------------------------------------------------------
    def start(self) -> HostileDNS:
        if self.mode == "tcp-unaccepted":
            # a backlog of zero, filled: further SYNs are dropped, connect() never completes
            self.tcp.listen(0)
            for _ in range(4):
                filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError, OSError):
                    filler.connect((self.host, self.port))
                self._socks.append(filler)
            time.sleep(0.2)
        else:
            self.tcp.listen(16)
            self._spawn(self._accept_loop)
        self._spawn(self._udp_loop)
        return self

    def stop(self) -> None:
        self._stop.set()
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> HostileDNS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    # -- answers ----------------------------------------------------------------------------
    @staticmethod
    def answer(query: dns.message.Message, size: int = 0) -> dns.message.Message:
        """The right answer, padded with further TXT records to at least `size` octets."""
        response = dns.message.make_response(query)
        name = query.question[0].name
        rrset = dns.rrset.from_text(name, 60, dns.rdataclass.IN, dns.rdatatype.TXT,
                                    '"v=spf1 -all"')
        response.answer.append(rrset)
        n = 0
        while size and len(response.to_wire(max_size=65535)) < size:
            rrset.add(dns.rrset.from_text(name, 60, dns.rdataclass.IN, dns.rdatatype.TXT,
                                          f'"padding {n:04d} {"x" * 200}"')[0])
            n += 1
        return response

    def _udp_loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.udp, selectors.EVENT_READ)
        while not self._stop.is_set():
            if not sel.select(0.1):
                continue
            try:
                data, peer = self.udp.recvfrom(65535)
                query = dns.message.from_wire(data)
            except (OSError, ValueError, dns.exception.DNSException):
                continue
            self.queries += 1
            if self.mode == "wrong-id":
                response = self.answer(query)
                response.id = (query.id + 1) & 0xFFFF
                wire = response.to_wire()
            elif self.mode == "oversize":
                wire = self.answer(query, 4000).to_wire(max_size=65535)
            else:
                response = dns.message.make_response(query)
                response.flags |= dns.flags.TC
                wire = response.to_wire()
            with contextlib.suppress(OSError):
                self.udp.sendto(wire, peer)

    def _accept_loop(self) -> None:
        self.tcp.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except (TimeoutError, OSError):
                continue
            self._socks.append(conn)
            with self._count:
                self.open_tcp += 1
            self._spawn(self._serve_tcp, conn)

    def _serve_tcp(self, conn: socket.socket) -> None:
        try:
            self._answer_tcp(conn)
        finally:
            with self._count:
                self.open_tcp -= 1

    def _until_closed(self, conn: socket.socket) -> None:
        """Read (and drop) until the client closes the connection."""
        while not self._stop.is_set():
            try:
                if not conn.recv(4096):
                    return
            except TimeoutError:
                continue
            except OSError:
                return

    def _answer_tcp(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        data = b""
        while not self._stop.is_set() and (len(data) < 2
                                           or len(data) < 2 + struct.unpack("!H", data[:2])[0]):
            try:
                chunk = conn.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            data += chunk
        if self._stop.is_set():
            return
        self.queries += 1
        if self.mode == "tcp-silent":
            self._until_closed(conn)
            return
        wire = self.answer(dns.message.from_wire(data[2:])).to_wire()
        for octet in struct.pack("!H", len(wire)) + wire:  # drip
            if self._stop.wait(self.pace):
                return
            try:
                conn.sendall(bytes([octet]))
            except OSError:
                return
        self._until_closed(conn)
