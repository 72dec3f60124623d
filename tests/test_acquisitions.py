"""Acquisitions as microscopes make them, end to end without Ray: pymmcore-plus's real MDA runner (a
pure-Python camera) → PymmcorePlusForwarder → FrameSender → FrameListener → StreamPipeline → OME-Zarr.

2 channels × 2 positions × 3 z planes × 3 time points, one frame per channel and plane, as Micro-Manager
sends them: every channel's pixels are stored byte for byte, labels once per (t, p, z), the declared plan
(channel names and roles, pixel size, z step, interval, positions with stage coordinates) reaches the
store, and the cell table holds each cell's intensity in both channels. Under the max-projection z policy
the same acquisition is segmented once per (t, p), every raw plane still stored.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import zarr

from acquisition.adapters import PymmcorePlusForwarder
from acquisition.client import FrameSender
from acquisition.frames import FrameId
from acquisition.listener import FrameListener
from acquisition.results import MemoryResultSink
from acquisition.zarr_sink import ZarrLabelSink, open_position
from cellsam_core.synthetic import synthetic_frame
from serving.assembly import model_input
from serving.config import ServiceConfig
from serving.pipeline import StreamPipeline
from tests.acq_util import python_camera_core
from tests.test_pipeline import FakeSegmenter

pytestmark = pytest.mark.timeout(120)

SHAPE = (48, 64)
PIXEL_SIZE = 0.65


def _camera_core(images: dict[int, np.ndarray]) -> Any:
    """A UniMMCore whose Python camera snaps synthetic cells (frame ``n`` is kept in ``images[n]``)."""

    def cells(buffer: np.ndarray, n: int) -> None:
        buffer[:] = synthetic_frame(SHAPE, seed=n, n_cells=6)[0]
        images[n] = buffer.copy()

    core = python_camera_core(SHAPE, cells)
    for name, exposure in (("DAPI", "10"), ("FITC", "20")):
        core.defineConfig("Channel", name, "Camera", "Exposure", exposure)
    # Micro-Manager's pixel-size calibration cannot reference a Python device, so the calibrated value
    # is given the way the core reports it.
    core.getPixelSizeUm = lambda *_: PIXEL_SIZE
    return core


class Run(NamedTuple):
    """What one MDA run left: the store, the results, the camera's images and the pipeline."""

    labels: ZarrLabelSink
    results: MemoryResultSink
    captured: dict[tuple[int, ...], np.ndarray]  # (t, p, c, z) -> the camera's image
    pipeline: StreamPipeline


def _run_mda(tmp_path: Path, **settings: Any) -> Run:
    """2 channels x 2 positions x 3 z planes x 3 time points through the listener and pipeline."""
    useq = pytest.importorskip("useq")
    images: dict[int, np.ndarray] = {}
    core = _camera_core(images)
    sequence = useq.MDASequence(
        time_plan={"interval": 0.01, "loops": 3},
        stage_positions=[
            useq.Position(x=100.0, y=200.0, z=5.0, name="A1"),
            useq.Position(x=-50.5, y=0.0, z=6.0),
        ],
        z_plan={"range": 3.0, "step": 1.5},
        channels=["DAPI", "FITC"],
        axis_order="tpcz",
    )
    captured: dict[tuple[int, ...], np.ndarray] = {}

    def keep(img: np.ndarray, event: Any, meta: Any) -> None:
        captured[tuple(int(event.index[a]) for a in "tpcz")] = np.array(img)

    core.mda.events.frameReady.connect(keep)
    config = ServiceConfig.model_validate(
        {"ingest": {"endpoint": "tcp://127.0.0.1:*", "max_concurrent": 2, "max_queued": 8}, **settings}
    )
    labels = ZarrLabelSink(tmp_path)
    results = MemoryResultSink()
    pipeline = StreamPipeline(
        source=FrameListener(endpoint=config.ingest.endpoint, max_queued=8),
        segmenter=FakeSegmenter(),
        labels=labels,
        results=results,
        config=config,
    )

    async def scenario() -> None:
        await pipeline.start()

        def acquire() -> None:
            with FrameSender(endpoint=pipeline.endpoints["ingest"], timeout=30) as sender:
                forwarder = PymmcorePlusForwarder(sender, acquisition="mda", core=core).connect(core.mda)
                core.mda.run(sequence)
                forwarder.disconnect()

        await asyncio.to_thread(acquire)
        while not results.summaries:
            await asyncio.sleep(0.01)
        await pipeline.stop()

    asyncio.run(asyncio.wait_for(scenario(), 100))
    assert len(captured) == 36 and len(images) == 36
    return Run(labels, results, captured, pipeline)


def test_a_multichannel_multiposition_z_stack_time_lapse_is_stored_faithfully(tmp_path: Path) -> None:
    labels, results, by_index, _ = _run_mda(tmp_path)
    (summary,) = results.summaries
    assert (summary.frames_received, summary.frames_ok, summary.frames_failed, summary.frames_rejected) == (
        36,
        36,
        0,
        0,
    )
    ok = [r for r in results.results if r.status == "ok"]
    assert len(ok) == 18 and all(r.index is not None and r.index.c is None for r in ok)

    # Every channel's pixels, byte for byte, in the plane and channel the event named.
    for t in range(3):
        for p in range(2):
            for z in range(3):
                frame_id = FrameId("mda", p, t, z)
                stored = labels.read_image(frame_id)
                assert stored is not None and stored.dtype == np.uint16 and stored.shape == (2, *SHAPE)
                for c in range(2):
                    np.testing.assert_array_equal(stored[c], by_index[(t, p, c, z)])
                # Labels once per plane, from the assembled two-channel frame.
                cells = labels.read_cells(frame_id)
                stored_labels = labels.read_labels(frame_id)
                assert stored_labels.shape == SHAPE and len(cells) == len(np.unique(stored_labels)) - 1 > 0
                for name, c in (("DAPI", 0), ("FITC", 1)):
                    mean = cells.measurements[f"intensity_mean_{name}"]
                    for row, label in enumerate(cells.label):
                        assert mean[row] == pytest.approx(
                            by_index[(t, p, c, z)][stored_labels == label].mean()
                        )
                np.testing.assert_allclose(cells.area_um2, cells.area * PIXEL_SIZE**2)

    # The declaration reached the store: the spec it was laid out with.
    root = zarr.open_group(labels.store_path("mda"), mode="r")
    spec = root.attrs["cellsam"]["spec"]
    assert spec["sizes"] == {"t": 3, "p": 2, "z": 3, "c": 2}
    assert spec["channel_names"] == ["DAPI", "FITC"]
    assert (spec["pixel_size_um"], spec["z_step_um"], spec["time_interval_s"]) == (PIXEL_SIZE, 1.5, 0.01)
    assert [(p["name"], p["x_um"], p["y_um"], p["z_um"]) for p in spec["positions"]] == [
        ("A1", 100.0, 200.0, 5.0),
        (None, -50.5, 0.0, 6.0),
    ]
    json.dumps(spec)


def test_a_max_projection_is_segmented_and_stored_once_per_time_point_and_position(tmp_path: Path) -> None:
    labels, results, captured, pipeline = _run_mda(tmp_path, z={"policy": "max_projection"})
    (summary,) = results.summaries
    assert (summary.frames_received, summary.frames_ok, summary.frames_failed, summary.frames_rejected) == (
        36,
        36,
        0,
        0,
    )
    # One result per (t, p), naming the whole stack.
    ok = [r for r in results.results if r.status == "ok"]
    assert sorted((r.index.t, r.index.p) for r in ok if r.index is not None) == [
        (t, p) for t in range(3) for p in range(2)
    ]
    assert all(r.index is not None and r.index.z is None and r.index.c is None for r in ok)

    declared = pipeline.ledger["mda"].declaration
    assert declared is not None and declared.channels is not None
    store = zarr.open_group(labels.store_path("mda"), mode="r")
    for p in range(2):
        position = open_position(labels.store_path("mda"), p)
        label_array = position["labels/cells/0"]
        image_array = position["0"]
        assert isinstance(label_array, zarr.Array) and isinstance(image_array, zarr.Array)
        assert label_array.shape == (3, 1, *SHAPE) and image_array.shape == (3, 2, 3, *SHAPE)
        for t in range(3):
            raw = np.stack([[captured[(t, p, c, z)] for z in range(3)] for c in range(2)])  # (C, Z, H, W)
            # Every plane of every channel, byte for byte, on disk.
            np.testing.assert_array_equal(image_array[t], raw)
            projection = np.moveaxis(raw.max(axis=1), 0, -1)  # (H, W, C)
            # The labels are those of segmenting the max projection directly.
            model_in = model_input(projection, declared.channels)
            expected = FakeSegmenter.cells_of(model_in.max(axis=-1) if model_in.ndim == 3 else model_in)
            np.testing.assert_array_equal(label_array[t, 0], expected.labels)
            frame_id = FrameId("mda", p, t, 0)
            cells = labels.read_cells(frame_id)
            assert len(cells) == expected.n_cells > 0
            for name, c in (("DAPI", 0), ("FITC", 1)):
                mean = cells.measurements[f"intensity_mean_{name}"]
                for row, label in enumerate(cells.label):
                    assert mean[row] == pytest.approx(projection[..., c][expected.labels == label].mean())
    spec = store.attrs["cellsam"]["spec"]  # type: ignore[index]
    assert spec["z_policy"] == {"policy": "max_projection", "plane": None}
    assert spec["sizes"] == {"t": 3, "p": 2, "z": 3, "c": 2}
