"""What a frame source reports besides frames: the notices, and the counters of a source.

:class:`Started`, :class:`Ended`, :class:`Rejected` and :class:`Dropped` come out of
:meth:`acquisition.source.FrameSource.get` in arrival order with the accepted
:class:`~acquisition.frames.Frame` objects (together, :data:`SourceEvent`); :class:`SourceStats` counts
over all acquisitions. Re-exported by :mod:`acquisition.source`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from acquisition.frames import Frame
from acquisition.protocol import EndMessage, Index, StartMessage

__all__ = ["Dropped", "Ended", "Rejected", "SourceEvent", "SourceStats", "Started"]


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
