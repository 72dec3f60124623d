"""``cellsam-stream track STORE``: re-tracking a stored acquisition offline (`acquisition.retrack`).

The store holds a simulated tracked movie's ground-truth labels as its frames' labels (written through
`ZarrLabelSink.write`); the command's result is compared with the linker run directly on the same labels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import geff
import numpy as np
import pytest

from acquisition.frames import FrameId
from acquisition.lineage import read_lineage
from acquisition.retrack import retrack_store, split_store_path
from acquisition.sim_tracks import TrackedMovie
from acquisition.sink_errors import InvalidIdentifierError
from acquisition.spec import AcquisitionSpec, Sizes
from acquisition.zarr_layout import lineage_path
from acquisition.zarr_sink import ZarrLabelSink
from cellsam_core.cells import CellTable
from cellsam_core.lineage import lineage_graph
from cellsam_core.tracking import OnlineTracker, TrackedFrame, TrackerConfig, track_sequence
from serving.cli import main
from tests.test_sink_conformance import assert_same_lineage

N_FRAMES = 12
SHAPE = (128, 128)
#: Position 1 has no frame at this t: the linker links across it.
MISSING_T = 5
#: At this t a cell of position 0 goes undetected for one frame: gap closing decides whether it keeps
#: its track.
DROPPED_T = 6
SPEC = AcquisitionSpec(
    acquisition="movie",
    sizes=Sizes(t=N_FRAMES, p=2, z=1, c=1),
    frame_shape=SHAPE,
    pixel_size_um=0.65,
    time_interval_s=60.0,
)


def movie_labels(p: int) -> dict[int, np.ndarray]:
    """Position p's stored labels by t: the ground truth, with one cell dropped at `DROPPED_T` (p = 0)
    and the frame at `MISSING_T` missing (p = 1)."""
    movie = TrackedMovie(SHAPE, N_FRAMES, seed=10 + p, n_cells=12)
    labels = {t: movie.labels(t).copy() for t in range(N_FRAMES)}
    if p == 0:
        frame = labels[DROPPED_T]
        frame[frame == np.unique(frame)[1]] = 0  # the lowest cell id, present before and after
    else:
        del labels[MISSING_T]
    return labels


def expected(p: int, config: TrackerConfig) -> list[TrackedFrame]:
    """What the linker gives on position p's labels directly."""
    labels = movie_labels(p)
    if MISSING_T not in labels:
        tracker = OnlineTracker(config)
        frames: list[TrackedFrame] = []
        for t in range(N_FRAMES):
            frames += tracker.skip(t) if t not in labels else tracker.offer(t, labels[t])
        return frames
    return list(track_sequence([labels[t] for t in range(N_FRAMES)], config))


@pytest.fixture
def store(tmp_path: Path) -> Path:
    sink = ZarrLabelSink(tmp_path)
    sink.open_acquisition(SPEC)
    for p in range(2):
        for t, labels in movie_labels(p).items():
            sink.write(FrameId(SPEC.acquisition, p, t, 0), labels)  # cells measured from the labels
    return sink.store_path(SPEC.acquisition)


def assert_store_holds(store: Path, config: TrackerConfig, positions: tuple[int, ...] = (0, 1)) -> None:
    sink = ZarrLabelSink(store.parent)
    sink.attach(SPEC.acquisition)
    for p in positions:
        frames = expected(p, config)
        assert len(frames) == len(movie_labels(p))
        for frame in frames:
            frame_id = FrameId(SPEC.acquisition, p, frame.t, 0)
            np.testing.assert_array_equal(sink.read_tracks(frame_id), frame.track_labels)
            cells = sink.read_cells(frame_id)
            measured = CellTable.from_labels(movie_labels(p)[frame.t], pixel_size_um=SPEC.pixel_size_um)
            assert cells.equals(frame.cells.with_pixel_size(SPEC.pixel_size_um))
            assert len(cells) == len(measured)
        state = sink.tracker_state(SPEC.acquisition, p, 0)
        assert state is not None and state["last_t"] == N_FRAMES - 1
        assert state["next_track_id"] == max(int(f.track_ids.max(initial=0)) for f in frames) + 1
        lineage = sink.read_lineage(SPEC.acquisition, p, 0)
        assert lineage is not None
        assert_same_lineage(lineage, lineage_graph(frames))


def test_track_command_matches_the_linker_run_directly(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["track", str(store)]) == 0
    out = capsys.readouterr()
    assert "movie: 23 frames of 2 position/plane series re-tracked" in out.out
    assert "1 missing time point linked across" in out.out
    assert "track" in out.err  # the progress bar
    assert_store_holds(store, TrackerConfig())
    # The lineage is a GEFF that geff reads (physical units), at the documented path.
    path = store / lineage_path(0, 0)
    assert path == store / "cellsam/lineage/p0000_z0000.geff"
    graph, metadata = read_lineage(path)
    direct, _ = geff.read(os.path.realpath(path))
    assert (
        graph.number_of_nodes()
        == direct.number_of_nodes()
        == lineage_graph(expected(0, TrackerConfig())).number_of_nodes()
    )
    assert metadata.track_node_props == {"tracklet": "track_id", "lineage": "lineage_id"}
    assert max(d["t"] for _, d in graph.nodes(data=True)) == (N_FRAMES - 1) * 60.0


def test_another_configuration_replaces_the_tracking(store: Path, tmp_path: Path) -> None:
    assert main(["track", str(store), "--no-progress"]) == 0
    sink = ZarrLabelSink(store.parent)
    sink.attach(SPEC.acquisition)
    after = FrameId(SPEC.acquisition, 0, DROPPED_T + 1, 0)
    before = sink.read_tracks(after)

    assert main(["track", str(store), "--no-progress", "--gap-frames", "0"]) == 0
    assert not np.array_equal(sink.read_tracks(after), before)  # the dropped cell now starts a new track
    assert_store_holds(store, TrackerConfig(gap_frames=0))

    config = tmp_path / "tracker.yaml"
    config.write_text("gap_frames: 0\nmax_distance: 20\ndivisions: true\n")
    args = [
        "track",
        str(store),
        "--no-progress",
        "--config",
        str(config),
        "--gap-frames",
        "3",
        "--no-divisions",
    ]
    assert main(args) == 0  # the flags win over the file
    assert_store_holds(store, TrackerConfig(gap_frames=3, max_distance=20, divisions=False))


def test_only_the_given_positions_are_re_tracked(store: Path) -> None:
    assert main(["track", str(store), "--no-progress"]) == 0
    assert main(["track", str(store), "--no-progress", "--gap-frames", "0", "--positions", "1"]) == 0
    assert_store_holds(store, TrackerConfig(), positions=(0,))
    assert_store_holds(store, TrackerConfig(gap_frames=0), positions=(1,))


def test_a_store_open_in_another_sink_keeps_working(store: Path) -> None:
    live = ZarrLabelSink(store.parent)
    live.open_acquisition(SPEC)  # a service holding the store open
    summary = retrack_store(store, TrackerConfig())
    assert (summary.planes, summary.frames, summary.skipped) == (2, 23, 1)
    assert summary.tracks > 0 and summary.divisions >= 0
    frame_id = FrameId(SPEC.acquisition, 1, 3, 0)
    np.testing.assert_array_equal(live.read_tracks(frame_id), expected(1, TrackerConfig())[3].track_labels)
    # It writes on: the missing frame, then its tracking, continuing from the stored state.
    live.write(FrameId(SPEC.acquisition, 1, MISSING_T, 0), np.zeros(SHAPE, np.uint16))
    assert not live.is_tracked(FrameId(SPEC.acquisition, 1, MISSING_T, 0))
    state = live.tracker_state(SPEC.acquisition, 1, 0)
    assert state is not None and OnlineTracker.resume(TrackerConfig(), state).next_t == N_FRAMES
    live.close_acquisition(SPEC.acquisition)
    assert retrack_store(store).frames == 24  # a closed store re-tracks and stays closed
    assert live.progress(SPEC.acquisition).closed and len(live.progress(SPEC.acquisition).tracked) == 24


class Usage(NamedTuple):
    name: str
    args: list[str]
    code: int
    message: str


USAGE = [
    Usage("no such store", ["track", "{tmp}/gone.ome.zarr"], 1, "no store of acquisition 'gone'"),
    Usage("not a store path", ["track", "{tmp}"], 2, "is not a label store path"),
    Usage("no acquisition id", ["track", "{tmp}/.ome.zarr"], 2, "is not a label store path"),
    Usage("bad acquisition id", ["track", "{tmp}/a b.ome.zarr"], 2, "'a b'"),
    Usage("position out of range", ["track", "{store}", "--positions", "2"], 2, "positions [2] are not in"),
    Usage("bad setting", ["track", "{store}", "--max-distance", "-1"], 2, "max_distance"),
    Usage("no such config", ["track", "{store}", "--config", "{tmp}/none.yaml"], 1, "does not exist"),
    Usage("config not YAML", ["track", "{store}", "--config", "{tmp}/bad.yaml"], 2, "not valid YAML"),
    Usage(
        "config not a mapping", ["track", "{store}", "--config", "{tmp}/list.yaml"], 2, "expected a mapping"
    ),
    Usage("unknown setting", ["track", "{store}", "--config", "{tmp}/unknown.yaml"], 2, "speed"),
]


@pytest.mark.parametrize("case", USAGE, ids=[c.name for c in USAGE])
def test_failures_exit_with_a_message(
    case: Usage, store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.yaml").write_text("gap_frames: [1\n")
    (tmp_path / "list.yaml").write_text("- 1\n")
    (tmp_path / "unknown.yaml").write_text("speed: 3\n")
    args = [a.format(tmp=tmp_path, store=store) for a in case.args]
    assert main([*args, "--no-progress"]) == case.code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and case.message in err
    sink = ZarrLabelSink(store.parent)
    sink.attach(SPEC.acquisition)
    assert sink.progress(SPEC.acquisition).tracked == ()  # nothing was tracked


def test_split_store_path() -> None:
    assert split_store_path("/data/out/exp-1.ome.zarr") == (Path("/data/out"), "exp-1")
    with pytest.raises(InvalidIdentifierError):
        split_store_path("/data/out/exp-1.zarr")


def test_track_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["track", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--max-distance", "--gap-frames", "--no-divisions", "--positions"):
        assert flag in out
