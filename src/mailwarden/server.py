"""Sockets for the milter protocol: the listening socket, and one worker's accept loop.

Each worker process waits on the shared listening socket and on its control pipe, and takes a
new connection only while no other worker has fewer connections open (`LoadBoard`, shared
memory): left to the kernel, every connection went to the same worker, one core's worth of
GIL. Every accepted MTA connection is
served by a thread that reads whole buffers, splits them into packets, hands each to its
`Session` and writes all replies of one read in one send. A thread per connection keeps a slow
DNS answer for one message from holding up the others, and the pre-forked workers put every
core to work. Threads are reused: Postfix opens a milter connection per SMTP session, and
starting a thread costs about as much as handling a small message.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import queue
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mailwarden import metrics
from mailwarden import milterproto as mp
from mailwarden.progress import TICKER
from mailwarden.transports.native import Session

log = logging.getLogger("mailwarden.server")

# An MTA that says nothing for this long is given up on (libmilter's default timeout).
IDLE_TIMEOUT = 7210.0
READ_SIZE = 256 * 1024
# Idle threads kept for the next connections; more are started when needed, and a thread
# with nothing to do beyond these ends.
IDLE_THREADS = 8
# Pending connections the kernel queues (capped by net.core.somaxconn, 4096 by default). The MTA
# may connect once per smtpd process all at once (500 under benchmarks/load_soak.py), and on a
# unix socket a full queue fails Postfix's non-blocking connect at once with EAGAIN ("Resource
# temporarily unavailable"): milter_default_action, a 451, instead of a short wait.
LISTEN_BACKLOG = 4096


def socket_path(listen: str) -> Path | None:
    kind, _, rest = listen.partition(":")
    return Path(rest) if kind in ("unix", "local") else None


def open_listener(listen: str, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """Bind and listen on a `config.parse_listen` address: unix:PATH (a stale socket file is
    replaced), inet:PORT[@HOST] or inet6:PORT[@HOST] (no host: every address)."""
    path = socket_path(listen)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if path.is_socket():
                path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            sock.listen(backlog)
        except OSError:
            sock.close()
            raise
        return sock
    kind, _, rest = listen.partition(":")
    port, _, host = rest.partition("@")
    family = socket.AF_INET6 if kind == "inet6" else socket.AF_INET
    infos = socket.getaddrinfo(host.strip("[]") or None, int(port), family, socket.SOCK_STREAM,
                               0, socket.AI_PASSIVE)
    af, kind_, proto, _, address = infos[0]
    sock = socket.socket(af, kind_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Replies leave in one write per read already; TCP_NODELAY (inherited by accepted
        # sockets) keeps a short final reply from waiting for the MTA's delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


_PROGRESS = mp.packet(mp.R_PROGRESS)


def _progress(conn: socket.socket) -> None:
    """SMFIR_PROGRESS, never blocking the ticker (a 5-byte packet into an empty buffer)."""
    if conn.send(_PROGRESS, socket.MSG_DONTWAIT) != len(_PROGRESS):
        raise OSError("progress message cut short")


def converse(conn: socket.socket, session: Session) -> None:
    """Serve one MTA connection until it quits, breaks the protocol, or goes silent."""
    buffer = bytearray()
    # A kernel receive timeout rather than Python's socket timeout, which polls before every
    # read: a blocking recv() then fails with EAGAIN when the MTA has been silent too long.
    seconds = int(IDLE_TIMEOUT)
    timeval = struct.pack("ll", seconds, int((IDLE_TIMEOUT - seconds) * 1e6))
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)  # an MTA that stops reading
    try:
        while True:
            chunk = conn.recv(READ_SIZE)
            if not chunk:
                return
            buffer += chunk
            replies: list[bytes] = []
            try:
                for command, data in mp.split_packets(buffer):
                    if session.awaits_reply(command):
                        if replies:  # in order, before any progress message
                            conn.sendall(b"".join(replies))
                            replies.clear()
                        with TICKER.alive(lambda: _progress(conn), session.progress_interval):
                            reply = session.handle(command, data)
                    else:
                        reply = session.handle(command, data)
                    if reply is not None:
                        replies.append(reply)
            except EOFError:  # SMFIC_QUIT
                if replies:
                    conn.sendall(b"".join(replies))
                return
            if replies:
                conn.sendall(b"".join(replies))
    except mp.ProtocolError as exc:
        log.warning("closing the MTA connection (client %s): protocol error: %s",
                    session.txn.client, exc)
        metrics.METRICS.error("protocol")
    except (TimeoutError, BlockingIOError):
        log.warning("closing the MTA connection (client %s): silent for %g s",
                    session.txn.client, IDLE_TIMEOUT)
    except OSError as exc:
        log.info("MTA connection lost (client %s): %s", session.txn.client, exc)
    finally:
        session.close()
        with contextlib.suppress(OSError):
            conn.close()


class LoadBoard:
    """Open connections per worker slot, in memory shared by the master and its workers.
    A free slot holds -1."""

    _SLOT = struct.Struct("q")

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._memory = mmap.mmap(-1, self._SLOT.size * slots)
        for slot in range(slots):
            self.set(slot, -1)

    def set(self, slot: int, value: int) -> None:
        self._SLOT.pack_into(self._memory, slot * self._SLOT.size, value)

    def get(self, slot: int) -> int:
        value: int = self._SLOT.unpack_from(self._memory, slot * self._SLOT.size)[0]
        return value

    def least_loaded(self, slot: int, slack: int = 1) -> bool:
        """Whether `slot` has at most `slack` connections more than every other live worker
        (the slack lets workers race for a connection instead of waiting for one of them)."""
        mine = self.get(slot) - slack
        return all(mine <= load for other in range(self.slots) if other != slot
                   for load in (self.get(other),) if load >= 0)


class ThreadPool:
    """Runs `converse` for each connection on a waiting thread, or on a new one."""

    def __init__(self, max_idle: int = IDLE_THREADS) -> None:
        self.max_idle = max_idle
        self._jobs: queue.SimpleQueue[tuple[socket.socket, Session]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0

    def submit(self, conn: socket.socket, session: Session) -> None:
        with self._lock:
            waiting = self._idle > 0
            if waiting:
                self._idle -= 1
        if waiting:
            self._jobs.put((conn, session))
        else:
            threading.Thread(target=self._run, args=(conn, session), name="milter",
                             daemon=True).start()

    def _run(self, conn: socket.socket, session: Session) -> None:
        while True:
            converse(conn, session)
            with self._lock:
                if self._idle >= self.max_idle:
                    return
                self._idle += 1
            conn, session = self._jobs.get()


def serve(listener: socket.socket, control: int, new_session: Callable[[], Session],
          on_command: Callable[[bytes], bool], my_turn: Callable[[], bool] = lambda: True
          ) -> None:
    """Accept connections until `on_command` (given each byte read from the control pipe, or
    b"" when the pipe closes) returns False; the listener is then closed in this process.
    A pending connection is left to the other workers while `my_turn()` is False."""
    listener.setblocking(False)
    pool = ThreadPool()
    events = select.epoll()
    events.register(listener.fileno(), select.EPOLLIN)
    events.register(control, select.EPOLLIN)
    try:
        while True:
            for fd, _ in events.poll():
                if fd == control:
                    try:
                        command = os.read(control, 1)
                    except OSError:
                        command = b""
                    if not on_command(command):
                        return
                    continue
                if my_turn():
                    _accept(listener, new_session, pool)
                else:
                    time.sleep(0.0005)  # a less busy worker takes it; else we see it again
    finally:
        events.close()
        listener.close()


def _accept(listener: socket.socket, new_session: Callable[[], Session],
            pool: ThreadPool) -> None:
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return  # another worker took it
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            log.error("cannot accept an MTA connection: %s", exc.strerror)
            time.sleep(0.1)  # the connection stays queued; poll would report it at once
        return
    conn.setblocking(True)
    try:
        session = new_session()
    except Exception:
        log.exception("cannot start a session")
        conn.close()
        return
    pool.submit(conn, session)
