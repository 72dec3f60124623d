"""``FrameListener``: the ZeroMQ :class:`~acquisition.source.FrameSource` (a PULL socket).

asyncio, with a plain ZeroMQ socket watched by the event loop: the reader callback on ZeroMQ's
edge-triggered file descriptor receives, validates and queues every message ZeroMQ holds, then hands
frames straight to waiting consumers. No receive task or condition variable sits in between: a fraction
of the Python work of ``zmq.asyncio``, which matters at gigabytes per second. Messages are
received with ``copy=False`` and the pixels are an ``np.ndarray`` over the message's buffer: a
:class:`~acquisition.frames.Frame`'s array is a view on the ZeroMQ message, no copy.

What a message is (validation, ``start``/``end``) is decided by the shared
:class:`~acquisition.source.Intake`, and events wait in the shared :class:`~acquisition.source.EventQueue`.

Flow control: accepted frames wait in a bounded queue (``max_queued``). When it is full the listener
stops reading, so ZeroMQ's high-water marks fill and the sender's ``send`` blocks (backpressure). With
``live=True`` the listener keeps reading and drops the **oldest** waiting frame instead (a
:class:`~acquisition.source.Dropped` notice takes its place).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import zmq

from acquisition.allocator import retain_frame_buffers
from acquisition.errors import ListenerClosedError
from acquisition.limits import Limits
from acquisition.protocol import DEFAULT_FRAME_ENDPOINT, DEFAULT_MAX_FRAME_BYTES, MAX_HEADER_BYTES
from acquisition.sockets import bind_socket
from acquisition.source import EventQueue, IdleTimer, Intake, SourceEvent, SourceStats
from acquisition.spec import StoredAcquisition

__all__ = ["FrameListener"]

log = logging.getLogger(__name__)

_POLLIN = int(zmq.POLLIN)  # a plain int: enum flag arithmetic costs microseconds per message
_MESSAGES_PER_TURN = 64  # messages read per event-loop turn before letting other callbacks run


class FrameListener:
    """Bind a PULL socket and return validated frames and notices (a :class:`FrameSource`).

    Parameters
    ----------
    endpoint : str
        ZeroMQ endpoint to bind. Default ``tcp://127.0.0.1:5555`` (loopback only). ``tcp://127.0.0.1:*``
        binds a free port; read :attr:`endpoint` after :meth:`start`.
    max_queued : int
        Accepted frames that may wait for a consumer before the listener stops reading (or, in live
        mode, starts dropping the oldest).
    live : bool
        Drop the oldest waiting frame instead of applying backpressure.
    max_frame_bytes : int
        Largest accepted pixel buffer; larger frames are rejected (``too_large``).
    rcvhwm : int
        ZeroMQ receive high-water mark (messages). Small values make backpressure reach the sender sooner.
    limits : Limits, optional
        Ceilings on every acquisition (extent along t, p, z, c; pixels per frame), on how many are open
        at once, and the idle timeout after which an open one is closed (:class:`~acquisition.limits.Limits`;
        its defaults when not given: no idle timeout).
    max_acquisitions : int
        Acquisitions whose declaration is remembered at once (at least ``limits.max_open_acquisitions``);
        the least recently declared that is not open is forgotten.
    max_notices : int
        Notices (rejections, start/end, drops) that may wait for a consumer before reading pauses.
    socket_options : callable, optional
        Called with the socket before ``bind`` (e.g. to configure CURVE).
    retain_buffers : bool
        On glibc, raise ``malloc``'s thresholds (process-wide, see :mod:`acquisition.allocator`) so the
        buffers of freed frames are reused for the next ones instead of being returned to the kernel and
        faulted in again: a sixth less CPU per 8 MiB frame. Default ``True``.
    stored : callable, optional
        ``LabelSink.stored``: what the label sink already holds of an acquisition. An acquisition this
        listener has not seen but the sink holds resumes from it (its declaration, layout and ended
        state), so a restarted service takes its frames without a new ``start``, and a ``start`` that
        conflicts with it is rejected (``layout_conflict``).
    context : zmq.Context, optional
        Defaults to the shared ``zmq.Context.instance()`` (a ``zmq.asyncio.Context`` works too: the
        socket is made on a plain view of it).

    Examples
    --------
    >>> async def main():
    ...     listener = FrameListener(endpoint="tcp://127.0.0.1:*")
    ...     await listener.start()
    ...     async for event in listener:   # ends after stop() once drained
    ...         print(event)
    """

    def __init__(
        self,
        *,
        endpoint: str = DEFAULT_FRAME_ENDPOINT,
        max_queued: int = 8,
        live: bool = False,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        rcvhwm: int = 4,
        max_acquisitions: int = 1024,
        limits: Limits | None = None,
        max_notices: int = 4096,
        socket_options: Callable[[zmq.Socket[Any]], None] | None = None,
        retain_buffers: bool = True,
        context: zmq.Context[Any] | None = None,
        stored: Callable[[str], StoredAcquisition | None] | None = None,
    ) -> None:
        if max_frame_bytes < 1:
            raise ValueError(f"max_frame_bytes must be ≥ 1, got {max_frame_bytes}")
        self._bind_endpoint = endpoint
        self.max_frame_bytes = max_frame_bytes
        self._rcvhwm = rcvhwm
        self._socket_options = socket_options
        self._retain_buffers = retain_buffers
        self._context = context
        self._stats = SourceStats()
        self._intake = Intake(
            max_frame_bytes=max_frame_bytes,
            stats=self._stats,
            max_acquisitions=max_acquisitions,
            limits=limits,
            stored=stored,
        )
        self._queue = EventQueue(max_queued=max_queued, live=live, stats=self._stats, max_notices=max_notices)
        self._idle = IdleTimer(self._intake, self._queue)
        self._socket: zmq.Socket[Any] | None = None
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False  # the reader callback is registered (False while full or stopped)
        self._retry: asyncio.TimerHandle | None = None
        self._closing = False
        self._endpoint: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The bound endpoint (wildcard ports resolved); the configured one before :meth:`start`."""
        return self._endpoint or self._bind_endpoint

    @property
    def stats(self) -> SourceStats:
        """Counters over all acquisitions."""
        return self._stats

    @property
    def limits(self) -> Limits:
        """The ceilings this listener holds senders to."""
        return self._intake.limits

    @property
    def live(self) -> bool:
        return self._queue.live

    @property
    def max_queued(self) -> int:
        return self._queue.max_queued

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
            retain_frame_buffers(self.max_frame_bytes, buffers=self.max_queued + self._rcvhwm + 4)
        self._fd = int(sock.getsockopt(zmq.FD))
        self._loop = asyncio.get_running_loop()
        self._resume()
        self._idle.start()
        log.info(
            "frame listener bound to %s (live=%s, max_queued=%d)", self._endpoint, self.live, self.max_queued
        )

    async def stop(self) -> None:
        """Stop reading and close the socket.

        Events already queued stay available: :meth:`get` and ``async for`` return them, then end.
        Messages still inside ZeroMQ's buffers were not accepted and are discarded.
        """
        if self._queue.closed:
            return
        self._closing = True
        self._pause()
        self._idle.stop()
        if self._retry is not None:
            self._retry.cancel()
        if self._socket is not None:
            self._socket.close(linger=0)
        self._queue.close()

    async def __aenter__(self) -> FrameListener:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- consumer side ---------------------------------------------------------------------------

    async def get(self) -> SourceEvent:
        """Return the oldest queued event (a frame or a notice), waiting for one.

        Raises
        ------
        ListenerClosedError
            The listener was stopped and every queued event has been returned.
        """
        if self._loop is None:
            raise ListenerClosedError("FrameListener.get() before start(): call `await listener.start()`")
        event = await self._queue.get()
        if not self._reading and not self._closing:
            self._resume()  # there may be room again: read what queued up in ZeroMQ meanwhile
        return event

    def __aiter__(self) -> AsyncIterator[SourceEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[SourceEvent]:
        while True:
            try:
                yield await self.get()
            except ListenerClosedError:
                return

    @property
    def queue_depth(self) -> int:
        """Accepted frames waiting for the consumer."""
        return self._queue.frames

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
        """Reader callback: receive until ZeroMQ is empty, the queue is full or a turn is used up."""
        sock = self._socket
        if sock is None or not self._reading:
            return
        queue = self._queue
        intake = self._intake
        check = False  # on a wake-up, just try: the descriptor fired because something arrived
        for _ in range(_MESSAGES_PER_TURN):
            if not queue.has_room():
                # Backpressure: stop reading until a consumer takes an event (get() resumes).
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
            queue.put(intake.take(parts, time.monotonic()))  # never raises: one message cannot stop us
        if self._loop is not None:  # a turn's worth read: let other callbacks run, then go on
            self._loop.call_soon(self._on_readable)
