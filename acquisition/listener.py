"""``FrameListener``: receives frames over ZeroMQ (PULL), validates them and hands them to a consumer.

asyncio, with a plain ZeroMQ socket watched by the event loop: the reader callback on ZeroMQ's
edge-triggered file descriptor receives, validates and queues every message ZeroMQ holds, then hands
frames straight to waiting consumers. No receive task or condition variable sits in between: a fraction
of the Python work of ``zmq.asyncio``, which matters at gigabytes per second. Messages are
received with ``copy=False`` and the pixels are an ``np.ndarray`` over the message's buffer: a
:class:`~acquisition.frames.Frame`'s array is a view on the ZeroMQ message, no copy.

Flow control: accepted frames wait in a bounded buffer (``max_in_flight``). When it is full the listener
stops reading, so ZeroMQ's high-water marks fill and the sender's ``send`` blocks (backpressure). With
``live=True`` the listener keeps reading and drops the **oldest** waiting frame instead, counting it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import zmq

from acquisition.allocator import retain_frame_buffers
from acquisition.errors import ListenerClosedError, ProtocolError
from acquisition.frames import Frame
from acquisition.protocol import (
    DEFAULT_FRAME_ENDPOINT,
    DEFAULT_MAX_FRAME_BYTES,
    MAX_HEADER_BYTES,
    Channels,
    EndMessage,
    FrameMessage,
    Reason,
    StartMessage,
    decode_message,
)
from acquisition.sockets import bind_socket

__all__ = ["AcquisitionState", "FrameListener", "ListenerEvent", "ListenerStats"]

log = logging.getLogger(__name__)

_POLLIN = int(zmq.POLLIN)  # a plain int: enum flag arithmetic costs microseconds per message
_MESSAGES_PER_TURN = 64  # messages read per event-loop turn before letting other callbacks run

EventKind = Literal["accepted", "rejected", "dropped", "started", "ended"]


@dataclass(frozen=True, slots=True)
class ListenerEvent:
    """What the listener reports through ``on_event``.

    ``kind`` is ``accepted``, ``rejected``, ``dropped`` (live mode), ``started`` or ``ended``; ``reason``
    is a :class:`~acquisition.protocol.Reason` value for ``rejected`` and ``"live_overflow"`` for
    ``dropped``. ``acquisition``/``index`` are set when known (so a rejection can be published).
    """

    kind: EventKind
    reason: str | None = None
    acquisition: str | None = None
    index: dict[str, Any] | None = None
    detail: str | None = None
    frame: Frame | None = None
    control: StartMessage | EndMessage | None = None


@dataclass(slots=True)
class ListenerStats:
    """Counters of one listener; read them any time (the metrics layer exports them).

    ``rejected`` and ``dropped`` count by reason code.
    """

    received: int = 0
    accepted: int = 0
    bytes_accepted: int = 0
    started: int = 0
    ended: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    queue_depth: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict copy (JSON-serialisable)."""
        return {
            "received": self.received,
            "accepted": self.accepted,
            "bytes_accepted": self.bytes_accepted,
            "started": self.started,
            "ended": self.ended,
            "rejected": dict(self.rejected),
            "dropped": dict(self.dropped),
            "queue_depth": self.queue_depth,
        }


@dataclass(slots=True)
class AcquisitionState:
    """What the listener knows about one acquisition (for ``GET /acquisitions`` and end summaries).

    An acquisition is done for the consumer once ``ended`` and it has processed ``frames_accepted -
    frames_dropped`` frames of it.
    """

    acquisition: str
    declared: bool = False
    start: StartMessage | None = None
    ended: bool = False
    frames_declared: int | None = None
    frames_accepted: int = 0
    frames_rejected: int = 0
    frames_dropped: int = 0
    bytes_accepted: int = 0
    first_seen: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    ended_at: float | None = None

    @property
    def channels(self) -> Channels | None:
        """Channel roles declared by ``start``, if any."""
        return self.start.channels if self.start is not None else None

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict copy (JSON-serialisable)."""
        return {
            "acquisition": self.acquisition,
            "declared": self.declared,
            "ended": self.ended,
            "sizes": self.start.sizes.model_dump() if self.start else None,
            "frames_declared": self.frames_declared,
            "frames_accepted": self.frames_accepted,
            "frames_rejected": self.frames_rejected,
            "frames_dropped": self.frames_dropped,
            "bytes_accepted": self.bytes_accepted,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "ended_at": self.ended_at,
        }


class FrameListener:
    """Bind a PULL socket and yield validated :class:`Frame` objects.

    Parameters
    ----------
    endpoint : str
        ZeroMQ endpoint to bind. Default ``tcp://127.0.0.1:5555`` (loopback only). ``tcp://127.0.0.1:*``
        binds a free port; read :attr:`endpoint` after :meth:`start`.
    max_in_flight : int
        Accepted frames that may wait for the consumer before the listener stops reading (or, in live
        mode, starts dropping the oldest).
    live : bool
        Drop the oldest waiting frame instead of applying backpressure.
    max_frame_bytes : int
        Largest accepted pixel buffer; larger frames are rejected (``too_large``).
    rcvhwm : int
        ZeroMQ receive high-water mark (messages). Small values make backpressure reach the sender sooner.
    max_acquisitions : int
        Acquisitions tracked at once; the least recently seen is forgotten beyond that.
    on_event : callable, optional
        Called synchronously with each :class:`ListenerEvent`. Exceptions it raises are logged, never
        propagated.
    socket_options : callable, optional
        Called with the socket before ``bind`` (e.g. to configure CURVE).
    retain_buffers : bool
        On glibc, raise ``malloc``'s thresholds (process-wide, see :mod:`acquisition.allocator`) so the
        buffers of freed frames are reused for the next ones instead of being returned to the kernel and
        faulted in again: a sixth less CPU per 8 MiB frame. Default ``True``.
    context : zmq.Context, optional
        Defaults to the shared ``zmq.Context.instance()`` (a ``zmq.asyncio.Context`` works too: the
        socket is made on a plain view of it).

    Examples
    --------
    >>> async def main():
    ...     listener = FrameListener(endpoint="tcp://127.0.0.1:*")
    ...     await listener.start()
    ...     async for frame in listener:   # ends after stop() once drained
    ...         print(frame.id, frame.data.shape)
    """

    def __init__(
        self,
        *,
        endpoint: str = DEFAULT_FRAME_ENDPOINT,
        max_in_flight: int = 8,
        live: bool = False,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        rcvhwm: int = 4,
        max_acquisitions: int = 1024,
        on_event: Callable[[ListenerEvent], None] | None = None,
        socket_options: Callable[[zmq.Socket[Any]], None] | None = None,
        retain_buffers: bool = True,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be ≥ 1, got {max_in_flight}")
        if max_frame_bytes < 1:
            raise ValueError(f"max_frame_bytes must be ≥ 1, got {max_frame_bytes}")
        self._bind_endpoint = endpoint
        self.max_in_flight = max_in_flight
        self.live = live
        self.max_frame_bytes = max_frame_bytes
        self._rcvhwm = rcvhwm
        self._max_acquisitions = max_acquisitions
        self._on_event = on_event
        self._socket_options = socket_options
        self._retain_buffers = retain_buffers
        self._context = context
        self._socket: zmq.Socket[Any] | None = None
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buffer: deque[Frame] = deque()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._reading = False  # the reader callback is registered (False while full or stopped)
        self._retry: asyncio.TimerHandle | None = None
        self._closing = False
        self._closed = False
        self._endpoint: str | None = None
        self.stats = ListenerStats()
        self.acquisitions: OrderedDict[str, AcquisitionState] = OrderedDict()

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The bound endpoint (wildcard ports resolved); the configured one before :meth:`start`."""
        return self._endpoint or self._bind_endpoint

    async def start(self) -> None:
        """Bind the socket and start receiving. Raises ``zmq.ZMQError`` if the endpoint is taken."""
        if self._loop is not None:
            raise RuntimeError("FrameListener.start() was already called")
        base = self._context or zmq.Context.instance()
        ctx: zmq.Context[Any] = zmq.Context.shadow(base.underlying)  # plain sockets, whatever was passed
        sock = ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, self._rcvhwm)
        sock.setsockopt(zmq.LINGER, 0)
        # Memory guard: ZeroMQ drops parts far over the limit before we allocate them; those between
        # the limit and this cap still arrive and are counted as ``too_large``.
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * max(self.max_frame_bytes, MAX_HEADER_BYTES) + (1 << 20))
        self._endpoint = bind_socket(sock, self._bind_endpoint, self._socket_options)
        self._socket = sock
        if self._retain_buffers:
            # Frames the consumer holds, those in ZeroMQ's pipe, and the few being received.
            retain_frame_buffers(self.max_frame_bytes, buffers=self.max_in_flight + self._rcvhwm + 4)
        self._fd = int(sock.getsockopt(zmq.FD))
        self._loop = asyncio.get_running_loop()
        self._resume()
        log.info(
            "frame listener bound to %s (live=%s, max_in_flight=%d)",
            self._endpoint,
            self.live,
            self.max_in_flight,
        )

    async def stop(self) -> None:
        """Stop reading and close the socket.

        Frames already accepted stay available: :meth:`get` and ``async for`` return them, then end.
        Messages still inside ZeroMQ's buffers were not accepted and are discarded.
        """
        if self._closed:
            return
        self._closing = True
        self._pause()
        if self._retry is not None:
            self._retry.cancel()
        if self._socket is not None:
            self._socket.close(linger=0)
        self._closed = True
        while self._waiters:  # consumers waiting on an empty buffer learn that it is over
            self._wake_one()

    async def __aenter__(self) -> FrameListener:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- consumer side ---------------------------------------------------------------------------

    async def get(self) -> Frame:
        """Return the oldest accepted frame, waiting for one.

        Raises
        ------
        ListenerClosedError
            The listener was stopped and every accepted frame has been returned.
        """
        loop = self._loop
        if loop is None:
            raise ListenerClosedError("FrameListener.get() before start(): call `await listener.start()`")
        while not self._buffer:
            if self._closed:
                raise ListenerClosedError("the listener is stopped and drained")
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                if self._buffer:  # a frame handed to this waiter goes to the next one instead
                    self._wake_one()
                raise
        frame = self._buffer.popleft()
        self.stats.queue_depth = len(self._buffer)
        if not self._reading and not self._closing:
            self._resume()  # there is room again: read what queued up in ZeroMQ meanwhile
        return frame

    def __aiter__(self) -> AsyncIterator[Frame]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Frame]:
        while True:
            try:
                yield await self.get()
            except ListenerClosedError:
                return

    @property
    def queue_depth(self) -> int:
        """Accepted frames waiting for the consumer."""
        return len(self._buffer)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # -- receive side ----------------------------------------------------------------------------

    def _resume(self) -> None:
        """Watch the socket again, and read now: ZeroMQ's descriptor only signals new activity."""
        if self._loop is None or self._fd is None or self._closing:
            return
        if not self._reading:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True
        self._loop.call_soon(self._on_readable)

    def _pause(self) -> None:
        if self._reading and self._loop is not None and self._fd is not None:
            self._loop.remove_reader(self._fd)
        self._reading = False

    def _on_readable(self) -> None:
        """Reader callback: receive until ZeroMQ is empty, the buffer is full or a turn is used up."""
        sock = self._socket
        if sock is None or not self._reading:
            return
        check = False  # on a wake-up, just try: the descriptor fired because something arrived
        for _ in range(_MESSAGES_PER_TURN):
            if not self.live and len(self._buffer) >= self.max_in_flight:
                # Backpressure: stop reading until the consumer takes a frame (get() resumes).
                self._pause()
                return
            try:
                # ZeroMQ's descriptor is edge-triggered: before sleeping, ask ZeroMQ itself (which re-arms
                # the descriptor) whether another message is waiting; a failed receive costs more.
                if check and not int(sock.getsockopt(zmq.EVENTS)) & _POLLIN:
                    return
                check = True
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                continue  # a wake-up for something else: the next turn asks ZeroMQ
            except zmq.ZMQError as exc:
                if self._closing or exc.errno in (zmq.ETERM, zmq.ENOTSOCK):
                    self._pause()
                    return
                log.warning("receive failed (%s); retrying in 10 ms", exc)
                self._pause()
                if self._loop is not None:
                    self._retry = self._loop.call_later(0.01, self._resume)
                return
            try:
                self._handle(parts)
            except Exception as exc:  # never let one message kill the listener
                log.exception("internal error while handling a message")
                self._reject(ProtocolError(Reason.INTERNAL, f"{type(exc).__name__}: {exc}"))
        if self._loop is not None:  # a turn's worth read: let other callbacks run, then go on
            self._loop.call_soon(self._on_readable)

    def _handle(self, parts: list[Any]) -> None:
        self.stats.received += 1
        received_at = time.monotonic()
        try:
            message = decode_message(parts, max_frame_bytes=self.max_frame_bytes)
        except ProtocolError as exc:
            self._reject(exc)
            return
        if isinstance(message, FrameMessage):
            self._on_frame(message, received_at)
        elif isinstance(message, StartMessage):
            self._on_start(message)
        else:
            self._on_end(message)

    def _state(self, acquisition: str) -> AcquisitionState:
        state = self.acquisitions.get(acquisition)
        if state is None:
            state = AcquisitionState(acquisition)
            self.acquisitions[acquisition] = state
            while len(self.acquisitions) > self._max_acquisitions:
                self.acquisitions.popitem(last=False)
        else:
            self.acquisitions.move_to_end(acquisition)
        state.last_seen = time.time()
        return state

    def _on_start(self, message: StartMessage) -> None:
        state = self._state(message.acquisition)
        if state.ended:  # a new start re-opens the id with fresh counters
            state = AcquisitionState(message.acquisition)
            self.acquisitions[message.acquisition] = state
        state.declared, state.start = True, message
        self.stats.started += 1
        log.info("acquisition %s started (sizes %s)", message.acquisition, message.sizes.model_dump())
        self._emit(ListenerEvent("started", acquisition=message.acquisition, control=message))

    def _on_end(self, message: EndMessage) -> None:
        state = self._state(message.acquisition)
        state.ended, state.frames_declared, state.ended_at = True, message.frames, time.time()
        self.stats.ended += 1
        log.info("acquisition %s ended (%d frames accepted)", message.acquisition, state.frames_accepted)
        self._emit(ListenerEvent("ended", acquisition=message.acquisition, control=message))

    def _on_frame(self, message: FrameMessage, received_at: float) -> None:
        state = self._state(message.acquisition)
        if state.ended:
            header = message.header
            self._reject(
                ProtocolError(
                    Reason.ACQUISITION_ENDED,
                    f"acquisition {header.acquisition!r} has ended; send 'start' to re-open it",
                    acquisition=header.acquisition,
                    index=header.index.model_dump(),
                )
            )
            return
        frame = Frame(message, received_at=received_at, channels=state.channels)
        if self.live:
            while len(self._buffer) >= self.max_in_flight:
                self._drop(self._buffer.popleft())
        self._append(frame, state)

    def _append(self, frame: Frame, state: AcquisitionState) -> None:
        self._buffer.append(frame)
        nbytes = frame.data.nbytes
        stats = self.stats
        stats.accepted += 1
        stats.bytes_accepted += nbytes
        stats.queue_depth = len(self._buffer)
        state.frames_accepted += 1
        state.bytes_accepted += nbytes
        self._wake_one()
        if self._on_event is not None:
            self._emit(ListenerEvent("accepted", acquisition=frame.acquisition, frame=frame))

    def _drop(self, frame: Frame) -> None:
        self.stats.dropped["live_overflow"] += 1
        state = self.acquisitions.get(frame.acquisition)
        if state is not None:
            state.frames_dropped += 1
        self._emit(
            ListenerEvent(
                "dropped",
                reason="live_overflow",
                acquisition=frame.acquisition,
                index=frame.index.model_dump(),
                frame=frame,
            )
        )

    def _reject(self, exc: ProtocolError) -> None:
        self.stats.rejected[exc.reason] += 1
        if exc.acquisition is not None:
            self._state(exc.acquisition).frames_rejected += 1
        log.warning("rejected message (%s): %s", exc.reason, exc.detail)
        self._emit(
            ListenerEvent(
                "rejected", reason=exc.reason, acquisition=exc.acquisition, index=exc.index, detail=exc.detail
            )
        )

    def _emit(self, event: ListenerEvent) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:
            log.exception("on_event callback raised for %s; ignoring", event.kind)
