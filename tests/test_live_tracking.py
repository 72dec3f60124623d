"""Live tracking in the pipeline: frames linked as they are stored, tracks stored and published, resumed.

A segmenter that returns the simulator's ground-truth masks isolates the tracking path from the model:
the tracks the service stores and publishes must equal the offline linker (`track_sequence`) over the same
label images, whatever order frames arrive in, across failed frames, and across a restart (no
renumbering). The same through ``cellsam-stream serve`` is in ``tests/test_faults.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from pathlib import Path

import numpy as np
import pytest

from acquisition.frames import FrameId
from acquisition.memory_sink import MemoryLabelSink
from acquisition.protocol import EndMessage, StartMessage, TrackResult
from acquisition.sim_tracks import TrackedMovie
from acquisition.sink import LabelSink
from acquisition.wire import encode_control
from acquisition.zarr_sink import ZarrLabelSink
from cellsam_core.cells import CellTable
from cellsam_core.inference import Segmentation
from cellsam_core.tracking import track_sequence
from serving.segmenter import DecodedFrame
from tests.test_lifecycle import Service
from tests.test_pipeline import run

N = 16


class TruthSegmenter:
    """A `Segmenter` that answers each frame with its ground-truth masks (looked up by its pixels)."""

    def __init__(self, movie: TrackedMovie, fail: frozenset[int] = frozenset()) -> None:
        self._truth = {self._key(movie[t][0]): (t, movie.labels(t)) for t in range(len(movie))}
        self.fail = fail

    @staticmethod
    def _key(image: np.ndarray) -> str:
        return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()

    async def segment(self, image: np.ndarray) -> DecodedFrame:
        await asyncio.sleep(0)
        t, truth = self._truth[self._key(image)]
        if t in self.fail:
            raise ValueError(f"frame {t} makes the model raise")
        labels = truth.astype(np.uint32)
        return DecodedFrame(Segmentation(labels, CellTable.from_labels(labels), {}), 0.001, 0.001, 1, 0)

    def is_retryable(self, exc: BaseException) -> bool:
        return False


@pytest.fixture(scope="module")
def movie() -> TrackedMovie:
    return TrackedMovie((128, 128), N, seed=3, n_cells=12)


def _offline(movie: TrackedMovie, ts: list[int]) -> dict[int, np.ndarray]:
    """Track labels of the consecutive frames ``ts`` linked offline by the same linker."""
    frames = track_sequence([movie.labels(t).astype(np.uint32) for t in ts], first_t=ts[0])
    return {t: f.track_labels for t, f in zip(ts, frames, strict=True)}


async def _play(service: Service, movie: TrackedMovie, ts: list[int], *, start: bool, end: bool) -> None:
    if start:
        await service.source.push(encode_control(StartMessage(acquisition="live", sizes={"t": N})))
    await service.send("live", {t: movie[t][0] for t in ts})
    if end:
        await service.source.push(encode_control(EndMessage(acquisition="live", frames=N)))


def _tracks(service: Service) -> dict[int, TrackResult]:
    return {r.index.t: r for r in service.results.tracks if r.acquisition == "live"}


def _stored_tracks(labels: LabelSink, ts: list[int]) -> dict[int, np.ndarray]:
    return {t: labels.read_tracks(FrameId("live", 0, t, 0)) for t in ts}


@pytest.mark.parametrize("order", ["in order", "shuffled"])
def test_tracks_equal_the_offline_linker_in_any_arrival_order(movie: TrackedMovie, order: str) -> None:
    ts = list(range(N))
    if order == "shuffled":  # out of order within windows of 4
        rng = random.Random(5)
        windows = [ts[i : i + 4] for i in range(0, N, 4)]
        ts = [t for window in windows for t in rng.sample(window, len(window))]
    labels = MemoryLabelSink()
    service = Service(labels, TruthSegmenter(movie), max_concurrent=3, max_queued=32)

    async def main() -> None:
        await service.pipeline.start()
        await _play(service, movie, ts, start=True, end=True)
        await service.summary("live")
        await service.pipeline.stop(deadline_s=30)

    run(main())
    expected = _offline(movie, list(range(N)))
    stored = _stored_tracks(labels, list(range(N)))
    for t in range(N):
        np.testing.assert_array_equal(stored[t], expected[t], err_msg=f"t={t}")
    published = _tracks(service)
    assert sorted(published) == list(range(N))
    # Published in time order, each after its own result, and consistent with the stored images.
    order_published = [r.index.t for r in service.results.tracks]
    assert order_published == sorted(order_published)
    for t, tracks in published.items():
        cells = labels.read_cells(FrameId("live", 0, t, 0))
        assert tracks.labels == [int(v) for v in cells.label]
        for label, track_id in zip(tracks.labels, tracks.track_ids, strict=True):
            assert np.all(stored[t][movie.labels(t) == label] == track_id)
        np.testing.assert_array_equal(cells.measurements["track_id"], tracks.track_ids)
    divided = [e for r in published.values() for e in r.events if e["kind"] == "divided"]
    assert divided, "the movie's divisions are reported"
    metrics = service.pipeline.metrics
    assert metrics.track_events.labels(kind="appeared")._value.get() > 0


def test_a_failed_frame_is_linked_across(movie: TrackedMovie) -> None:
    labels = MemoryLabelSink()
    service = Service(labels, TruthSegmenter(movie, fail=frozenset({5})), max_concurrent=2, max_queued=32)

    async def main() -> None:
        await service.pipeline.start()
        await _play(service, movie, list(range(N)), start=True, end=True)
        await service.summary("live")
        await service.pipeline.stop(deadline_s=30)

    run(main())
    kept = [t for t in range(N) if t != 5]
    assert sorted(_tracks(service)) == kept
    stored = _stored_tracks(labels, kept)
    # Tracks continue across the missing frame: most cells of t=4 keep their id at t=6.
    before, after = stored[4], stored[6]
    same = [tid for tid in np.unique(before[before > 0]) if tid in np.unique(after)]
    assert len(same) >= 0.7 * len(np.unique(before[before > 0]))


def test_a_restarted_service_resumes_tracking_without_renumbering(
    movie: TrackedMovie, tmp_path: Path
) -> None:
    """Run 1 links t < 8, and stores t = 9 and 10 without being able to link them (t = 8 never came);
    run 2 resumes from the store, gets t = 8 and the rest: the whole movie's tracks equal one
    uninterrupted offline run."""
    first_half, later = list(range(8)), [9, 10]

    async def first_run() -> None:
        service = Service(ZarrLabelSink(tmp_path), TruthSegmenter(movie), max_concurrent=2, max_queued=32)
        await service.pipeline.start()
        await _play(service, movie, first_half + later, start=True, end=False)
        while service.pipeline.ledger["live"].pending or service.source.stats.accepted < 10:
            await asyncio.sleep(0.01)
        await service.pipeline.stop(deadline_s=30)
        assert sorted(_tracks(service)) == first_half  # 9 and 10 wait for 8

    async def second_run() -> Service:
        service = Service(ZarrLabelSink(tmp_path), TruthSegmenter(movie), max_concurrent=2, max_queued=32)
        await service.pipeline.start()
        rest = [8] + [t for t in range(11, N)]
        await _play(service, movie, rest, start=False, end=True)
        await service.summary("live")
        await service.pipeline.stop(deadline_s=30)
        return service

    run(first_run())
    service = run(second_run())
    # The resumed tracker links its last linked frame (t = 7) again, then the rest.
    assert sorted(_tracks(service)) in (list(range(8, N)), list(range(7, N)))
    labels = ZarrLabelSink(tmp_path)
    stored_spec = labels.stored("live")
    assert stored_spec is not None
    labels.open_acquisition(stored_spec.spec)
    expected = _offline(movie, list(range(N)))
    for t, image in _stored_tracks(labels, list(range(N))).items():
        np.testing.assert_array_equal(image, expected[t], err_msg=f"t={t}")
    graph = labels.read_lineage("live", 0, 0)
    assert graph is not None and {d["t"] for _, d in graph.nodes(data=True)} == set(range(N))
