"""SimulatedMicroscope: synthetic and file sources played through real sockets into a FrameListener."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from acquisition.client import FrameSender
from acquisition.errors import SourceError
from acquisition.listener import FrameListener
from acquisition.simulate_command import main
from acquisition.simulator import ArraySource, SimulatedMicroscope, SyntheticSource
from tests.acq_util import ANY_PORT, Books, books, events_until_end

pytestmark = pytest.mark.timeout(60)


def play(run_microscope: Any, acquisition: str) -> Books:
    """Start a listener, run ``run_microscope(endpoint)`` in a thread, and return what a consumer knows
    of ``acquisition`` once its ``end`` arrived (its declaration, frames and end)."""

    async def go() -> Books:
        async with FrameListener(endpoint=ANY_PORT, max_queued=4) as listener:
            task = asyncio.create_task(asyncio.to_thread(run_microscope, listener.endpoint))
            events = await events_until_end(listener, acquisition)
            await task
            return books(events)[acquisition]

    async def bounded() -> Books:
        return await asyncio.wait_for(go(), 30)

    return asyncio.run(bounded())


def test_synthetic_source_is_deterministic_with_ground_truth() -> None:
    a = SyntheticSource(shape=(32, 40), frames=2, positions=2, z=1, seed=5, n_cells=4)
    b = SyntheticSource(shape=(32, 40), frames=2, positions=2, z=1, seed=5, n_cells=4)
    assert a.sizes == (2, 2, 1)
    np.testing.assert_array_equal(a.image(1, 1, 0), b.image(1, 1, 0))
    assert not np.array_equal(a.image(1, 0, 0), a.image(1, 1, 0))  # positions differ
    assert a.labels(1, 1, 0).shape == (32, 40) and a.labels(1, 1, 0).max() > 0
    with pytest.raises(SourceError):
        SyntheticSource(frames=0)


def test_two_channel_mode_sends_one_frame_per_channel_and_declares_the_plan() -> None:
    source = SyntheticSource(
        shape=(24, 32), frames=2, positions=2, seed=3, n_cells=4, modality="multiplexed", time_interval_s=30.0
    )

    def microscope(endpoint: str) -> None:
        with FrameSender(endpoint=endpoint, timeout=10) as sender:
            report = SimulatedMicroscope(
                sender=sender, source=source, acquisition="two", per_channel=True
            ).run()
            assert report.frames_sent == 8

    state = play(microscope, "two")
    assert [(f.index.t, f.index.p, f.index.c) for f in state.frames] == [
        (t, p, c) for t in range(2) for p in range(2) for c in range(2)
    ]
    for frame in state.frames:
        assert frame.data.shape == (24, 32)
        t, p, c = frame.index.t, frame.index.p, frame.index.c
        np.testing.assert_array_equal(frame.data, source.image(t, p, 0)[..., c])
    start = state.start
    assert start is not None and start.sizes.c == 2 and (start.sizes.t, start.sizes.p) == (2, 2)
    assert start.channels is not None and start.channels.names == ("H2B", "membrane")
    assert (start.channels.nuclear_channel, start.channels.whole_cell_channel) == (0, 1)
    assert (start.pixel_size_um, start.time_interval_s, start.z_step_um) == (0.65, 30.0, None)
    assert not state.rejected


def test_simulator_plays_t_then_p_then_z() -> None:
    source = SyntheticSource(shape=(16, 16), frames=3, positions=2, z=2, seed=1, n_cells=3)

    def microscope(endpoint: str) -> None:
        with FrameSender(endpoint=endpoint, timeout=10) as sender:
            report = SimulatedMicroscope(sender=sender, source=source, acquisition="sim", fps=500.0).run()
            assert report.frames_sent == 12

    state = play(microscope, "sim")
    order = [(f.index.t, f.index.p, f.index.z) for f in state.frames]
    assert order == [(t, p, z) for t in range(3) for p in range(2) for z in range(2)]
    for f in state.frames:
        np.testing.assert_array_equal(f.data, source.image(f.index.t, f.index.p, f.index.z))
    assert state.start is not None
    assert state.start.sizes.model_dump() == {"t": 3, "p": 2, "z": 2, "c": None}
    assert state.frames_declared == 12 and len(state.frames) == 12
    assert not state.rejected and not state.dropped


@pytest.mark.parametrize(
    ("suffix", "axes", "shape", "expect_sizes"),
    [
        (".npy", None, (3, 8, 10), (3, 1, 1)),  # TYX by default
        (".tif", None, (2, 3, 8, 10), (2, 3, 1)),  # TPYX by default
        (".zarr", "TYXC", (2, 8, 10, 2), (2, 1, 1)),
        (".npy", "YXT", (8, 10, 3), (3, 1, 1)),  # axes in another order
    ],
)
def test_array_sources_from_files(
    tmp_path: Path, suffix: str, axes: str | None, shape: tuple[int, ...], expect_sizes: tuple[int, int, int]
) -> None:
    data = np.arange(int(np.prod(shape)), dtype=np.uint16).reshape(shape)
    path = tmp_path / f"movie{suffix}"
    if suffix == ".npy":
        np.save(path, data)
    elif suffix == ".tif":
        import tifffile

        tifffile.imwrite(path, data, photometric="minisblack")
    else:
        import zarr

        zarr.create_array(store=str(path), data=data)
    source = ArraySource.from_path(path, axes=axes)
    assert source.sizes == expect_sizes
    letters = axes or {3: "TYX", 4: "TPYX"}[len(shape)]
    for t in range(expect_sizes[0]):
        for p in range(expect_sizes[1]):
            index = tuple(t if a == "T" else p if a == "P" else slice(None) for a in letters)
            expected = data[index]
            remaining = [a for a in letters if a in "YXC"]
            expected = np.transpose(expected, [remaining.index(a) for a in "YXC" if a in remaining])
            np.testing.assert_array_equal(source.image(t, p, 0), expected)
            assert source.image(t, p, 0).flags.c_contiguous


def test_array_source_replicates_positions_and_limits_frames() -> None:
    source = ArraySource(np.zeros((5, 4, 4), np.uint8), positions=3, frames=2)
    assert source.sizes == (2, 3, 1)
    assert source.image(1, 2, 0).shape == (4, 4)


@pytest.mark.parametrize(
    ("array", "axes", "match"),
    [
        (np.zeros((4, 4)), "TYX", "do not describe"),
        (np.zeros((4, 4, 2)), "TTX", "do not describe"),
        (np.zeros((4, 4, 2)), "TYQ", "do not describe"),
        (np.zeros((4, 4, 2)), "TPY", "need both"),
    ],
)
def test_array_source_rejects_bad_axes(array: np.ndarray, axes: str, match: str) -> None:
    with pytest.raises(SourceError, match=match):
        ArraySource(array, axes=axes)


def test_from_path_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        ArraySource.from_path(tmp_path / "missing.tif")
    other = tmp_path / "movie.avi"
    other.write_bytes(b"x")
    with pytest.raises(SourceError, match="unsupported"):
        ArraySource.from_path(other)


def test_fps_must_be_positive() -> None:
    source = SyntheticSource(shape=(16, 16), frames=1)
    with pytest.raises(SourceError):
        SimulatedMicroscope(sender=None, source=source, fps=0)  # type: ignore[arg-type]


def test_command_line_entry_point(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    np.save(tmp_path / "m.npy", np.ones((2, 8, 8), np.uint16))

    def synthetic(endpoint: str) -> None:
        argv = ["--to", endpoint, "--frames", "2", "--positions", "2", "--shape", "16", "24"]
        assert main([*argv, "--dtype", "uint8", "--acquisition", "cli", "--no-progress"]) == 0

    def tracked(endpoint: str) -> None:
        argv = ["--to", endpoint, "--frames", "3", "--positions", "2", "--shape", "64", "64", "--cells", "4"]
        assert main([*argv, "--tracks", str(tmp_path / "gt"), "--acquisition", "gt", "--no-progress"]) == 0

    state = play(tracked, "gt")
    assert len(state.frames) == 6
    for p in (0, 1):
        lines = (tmp_path / "gt" / f"p{p}" / "man_track.txt").read_text().splitlines()
        assert lines and all(len(line.split()) == 4 for line in lines)
        assert (tmp_path / "gt" / f"p{p}" / "man_track002.tif").exists()
    assert main(["--source", str(tmp_path / "m.npy"), "--tracks", str(tmp_path / "x")]) == 2

    state = play(synthetic, "cli")
    assert len(state.frames) == 4
    assert {f.data.shape for f in state.frames} == {(16, 24)}
    assert {f.data.dtype for f in state.frames} == {np.dtype(np.uint8)}
    assert "sent 4 frames" in capsys.readouterr().out

    def from_file(endpoint: str) -> None:
        argv = ["--to", endpoint, "--source", str(tmp_path / "m.npy"), "--acquisition", "file"]
        assert main([*argv, "--no-progress"]) == 0

    state = play(from_file, "file")
    assert state.frames_declared == 2 and len(state.frames) == 2 and state.frames[0].data.shape == (8, 8)
