"""In-memory `LabelSink`: the reference behaviour of the protocol, for tests and notebooks."""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from acquisition.frames import FrameId
from acquisition.ids import validate_acquisition_id
from acquisition.sink import (
    MAX_RECORDED_FAILURES,
    FailedFrame,
    PreparedFrame,
    PreparedTracks,
    StoredAcquisition,
    StoreState,
    check_lineage_graph,
    check_plane,
    check_same_cells,
    prepare_frame,
    prepare_tracks,
)
from acquisition.sink_errors import (
    AcquisitionClosedError,
    AcquisitionNotOpenError,
    FrameNotWrittenError,
    IncompatibleStoreError,
)
from acquisition.spec import AcquisitionSpec, check_frame_index, spec_differences, spec_extends
from cellsam_core.cells import CellTable

if TYPE_CHECKING:
    import networkx as nx

__all__ = ["MemoryLabelSink"]


@dataclass
class _Acquisition:
    spec: AcquisitionSpec
    frames: dict[tuple[int, int, int], PreparedFrame] = field(default_factory=dict)
    closed: bool = False
    summary: Mapping[str, Any] | None = None
    failed: dict[tuple[int, int, int], FailedFrame] = field(default_factory=dict)
    tracks: dict[tuple[int, int, int], PreparedTracks] = field(default_factory=dict)
    #: (p, z) -> (t of the frame it was written with, state)
    states: dict[tuple[int, int], tuple[int, dict[str, Any]]] = field(default_factory=dict)
    lineages: dict[tuple[int, int], nx.DiGraph] = field(default_factory=dict)


def _copy_table(cells: CellTable) -> CellTable:
    return CellTable.from_array(cells.to_array(), cells.column_names, pixel_size_um=cells.pixel_size_um)


class MemoryLabelSink:
    """Keeps every frame in a dict keyed by (p, t, z); thread-safe; nothing survives the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._acquisitions: dict[str, _Acquisition] = {}

    def open_acquisition(self, spec: AcquisitionSpec) -> None:
        validate_acquisition_id(spec.acquisition)
        with self._lock:
            existing = self._acquisitions.get(spec.acquisition)
            if existing is None:
                self._acquisitions[spec.acquisition] = _Acquisition(spec=spec)
                return
            if existing.spec != spec:
                if not spec_extends(existing.spec, spec):
                    raise IncompatibleStoreError(
                        f"acquisition {spec.acquisition!r} exists with a different spec "
                        f"({'; '.join(spec_differences(existing.spec, spec))}); use a new acquisition id "
                        "or the original spec (only more time points may be added)"
                    )
                existing.spec = spec
            existing.closed = False

    def stored(self, acquisition: str) -> StoredAcquisition | None:
        with self._lock:
            existing = self._acquisitions.get(acquisition)
            return None if existing is None else StoredAcquisition(existing.spec, existing.closed)

    def record_failure(self, frame_id: FrameId, reason: str, detail: str = "") -> None:
        acq = self._get(frame_id.acquisition)
        key = check_frame_index(acq.spec, frame_id)
        with self._lock:
            if key in acq.failed or len(acq.failed) < MAX_RECORDED_FAILURES:
                acq.failed[key] = FailedFrame(FrameId(frame_id.acquisition, *key), reason, detail)

    def write(
        self,
        frame_id: FrameId,
        labels: NDArray[Any],
        image: NDArray[Any] | None = None,
        cells: CellTable | None = None,
    ) -> None:
        acq = self._get(frame_id.acquisition)
        frame = prepare_frame(acq.spec, frame_id, labels, image, cells)
        # Copies so later mutation of the caller's arrays cannot change stored frames.
        stored = PreparedFrame(
            labels=frame.labels.copy(),
            image=None if frame.image is None else frame.image.copy(),
            cells=_copy_table(frame.cells),
            key=frame.key,
        )
        with self._lock:
            if acq.closed:
                raise AcquisitionClosedError(
                    f"acquisition {frame_id.acquisition!r} is closed; "
                    "open_acquisition() it again to add frames"
                )
            acq.frames[frame.key] = stored
            acq.tracks.pop(frame.key, None)  # a rewritten frame is tracked again from its new labels

    def close_acquisition(self, acquisition: str, summary: Mapping[str, Any] | None = None) -> None:
        acq = self._get(acquisition)
        with self._lock:
            acq.closed = True
            acq.summary = copy.deepcopy(dict(summary)) if summary is not None else None

    def is_done(self, frame_id: FrameId) -> bool:
        acq = self._get(frame_id.acquisition)
        key = check_frame_index(acq.spec, frame_id)
        with self._lock:
            return key in acq.frames

    def read_labels(self, frame_id: FrameId) -> NDArray[np.uint32]:
        return self._frame(frame_id).labels.copy()

    def read_image(self, frame_id: FrameId) -> NDArray[Any] | None:
        image = self._frame(frame_id).image
        return None if image is None else image.copy()

    def read_cells(self, frame_id: FrameId) -> CellTable:
        acq = self._get(frame_id.acquisition)
        key = check_frame_index(acq.spec, frame_id)
        with self._lock:
            tracked = acq.tracks.get(key)
        return tracked.cells if tracked is not None else self._frame(frame_id).cells

    def progress(self, acquisition: str) -> StoreState:
        acq = self._get(acquisition)
        with self._lock:
            keys = sorted(acq.frames)
            return StoreState(
                acquisition=acquisition,
                done=tuple(FrameId(acquisition, p, t, z) for p, t, z in keys),
                t_size=max((t for _, t, _ in keys), default=-1) + 1,
                closed=acq.closed,
                summary=acq.summary,
                failed=tuple(f for key, f in sorted(acq.failed.items()) if key not in acq.frames),
                tracked=tuple(FrameId(acquisition, p, t, z) for p, t, z in sorted(acq.tracks)),
            )

    # -- tracking ---------------------------------------------------------------------------------

    def write_tracks(
        self, frame_id: FrameId, track_labels: NDArray[Any], cells: CellTable, state: Mapping[str, Any]
    ) -> None:
        acq = self._get(frame_id.acquisition)
        tracks = prepare_tracks(acq.spec, frame_id, track_labels, cells, state)
        stored = PreparedTracks(
            track_labels=tracks.track_labels.copy(),
            cells=_copy_table(tracks.cells),
            state=tracks.state,
            key=tracks.key,
        )
        p, t, z = tracks.key
        with self._lock:
            frame = acq.frames.get(tracks.key)
            if frame is None:
                raise FrameNotWrittenError(f"frame {frame_id!r} is not done: write it before its tracks")
            check_same_cells(frame_id, frame.cells, tracks.cells)
            acq.tracks[tracks.key] = stored
            if (p, z) not in acq.states or acq.states[p, z][0] <= t:
                acq.states[p, z] = (t, tracks.state)

    def is_tracked(self, frame_id: FrameId) -> bool:
        acq = self._get(frame_id.acquisition)
        key = check_frame_index(acq.spec, frame_id)
        with self._lock:
            return key in acq.tracks

    def read_tracks(self, frame_id: FrameId) -> NDArray[np.uint32]:
        acq = self._get(frame_id.acquisition)
        key = check_frame_index(acq.spec, frame_id)
        with self._lock:
            tracks = acq.tracks.get(key)
        if tracks is None:
            raise FrameNotWrittenError(f"frame {frame_id!r} is not tracked")
        return tracks.track_labels.copy()

    def tracker_state(self, acquisition: str, p: int, z: int) -> Mapping[str, Any] | None:
        acq = self._get(acquisition)
        key = check_plane(acq.spec, acquisition, p, z)
        with self._lock:
            entry = acq.states.get(key)
        return None if entry is None else copy.deepcopy(entry[1])

    def write_lineage(self, acquisition: str, p: int, z: int, graph: nx.DiGraph) -> None:
        acq = self._get(acquisition)
        key = check_plane(acq.spec, acquisition, p, z)
        check_lineage_graph(graph)
        stored = graph.copy()
        with self._lock:
            acq.lineages[key] = stored

    def read_lineage(self, acquisition: str, p: int, z: int) -> nx.DiGraph | None:
        acq = self._get(acquisition)
        key = check_plane(acq.spec, acquisition, p, z)
        with self._lock:
            graph = acq.lineages.get(key)
        return None if graph is None else graph.copy()

    def _get(self, acquisition: str) -> _Acquisition:
        validate_acquisition_id(acquisition)
        with self._lock:
            acq = self._acquisitions.get(acquisition)
        if acq is None:
            raise AcquisitionNotOpenError(
                f"acquisition {acquisition!r} is not open; call open_acquisition first"
            )
        return acq

    def _frame(self, frame_id: FrameId) -> PreparedFrame:
        acq = self._get(frame_id.acquisition)
        key = check_frame_index(acq.spec, frame_id)
        with self._lock:
            frame = acq.frames.get(key)
        if frame is None:
            raise FrameNotWrittenError(f"frame {frame_id!r} is not done")
        return frame
