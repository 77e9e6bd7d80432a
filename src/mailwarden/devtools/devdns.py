"""A small in-memory DNS server on loopback, for tests, demos and benchmarks.

Zone data (the openspf SPF test-suite format) is read, compiled (once, at
:meth:`DevDNSServer.load` time) and answered from by devzone.py; this module is the server.
UDP and TCP are served on the same port from daemon threads.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import selectors
import signal
import socket
import struct
import threading
import time
from collections.abc import Mapping
from types import FrameType, TracebackType
from typing import Any, Final

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.CNAME
import dns.rdtypes.ANY.DNAME
import dns.rdtypes.ANY.NS
import dns.rdtypes.ANY.PTR
import dns.rdtypes.ANY.SPF
import dns.rdtypes.ANY.TXT
import dns.rdtypes.nsbase
import dns.rdtypes.txtbase
import dns.rrset

from mailwarden.devtools.devzone import (
    Node,
    compile_zone,
    load_zone_file,
    lookup,
)

__all__ = ["DevDNSServer", "load_zone_file", "main"]

EDNS_PAYLOAD: Final = 1232
TCP_IDLE_TIMEOUT: Final = 30.0


_IN = dns.rdataclass.IN
_SOA_MNAME: Final = dns.name.from_text("ns.devdns.invalid.")
_SOA_RNAME: Final = dns.name.from_text("hostmaster.devdns.invalid.")


# --------------------------------------------------------------------------- server


class DevDNSServer:
    """Threaded UDP+TCP DNS server answering from in-memory zone data."""

    def __init__(
        self,
        zone: Mapping[str, Any] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        spf_as_txt: bool = True,
        negative_ttl: int = 300,
    ) -> None:
        self.host = host
        self.spf_as_txt = spf_as_txt
        self.negative_ttl = negative_ttl
        self.delay: float = 0.0
        self.queries: list[tuple[str, str, str]] = []
        self._port = port
        self._log_lock = threading.Lock()
        self._zone: dict[dns.name.Name, Node] = {}
        self._soa = dns.rdata.from_text(
            _IN, dns.rdatatype.SOA, f"{_SOA_MNAME} {_SOA_RNAME} 1 3600 600 86400 {negative_ttl}"
        )
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._conn_threads: set[threading.Thread] = set()
        self._conns_lock = threading.Lock()
        self._stopping = threading.Event()
        self._pending: list[tuple[float, int, bytes, Any]] = []
        self._pending_cv = threading.Condition()
        self._seq = itertools.count()
        self.load(zone or {})

    # ------------------------------------------------------------------ public API

    @property
    def port(self) -> int:
        """The bound port (or the configured one before :meth:`start`)."""
        return self._port

    def load(self, zone: Mapping[str, Any]) -> None:
        """Replace the zone data atomically; the query log is kept."""
        self._zone = compile_zone(zone, self.spf_as_txt)

    def clear_log(self) -> None:
        """Empty the query log."""
        with self._log_lock:
            self.queries.clear()

    def start(self) -> None:
        """Bind UDP and TCP on the same port and start serving in daemon threads."""
        if self._udp is not None:
            raise RuntimeError("server already started")
        self._udp, self._tcp = self._bind()
        self._port = self._udp.getsockname()[1]
        self._wake = socket.socketpair()
        self._stopping.clear()
        self._threads = [
            threading.Thread(target=self._serve, name="devdns-loop", daemon=True),
            threading.Thread(target=self._send_delayed, name="devdns-delay", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop serving, close all sockets and join threads; safe to call twice."""
        if self._udp is None or self._tcp is None or self._wake is None:
            return
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake[1].send(b"x")
        with self._pending_cv:
            self._pending_cv.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)
        with self._conns_lock:
            conns, threads = list(self._conns), list(self._conn_threads)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=5)
        for sock in (self._udp, self._tcp, *self._wake):
            sock.close()
        self._udp = self._tcp = self._wake = None
        self._threads = []
        self._pending.clear()

    def __enter__(self) -> DevDNSServer:
        if self._udp is None:  # allow ``with`` on an already started server
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ sockets

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        attempts = 50 if self._port == 0 else 1
        for attempt in range(attempts):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            tcp = socket.socket(family, socket.SOCK_STREAM)
            try:
                udp.bind((self.host, self._port))
                port = udp.getsockname()[1]
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((self.host, port))
                tcp.listen(64)
            except OSError:
                udp.close()
                tcp.close()
                if attempt == attempts - 1:
                    raise
                continue
            udp.setblocking(False)
            tcp.setblocking(False)
            return udp, tcp
        raise OSError("could not bind UDP and TCP on the same port")  # pragma: no cover

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None and self._wake is not None
        udp, tcp, wake = self._udp, self._tcp, self._wake[0]
        with selectors.DefaultSelector() as sel:
            sel.register(udp, selectors.EVENT_READ)
            sel.register(tcp, selectors.EVENT_READ)
            sel.register(wake, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in sel.select():
                    if key.fileobj is wake:
                        return
                    try:
                        if key.fileobj is udp:
                            self._on_udp(udp)
                        else:
                            self._on_accept(tcp)
                    except Exception:  # never let one bad packet kill the loop
                        continue

    def _on_udp(self, udp: socket.socket) -> None:
        try:
            data, addr = udp.recvfrom(65535)
        except OSError:
            return
        out = self._handle(data, "udp")
        if out is None:
            return
        if self.delay > 0:
            with self._pending_cv:
                due = time.monotonic() + self.delay
                heapq.heappush(self._pending, (due, next(self._seq), out, addr))
                self._pending_cv.notify()
            return
        with contextlib.suppress(OSError):
            udp.sendto(out, addr)

    def _send_delayed(self) -> None:
        """Send delayed UDP responses when due (keeps the receive loop non-blocking)."""
        while True:
            with self._pending_cv:
                while not self._stopping.is_set():
                    now = time.monotonic()
                    if self._pending and self._pending[0][0] <= now:
                        break
                    wait = self._pending[0][0] - now if self._pending else None
                    self._pending_cv.wait(wait)
                if self._stopping.is_set():
                    return
                _, _, out, addr = heapq.heappop(self._pending)
            udp = self._udp
            if udp is not None:
                with contextlib.suppress(OSError):
                    udp.sendto(out, addr)

    def _on_accept(self, tcp: socket.socket) -> None:
        try:
            conn, _ = tcp.accept()
        except OSError:
            return
        conn.settimeout(TCP_IDLE_TIMEOUT)
        thread = threading.Thread(target=self._serve_tcp, args=(conn,), daemon=True)
        with self._conns_lock:
            self._conns.add(conn)
            self._conn_threads.add(thread)
        thread.start()

    def _serve_tcp(self, conn: socket.socket) -> None:
        try:
            with conn:
                while not self._stopping.is_set():
                    header = _recv_exact(conn, 2)
                    if header is None:
                        return
                    data = _recv_exact(conn, struct.unpack("!H", header)[0])
                    if data is None:
                        return
                    out = self._handle(data, "tcp")
                    if out is None:
                        continue
                    if self.delay > 0:
                        time.sleep(self.delay)
                    conn.sendall(struct.pack("!H", len(out)) + out)
        except OSError:
            pass
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
                self._conn_threads.discard(threading.current_thread())

    # ------------------------------------------------------------------ DNS logic

    def _handle(self, data: bytes, proto: str) -> bytes | None:
        """Answer one wire-format query; ``None`` means send nothing."""
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return _bare_response(data, dns.rcode.FORMERR)
        if query.flags & dns.flags.QR:
            return None
        try:
            return self._respond(query, proto)
        except Exception:
            return _bare_response(data, dns.rcode.SERVFAIL)

    def _respond(self, query: dns.message.Message, proto: str) -> bytes | None:
        response = dns.message.make_response(
            query, recursion_available=True, our_payload=EDNS_PAYLOAD
        )
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return response.to_wire()
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        with self._log_lock:
            self.queries.append(
                (qname.to_text(omit_final_dot=True).lower(), dns.rdatatype.to_text(qtype), proto)
            )
        if question.rdclass not in (_IN, dns.rdataclass.ANY):
            response.set_rcode(dns.rcode.REFUSED)
            return response.to_wire()
        result = lookup(self._zone, qname, qtype, self._negative_soa)
        if result is None:
            return None
        response.set_rcode(result.rcode)
        response.answer = result.answer
        response.authority = result.authority
        if result.ad:
            response.flags |= dns.flags.AD
        if proto == "tcp":
            # to_wire() would otherwise cap the size at the query's EDNS payload.
            return response.to_wire(max_size=65535)
        limit = max(512, query.payload) if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            response.answer, response.authority = [], []
            response.flags |= dns.flags.TC
            return response.to_wire()

    def _negative_soa(self, name: dns.name.Name) -> dns.rrset.RRset:
        owner = dns.name.Name(name.labels[-3:]) if len(name.labels) > 3 else name
        return dns.rrset.from_rdata(owner, self.negative_ttl, self._soa)


def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
    """Read exactly *size* bytes, or return ``None`` on EOF."""
    buf = bytearray()
    while len(buf) < size:
        chunk = conn.recv(size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _bare_response(data: bytes, rcode: dns.rcode.Rcode) -> bytes | None:
    """A header-only response with *rcode*, if *data* looks like a query at all."""
    if len(data) < 12 or data[2] & 0x80:
        return None
    (qid,) = struct.unpack("!H", data[:2])
    return struct.pack("!6H", qid, dns.flags.QR | dns.flags.RA | rcode, 0, 0, 0, 0)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """Serve a zone file in the foreground until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m mailwarden.devtools.devdns",
                                     description=__doc__)
    parser.add_argument("zone", help="YAML zone file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait per answer")
    parser.add_argument("--negative-ttl", type=int, default=300)
    parser.add_argument("--no-spf-as-txt", action="store_true")
    args = parser.parse_args(argv)

    server = DevDNSServer(
        load_zone_file(args.zone),
        host=args.host,
        port=args.port,
        spf_as_txt=not args.no_spf_as_txt,
        negative_ttl=args.negative_ttl,
    )
    server.delay = args.delay
    done = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with server:
            shown = f"[{server.host}]" if ":" in server.host else server.host
            print(f"devdns listening on {shown}:{server.port}", flush=True)
            while not done.wait(0.5):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
