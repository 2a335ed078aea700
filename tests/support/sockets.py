"""Small socket checks shared by the web tests."""

from __future__ import annotations

import socket


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the peer closes (FIN) or resets the connection within `seconds`; False if still open."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
