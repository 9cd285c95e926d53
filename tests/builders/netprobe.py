"""A listening socket on 127.0.0.1 that tells whether a build managed to connect to it
(the sandbox must make that impossible)."""

from __future__ import annotations

import socket


def listening_socket() -> tuple[socket.socket, int]:
    """A bound, listening TCP socket on a free loopback port, and that port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(5)
    sock.settimeout(0.5)
    return sock, sock.getsockname()[1]


def accepted(sock: socket.socket) -> bool:
    """Whether someone connected within the socket's timeout."""
    try:
        conn, _ = sock.accept()
    except TimeoutError:
        return False
    conn.close()
    return True
