"""`LabelSink` writing one OME-Zarr (NGFF 0.5, Zarr v3) per acquisition; layout in `docs/zarr-layout.md`.

Concurrency model (threads of one process and processes sharing the output directory):

- Every frame goes to its own chunks (or, with sharding, its own inner chunks of a shard that only one
  writer touches at a time), so writers of different frames never rewrite each other's files. Zarr's
  local store replaces files atomically (temporary file + rename), so readers see old or new, never torn.
- Array metadata changes (growth of t, trimming on close, the root's closed flag) happen only under an
  exclusive `flock` on ``{output}/.{id}.ome.zarr.locks/store.lock``, after re-reading the metadata,
  so no update is lost; frame writes hold the same lock shared, so they never race a trim.
- A frame is marked in the ``done`` array after its labels, image and cell table are on disk, and the
  mark is cleared before a rewrite, so ``done`` implies intact data even across SIGKILL. Its tracking
  (track labels, tracked cell table, tracker state) gets its own ``done`` bit, set after those parts and
  cleared before they are rewritten; a frame's writes (frame or tracking) hold its frame lock (the
  shard's lock, or one of `_FRAME_LOCKS` striped locks), so the two never interleave.
- Tracking added to a store made before it had any (``labels/tracks`` ...) is created under the
  exclusive lock by the first `write_tracks` or `write_lineage` (`_ensure_tracking`).
- The display range (``omero`` windows) only widens: a frame whose range the root already covers
  writes nothing; otherwise the writer takes ``window.lock`` exclusively, merges its range into the
  root's freshly read one (min of lows, max of highs: order and repetition do not matter) and rewrites
  the root and every position's ``omero``. It holds ``store.lock`` shared meanwhile, so it never races
  the root updates of open and close.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from numpy.typing import NDArray
from pydantic import ValidationError
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.storage import LocalStore

from acquisition.file_lock import flock as _flock
from acquisition.frames import FrameId
from acquisition.ids import validate_acquisition_id
from acquisition.sink import (
    MAX_RECORDED_FAILURES,
    FailedFrame,
    PreparedFrame,
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
    InvalidFrameError,
    StoreNotFoundError,
)
from acquisition.spec import AcquisitionSpec, Codec, check_frame_index, spec_differences, spec_extends
from acquisition.zarr_layout import (
    CELLSAM_KEY,
    DONE_IMAGE,
    DONE_LABELS,
    DONE_TRACKS,
    LABEL_IMAGES,
    LAYOUT_VERSION,
    IntensityRange,
    channel_colors,
    covers,
    downsample,
    frame_intensity_range,
    image_group_attrs,
    label_image_attrs,
    labels_group_attrs,
    level_shape,
    lineage_path,
    merge_ranges,
    omero_attrs,
    position_path,
    root_attrs,
    well_attrs,
)
from acquisition.zarr_tracks import (
    CELLS_GROUP,
    ROOT_GROUP_ATTRS,
    TRACKED_GROUP,
    TRACKER_GROUP,
    read_lineage_graph,
    read_state,
    read_table,
    write_lineage_graph,
    write_state,
    write_table,
)
from cellsam_core.cells import CELL_COLUMNS, CellTable

if TYPE_CHECKING:
    import networkx as nx

__all__ = ["ZarrLabelSink", "open_position"]


_HINT = "move it away or choose another acquisition id"
#: Striped lock files that serialise the writes of one frame (its labels and its tracking) without
#: sharding; with sharding the shard's lock does.
_FRAME_LOCKS = 64
#: What each bit of a position's ``cellsam/done`` means (its attributes).
_DONE_BITS = {"labels": DONE_LABELS, "image": DONE_IMAGE, "tracks": DONE_TRACKS}
#: Groups of a position (besides ``labels/tracks``) and of the root that tracking writes to.
_TRACKING_GROUPS = (TRACKED_GROUP, TRACKER_GROUP)
_LINEAGE_GROUP = str(Path(lineage_path(0, 0)).parent)


def open_position(store: str | os.PathLike[str], p: int) -> zarr.Group:
    """Open position ``p`` of the label store at ``store`` (``{output}/{acquisition}.ome.zarr``), read-only.

    The group holds the image (``"0"``, ``"1"``, ... per level), ``labels/cells/{level}``,
    ``labels/tracks/{level}`` and ``cellsam/done``; its path (``"A/1/0"``, ...) comes from the root's
    ``cellsam.positions``.

    Raises
    ------
    IncompatibleStoreError
        ``store`` is not a label store of this layout version.
    IndexError
        ``p`` is not a position of the store.
    """
    root = zarr.open_group(store, mode="r", zarr_format=3)
    meta = root.attrs.get(CELLSAM_KEY)
    if not isinstance(meta, dict) or meta.get("layout_version") != LAYOUT_VERSION:
        raise IncompatibleStoreError(
            f"{store} is not a cellsam-stream label store of layout {LAYOUT_VERSION}"
        )
    positions: list[dict[str, Any]] = meta["positions"]
    if not 0 <= p < len(positions):
        raise IndexError(f"{store} has positions 0..{len(positions) - 1}, not {p}")
    group = root[positions[p]["path"]]
    if not isinstance(group, zarr.Group):
        raise IncompatibleStoreError(f"{store}: position {p} ({positions[p]['path']}) is not a group")
    return group


def _compressors(codec: Codec, level: int) -> Any:
    if codec == "none":
        return None
    if codec == "zstd":
        return ZstdCodec(level=level)
    return BloscCodec(cname="zstd", clevel=level)


def _chunking(spec: AcquisitionSpec, level: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """``(h, w)``, chunk ``(cy, cx)`` and shard ``(sy, sx)`` of level ``level``'s planes."""
    opts = spec.storage
    h, w = level_shape(spec.frame_shape, level)
    cy, cx = (h, w) if opts.chunk_yx is None else (min(opts.chunk_yx[0], h), min(opts.chunk_yx[1], w))
    # Shards span whole frames in y/x: one shard = shard_t frames of one z plane.
    return (h, w), (cy, cx), (-(-h // cy) * cy, -(-w // cx) * cx)


def _create_label_image(labels_group: zarr.Group, spec: AcquisitionSpec, name: str, t_size: int) -> None:
    """Create ``labels/{name}``: its group and one (t, z', y, x) uint32 array per level."""
    opts = spec.storage
    image = labels_group.create_group(name, attributes=label_image_attrs(spec, name))
    for level in range(opts.levels):
        (h, w), (cy, cx), (sy, sx) = _chunking(spec, level)
        image.create_array(
            str(level),
            shape=(t_size, spec.label_z, h, w),
            chunks=(1, 1, cy, cx),
            shards=None if opts.shard_t is None else (opts.shard_t, 1, sy, sx),
            dtype="uint32",
            fill_value=0,
            compressors=_compressors(opts.label_codec, opts.compression_level),
            dimension_names=("t", "z", "y", "x"),
        )


def _exists(store: Path, node: str) -> bool:
    return (store / node / "zarr.json").is_file()


@dataclass
class _Series:
    """Array handles of one position; ``t_alloc`` is the t extent their metadata had when read."""

    path: str
    arrays: dict[str, zarr.Array]
    t_alloc: int


def _done_at(series: _Series, t: int, z: int) -> int:
    return int(np.asarray(series.arrays["done"][t, z]))


@dataclass
class _Store:
    spec: AcquisitionSpec
    path: Path
    lock_dir: Path
    zstore: LocalStore
    generation: int
    series: dict[int, _Series] = field(default_factory=dict)
    mutex: threading.Lock = field(default_factory=threading.Lock)
    #: Every position has its tracking arrays and groups, and the root its lineage group (as of the
    #: last reload).
    tracking: bool = False

    @property
    def lock_file(self) -> Path:
        return self.lock_dir / "store.lock"

    @property
    def window_lock_file(self) -> Path:
        return self.lock_dir / "window.lock"

    def position(self, p: int) -> str:
        return position_path(p, self.spec.sizes.p)


class ZarrLabelSink:
    """Writes ``{output_dir}/{acquisition}.ome.zarr`` stores; safe across threads and processes.

    Parameters
    ----------
    output_dir : str or Path
        Directory that holds the stores (created if missing). Must be a local or shared POSIX
        filesystem with working `flock` (coordination between writer processes relies on it).
    """

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        self._output = Path(output_dir)
        self._stores: dict[str, _Store] = {}
        self._mutex = threading.Lock()

    def store_path(self, acquisition: str) -> Path:
        """Path of the OME-Zarr of ``acquisition`` (whether or not it exists)."""
        return self._output / f"{validate_acquisition_id(acquisition)}.ome.zarr"

    # -- protocol -----------------------------------------------------------------------------

    def open_acquisition(self, spec: AcquisitionSpec) -> None:
        acq = validate_acquisition_id(spec.acquisition)
        channel_colors(spec)  # a bad colour raises ValueError before anything is created
        path = self.store_path(acq)
        lock_dir = self._output / f".{acq}.ome.zarr.locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with _flock(lock_dir / "store.lock", exclusive=True):
            # Stores are built under the lock, so any temporary directory left now is a crash leftover.
            for stale in self._output.glob(f".{acq}.ome.zarr.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            if path.exists() or path.is_symlink():
                state = self._check_existing(path, spec)
                if AcquisitionSpec.model_validate(state["spec"]) != spec:  # a compatible extension
                    self._extend(LocalStore(path), spec)
                # A kill while the root's or a position's metadata was being replaced can leave its
                # temporary file; zarr would warn about it when listing the group. Those metadata are
                # written under this lock, shared or (for the window) together with the window lock.
                for pattern in ("*.partial", "*/*/*/*.partial"):
                    for partial in path.glob(pattern):
                        partial.unlink(missing_ok=True)
                if state["closed"]:
                    self._update_root_state(LocalStore(path), closed=False)
            else:
                self._create(path, spec)
            zstore = LocalStore(path)
            store = _Store(spec=spec, path=path, lock_dir=lock_dir, zstore=zstore, generation=0)
            # A writer killed between the root's range and the positions' omero leaves them behind.
            self._write_windows(store, self._root_state(store).get("intensity_range"), only_stale=True)
            self._reload(store)
        with self._mutex:
            self._stores[acq] = store

    def stored(self, acquisition: str) -> StoredAcquisition | None:
        path = self.store_path(acquisition)
        if not (path.exists() or path.is_symlink()):
            return None
        meta = self._read_meta(path)
        return StoredAcquisition(self._parse_spec(path, meta), bool(meta.get("closed", False)))

    def record_failure(self, frame_id: FrameId, reason: str, detail: str = "") -> None:
        store = self._store(frame_id.acquisition)
        p, t, z = check_frame_index(store.spec, frame_id)
        key = f"{p}/{t}/{z}"
        with _flock(store.lock_file, exclusive=True):
            root = zarr.open_group(store.zstore, mode="r+", zarr_format=3)
            meta: dict[str, Any] = dict(root.attrs[CELLSAM_KEY])  # type: ignore[arg-type]
            failed: dict[str, Any] = dict(meta.get("failed") or {})
            if key not in failed and len(failed) >= MAX_RECORDED_FAILURES:
                return
            failed[key] = {"reason": str(reason), "detail": str(detail)[:500]}
            meta["failed"] = failed
            root.attrs[CELLSAM_KEY] = meta

    def write(
        self,
        frame_id: FrameId,
        labels: NDArray[Any],
        image: NDArray[Any] | None = None,
        cells: CellTable | None = None,
    ) -> None:
        store = self._store(frame_id.acquisition)
        frame = prepare_frame(store.spec, frame_id, labels, image, cells)
        p, t, z = frame.key
        image = frame.image
        # Every z plane of a projection's (C, Z, H, W) image counts: measured as (C, Z * H, W).
        seen = (
            None
            if image is None
            else frame_intensity_range(image.reshape(image.shape[0], -1, image.shape[-1]))
        )
        while True:
            self._ensure_t(store, p, t)
            with _flock(store.lock_file, exclusive=False):
                state = self._root_state(store)
                if state["closed"]:
                    raise AcquisitionClosedError(
                        f"acquisition {store.spec.acquisition!r} is closed; open_acquisition() it again "
                        "to add frames"
                    )
                if state["generation"] != store.generation:
                    self._reload(store)  # another process trimmed the arrays: cached shapes are stale
                    continue
                with store.mutex:
                    series = store.series[p]
                if t >= series.t_alloc:
                    continue
                with self._frame_lock(store, p, t, z):
                    self._write_frame(store, series, t, z, frame)
                if seen is not None and not covers(state.get("intensity_range"), seen):
                    self._widen_windows(store, seen)
                return

    def close_acquisition(self, acquisition: str, summary: Mapping[str, Any] | None = None) -> None:
        store = self._store(acquisition)
        summary_json = None
        if summary is not None:
            try:
                summary_json = json.loads(json.dumps(dict(summary)))
            except (TypeError, ValueError) as err:
                raise InvalidFrameError(
                    f"summary of {acquisition!r} must be JSON-serialisable: {err}"
                ) from err
        with _flock(store.lock_file, exclusive=True):
            self._reload(store)
            t_size = self._t_size(store)
            if store.spec.sizes.t is None:
                # Unbounded stores grew in steps; trim to the time points that hold data (chunks beyond
                # belong to frames never marked done).
                new_t = max(t_size, 1)
                for series in store.series.values():
                    for array in series.arrays.values():
                        if array.shape[0] != new_t:
                            array.resize((new_t, *array.shape[1:]))
            self._update_root_state(store.zstore, closed=True, summary=summary_json, bump_generation=True)
            self._reload(store)

    def is_done(self, frame_id: FrameId) -> bool:
        return bool(self._done_value(frame_id) & DONE_LABELS)

    def read_labels(self, frame_id: FrameId) -> NDArray[np.uint32]:
        _, series, (_, t, z) = self._done_frame(frame_id)
        return np.asarray(series.arrays["labels/0"][t, z], dtype=np.uint32)

    def read_image(self, frame_id: FrameId) -> NDArray[Any] | None:
        store, series, (_, t, z) = self._done_frame(frame_id)
        if not _done_at(series, t, z) & DONE_IMAGE:
            return None
        if store.spec.z_policy.projects:  # the frame is the whole (t, p): every z plane
            return np.asarray(series.arrays["image/0"][t])
        return np.asarray(series.arrays["image/0"][t, :, z])

    def read_cells(self, frame_id: FrameId) -> CellTable:
        store, series, (_, t, z) = self._done_frame(frame_id)
        # Once tracked, the table written with the tracking replaces the frame's own.
        group = TRACKED_GROUP if _done_at(series, t, z) & DONE_TRACKS else CELLS_GROUP
        return read_table(store.zstore, series.path, group, t, z, store.spec.pixel_size_um)

    def progress(self, acquisition: str) -> StoreState:
        store = self._store(acquisition)
        state = self._root_state(store)
        done: list[FrameId] = []
        tracked: list[FrameId] = []
        for p in range(store.spec.sizes.p):
            done_path = f"{store.position(p)}/cellsam/done"
            values = np.asarray(zarr.open_array(store.zstore, path=done_path, mode="r")[...])
            done += [FrameId(acquisition, p, int(t), int(z)) for t, z in np.argwhere(values & DONE_LABELS)]
            is_tracked = (values & DONE_LABELS).astype(bool) & (values & DONE_TRACKS).astype(bool)
            tracked += [FrameId(acquisition, p, int(t), int(z)) for t, z in np.argwhere(is_tracked)]
        done_keys = {(f.p, f.t, f.z) for f in done}
        failed = []
        for key, why in (state.get("failed") or {}).items():
            p, t, z = (int(v) for v in key.split("/"))
            if (p, t, z) not in done_keys:
                frame = FrameId(acquisition, p, t, z)
                failed.append(FailedFrame(frame, why["reason"], why.get("detail", "")))
        return StoreState(
            acquisition=acquisition,
            done=tuple(done),
            t_size=max((f.t for f in done), default=-1) + 1,
            closed=bool(state["closed"]),
            summary=state["summary"],
            failed=tuple(sorted(failed, key=lambda f: (f.frame.p, f.frame.t, f.frame.z))),
            tracked=tuple(tracked),
        )

    # -- tracking -----------------------------------------------------------------------------

    def attach(self, acquisition: str) -> AcquisitionSpec:
        """Open the existing store of ``acquisition`` for reading and tracking, leaving it as it is.

        Unlike `open_acquisition` it needs no spec (the stored one is used and returned) and does not
        reopen a closed acquisition: frame writes stay refused, tracking (`write_tracks`,
        `write_lineage`) is allowed. This is how ``cellsam-stream track`` re-tracks a finished store.

        Raises
        ------
        StoreNotFoundError
            There is no store of ``acquisition`` in the output directory.
        IncompatibleStoreError
            What is there is not a label store of this layout.
        """
        acq = validate_acquisition_id(acquisition)
        path = self.store_path(acq)
        if not (path.exists() or path.is_symlink()):
            raise StoreNotFoundError(f"no store of acquisition {acq!r} at {path}")
        spec = self._parse_spec(path, self._read_meta(path))
        lock_dir = self._output / f".{acq}.ome.zarr.locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        store = _Store(spec=spec, path=path, lock_dir=lock_dir, zstore=LocalStore(path), generation=0)
        with _flock(store.lock_file, exclusive=False):
            self._reload(store)
        with self._mutex:
            self._stores[acq] = store
        return spec

    def write_tracks(
        self, frame_id: FrameId, track_labels: NDArray[Any], cells: CellTable, state: Mapping[str, Any]
    ) -> None:
        store = self._store(frame_id.acquisition)
        tracks = prepare_tracks(store.spec, frame_id, track_labels, cells, state)
        p, t, z = tracks.key
        not_done = f"frame {frame_id!r} is not done: write it before its tracks"
        if not self._done_value(frame_id) & DONE_LABELS:  # also loads arrays grown by other processes
            raise FrameNotWrittenError(not_done)
        while True:
            self._ensure_tracking(store, p, t)
            with _flock(store.lock_file, exclusive=False):
                if self._root_state(store)["generation"] != store.generation:
                    self._reload(store)  # another process trimmed the arrays: cached shapes are stale
                    continue
                with store.mutex:
                    series = store.series[p]
                if "tracks/0" not in series.arrays or t >= series.arrays["tracks/0"].shape[0]:
                    continue  # grown by a writer that does not know tracks: _ensure_tracking catches up
                with self._frame_lock(store, p, t, z):
                    bits = _done_at(series, t, z)
                    if not bits & DONE_LABELS:  # rewritten meanwhile by a writer that failed
                        raise FrameNotWrittenError(not_done)
                    stored = read_table(
                        store.zstore, series.path, CELLS_GROUP, t, z, store.spec.pixel_size_um
                    )
                    check_same_cells(frame_id, stored, tracks.cells)
                    done = series.arrays["done"]
                    done[t, z] = bits & ~DONE_TRACKS  # never a half-replaced tracking marked done
                    for level in range(store.spec.storage.levels):
                        series.arrays[f"tracks/{level}"][t, z] = downsample(tracks.track_labels, level)
                    write_table(store.zstore, series.path, TRACKED_GROUP, t, z, tracks.cells)
                    with _flock(store.lock_dir / f"tracker-p{p}-z{z}.lock", exclusive=True):
                        write_state(store.path, series.path, z, t, tracks.state)
                    done[t, z] = bits | DONE_TRACKS
                return

    def is_tracked(self, frame_id: FrameId) -> bool:
        bits = self._done_value(frame_id)
        return bool(bits & DONE_LABELS and bits & DONE_TRACKS)

    def read_tracks(self, frame_id: FrameId) -> NDArray[np.uint32]:
        if not self.is_tracked(frame_id):
            raise FrameNotWrittenError(f"frame {frame_id!r} is not tracked")
        _, series, (_, t, z) = self._done_frame(frame_id)
        return np.asarray(series.arrays["tracks/0"][t, z], dtype=np.uint32)

    def tracker_state(self, acquisition: str, p: int, z: int) -> Mapping[str, Any] | None:
        store = self._store(acquisition)
        p, z = check_plane(store.spec, acquisition, p, z)
        return read_state(store.path, store.position(p), z)

    def write_lineage(self, acquisition: str, p: int, z: int, graph: nx.DiGraph) -> None:
        store = self._store(acquisition)
        p, z = check_plane(store.spec, acquisition, p, z)
        check_lineage_graph(graph)
        self._ensure_tracking(store, p, 0)
        with (
            _flock(store.lock_file, exclusive=False),
            _flock(store.lock_dir / f"lineage-p{p}-z{z}.lock", exclusive=True),
        ):
            write_lineage_graph(store.path, store.spec, p, z, graph)

    def read_lineage(self, acquisition: str, p: int, z: int) -> nx.DiGraph | None:
        store = self._store(acquisition)
        p, z = check_plane(store.spec, acquisition, p, z)
        return read_lineage_graph(store.path, store.spec, p, z)

    def _ensure_tracking(self, store: _Store, p: int, t: int) -> None:
        """Make sure the store holds its tracking nodes and position ``p``'s track arrays reach ``t``.

        Stores made before tracking lack them; a writer that does not know tracks grows the other
        arrays alone. Both are repaired here under the exclusive lock (cheap checks first).
        """
        with store.mutex:
            series = store.series[p]
            ready = store.tracking
        tracks = series.arrays.get("tracks/0")
        if ready and tracks is not None and t < tracks.shape[0]:
            return
        with _flock(store.lock_file, exclusive=True):
            spec = store.spec
            for q in range(spec.sizes.p):
                base = store.position(q)
                cells = zarr.open_array(store.zstore, path=f"{base}/labels/cells/0", mode="r")
                if not _exists(store.path, f"{base}/labels/tracks"):
                    labels = zarr.open_group(store.zstore, path=f"{base}/labels", mode="r+", zarr_format=3)
                    _create_label_image(labels, spec, "tracks", cells.shape[0])
                    labels.attrs["ome"] = labels_group_attrs()["ome"]
                    ours = zarr.open_group(store.zstore, path=f"{base}/cellsam", mode="r+", zarr_format=3)
                    ours.attrs[CELLSAM_KEY] = {"done_bits": _DONE_BITS}
                for level in range(spec.storage.levels):
                    array = zarr.open_array(store.zstore, path=f"{base}/labels/tracks/{level}", mode="r+")
                    if array.shape[0] < cells.shape[0]:
                        array.resize((cells.shape[0], *array.shape[1:]))
                for group in _TRACKING_GROUPS:
                    if not _exists(store.path, f"{base}/{group}"):
                        columns = {CELLSAM_KEY: {"columns": list(CELL_COLUMNS)}}
                        attributes = columns if group == TRACKED_GROUP else {}
                        zarr.create_group(store.zstore, path=f"{base}/{group}", attributes=attributes)
            if not _exists(store.path, CELLSAM_KEY):
                zarr.create_group(store.zstore, path=CELLSAM_KEY, attributes=ROOT_GROUP_ATTRS)
            if not _exists(store.path, _LINEAGE_GROUP):
                zarr.create_group(store.zstore, path=_LINEAGE_GROUP)
            self._reload(store)

    # -- creation and checks ------------------------------------------------------------------

    def _create(self, path: Path, spec: AcquisitionSpec) -> None:
        """Build the whole store in a temporary directory, then rename it into place (atomic)."""
        tmp = self._output / f".{spec.acquisition}.ome.zarr.tmp-{uuid.uuid4().hex}"
        root = zarr.create_group(LocalStore(tmp), attributes=root_attrs(spec), zarr_format=3)
        opts = spec.storage
        sizes = spec.sizes
        t0 = sizes.t if sizes.t is not None else opts.t_growth
        label_z = spec.label_z  # sizes.z, or 1 under a projection z policy
        rows: dict[str, zarr.Group] = {}
        for p in range(sizes.p):
            row, column, field_name = position_path(p, sizes.p).split("/")
            if row not in rows:
                rows[row] = root.create_group(row)
            well = rows[row].create_group(column, attributes=well_attrs())
            image_group = well.create_group(field_name, attributes=image_group_attrs(spec, p))
            for level in range(opts.levels):
                (h, w), (cy, cx), (sy, sx) = _chunking(spec, level)
                image_group.create_array(
                    str(level),
                    shape=(t0, sizes.c, sizes.z, h, w),
                    chunks=(1, sizes.c, 1, cy, cx),
                    shards=None if opts.shard_t is None else (opts.shard_t, sizes.c, 1, sy, sx),
                    dtype=spec.image_dtype,
                    fill_value=0,
                    compressors=_compressors(opts.image_codec, opts.compression_level),
                    dimension_names=("t", "c", "z", "y", "x"),
                )
            labels_group = image_group.create_group("labels", attributes=labels_group_attrs())
            for name in LABEL_IMAGES:
                _create_label_image(labels_group, spec, name, t0)
            ours = image_group.create_group("cellsam", attributes={CELLSAM_KEY: {"done_bits": _DONE_BITS}})
            # One chunk per frame: concurrent writers of different frames never share a done chunk.
            ours.create_array(
                "done",
                shape=(t0, label_z),
                chunks=(1, 1),
                dtype="uint8",
                fill_value=0,
                compressors=None,
                dimension_names=("t", "z"),
            )
            for group in ("cells", "tracked"):
                ours.create_group(group, attributes={CELLSAM_KEY: {"columns": list(CELL_COLUMNS)}})
            ours.create_group("tracker")
        root.create_group(CELLSAM_KEY, attributes=ROOT_GROUP_ATTRS).create_group("lineage")
        os.rename(tmp, path)

    @classmethod
    def _check_existing(cls, path: Path, spec: AcquisitionSpec) -> dict[str, Any]:
        meta = cls._read_meta(path)
        stored = cls._parse_spec(path, meta)
        if stored != spec and not spec_extends(stored, spec):
            raise IncompatibleStoreError(
                f"{path} was created with a different spec ({'; '.join(spec_differences(stored, spec))}); "
                f"resume with the original spec (only more time points may be added) or {_HINT}"
            )
        return meta

    @staticmethod
    def _read_meta(path: Path) -> dict[str, Any]:
        hint = _HINT
        if not path.is_dir():
            raise IncompatibleStoreError(f"{path} exists but is not a directory; {hint}")
        try:
            root = zarr.open_group(LocalStore(path, read_only=True), mode="r", zarr_format=3)
            meta = root.attrs.get(CELLSAM_KEY)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise IncompatibleStoreError(f"{path} exists but is not a Zarr v3 group; {hint}") from err
        if not isinstance(meta, dict) or "spec" not in meta:
            raise IncompatibleStoreError(f"{path} exists but is not a cellsam-stream label store; {hint}")
        if meta.get("layout_version") != LAYOUT_VERSION:
            raise IncompatibleStoreError(
                f"{path} has store layout version {meta.get('layout_version')}, this code writes "
                f"{LAYOUT_VERSION}; {hint}"
            )
        return meta

    @staticmethod
    def _parse_spec(path: Path, meta: dict[str, Any]) -> AcquisitionSpec:
        try:
            return AcquisitionSpec.model_validate(meta["spec"])
        except ValidationError as err:
            raise IncompatibleStoreError(f"{path} holds an unreadable acquisition spec; {_HINT}") from err

    def _extend(self, zstore: LocalStore, spec: AcquisitionSpec) -> None:
        """Record a spec with more time points (callers hold the exclusive lock): bounded arrays grow to
        the new ``sizes.t`` now; open-ended ones grow as frames come."""
        root = zarr.open_group(zstore, mode="r+", zarr_format=3)
        meta: dict[str, Any] = dict(root.attrs[CELLSAM_KEY])  # type: ignore[arg-type]
        meta["spec"] = spec.model_dump(mode="json")
        meta["generation"] = int(meta.get("generation", 0)) + 1
        if spec.sizes.t is not None:
            for p in range(spec.sizes.p):
                base = position_path(p, spec.sizes.p)
                paths = [f"{base}/{k}" for k in range(spec.storage.levels)]
                for name in LABEL_IMAGES:
                    paths += [f"{base}/labels/{name}/{k}" for k in range(spec.storage.levels)]
                paths.append(f"{base}/cellsam/done")
                for array_path in paths:
                    if not _exists(Path(str(zstore.root)), array_path):
                        continue  # no tracks yet (a store from before tracking): made to size later
                    array = zarr.open_array(zstore, path=array_path, mode="r+")
                    if array.shape[0] < spec.sizes.t:
                        array.resize((spec.sizes.t, *array.shape[1:]))
        root.attrs[CELLSAM_KEY] = meta

    # -- metadata state -----------------------------------------------------------------------

    @staticmethod
    def _root_state(store: _Store) -> dict[str, Any]:
        """Our root attributes, read fresh (the file is replaced atomically, so never torn)."""
        document = json.loads((store.path / "zarr.json").read_bytes())
        meta: dict[str, Any] = document["attributes"][CELLSAM_KEY]
        meta.setdefault("generation", 0)
        return meta

    @staticmethod
    def _update_root_state(
        zstore: LocalStore, *, closed: bool, summary: Any = None, bump_generation: bool = False
    ) -> None:
        """Rewrite the root's state under the exclusive lock (callers hold it)."""
        root = zarr.open_group(zstore, mode="r+", zarr_format=3)
        meta: dict[str, Any] = dict(root.attrs[CELLSAM_KEY])  # type: ignore[arg-type]
        meta["closed"] = closed
        if closed:
            meta["summary"] = summary
        if bump_generation:
            meta["generation"] = int(meta.get("generation", 0)) + 1
        root.attrs[CELLSAM_KEY] = meta

    def _reload(self, store: _Store) -> None:
        generation = self._root_state(store)["generation"]
        series = {p: self._load_series(store, p) for p in range(store.spec.sizes.p)}
        tracking = _exists(store.path, _LINEAGE_GROUP) and all(
            "tracks/0" in s.arrays and all(_exists(store.path, f"{s.path}/{g}") for g in _TRACKING_GROUPS)
            for s in series.values()
        )
        with store.mutex:
            store.series = series
            store.generation = generation
            store.tracking = tracking

    @staticmethod
    def _load_series(store: _Store, p: int) -> _Series:
        base = store.position(p)
        levels = range(store.spec.storage.levels)
        paths = {f"image/{k}": f"{base}/{k}" for k in levels}
        paths |= {f"labels/{k}": f"{base}/labels/cells/{k}" for k in levels}
        if all(_exists(store.path, f"{base}/labels/tracks/{k}") for k in levels):
            paths |= {f"tracks/{k}": f"{base}/labels/tracks/{k}" for k in levels}
        paths["done"] = f"{base}/cellsam/done"
        arrays = {name: zarr.open_array(store.zstore, path=path, mode="r+") for name, path in paths.items()}
        return _Series(path=base, arrays=arrays, t_alloc=arrays["done"].shape[0])

    def _ensure_t(self, store: _Store, p: int, t: int) -> None:
        """Grow every position so that it holds time point ``t`` (unbounded acquisitions).

        All positions grow together: plate readers stitch the wells side by side and need equal shapes.
        """
        with store.mutex:
            if t < store.series[p].t_alloc:
                return
        with _flock(store.lock_file, exclusive=True):
            # Re-read: another process may have grown them already.
            series = {q: self._load_series(store, q) for q in range(store.spec.sizes.p)}
            if t >= series[p].t_alloc:
                step = store.spec.storage.t_growth
                new_t = (t // step + 1) * step
                for q in series:
                    for array in series[q].arrays.values():
                        if array.shape[0] < new_t:
                            array.resize((new_t, *array.shape[1:]))
                    series[q] = self._load_series(store, q)
        with store.mutex:
            store.series.update(series)

    def _t_size(self, store: _Store) -> int:
        t_max = -1
        for series in store.series.values():
            ts = np.nonzero(np.asarray(series.arrays["done"][...]) & DONE_LABELS)[0]
            if ts.size:
                t_max = max(t_max, int(ts.max()))
        return t_max + 1

    # -- frames -------------------------------------------------------------------------------

    @staticmethod
    def _frame_lock(store: _Store, p: int, t: int, z: int) -> Any:
        """One writer at a time per frame: with sharding per shard (shards are read-modify-written
        whole), otherwise per stripe of frames, so a frame's tracking never interleaves with a rewrite."""
        shard_t = store.spec.storage.shard_t
        if shard_t is None:
            stripe = (p * 7919 + t * 104729 + z) % _FRAME_LOCKS
            return _flock(store.lock_dir / f"frame-{stripe:02d}.lock", exclusive=True)
        return _flock(store.lock_dir / f"shard-p{p}-t{t // shard_t}-z{z}.lock", exclusive=True)

    @staticmethod
    def _write_frame(store: _Store, series: _Series, t: int, z: int, frame: PreparedFrame) -> None:
        arrays = series.arrays
        done = arrays["done"]
        done[t, z] = 0  # a rewrite must never expose a half-replaced frame as done
        if frame.image is not None:
            # A projection's frame is its whole (t, p): every z plane of the image, (C, Z, H, W).
            where = (t,) if store.spec.z_policy.projects else (t, slice(None), z)
            for level in range(store.spec.storage.levels):
                arrays[f"image/{level}"][where] = downsample(frame.image, level)
        for level in range(store.spec.storage.levels):
            arrays[f"labels/{level}"][t, z] = downsample(frame.labels, level)
        write_table(store.zstore, series.path, CELLS_GROUP, t, z, frame.cells)
        # No tracks bit: a rewritten frame is tracked again from its new labels.
        done[t, z] = DONE_LABELS | (DONE_IMAGE if frame.image is not None else 0)

    # -- display window -----------------------------------------------------------------------

    def _widen_windows(self, store: _Store, seen: IntensityRange) -> None:
        """Merge a frame's intensity range into the store's and rewrite the windows it changes.

        Callers hold ``store.lock`` shared, so no open or close rewrites the root meanwhile; the window
        lock makes the read-merge-write of the root one step across threads and processes.
        """
        with _flock(store.window_lock_file, exclusive=True):
            root = zarr.open_group(store.zstore, mode="r+", zarr_format=3)
            meta: dict[str, Any] = dict(root.attrs[CELLSAM_KEY])  # type: ignore[arg-type]
            known = meta.get("intensity_range")
            if covers(known, seen):
                return  # another writer widened it meanwhile
            merged = merge_ranges(known, seen)
            meta["intensity_range"] = merged
            root.attrs[CELLSAM_KEY] = meta  # the root first: it is what later merges start from
            self._write_windows(store, merged)

    @staticmethod
    def _write_windows(store: _Store, intensity: IntensityRange | None, *, only_stale: bool = False) -> None:
        """Write every position's ``omero`` from ``intensity`` (with ``only_stale``, where it differs)."""
        omero = omero_attrs(store.spec, intensity)
        for p in range(store.spec.sizes.p):
            group = zarr.open_group(store.zstore, path=store.position(p), mode="r+", zarr_format=3)
            ome: dict[str, Any] = dict(group.attrs["ome"])  # type: ignore[arg-type]
            if only_stale and ome.get("omero") == omero:
                continue
            ome["omero"] = omero
            group.attrs["ome"] = ome

    # -- lookups ------------------------------------------------------------------------------

    def _store(self, acquisition: str) -> _Store:
        validate_acquisition_id(acquisition)
        with self._mutex:
            store = self._stores.get(acquisition)
        if store is None:
            raise AcquisitionNotOpenError(
                f"acquisition {acquisition!r} is not open; call open_acquisition first"
            )
        return store

    def _done_value(self, frame_id: FrameId) -> int:
        store = self._store(frame_id.acquisition)
        p, t, z = check_frame_index(store.spec, frame_id)
        with store.mutex:
            series = store.series[p]
        if t >= series.t_alloc:
            series = self._load_series(store, p)  # another process may have grown it
            with store.mutex:
                store.series[p] = series
            if t >= series.t_alloc:
                return 0
        return _done_at(series, t, z)

    def _done_frame(self, frame_id: FrameId) -> tuple[_Store, _Series, tuple[int, int, int]]:
        if not self._done_value(frame_id) & DONE_LABELS:
            raise FrameNotWrittenError(f"frame {frame_id!r} is not done")
        store = self._store(frame_id.acquisition)
        index = check_frame_index(store.spec, frame_id)
        with store.mutex:
            return store, store.series[index[0]], index
