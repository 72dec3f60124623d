"""The frame source seam: where accepted frames, and what happened to the other messages, come from.

:class:`FrameSource` is the protocol the pipeline consumes; :class:`~acquisition.listener.FrameListener`
(ZeroMQ) and :class:`MemoryFrameSource` (tests, notebooks, replaying files) implement it and share one
conformance suite (``tests/test_source_conformance.py``). Both decide what a message is with the same
:class:`Intake` and queue events in the same :class:`EventQueue`, so they behave alike by construction.

A source reports by what it returns, never by calling up: :meth:`FrameSource.get` gives, in arrival
order, accepted :class:`~acquisition.frames.Frame` objects and the notices :class:`Started`,
:class:`Ended`, :class:`Rejected` and :class:`Dropped`. The consumer keeps the books.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast, runtime_checkable

from acquisition.errors import ListenerClosedError
from acquisition.events import Dropped, Ended, Rejected, SourceEvent, SourceStats, Started
from acquisition.frames import Frame
from acquisition.intake import Intake
from acquisition.limits import Limits
from acquisition.protocol import DEFAULT_MAX_FRAME_BYTES
from acquisition.spec import StoredAcquisition

__all__ = [
    "Dropped",
    "Ended",
    "EventQueue",
    "FrameSource",
    "IdleTimer",
    "Intake",
    "MemoryFrameSource",
    "Rejected",
    "SourceEvent",
    "SourceStats",
    "Started",
]

log = logging.getLogger(__name__)


@runtime_checkable
class FrameSource(Protocol):
    """Accepted frames and notices, in arrival order, to one or more consumers.

    Contract (checked by ``tests/test_source_conformance.py`` for every implementation):

    - :meth:`get` returns events in the order their messages arrived; each event goes to exactly one
      caller. A frame is a :class:`~acquisition.frames.Frame` whose ``declaration`` is its
      acquisition's latest ``start`` (None if none came); ``start``/``end`` become :class:`Started` /
      :class:`Ended`; every message that is not accepted becomes one :class:`Rejected` with the
      protocol's reason code, and the source keeps serving.
    - Frames of an acquisition after its ``end`` are rejected (``acquisition_ended``) until a new
      ``start`` re-opens it.
    - At most ``limits.max_open_acquisitions`` acquisitions are open at once: a ``start`` or frame that
      would open another is rejected (``too_many_acquisitions``); ``end`` and idleness free a slot.
    - With ``limits.idle_timeout_s`` set, an open acquisition that received nothing for that long is
      reported ended (:class:`Ended` with ``idle=True``); its next frame is accepted and re-opens it.
    - At most ``max_queued`` accepted frames wait for consumers. Beyond that the source stops taking
      messages (backpressure on the sender) or, when ``live``, drops the oldest waiting frame and puts a
      :class:`Dropped` notice in its place. Notices are bounded too (``max_notices``).
    - :meth:`stop` stops taking messages; events already queued are still returned, then :meth:`get`
      raises :class:`~acquisition.errors.ListenerClosedError` (also to callers already waiting).
    """

    @property
    def endpoint(self) -> str:
        """Where the source takes messages from (for logs and ``GET /endpoints``)."""
        ...

    @property
    def stats(self) -> SourceStats:
        """Counters over all acquisitions."""
        ...

    @property
    def queue_depth(self) -> int:
        """Accepted frames waiting for a consumer."""
        ...

    async def start(self) -> None:
        """Begin taking messages."""
        ...

    async def stop(self) -> None:
        """Stop taking messages; queued events stay available to :meth:`get`."""
        ...

    async def get(self) -> SourceEvent:
        """The next event, waiting for one; ``ListenerClosedError`` once stopped and drained."""
        ...


class IdleTimer:
    """Closes idle acquisitions: every so often, queues the :meth:`Intake.expire` notices.

    Used by every source (with the same :class:`Intake` and :class:`EventQueue`); does nothing when
    ``limits.idle_timeout_s`` is None.
    """

    def __init__(self, intake: Intake, queue: EventQueue) -> None:
        self._intake = intake
        self._queue = queue
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        timeout = intake.limits.idle_timeout_s
        # A quarter of the timeout (closing up to 25 % late), at most a second.
        self._period = None if timeout is None else min(1.0, timeout / 4)

    def start(self) -> None:
        """Start checking (from within the running event loop)."""
        if self._period is None or self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(self._period, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        if self._queue.closed or self._loop is None or self._period is None:
            return
        for event in self._intake.expire(time.monotonic()):
            self._queue.put(event)
        self._handle = self._loop.call_later(self._period, self._tick)


class EventQueue:
    """The bounded, ordered queue between a source's intake and its consumers.

    Frames count against ``max_queued`` and notices against ``max_notices``; :meth:`has_room` says
    whether the source may take another message. In live mode a frame beyond ``max_queued`` replaces
    the oldest waiting frame, which becomes a :class:`Dropped` notice in its place (adjacent drops of
    one acquisition merge into one notice).
    """

    def __init__(self, *, max_queued: int, live: bool, stats: SourceStats, max_notices: int = 4096) -> None:
        if max_queued < 1:
            raise ValueError(f"max_queued must be ≥ 1, got {max_queued}")
        self.max_queued = max_queued
        self.max_notices = max_notices
        self.live = live
        self.stats = stats
        self._events: deque[SourceEvent] = deque()
        self._frames = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.closed = False

    @property
    def frames(self) -> int:
        """Frames waiting."""
        return self._frames

    def has_room(self) -> bool:
        """Whether another message may be taken now."""
        if len(self._events) - self._frames >= self.max_notices:
            return False
        return self.live or self._frames < self.max_queued

    def put(self, event: SourceEvent) -> None:
        """Queue one event and wake one waiting consumer."""
        if type(event) is Frame:
            if self.live:
                while self._frames >= self.max_queued:
                    self._drop_oldest()
            self._frames += 1
            self.stats.queue_depth = self._frames
        self._events.append(event)
        self._wake_one()

    def _drop_oldest(self) -> None:
        events = self._events
        i = next(i for i, e in enumerate(events) if type(e) is Frame)
        frame = cast(Frame, events[i])
        self._frames -= 1
        self.stats.dropped["live_overflow"] += 1
        before = events[i - 1] if i else None
        if isinstance(before, Dropped) and before.acquisition == frame.acquisition:
            events[i - 1] = Dropped(frame.acquisition, frame.index, before.count + 1)
            del events[i]
        else:
            events[i] = Dropped(frame.acquisition, frame.index)

    async def get(self) -> SourceEvent:
        """The oldest event, waiting for one; ``ListenerClosedError`` once closed and drained."""
        events = self._events
        while not events:
            if self.closed:
                raise ListenerClosedError("the source is stopped and drained")
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                if events:  # an event handed to this waiter goes to the next one instead
                    self._wake_one()
                raise
        event = events.popleft()
        if type(event) is Frame:
            self._frames -= 1
            self.stats.queue_depth = self._frames
        return event

    def close(self) -> None:
        """No more events will come: waiting consumers are woken to drain or end."""
        self.closed = True
        while self._waiters:
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class MemoryFrameSource:
    """A :class:`FrameSource` fed in-process: :meth:`push` takes the parts of a wire message.

    Same validation and queueing (and ``stored``, see :class:`~acquisition.listener.FrameListener`) as
    the ZeroMQ listener; :meth:`push` waits while the queue is full
    (the backpressure a ZeroMQ sender feels). For tests, notebooks and replaying recorded messages.
    """

    def __init__(
        self,
        *,
        max_queued: int = 8,
        live: bool = False,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_notices: int = 4096,
        limits: Limits | None = None,
        stored: Callable[[str], StoredAcquisition | None] | None = None,
    ) -> None:
        self._stats = SourceStats()
        self._intake = Intake(
            max_frame_bytes=max_frame_bytes, stats=self._stats, limits=limits, stored=stored
        )
        self._queue = EventQueue(max_queued=max_queued, live=live, stats=self._stats, max_notices=max_notices)
        self._idle = IdleTimer(self._intake, self._queue)
        self._room: asyncio.Event | None = None
        self._started = False

    @property
    def endpoint(self) -> str:
        return "memory://"

    @property
    def stats(self) -> SourceStats:
        return self._stats

    @property
    def queue_depth(self) -> int:
        return self._queue.frames

    async def start(self) -> None:
        self._room = asyncio.Event()
        self._started = True
        self._idle.start()

    async def stop(self) -> None:
        self._idle.stop()
        self._queue.close()
        if self._room is not None:
            self._room.set()

    async def push(self, parts: Sequence[Any]) -> None:
        """Take one message (a list of parts, as :func:`acquisition.wire.encode_frame` makes them)."""
        if not self._started or self._room is None:
            raise RuntimeError("MemoryFrameSource.push() before start()")
        while not self._queue.has_room():
            if self._queue.closed:
                break
            self._room.clear()
            await self._room.wait()
        if self._queue.closed:
            raise ListenerClosedError("the source is stopped")
        self._queue.put(self._intake.take(list(parts), time.monotonic()))

    async def get(self) -> SourceEvent:
        if not self._started:
            raise ListenerClosedError("MemoryFrameSource.get() before start(): call `await source.start()`")
        event = await self._queue.get()
        if self._room is not None:
            self._room.set()
        return event
