"""Live cell tracking: an online linker per position that numbers cells by track as frames are segmented.

:class:`OnlineTracker` takes each segmented frame of one position (its label image and
:class:`~cellsam_core.cells.CellTable`) and links its cells to the tracks of the frames before, in time
order, whatever order the frames arrive in::

    tracker = OnlineTracker(TrackerConfig(max_distance=10))
    for frame in tracker.offer(t, labels, cells):  # frames linked by this offer, in t order
        frame.track_labels  # uint32 (H, W): each cell's pixels hold its track id (0 = background)
        frame.cells  # the table plus "track_id" and "parent_track_id" columns
        frame.events  # appeared / divided / lost / recovered / merged / disappeared
    tracker.skip(t)  # a frame that will never come (it failed): linking goes on without it

Time order and idempotence: a frame ahead of a missing time index is held until that index is offered or
skipped. Offering a frame that is already linked returns the same :class:`TrackedFrame` again (the
tracker keeps the last ``history`` linked frames) and never issues new ids.

Durability: :meth:`OnlineTracker.state` is a small JSON-able :class:`TrackerState`;
:meth:`OnlineTracker.resume` continues from it, and :meth:`OnlineTracker.from_tables` rebuilds it from the
tracked cell tables of the last few linked frames (what the store holds), so a restart links on without
renumbering. Track ids start at 1 and are never reused within a position.

The cost model, gap closing, divisions and merges are described in :mod:`cellsam_core.linking`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from cellsam_core.cells import CellTable
from cellsam_core.errors import StaleFrameError, TrackingError
from cellsam_core.linking import Detections, LiveTracks, assign
from cellsam_core.tracking_config import TrackerConfig
from cellsam_core.tracking_state import PARENT_COLUMN, TRACK_COLUMN, TrackerState, state_from_tables

__all__ = [
    "PARENT_COLUMN",
    "TRACK_COLUMN",
    "EventKind",
    "OnlineTracker",
    "TrackEvent",
    "TrackedFrame",
    "TrackerConfig",
    "TrackerState",
    "track_sequence",
]

EventKind = Literal["appeared", "divided", "lost", "recovered", "merged", "disappeared"]


@dataclass(frozen=True, slots=True)
class TrackEvent:
    """Something that happened to a track at frame ``t``.

    ============  ==============================================================================
    kind          meaning
    ============  ==============================================================================
    appeared      ``track_id`` starts at ``t`` without a parent (entered the field, or first frame)
    divided       ``track_id`` ended at ``t - 1`` by dividing into the two ``daughters``
    lost          ``track_id`` was not found at ``t``; gap closing may still continue it
    merged        as ``lost``, but its cell looks merged into ``into``'s cell (under-segmentation)
    recovered     ``track_id`` continues at ``t`` after ``gap`` frames lost (gap closing)
    disappeared   ``track_id`` was not found for more than ``gap_frames`` frames: it ended at its last
                  cell (``t`` is when that became certain)
    ============  ==============================================================================
    """

    kind: EventKind
    t: int
    track_id: int
    daughters: tuple[int, ...] = ()
    into: int = 0
    gap: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``kind``, ``t``, ``track_id`` and the fields that apply to the kind."""
        out: dict[str, Any] = {"kind": self.kind, "t": self.t, "track_id": self.track_id}
        if self.daughters:
            out["daughters"] = list(self.daughters)
        if self.into:
            out["into"] = self.into
        if self.gap:
            out["gap"] = self.gap
        return out


@dataclass(frozen=True, eq=False)
class TrackedFrame:
    """One linked frame.

    Attributes
    ----------
    t : int
        Time index.
    track_labels : ndarray, uint32 (H, W)
        The frame's label image with each cell's pixels set to its track id; 0 is background.
    cells : CellTable
        The frame's cell table (same rows) plus the measurement columns :data:`TRACK_COLUMN` and
        :data:`PARENT_COLUMN` (0 where the track has no parent).
    events : tuple of TrackEvent
        What happened to tracks at this frame.
    """

    t: int
    track_labels: NDArray[np.uint32]
    cells: CellTable
    events: tuple[TrackEvent, ...]

    @property
    def track_ids(self) -> NDArray[np.int64]:
        """int64 (N,) track id of each row of :attr:`cells`."""
        return self.cells.measurements[TRACK_COLUMN].astype(np.int64)

    @property
    def parent_track_ids(self) -> NDArray[np.int64]:
        """int64 (N,) parent track id of each row's track, 0 for none."""
        return self.cells.measurements[PARENT_COLUMN].astype(np.int64)


_SKIPPED = object()


def _detections(cells: CellTable) -> Detections:
    return Detections(cells.centroid, cells.area.astype(np.float64), cells.bbox.astype(np.float64))


class OnlineTracker:
    """Links the frames of ONE position as they come (see the module docstring). Not thread-safe: one
    caller per tracker.

    Parameters
    ----------
    config : TrackerConfig, optional
    first_t : int
        Time index of the first frame.
    history : int
        Linked frames kept to answer a frame offered again (≥ 1).
    """

    def __init__(self, config: TrackerConfig | None = None, *, first_t: int = 0, history: int = 8) -> None:
        if history < 1:
            raise TrackingError(f"history must be ≥ 1 linked frame, got {history}")
        self.config = config or TrackerConfig()
        self._history = history
        self._next_t = int(first_t)
        self._last_t: int | None = None
        self._next_id = 1
        self._tracks = LiveTracks.empty()
        self._pending: dict[int, Any] = {}
        self._done: OrderedDict[int, TrackedFrame] = OrderedDict()

    # -- time order --------------------------------------------------------------------------------

    @property
    def next_t(self) -> int:
        """The time index the tracker waits for (frames after it are held until it is offered or
        skipped)."""
        return self._next_t

    @property
    def pending(self) -> tuple[int, ...]:
        """Time indices offered or skipped ahead of :attr:`next_t`, held until it comes."""
        return tuple(sorted(self._pending))

    @property
    def next_track_id(self) -> int:
        return self._next_id

    def linked(self, t: int) -> TrackedFrame | None:
        """The linked frame ``t`` if the tracker still holds it."""
        return self._done.get(t)

    def offer(
        self, t: int, labels: NDArray[np.integer], cells: CellTable | None = None
    ) -> list[TrackedFrame]:
        """Offer the segmentation of frame ``t``; returns the frames this offer made linkable, in t order.

        Parameters
        ----------
        t : int
            Time index.
        labels : ndarray, (H, W), non-negative integers
            The frame's cell labels, 0 = background.
        cells : CellTable, optional
            The table measured from ``labels`` (:meth:`CellTable.from_labels` when omitted).

        Returns
        -------
        list of TrackedFrame
            Empty while an earlier frame is missing; ``[frame]`` again for a frame already linked.

        Raises
        ------
        StaleFrameError
            ``t`` was skipped, or linked so long ago that the tracker no longer holds it (read it from
            the store).
        TrackingError
            ``labels`` is not a 2-D integer image, or ``t`` is before the first frame.
        """
        t = int(t)
        arr = np.asarray(labels)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise TrackingError(
                f"labels of frame {t} must be a 2-D integer array, got {arr.dtype} {arr.shape}"
            )
        if t < self._next_t:
            if t in self._done:
                return [self._done[t]]
            raise StaleFrameError(
                t,
                f"frame {t} was already linked or skipped (the tracker is at {self._next_t} and holds "
                f"linked frames {list(self._done) or 'none'}); read its tracks from the store",
            )
        if t not in self._pending:  # a retried frame offered twice before linking keeps its first copy
            self._pending[t] = (arr, cells)
        return self._drain()

    def skip(self, t: int) -> list[TrackedFrame]:
        """Declare frame ``t`` missing for good; returns the frames that became linkable.

        Tracks are then linked from the frame before ``t`` to the frame after it (the reach grows with
        the frames elapsed; see :class:`TrackerConfig`). Skipping a time index already passed is a no-op.
        """
        t = int(t)
        if t >= self._next_t and t not in self._pending:
            self._pending[t] = _SKIPPED
        return self._drain()

    def link(self, t: int, labels: NDArray[np.integer], cells: CellTable | None = None) -> TrackedFrame:
        """Link frame ``t`` now: it must be :attr:`next_t` (or a frame already linked).

        Raises
        ------
        TrackingError
            ``t`` is ahead of :attr:`next_t` (use :meth:`offer` for frames that arrive out of order).
        """
        if t > self._next_t:
            raise TrackingError(
                f"frame {t} cannot be linked before frame {self._next_t}: offer() it, or skip() the gap"
            )
        frames = self.offer(t, labels, cells)
        return next(f for f in frames if f.t == t)

    def _drain(self) -> list[TrackedFrame]:
        out: list[TrackedFrame] = []
        while self._next_t in self._pending:
            item = self._pending.pop(self._next_t)
            if item is not _SKIPPED:
                frame = self._link(self._next_t, *item)
                self._done[frame.t] = frame
                while len(self._done) > self._history:
                    self._done.popitem(last=False)
                out.append(frame)
            self._next_t += 1
        return out

    # -- linking -----------------------------------------------------------------------------------

    def _link(self, t: int, labels: np.ndarray, cells: CellTable | None) -> TrackedFrame:
        if cells is None:
            cells = CellTable.from_labels(labels)
        tracks, cfg = self._tracks, self.config
        n = len(cells)
        result = assign(tracks, _detections(cells), t, cfg)
        ids = np.zeros(n, np.int64)
        parents = np.zeros(n, np.int64)
        events: list[TrackEvent] = []
        linked = np.flatnonzero(result.link >= 0)
        ids[result.link[linked]] = tracks.track_id[linked]
        parents[result.link[linked]] = tracks.parent_track_id[linked]
        for k in linked[tracks.missed[linked] > 0].tolist():
            events.append(TrackEvent("recovered", t, int(tracks.track_id[k]), gap=int(tracks.missed[k])))
        divided = np.zeros(len(tracks), bool)
        for k, j1, j2 in result.divisions:
            divided[k] = True
            parent = int(tracks.track_id[k])
            ids[j1], ids[j2] = self._next_id, self._next_id + 1
            parents[j1] = parents[j2] = parent
            self._next_id += 2
            events.append(TrackEvent("divided", t, parent, daughters=(int(ids[j1]), int(ids[j2]))))
        for j in np.flatnonzero(ids == 0).tolist():
            ids[j] = self._next_id
            self._next_id += 1
            events.append(TrackEvent("appeared", t, int(ids[j])))
        # Tracks not continued: lost (still closable), merged, or gone for good.
        merged_into = {k: int(ids[j]) for k, j in result.merges}
        missing = np.flatnonzero((result.link < 0) & ~divided)
        missed = tracks.missed.copy()
        missed[missing] += 1
        alive = (result.link >= 0) | ((result.link < 0) & ~divided & (missed <= cfg.gap_frames))
        for k in missing.tolist():
            tid = int(tracks.track_id[k])
            if missed[k] > cfg.gap_frames:
                events.append(TrackEvent("disappeared", t, tid))
            elif k in merged_into:
                events.append(TrackEvent("merged", t, tid, into=merged_into[k]))
            elif missed[k] == 1:
                events.append(TrackEvent("lost", t, tid))
        self._tracks = self._update(tracks, cells, result.link, missed, alive, ids, parents, t)
        self._last_t = t
        # Label -> track id; values the table does not hold (none, when it was measured from these labels)
        # map to background: "clip" sends any value past the table's largest label to the trailing 0.
        lut = np.zeros(int(cells.label.max(initial=0)) + 2, np.uint32)
        lut[cells.label] = ids
        tracked = cells.with_measurements({TRACK_COLUMN: ids, PARENT_COLUMN: parents})
        return TrackedFrame(t, np.take(lut, labels, mode="clip"), tracked, tuple(events))

    @staticmethod
    def _update(
        tracks: LiveTracks,
        cells: CellTable,
        link: np.ndarray,
        missed: np.ndarray,
        alive: np.ndarray,
        ids: np.ndarray,
        parents: np.ndarray,
        t: int,
    ) -> LiveTracks:
        det = _detections(cells)
        linked = link >= 0
        j = link[linked]
        centroid, velocity = tracks.centroid.copy(), tracks.velocity.copy()
        area, bbox, t_last = tracks.area.copy(), tracks.bbox.copy(), tracks.t_last.copy()
        dt = (t - t_last[linked]).astype(np.float64)[:, None]
        velocity[linked] = (det.centroid[j] - centroid[linked]) / dt
        centroid[linked], area[linked], bbox[linked] = det.centroid[j], det.area[j], det.bbox[j]
        t_last[linked] = t
        missed = np.where(linked, 0, missed)
        old = LiveTracks(
            tracks.track_id, tracks.parent_track_id, t_last, missed, centroid, velocity, area, bbox
        )
        continued = np.zeros(len(det), bool)
        continued[j] = True
        new = np.flatnonzero(~continued)
        fresh = LiveTracks(
            ids[new],
            parents[new],
            np.full(new.size, t, np.int64),
            np.zeros(new.size, np.int64),
            det.centroid[new],
            np.zeros((new.size, 2)),
            det.area[new],
            det.bbox[new],
        )
        merged = LiveTracks.concat([old.take(alive), fresh])
        return merged.take(np.argsort(merged.track_id, kind="stable"))

    # -- durable state -----------------------------------------------------------------------------

    def state(self) -> TrackerState:
        """What :meth:`resume` needs to continue after a restart (frames held ahead of :attr:`next_t`
        are not part of it: offer them again)."""
        return TrackerState.of(
            self._tracks, next_t=self._next_t, last_t=self._last_t, next_track_id=self._next_id
        )

    @classmethod
    def resume(
        cls, config: TrackerConfig | None, state: TrackerState | Mapping[str, Any], *, history: int = 8
    ) -> OnlineTracker:
        """A tracker that continues exactly where the one that saved ``state`` stopped.

        Raises
        ------
        TrackingError
            ``state`` does not validate (wrong layout, lists of different lengths).
        """
        st = TrackerState.load(state)
        tracker = cls(config, first_t=st.next_t, history=history)
        tracker._last_t = st.last_t
        tracker._next_id = st.next_track_id
        tracker._tracks = st.live_tracks()
        return tracker

    @classmethod
    def from_tables(
        cls,
        config: TrackerConfig | None,
        tables: Sequence[tuple[int, CellTable]],
        *,
        next_track_id: int | None = None,
        history: int = 8,
    ) -> OnlineTracker:
        """Rebuild a tracker from the tracked cell tables of the last linked frames (what the store holds);
        see :func:`~cellsam_core.tracking_state.state_from_tables` for what to pass.

        Raises
        ------
        TrackingError
            ``tables`` is empty or a table lacks the track columns.
        """
        cfg = config or TrackerConfig()
        return cls.resume(cfg, state_from_tables(cfg, tables, next_track_id=next_track_id), history=history)


def track_sequence(
    labels: Iterable[NDArray[np.integer]],
    config: TrackerConfig | None = None,
    *,
    tables: Iterable[CellTable | None] | None = None,
    first_t: int = 0,
) -> Iterator[TrackedFrame]:
    """Link an ordered sequence of label images offline, with the same linker as the live service.

    Parameters
    ----------
    labels : iterable of ndarray, (H, W)
        Label images of frames ``first_t, first_t + 1, ...``.
    config : TrackerConfig, optional
    tables : iterable of CellTable, optional
        Their cell tables (measured from the labels when omitted).
    first_t : int

    Yields
    ------
    TrackedFrame
        One per frame, in order, as soon as it is linked.
    """
    tracker = OnlineTracker(config, first_t=first_t, history=1)
    table_iter: Iterator[CellTable | None] = iter(tables) if tables is not None else iter(())
    for i, frame in enumerate(labels):
        table = next(table_iter, None) if tables is not None else None
        yield tracker.link(first_t + i, frame, table)
