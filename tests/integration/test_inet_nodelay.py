"""Milter connections over inet: accepted sockets carry TCP_NODELAY (set once on the listening
socket by the daemon), which removes the ~40 ms Nagle/delayed-ACK stall per message."""

from __future__ import annotations

import socket

from mailwarden.daemon import _no_delay


def test_accepted_connections_inherit_tcp_nodelay() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        _no_delay(listener.fileno())
        with socket.create_connection(listener.getsockname()):
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_unix_listeners_are_left_alone(tmp_path: object) -> None:
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(f"{tmp_path}/s.sock")
        listener.listen(1)
        _no_delay(listener.fileno())  # no TCP option on a unix socket: nothing raised
        assert listener.family == socket.AF_UNIX
