"""The durable state of :class:`cellsam_core.tracking.OnlineTracker`: what a restart needs to link on.

:class:`TrackerState` is JSON-able (a few numbers per live track); :func:`state_from_tables` rebuilds the
same value from the tracked cell tables of the last linked frames, as the store holds them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cellsam_core.cells import CellTable
from cellsam_core.errors import TrackingError
from cellsam_core.linking import LiveTracks
from cellsam_core.tracking_config import TrackerConfig

__all__ = ["PARENT_COLUMN", "TRACK_COLUMN", "TrackerState", "state_from_tables"]

#: Cell table measurement column holding each cell's track id (float64, exact below 2**53).
TRACK_COLUMN = "track_id"
#: Cell table measurement column holding the parent track of each cell's track (0 = none).
PARENT_COLUMN = "parent_track_id"


class TrackerState(BaseModel):
    """Everything :meth:`OnlineTracker.resume` needs to link on after a restart (JSON-able:
    ``state.model_dump(mode="json")`` / ``TrackerState.model_validate(data)``).

    The per-track lists all have one entry per live track (tracks that can still be continued), sorted by
    track id.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal[1] = Field(1, description="Version of this layout.")
    next_t: int = Field(description="The next time index to link.")
    last_t: int | None = Field(description="Time index of the last linked frame; None before the first.")
    next_track_id: int = Field(ge=1, description="The id the next new track gets.")
    track_id: list[int] = Field(description="Live track ids, increasing.")
    parent_track_id: list[int] = Field(description="Their parent tracks (0 = none).")
    t_last: list[int] = Field(description="Time index of each track's last cell.")
    missed: list[int] = Field(description="Linked frames since then in which the track was not found.")
    centroid: list[tuple[float, float]] = Field(description="Last (y, x) centroid, pixels.")
    velocity: list[tuple[float, float]] = Field(description="Last displacement per frame (vy, vx).")
    area: list[float] = Field(description="Last area, pixels.")
    bbox: list[tuple[float, float, float, float]] = Field(description="Last box (y0, x0, y1, x1).")

    @classmethod
    def of(cls, tracks: LiveTracks, *, next_t: int, last_t: int | None, next_track_id: int) -> TrackerState:
        """The state of a tracker holding ``tracks``."""
        return cls(
            next_t=next_t,
            last_t=last_t,
            next_track_id=next_track_id,
            track_id=tracks.track_id.tolist(),
            parent_track_id=tracks.parent_track_id.tolist(),
            t_last=tracks.t_last.tolist(),
            missed=tracks.missed.tolist(),
            centroid=[(y, x) for y, x in tracks.centroid.tolist()],
            velocity=[(y, x) for y, x in tracks.velocity.tolist()],
            area=tracks.area.tolist(),
            bbox=[(y0, x0, y1, x1) for y0, x0, y1, x1 in tracks.bbox.tolist()],
        )

    @classmethod
    def load(cls, state: TrackerState | Mapping[str, Any]) -> TrackerState:
        """Validate a state (or its JSON form).

        Raises
        ------
        TrackingError
            It does not validate (wrong layout, lists of different lengths).
        """
        try:
            st = state if isinstance(state, TrackerState) else cls.model_validate(dict(state))
        except ValidationError as exc:
            raise TrackingError(f"tracker state does not validate: {exc}") from exc
        n = len(st.track_id)
        lengths = {len(st.parent_track_id), len(st.t_last), len(st.missed), len(st.centroid)}
        lengths |= {len(st.velocity), len(st.area), len(st.bbox)}
        if lengths - {n}:
            raise TrackingError(f"tracker state lists must all have {n} entries (one per live track)")
        return st

    def live_tracks(self) -> LiveTracks:
        """The live tracks as arrays."""
        n = len(self.track_id)
        return LiveTracks(
            np.asarray(self.track_id, np.int64),
            np.asarray(self.parent_track_id, np.int64),
            np.asarray(self.t_last, np.int64),
            np.asarray(self.missed, np.int64),
            np.asarray(self.centroid, np.float64).reshape(n, 2),
            np.asarray(self.velocity, np.float64).reshape(n, 2),
            np.asarray(self.area, np.float64),
            np.asarray(self.bbox, np.float64).reshape(n, 4),
        )


def state_from_tables(
    config: TrackerConfig, tables: Sequence[tuple[int, CellTable]], *, next_track_id: int | None = None
) -> TrackerState:
    """Rebuild the tracker state from the tracked cell tables of the last linked frames.

    Parameters
    ----------
    config : TrackerConfig
    tables : sequence of (t, CellTable)
        ``(t, frame.cells)`` of the last linked frames, in any order, the last one included; each table
        has the :data:`TRACK_COLUMN` and :data:`PARENT_COLUMN` columns. Give at least
        ``config.gap_frames + 2`` frames (or all there are): a track's velocity comes from its last two
        cells, and is 0 when the earlier one is not among ``tables``.
    next_track_id : int, optional
        The id the next new track gets; by default one more than the largest id in ``tables`` (pass the
        saved value when tracks that ended before these frames may have had larger ids).

    Raises
    ------
    TrackingError
        ``tables`` is empty or a table lacks the track columns.
    """
    ordered = sorted(((int(t), c) for t, c in tables), key=lambda item: item[0])
    if not ordered:
        raise TrackingError("rebuilding a tracker needs the tracked tables of at least the last linked frame")
    seen: dict[int, list[tuple[int, int, CellTable]]] = {}
    for t, table in ordered:
        if TRACK_COLUMN not in table.measurements or PARENT_COLUMN not in table.measurements:
            raise TrackingError(f"the cell table of frame {t} has no {TRACK_COLUMN}/{PARENT_COLUMN} columns")
        for row, tid in enumerate(table.measurements[TRACK_COLUMN].astype(np.int64).tolist()):
            seen.setdefault(tid, []).append((t, row, table))
    linked_ts = np.array([t for t, _ in ordered])
    rows: dict[str, list[Any]] = {name: [] for name in LiveTracks.__slots__}
    for tid in sorted(seen):
        obs = seen[tid]
        t_last, row, table = obs[-1]
        missed = int(np.count_nonzero(linked_ts > t_last))
        if missed > config.gap_frames:
            continue
        velocity = np.zeros(2)
        if len(obs) > 1:
            t_prev, prev_row, prev_table = obs[-2]
            velocity = (table.centroid[row] - prev_table.centroid[prev_row]) / (t_last - t_prev)
        values = {
            "track_id": tid,
            "parent_track_id": int(table.measurements[PARENT_COLUMN][row]),
            "t_last": t_last,
            "missed": missed,
            "centroid": table.centroid[row],
            "velocity": velocity,
            "area": float(table.area[row]),
            "bbox": table.bbox[row].astype(np.float64),
        }
        for name, value in values.items():
            rows[name].append(value)
    n = len(rows["track_id"])
    tracks = LiveTracks(
        np.asarray(rows["track_id"], np.int64),
        np.asarray(rows["parent_track_id"], np.int64),
        np.asarray(rows["t_last"], np.int64),
        np.asarray(rows["missed"], np.int64),
        np.asarray(rows["centroid"], np.float64).reshape(n, 2),
        np.asarray(rows["velocity"], np.float64).reshape(n, 2),
        np.asarray(rows["area"], np.float64),
        np.asarray(rows["bbox"], np.float64).reshape(n, 4),
    )
    last_t = int(linked_ts[-1])
    first_free = max(seen, default=0) + 1
    return TrackerState.of(
        tracks,
        next_t=last_t + 1,
        last_t=last_t,
        next_track_id=next_track_id if next_track_id is not None else first_free,
    )
