"""Binding the service's ZeroMQ sockets (the listener's PULL, the publisher's XPUB) the same way."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import zmq

__all__ = ["bind_socket"]


def bind_socket(
    sock: zmq.Socket[Any], endpoint: str, socket_options: Callable[[zmq.Socket[Any]], None] | None = None
) -> str:
    """Apply the caller's options, bind ``sock`` to ``endpoint`` and return the bound endpoint.

    Wildcard ports (``tcp://127.0.0.1:*``) come back resolved. On failure the socket is closed and the
    ``zmq.ZMQError`` (e.g. the address is in use) propagates.
    """
    if socket_options is not None:
        socket_options(sock)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError:
        sock.close(linger=0)
        raise
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)
