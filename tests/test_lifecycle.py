"""Shutdown and restart of the pipeline: drain with a deadline, resume from the store (in-process seams).

The same guarantees through ``cellsam-stream serve`` (signals, a killed service, restarts) are in
``tests/test_faults.py``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np

from acquisition.frames import FrameId
from acquisition.memory_sink import MemoryLabelSink
from acquisition.protocol import AcquisitionSummary, EndMessage, StartMessage
from acquisition.results import MemoryResultSink
from acquisition.sink import LabelSink
from acquisition.source import MemoryFrameSource
from acquisition.wire import encode_control
from acquisition.zarr_sink import ZarrLabelSink
from serving.pipeline import StreamPipeline
from tests.test_pipeline import FakeSegmenter, _config, _frame_parts, _frames, run


class Service:
    """One run of the service over in-process seams and a given label sink (the store survives it)."""

    def __init__(self, labels: LabelSink, segmenter: Any = None, **ingest: Any) -> None:
        self.config = _config(**ingest)
        self.labels = labels
        self.source = MemoryFrameSource(max_queued=self.config.ingest.max_queued, stored=labels.stored)
        self.segmenter = segmenter or FakeSegmenter()
        self.results = MemoryResultSink()
        self.pipeline = StreamPipeline(
            source=self.source,
            segmenter=self.segmenter,
            labels=labels,
            results=self.results,
            config=self.config,
            model_name="fake",
        )

    async def send(self, acquisition: str, frames: dict[int, np.ndarray]) -> None:
        for t, image in frames.items():
            await self.source.push(_frame_parts(acquisition, image, t=t))

    async def summary(self, acquisition: str) -> AcquisitionSummary:
        while True:
            for summary in self.results.summaries:
                if summary.acquisition == acquisition:
                    return summary
            await asyncio.sleep(0.005)

    def statuses(self, acquisition: str) -> dict[int, tuple[str, str | None]]:
        return {
            r.index.t: (r.status, r.reason)
            for r in self.results.for_acquisition(acquisition)
            if r.index is not None
        }


def test_frames_unfinished_at_the_drain_deadline_fail_as_shutdown_and_are_recorded() -> None:
    labels = MemoryLabelSink()
    frames = _frames(6)
    segmenter = FakeSegmenter()
    service = Service(labels, segmenter, max_concurrent=2, max_queued=8)

    async def main() -> None:
        await service.pipeline.start()
        await service.source.push(encode_control(StartMessage(acquisition="a", sizes={"t": 6})))
        await service.send("a", {0: frames[0]})
        while not labels.stored("a") or not labels.is_done(FrameId("a", 0, 0, 0)):
            await asyncio.sleep(0.005)
        segmenter.gate = asyncio.Event()  # the model stops answering: the rest cannot finish
        await service.send("a", {t: frames[t] for t in range(1, 6)})
        while segmenter.calls < 3:  # two frames are with the model, three wait in the source
            await asyncio.sleep(0.005)
        report = await service.pipeline.stop(deadline_s=0.3)
        assert report.unfinished == 5 and report.deadline_s == 0.3
        assert await service.pipeline.stop() is report  # idempotent

    run(main())
    statuses = service.statuses("a")
    assert statuses[0] == ("ok", None)
    assert all(statuses[t] == ("failed", "shutdown") for t in range(1, 6)), statuses
    state = labels.progress("a")
    assert [f.frame.t for f in state.failed] == [1, 2, 3, 4, 5]
    assert {f.reason for f in state.failed} == {"shutdown"} and not state.closed
    entry = service.pipeline.ledger["a"]
    assert (entry.received, entry.ok, entry.failed, entry.pending) == (6, 1, 5, 0)
    assert entry.failures == {"shutdown": 5}


def test_a_drain_within_its_deadline_finishes_every_accepted_frame() -> None:
    labels = MemoryLabelSink()
    segmenter = FakeSegmenter()
    segmenter.gate = asyncio.Event()
    service = Service(labels, segmenter, max_concurrent=2, max_queued=8)
    frames = _frames(5)

    async def main() -> None:
        await service.pipeline.start()
        await service.source.push(encode_control(StartMessage(acquisition="a")))
        await service.send("a", dict(enumerate(frames)))
        while service.source.stats.accepted < 5:
            await asyncio.sleep(0.005)
        stopping = asyncio.ensure_future(service.pipeline.stop(deadline_s=60))
        await asyncio.sleep(0.05)
        assert segmenter.gate is not None
        segmenter.gate.set()  # the model answers again while the pipeline drains
        report = await stopping
        assert report.unfinished == 0

    run(main())
    assert service.statuses("a") == {t: ("ok", None) for t in range(5)}
    assert len(labels.progress("a").done) == 5


def test_a_restarted_service_resumes_an_acquisition_from_its_store_without_a_start(tmp_path: Path) -> None:
    """The store is the source of truth: the declaration (t = 6, pixel size) comes back from it, the
    summary counts the whole acquisition, and a shutdown failure is redone by re-sending the frame."""
    frames = _frames(6)
    declared = {"sizes": {"t": 6}, "pixel_size_um": 0.5, "time_interval_s": 30.0}

    async def first_run() -> None:
        service = Service(ZarrLabelSink(tmp_path))
        await service.pipeline.start()
        await service.source.push(encode_control(StartMessage(acquisition="a", **declared)))
        await service.send("a", {t: frames[t] for t in range(3)})
        while service.source.stats.accepted < 3 or service.pipeline.ledger["a"].pending:
            await asyncio.sleep(0.005)
        assert (await service.pipeline.stop(deadline_s=30)).unfinished == 0

    async def second_run() -> Service:
        labels = ZarrLabelSink(tmp_path)  # a new process: nothing but the store is left
        service = Service(labels)
        await service.pipeline.start()
        await service.send("a", {t: frames[t] for t in range(3, 6)})  # no start
        await service.source.push(encode_control(EndMessage(acquisition="a", frames=6)))
        summary = await service.summary("a")
        assert (summary.frames_received, summary.frames_ok, summary.frames_stored) == (3, 3, 6)
        (status,) = await service.pipeline.acquisitions()  # what GET /acquisitions reports
        assert (status["received"], status["stored_before"], status["frames_stored"]) == (3, 3, 6)
        await service.pipeline.stop(deadline_s=30)
        return service

    run(first_run())
    service = run(second_run())
    assert service.statuses("a") == {t: ("ok", None) for t in range(3, 6)}
    labels = ZarrLabelSink(tmp_path)
    stored = labels.stored("a")
    assert stored is not None and stored.closed
    assert stored.spec.sizes.t == 6 and stored.spec.pixel_size_um == 0.5
    assert stored.spec.declaration is not None and stored.spec.declaration["time_interval_s"] == 30.0
    labels.open_acquisition(stored.spec)
    state = labels.progress("a")
    assert [f.t for f in state.done] == list(range(6)) and state.failed == ()
    assert state.summary is not None and state.summary["frames_stored"] == 6
    assert service.pipeline.ledger["a"].stored_before == 3
    for t in range(6):
        expected = FakeSegmenter.cells_of(frames[t]).labels
        np.testing.assert_array_equal(labels.read_labels(FrameId("a", 0, t, 0)), expected)
