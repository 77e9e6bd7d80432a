"""Sockets for the milter protocol: the listening socket, and one worker's accept loop.

Each worker process polls the shared listening socket and its control pipe; every accepted
MTA connection gets a thread that reads whole buffers, splits them into packets, hands each to
its `Session` and writes all replies of one read in one send. A thread per connection keeps a
slow DNS answer for one message from holding up the others, and the pre-forked workers put every
core to work.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mailwarden import milterproto as mp
from mailwarden.milter import Session

log = logging.getLogger("mailwarden.server")

# An MTA that says nothing for this long is given up on (libmilter's default timeout).
IDLE_TIMEOUT = 7210.0
READ_SIZE = 256 * 1024


def socket_path(listen: str) -> Path | None:
    kind, _, rest = listen.partition(":")
    return Path(rest) if kind in ("unix", "local") else None


def open_listener(listen: str, backlog: int = 128) -> socket.socket:
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


def converse(conn: socket.socket, session: Session) -> None:
    """Serve one MTA connection until it quits, breaks the protocol, or goes silent."""
    buffer = bytearray()
    conn.settimeout(IDLE_TIMEOUT)
    try:
        while True:
            chunk = conn.recv(READ_SIZE)
            if not chunk:
                return
            buffer += chunk
            replies: list[bytes] = []
            try:
                for command, data in mp.split_packets(buffer):
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
    except TimeoutError:
        log.warning("closing the MTA connection (client %s): silent for %g s",
                    session.txn.client, IDLE_TIMEOUT)
    except OSError as exc:
        log.info("MTA connection lost (client %s): %s", session.txn.client, exc)
    finally:
        session.close()
        with contextlib.suppress(OSError):
            conn.close()


def serve(listener: socket.socket, control: int, new_session: Callable[[], Session],
          on_command: Callable[[bytes], bool]) -> None:
    """Accept connections until `on_command` (given each byte read from the control pipe, or
    b"" when the pipe closes) returns False; the listener is then closed in this process."""
    listener.setblocking(False)
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    poller.register(control, select.POLLIN)
    try:
        while True:
            for fd, _ in poller.poll():
                if fd == control:
                    try:
                        command = os.read(control, 1)
                    except OSError:
                        command = b""
                    if not on_command(command):
                        return
                    continue
                _accept(listener, new_session)
    finally:
        listener.close()


def _accept(listener: socket.socket, new_session: Callable[[], Session]) -> None:
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
    threading.Thread(target=converse, args=(conn, session), name="milter",
                     daemon=True).start()
