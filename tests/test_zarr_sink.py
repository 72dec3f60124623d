"""ZarrLabelSink on disk: NGFF 0.5 metadata, independent readers, writer processes, SIGKILL and resume."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr_models.v05.hcs import HCS
from ome_zarr_models.v05.image import Image
from skimage.draw import disk

from acquisition.errors import InvalidAcquisitionIdError
from acquisition.frames import FrameId
from acquisition.sink_errors import IncompatibleStoreError
from acquisition.spec import AcquisitionSpec, Sizes, StorageOptions
from acquisition.zarr_layout import position_path
from acquisition.zarr_sink import ZarrLabelSink, open_position
from cellsam_core.cells import CELL_COLUMNS
from tests.sink_frames import (
    SHAPE,
    frame_cells,
    frame_image,
    frame_labels,
    write_forever_worker,
    write_frame,
    write_frames_worker,
)

SPAWN = multiprocessing.get_context("spawn")
#: Group paths of the two positions of `make_spec`'s acquisitions: wells A/1 and A/2 of the plate.
POS = ("A/1/0", "A/2/0")


def make_spec(acquisition: str = "run-1", **kwargs: Any) -> AcquisitionSpec:
    defaults: dict[str, Any] = {
        "sizes": Sizes(t=None, p=2, z=1, c=2),
        "frame_shape": SHAPE,
        "storage": StorageOptions(t_growth=4),
    }
    return AcquisitionSpec(acquisition=acquisition, **(defaults | kwargs))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def check_done_frames(store: Path, spec: AcquisitionSpec, limit: int | None = None) -> int:
    """Open ``store`` with plain zarr (fresh) and check the labels of every frame marked done.

    Returns how many done frames were checked. Reads `done` before the label array's metadata, so
    a frame marked done is always inside the label array's shape.
    """
    checked = 0
    for p in range(spec.sizes.p):
        position = store / position_path(p, spec.sizes.p)
        done = np.asarray(zarr.open_array(position / "cellsam" / "done", mode="r")[...])
        labels = zarr.open_array(position / "labels" / "cells" / "0", mode="r")
        frames = np.argwhere(done & 1)[-limit:] if limit else np.argwhere(done & 1)
        for t, z in frames:
            np.testing.assert_array_equal(labels[t, z], frame_labels(p, int(t), int(z)))
            checked += 1
    return checked


def ome_zarr_nodes(series: Path) -> dict[str, Any]:
    """Nodes that ome-zarr's reader finds from a series group, keyed by their path's last part."""
    nodes = list(Reader(parse_url(str(series)))())
    return {node.zarr.basename(): node for node in nodes}


def test_positions_are_the_wells_of_a_plate() -> None:
    assert [position_path(p, 1) for p in range(1)] == ["A/1/0"]
    assert [position_path(p, 2) for p in range(2)] == list(POS)
    assert [position_path(p, 5) for p in range(5)] == ["A/1/0", "A/2/0", "A/3/0", "B/1/0", "B/2/0"]
    assert position_path(0, 27 * 27) == "A/1/0" and position_path(27 * 27 - 1, 27 * 27) == "AA/27/0"
    with pytest.raises(ValueError, match="outside"):
        position_path(2, 2)


def test_open_position_finds_each_position_of_a_store(tmp_path: Path) -> None:
    spec = make_spec(sizes=Sizes(t=2, p=5, z=1, c=2))
    sink = ZarrLabelSink(tmp_path)
    sink.open_acquisition(spec)
    write_frame(sink, spec, 4, 1, 0)
    store = sink.store_path(spec.acquisition)
    group = open_position(store, 4)
    assert group.path == "B/2/0"
    done, labels = (np.asarray(group[name][1, 0]) for name in ("cellsam/done", "labels/cells/0"))  # type: ignore[index]
    assert done & 1
    np.testing.assert_array_equal(labels, frame_labels(4, 1, 0))
    with pytest.raises(IndexError, match=r"positions 0\.\.4, not 5"):
        open_position(store, 5)
    _foreign_group(tmp_path / "foreign.ome.zarr")
    with pytest.raises(IncompatibleStoreError, match="not a cellsam-stream label store"):
        open_position(tmp_path / "foreign.ome.zarr", 0)


def test_ngff_metadata_is_valid_and_carries_pixel_size(tmp_path: Path) -> None:
    spec = make_spec(
        pixel_size_um=0.325,
        z_step_um=1.5,
        time_interval_s=30.0,
        channel_names=("DAPI", "GFP"),
        storage=StorageOptions(levels=2, t_growth=4),
    )
    sink = ZarrLabelSink(tmp_path)
    sink.open_acquisition(spec)
    write_frame(sink, spec, 1, 2, 0)
    store = sink.store_path("run-1")
    assert store == tmp_path / "run-1.ome.zarr"

    assert read_json(store / "zarr.json")["attributes"]["ome"] == {
        "version": "0.5",
        "plate": {
            "version": "0.5",
            "name": "run-1",
            "rows": [{"name": "A"}],
            "columns": [{"name": "1"}, {"name": "2"}],
            "wells": [
                {"path": "A/1", "rowIndex": 0, "columnIndex": 0},
                {"path": "A/2", "rowIndex": 0, "columnIndex": 1},
            ],
            "field_count": 1,
        },
    }
    assert read_json(store / "A" / "2" / "zarr.json")["attributes"]["ome"] == {
        "version": "0.5",
        "well": {"images": [{"path": "0"}]},
    }

    image = read_json(store / POS[1] / "zarr.json")["attributes"]["ome"]
    assert image["version"] == "0.5"
    (multiscale,) = image["multiscales"]
    assert [a["name"] for a in multiscale["axes"]] == ["t", "c", "z", "y", "x"]
    assert [a.get("unit") for a in multiscale["axes"]] == [
        "second",
        None,
        "micrometer",
        "micrometer",
        "micrometer",
    ]
    scales = [d["coordinateTransformations"] for d in multiscale["datasets"]]
    assert scales == [
        [{"type": "scale", "scale": [30.0, 1.0, 1.5, 0.325, 0.325]}],
        [{"type": "scale", "scale": [30.0, 1.0, 1.5, 0.65, 0.65]}],
    ]
    assert [c["label"] for c in image["omero"]["channels"]] == ["DAPI", "GFP"]

    assert read_json(store / POS[1] / "labels" / "zarr.json")["attributes"]["ome"] == {
        "version": "0.5",
        "labels": ["cells", "tracks"],
    }
    label = read_json(store / POS[1] / "labels" / "cells" / "zarr.json")["attributes"]["ome"]
    assert label["image-label"] == {"source": {"image": "../../"}}  # no colours: every label is shown
    (label_multiscale,) = label["multiscales"]
    assert [a["name"] for a in label_multiscale["axes"]] == ["t", "z", "y", "x"]
    assert label_multiscale["datasets"][0]["coordinateTransformations"][0]["scale"] == [
        30.0,
        1.5,
        0.325,
        0.325,
    ]

    labels0 = zarr.open_array(store / POS[1] / "labels" / "cells" / "0", mode="r")
    assert labels0.dtype == np.uint32 and labels0.metadata.dimension_names == ("t", "z", "y", "x")  # type: ignore[union-attr]
    assert labels0.chunks == (1, 1, *SHAPE)  # one chunk per frame
    image0 = zarr.open_array(store / POS[1] / "0", mode="r")
    assert image0.dtype == np.uint16 and image0.chunks == (1, 2, 1, *SHAPE)

    # An independent validator of the OME-Zarr 0.5 models accepts the plate, its wells and images.
    root = zarr.open_group(store, mode="r")
    plate = HCS.from_zarr(root)
    assert [well.ome_attributes.well.images[0].path for well in plate.well_groups] == ["0", "0"]
    for path in POS:
        model = Image.from_zarr(root[path])  # type: ignore[arg-type]
        assert model.labels is not None and model.labels.label_paths == ["cells", "tracks"]


def test_independent_readers_see_written_frames(tmp_path: Path) -> None:
    spec = make_spec(storage=StorageOptions(levels=2, t_growth=4))
    sink = ZarrLabelSink(tmp_path)
    sink.open_acquisition(spec)
    for t in range(6):
        write_frame(sink, spec, 0, t, 0)
    store = sink.store_path(spec.acquisition)

    nodes = ome_zarr_nodes(store / POS[0])
    image, cells = nodes["0"], nodes["cells"]
    assert [d.shape[-2:] for d in image.data] == [SHAPE, (32, 32)]
    np.testing.assert_array_equal(image.data[0][3, :, 0].compute(), frame_image(0, 3, 0, 2))
    np.testing.assert_array_equal(cells.data[0][3, 0].compute(), frame_labels(0, 3, 0))
    np.testing.assert_array_equal(cells.data[1][3, 0].compute(), frame_labels(0, 3, 0)[::2, ::2])
    assert cells.metadata["color"] == {}  # no colours listed: viewers use their label colormap

    # Plain zarr walks the whole hierarchy without meeting anything it does not recognise.
    root = zarr.open_group(store, mode="r")
    names = {name for name, _ in root.members(max_depth=None)}
    assert {
        f"{POS[0]}/labels/cells/1",
        f"{POS[0]}/cellsam/done",
        f"{POS[0]}/cellsam/cells/t000003_z0000",
    } <= names
    table_path = store / POS[0] / "cellsam" / "cells" / "t000003_z0000"
    table = np.asarray(zarr.open_array(table_path, mode="r")[...])
    np.testing.assert_array_equal(table, frame_cells(0, 3, 0).to_array())
    assert check_done_frames(store, spec) == 6


def test_cell_tables_are_stored_and_read_by_column_name(tmp_path: Path) -> None:
    spec = make_spec(pixel_size_um=0.5)
    sink = ZarrLabelSink(tmp_path)
    sink.open_acquisition(spec)
    write_frame(sink, spec, 0, 1, 0)
    frame = FrameId(spec.acquisition, 0, 1, 0)
    path = sink.store_path(spec.acquisition) / POS[0] / "cellsam" / "cells" / "t000001_z0000"
    stored = zarr.open_array(path, mode="r")
    assert stored.attrs["cellsam"] == {"columns": list(CELL_COLUMNS)}
    assert stored.metadata.dimension_names == ("cell", "column")  # type: ignore[union-attr]
    expected = frame_cells(0, 1, 0, pixel_size_um=0.5)
    np.testing.assert_array_equal(np.asarray(stored[...]), expected.to_array())

    # A reader goes by the names, not the positions: the same table with its columns in another order
    # reads back equal, and a column this code does not know is kept as a measurement.
    names = [*reversed(CELL_COLUMNS), "future_column"]
    rows = np.column_stack([*(expected.columns()[c] for c in reversed(CELL_COLUMNS)), np.ones(len(expected))])
    zarr.create_array(
        sink.store_path(spec.acquisition),
        name=f"{POS[0]}/cellsam/cells/t000001_z0000",
        data=rows.astype(np.float64),
        attributes={"cellsam": {"columns": names}},
        overwrite=True,
    )
    reader = ZarrLabelSink(tmp_path)
    reader.open_acquisition(spec)
    back = reader.read_cells(frame)
    assert back.pixel_size_um == 0.5
    assert back.equals(expected.with_measurements({"future_column": np.ones(len(expected))}))


def test_writer_processes_share_an_unbounded_acquisition(tmp_path: Path) -> None:
    spec = make_spec(storage=StorageOptions(t_growth=3))
    n_t, n_workers = 36, 3
    frames = [(p, t, 0) for t in range(n_t) for p in range(spec.sizes.p)]
    # Interleaved frames: each worker must grow t past the others' growth many times.
    shares = [frames[i::n_workers] for i in range(n_workers)]
    paused = [SPAWN.Event() for _ in shares]
    resume = SPAWN.Event()
    procs = [
        SPAWN.Process(
            target=write_frames_worker, args=(str(tmp_path), spec.model_dump_json(), share, ev, resume)
        )
        for share, ev in zip(shares, paused, strict=True)
    ]
    for proc in procs:
        proc.start()
    try:
        for ev, proc in zip(paused, procs, strict=True):
            while not ev.wait(0.2):
                assert proc.is_alive(), f"writer exited early with code {proc.exitcode}"
        # Mid-acquisition, all writers alive: readers see consistent metadata and intact done frames.
        store = tmp_path / f"{spec.acquisition}.ome.zarr"
        assert check_done_frames(store, spec) == sum(len(s) // 2 for s in shares)
        assert ome_zarr_nodes(store / POS[1])["cells"].data[0].shape[0] >= n_t // 2
        resume.set()
        while any(proc.is_alive() for proc in procs):
            check_done_frames(store, spec, limit=4)  # reads racing the writers
            nodes = ome_zarr_nodes(store / POS[0])
            assert nodes["cells"].data[0].shape[1:] == (1, *SHAPE)
    finally:
        resume.set()
        for proc in procs:
            proc.join(60)
    assert [proc.exitcode for proc in procs] == [0] * n_workers

    sink = ZarrLabelSink(tmp_path)
    sink.open_acquisition(spec)
    progress = sink.progress(spec.acquisition)
    assert sorted((f.p, f.t, f.z) for f in progress.done) == sorted(frames)  # no frame lost
    for p, t, z in frames:
        frame = FrameId(spec.acquisition, p, t, z)
        np.testing.assert_array_equal(sink.read_labels(frame), frame_labels(p, t, z))
        np.testing.assert_array_equal(sink.read_image(frame), frame_image(p, t, z, 2))
        assert sink.read_cells(frame).equals(frame_cells(p, t, z))
    sink.close_acquisition(spec.acquisition)
    root = zarr.open_group(sink.store_path(spec.acquisition), mode="r")
    shapes = {path: arr.shape[0] for path, arr in root.arrays()} | {
        f"{p}/{name}": root[f"{p}/{name}"].shape[0]  # type: ignore[union-attr]
        for p in POS
        for name in ("0", "labels/cells/0", "cellsam/done")
    }
    assert set(shapes.values()) == {n_t}  # trimmed to the data, every array alike


def test_sigkill_mid_acquisition_then_resume(tmp_path: Path) -> None:
    spec = make_spec(sizes=Sizes(t=None, p=2, z=2, c=2), storage=StorageOptions(t_growth=4, levels=2))
    proc = SPAWN.Process(target=write_forever_worker, args=(str(tmp_path), spec.model_dump_json()))
    proc.start()
    watcher = ZarrLabelSink(tmp_path)
    deadline = time.monotonic() + 120
    try:
        while True:
            assert proc.is_alive(), f"writer exited with code {proc.exitcode}"
            assert time.monotonic() < deadline, "writer made no progress"
            if spec.acquisition + ".ome.zarr" in os.listdir(tmp_path):
                watcher.open_acquisition(spec)
                if watcher.progress(spec.acquisition).frames_done >= 20:
                    break
            time.sleep(0.05)
    finally:
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)  # mid-write: the worker writes back to back
        proc.join(30)
    assert proc.exitcode == -signal.SIGKILL

    # Restart: the store reopens, every frame marked done is intact, and readers cope.
    sink = ZarrLabelSink(tmp_path)
    sink.open_acquisition(spec)
    done = sink.progress(spec.acquisition).done
    assert len(done) >= 20
    for frame in done:
        np.testing.assert_array_equal(sink.read_labels(frame), frame_labels(frame.p, frame.t, frame.z))
        np.testing.assert_array_equal(sink.read_image(frame), frame_image(frame.p, frame.t, frame.z, 2))
        assert sink.read_cells(frame).equals(frame_cells(frame.p, frame.t, frame.z))
    store = sink.store_path(spec.acquisition)
    assert check_done_frames(store, spec) == len(done)
    assert ome_zarr_nodes(store / POS[0])["cells"].data[1].shape[-2:] == (32, 32)

    # The acquisition continues into the same store: missing frames are (re)written, new ones added.
    t_end = max(f.t for f in done) + 3
    wanted = [(p, t, z) for p in range(2) for t in range(t_end) for z in range(2)]
    for p, t, z in wanted:
        if not sink.is_done(FrameId(spec.acquisition, p, t, z)):
            write_frame(sink, spec, p, t, z)
    sink.close_acquisition(spec.acquisition, {"resumed": True})
    progress = sink.progress(spec.acquisition)
    assert sorted((f.p, f.t, f.z) for f in progress.done) == sorted(wanted)
    assert progress.summary == {"resumed": True}
    assert check_done_frames(store, spec) == len(wanted)
    assert zarr.open_array(store / POS[1] / "labels" / "cells" / "0", mode="r").shape[0] == t_end


def _plain_file(path: Path) -> None:
    path.write_text("not a store")


def _dir_with_file(path: Path) -> None:
    path.mkdir()
    (path / "notes.txt").write_text("hello")


def _foreign_group(path: Path) -> None:
    zarr.open_group(path, mode="w", attributes={"ome": {"version": "0.5"}})


def _zarr_v2_group(path: Path) -> None:
    zarr.open_group(path, mode="w", zarr_format=2)


def _other_spec(path: Path) -> None:
    ZarrLabelSink(path.parent).open_acquisition(make_spec(frame_shape=(32, 32)))


def _other_layout_version(path: Path) -> None:
    ZarrLabelSink(path.parent).open_acquisition(make_spec())
    root = zarr.open_group(path, mode="r+")
    meta = dict(root.attrs["cellsam"])  # type: ignore[arg-type]
    root.attrs["cellsam"] = meta | {"layout_version": 99}


@pytest.mark.parametrize(
    ("make_existing", "message"),
    [
        (_plain_file, "not a directory"),
        (_dir_with_file, "not a Zarr v3 group"),
        (_foreign_group, "not a cellsam-stream label store"),
        (_zarr_v2_group, "not a Zarr v3 group"),
        (_other_spec, "frame_shape"),
        (_other_layout_version, "layout version 99"),
    ],
    ids=["file", "plain-dir", "foreign-zarr", "zarr-v2", "other-spec", "other-layout"],
)
def test_incompatible_existing_store_refused(tmp_path: Path, make_existing: Any, message: str) -> None:
    path = tmp_path / "run-1.ome.zarr"
    make_existing(path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if ".locks" not in str(p))
    with pytest.raises(IncompatibleStoreError, match=message) as info:
        ZarrLabelSink(tmp_path).open_acquisition(make_spec())
    assert isinstance(info.value, FileExistsError)
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if ".locks" not in str(p))
    assert after == before  # left untouched


def test_path_escape_refused_before_touching_disk(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sink = ZarrLabelSink(out)
    unchecked = AcquisitionSpec.model_construct(**make_spec().model_dump() | {"acquisition": "../../etc"})
    with pytest.raises(InvalidAcquisitionIdError):
        sink.open_acquisition(unchecked)
    with pytest.raises(InvalidAcquisitionIdError):
        sink.store_path("../x")
    assert list(tmp_path.iterdir()) == []


def test_sharding_and_yx_chunks(tmp_path: Path) -> None:
    spec = make_spec(storage=StorageOptions(shard_t=4, chunk_yx=(32, 16), t_growth=4))
    sink = ZarrLabelSink(tmp_path)
    sink.open_acquisition(spec)
    for t in range(6):
        write_frame(sink, spec, 0, t, 0)
    store = sink.store_path(spec.acquisition)
    labels = zarr.open_array(store / POS[0] / "labels" / "cells" / "0", mode="r")
    assert labels.shards == (4, 1, *SHAPE) and labels.chunks == (1, 1, 32, 16)
    image = zarr.open_array(store / POS[0] / "0", mode="r")
    assert image.shards == (4, 2, 1, *SHAPE) and image.chunks == (1, 2, 1, 32, 16)
    # Frames 0-3 share one shard file per array: one file, all four frames intact.
    chunk_dir = store / POS[0] / "labels" / "cells" / "0" / "c"
    shard_files = sorted(chunk_dir.rglob("*"))
    assert [f.relative_to(chunk_dir).as_posix() for f in shard_files if f.is_file()] == [
        "0/0/0/0",
        "1/0/0/0",
    ]
    assert check_done_frames(store, spec) == 6


def test_downsampled_levels(tmp_path: Path) -> None:
    spec = make_spec(frame_shape=(64, 48), storage=StorageOptions(levels=3))
    sink = ZarrLabelSink(tmp_path)
    sink.open_acquisition(spec)
    labels = frame_labels(0, 1, 0, (64, 48))
    sink.write(FrameId(spec.acquisition, 0, 1, 0), labels)
    root = zarr.open_group(sink.store_path(spec.acquisition), mode="r")
    for level, shape in enumerate([(64, 48), (32, 24), (16, 12)]):
        stored = root[f"{POS[0]}/labels/cells/{level}"]
        assert stored.shape[-2:] == shape  # type: ignore[union-attr]
        np.testing.assert_array_equal(stored[1, 0], labels[:: 2**level, :: 2**level])  # type: ignore[index]
        assert root[f"{POS[0]}/{level}"].shape[-2:] == shape  # type: ignore[union-attr]


def test_label_arrays_compress_well(tmp_path: Path) -> None:
    shape = (256, 256)
    spec = make_spec(frame_shape=shape, sizes=Sizes(p=1, z=1, c=1), write_image=False)
    rng = np.random.default_rng(1)
    labels = np.zeros(shape, np.uint32)
    for label in range(1, 41):
        labels[disk(tuple(rng.integers(12, 244, 2)), int(rng.integers(5, 12)), shape=shape)] = label
    sink = ZarrLabelSink(tmp_path)
    sink.open_acquisition(spec)
    sink.write(FrameId(spec.acquisition, 0, 0, 0), labels)
    chunk_dir = sink.store_path(spec.acquisition) / "A" / "1" / "0" / "labels" / "cells" / "0" / "c"
    stored = sum(f.stat().st_size for f in chunk_dir.rglob("*") if f.is_file())
    ratio = stored / labels.nbytes
    print(f"label compression: {labels.nbytes} B -> {stored} B (ratio {ratio:.4f})")
    assert 0 < ratio < 0.05


def test_crash_leftovers_are_cleaned_on_open(tmp_path: Path) -> None:
    spec = make_spec()
    leftover = tmp_path / f".{spec.acquisition}.ome.zarr.tmp-deadbeef"
    (leftover / "0").mkdir(parents=True)
    sink = ZarrLabelSink(tmp_path)
    sink.open_acquisition(spec)
    store = sink.store_path(spec.acquisition)
    # Killed while replacing the root's or a position's metadata (a window update).
    partials = [store / "zarr.0123.partial", store / POS[1] / "zarr.4567.partial"]
    for partial in partials:
        partial.write_text("{")
    sink.open_acquisition(spec)  # a restart
    assert not leftover.exists() and not any(partial.exists() for partial in partials)
    zarr.open_group(store, mode="r").members(max_depth=None)  # no unrecognised objects
