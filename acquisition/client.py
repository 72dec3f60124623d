"""Client side for microscope scripts: :class:`FrameSender` (PUSH frames) and :class:`ResultSubscriber`.

Both are synchronous (plain ``zmq``), so they drop into acquisition scripts and device callbacks.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from acquisition.errors import AcquisitionError, NotConnectedError, ProtocolError, SendTimeoutError
from acquisition.ids import validate_acquisition_id
from acquisition.protocol import (
    DEFAULT_FRAME_ENDPOINT,
    DEFAULT_RESULT_ENDPOINT,
    AcquisitionSizes,
    AcquisitionSummary,
    ChannelRole,
    Channels,
    EndMessage,
    FrameResult,
    Index,
    PositionInfo,
    StartMessage,
    TrackResult,
)
from acquisition.security import ClientKeys
from acquisition.wire import encode_control, encode_frame, frame_header

_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
)

__all__ = ["FrameSender", "ResultMessage", "ResultSubscriber"]

log = logging.getLogger(__name__)


class FrameSender:
    """Push frames to a :class:`~acquisition.listener.FrameListener` (ZeroMQ PUSH, connects).

    Parameters
    ----------
    endpoint : str
        Listener endpoint. Default ``tcp://127.0.0.1:5555``.
    acquisition : str, optional
        Default acquisition id for :meth:`start`, :meth:`send` and :meth:`end`.
    timeout : float or None
        Seconds :meth:`send` may block when the listener is behind (its queues are full) before raising
        :class:`~acquisition.errors.SendTimeoutError`. ``0`` never blocks; ``None`` blocks forever.
        Default 10 s, so a microscope is never stalled indefinitely.
    sndhwm : int
        ZeroMQ send high-water mark in messages: frames queued locally before ``send`` blocks. Queued frames
        are referenced, not copied, so up to ``sndhwm`` arrays stay alive (32 × 8 MiB = 256 MiB for
        2048² uint16). The default keeps loopback ingest within ~10 % of bare pyzmq; lower it to feel
        backpressure sooner or to bound memory.
    copy : bool
        ``False`` (default) sends the array's memory without copying: do not modify the array until the
        frame has left (reuse a buffer only with ``copy=True``).
    linger : float
        Seconds :meth:`close` waits for queued frames to be delivered.
    curve : ClientKeys, optional
        CURVE keys (this client's pair and the service's public key) for a service that requires them:
        ``ClientKeys.from_files("microscope1.key_secret", "server.key")``.
    socket_options : callable, optional
        Called with the socket before ``connect`` (after ``curve``).

    Examples
    --------
    >>> with FrameSender(acquisition="exp42") as tx:           # doctest: +SKIP
    ...     tx.start(sizes={"t": 10, "p": 1})
    ...     for t in range(10):
    ...         tx.send(camera.snap(), t=t, exposure_ms=20)
    ...     # leaving the block cleanly sends ``end`` with the number of frames sent (a timeout there
    ...     # is logged, not raised); leaving it with an exception leaves the acquisition open
    """

    def __init__(
        self,
        *,
        endpoint: str = DEFAULT_FRAME_ENDPOINT,
        acquisition: str | None = None,
        timeout: float | None = 10.0,
        sndhwm: int = 32,
        copy: bool = False,
        linger: float = 5.0,
        curve: ClientKeys | None = None,
        socket_options: Callable[[zmq.Socket[Any]], None] | None = None,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.acquisition = validate_acquisition_id(acquisition) if acquisition is not None else None
        self.timeout = timeout
        self.copy = copy
        self.linger = linger
        self.frames_sent: dict[str, int] = {}
        self._open: set[str] = set()
        # Our own context by default: close() terminates it, which returns only once ZeroMQ has sent
        # (or, after `linger`, dropped) every queued frame. Zero-copy sends reference the caller's
        # arrays, so ZeroMQ must be done with them before the interpreter may free them.
        self._own_context = context is None
        ctx = context or zmq.Context()
        self._context = ctx
        self._socket: zmq.Socket[Any] = ctx.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, sndhwm)
        # Frames for a listener that is not up yet queue locally instead of being silently lost.
        self._socket.setsockopt(zmq.IMMEDIATE, 0)
        if curve is not None:
            curve.apply(self._socket)
        if socket_options is not None:
            socket_options(self._socket)
        # Watches the handshake, so that wait_connected() can tell "connected" from "refused".
        self._monitor = self._socket.get_monitor_socket(_HANDSHAKE_EVENTS)
        self._connected = False
        self._socket.connect(endpoint)
        self._closed = False

    def wait_connected(self, timeout: float = 10.0) -> None:
        """Block until a listener completed the connection (with CURVE: accepted this client's keys).

        Frames sent before that are queued locally, so a sender cannot otherwise tell a running service
        from nothing at all.

        Raises
        ------
        NotConnectedError
            Nothing accepted the connection within ``timeout`` seconds (``refused`` tells a listener that
            rejected the CURVE handshake from nothing listening).
        """
        from zmq.utils.monitor import recv_monitor_message

        deadline = time.monotonic() + timeout
        refused = ""
        while not self._connected:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._monitor.poll(max(1, int(remaining * 1000))):
                if refused:
                    raise NotConnectedError(
                        f"{self.endpoint} refused this sender ({refused}): check the CURVE keys, the "
                        "service's public key and that this client's public key is on its allowlist",
                        refused=True,
                    )
                raise NotConnectedError(
                    f"nothing accepted a connection at {self.endpoint} within {timeout:g} s: is the service "
                    "running and reachable from here?"
                )
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connected = True
            else:
                refused = str(zmq.Event(event).name).lower()

    def _acq(self, acquisition: str | None) -> str:
        acq = acquisition or self.acquisition
        if acq is None:
            raise AcquisitionError(
                "no acquisition id: pass acquisition=... here or to FrameSender(acquisition=...)"
            )
        return validate_acquisition_id(acq)

    def _send(self, parts: list[Any]) -> None:
        if self._closed:
            raise AcquisitionError("FrameSender is closed; create a new one")
        flags = 0
        if self.timeout is None:
            self._socket.setsockopt(zmq.SNDTIMEO, -1)
        elif self.timeout <= 0:
            flags = zmq.NOBLOCK
        else:
            self._socket.setsockopt(zmq.SNDTIMEO, max(1, int(self.timeout * 1000)))
        try:
            self._socket.send_multipart(parts, flags=flags, copy=self.copy)
        except zmq.Again:
            raise SendTimeoutError(
                f"could not queue a message for {self.endpoint} within {self.timeout} s: the listener is "
                "behind or not running; retry, skip the frame, or raise FrameSender(timeout=...)"
            ) from None

    def start(
        self,
        acquisition: str | None = None,
        *,
        sizes: AcquisitionSizes | Mapping[str, int | None] | None = None,
        channels: Channels | Mapping[str, Any] | None = None,
        shape: tuple[int, ...] | None = None,
        dtype: str | None = None,
        settings: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        pixel_size_um: float | None = None,
        time_interval_s: float | None = None,
        z_step_um: float | None = None,
        positions: Sequence[PositionInfo | Mapping[str, Any]] | None = None,
        sequence: Any = None,
        roles: Mapping[str, ChannelRole] | None = None,
    ) -> str:
        """Send ``start``: declare an acquisition's plan (optional: unstarted acquisitions use defaults).

        Parameters
        ----------
        acquisition : str, optional
            Acquisition id (default: the sender's).
        sizes, channels, shape, dtype, pixel_size_um, time_interval_s, z_step_um, positions
            The declaration (``docs/protocol.md`` §1.2): extents per axis, channel names / roles / colours,
            physical sizes, stage positions (name, ``x_um``, ``y_um``, ``z_um``) in index ``p`` order.
        sequence : useq.MDASequence, optional
            Declare the plan of a pymmcore-plus acquisition: sizes, channels, interval, z step and
            positions are taken from it (:func:`acquisition.declaration.from_mda_sequence`); explicit
            arguments take precedence.
        roles : mapping, optional
            With ``sequence``: role per channel config name (``nuclear``, ``whole_cell``, ``ignore``).
        settings, metadata : mapping, optional
            Model settings and free-form JSON metadata.

        Returns
        -------
        str
            The acquisition id; it becomes the sender's default id.
        """
        acq = self._acq(acquisition)
        declared: dict[str, Any] = {}
        if sequence is not None:
            from acquisition.declaration import from_mda_sequence

            declared = from_mda_sequence(sequence, pixel_size_um=pixel_size_um, roles=roles)
        given = {
            "sizes": sizes,
            "channels": channels,
            "pixel_size_um": pixel_size_um,
            "time_interval_s": time_interval_s,
            "z_step_um": z_step_um,
            "positions": positions,
        }
        declared.update({k: v for k, v in given.items() if v is not None})
        if isinstance(declared.get("sizes"), AcquisitionSizes):
            declared["sizes"] = declared["sizes"].model_dump()
        if isinstance(declared.get("channels"), Channels):
            declared["channels"] = declared["channels"].model_dump(exclude_defaults=True)
        try:
            message = StartMessage.model_validate(
                {
                    "acquisition": acq,
                    **declared,
                    "shape": shape,
                    "dtype": dtype,
                    "settings": dict(settings or {}),
                    "metadata": dict(metadata or {}),
                }
            )
        except ValueError as exc:  # pydantic.ValidationError is a ValueError
            raise ProtocolError("bad_field", f"invalid start message: {exc}", acquisition=acq) from None
        self._send(encode_control(message))
        self.acquisition = acq
        self.frames_sent[acq] = 0
        self._open.add(acq)
        return acq

    def send(
        self,
        array: np.ndarray,
        *,
        acquisition: str | None = None,
        t: int = 0,
        p: int = 0,
        z: int = 0,
        c: int | None = None,
        timestamp: float | None = None,
        channels: Channels | Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        **extra_metadata: Any,
    ) -> None:
        """Send one frame.

        Parameters
        ----------
        array : numpy.ndarray
            (H, W) or (H, W, C) pixels of a supported dtype. Sent without a copy when C-contiguous and
            little-endian (see ``copy``).
        t, p, z, c : int
            Frame index. ``c=None`` means the buffer holds all channels.
        timestamp : float, optional
            Acquisition time, seconds since the epoch (default: now).
        metadata, **extra_metadata
            Free-form JSON metadata (merged; keyword arguments win).

        Raises
        ------
        ProtocolError
            The array cannot be sent (unsupported dtype or rank).
        SendTimeoutError
            The listener did not take the frame within ``timeout``.
        """
        acq = self._acq(acquisition)
        array = np.asarray(array)
        meta = {**(metadata or {}), **extra_metadata}
        header = frame_header(
            array.shape,
            array.dtype,
            acquisition=acq,
            index=Index(t=t, p=p, z=z, c=c),
            timestamp=time.time() if timestamp is None else timestamp,
            channels=channels,
            metadata=meta,
        )
        self._send(encode_frame(header, array))
        self.frames_sent[acq] = self.frames_sent.get(acq, 0) + 1

    def end(
        self,
        acquisition: str | None = None,
        *,
        frames: int | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Send ``end``. ``frames`` defaults to the number of frames this sender sent since ``start``."""
        acq = self._acq(acquisition)
        count = self.frames_sent.get(acq) if frames is None else frames
        self._send(encode_control(EndMessage(acquisition=acq, frames=count, metadata=dict(metadata or {}))))
        self._open.discard(acq)

    def close(self, linger: float | None = None) -> None:
        """Close the socket, waiting up to ``linger`` seconds (default: the constructor's) for delivery.

        Always close a sender (or use it as a context manager) before the process exits: frames still
        queued are delivered here, and their arrays are released only once ZeroMQ is done with them.
        """
        if self._closed:
            return
        self._closed = True
        self._monitor.close(linger=0)
        self._socket.close(linger=int(1000 * (self.linger if linger is None else linger)))
        if self._own_context:
            self._context.term()

    def __enter__(self) -> FrameSender:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # On a clean exit, close acquisitions started here; after an error, leave them open (the
        # service sees an acquisition that never ended rather than a misleading complete one).
        try:
            if exc_type is None:
                for acq in sorted(self._open):
                    try:
                        self.end(acq)
                    except SendTimeoutError:
                        log.warning("could not send 'end' for %s: the listener is behind or gone", acq)
        finally:
            self.close()


@dataclass(frozen=True, slots=True)
class ResultMessage:
    """One message from the results socket.

    ``payload`` is a :class:`FrameResult` (``type == "result"``), an :class:`AcquisitionSummary` or, for
    a subscriber that asked for tracks, a :class:`TrackResult`.
    ``labels`` is the (H, W) label image when the subscriber asked for labels and one was attached.
    """

    topic: str
    payload: FrameResult | AcquisitionSummary | TrackResult
    labels: np.ndarray | None = None

    @property
    def acquisition(self) -> str:
        """Acquisition id."""
        return self.payload.acquisition


def _topics(acquisitions: Iterable[str] | None, labels: bool, tracks: bool = False) -> list[str]:
    prefixes = ["l/" if labels else "r/"] + (["t/"] if tracks else [])
    if acquisitions is None:
        return prefixes
    ids = [validate_acquisition_id(a) for a in acquisitions]
    return [prefix + a for prefix in prefixes for a in ids]


class ResultSubscriber:
    """Subscribe to results published by :class:`~acquisition.publisher.ResultPublisher` (SUB, connects).

    Parameters
    ----------
    endpoint : str
        Publisher endpoint. Default ``tcp://127.0.0.1:5556``.
    acquisitions : iterable of str, optional
        Acquisition ids to receive; ``None`` receives all.
    labels : bool
        Also receive label images (subscribes to ``l/<id>`` instead of ``r/<id>``).
    tracks : bool
        Also receive each frame's :class:`TrackResult` (``t/<id>``), after its result.
    curve : ClientKeys, optional
        CURVE keys for a service that requires them (see :class:`FrameSender`).
    socket_options : callable, optional
        Called with the socket before ``connect`` (after ``curve``).

    Notes
    -----
    Slow joiners: call :meth:`wait_ready` before the acquisition starts; it returns once a heartbeat
    arrived, which proves the data subscriptions reached the publisher.
    """

    def __init__(
        self,
        *,
        endpoint: str = DEFAULT_RESULT_ENDPOINT,
        acquisitions: Iterable[str] | None = None,
        labels: bool = False,
        tracks: bool = False,
        curve: ClientKeys | None = None,
        socket_options: Callable[[zmq.Socket[Any]], None] | None = None,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.labels = labels
        self.tracks = tracks
        self._topics = _topics(acquisitions, labels, tracks)
        self._exact = acquisitions is not None
        ctx = context or zmq.Context.instance()
        self._socket: zmq.Socket[Any] = ctx.socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.apply(self._socket)
        if socket_options is not None:
            socket_options(self._socket)
        for topic in self._topics:
            self._socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        # Subscribed last: a hello received proves the subscriptions above are active.
        self._socket.setsockopt(zmq.SUBSCRIBE, b"h")
        self._socket.connect(endpoint)
        self._ready = False
        self._pending: list[ResultMessage] = []
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)

    @property
    def ready(self) -> bool:
        """True once a heartbeat was received."""
        return self._ready

    def wait_ready(self, timeout: float = 5.0) -> None:
        """Block until a heartbeat arrives; results that arrive meanwhile are kept for :meth:`recv`.

        Raises ``TimeoutError`` if none arrives within ``timeout`` seconds (publisher not running?).
        """
        deadline = time.monotonic() + timeout
        while not self._ready:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no heartbeat from {self.endpoint} within {timeout} s; is it running?")
            if self._poller.poll(int(remaining * 1000)):
                message = self._parse(self._socket.recv_multipart())
                if message is not None:
                    self._pending.append(message)

    def _parse(self, parts: list[bytes]) -> ResultMessage | None:
        topic = parts[0].decode("ascii", errors="replace")
        if topic == "h":
            self._ready = True
            return None
        if self._exact and topic not in self._topics:
            return None  # prefix match of another id, e.g. r/exp4 vs r/exp42
        obj = json.loads(parts[1])
        payload: FrameResult | AcquisitionSummary | TrackResult
        if obj.get("type") == "summary":
            payload = AcquisitionSummary.model_validate(obj)
        elif obj.get("type") == "tracks":
            payload = TrackResult.model_validate(obj)
        else:
            payload = FrameResult.model_validate(obj)
        labels = None
        if len(parts) > 2 and isinstance(payload, FrameResult) and payload.labels is not None:
            dtype = np.dtype(payload.labels.dtype).newbyteorder("<")
            labels = np.frombuffer(parts[2], dtype=dtype).reshape(payload.labels.shape)
        return ResultMessage(topic=topic, payload=payload, labels=labels)

    def recv(self, timeout: float | None = None) -> ResultMessage:
        """Return the next result or summary. Raises ``TimeoutError`` after ``timeout`` seconds."""
        if self._pending:
            return self._pending.pop(0)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._poller.poll(None if wait is None else int(wait * 1000)):
                raise TimeoutError(f"no result from {self.endpoint} within {timeout} s")
            message = self._parse(self._socket.recv_multipart())
            if message is not None:
                return message

    async def arecv(self, timeout: float | None = None) -> ResultMessage:
        """Async :meth:`recv` (waits on the socket without blocking the event loop)."""
        if self._pending:
            return self._pending.pop(0)
        poller = zmq.asyncio.Poller()
        poller.register(self._socket, zmq.POLLIN)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                message = self._parse(self._socket.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    raise TimeoutError(f"no result from {self.endpoint} within {timeout} s") from None
                await poller.poll(None if wait is None else max(1, int(wait * 1000)))
                continue
            if message is not None:
                return message

    def __iter__(self) -> Iterator[ResultMessage]:
        while True:
            yield self.recv()

    async def __aiter__(self) -> Any:
        while True:
            yield await self.arecv()

    def close(self) -> None:
        """Close the socket."""
        self._socket.close(linger=0)

    def __enter__(self) -> ResultSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
