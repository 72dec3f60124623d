"""Simulated movies with known tracks, and the Cell Tracking Challenge format they are written in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from acquisition.ctc import CtcTrack, read_ctc, to_ctc, write_ctc
from acquisition.errors import SourceError, TrackFileError
from acquisition.sim_tracks import TrackedMovie
from acquisition.simulator import SyntheticSource


def frame(*cells: tuple[int, int]) -> np.ndarray:
    """A 4x8 label image with value v in column c for each (v, c)."""
    out = np.zeros((4, 8), np.int32)
    for value, col in cells:
        out[:, col] = value
    return out


@dataclass(frozen=True)
class CtcCase:
    name: str
    frames: list[np.ndarray]
    parents: dict[int, int]
    tracks: list[CtcTrack]
    relabelled: dict[int, int]  # frame -> the label expected in column 0 after relabelling


CTC_CASES = [
    CtcCase("one track", [frame((1, 0))] * 3, {}, [CtcTrack(1, 0, 2, 0)], {2: 1}),
    CtcCase(
        "a gap splits a track; the later run's parent is the earlier run",
        [frame((2, 0)), frame(), frame((2, 0))],
        {},
        [CtcTrack(2, 0, 0, 0), CtcTrack(3, 2, 2, 2)],
        {0: 2, 2: 3},
    ),
    CtcCase(
        "division",
        [frame((1, 0)), frame((2, 0), (3, 5)), frame((2, 0), (3, 5))],
        {2: 1, 3: 1},
        [CtcTrack(1, 0, 0, 0), CtcTrack(2, 1, 2, 1), CtcTrack(3, 1, 2, 1)],
        {0: 1, 1: 2},
    ),
    CtcCase(
        "a daughter's parent is the parent track's last run",
        [frame((1, 0)), frame(), frame((1, 0)), frame((5, 0), (6, 3))],
        {5: 1, 6: 1},
        [CtcTrack(1, 0, 0, 0), CtcTrack(5, 3, 3, 7), CtcTrack(6, 3, 3, 7), CtcTrack(7, 2, 2, 1)],
        {2: 7, 3: 5},
    ),
]


@pytest.mark.parametrize("case", CTC_CASES, ids=[c.name for c in CTC_CASES])
def test_to_ctc(case: CtcCase, tmp_path: Path) -> None:
    frames, tracks = to_ctc(case.frames, case.parents)
    assert tracks == case.tracks
    for t, label in case.relabelled.items():
        assert int(frames[t][0, 0]) == label
    write_ctc(tmp_path, frames, tracks, kind="res")
    assert (tmp_path / "res_track.txt").exists() and (tmp_path / "mask000.tif").exists()
    back_frames, back_tracks = read_ctc(tmp_path)
    assert back_tracks == tracks
    assert all(np.array_equal(a, b) for a, b in zip(back_frames, frames, strict=True))


def test_write_ctc_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(TrackFileError, match="unknown parent"):
        write_ctc(tmp_path, [frame((1, 0))], [CtcTrack(1, 0, 0, 4)])
    with pytest.raises(TrackFileError, match="2-D"):
        write_ctc(tmp_path, [np.zeros((2, 2, 2))], [])
    with pytest.raises(TrackFileError, match="man_track"):
        read_ctc(tmp_path / "nothing")


@pytest.fixture(scope="module")
def movie() -> TrackedMovie:
    return TrackedMovie((192, 192), 30, seed=11, n_cells=20, entry_rate=0.6, growth=0.05)


def test_ground_truth_is_consistent_ctc(movie: TrackedMovie) -> None:
    present = [set(np.unique(movie.labels(t)).tolist()) - {0} for t in range(len(movie))]
    labels = {tr.label for tr in movie.tracks}
    assert set().union(*present) == labels
    for tr in movie.tracks:
        frames_with = [t for t, ids in enumerate(present) if tr.label in ids]
        assert frames_with == list(range(tr.begin, tr.end + 1)), tr
        if tr.parent:
            parent = next(p for p in movie.tracks if p.label == tr.parent)
            assert parent.end < tr.begin


def test_movie_has_motion_divisions_entries_and_exits(movie: TrackedMovie) -> None:
    last = len(movie) - 1
    with_children = {tr.parent for tr in movie.tracks if tr.parent}
    entered = [tr for tr in movie.tracks if tr.begin > 0 and not tr.parent]
    left = [tr for tr in movie.tracks if tr.end < last and tr.label not in with_children]
    assert len(movie.divisions) >= 5 and entered and left
    for parent, daughters in movie.divisions.items():
        assert all(movie.parents[d] == parent for d in daughters)
    # Cells move: a track's centroid changes between its first and last frame.
    tr = max(movie.tracks, key=lambda x: x.end - x.begin)
    first = np.argwhere(movie.labels(tr.begin) == tr.label).mean(axis=0)
    final = np.argwhere(movie.labels(tr.end) == tr.label).mean(axis=0)
    assert np.hypot(*(final - first)) > 3.0


def test_movie_is_reproducible_and_renders_like_synthetic(movie: TrackedMovie) -> None:
    again = TrackedMovie((192, 192), 30, seed=11, n_cells=20, entry_rate=0.6, growth=0.05)
    image, labels = movie[7]
    image2, labels2 = again[7]
    assert np.array_equal(image, image2) and np.array_equal(labels, labels2)
    assert again.tracks == movie.tracks
    assert image.dtype == np.uint16 and image.shape == (192, 192) and labels.dtype == np.uint32
    inside, outside = image[labels > 0].mean(), image[labels == 0].mean()
    assert inside > outside + 50  # bright nuclei, as the nuclear modality of SyntheticMovie


def test_movie_writes_ctc_ground_truth(movie: TrackedMovie, tmp_path: Path) -> None:
    movie.write_ctc(tmp_path)
    lines = (tmp_path / "man_track.txt").read_text().splitlines()
    assert len(lines) == len(movie.tracks) and (tmp_path / f"man_track{len(movie) - 1:03d}.tif").exists()
    frames, tracks = read_ctc(tmp_path)
    assert tracks == movie.tracks
    assert all(np.array_equal(frames[t], movie.labels(t)) for t in range(len(movie)))


def test_ground_truth_passes_traccuracy_checks(movie: TrackedMovie, tmp_path: Path) -> None:
    pytest.importorskip("traccuracy")
    from traccuracy.loaders import load_ctc_data

    movie.write_ctc(tmp_path)
    graph = load_ctc_data(str(tmp_path), run_checks=True)
    divisions = [n for n in graph.graph.nodes if graph.graph.out_degree(n) == 2]
    assert len(divisions) == len(movie.divisions)


def test_synthetic_source_plays_tracked_movies(tmp_path: Path) -> None:
    source = SyntheticSource(shape=(96, 96), frames=4, positions=2, n_cells=6, tracked=True)
    assert source.sizes == (4, 2, 1)
    tracks = source.tracks(1)
    assert {tr.label for tr in tracks} == set(
        np.unique([source.labels(t, 1, 0) for t in range(4)]).tolist()
    ) - {0}
    source.write_ctc(tmp_path, p=1)
    assert read_ctc(tmp_path)[1] == tracks
    with pytest.raises(SourceError, match="tracked=True"):
        SyntheticSource(shape=(96, 96), frames=2, n_cells=3).tracks()
