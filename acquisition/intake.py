"""What a message is: :class:`Intake` decodes, validates and applies ``start``/``end`` for every source.

Both :class:`~acquisition.listener.FrameListener` and :class:`~acquisition.source.MemoryFrameSource` turn
each received message into one event with the same :class:`Intake`, so they behave alike by
construction: the protocol's checks (:mod:`acquisition.wire`), each acquisition's layout
(:mod:`acquisition.layout`), the service's :class:`~acquisition.limits.Limits` (extents, frame size,
open acquisitions) and which acquisitions went idle. Re-exported by :mod:`acquisition.source`.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from acquisition.errors import ProtocolError
from acquisition.events import Ended, Rejected, SourceEvent, SourceStats, Started
from acquisition.frames import Frame
from acquisition.layout import FirstFrame, Layout, declared_metadata, redeclare
from acquisition.limits import Limits
from acquisition.protocol import EndMessage, Index, Reason, StartMessage
from acquisition.spec import AcquisitionSpec, StoredAcquisition
from acquisition.wire import FrameMessage, decode_message

__all__ = ["Intake"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Known:
    """What an :class:`Intake` remembers of one acquisition."""

    start: StartMessage | None
    layout: Layout | None = None
    ended: bool = False
    #: Physical metadata fixed so far (`declared_metadata`), which a later ``start`` must not change.
    reference: dict[str, Any] = field(default_factory=dict)


def _layout_of_spec(spec: AcquisitionSpec, limits: Limits) -> Layout:
    """The layout of an acquisition a label sink already holds (a service restarted on its store)."""
    sizes = (spec.declaration or {}).get("sizes") or {}
    declared_c = isinstance(sizes, dict) and sizes.get("c") is not None
    first = FirstFrame(
        p=0,
        z=0,
        channel=0 if declared_c else None,
        shape=spec.frame_shape,
        channels=1 if declared_c else spec.sizes.c,
        dtype=spec.image_dtype,
    )
    return Layout(
        t=spec.sizes.t,
        p=spec.sizes.p,
        z=spec.sizes.z,
        c=spec.sizes.c,
        shape=spec.frame_shape,
        dtype=spec.image_dtype,
        declared_channels=declared_c,
        first=first,
        limits=limits,
    )


def _metadata_of_spec(spec: AcquisitionSpec) -> dict[str, Any]:
    """`declared_metadata` of a stored acquisition, from its spec."""
    return {
        "pixel_size_um": spec.pixel_size_um,
        "time_interval_s": spec.time_interval_s,
        "z_step_um": spec.z_step_um,
        "channels.names": spec.channel_names,
        "channels.colors": spec.channel_colors,
        "positions": spec.positions or None,
    }


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
        stored: Callable[[str], StoredAcquisition | None] | None = None,
    ) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.stored = stored
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

    def _known(self, acquisition: str) -> _Known | None:
        """What is known of an acquisition: seen in this run, else what the label sink holds of it."""
        known = self._acquisitions.get(acquisition)
        if known is not None or self.stored is None:
            return known
        try:
            stored = self.stored(acquisition)
        except Exception as exc:  # something that is not its store is in the way, or unreadable
            raise ProtocolError(
                Reason.LAYOUT_CONFLICT,
                f"acquisition {acquisition!r} cannot be resumed from the label store: {exc}",
                acquisition=acquisition,
            ) from exc
        if stored is None:
            return None
        spec = stored.spec
        start = None
        if spec.declaration is not None:
            with contextlib.suppress(ValueError):
                start = StartMessage.model_validate(spec.declaration)
        known = _Known(
            start,
            _layout_of_spec(spec, self.limits),
            ended=stored.closed,
            reference=_metadata_of_spec(spec),
        )
        self._remember(acquisition, known)
        log.info("acquisition %s resumed from the label store (sizes %s)", acquisition, spec.sizes)
        return known

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
        known = self._known(acquisition)
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
            reference = known.reference if known is not None else declared_metadata(None)
            self._remember(acquisition, _Known(start, layout, reference=reference))
        self.stats.accepted += 1
        self.stats.bytes_accepted += message.data.nbytes
        return Frame(message, received_at=received_at, declaration=start, layout=layout)

    def _start(self, message: StartMessage, received_at: float) -> Started:
        acquisition = message.acquisition
        self.limits.check_declaration(message)
        known = self._known(acquisition)
        if known is None:
            layout, reference = None, declared_metadata(message)
        else:
            # A further start: the same acquisition (a no-op, or more time points) and never a different
            # one (its frames or its store fixed it); it re-opens an ended acquisition.
            layout = redeclare(known.layout, known.reference, message)
            reference = known.reference if known.layout is not None else declared_metadata(message)
        self._open_now(acquisition, received_at)
        self._remember(acquisition, _Known(message, layout, reference=reference))
        self.stats.started += 1
        return Started(message)

    def _end(self, message: EndMessage) -> Ended:
        acquisition = message.acquisition
        known = self._known(acquisition) or _Known(None)
        self._remember(acquisition, _Known(known.start, known.layout, ended=True, reference=known.reference))
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
