"""Built-in feedback rules for the common cases; each is a small callable ``rule(frame) -> actions``.

Use them as they are, or read them as examples of writing your own (``docs/feedback.md``)::

    loop = FeedbackLoop(actuator, acquisition="exp42", rules=[
        AcquireNewCells(channel="GFP", exposure_ms=50, z_offsets_um=(-2, 0, 2)),
        IntervalWhenCount(threshold=200, interval_s=60),
        StopWhenConfluent(fraction=0.8),
    ])

Rules keep their own state (one instance per acquisition) and see frames in the order results arrive;
state is per position (and z plane), and a frame older than the last one seen at its position is ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from acquisition.feedback_types import Acquire, FrameInput, SetInterval, Stop

__all__ = ["AcquireNewCells", "IntervalWhenCount", "StopWhenConfluent"]


class AcquireNewCells:
    """Acquire each cell new at its position, centred on it, with another channel / exposure / z-stack.

    A cell is *new* when no cell of the previous frame of the same position (and z) lies within
    ``max_distance_px`` of its centroid: cells that appeared or entered the field, and daughters of a
    division that moved off the mother's centroid. (Once tracking publishes track events, a rule on those
    replaces this nearest-neighbour test.) At most ``max_per_frame`` cells per frame, largest first;
    ``first_frame=True`` also takes the cells of each position's first frame.
    """

    def __init__(
        self,
        *,
        channel: str | Mapping[str, Any] | None = None,
        exposure_ms: float | None = None,
        z_offsets_um: Iterable[float] = (),
        max_distance_px: float = 15.0,
        max_per_frame: int = 5,
        min_area_px: int = 0,
        first_frame: bool = False,
        name: str = "acquire_new_cells",
    ) -> None:
        self.channel, self.exposure_ms, self.z_offsets_um = channel, exposure_ms, tuple(z_offsets_um)
        self.max_distance_px, self.max_per_frame, self.min_area_px = (
            max_distance_px,
            max_per_frame,
            min_area_px,
        )
        self.first_frame, self.name = first_frame, name
        self._previous: dict[tuple[int, int], tuple[int, np.ndarray]] = {}

    def __call__(self, frame: FrameInput) -> list[Acquire] | None:
        where, t = (frame.index.p, frame.index.z), frame.index.t
        previous = self._previous.get(where)
        if previous is not None and t <= previous[0]:
            return None  # an older frame arriving late: the newer one already decided
        centroids = frame.cells.centroid
        self._previous[where] = (t, centroids.copy())
        if previous is None and not self.first_frame:
            return None
        new = np.ones(len(centroids), dtype=bool)
        if previous is not None and len(previous[1]) and len(centroids):
            distance, _ = cKDTree(previous[1]).query(centroids, k=1)
            new = distance > self.max_distance_px
        rows = [i for i in np.flatnonzero(new) if frame.cells.area[i] >= self.min_area_px]
        rows.sort(key=lambda i: -int(frame.cells.area[i]))
        return [
            frame.acquire_cell(
                int(i),
                channel=self.channel,
                exposure_ms=self.exposure_ms,
                z_offsets_um=self.z_offsets_um,
                reason=f"new cell {int(frame.cells.label[i])} at t={t} p={frame.index.p}",
            )
            for i in rows[: self.max_per_frame]
        ]


class IntervalWhenCount:
    """Set the time-lapse interval to ``interval_s`` the first time a frame has ``threshold`` cells or more
    (``falling=True``: or fewer). Fires once per acquisition."""

    def __init__(
        self, threshold: int, interval_s: float, *, falling: bool = False, name: str = "interval_when_count"
    ) -> None:
        self.threshold, self.interval_s, self.falling, self.name = threshold, interval_s, falling, name
        self.fired = False

    def __call__(self, frame: FrameInput) -> SetInterval | None:
        n = frame.n_cells
        if self.fired or (n > self.threshold if self.falling else n < self.threshold):
            return None
        self.fired = True
        word = "≤" if self.falling else "≥"
        return SetInterval(
            self.interval_s,
            reason=f"{n} cells {word} {self.threshold} at t={frame.index.t} p={frame.index.p}",
        )


class StopWhenConfluent:
    """Stop the acquisition once cells cover ``fraction`` of the field in ``frames`` consecutive frames of
    one position (the summed cell area over the frame's area)."""

    def __init__(self, fraction: float = 0.8, *, frames: int = 1, name: str = "stop_when_confluent") -> None:
        self.fraction, self.frames, self.name = fraction, frames, name
        self._streak: dict[int, int] = {}

    def __call__(self, frame: FrameInput) -> Stop | None:
        covered = frame.confluence()
        if covered is None:
            return None
        p = frame.index.p
        self._streak[p] = self._streak.get(p, 0) + 1 if covered >= self.fraction else 0
        if self._streak[p] < self.frames:
            return None
        return Stop(f"confluence {covered:.2f} ≥ {self.fraction} at t={frame.index.t} p={p}")
