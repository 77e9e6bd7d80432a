"""Milter connections over inet: accepted sockets carry TCP_NODELAY (set once on the listening
socket), which removes the ~40 ms Nagle/delayed-ACK stall per message."""

from __future__ import annotations

import socket
from pathlib import Path

from mailwarden.server import open_listener


def test_accepted_connections_inherit_tcp_nodelay() -> None:
    with open_listener("inet:0@127.0.0.1") as listener, \
            socket.create_connection(listener.getsockname()):
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_unix_listener_replaces_a_stale_socket_file(tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))  # left behind by a crashed daemon
    with open_listener(f"unix:{path}") as listener:
        assert listener.family == socket.AF_UNIX
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
