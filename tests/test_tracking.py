"""The online cell linker: scenarios, time order, idempotence, durable state, accuracy on simulated movies."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
from skimage.draw import disk

from acquisition.sim_tracks import TrackedMovie
from cellsam_core.cells import CellTable
from cellsam_core.errors import StaleFrameError, TrackingError
from cellsam_core.lineage import lineage_graph, node_id
from cellsam_core.tracking import (
    OnlineTracker,
    TrackedFrame,
    TrackerConfig,
    TrackerState,
    track_sequence,
)

SHAPE = (128, 128)
Cell = tuple[float, float, float]  # (y, x, radius)


def draw(cells: dict[str, Cell]) -> tuple[np.ndarray, dict[str, int]]:
    """Label image of disks, labels 1.. in key order; returns the image and key -> label."""
    labels = np.zeros(SHAPE, np.int32)
    keys = {}
    for i, (key, (y, x, r)) in enumerate(sorted(cells.items()), start=1):
        labels[disk((y, x), r, shape=SHAPE)] = i
        keys[key] = i
    return labels, keys


@dataclass(frozen=True)
class Case:
    """A short movie of named cells; ``tracks`` maps each cell name to a track symbol: names with the same
    symbol must share a track id, different symbols must not. ``parents`` relates symbols; ``events`` lists
    ``(t, kind, symbol)`` that must be reported (other events may be too)."""

    name: str
    frames: list[dict[str, Cell]]
    tracks: dict[str, str]
    parents: dict[str, str] = field(default_factory=dict)
    events: set[tuple[int, str, str]] = field(default_factory=set)
    config: TrackerConfig = field(default_factory=TrackerConfig)


def _steady(n: int, dx: float) -> list[dict[str, Cell]]:
    return [{"a": (30.0, 20.0 + dx * t, 6.0), "b": (90.0, 100.0 - dx * t, 7.0)} for t in range(n)]


CASES = [
    Case("static cells keep their ids", _steady(5, 0.0), {"a": "A", "b": "B"}, events={(0, "appeared", "A")}),
    Case("moving cells keep their ids", _steady(6, 5.0), {"a": "A", "b": "B"}),
    Case(
        "centroid-only linking",
        _steady(6, 5.0),
        {"a": "A", "b": "B"},
        config=TrackerConfig(overlap_weight=0.0, velocity_weight=0.0),
    ),
    Case(
        "a division gives two daughters of the parent",
        [
            {"m": (60.0, 60.0, 10.0)},
            {"m": (60.0, 61.0, 10.5)},
            {"d1": (60.0, 54.0, 7.0), "d2": (60.0, 68.0, 7.0)},
        ],
        {"m": "M", "d1": "D1", "d2": "D2"},
        parents={"D1": "M", "D2": "M"},
        events={(2, "divided", "M"), (0, "appeared", "M")},
    ),
    Case(
        "a division where no daughter sits on the parent",
        [{"m": (60.0, 60.0, 10.0)}, {"d1": (52.0, 60.0, 7.0), "d2": (68.0, 60.0, 7.0)}],
        {"m": "M", "d1": "D1", "d2": "D2"},
        parents={"D1": "M", "D2": "M"},
        events={(1, "divided", "M")},
    ),
    Case(
        "no division without the area drop",
        [{"m": (60.0, 60.0, 8.0)}, {"m": (60.0, 60.0, 8.0), "n": (60.0, 74.0, 8.0)}],
        {"m": "M", "n": "N"},
        events={(1, "appeared", "N")},
    ),
    Case(
        "a gap of one frame is closed",
        [{"c": (40.0, 40.0, 6.0)}, {"c": (40.0, 42.0, 6.0)}, {}, {"c": (40.0, 46.0, 6.0)}],
        {"c": "C"},
        events={(2, "lost", "C"), (3, "recovered", "C")},
    ),
    Case(
        "a cell back after more than gap_frames is a new track",
        [{"c": (40.0, 40.0, 6.0)}, {"c": (40.0, 41.0, 6.0)}, {}, {}, {}, {"c2": (40.0, 43.0, 6.0)}],
        {"c": "C", "c2": "C2"},
        events={(2, "lost", "C"), (4, "disappeared", "C"), (5, "appeared", "C2")},
    ),
    Case(
        "without gap closing a missed cell disappears at once",
        [{"c": (40.0, 40.0, 6.0)}, {}, {"c2": (40.0, 40.0, 6.0)}],
        {"c": "C", "c2": "C2"},
        events={(1, "disappeared", "C")},
        config=TrackerConfig(gap_frames=0),
    ),
    Case(
        "a cell beyond max_distance starts a new track",
        [{"c": (40.0, 20.0, 5.0)}, {"c2": (40.0, 60.0, 5.0)}],
        {"c": "C", "c2": "C2"},
    ),
    Case(
        "two touching cells segmented as one: merged",
        [{"a": (60.0, 50.0, 7.0), "b": (60.0, 64.0, 7.0)}, {"ab": (60.0, 57.0, 11.0)}],
        {"a": "A", "b": "B", "ab": "A"},
        events={(1, "merged", "B")},
    ),
]


def run(case_frames: list[dict[str, Cell]], config: TrackerConfig) -> tuple[list[TrackedFrame], list]:
    tracker = OnlineTracker(config)
    out, keys = [], []
    for t, cells in enumerate(case_frames):
        labels, key_of = draw(cells)
        out.append(tracker.link(t, labels))
        keys.append(key_of)
    return out, keys


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_linking_scenarios(case: Case) -> None:
    frames, keys = run(case.frames, case.config)
    symbol_ids: dict[str, set[int]] = {}
    for frame, key_of in zip(frames, keys, strict=True):
        by_label = dict(zip(frame.cells.label.tolist(), frame.track_ids.tolist(), strict=True))
        for name, label in key_of.items():
            symbol_ids.setdefault(case.tracks[name], set()).add(by_label[label])
            assert np.all(frame.track_labels[draw(case.frames[frame.t])[0] == label] == by_label[label])
    assert all(len(ids) == 1 for ids in symbol_ids.values()), symbol_ids
    track_of = {s: next(iter(ids)) for s, ids in symbol_ids.items()}
    assert len(set(track_of.values())) == len(track_of), "different symbols must be different tracks"
    parent_of = {}
    for frame in frames:
        parent_of.update(zip(frame.track_ids.tolist(), frame.parent_track_ids.tolist(), strict=True))
    for symbol, tid in track_of.items():
        expected = case.parents.get(symbol)
        assert parent_of[tid] == (track_of[expected] if expected else 0), symbol
    reported = {(f.t, e.kind, e.track_id) for f in frames for e in f.events}
    for t, kind, symbol in case.events:
        assert (t, kind, track_of[symbol]) in reported, (t, kind, symbol, reported)
    divided = [e for f in frames for e in f.events if e.kind == "divided"]
    assert len(divided) == sum(1 for _ in {p for p in case.parents.values()})


def test_division_event_names_daughters() -> None:
    frames, _ = run(CASES[3].frames, TrackerConfig())
    (event,) = [e for e in frames[2].events if e.kind == "divided"]
    assert sorted(event.daughters) == sorted(frames[2].track_ids.tolist())
    assert event.to_dict() == {"kind": "divided", "t": 2, "track_id": 1, "daughters": list(event.daughters)}


# -- time order, idempotence, durable state --------------------------------------------------------


@pytest.fixture(scope="module")
def movie() -> TrackedMovie:
    return TrackedMovie((160, 160), 14, seed=5, n_cells=18, growth=0.05, entry_rate=0.5, noise=False)


def same(a: TrackedFrame, b: TrackedFrame) -> bool:
    return (
        a.t == b.t
        and np.array_equal(a.track_labels, b.track_labels)
        and a.cells.equals(b.cells)
        and a.events == b.events
    )


def test_out_of_order_offers_equal_in_order(movie: TrackedMovie) -> None:
    ordered = list(track_sequence(movie.labels(t) for t in range(len(movie))))
    order = list(range(len(movie)))
    random.Random(3).shuffle(order)
    tracker = OnlineTracker()
    got: list[TrackedFrame] = []
    for t in order:
        newly = tracker.offer(t, movie.labels(t))
        assert [f.t for f in newly] == list(range(len(got), len(got) + len(newly)))
        got.extend(newly)
        assert tracker.next_t == len(got)
    assert len(got) == len(ordered) and all(same(a, b) for a, b in zip(got, ordered, strict=True))
    assert any(f.parent_track_ids.any() for f in ordered), "the movie should hold a division"


def test_reoffer_is_idempotent(movie: TrackedMovie) -> None:
    tracker = OnlineTracker()
    first = [tracker.link(t, movie.labels(t)) for t in range(5)]
    next_id = tracker.next_track_id
    for t in (4, 2, 4):
        (again,) = tracker.offer(t, movie.labels(t))
        assert again is first[t]
    assert tracker.next_track_id == next_id
    # A retried frame offered twice while it is held keeps its first copy.
    assert tracker.offer(6, movie.labels(6)) == [] and tracker.offer(6, movie.labels(6)) == []
    linked = tracker.offer(5, movie.labels(5))
    reference = list(track_sequence(movie.labels(t) for t in range(7)))
    assert [f.t for f in linked] == [5, 6] and all(same(a, reference[a.t]) for a in linked)


def test_skip_links_across_a_missing_frame(movie: TrackedMovie) -> None:
    tracker = OnlineTracker()
    tracker.link(0, movie.labels(0))
    assert tracker.offer(2, movie.labels(2)) == []
    assert tracker.pending == (2,)
    (frame2,) = tracker.skip(1)
    assert frame2.t == 2 and tracker.next_t == 3
    with pytest.raises(StaleFrameError) as info:
        tracker.offer(1, movie.labels(1))
    assert info.value.t == 1
    # Most cells of frame 0 continue into frame 2 across the skipped frame.
    ids0 = set(tracker.linked(0).track_ids.tolist())  # type: ignore[union-attr]
    assert len(ids0 & set(frame2.track_ids.tolist())) >= 0.8 * len(ids0)
    assert tracker.skip(1) == []  # already passed: no-op


def test_old_frames_beyond_history_are_stale(movie: TrackedMovie) -> None:
    tracker = OnlineTracker(history=2)
    for t in range(4):
        tracker.link(t, movie.labels(t))
    assert tracker.offer(3, movie.labels(3))[0].t == 3
    with pytest.raises(StaleFrameError):
        tracker.offer(0, movie.labels(0))
    with pytest.raises(TrackingError):
        tracker.link(9, movie.labels(9 % len(movie)))


@pytest.mark.parametrize("how", ["state", "tables"])
def test_resume_gives_the_same_ids_as_an_uninterrupted_run(movie: TrackedMovie, how: str) -> None:
    config = TrackerConfig(gap_frames=2)
    reference = list(track_sequence((movie.labels(t) for t in range(len(movie))), config))
    stop = 7
    first = OnlineTracker(config)
    before = [first.link(t, movie.labels(t)) for t in range(stop)]
    if how == "state":
        saved = json.loads(json.dumps(first.state().model_dump(mode="json")))
        tracker = OnlineTracker.resume(config, saved)
    else:
        tables = [(f.t, f.cells) for f in before[-(config.gap_frames + 3) :]]
        tracker = OnlineTracker.from_tables(config, tables, next_track_id=first.next_track_id)
    assert tracker.next_t == stop
    after = [tracker.link(t, movie.labels(t)) for t in range(stop, len(movie))]
    assert all(same(a, b) for a, b in zip(after, reference[stop:], strict=True))


def test_bad_state_and_config_are_refused() -> None:
    state = OnlineTracker().state().model_dump(mode="json")
    with pytest.raises(TrackingError, match="validate"):
        OnlineTracker.resume(None, {**state, "format": 9})
    with pytest.raises(TrackingError, match="entries"):
        OnlineTracker.resume(None, {**state, "track_id": [1]})
    with pytest.raises(ValueError, match="division_area_ratio"):
        TrackerConfig(division_area_ratio=(0.8, 0.3))
    with pytest.raises(ValueError, match="extra"):
        TrackerConfig(max_dist=3)  # type: ignore[call-arg]
    with pytest.raises(TrackingError, match="2-D integer"):
        OnlineTracker().offer(0, np.zeros((4, 4), np.float32))
    with pytest.raises(TrackingError, match="track_id"):
        OnlineTracker.from_tables(None, [(0, CellTable.from_labels(np.ones((4, 4), np.int32)))])
    assert TrackerState.model_validate(state).next_track_id == 1


def test_empty_frames_and_state_roundtrip() -> None:
    tracker = OnlineTracker()
    empty = tracker.link(0, np.zeros(SHAPE, np.int32))
    assert empty.cells.n_cells == 0 and not empty.track_labels.any() and empty.events == ()
    labels, _ = draw({"a": (20.0, 20.0, 5.0)})
    frame = tracker.link(1, labels, CellTable.from_labels(labels))
    assert frame.track_ids.tolist() == [1] and frame.track_labels.dtype == np.uint32
    assert tracker.link(2, np.zeros(SHAPE, np.int32)).events[0].kind == "lost"
    # Pixels of a label the table does not hold are background in the tracked labels.
    extra = labels.copy()
    extra[100:104, 100:104] = 9
    frame = tracker.link(3, extra, CellTable.from_labels(labels))
    assert set(np.unique(frame.track_labels).tolist()) == {0, 1}


def test_lineage_graph_links_tracks_and_divisions() -> None:
    frames, _ = run(CASES[3].frames, TrackerConfig())
    graph = lineage_graph(frames)
    assert graph.number_of_nodes() == 1 + 1 + 2
    parent = frames[0].track_ids[0]
    d1, d2 = frames[2].track_ids.tolist()
    assert set(graph.successors(node_id(1, parent))) == {node_id(2, d1), node_id(2, d2)}
    assert graph.has_edge(node_id(0, parent), node_id(1, parent))
    assert {graph.nodes[node_id(2, d)]["lineage_id"] for d in (d1, d2)} == {parent}
    node = graph.nodes[node_id(2, d1)]
    assert node["t"] == 2 and node["parent_track_id"] == parent and node["area"] > 0


# -- accuracy on the simulator's movies (deterministic given the seed) ------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_accuracy_on_ground_truth_masks(seed: int) -> None:
    pytest.importorskip("traccuracy")
    from acquisition.track_metrics import tracking_metrics

    movie = TrackedMovie((256, 256), 40, seed=seed, noise=False)
    truth = [movie.labels(t) for t in range(len(movie))]
    frames = list(track_sequence(truth))
    parents = {}
    for f in frames:
        parents.update(
            (k, p) for k, p in zip(f.track_ids.tolist(), f.parent_track_ids.tolist(), strict=True) if p
        )
    scores = tracking_metrics(truth, movie.tracks, [f.track_labels for f in frames], parents)
    assert scores["true_divisions"] >= 20, "the movie should divide often enough to measure"
    assert scores["LNK"] >= 0.98
    assert scores["division_f1"] >= 0.9
    assert scores["DET"] == 1.0
