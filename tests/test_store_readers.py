"""The label store as readers see it: ome-zarr-py's `Reader`, ome-zarr-models, napari (napari-ome-zarr).

One store is written through the real `ZarrLabelSink` (2 channels, 2 named positions with stage
coordinates, 3 z planes, 2 levels, physical sizes, data far below the dtype's maximum, every frame tracked
and a lineage) and read back the way each reader does; the display-window rule (robust range, merged
across frames, threads and processes) is tested on its own below.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr_models.common.omero import Omero
from ome_zarr_models.v05.hcs import HCS
from ome_zarr_models.v05.image import Image
from ome_zarr_models.v05.image_label import ImageLabel
from ome_zarr_models.v05.labels import Labels
from ome_zarr_models.v05.well import Well

from acquisition.frames import FrameId
from acquisition.protocol import PositionInfo
from acquisition.spec import AcquisitionSpec, Sizes, StorageOptions
from acquisition.zarr_layout import (
    IntensityRange,
    covers,
    frame_intensity_range,
    merge_ranges,
    omero_attrs,
    position_path,
)
from acquisition.zarr_sink import ZarrLabelSink
from cellsam_core.lineage import lineage_graph
from cellsam_core.stacks import ZPolicy
from cellsam_core.tracking import TrackedFrame, TrackerConfig, track_sequence
from tests.sink_frames import SHAPE, frame_cells, frame_labels, varied_image, write_frame, write_frames_worker

SPAWN = multiprocessing.get_context("spawn")

SPEC = AcquisitionSpec(
    acquisition="readers",
    sizes=Sizes(t=2, p=2, z=3, c=2),
    frame_shape=SHAPE,
    channel_names=("DAPI", "GFP"),
    channel_colors=("#0000ff", None),  # None: the default palette's colour for channel 1 (magenta)
    positions=(
        PositionInfo(name="B3 field 1", x_um=1250.5, y_um=-310.25, z_um=42.0),
        PositionInfo(name="edge", x_um=9000.0, y_um=120.0),
    ),
    pixel_size_um=0.325,
    z_step_um=1.5,
    time_interval_s=30.0,
    storage=StorageOptions(levels=2),
)
FRAMES = [(p, t, z) for p in range(2) for t in range(2) for z in range(3)]
COLORS = ("0000FF", "FF00FF")
#: Physical size of each axis of a level-0 label image (t, z, y, x); images add c (1) after t.
SCALE = [30.0, 1.5, 0.325, 0.325]
UNITS = ["second", "micrometer", "micrometer", "micrometer"]


def tracked(p: int, z: int) -> list[TrackedFrame]:
    """The tracked frames t = 0, 1 of (p, z)."""
    tables = [frame_cells(p, t, z) for t in range(2)]
    return list(
        track_sequence(
            [frame_labels(p, t, z) for t in range(2)], TrackerConfig(max_distance=100), tables=tables
        )
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sink = ZarrLabelSink(tmp_path_factory.mktemp("readers"))
    sink.open_acquisition(SPEC)
    for frame in FRAMES:
        write_frame(sink, SPEC, *frame, image_fn=varied_image)
    for p in range(2):
        for z in range(3):
            frames = tracked(p, z)
            for frame in frames:
                sink.write_tracks(
                    FrameId(SPEC.acquisition, p, frame.t, z), frame.track_labels, frame.cells, {}
                )
            sink.write_lineage(SPEC.acquisition, p, z, lineage_graph(frames))
    return sink.store_path(SPEC.acquisition)


def pixels(channel: int) -> np.ndarray:
    """Every pixel of one channel over the whole acquisition."""
    return np.concatenate([varied_image(*f, 2)[channel].ravel() for f in FRAMES])


def expected_windows() -> list[list[float]]:
    """Per channel, [start, end] of the display window: the merged range of every frame written."""
    merged = functools.reduce(
        merge_ranges, (frame_intensity_range(varied_image(*f, 2)) for f in FRAMES), None
    )
    assert merged is not None
    return [list(r) for r in merged if r is not None]


def attrs(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((path / "zarr.json").read_text())
    return document["attributes"]


def positions(store: Path) -> list[Path]:
    return [store / position_path(p, SPEC.sizes.p) for p in range(SPEC.sizes.p)]


# -- ome-zarr-py -----------------------------------------------------------------------------------


def test_ome_zarr_reader_opens_the_root_as_a_plate_of_the_positions(store: Path) -> None:
    (plate,) = list(Reader(parse_url(str(store)))())
    # The positions side by side (one well each, one row): level 0 and the 2x-downsampled level.
    assert [d.shape for d in plate.data] == [(2, 2, 3, 64, 128), (2, 2, 3, 32, 64)]
    row = np.concatenate([varied_image(p, 1, 2, 2) for p in range(2)], axis=-1)
    np.testing.assert_array_equal(plate.data[0][1, :, 2].compute(), row)
    meta = plate.metadata
    assert [(a["name"], a.get("unit")) for a in meta["axes"]] == [
        ("t", "second"),
        ("c", None),
        ("z", "micrometer"),
        ("y", "micrometer"),
        ("x", "micrometer"),
    ]
    assert meta["coordinateTransformations"] == [
        [{"type": "scale", "scale": [30.0, 1.0, 1.5, 0.325, 0.325]}],
        [{"type": "scale", "scale": [30.0, 1.0, 1.5, 0.65, 0.65]}],
    ]
    assert meta["channel_names"] == ["DAPI", "GFP"]
    assert meta["contrast_limits"] == expected_windows()


@pytest.mark.parametrize("p", [0, 1])
def test_ome_zarr_reader_opens_each_position_with_its_labels(store: Path, p: int) -> None:
    nodes = {node.zarr.basename(): node for node in Reader(parse_url(str(positions(store)[p])))()}
    image, cells, tracks = nodes["0"], nodes["cells"], nodes["tracks"]
    assert [d.shape for d in image.data] == [(2, 2, 3, *SHAPE), (2, 2, 3, 32, 32)]
    np.testing.assert_array_equal(image.data[0][1, :, 2].compute(), varied_image(p, 1, 2, 2))
    assert [a.get("unit") for a in image.metadata["axes"]] == ["second", None, *UNITS[1:]]
    assert image.metadata["coordinateTransformations"][0][0]["scale"] == [30.0, 1.0, 1.5, 0.325, 0.325]
    assert image.metadata["channel_names"] == ["DAPI", "GFP"]

    assert [d.shape for d in cells.data] == [(2, 3, *SHAPE), (2, 3, 32, 32)]
    for t, z in [(0, 0), (1, 2)]:
        np.testing.assert_array_equal(cells.data[0][t, z].compute(), frame_labels(p, t, z))
        np.testing.assert_array_equal(cells.data[1][t, z].compute(), frame_labels(p, t, z)[::2, ::2])
    assert [a.get("unit") for a in cells.metadata["axes"]] == UNITS
    assert [ct[0]["scale"] for ct in cells.metadata["coordinateTransformations"]] == [
        SCALE,
        [30.0, 1.5, 0.65, 0.65],
    ]
    assert cells.metadata["color"] == {}  # no colours listed: the viewer's label colormap shows every cell
    # The track labels: the same cells numbered by track, same shapes and scales.
    assert [d.shape for d in tracks.data] == [d.shape for d in cells.data]
    for z in range(3):
        for frame in tracked(p, z):
            np.testing.assert_array_equal(tracks.data[0][frame.t, z].compute(), frame.track_labels)
            np.testing.assert_array_equal(tracks.data[1][frame.t, z].compute(), frame.track_labels[::2, ::2])
    assert tracks.metadata["coordinateTransformations"] == cells.metadata["coordinateTransformations"]
    assert tracks.metadata["color"] == {}


# -- ome-zarr-models -------------------------------------------------------------------------------


def test_ome_zarr_models_validate_every_group(store: Path) -> None:
    root = zarr.open_group(store, mode="r")
    plate = HCS.from_zarr(root)
    assert [w.path for w in plate.ome_attributes.plate.wells] == ["A/1", "A/2"]
    assert plate.n_wells == len(list(plate.well_groups)) == 2
    for path in positions(store):
        well = Well.from_zarr(root[str(path.parent.relative_to(store))])  # type: ignore[arg-type]
        assert [image.path for image in well.ome_attributes.well.images] == ["0"]
        group = root[str(path.relative_to(store))]
        image = Image.from_zarr(group)  # type: ignore[arg-type]
        assert [d.path for d in image.ome_attributes.multiscales[0].datasets] == ["0", "1"]
        labels = Labels.from_zarr(group["labels"])  # type: ignore[index, arg-type]
        assert labels.label_paths == ["cells", "tracks"]
        for name in labels.label_paths:
            image_label = ImageLabel.from_zarr(group[f"labels/{name}"]).ome_attributes.image_label  # type: ignore[index, arg-type]
            assert image_label is not None and image_label.colors is None
        omero = Omero.model_validate(attrs(path)["ome"]["omero"])
        assert [c.color for c in omero.channels] == list(COLORS)


# -- what napari shows -----------------------------------------------------------------------------


def test_metadata_napari_reads_shows_every_channel_and_cell(store: Path) -> None:
    """The properties napari-ome-zarr turns into layers, read from the metadata (no napari needed)."""
    for path in positions(store):
        ome = attrs(path)["ome"]
        # Layer names: napari-ome-zarr prefixes the multiscale's name when there is one.
        assert "name" not in ome["multiscales"][0]
        channels = ome["omero"]["channels"]
        assert [c["label"] for c in channels] == ["DAPI", "GFP"]
        assert [c["color"] for c in channels] == list(COLORS)
        for c, channel in enumerate(channels):
            data = pixels(c)
            start, end = channel["window"]["start"], channel["window"]["end"]
            # Within the data and tight around it (the issue: 0-65535 for data up to ~3,000).
            assert data.min() <= start <= np.percentile(data, 1)
            assert np.percentile(data, 99) <= end <= data.max() < 0.15 * 65535
        assert ome["multiscales"][0]["datasets"][0]["coordinateTransformations"] == [
            {"type": "scale", "scale": [30.0, 1.0, 1.5, 0.325, 0.325]}
        ]
        label = attrs(path / "labels" / "cells")["ome"]
        # No "colors" entry, so no label value is left transparent; ids are per frame, so a list
        # could never cover them all.
        assert "colors" not in label["image-label"] and "properties" not in label["image-label"]
        assert label["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == SCALE


def test_zarr_lists_the_whole_store_with_tracking_and_lineage(store: Path) -> None:
    """Every folder in the store is a Zarr node (the lineage's version folders too): listing it all
    raises no warning (warnings are errors in the tests)."""
    names = {name for name, _ in zarr.open_group(store, mode="r").members(max_depth=None)}
    for p in range(2):
        base = position_path(p, 2)
        assert {f"{base}/labels/tracks/0", f"{base}/cellsam/tracked/t000001_z0002"} <= names
        assert {f"cellsam/lineage/p{p:04d}_z0002.geff", f"cellsam/lineage/p{p:04d}_z0002.geff/nodes"} <= names


def test_positions_and_stage_coordinates_are_kept(store: Path) -> None:
    expected = [
        {"index": 0, "path": "A/1/0", "name": "B3 field 1", "x_um": 1250.5, "y_um": -310.25, "z_um": 42.0},
        {"index": 1, "path": "A/2/0", "name": "edge", "x_um": 9000.0, "y_um": 120.0, "z_um": None},
    ]
    assert attrs(store)["cellsam"]["positions"] == expected
    for path, position in zip(positions(store), expected, strict=True):
        assert attrs(path)["cellsam"]["position"] == position
    assert AcquisitionSpec.model_validate(attrs(store)["cellsam"]["spec"]) == SPEC


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # napari's own imports (pydantic v1 API)
def test_napari_plugin_loads_the_root_and_each_position(store: Path) -> None:
    napari_reader = pytest.importorskip("napari_ome_zarr._reader")
    components = pytest.importorskip("napari.components")
    windows = expected_windows()
    # The track labels napari shows at (t, z) = (1, 2): the root's wells side by side, or one position.
    track_rows = [np.concatenate([tracked(p, 2)[1].track_labels for p in range(2)], axis=-1)]
    track_rows += [tracked(p, 2)[1].track_labels for p in range(2)]
    for (path, width), track_row in zip(
        [(store, 128), *((p, 64) for p in positions(store))], track_rows, strict=True
    ):
        reader = napari_reader.napari_get_reader(str(path))
        assert reader is not None
        viewer = components.ViewerModel()  # headless: no window, no Qt
        for data, meta, kind in reader():
            getattr(viewer, f"add_{kind}")(data, **meta)  # what napari does with a reader's layers
        images = [layer for layer in viewer.layers if type(layer).__name__ == "Image"]
        # Both label images, in the order the labels group lists them: cells, then tracks.
        labels, tracks = [layer for layer in viewer.layers if type(layer).__name__ == "Labels"]
        # napari-ome-zarr >= 0.11 prefixes a default image name ("image: DAPI"); 0.10 does not.
        assert [layer.name.split(": ")[-1] for layer in images] == ["DAPI", "GFP"]
        for layer, color, (low, high) in zip(images, COLORS, windows, strict=True):
            assert list(layer.contrast_limits) == [low, high]
            assert np.allclose(
                layer.colormap.colors[-1][:3], [int(color[i : i + 2], 16) / 255 for i in (0, 2, 4)]
            )
            assert list(layer.scale) == SCALE and [str(u) for u in layer.units] == UNITS
            assert layer.data[0].shape == (2, 3, 64, width)
        assert list(labels.scale) == SCALE
        values = np.unique(np.asarray(labels.data[0][1, 2]))
        assert values[0] == 0 and len(values) > 2
        alpha = labels.colormap.map(values)[:, 3]
        assert alpha[0] == 0 and (alpha[1:] > 0).all()  # background transparent, every cell coloured
        assert list(tracks.scale) == SCALE and tracks.data[0].shape == (2, 3, 64, width)
        np.testing.assert_array_equal(np.asarray(tracks.data[0][1, 2]), track_row)
        values = np.unique(track_row)
        assert values[0] == 0 and len(values) > 2
        alpha = tracks.colormap.map(values)[:, 3]
        assert alpha[0] == 0 and (alpha[1:] > 0).all()  # every track coloured


# -- a projection store -----------------------------------------------------------------------------

#: The same acquisition under a projection z policy: every raw plane, one label plane per (t, p).
PROJECTION_SPECS = {
    "max": SPEC.model_copy(update={"acquisition": "projected", "z_policy": ZPolicy(policy="max_projection")}),
    "plane 2": SPEC.model_copy(
        update={"acquisition": "chosen", "z_policy": ZPolicy(policy="plane", plane=2)}
    ),
}
#: Where the label plane lies along z (scale, translation): across the whole stack, or on plane 2.
LABEL_Z = {"max": (4.5, 1.5), "plane 2": (1.5, 3.0)}


def z_stack(p: int, t: int) -> np.ndarray:
    """(C, Z, H, W): every plane of (t, p)."""
    return np.stack([varied_image(p, t, z, 2) for z in range(3)], axis=1)


@pytest.fixture(scope="module", params=list(PROJECTION_SPECS))
def projection_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    spec = PROJECTION_SPECS[request.param]
    sink = ZarrLabelSink(tmp_path_factory.mktemp("projection"))
    sink.open_acquisition(spec)
    for p in range(2):
        for t in range(2):
            sink.write(FrameId(spec.acquisition, p, t, 0), frame_labels(p, t, 0), z_stack(p, t))
    return request.param, sink.store_path(spec.acquisition)


def test_ome_zarr_reader_opens_a_projection_store(projection_store: tuple[str, Path]) -> None:
    name, store = projection_store
    scale, translation = LABEL_Z[name]
    (plate,) = list(Reader(parse_url(str(store)))())
    assert [d.shape for d in plate.data] == [(2, 2, 3, 64, 128), (2, 2, 3, 32, 64)]
    for p in range(2):
        nodes = {node.zarr.basename(): node for node in Reader(parse_url(str(store / position_path(p, 2))))()}
        image, cells = nodes["0"], nodes["cells"]
        assert [d.shape for d in image.data] == [(2, 2, 3, *SHAPE), (2, 2, 3, 32, 32)]
        np.testing.assert_array_equal(image.data[0][1].compute(), z_stack(p, 1))  # every raw plane
        assert [d.shape for d in cells.data] == [(2, 1, *SHAPE), (2, 1, 32, 32)]
        np.testing.assert_array_equal(cells.data[0][1, 0].compute(), frame_labels(p, 1, 0))
        assert [a["name"] for a in cells.metadata["axes"]] == ["t", "z", "y", "x"]
        assert cells.metadata["coordinateTransformations"][0] == [
            {"type": "scale", "scale": [30.0, scale, 0.325, 0.325]},
            {"type": "translation", "translation": [0.0, translation, 0.0, 0.0]},
        ]


def test_ome_zarr_models_validate_a_projection_store(projection_store: tuple[str, Path]) -> None:
    name, store = projection_store
    root = zarr.open_group(store, mode="r")
    assert HCS.from_zarr(root).n_wells == 2
    for p in range(2):
        group = root[position_path(p, 2)]
        Image.from_zarr(group)  # type: ignore[arg-type]
        assert Labels.from_zarr(group["labels"]).label_paths == ["cells", "tracks"]  # type: ignore[index, arg-type]
        label = ImageLabel.from_zarr(group["labels/cells"])  # type: ignore[index, arg-type]
        transforms = label.ome_attributes.multiscales[0].datasets[0].coordinateTransformations
        assert [t.type for t in transforms] == ["scale", "translation"]
    policy = attrs(store / position_path(0, 2) / "labels" / "cells")["cellsam"]["z_policy"]
    assert ZPolicy.model_validate(policy) == PROJECTION_SPECS[name].z_policy


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # napari's own imports (pydantic v1 API)
def test_napari_plugin_loads_a_projection_store(projection_store: tuple[str, Path]) -> None:
    napari_reader = pytest.importorskip("napari_ome_zarr._reader")
    components = pytest.importorskip("napari.components")
    name, store = projection_store
    for path, width in [(store, 128), (store / position_path(1, 2), 64)]:
        reader = napari_reader.napari_get_reader(str(path))
        assert reader is not None
        viewer = components.ViewerModel()
        for data, meta, kind in reader():
            getattr(viewer, f"add_{kind}")(data, **meta)
        images = [layer for layer in viewer.layers if type(layer).__name__ == "Image"]
        labels, tracks = [layer for layer in viewer.layers if type(layer).__name__ == "Labels"]
        assert [layer.name.split(": ")[-1] for layer in images] == ["DAPI", "GFP"]
        assert all(layer.data[0].shape == (2, 3, 64, width) for layer in images)
        assert tracks.data[0].shape == (2, 1, 64, width) and not np.asarray(tracks.data[0][1, 0]).any()
        # napari-ome-zarr takes each dataset's first transform (the scale) and no translation.
        assert labels.data[0].shape == (2, 1, 64, width)
        assert list(labels.scale) == [30.0, LABEL_Z[name][0], 0.325, 0.325]
        values = np.unique(np.asarray(labels.data[0][1, 0]))
        assert values[0] == 0 and len(values) > 1


# -- the display window ----------------------------------------------------------------------------


def _hot_pixels() -> np.ndarray:
    image = np.random.default_rng(0).integers(100, 201, (1, 512, 512)).astype(np.uint16)
    image[0, ::101, ::97] = 65535  # ~0.01 % saturated pixels: outside the window
    return image


def _big_frame() -> np.ndarray:
    rng = np.random.default_rng(1)
    return (
        rng.normal(300, 30, (2, 2048, 2048)).clip(0).astype(np.uint16)
        + np.array([0, 1000], np.uint16)[:, None, None]
    )


def _float_with_nan() -> np.ndarray:
    image = np.linspace(-1.0, 1.0, 2 * 64 * 64).reshape(2, 64, 64).astype(np.float32)
    image[0, 0, :5] = [np.nan, np.inf, -np.inf, np.nan, np.nan]
    image[1] = np.nan
    return image


class RangeCase(NamedTuple):
    name: str
    image: Any
    check: Any


RANGE_CASES = [
    RangeCase("hot pixels ignored", _hot_pixels, lambda r: 100 <= r[0][0] <= 101 and 199 <= r[0][1] <= 200),
    RangeCase("constant frame", lambda: np.full((1, 8, 8), 7, np.uint8), lambda r: r == [[7.0, 7.0]]),
    RangeCase(
        "2048^2 sampled close to exact",
        _big_frame,
        lambda r: abs(r[0][0] - 207) <= 3 and abs(r[0][1] - 393) <= 3 and abs(r[1][1] - 1393) <= 3,
    ),
    RangeCase(
        "float: non-finite ignored, all-NaN channel None",
        _float_with_nan,
        lambda r: -1.0 <= r[0][0] < -0.99 and -0.01 < r[0][1] < 0.0 and r[1] is None,
    ),
]


@pytest.mark.parametrize("case", RANGE_CASES, ids=[c.name for c in RANGE_CASES])
def test_frame_intensity_range(case: RangeCase) -> None:
    result = frame_intensity_range(case.image())
    assert case.check(result), result


def test_merging_ranges_is_order_free_and_idempotent() -> None:
    a: IntensityRange = [[10.0, 100.0], None]
    b: IntensityRange = [[5.0, 50.0], [1.0, 2.0]]
    assert merge_ranges(a, b) == merge_ranges(b, a) == [[5.0, 100.0], [1.0, 2.0]]
    assert merge_ranges(merge_ranges(a, b), b) == merge_ranges(a, b)
    assert merge_ranges(None, a) == a and merge_ranges(a, None) == a
    assert covers(merge_ranges(a, b), a) and covers(merge_ranges(a, b), b)
    assert not covers(a, b) and covers(None, [None, None]) and not covers(None, b)


def test_window_before_any_image_is_the_type_range_and_constant_frames_stay_valid() -> None:
    blank = omero_attrs(SPEC)["channels"][0]["window"]
    assert blank == {"min": 0.0, "max": 65535.0, "start": 0.0, "end": 65535.0}
    flat = omero_attrs(SPEC, [[0.0, 0.0], [65535.0, 65535.0]])["channels"]
    assert [(c["window"]["start"], c["window"]["end"]) for c in flat] == [(0.0, 1.0), (65534.0, 65535.0)]


def _window_spec(acquisition: str) -> AcquisitionSpec:
    return SPEC.model_copy(update={"acquisition": acquisition, "sizes": Sizes(t=None, p=2, z=3, c=2)})


def assert_windows_match_every_frame(sink: ZarrLabelSink, spec: AcquisitionSpec, frames: list[Any]) -> None:
    """The root's range is the merge of every frame's, and each position's omero is derived from it."""
    expected = functools.reduce(
        merge_ranges, (frame_intensity_range(varied_image(p, t, z, 2)) for p, t, z in frames), None
    )
    store = sink.store_path(spec.acquisition)
    assert attrs(store)["cellsam"]["intensity_range"] == expected
    for p in range(spec.sizes.p):
        assert attrs(store / position_path(p, spec.sizes.p))["ome"]["omero"] == omero_attrs(spec, expected)


def test_window_combines_frames_written_by_threads(tmp_path: Path) -> None:
    spec = _window_spec("threads")
    sink = ZarrLabelSink(tmp_path)
    sink.open_acquisition(spec)
    frames = [(p, t, z) for t in range(10) for p in range(2) for z in range(3)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda f: write_frame(sink, spec, f[0], f[1], f[2], image_fn=varied_image), frames))
    assert_windows_match_every_frame(sink, spec, frames)


def test_window_combines_frames_written_by_processes(tmp_path: Path) -> None:
    spec = _window_spec("processes")
    frames = [(p, t, z) for t in range(12) for p in range(2) for z in range(3)]
    shares = [frames[i::3] for i in range(3)]  # interleaved: every writer widens the window often
    procs = [
        SPAWN.Process(
            target=write_frames_worker,
            args=(str(tmp_path), spec.model_dump_json(), share),
            kwargs={"image_fn": varied_image},
        )
        for share in shares
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0, 0, 0]
    sink = ZarrLabelSink(tmp_path)
    sink.open_acquisition(spec)
    assert_windows_match_every_frame(sink, spec, frames)


def test_stale_position_windows_are_repaired_on_open(tmp_path: Path) -> None:
    spec = _window_spec("repair")
    sink = ZarrLabelSink(tmp_path)
    sink.open_acquisition(spec)
    write_frame(sink, spec, 0, 0, 0, image_fn=varied_image)
    # A writer killed after updating the root's range but before the positions' omero.
    stale = zarr.open_group(sink.store_path("repair") / position_path(1, 2), mode="r+")
    stale.attrs["ome"] = {**stale.attrs["ome"], "omero": omero_attrs(spec)}  # type: ignore[dict-item]
    ZarrLabelSink(tmp_path).open_acquisition(spec)  # a restart
    assert_windows_match_every_frame(sink, spec, [(0, 0, 0)])


def test_labels_only_frames_leave_the_window_alone(tmp_path: Path) -> None:
    spec = _window_spec("labels-only")
    sink = ZarrLabelSink(tmp_path)
    sink.open_acquisition(spec)
    sink.write(FrameId("labels-only", 0, 0, 0), frame_labels(0, 0, 0))
    assert attrs(sink.store_path("labels-only"))["cellsam"]["intensity_range"] is None


def test_bad_channel_colour_refused_before_anything_is_created(tmp_path: Path) -> None:
    spec = SPEC.model_copy(update={"acquisition": "bad-colour", "channel_colors": ("red", None)})
    with pytest.raises(ValueError, match=r"channel_colors\[0\] = 'red'"):
        ZarrLabelSink(tmp_path / "out").open_acquisition(spec)
    assert not (tmp_path / "out").exists()
