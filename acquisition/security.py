"""ZeroMQ CURVE for the frame and result sockets: key pairs, the server's allowlist, the clients' keys.

CURVE gives each side a long-term key pair. The service's sockets are CURVE servers: they hold the
service's secret key, and ZeroMQ's own authenticator (``zmq.auth``, the ZAP protocol) admits only clients
whose public key is on an allowlist (a directory of public certificates). A client (``FrameSender``,
``ResultSubscriber``) holds its own pair and the service's public key. Traffic is encrypted both ways.

Key files are ZeroMQ's certificate format (``zmq.auth.create_certificates``): ``NAME.key`` holds the public
key and may be copied anywhere; ``NAME.key_secret`` holds both keys and stays with its owner.

Built on the ``socket_options`` seam of :class:`~acquisition.listener.FrameListener` and
:class:`~acquisition.publisher.ResultPublisher`: :meth:`CurveServer.socket_kwargs` returns the options and
the context to give them (the authenticator must live in the sockets' context).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from acquisition.errors import AcquisitionError

__all__ = [
    "ClientKeys",
    "CurveKeyError",
    "CurveServer",
    "chain",
    "create_key_pair",
    "load_key_pair",
    "load_public_key",
]

log = logging.getLogger(__name__)

#: ZAP domain of the service's sockets (the allowlist is configured for it).
ZAP_DOMAIN = "cellsam"

#: Monitor events that mean a peer was refused: ZAP said no (key not on the allowlist), or the
#: handshake failed on the security mechanism (a client without CURVE, or with the wrong server key).
_REFUSED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL


class CurveKeyError(AcquisitionError, FileNotFoundError):
    """A key file is missing, unreadable, or lacks the key it should hold."""


def create_key_pair(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write a new key pair ``directory/NAME.key`` (public) and ``NAME.key_secret`` (secret, mode 0600).

    Refuses to overwrite an existing pair (``FileExistsError``): replacing a key locks out its users.
    """
    directory = Path(directory)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise FileExistsError(f"{path} exists; remove it first or choose another name")
    directory.mkdir(parents=True, exist_ok=True)
    made_public, made_secret = zmq.auth.create_certificates(str(directory), name)
    os.chmod(made_secret, 0o600)
    return Path(made_public), Path(made_secret)


def _load(path: str | Path) -> tuple[bytes, bytes | None]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CurveKeyError(f"CURVE key file {path} does not exist (make one with `cellsam-stream keys`)")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"{path} is not a ZeroMQ certificate: {exc}") from None
    if not public:
        raise CurveKeyError(f"{path} holds no public key")
    return public, secret_key


def load_public_key(path: str | Path) -> bytes:
    """The Z85 public key of a certificate file (public ``.key`` or ``.key_secret``)."""
    return _load(path)[0]


def load_key_pair(path: str | Path) -> tuple[bytes, bytes]:
    """``(public, secret)`` Z85 keys of a ``NAME.key_secret`` file."""
    public, secret = _load(path)
    if not secret:
        raise CurveKeyError(
            f"{path} holds no secret key: give the NAME.key_secret file, not the public NAME.key"
        )
    return public, secret


def _allowlist(location: str | Path) -> dict[bytes, bool]:
    location = Path(location)
    files = sorted(location.glob("*.key")) if location.is_dir() else [location]
    if not location.exists():
        raise CurveKeyError(f"CURVE client allowlist {location} does not exist")
    keys = {load_public_key(f): True for f in files}
    if not keys:
        raise CurveKeyError(f"no client public keys (*.key) in {location}: no client could connect")
    return keys


@dataclass(frozen=True)
class ClientKeys:
    """What a client needs: its own key pair and the service's public key (all Z85 bytes)."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def from_files(cls, client_secret_file: str | Path, server_public_file: str | Path) -> ClientKeys:
        """Load the client's ``NAME.key_secret`` and the service's public ``server.key``."""
        public, secret = load_key_pair(client_secret_file)
        return cls(public=public, secret=secret, server_public=load_public_key(server_public_file))

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Set the CURVE client options on ``sock`` (before ``connect``)."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server_public


def chain(*options: Callable[[zmq.Socket[Any]], None] | None) -> Callable[[zmq.Socket[Any]], None] | None:
    """One ``socket_options`` callable applying each given one in order (``None`` when none is given)."""
    given = [o for o in options if o is not None]
    if not given:
        return None

    def apply(sock: zmq.Socket[Any]) -> None:
        for option in given:
            option(sock)

    return apply


class CurveServer:
    """CURVE on the service's sockets: the service's key pair, an allowlist, counted refusals.

    Parameters
    ----------
    secret_key_file : path
        The service's ``NAME.key_secret``.
    allowed_clients : path
        A directory of client public certificates (``*.key``) or one such file. Read once at
        :meth:`start`; call :meth:`reload` after adding or removing a client.
    on_refused : callable, optional
        Called with the endpoint name (``"ingest"``, ``"results"``) from a background thread each time a
        peer is refused (key not allowed, no CURVE, wrong server key). Must not block.

    Notes
    -----
    All sockets secured by one instance must be made in :attr:`context`, where the authenticator answers
    ZAP requests; :meth:`socket_kwargs` hands out both. :meth:`close` after the sockets are closed.
    """

    def __init__(
        self,
        *,
        secret_key_file: str | Path,
        allowed_clients: str | Path,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        public, secret = load_key_pair(secret_key_file)
        self.public_key = public
        self._secret_key = secret
        self._allowed_clients = Path(allowed_clients)
        self._allowlist = _allowlist(self._allowed_clients)  # fail now, not at the first client
        self._on_refused = on_refused
        self.context: zmq.Context[Any] = zmq.Context()
        self._auth: ThreadAuthenticator | None = None
        self._monitors: dict[zmq.Socket[Any], str] = {}
        self._monitor_lock = threading.Lock()
        self._monitor_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.refused: dict[str, int] = {}

    def start(self) -> None:
        """Start the authenticator (a thread answering ZAP requests) and the refusal monitor."""
        if self._auth is not None:
            return
        self._auth = ThreadAuthenticator(self.context, log=log)
        self._auth.start()
        self._auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self)
        self._stopping.clear()
        self._monitor_thread = threading.Thread(target=self._watch, name="curve-monitor", daemon=True)
        self._monitor_thread.start()

    def reload(self) -> None:
        """Re-read the allowlist (clients added or removed take effect for new connections)."""
        self._allowlist = _allowlist(self._allowed_clients)

    def callback(self, domain: str, client_key: bytes) -> bool:
        """The authenticator's question (``zmq.auth`` credentials provider): is this Z85 key allowed?"""
        return domain == ZAP_DOMAIN and client_key in self._allowlist

    def socket_options(self, name: str) -> Callable[[zmq.Socket[Any]], None]:
        """Options making a socket a CURVE server of this key pair, its refusals counted as ``name``."""

        def apply(sock: zmq.Socket[Any]) -> None:
            if self._auth is None:
                raise RuntimeError("CurveServer.start() must come before the sockets it secures bind")
            sock.curve_secretkey = self._secret_key
            sock.curve_publickey = self.public_key
            sock.curve_server = True
            sock.zap_domain = ZAP_DOMAIN.encode()
            monitor = sock.get_monitor_socket(_REFUSED)
            with self._monitor_lock:  # the monitor thread picks it up at its next poll
                self._monitors[monitor] = name

        return apply

    def socket_kwargs(self, name: str) -> dict[str, Any]:
        """``socket_options`` and ``context`` for a listener or publisher secured as ``name``."""
        return {"socket_options": self.socket_options(name), "context": self.context}

    def _watch(self) -> None:
        # Polls with a short timeout, so that monitors added by sockets bound later (in other threads)
        # and a stop request are seen without a wake-up channel.
        poller = zmq.Poller()
        watched: set[zmq.Socket[Any]] = set()
        while not self._stopping.is_set():
            with self._monitor_lock:
                for monitor in self._monitors.keys() - watched:
                    poller.register(monitor, zmq.POLLIN)
                    watched.add(monitor)
            if not watched:
                self._stopping.wait(0.05)
                continue
            for sock, _ in poller.poll(100):
                try:
                    event = recv_monitor_message(sock)
                except zmq.ZMQError:
                    poller.unregister(sock)
                    continue
                if event["event"] & _REFUSED:
                    self._refused(self._monitors.get(sock, "unknown"), event)

    def _refused(self, name: str, event: dict[str, Any]) -> None:
        self.refused[name] = self.refused.get(name, 0) + 1
        log.warning("refused a ZeroMQ peer on %s (%s)", name, event["event"].name)
        if self._on_refused is not None:
            try:
                self._on_refused(name)
            except Exception:
                log.exception("on_refused callback failed")

    def close(self) -> None:
        """Stop the monitor and the authenticator, close the monitor sockets, terminate the context.

        Call it after the secured sockets are closed (terminating waits for every socket of the context).
        """
        if self._monitor_thread is not None:
            self._stopping.set()
            self._monitor_thread.join(5)
            self._monitor_thread = None
        with self._monitor_lock:
            for monitor in self._monitors:
                monitor.close(linger=0)
            self._monitors.clear()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self.context.term()

    def __enter__(self) -> CurveServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
