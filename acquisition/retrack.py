"""Re-track a stored acquisition offline (``cellsam-stream track STORE``), with the live service's linker.

For each position and label plane, the done frames are read back in time order (their labels and cell
tables), linked by :class:`cellsam_core.tracking.OnlineTracker` (a missing time index is ``skip``-ped, as
the live tracker does with a frame that failed), and the result replaces any earlier tracking in the
store: ``labels/tracks``, the tracked cell tables, the tracker state and the lineage GEFF
(`acquisition.zarr_sink.ZarrLabelSink.write_tracks` / ``write_lineage``; layout in
``docs/zarr-layout.md``).

The store is attached (`ZarrLabelSink.attach`), not reopened: a finished acquisition stays closed. Every
write takes the store's locks, so a service may keep the store open meanwhile; frames it tracks live while
a re-track runs get the live tracker's ids, so re-track an acquisition once it is finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from acquisition.frames import FrameId
from acquisition.sink_errors import InvalidIdentifierError
from acquisition.zarr_sink import ZarrLabelSink
from cellsam_core.lineage import LineageBuilder
from cellsam_core.tracking import OnlineTracker, TrackerConfig

__all__ = ["STORE_SUFFIX", "RetrackSummary", "retrack_store", "split_store_path"]

#: What a label store's folder name ends with (``{output}/{acquisition}.ome.zarr``).
STORE_SUFFIX = ".ome.zarr"


@dataclass(frozen=True)
class RetrackSummary:
    """What `retrack_store` did.

    Attributes
    ----------
    acquisition : str
    planes : int
        (position, label plane) pairs tracked (those with at least one done frame).
    frames : int
        Frames linked and written.
    skipped : int
        Missing time indices linked across (between a plane's first and last done frame).
    tracks : int
        Track ids issued, over all planes.
    divisions : int
        Divisions found.
    seconds : float
        Wall time.
    """

    acquisition: str
    planes: int
    frames: int
    skipped: int
    tracks: int
    divisions: int
    seconds: float

    def describe(self) -> str:
        """One line for people."""
        points = "time point" if self.skipped == 1 else "time points"
        gaps = f", {self.skipped} missing {points} linked across" if self.skipped else ""
        return (
            f"{self.acquisition}: {self.frames} frames of {self.planes} position/plane series re-tracked "
            f"in {self.seconds:.1f} s: {self.tracks} tracks, {self.divisions} divisions{gaps}"
        )


def split_store_path(path: str | Path) -> tuple[Path, str]:
    """``(output directory, acquisition id)`` of a store path ``{output}/{acquisition}.ome.zarr``.

    Raises
    ------
    InvalidIdentifierError
        The folder name does not end with ``.ome.zarr``.
    """
    store = Path(path)
    if not store.name.endswith(STORE_SUFFIX) or store.name == STORE_SUFFIX:
        raise InvalidIdentifierError(
            f"{path} is not a label store path: give the store folder, "
            f"{{output}}/{{acquisition}}{STORE_SUFFIX}"
        )
    return store.parent, store.name[: -len(STORE_SUFFIX)]


def retrack_store(
    path: str | Path,
    config: TrackerConfig | None = None,
    *,
    positions: Iterable[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RetrackSummary:
    """Re-track the done frames of a label store and replace its tracking (see the module docstring).

    Parameters
    ----------
    path : str or Path
        The store, ``{output}/{acquisition}.ome.zarr``.
    config : TrackerConfig, optional
        The linker's settings (defaults when omitted).
    positions : iterable of int, optional
        Positions to re-track (default: all); the others keep their tracking.
    progress : callable, optional
        Called as ``progress(frames_done, frames_total)`` after each frame.

    Raises
    ------
    StoreNotFoundError
        No store at ``path``.
    IncompatibleStoreError
        ``path`` is not a label store of this layout.
    InvalidIdentifierError
        ``path`` does not name a store, or a position is out of range.
    """
    started = time.perf_counter()
    config = config or TrackerConfig()
    output, acquisition = split_store_path(path)
    sink = ZarrLabelSink(output)
    spec = sink.attach(acquisition)
    chosen = sorted(set(range(spec.sizes.p) if positions is None else positions))
    outside = [p for p in chosen if not 0 <= p < spec.sizes.p]
    if outside:
        raise InvalidIdentifierError(
            f"positions {outside} are not in {path}, which has positions 0..{spec.sizes.p - 1}"
        )
    series: dict[tuple[int, int], list[int]] = {}
    for stored in sink.progress(acquisition).done:
        if stored.p in chosen:
            series.setdefault((stored.p, stored.z), []).append(stored.t)
    total = sum(len(ts) for ts in series.values())
    done = skipped = tracks = divisions = 0
    for (p, z), unordered in sorted(series.items()):
        ts = sorted(unordered)
        tracker = OnlineTracker(config, first_t=ts[0], history=1)
        lineage = LineageBuilder()
        for t in ts:
            for missing in range(tracker.next_t, t):
                tracker.skip(missing)
                skipped += 1
            frame_id = FrameId(acquisition, p, t, z)
            for frame in tracker.offer(t, sink.read_labels(frame_id), sink.read_cells(frame_id)):
                state = tracker.state().model_dump(mode="json")
                sink.write_tracks(FrameId(acquisition, p, frame.t, z), frame.track_labels, frame.cells, state)
                lineage.add(frame)
                divisions += sum(event.kind == "divided" for event in frame.events)
            done += 1
            if progress is not None:
                progress(done, total)
        sink.write_lineage(acquisition, p, z, lineage.graph)
        tracks += tracker.next_track_id - 1
    return RetrackSummary(
        acquisition=acquisition,
        planes=len(series),
        frames=done,
        skipped=skipped,
        tracks=tracks,
        divisions=divisions,
        seconds=time.perf_counter() - started,
    )
