"""The label sink seam: where segmented frames (labels, optional raw image, cell table) are stored.

`LabelSink` is the protocol; `acquisition.zarr_sink.ZarrLabelSink` (OME-Zarr on disk) and
`acquisition.memory_sink.MemoryLabelSink` (tests, notebooks) implement it and share one conformance
suite (`tests/test_sink_conformance.py`). `prepare_frame` and `prepare_tracks` hold the input checks
both apply, so a frame refused by one is refused by the other with the same error. What a sink is told
about an acquisition is `acquisition.spec`.

Besides segmented frames a sink stores their tracking (`cellsam_core.tracking`): per frame the track
labels and the tracked cell table, per (position, label plane) the tracker state and the lineage graph.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from acquisition.frames import FrameId
from acquisition.sink_errors import InvalidFrameError
from acquisition.spec import AcquisitionSpec, StoredAcquisition, check_frame_index
from cellsam_core.cells import CellTable
from cellsam_core.tracking_state import PARENT_COLUMN, TRACK_COLUMN

if TYPE_CHECKING:
    import networkx as nx

__all__ = [
    "LINEAGE_NODE_ATTRIBUTES",
    "MAX_RECORDED_FAILURES",
    "FailedFrame",
    "LabelSink",
    "PreparedFrame",
    "PreparedTracks",
    "StoreState",
    "StoredAcquisition",
    "check_lineage_graph",
    "check_plane",
    "check_same_cells",
    "prepare_frame",
    "prepare_tracks",
]

#: Label dtypes accepted by `write`; all convert to the stored uint32 without loss.
_LABEL_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32))


#: Failed frames a sink keeps per acquisition (the rest are counted in the ledger and metrics only).
MAX_RECORDED_FAILURES = 10_000


@dataclass(frozen=True)
class FailedFrame:
    """A frame that arrived but is not stored, and why (``failed`` result reasons: ``shutdown``, ...)."""

    frame: FrameId
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class StoreState:
    """What a sink has stored of one acquisition (the done map): the store is the source of truth.

    Attributes
    ----------
    acquisition : str
        The acquisition id.
    done : tuple of FrameId
        Frames marked done, sorted by (p, t, z).
    t_size : int
        Max done t + 1 (0 when nothing is done): the time points that hold data.
    closed : bool
        True after `LabelSink.close_acquisition` (until reopened).
    summary : mapping or None
        The summary given to `close_acquisition`.
    failed : tuple of FailedFrame
        Frames recorded by `LabelSink.record_failure` and not done since, sorted by (p, t, z).
    tracked : tuple of FrameId
        Done frames whose tracking is stored (`LabelSink.write_tracks`), sorted by (p, t, z).
    """

    acquisition: str
    done: tuple[FrameId, ...]
    t_size: int
    closed: bool
    summary: Mapping[str, Any] | None = None
    failed: tuple[FailedFrame, ...] = ()
    tracked: tuple[FrameId, ...] = ()

    @property
    def frames_done(self) -> int:
        return len(self.done)


@dataclass(frozen=True)
class PreparedFrame:
    """A frame after `prepare_frame`: checked and in the stored dtypes and shapes.

    Attributes
    ----------
    labels : ndarray, shape (H, W), uint32
    image : ndarray, shape (C, H, W) or, under a projection z policy, (C, Z, H, W); or None
        spec.image_dtype; None when no image was given or the spec does not store images.
    cells : CellTable
    key : (int, int, int)
        ``(p, t, z)`` of the frame, checked against the spec.
    """

    labels: NDArray[np.uint32]
    image: NDArray[Any] | None
    cells: CellTable
    key: tuple[int, int, int]


def _label_image(frame_id: FrameId, name: str, labels: object, shape: tuple[int, int]) -> NDArray[np.uint32]:
    """``labels`` checked ((H, W), an unsigned dtype of at most 32 bits) and as contiguous uint32."""
    if not isinstance(labels, np.ndarray):
        raise InvalidFrameError(f"{name} must be a numpy array, got {type(labels).__name__}")
    if labels.shape != shape:
        raise InvalidFrameError(
            f"{name} of {frame_id!r} have shape {labels.shape}, expected (H, W) = {shape}"
        )
    if labels.dtype not in _LABEL_DTYPES:
        raise InvalidFrameError(
            f"{name} of {frame_id!r} have dtype {labels.dtype}; give uint8, uint16 or uint32 "
            "(cast signed labels after checking they are >= 0)"
        )
    return np.ascontiguousarray(labels, dtype=np.uint32)


def _stored_table(spec: AcquisitionSpec, frame_id: FrameId, cells: CellTable) -> CellTable:
    """``cells`` at the spec's pixel size (a table measured at another one is refused)."""
    # The stored table's pixel size is the acquisition's (a store keeps it once, in the spec), so
    # every sink reads back the same table; a table measured at another pixel size is refused.
    if cells.pixel_size_um is not None and cells.pixel_size_um != spec.pixel_size_um:
        raise InvalidFrameError(
            f"cells of {frame_id!r} have pixel_size_um={cells.pixel_size_um}, but the acquisition's "
            f"is {spec.pixel_size_um}; measure with the spec's pixel size or pass a table without one"
        )
    return cells if cells.pixel_size_um == spec.pixel_size_um else cells.with_pixel_size(spec.pixel_size_um)


def prepare_frame(
    spec: AcquisitionSpec,
    frame_id: FrameId,
    labels: object,
    image: object = None,
    cells: object = None,
) -> PreparedFrame:
    """Check one frame against its acquisition and convert it to the stored form.

    Parameters
    ----------
    spec : AcquisitionSpec
        The acquisition the frame belongs to (``frame_id.acquisition == spec.acquisition``).
    frame_id : FrameId
        ``p`` in [0, sizes.p), ``z`` in [0, spec.label_z), ``t`` >= 0 and < sizes.t when t is bounded.
        Under a projection z policy a frame is a whole (t, p): ``z`` is 0.
    labels : ndarray, shape (H, W), uint8/uint16/uint32
        Label image, 0 = background.
    image : ndarray, dtype spec.image_dtype, optional
        Raw image, shape (C, H, W) or (H, W) when C == 1; under a projection z policy every plane of the
        (t, p): (C, Z, H, W) or (Z, H, W) when C == 1, Z = sizes.z. Dropped when ``spec.write_image`` is
        False.
    cells : CellTable, optional
        Cell table; measured from ``labels`` (scores NaN) when omitted. Its pixel size must be the spec's
        or None (the prepared table then takes the spec's).

    Raises
    ------
    InvalidIdentifierError
        Index out of range or not an integer.
    InvalidFrameError
        Shape or dtype mismatch, wrong types.
    """
    sizes = spec.sizes
    key = check_frame_index(spec, frame_id)
    height, width = spec.frame_shape
    out_labels = _label_image(frame_id, "labels", labels, (height, width))

    out_image: NDArray[Any] | None = None
    if image is not None and spec.write_image:
        if not isinstance(image, np.ndarray):
            raise InvalidFrameError(f"image must be a numpy array, got {type(image).__name__}")
        # Under a projection z policy a frame is a whole (t, p): its image holds every z plane.
        stack = spec.z_policy.projects
        planes: tuple[int, ...] = (sizes.z,) if stack else ()
        expected = (sizes.c, *planes, height, width)
        if image.ndim == len(expected) - 1 and sizes.c == 1:
            image = image[np.newaxis]
        if image.shape != expected:
            axes = "(C, Z, H, W), every z plane of the (t, p)" if stack else "(C, H, W)"
            raise InvalidFrameError(
                f"image of {frame_id!r} has shape {image.shape}, expected {axes} = {expected}"
            )
        if image.dtype != np.dtype(spec.image_dtype):
            raise InvalidFrameError(
                f"image of {frame_id!r} has dtype {image.dtype}, expected {spec.image_dtype}"
            )
        out_image = np.ascontiguousarray(image)

    if cells is None:
        table = CellTable.from_labels(out_labels, pixel_size_um=spec.pixel_size_um)
    elif isinstance(cells, CellTable):
        table = _stored_table(spec, frame_id, cells)
    else:
        raise InvalidFrameError(f"cells must be a CellTable or None, got {type(cells).__name__}")
    return PreparedFrame(labels=out_labels, image=out_image, cells=table, key=key)


@dataclass(frozen=True)
class PreparedTracks:
    """A frame's tracking after `prepare_tracks`: checked and in the stored form.

    Attributes
    ----------
    track_labels : ndarray, shape (H, W), uint32
    cells : CellTable
        With the :data:`~cellsam_core.tracking.TRACK_COLUMN` and
        :data:`~cellsam_core.tracking.PARENT_COLUMN` columns, at the spec's pixel size.
    state : dict
        The tracker state as plain JSON values (a deep copy).
    key : (int, int, int)
        ``(p, t, z)`` of the frame, checked against the spec.
    """

    track_labels: NDArray[np.uint32]
    cells: CellTable
    state: dict[str, Any]
    key: tuple[int, int, int]


def prepare_tracks(
    spec: AcquisitionSpec, frame_id: FrameId, track_labels: object, cells: object, state: object
) -> PreparedTracks:
    """Check one frame's tracking against its acquisition and convert it to the stored form.

    Parameters
    ----------
    spec : AcquisitionSpec
    frame_id : FrameId
        As `prepare_frame`.
    track_labels : ndarray, shape (H, W), uint8/uint16/uint32
        The frame's cells numbered by track (`TrackedFrame.track_labels`), 0 = background.
    cells : CellTable
        The frame's cell table with the track columns (`TrackedFrame.cells`); pixel size as in
        `prepare_frame`. Its rows must be the stored table's (`check_same_cells`).
    state : mapping
        The tracker state of the frame's (p, z) after linking it, JSON-serialisable without NaN
        (``TrackerState.model_dump(mode="json")``).

    Raises
    ------
    InvalidIdentifierError
        Index out of range or not an integer.
    InvalidFrameError
        Shape or dtype mismatch, a table without the track columns, a state that is not JSON.
    """
    key = check_frame_index(spec, frame_id)
    tracks = _label_image(frame_id, "track labels", track_labels, spec.frame_shape)
    if not isinstance(cells, CellTable):
        raise InvalidFrameError(f"cells must be a CellTable, got {type(cells).__name__}")
    missing = [c for c in (TRACK_COLUMN, PARENT_COLUMN) if c not in cells.measurements]
    if missing:
        raise InvalidFrameError(
            f"cells of {frame_id!r} lack the tracking columns {missing}; pass TrackedFrame.cells"
        )
    if not isinstance(state, Mapping):
        raise InvalidFrameError(f"tracker state must be a mapping, got {type(state).__name__}")
    try:
        state_json = json.loads(json.dumps(dict(state), allow_nan=False))
    except (TypeError, ValueError) as err:
        raise InvalidFrameError(
            f"tracker state of {frame_id!r} must be JSON-serialisable without NaN "
            f"(TrackerState.model_dump(mode='json')): {err}"
        ) from err
    return PreparedTracks(
        track_labels=tracks,
        cells=_stored_table(spec, frame_id, cells),
        state=state_json,
        key=key,
    )


def check_same_cells(frame_id: FrameId, stored: CellTable, tracked: CellTable) -> None:
    """Refuse a tracked table whose rows are not the stored table's cells (same labels in the same order,
    with the same areas and boxes).

    Raises
    ------
    InvalidFrameError
        The cells differ (tracking of another segmentation of the frame: track it again).
    """
    same = len(stored) == len(tracked) and all(
        np.array_equal(a, b)
        for a, b in ((stored.label, tracked.label), (stored.area, tracked.area), (stored.bbox, tracked.bbox))
    )
    if not same:
        raise InvalidFrameError(
            f"the tracked cells of {frame_id!r} ({len(tracked)} rows) are not the stored cells "
            f"({len(stored)} rows): link the frame as stored (its labels were rewritten?)"
        )


def check_plane(spec: AcquisitionSpec, acquisition: str, p: int, z: int) -> tuple[int, int]:
    """``(p, z)`` as ints, checked like a frame index (`InvalidIdentifierError` when out of range)."""
    key = check_frame_index(spec, FrameId(acquisition, p, 0, z))
    return key[0], key[2]


#: Node attributes of a lineage graph (`cellsam_core.lineage`), all required by `check_lineage_graph`.
LINEAGE_NODE_ATTRIBUTES = ("t", "y", "x", "track_id", "parent_track_id", "lineage_id", "label", "area")


def check_lineage_graph(graph: object) -> None:
    """Refuse anything but a lineage graph as `cellsam_core.lineage.lineage_graph` makes it.

    Raises
    ------
    InvalidFrameError
        Not a ``networkx.DiGraph``, or a node lacks one of `LINEAGE_NODE_ATTRIBUTES`.
    """
    import networkx as nx

    if not isinstance(graph, nx.DiGraph):
        raise InvalidFrameError(f"a lineage must be a networkx.DiGraph, got {type(graph).__name__}")
    for node, data in graph.nodes(data=True):
        missing = [a for a in LINEAGE_NODE_ATTRIBUTES if a not in data]
        if missing:
            raise InvalidFrameError(
                f"lineage node {node!r} lacks {missing}; build the graph with cellsam_core.lineage"
            )


@runtime_checkable
class LabelSink(Protocol):
    """Stores segmented frames of acquisitions.

    Contract (checked by `tests/test_sink_conformance.py` for every implementation):

    - `open_acquisition` must precede writes and reads; opening an acquisition that already exists with
      an equal spec reopens it (resume after a crash or restart, or a second writer process), a closed
      one included. A spec that only adds time points (`spec_extends`) extends it; any other
      difference raises `IncompatibleStoreError` naming the differing fields. `stored_spec` returns the
      spec in force (None before the first open), also from a new sink over the same storage.
    - `record_failure` notes a frame that failed; `progress` lists it in ``failed`` until it is written.
    - `write` is idempotent per `FrameId`: writing a frame again replaces it, leaving one result.
      After `write` returns the frame is done: `is_done` is True and the read helpers return it.
      A frame is either done with all its parts (labels, cell table, image if given) or not done.
    - Frames of one acquisition may be written in any order, concurrently from threads and (for
      persistent sinks) processes; unbounded acquisitions (``sizes.t is None``) accept any t >= 0.
    - Bad input raises `InvalidFrameError` / `InvalidIdentifierError` and changes nothing.
    - `close_acquisition` records the summary and refuses further writes (`AcquisitionClosedError`)
      until the acquisition is opened again.
    - A frame with zero cells is done with an all-zero label image and an empty table; a missing frame
      is not done and its reads raise `FrameNotWrittenError`.
    - A frame is one label plane (``FrameId.z`` in [0, ``spec.label_z``)): a (t, p, z) plane, or under a
      projection z policy a whole (t, p) (``z = 0``) whose image holds every z plane.
    - Tracking: `write_tracks` stores a done frame's tracking; it is tracked (`is_tracked`) once every
      part is written, and writing the frame again (`write`) makes it untracked until `write_tracks`
      is called for it again. Tracking may be written after `close_acquisition` (it is derived from
      stored frames: ``cellsam-stream track`` re-tracks finished stores). The tracker state and the
      lineage are per (position, label plane) ``(p, z)``, ``z`` in [0, ``spec.label_z``).
    """

    def open_acquisition(self, spec: AcquisitionSpec) -> None:
        """Create the acquisition's storage, or reopen it when it exists with an equal spec."""
        ...

    def stored(self, acquisition: str) -> StoredAcquisition | None:
        """The spec in force and the closed state of an acquisition (None: the sink holds no such one).

        Needs no `open_acquisition` first: this is how a restarted service finds what it stored before.
        Raises `IncompatibleStoreError` when something that is not this sink's store is in the way.
        """
        ...

    def record_failure(self, frame_id: FrameId, reason: str, detail: str = "") -> None:
        """Record that a frame of an opened acquisition arrived but failed (reported by `progress`
        until the frame is written). Keeps the latest reason per frame, at most
        `MAX_RECORDED_FAILURES` frames per acquisition."""
        ...

    def write(
        self,
        frame_id: FrameId,
        labels: NDArray[Any],
        image: NDArray[Any] | None = None,
        cells: CellTable | None = None,
    ) -> None:
        """Store one frame; see `prepare_frame` for accepted shapes and dtypes. Thread-safe."""
        ...

    def close_acquisition(self, acquisition: str, summary: Mapping[str, Any] | None = None) -> None:
        """Finish an acquisition: record ``summary`` (JSON-serialisable) and refuse further writes."""
        ...

    def is_done(self, frame_id: FrameId) -> bool:
        """True when the frame was written completely."""
        ...

    def read_labels(self, frame_id: FrameId) -> NDArray[np.uint32]:
        """Labels (H, W) uint32 of a done frame."""
        ...

    def read_image(self, frame_id: FrameId) -> NDArray[Any] | None:
        """Raw image (C, H, W) of a done frame ((C, Z, H, W) under a projection z policy), None when it
        was written without one."""
        ...

    def read_cells(self, frame_id: FrameId) -> CellTable:
        """Cell table of a done frame."""
        ...

    def progress(self, acquisition: str) -> StoreState:
        """Done frames, time extent and closed state of an opened acquisition."""
        ...

    def write_tracks(
        self, frame_id: FrameId, track_labels: NDArray[Any], cells: CellTable, state: Mapping[str, Any]
    ) -> None:
        """Store a done frame's tracking: the track-id label image (H, W) (uint32; same shape as its
        labels), its cell table with the tracking columns (replaces the frame's stored table for
        `read_cells`; same rows/labels), and the tracker state of its (p, z) after linking it (JSON-able,
        ``TrackerState.model_dump(mode="json")``). See `prepare_tracks` for the checks.

        Idempotent; a frame is tracked only when all parts are written (a done bit after them). The
        state is kept only when the frame's t is >= that of the state stored for its (p, z): frames
        written again out of order (retries) never roll it back. Thread-safe.

        Raises
        ------
        FrameNotWrittenError
            The frame's labels are not done.
        InvalidFrameError
            Bad shapes/dtypes, a table without the track columns or with other rows than the stored
            table, a state that is not JSON.
        """
        ...

    def is_tracked(self, frame_id: FrameId) -> bool:
        """True when the frame is done and its tracking was written completely since."""
        ...

    def read_tracks(self, frame_id: FrameId) -> NDArray[np.uint32]:
        """Track labels (H, W) uint32 of a tracked frame (`FrameNotWrittenError` when not tracked)."""
        ...

    def tracker_state(self, acquisition: str, p: int, z: int) -> Mapping[str, Any] | None:
        """The tracker state stored with the latest-t tracked frame of (p, z) (None: nothing tracked
        yet); `OnlineTracker.resume` continues from it."""
        ...

    def write_lineage(self, acquisition: str, p: int, z: int, graph: nx.DiGraph) -> None:
        """Replace the lineage graph of (p, z) (`cellsam_core.lineage.lineage_graph`'s form: pixels,
        frames; `check_lineage_graph`). Persistent sinks store it in physical units (the spec's
        ``pixel_size_um`` / ``time_interval_s``, 1.0 if unknown). Thread-safe."""
        ...

    def read_lineage(self, acquisition: str, p: int, z: int) -> nx.DiGraph | None:
        """The lineage graph of (p, z) as written (pixels, frames; floats up to the rounding of a unit
        conversion), None before the first `write_lineage`. ``LineageBuilder(graph)`` extends it."""
        ...
