"""One conformance suite for every `ResultSink`: subclass `ResultSinkConformance`, give it a sink and a
reader.

The contract is the `acquisition.results.ResultSink` docstring. `ResultPublisher` is read back through a
real `ResultSubscriber` (which waits for the publisher's heartbeat before anything is published),
`MemoryResultSink` from its lists; both must deliver the same thing.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pytest
from skimage.draw import disk

from acquisition.client import ResultSubscriber
from acquisition.outcome import FrameOutcome
from acquisition.protocol import AcquisitionSummary, FrameResult, Index, TrackResult
from acquisition.publisher import ResultPublisher
from acquisition.results import MemoryResultSink, ResultSink
from cellsam_core.cells import CELL_COLUMNS, CellTable
from tests.acq_util import ANY_PORT

pytestmark = pytest.mark.timeout(60)


def labels_and_cells(seed: int = 0, pixel_size_um: float | None = None) -> tuple[np.ndarray, CellTable]:
    """A (40, 56) uint32 label image of a few disks, and its cell table with prompt boxes and scores.

    The first cell is off the diagonal (its y and x differ), so swapped axes cannot go unnoticed; the
    last has no prompt box (NaN), like a cell merged from tiles.
    """
    rng = np.random.default_rng(seed)
    labels = np.zeros((40, 56), np.uint32)
    labels[disk((8, 30), 5, shape=labels.shape)] = 1
    for label in range(2, 5):
        labels[disk(tuple(rng.integers(8, [32, 48])), 4, shape=labels.shape)] = label
    bbox = CellTable.from_labels(labels).bbox.astype(np.float64)
    prompts = bbox + np.array([-1.0, -0.5, 1.5, 0.25])
    prompts[-1] = np.nan
    scores = np.linspace(0.5, 0.95, len(bbox))
    table = CellTable.from_labels(labels, prompt_boxes=prompts, scores=scores, pixel_size_um=pixel_size_um)
    return labels, table


def ok(acq: str, t: int, *, seed: int = 0, **kwargs: Any) -> FrameOutcome:
    labels, cells = labels_and_cells(seed)
    return FrameOutcome(
        acq, Index(t=t), "ok", labels=labels, cells=cells, latency={"encode": 0.01}, model="tiny", **kwargs
    )


@dataclass(frozen=True)
class Delivered:
    """One message as a reader got it."""

    payload: FrameResult | AcquisitionSummary | TrackResult
    labels: np.ndarray | None


class Reader(Protocol):
    def read(self, n: int) -> list[Delivered]:
        """The next ``n`` messages published after the reader was made, in delivery order."""
        ...


class ResultSinkConformance:
    """Behaviour every `ResultSink` must show; see the `ResultSink` docstring for the contract."""

    def make_sink(self) -> ResultSink:
        """The sink under test, not started; every implementation's test class overrides this."""
        raise NotImplementedError

    def reader(
        self, sink: ResultSink, *, labels: bool = False, tracks: bool = False
    ) -> contextlib.AbstractContextManager[Reader]:
        """A reader of everything ``sink`` publishes from now on (with label images if ``labels``, with
        tracks if ``tracks``)."""
        raise NotImplementedError

    @pytest.fixture
    def sink(self) -> Iterator[ResultSink]:
        sink = self.make_sink()
        sink.start()
        yield sink
        sink.close()

    def test_satisfies_protocol(self) -> None:
        assert isinstance(self.make_sink(), ResultSink)

    def test_ok_outcome_carries_the_cell_table(self, sink: ResultSink) -> None:
        outcome = ok("cells", 3)
        table = outcome.cells
        assert table is not None and len(table) == 4
        with self.reader(sink) as reader:
            before = time.time()
            sink.publish(outcome)
            (got,) = reader.read(1)
        result = got.payload
        assert isinstance(result, FrameResult)
        assert (result.acquisition, result.index, result.status) == ("cells", Index(t=3), "ok")
        assert result.reason is None and result.detail is None
        assert result.n_cells == 4 and result.model == "tiny" and result.latency == {"encode": 0.01}
        assert result.timestamp is not None and result.timestamp >= before - 1
        assert result.cell_table().equals(table)
        assert list(result.cells) == list(CELL_COLUMNS)
        for name, values in table.columns().items():  # column by column, NaN as null
            sent = np.array([np.nan if v is None else v for v in result.cells[name]], np.float64)
            np.testing.assert_array_equal(sent, values.astype(np.float64), err_msg=name)
        assert result.cells["prompt_y0"][-1] is None and result.cells["score"][-1] is not None
        # (y, x): the first cell is centred on row 8, column 30.
        assert result.centroids[0] == pytest.approx((8.0, 30.0))
        assert result.centroids == [tuple(c) for c in table.centroid]

    def test_physical_areas_travel_in_the_columns(self, sink: ResultSink) -> None:
        labels, table = labels_and_cells(pixel_size_um=0.5)
        with self.reader(sink) as reader:
            sink.publish(FrameOutcome("um", Index(), "ok", labels=labels, cells=table))
            (got,) = reader.read(1)
        assert isinstance(got.payload, FrameResult)
        assert got.payload.cells["area_um2"] == pytest.approx(list(table.area_um2))
        # The pixel size itself is not sent: the reader who knows it gets the table back.
        assert got.payload.cell_table().with_pixel_size(0.5).equals(table)

    def test_an_ok_outcome_without_cells(self, sink: ResultSink) -> None:
        empty = np.zeros((8, 8), np.uint32)
        with self.reader(sink) as reader:
            sink.publish(FrameOutcome("none", Index(t=1), "ok", labels=empty, cells=CellTable.empty()))
            (got,) = reader.read(1)
        assert isinstance(got.payload, FrameResult)
        assert got.payload.n_cells == 0 and len(got.payload.cell_table()) == 0 and got.payload.centroids == []

    def test_failed_and_rejected_outcomes_keep_reason_detail_and_index(self, sink: ResultSink) -> None:
        outcomes = [
            FrameOutcome("bad", Index(t=2, p=1, z=3), "failed", reason="model_error", detail="replica died"),
            FrameOutcome("bad", Index(t=4), "rejected", reason="size_mismatch", detail="3 bytes, needs 8"),
            FrameOutcome("bad", None, "rejected", reason="bad_multipart", detail="x" * 1000),
        ]
        with self.reader(sink) as reader:
            for outcome in outcomes:
                sink.publish(outcome)
            got = [d.payload for d in reader.read(3)]
        for result, outcome in zip(got, outcomes, strict=True):
            assert isinstance(result, FrameResult)
            assert (result.acquisition, result.index, result.status, result.reason) == (
                "bad",
                outcome.index,
                outcome.status,
                outcome.reason,
            )
            assert result.n_cells == 0 and result.cells == {}
        assert [r.detail for r in got[:2]] == ["replica died", "3 bytes, needs 8"]  # type: ignore[union-attr]
        assert got[2].detail == "x" * 500  # type: ignore[union-attr]  # long details are cut

    def test_summary_comes_after_the_results_published_before_it(self, sink: ResultSink) -> None:
        summary = AcquisitionSummary(acquisition="sum", frames_received=3, frames_ok=2, frames_failed=1)
        with self.reader(sink) as reader:
            sink.publish(ok("sum", 0))
            sink.publish(ok("other", 0))
            sink.publish(ok("sum", 1))
            sink.publish(FrameOutcome("sum", Index(t=2), "failed", reason="write_error"))
            sink.publish_summary(summary)
            got = [d.payload for d in reader.read(5)]
        ours = [p for p in got if p.acquisition == "sum"]
        assert [p.type for p in ours] == ["result", "result", "result", "summary"]
        assert ours[-1] == summary

    @pytest.mark.parametrize("wants_tracks", [True, False])
    def test_tracks_follow_their_result_for_readers_that_ask(
        self, sink: ResultSink, wants_tracks: bool
    ) -> None:
        tracks = TrackResult(
            acquisition="trk",
            index=Index(t=0),
            labels=[1, 2],
            track_ids=[7, 9],
            parent_track_ids=[0, 3],
            events=[{"kind": "divided", "t": 0, "track_id": 3, "daughters": [7, 9]}],
        )
        summary = AcquisitionSummary(acquisition="trk", frames_received=1, frames_ok=1)
        with self.reader(sink, tracks=wants_tracks) as reader:
            sink.publish(ok("trk", 0))
            sink.publish_tracks(tracks)
            sink.publish_summary(summary)
            got = [d.payload for d in reader.read(3 if wants_tracks else 2)]
        assert [p.type for p in got] == (
            ["result", "tracks", "summary"] if wants_tracks else ["result", "summary"]
        )
        if wants_tracks:
            delivered = got[1]
            assert isinstance(delivered, TrackResult) and delivered.timestamp is not None
            assert delivered.model_copy(update={"timestamp": None}) == tracks

    def test_order_per_acquisition_is_kept(self, sink: ResultSink) -> None:
        acquisitions = ("a", "b", "c")
        with self.reader(sink) as reader:
            for t in range(15):
                for acq in acquisitions:
                    sink.publish(ok(acq, t) if t % 4 else FrameOutcome(acq, Index(t=t), "failed", reason="x"))
            got = [d.payload for d in reader.read(45)]
        for acq in acquisitions:
            ts = [p.index.t for p in got if isinstance(p, FrameResult) and p.acquisition == acq and p.index]
            assert ts == list(range(15)), acq

    def test_labels_go_to_readers_that_ask(self, sink: ResultSink) -> None:
        outcome = ok("lab", 0, seed=3)
        with self.reader(sink, labels=True) as with_labels, self.reader(sink) as without:
            sink.publish(outcome)
            sink.publish(FrameOutcome("lab", Index(t=1), "failed", reason="model_error"))
            sink.publish_summary(AcquisitionSummary(acquisition="lab", frames_received=2, frames_ok=1))
            asked = with_labels.read(3)
            plain = without.read(3)
        assert asked[0].labels is not None
        assert asked[0].labels.shape == (40, 56) and asked[0].labels.dtype == np.uint32
        np.testing.assert_array_equal(asked[0].labels, outcome.labels)
        assert asked[1].labels is None and asked[2].labels is None  # nothing to attach
        assert [d.labels for d in plain] == [None, None, None]
        assert [d.payload for d in plain][1:] == [d.payload for d in asked][1:]
        assert isinstance(plain[0].payload, FrameResult) and isinstance(asked[0].payload, FrameResult)
        assert plain[0].payload.cells == asked[0].payload.cells

    def test_publishing_from_other_threads(self, sink: ResultSink) -> None:
        def publish(acq: str) -> None:
            for t in range(10):
                sink.publish(ok(acq, t))
            sink.publish_summary(AcquisitionSummary(acquisition=acq, frames_received=10, frames_ok=10))

        with self.reader(sink) as reader:
            threads = [threading.Thread(target=publish, args=(f"th{i}",)) for i in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
            got = [d.payload for d in reader.read(33)]
        for i in range(3):
            ours = [p for p in got if p.acquisition == f"th{i}"]
            assert [p.index.t for p in ours[:-1]] == list(range(10))  # type: ignore[union-attr]
            assert isinstance(ours[-1], AcquisitionSummary)

    def test_bad_outcomes_raise_in_the_caller_and_publish_nothing(self, sink: ResultSink) -> None:
        _, cells = labels_and_cells()
        with self.reader(sink) as reader:
            for labels in (np.zeros((2, 2, 2), np.uint32), np.zeros((40, 56), np.float32)):
                with pytest.raises(ValueError, match="labels"):
                    sink.publish(FrameOutcome("x", Index(), "ok", labels=labels, cells=cells))  # type: ignore[arg-type]
            with pytest.raises(ValueError):
                sink.publish(FrameOutcome("x", None, "maybe"))  # type: ignore[arg-type]
            sink.publish(ok("x", 7))
            (got,) = reader.read(1)
        assert isinstance(got.payload, FrameResult) and got.payload.index == Index(t=7)

    def test_close_delivers_what_was_published_before(self) -> None:
        sink = self.make_sink()
        sink.start()
        try:
            with self.reader(sink) as reader:
                for t in range(20):
                    sink.publish(ok("last", t))
                sink.publish_summary(AcquisitionSummary(acquisition="last", frames_received=20))
                sink.close()
                got = [d.payload for d in reader.read(21)]
        finally:
            sink.close()
        assert [p.index.t for p in got[:-1]] == list(range(20))  # type: ignore[union-attr]
        assert isinstance(got[-1], AcquisitionSummary)


# -- implementations -------------------------------------------------------------------------------------


class SubscriberReader:
    def __init__(self, subscriber: ResultSubscriber) -> None:
        self._subscriber = subscriber

    def read(self, n: int) -> list[Delivered]:
        messages = [self._subscriber.recv(timeout=10) for _ in range(n)]
        return [Delivered(m.payload, m.labels) for m in messages]


class TestResultPublisher(ResultSinkConformance):
    def make_sink(self) -> ResultSink:
        return ResultPublisher(endpoint=ANY_PORT, heartbeat_interval=0.02)

    @contextlib.contextmanager
    def reader(self, sink: ResultSink, *, labels: bool = False, tracks: bool = False) -> Iterator[Reader]:
        with ResultSubscriber(endpoint=sink.endpoint, labels=labels, tracks=tracks) as subscriber:
            subscriber.wait_ready(timeout=10)
            yield SubscriberReader(subscriber)


class ListReader:
    def __init__(self, sink: MemoryResultSink, labels: bool, tracks: bool) -> None:
        self._sink = sink
        self._labels = labels
        self._tracks = tracks
        self._next = len(sink.messages)

    def _visible(self) -> list[FrameResult | AcquisitionSummary | TrackResult]:
        messages = self._sink.messages[self._next :]
        return [m for m in messages if self._tracks or not isinstance(m, TrackResult)]

    def read(self, n: int) -> list[Delivered]:
        deadline = time.monotonic() + 10
        while len(self._visible()) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} messages not published within 10 s")
            time.sleep(0.005)
        visible = self._visible()[:n]
        self._next = self._sink.messages.index(visible[-1], self._next) + 1 if visible else self._next
        out = []
        for message in visible:
            labels = None
            if self._labels and isinstance(message, FrameResult):
                i = next(i for i, r in enumerate(self._sink.results) if r is message)
                labels = self._sink.labels[i]
            out.append(Delivered(message, labels))
        return out


class TestMemoryResultSink(ResultSinkConformance):
    def make_sink(self) -> ResultSink:
        return MemoryResultSink()

    @contextlib.contextmanager
    def reader(self, sink: ResultSink, *, labels: bool = False, tracks: bool = False) -> Iterator[Reader]:
        assert isinstance(sink, MemoryResultSink)
        yield ListReader(sink, labels, tracks)

    def test_lists_and_lookup(self) -> None:
        sink = MemoryResultSink()
        sink.start()
        sink.publish(ok("a", 0))
        sink.publish(FrameOutcome("b", Index(), "failed", reason="x"))
        sink.publish(ok("a", 1))
        sink.close()
        assert sink.started and sink.closed
        assert [r.index.t for r in sink.for_acquisition("a")] == [0, 1]  # type: ignore[union-attr]
        assert [lab is None for lab in sink.labels] == [False, True, False]
        assert sink.summaries == [] and len(sink.messages) == 3
