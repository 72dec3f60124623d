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
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast, runtime_checkable

from acquisition.errors import ListenerClosedError, ProtocolError
from acquisition.frames import Frame
from acquisition.layout import Layout
from acquisition.limits import Limits
from acquisition.protocol import DEFAULT_MAX_FRAME_BYTES, EndMessage, Index, Reason, StartMessage
from acquisition.wire import FrameMessage, decode_message

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


@dataclass(frozen=True, slots=True)
class Started:
    """A ``start`` message: the acquisition's declaration (sizes, channels, metadata)."""

    message: StartMessage

    @property
    def acquisition(self) -> str:
        return self.message.acquisition


@dataclass(frozen=True, slots=True)
class Ended:
    """An ``end`` message, or an acquisition closed for idleness (``idle``; ``message`` then carries
    only the id). Every frame of the acquisition the source accepted came before it.

    After an idle close the acquisition is not ended for the sender: its next frame re-opens it (a
    :class:`~acquisition.frames.Frame` with the same declaration and layout), while after an ``end``
    its frames are rejected until a new ``start``.
    """

    message: EndMessage
    idle: bool = False

    @property
    def acquisition(self) -> str:
        return self.message.acquisition


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message refused by validation: ``reason`` is a :class:`~acquisition.protocol.Reason` value.

    ``acquisition`` and ``index`` are set when they could be read (so the rejection can be published).
    """

    reason: str
    detail: str
    acquisition: str | None = None
    index: Index | None = None


@dataclass(frozen=True, slots=True)
class Dropped:
    """``count`` accepted frames of ``acquisition`` dropped unsegmented (live mode: the oldest waiting
    frames, when newer ones arrived and the queue was full). ``index`` is the last one dropped."""

    acquisition: str
    index: Index
    count: int = 1
    reason: str = "live_overflow"


#: What :meth:`FrameSource.get` returns.
SourceEvent = Frame | Started | Ended | Rejected | Dropped


@dataclass(slots=True)
class SourceStats:
    """Counters of one source over all acquisitions (per-acquisition books belong to the consumer).

    ``rejected`` and ``dropped`` count by reason code; ``idle_closed`` counts acquisitions closed for
    idleness; ``open_acquisitions`` is how many are open now.
    """

    received: int = 0
    accepted: int = 0
    bytes_accepted: int = 0
    started: int = 0
    ended: int = 0
    idle_closed: int = 0
    open_acquisitions: int = 0
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
            "idle_closed": self.idle_closed,
            "open_acquisitions": self.open_acquisitions,
            "rejected": dict(self.rejected),
            "dropped": dict(self.dropped),
            "queue_depth": self.queue_depth,
        }


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


@dataclass(frozen=True, slots=True)
class _Known:
    """What an :class:`Intake` remembers of one acquisition."""

    start: StartMessage | None
    layout: Layout | None = None
    ended: bool = False


class Intake:
    """What a message is: decode, validate, and apply ``start``/``end`` (shared by every source).

    Keeps, per acquisition, only what validation needs: the latest declaration, the :class:`Layout`
    its frames must fit (fixed by the declaration and the first frame) and whether it ended (the
    ``max_acquisitions`` most recently seen, never forgetting an open one), and which acquisitions are
    open, with the time of their last message (for ``limits``: open acquisitions and idleness).
    """

    def __init__(
        self,
        *,
        max_frame_bytes: int,
        stats: SourceStats,
        limits: Limits | None = None,
        max_acquisitions: int = 1024,
    ) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.limits = limits or Limits()
        if max_acquisitions < self.limits.max_open_acquisitions:
            raise ValueError(
                f"max_acquisitions ({max_acquisitions}) must be at least limits.max_open_acquisitions "
                f"({self.limits.max_open_acquisitions}): open acquisitions are never forgotten"
            )
        self.stats = stats
        self._max_acquisitions = max_acquisitions
        self._acquisitions: OrderedDict[str, _Known] = OrderedDict()
        self._open: dict[str, float] = {}  # open acquisition -> when its last message arrived

    def declaration(self, acquisition: str) -> StartMessage | None:
        """The latest ``start`` of ``acquisition``, if one came (and it is still remembered)."""
        known = self._acquisitions.get(acquisition)
        return known.start if known is not None else None

    def is_open(self, acquisition: str) -> bool:
        """Whether ``acquisition`` is open (started or sent a frame; not ended or closed for idleness)."""
        return acquisition in self._open

    def _remember(self, acquisition: str, known: _Known) -> None:
        self._acquisitions[acquisition] = known
        self._acquisitions.move_to_end(acquisition)
        if len(self._acquisitions) > self._max_acquisitions:
            # The least recently declared that is not open (there is one: open ones are fewer).
            oldest = next(a for a in self._acquisitions if a not in self._open)
            del self._acquisitions[oldest]

    def _open_now(self, acquisition: str, received_at: float, index: Index | None = None) -> None:
        """Mark ``acquisition`` open (it just received a message), or refuse when it would be one too many."""
        if acquisition not in self._open and len(self._open) >= self.limits.max_open_acquisitions:
            raise ProtocolError(
                Reason.TOO_MANY_ACQUISITIONS,
                f"{len(self._open)} acquisitions are open, the most allowed (ingest.max_open_acquisitions): "
                "end one (or let it go idle) before opening another",
                acquisition=acquisition,
                index=None if index is None else index.model_dump(),
            )
        self._open[acquisition] = received_at
        self.stats.open_acquisitions = len(self._open)

    def take(self, parts: Sequence[Any], received_at: float) -> SourceEvent:
        """The event for one received multipart message.

        Never raises: a message that breaks the protocol becomes a :class:`Rejected` with its reason, and
        an unexpected error while handling one becomes a :class:`Rejected` with reason ``internal`` (and
        a logged traceback), so no message can stop a source.
        """
        self.stats.received += 1
        try:
            return self._take(parts, received_at)
        except ProtocolError as exc:
            return self.rejected(exc)
        except Exception as exc:
            log.exception("internal error while handling a message")
            return self.rejected(ProtocolError(Reason.INTERNAL, f"{type(exc).__name__}: {exc}"))

    def _take(self, parts: Sequence[Any], received_at: float) -> SourceEvent:
        message = decode_message(
            parts, max_frame_bytes=self.max_frame_bytes, max_frame_pixels=self.limits.max_frame_pixels
        )
        if isinstance(message, FrameMessage):
            return self._frame(message, received_at)
        if isinstance(message, StartMessage):
            return self._start(message, received_at)
        return self._end(message)

    def _frame(self, message: FrameMessage, received_at: float) -> Frame:
        acquisition = message.acquisition
        known = self._acquisitions.get(acquisition)
        if known is not None and known.ended:
            header = message.header
            raise ProtocolError(
                Reason.ACQUISITION_ENDED,
                f"acquisition {acquisition!r} has ended; send 'start' to re-open it",
                acquisition=acquisition,
                index=header.index.model_dump(),
            )
        start = known.start if known is not None else None
        layout = known.layout if known is not None else None
        fixed = layout is not None
        if layout is None:
            layout = Layout.of(start, message, self.limits)
        layout.check(message)
        if acquisition not in self._open:
            self._open_now(acquisition, received_at, message.header.index)
        else:
            self._open[acquisition] = received_at
        if not fixed:  # its first accepted frame fixes the layout
            self._remember(acquisition, _Known(start, layout))
        self.stats.accepted += 1
        self.stats.bytes_accepted += message.data.nbytes
        return Frame(message, received_at=received_at, declaration=start, layout=layout)

    def _start(self, message: StartMessage, received_at: float) -> Started:
        acquisition = message.acquisition
        self.limits.check_declaration(message)
        known = self._acquisitions.get(acquisition)
        layout = known.layout if known is not None else None
        if layout is not None:
            # Its frames fixed a store: a new declaration must lay out the same one.
            redeclared = layout.redeclared(message)
            if not layout.same_store(redeclared):
                raise ProtocolError(
                    Reason.LAYOUT_CONFLICT,
                    f"this 'start' lays acquisition {acquisition!r} out as {redeclared.describe()}; its "
                    f"frames already fixed {layout.describe()}: keep that, or use a new acquisition id",
                    acquisition=acquisition,
                )
            layout = redeclared
        self._open_now(acquisition, received_at)
        self._remember(acquisition, _Known(message, layout))
        self.stats.started += 1
        return Started(message)

    def _end(self, message: EndMessage) -> Ended:
        acquisition = message.acquisition
        known = self._acquisitions.get(acquisition) or _Known(None)
        self._remember(acquisition, _Known(known.start, known.layout, ended=True))
        self._open.pop(acquisition, None)
        self.stats.open_acquisitions = len(self._open)
        self.stats.ended += 1
        return Ended(message)

    def expire(self, now: float) -> list[Ended]:
        """Close the open acquisitions idle at ``now`` (``time.monotonic()``): their :class:`Ended` notices.

        An acquisition is idle when its last message arrived at least ``limits.idle_timeout_s`` ago (or
        twice its declared ``time_interval_s``, when that is longer). Its declaration and layout are kept,
        so its next frame re-opens it as it was.
        """
        idle = []
        for acquisition, last in list(self._open.items()):
            known = self._acquisitions.get(acquisition)
            timeout = self.limits.idle_timeout_of(known.start if known is not None else None)
            if timeout is not None and now - last >= timeout:
                del self._open[acquisition]
                idle.append(Ended(EndMessage(acquisition=acquisition), idle=True))
        if idle:
            self.stats.idle_closed += len(idle)
            self.stats.open_acquisitions = len(self._open)
            for event in idle:
                log.info("acquisition %s closed: nothing received for a while", event.acquisition)
        return idle

    def rejected(self, exc: ProtocolError) -> Rejected:
        """Count a rejection and make its notice."""
        self.stats.rejected[exc.reason] += 1
        index = None
        if exc.index is not None:
            with contextlib.suppress(ValueError):
                index = Index.model_validate(exc.index)
        return Rejected(exc.reason, exc.detail, exc.acquisition, index)


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

    Same validation and queueing as the ZeroMQ listener; :meth:`push` waits while the queue is full
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
    ) -> None:
        self._stats = SourceStats()
        self._intake = Intake(max_frame_bytes=max_frame_bytes, stats=self._stats, limits=limits)
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
