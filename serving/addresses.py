"""Where the service binds: parsing ZeroMQ endpoints and telling loopback from the network.

One place for the rule "nothing beyond loopback unless exposed": :func:`is_loopback_host` is what the
configuration, the preflight checks and the socket census test all ask.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = [
    "ALL_INTERFACES",
    "LOOPBACK",
    "Endpoint",
    "EndpointError",
    "is_loopback_host",
    "parse_endpoint",
]

#: The loopback address the service binds by default.
LOOPBACK = "127.0.0.1"
#: What an exposed service binds instead of :data:`LOOPBACK`.
ALL_INTERFACES = "0.0.0.0"

_TCP = re.compile(r"^tcp://(?P<host>\[[^\]]+\]|[^:/\[\]]+):(?P<port>\*|\d+)$")
_LOCAL_TRANSPORTS = ("ipc://", "inproc://")


class EndpointError(ValueError):
    """An endpoint string that ZeroMQ would refuse (or bind somewhere unexpected)."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A parsed ZeroMQ bind endpoint.

    ``host`` is ``None`` for the machine-local transports (``ipc://``, ``inproc://``); ``port`` is ``None``
    for those and for a wildcard port (``tcp://127.0.0.1:*``).
    """

    text: str
    host: str | None
    port: int | None

    @property
    def is_local(self) -> bool:
        """Reachable from this machine only (loopback TCP, ``ipc://``, ``inproc://``)."""
        return self.host is None or is_loopback_host(self.host)


def parse_endpoint(text: str) -> Endpoint:
    """Parse ``tcp://HOST:PORT`` (``PORT`` may be ``*``), ``ipc://PATH`` or ``inproc://NAME``.

    Raises
    ------
    EndpointError
        With a message saying what a valid endpoint looks like.
    """
    if text.startswith(_LOCAL_TRANSPORTS):
        if text.split("://", 1)[1]:
            return Endpoint(text, None, None)
        raise EndpointError(f"{text!r}: the address after :// is empty")
    match = _TCP.match(text)
    if match is None:
        raise EndpointError(
            f"{text!r} is not a ZeroMQ endpoint: expected tcp://HOST:PORT (e.g. tcp://127.0.0.1:5555, "
            "tcp://0.0.0.0:5555, tcp://127.0.0.1:* for a free port), ipc://PATH or inproc://NAME"
        )
    host = match["host"].strip("[]")
    if match["port"] == "*":
        return Endpoint(text, host, None)
    port = int(match["port"])
    if not 0 < port < 65536:
        raise EndpointError(f"{text!r}: port {port} is outside 1-65535")
    return Endpoint(text, host, port)


def is_loopback_host(host: str) -> bool:
    """True for addresses only this machine can reach: ``127.0.0.0/8``, ``::1`` (also IPv4-mapped),
    ``localhost`` and the loopback interface ``lo``."""
    host = host.strip("[]")
    if host in ("localhost", "lo"):
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False  # a host name or an interface name: it may well be reachable from elsewhere
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))
