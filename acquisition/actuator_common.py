"""What the actuators share: the tag of added events, reading a frame's stage position, the in-flight
record of an ``Acquire``, and :class:`RecordingActuator` (a dry run and the test double).

Use the actuators through :mod:`acquisition.actuators`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from acquisition.feedback_types import FrameInfo, FrameKey, Outcome, Status, Ticket, frame_key

if TYPE_CHECKING:
    from useq import MDAEvent

__all__ = ["FEEDBACK_TAG", "InFlight", "RecordingActuator", "finite_float", "frame_info_from_mda", "stage_of"]

log = logging.getLogger(__name__)

#: Key in ``MDAEvent.metadata`` (and pycromanager ``axes``) that marks an event added by feedback; its
#: value is the action's id in the action table.
FEEDBACK_TAG = "cellsam_feedback"


def finite_float(value: Any) -> float | None:
    """``value`` as a finite float, or None (also for strings that are not numbers)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def stage_of(event: Any, meta: Mapping[str, Any] | None) -> tuple[float | None, float | None, float | None]:
    """Stage (x, y, z) of a frame: pymmcore-plus's frame metadata ``position`` (read from the stage), else
    the event's target."""
    pos = (meta or {}).get("position") or {}
    return (
        finite_float(pos.get("x", getattr(event, "x_pos", None))),
        finite_float(pos.get("y", getattr(event, "y_pos", None))),
        finite_float(pos.get("z", getattr(event, "z_pos", None))),
    )


def frame_info_from_mda(img: Any, event: MDAEvent, meta: Mapping[str, Any] | None) -> FrameInfo:
    """What the loop needs of a pymmcore-plus ``frameReady(img, event, meta)``, stamped now."""
    x, y, z = stage_of(event, meta)
    pixel = finite_float((meta or {}).get("pixel_size_um"))
    shape = tuple(int(s) for s in getattr(img, "shape", (0, 0))[:2])
    return FrameInfo(
        key=frame_key(event.index),
        event=event,
        stage_x_um=x,
        stage_y_um=y,
        stage_z_um=z,
        pixel_size_um=pixel if pixel is not None and pixel > 0 else None,
        frame_shape=(shape[0], shape[1]),
        ready_at=time.monotonic(),
        ready_wall=time.time(),
    )


# -- dry run ---------------------------------------------------------------------------------------------


class RecordingActuator:
    """Records tickets instead of acting on a microscope.

    Use it to try rules on a live acquisition without touching the microscope (connect
    :meth:`frame_ready` to ``core.mda.events.frameReady`` so frames have stage positions), and as a test
    double. Each ticket is reported at once with ``outcome`` (``skipped`` with detail ``dry run`` by
    default; None reports nothing).
    """

    def __init__(self, *, outcome: Status | None = "skipped", detail: str = "dry run") -> None:
        self.outcome = outcome
        self.detail = detail
        self.tickets: list[Ticket] = []
        self.frames: dict[FrameKey, FrameInfo] = {}
        self.processed_keys: list[FrameKey] = []
        self._lock = threading.Lock()

    def record(self, info: FrameInfo) -> None:
        """Remember what the microscope knew of a frame."""
        with self._lock:
            self.frames[info.key] = info

    def frame_ready(self, img: Any, event: MDAEvent, meta: Mapping[str, Any] | None = None) -> None:
        """A pymmcore-plus ``frameReady`` slot that records the frame."""
        self.record(frame_info_from_mda(img, event, meta))

    def submit(self, ticket: Ticket) -> None:
        with self._lock:
            self.tickets.append(ticket)
        if self.outcome is not None:
            ticket.report(Outcome(self.outcome, detail=self.detail, wall=time.time()))

    def frame_info(self, key: FrameKey) -> FrameInfo | None:
        with self._lock:
            return self.frames.get(key)

    def processed(self, key: FrameKey) -> None:
        with self._lock:
            self.processed_keys.append(key)

    @property
    def actions(self) -> list[Any]:
        """The actions submitted so far, in order."""
        with self._lock:
            return [t.action for t in self.tickets]


@dataclass
class InFlight:
    """An Acquire in flight: its ticket and how many of its events still have to produce a frame (shared
    with :mod:`acquisition.pycromanager_actuator`)."""

    ticket: Ticket
    remaining: int
    stage_xyz: tuple[float | None, float | None, float | None] | None = None
