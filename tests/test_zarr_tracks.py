"""Tracking in the Zarr label store beyond the sink contract: the files on disk, stores made before
tracking, attaching to a finished store, growth and trimming, and writers in several processes."""

from __future__ import annotations

import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from acquisition.frames import FrameId
from acquisition.lineage import read_lineage
from acquisition.sink_errors import AcquisitionClosedError, StoreNotFoundError
from acquisition.spec import AcquisitionSpec, Sizes, StorageOptions
from acquisition.zarr_layout import DONE_TRACKS, lineage_path, position_path
from acquisition.zarr_sink import ZarrLabelSink
from cellsam_core.lineage import lineage_graph
from cellsam_core.tracking import OnlineTracker, TrackedFrame, TrackerConfig
from tests.sink_frames import SHAPE, write_frame

SPAWN = multiprocessing.get_context("spawn")
CONFIG = TrackerConfig(max_distance=40)


def make_spec(acquisition: str = "tracks", **kwargs: object) -> AcquisitionSpec:
    defaults: dict[str, object] = {
        "sizes": Sizes(t=None, p=2, z=2, c=1),
        "frame_shape": SHAPE,
        "pixel_size_um": 0.5,
        "time_interval_s": 60.0,
        "storage": StorageOptions(t_growth=8, levels=2),
    }
    return AcquisitionSpec(acquisition=acquisition, **(defaults | kwargs))  # type: ignore[arg-type]


def track_plane(
    sink: ZarrLabelSink, spec: AcquisitionSpec, p: int, z: int, ts: list[int]
) -> list[TrackedFrame]:
    """Write frames ``ts`` of (p, z) and store their tracking, linked as stored."""
    tracker = OnlineTracker(CONFIG, first_t=ts[0])
    frames = []
    for t in ts:
        for missing in range(tracker.next_t, t):
            tracker.skip(missing)
        write_frame(sink, spec, p, t, z)
        frame_id = FrameId(spec.acquisition, p, t, z)
        frame = tracker.link(t, sink.read_labels(frame_id), sink.read_cells(frame_id))
        sink.write_tracks(frame_id, frame.track_labels, frame.cells, tracker.state().model_dump(mode="json"))
        frames.append(frame)
    return frames


def track_plane_worker(output: str, spec_json: str, p: int, z: int, ts: list[int]) -> None:
    """Process entry point: join the acquisition and track frames ``ts`` of (p, z), lineage included."""
    spec = AcquisitionSpec.model_validate_json(spec_json)
    sink = ZarrLabelSink(output)
    sink.open_acquisition(spec)
    sink.write_lineage(spec.acquisition, p, z, lineage_graph(track_plane(sink, spec, p, z, ts)))


def test_lineage_file_is_geff_in_physical_units(tmp_path: Path) -> None:
    spec = make_spec()
    sink = ZarrLabelSink(tmp_path)
    sink.open_acquisition(spec)
    graph = lineage_graph(track_plane(sink, spec, 1, 0, list(range(4))))
    sink.write_lineage(spec.acquisition, 1, 0, graph)
    sink.write_lineage(spec.acquisition, 1, 0, graph)  # a second version: the link moves on
    path = sink.store_path(spec.acquisition) / lineage_path(1, 0)
    assert path == sink.store_path(spec.acquisition) / "cellsam/lineage/p0001_z0000.geff"
    assert path.is_symlink() and path.resolve().name == "000000000001"
    geff_graph, metadata = read_lineage(path)
    assert [(a.name, a.unit) for a in metadata.axes] == [
        ("t", "second"),
        ("y", "micrometer"),
        ("x", "micrometer"),
    ]
    node, data = next(iter(graph.nodes(data=True)))
    stored = geff_graph.nodes[node]
    assert stored["t"] == data["t"] * 60.0 and stored["frame"] == data["t"]
    assert stored["y"] == pytest.approx(data["y"] * 0.5) and stored["area"] == pytest.approx(
        data["area"] * 0.25
    )
    assert set(geff_graph.edges) == set(graph.edges)


def _strip_tracking(store: Path, spec: AcquisitionSpec) -> None:
    """Make ``store`` look like one written before tracking existed."""
    shutil.rmtree(store / "cellsam")
    for p in range(spec.sizes.p):
        base = store / position_path(p, spec.sizes.p)
        for node in ("labels/tracks", "cellsam/tracked", "cellsam/tracker"):
            shutil.rmtree(base / node)
        labels = zarr.open_group(base / "labels", mode="r+")
        labels.attrs["ome"] = {"version": "0.5", "labels": ["cells"]}
        zarr.open_group(base / "cellsam", mode="r+").attrs["cellsam"] = {
            "done_bits": {"labels": 1, "image": 2}
        }


def test_a_store_made_before_tracking_gets_it_on_first_use(tmp_path: Path) -> None:
    spec = make_spec()
    sink = ZarrLabelSink(tmp_path)
    sink.open_acquisition(spec)
    for t in range(10):  # beyond the first t_growth (8): the arrays grew
        write_frame(sink, spec, 0, t, 1)
    store = sink.store_path(spec.acquisition)
    _strip_tracking(store, spec)

    old = ZarrLabelSink(tmp_path)
    old.open_acquisition(spec)  # opens as before
    assert old.progress(spec.acquisition).tracked == () and len(old.progress(spec.acquisition).done) == 10
    tracker = OnlineTracker(CONFIG)
    for t in range(10):
        frame_id = FrameId(spec.acquisition, 0, t, 1)
        frame = tracker.link(t, old.read_labels(frame_id), old.read_cells(frame_id))
        old.write_tracks(frame_id, frame.track_labels, frame.cells, tracker.state().model_dump(mode="json"))
    old.write_lineage(spec.acquisition, 0, 1, lineage_graph([]))

    fresh = ZarrLabelSink(tmp_path)
    fresh.open_acquisition(spec)
    assert len(fresh.progress(spec.acquisition).tracked) == 10
    np.testing.assert_array_equal(fresh.read_tracks(FrameId(spec.acquisition, 0, 9, 1)), frame.track_labels)
    for p in range(2):
        group = zarr.open_group(store / position_path(p, 2), mode="r")
        assert group["labels"].attrs["ome"]["labels"] == ["cells", "tracks"]  # type: ignore[index]
        for level in range(2):
            cells, tracks = group[f"labels/cells/{level}"], group[f"labels/tracks/{level}"]
            assert tracks.shape == cells.shape and tracks.chunks == cells.chunks  # type: ignore[union-attr]
        assert group["cellsam"].attrs["cellsam"]["done_bits"]["tracks"] == DONE_TRACKS  # type: ignore[index]
    assert fresh.read_lineage(spec.acquisition, 0, 1) is not None


def test_track_arrays_catch_up_with_arrays_grown_without_them(tmp_path: Path) -> None:
    """A writer that does not know tracks grows the other arrays alone; tracking a frame there works."""
    spec = make_spec()
    sink = ZarrLabelSink(tmp_path)
    sink.open_acquisition(spec)
    store = sink.store_path(spec.acquisition)
    for p in range(2):
        base = store / position_path(p, 2)
        for node in ("0", "1", "labels/cells/0", "labels/cells/1", "cellsam/done"):
            array = zarr.open_array(base / node, mode="r+")
            array.resize((16, *array.shape[1:]))
    other = ZarrLabelSink(tmp_path)
    other.open_acquisition(spec)
    (frame,) = track_plane(other, spec, 1, 0, [12])
    np.testing.assert_array_equal(sink.read_tracks(FrameId(spec.acquisition, 1, 12, 0)), frame.track_labels)
    assert zarr.open_array(store / position_path(0, 2) / "labels/tracks/1", mode="r").shape[0] == 16


def test_track_arrays_grow_and_trim_with_the_others(tmp_path: Path) -> None:
    spec = make_spec()
    sink = ZarrLabelSink(tmp_path)
    sink.open_acquisition(spec)
    track_plane(sink, spec, 0, 0, [0, 1, 20])
    store = sink.store_path(spec.acquisition)
    shapes = lambda: {  # noqa: E731
        name: zarr.open_array(store / position_path(p, 2) / name, mode="r").shape[0]
        for p in range(2)
        for name in ("labels/cells/0", "labels/tracks/0", "labels/tracks/1")
    }
    assert set(shapes().values()) == {24}
    sink.close_acquisition(spec.acquisition)
    assert set(shapes().values()) == {21}
    assert sink.is_tracked(FrameId(spec.acquisition, 0, 20, 0))


def test_attach_tracks_a_finished_store_and_leaves_it_closed(tmp_path: Path) -> None:
    spec = make_spec()
    sink = ZarrLabelSink(tmp_path)
    sink.open_acquisition(spec)
    write_frame(sink, spec, 1, 0, 1)
    sink.close_acquisition(spec.acquisition, {"frames": 1})
    with pytest.raises(StoreNotFoundError, match="no store of acquisition 'other'"):
        ZarrLabelSink(tmp_path).attach("other")

    attached = ZarrLabelSink(tmp_path)
    assert attached.attach(spec.acquisition) == spec
    frame_id = FrameId(spec.acquisition, 1, 0, 1)
    tracker = OnlineTracker(CONFIG)
    frame = tracker.link(0, attached.read_labels(frame_id), attached.read_cells(frame_id))
    attached.write_tracks(frame_id, frame.track_labels, frame.cells, tracker.state().model_dump(mode="json"))
    state = attached.progress(spec.acquisition)
    assert state.closed and state.summary == {"frames": 1}
    assert state.tracked == (FrameId(spec.acquisition, 1, 0, 1),)
    with pytest.raises(AcquisitionClosedError):
        write_frame(attached, spec, 1, 1, 1)
    assert ZarrLabelSink(tmp_path).stored(spec.acquisition).closed  # type: ignore[union-attr]
    np.testing.assert_array_equal(attached.read_tracks(frame_id), frame.track_labels)


def test_tracking_from_processes(tmp_path: Path) -> None:
    spec = make_spec()
    ZarrLabelSink(tmp_path).open_acquisition(spec)
    planes = [(0, 0, list(range(0, 12))), (1, 1, list(range(3, 15)))]  # the second grows the arrays
    procs = [
        SPAWN.Process(target=track_plane_worker, args=(str(tmp_path), spec.model_dump_json(), p, z, ts))
        for p, z, ts in planes
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(180)
    assert [proc.exitcode for proc in procs] == [0, 0]
    sink = ZarrLabelSink(tmp_path)
    sink.open_acquisition(spec)
    assert len(sink.progress(spec.acquisition).tracked) == 24
    for p, z, ts in planes:
        # The same linker on what the store holds gives what the writer stored.
        frames = track_plane_replay(sink, spec, p, z, ts)
        for frame in frames:
            np.testing.assert_array_equal(
                sink.read_tracks(FrameId(spec.acquisition, p, frame.t, z)), frame.track_labels
            )
        state = sink.tracker_state(spec.acquisition, p, z)
        assert state is not None and state["last_t"] == ts[-1]
        lineage = sink.read_lineage(spec.acquisition, p, z)
        assert lineage is not None and lineage.number_of_nodes() == lineage_graph(frames).number_of_nodes()


def track_plane_replay(
    sink: ZarrLabelSink, spec: AcquisitionSpec, p: int, z: int, ts: list[int]
) -> list[TrackedFrame]:
    tracker = OnlineTracker(CONFIG, first_t=ts[0])
    out = []
    for t in ts:
        frame_id = FrameId(spec.acquisition, p, t, z)
        out.append(tracker.link(t, sink.read_labels(frame_id), sink.read_cells(frame_id)))
    return out
