"""Microscope adapters: pymmcore-plus (its real MDA runner, a Python camera, no hardware) and pycromanager
(the hook called with the metadata layout pycromanager documents: ``metadata["Axes"]``)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from acquisition.adapters import PycromanagerForwarder, PymmcorePlusForwarder, json_safe
from acquisition.client import FrameSender
from acquisition.errors import AcquisitionError, SendTimeoutError
from acquisition.listener import FrameListener
from tests.acq_util import (
    ANY_PORT,
    books,
    dead_endpoint,
    events_until_end,
    next_frames,
    python_camera_core,
    run,
)

pytestmark = pytest.mark.timeout(60)


# -- pymmcore-plus -------------------------------------------------------------------------------


def _python_camera_core() -> Any:
    """Frame ``n`` is all ``n``: order and content can be checked on the other side."""

    def counter(buffer: np.ndarray, n: int) -> None:
        buffer[:] = n

    return python_camera_core((24, 32), counter)


def test_pymmcore_plus_mda_is_forwarded() -> None:
    useq = pytest.importorskip("useq")
    core = _python_camera_core()
    sequence = useq.MDASequence(
        time_plan={"interval": 0, "loops": 3},
        stage_positions=[useq.Position(name="A"), useq.Position(name="B")],
    )

    async def main() -> None:
        async with FrameListener(endpoint=ANY_PORT) as listener:
            with FrameSender(endpoint=listener.endpoint, timeout=5.0) as sender:
                forwarder = PymmcorePlusForwarder(sender, acquisition="mm1").connect(core.mda)
                await asyncio.to_thread(core.mda.run, sequence)
                forwarder.disconnect()
            state = books(await events_until_end(listener, "mm1"))["mm1"]
            frames = state.frames
            assert forwarder.frames_forwarded == 6 and forwarder.frames_skipped == 0
            assert [(f.index.t, f.index.p) for f in frames] == [(t, p) for t in range(3) for p in range(2)]
            assert [int(f.data[0, 0]) for f in frames] == list(range(6))
            assert frames[0].data.shape == (24, 32) and frames[0].data.dtype == np.uint16
            event = frames[3].header.metadata["mda_event"]
            assert event["index"] == {"t": 1, "p": 1}
            assert state.start is not None and (state.start.sizes.t, state.start.sizes.p) == (3, 2)
            assert state.frames_declared == 6 and not state.rejected

    run(main())


def test_pymmcore_plus_handler_maps_event_axes() -> None:
    useq = pytest.importorskip("useq")
    # Connected by hand (no sequenceStarted): the event's own sequence declares the plan.
    sequence = useq.MDASequence(
        time_plan={"interval": 0, "loops": 5},
        stage_positions=[(0, 0, 0), (1, 1, 1), (100.0, 200.0, 3.5)],
        z_plan={"range": 2, "step": 1},
        channels=["DAPI", "GFP"],
        grid_plan={"rows": 1, "columns": 4},
    )
    event = useq.MDAEvent(
        index={"t": 4, "p": 2, "z": 1, "c": 1, "g": 3},
        channel={"config": "GFP"},
        exposure=20,
        x_pos=100.0,
        y_pos=200.0,
        z_pos=3.5,
        sequence=sequence,
    )

    async def main() -> None:
        async with FrameListener(endpoint=ANY_PORT) as listener:
            with FrameSender(endpoint=listener.endpoint) as sender:
                handler = PymmcorePlusForwarder(sender, acquisition="direct")
                handler(np.ones((8, 8), np.uint8), event, {"camera_device": "Cam", "exposure_ms": 20.0})
            (frame,) = await next_frames(listener, 1)
            assert (frame.index.t, frame.index.p, frame.index.z, frame.index.c) == (4, 2, 1, 1)
            meta = frame.header.metadata
            assert meta["extra_axes"] == {"g": 3}
            assert meta["channel"] == "GFP"
            assert meta["frame_meta"] == {"camera_device": "Cam", "exposure_ms": 20.0}
            assert meta["mda_event"]["exposure"] == 20
            assert meta["stage_um"] == {"x": 100.0, "y": 200.0, "z": 3.5}
            declared = frame.declaration
            assert declared is not None and declared.sizes.c == 2 and declared.z_step_um == 1.0
            assert declared.channels is not None and declared.channels.names == ("DAPI", "GFP")
            assert declared.channels.roles == ("nuclear", "whole_cell")
            assert declared.positions[2].x_um == 100.0 and declared.time_interval_s is None

    run(main())


def test_pymmcore_plus_handler_skips_frames_on_timeout() -> None:
    useq = pytest.importorskip("useq")
    with dead_endpoint() as nowhere, FrameSender(endpoint=nowhere, timeout=0, sndhwm=1, linger=0) as sender:
        handler = PymmcorePlusForwarder(sender, acquisition="slow")
        for t in range(10):
            handler(np.zeros((4, 4), np.uint8), useq.MDAEvent(index={"t": t}), {})
        assert handler.frames_skipped > 0
        assert handler.frames_forwarded + handler.frames_skipped == 10
        strict = PymmcorePlusForwarder(sender, acquisition="slow", raise_on_timeout=True)
        with pytest.raises(SendTimeoutError):
            strict(np.zeros((4, 4), np.uint8), useq.MDAEvent(index={"t": 0}), {})


# -- pycromanager --------------------------------------------------------------------------------


def pycro_metadata(t: int, p: int, z: int, channel: str) -> dict[str, Any]:
    # The layout pycromanager documents for image processors: "Axes" plus Micro-Manager tags.
    return {
        "Axes": {"time": t, "position": p, "z": z, "channel": channel},
        "Width": "6",
        "Height": "4",
        "PixelType": "GRAY16",
        "Exposure-ms": 10.0,
        "Camera": "Camera",
    }


def test_pycromanager_hook_forwards_and_returns_unchanged() -> None:
    async def main() -> None:
        async with FrameListener(endpoint=ANY_PORT) as listener:
            with FrameSender(endpoint=listener.endpoint) as sender:
                hook = PycromanagerForwarder(
                    sender, acquisition="pycro", channels=["DAPI", "FITC"], sizes={"z": 2}
                )
                calls = [(t, 0, z, ch) for t in range(2) for z in range(2) for ch in ("DAPI", "FITC")]
                for i, (t, p, z, ch) in enumerate(calls):
                    image = np.full((4, 6), i, np.uint16)
                    metadata = pycro_metadata(t, p, z, ch)
                    out_image, out_meta = hook(image, metadata)
                    assert out_image is image and out_meta is metadata
                    assert out_meta == pycro_metadata(t, p, z, ch)
                hook.finish()
            state = books(await events_until_end(listener, "pycro"))["pycro"]
            frames = state.frames
            assert [(f.index.t, f.index.p, f.index.z, f.index.c) for f in frames] == [
                (t, p, z, {"DAPI": 0, "FITC": 1}[ch]) for t, p, z, ch in calls
            ]
            assert [int(f.data[0, 0]) for f in frames] == list(range(len(calls)))
            assert frames[1].header.metadata["channel"] == "FITC"
            assert frames[1].header.metadata["pycromanager"]["Exposure-ms"] == 10.0
            assert state.frames_declared == len(frames) == len(calls)
            assert state.start is not None and state.start.sizes.c == 2 and not state.rejected
            assert state.start.channels is not None and state.start.channels.nuclear_channel == 0

    run(main())


def test_pycromanager_hook_never_raises_on_timeout_by_default() -> None:
    with dead_endpoint() as nowhere, FrameSender(endpoint=nowhere, timeout=0, sndhwm=1, linger=0) as sender:
        hook = PycromanagerForwarder(sender, acquisition="p")
        image = np.zeros((4, 4), np.uint8)
        for t in range(10):
            assert hook(image, {"Axes": {"time": t}})[0] is image
        assert hook.frames_skipped > 0


def test_pycromanager_finish_without_images() -> None:
    with (
        dead_endpoint() as nowhere,
        FrameSender(endpoint=nowhere, linger=0) as sender,
        pytest.raises(AcquisitionError),
    ):
        PycromanagerForwarder(sender, acquisition="p").finish()


def test_json_safe() -> None:
    import enum

    class Axis(str, enum.Enum):
        T = "t"

    out = json_safe(
        {Axis.T: np.int64(3), "f": np.float32(0.5), "nan": float("nan"), "arr": np.arange(3), "o": object}
    )
    assert out["t"] == 3 and out["f"] == 0.5 and out["nan"] is None and out["arr"] == [0, 1, 2]
    assert isinstance(out["o"], str)
