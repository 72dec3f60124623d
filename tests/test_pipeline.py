"""StreamPipeline without Ray: accounting of every frame, retries, poison frames, write failures, shutdown.

Most tests run the pipeline over in-memory implementations of all four seams (source, segmenter, label
sink, result sink), so each guarantee is checked on its own; one runs it over real ZeroMQ sockets and the
real model in this process.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from skimage.measure import label as connected_components

from acquisition.client import FrameSender, ResultSubscriber
from acquisition.frames import FrameId
from acquisition.listener import FrameListener
from acquisition.memory_sink import MemoryLabelSink
from acquisition.protocol import AcquisitionSummary, EndMessage, StartMessage
from acquisition.publisher import ResultPublisher
from acquisition.results import MemoryResultSink
from acquisition.source import MemoryFrameSource
from acquisition.wire import encode_control, encode_frame, frame_header
from cellsam_core.cells import CellTable
from cellsam_core.inference import Segmentation, segment
from cellsam_core.synthetic import synthetic_frame
from serving.config import ServiceConfig
from serving.pipeline import StreamPipeline
from serving.segmenter import DecodedFrame, LocalSegmenter, RetryableError
from tests.acq_util import untracked

pytestmark = pytest.mark.timeout(180)


def _config(*, after_write: bool = False, **ingest: Any) -> ServiceConfig:
    return ServiceConfig.model_validate(
        {
            "ingest": {"endpoint": "tcp://127.0.0.1:*", "max_concurrent": 2, "max_queued": 4, **ingest},
            "results": {"endpoint": "tcp://127.0.0.1:*", "after_write": after_write},
            "retries": {"max_attempts": 3, "backoff_s": 0.01},
        }
    )


class FakeSegmenter:
    """A `Segmenter` without a model: cells are the connected components above the frame's mean.

    Frames whose pixel (0, 0) is in ``die_on`` fail once as a dead replica would; in ``raise_on``, always
    as a frame the model cannot take. ``gate``, when set, holds every call until it is set.
    """

    def __init__(self, *, die_on: set[int] | None = None, raise_on: set[int] | None = None) -> None:
        self.die_on = set(die_on or ())
        self.raise_on = set(raise_on or ())
        self.calls = 0
        self.gate: asyncio.Event | None = None

    @staticmethod
    def cells_of(image: np.ndarray) -> Segmentation:
        labels = connected_components(image > image.mean()).astype(np.uint32)
        scores = np.linspace(0.5, 0.9, int(labels.max()))
        return Segmentation(labels=labels, cells=CellTable.from_labels(labels, scores=scores), timings={})

    async def segment(self, image: np.ndarray) -> DecodedFrame:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if image.ndim == 3:  # several channels: cells are where any channel is bright
            image = image.max(axis=-1)
        marker = int(image[0, 0])
        if marker in self.die_on:
            self.die_on.discard(marker)
            raise RetryableError("replica died")
        if marker in self.raise_on:
            raise ValueError("this frame makes the model raise")
        await asyncio.sleep(0)
        return DecodedFrame(self.cells_of(image), 0.001, 0.002, 1, 1024)

    def is_retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, RetryableError)


def _frames(n: int, shape: tuple[int, int] = (64, 80)) -> list[np.ndarray]:
    frames = []
    for t in range(n):
        image = synthetic_frame(shape, seed=t, n_cells=5)[0]
        image[0, 0] = t  # a marker the fake segmenter reads
        frames.append(image)
    return frames


def _frame_parts(acquisition: str, image: np.ndarray, **index: int) -> list[Any]:
    return encode_frame(frame_header(image.shape, image.dtype, acquisition=acquisition, index=index), image)


class Rig:
    """A pipeline over in-memory seams, with helpers to feed it."""

    def __init__(self, segmenter: Any = None, config: ServiceConfig | None = None, **source: Any) -> None:
        self.config = config or _config()
        self.source = MemoryFrameSource(max_queued=self.config.ingest.max_queued, **source)
        self.segmenter = segmenter or FakeSegmenter()
        self.labels = MemoryLabelSink()
        self.results = MemoryResultSink()
        self.pipeline = StreamPipeline(
            source=self.source,
            segmenter=self.segmenter,
            labels=self.labels,
            results=self.results,
            config=self.config,
            model_name="fake",
        )

    async def acquire(self, acquisition: str, frames: list[np.ndarray], **start: Any) -> None:
        await self.source.push(encode_control(StartMessage(acquisition=acquisition, **start)))
        for t, frame in enumerate(frames):
            await self.source.push(_frame_parts(acquisition, frame, t=t))
        await self.source.push(encode_control(EndMessage(acquisition=acquisition, frames=len(frames))))

    def run(self, acquisition: str, frames: list[np.ndarray], **start: Any) -> AcquisitionSummary:
        """Start the pipeline, play one whole acquisition through it, stop it; return its summary."""

        async def scenario() -> AcquisitionSummary:
            await self.pipeline.start()
            await self.acquire(acquisition, frames, **start)
            summary = await self.summary(acquisition)
            await self.pipeline.stop()
            return summary

        return run(scenario())

    async def summary(self, acquisition: str, timeout: float = 60) -> AcquisitionSummary:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for summary in self.results.summaries:
                if summary.acquisition == acquisition:
                    return summary
            if loop.time() > deadline:
                raise TimeoutError(f"no summary for {acquisition}")
            await asyncio.sleep(0.005)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_one_cell_record_from_segmenter_to_store_and_results() -> None:
    frames = _frames(4)
    rig = Rig()

    summary = rig.run("cells", frames, metadata={"pixel_size_um": 0.25})
    assert (summary.frames_received, summary.frames_ok, summary.frames_failed) == (4, 4, 0)
    results = rig.results.for_acquisition("cells")
    assert sorted(r.index.t for r in results if r.index is not None) == [0, 1, 2, 3]
    for t, frame in enumerate(frames):
        expected = FakeSegmenter.cells_of(frame)
        frame_id = FrameId("cells", 0, t, 0)
        np.testing.assert_array_equal(rig.labels.read_labels(frame_id), expected.labels)
        stored = rig.labels.read_cells(frame_id)
        want = expected.cells.with_pixel_size(0.25).with_intensities(expected.labels, frame, ["c0"])
        assert "track_id" in stored.measurements  # linked over time once stored
        stored = untracked(stored)
        assert stored.equals(want) and len(stored) > 0
        assert stored.measurements["intensity_mean_c0"][0] == frame[expected.labels == stored.label[0]].mean()
        np.testing.assert_allclose(stored.area_um2, stored.area * 0.0625)
        published = next(r for r in results if r.index is not None and r.index.t == t)
        assert published.status == "ok" and published.model == "fake"
        assert published.n_cells == len(stored)
        assert published.centroids == [tuple(c) for c in stored.centroid]  # (y, x) on both sides
        np.testing.assert_array_equal(published.cells["area_um2"], stored.area_um2)
        np.testing.assert_array_equal(published.cells["bbox_x1"], stored.bbox[:, 3])
        assert published.cell_table().with_pixel_size(0.25).equals(stored)
    entry = rig.pipeline.ledger["cells"]
    assert (entry.received, entry.segmented, entry.ok, entry.stored, entry.failed, entry.pending) == (
        4,
        4,
        4,
        4,
        0,
        0,
    )
    assert entry.closed and rig.labels.progress("cells").closed
    assert rig.labels.progress("cells").summary == summary.model_dump(mode="json")
    assert rig.results.closed


def test_retries_poison_and_accounting_over_memory_seams() -> None:
    rig = Rig(FakeSegmenter(die_on={1, 4}, raise_on={3}))

    summary = rig.run("flaky", _frames(6))
    assert summary.frames_received == 6 and summary.frames_ok == 5 and summary.frames_failed == 1
    failed = [r for r in rig.results.results if r.status == "failed"]
    assert [(r.index.t, r.reason) for r in failed if r.index] == [(3, "model_error")]
    assert not rig.labels.is_done(FrameId("flaky", 0, 3, 0))
    metrics = rig.pipeline.metrics
    assert metrics.retries.labels(deployment="model")._value.get() == 2
    assert metrics.failed.labels(reason="model_error")._value.get() == 1
    assert metrics.written._value.get() == 5
    assert rig.pipeline.ledger["flaky"].failures == {"model_error": 1}


def test_replica_that_never_comes_back_fails_the_frame_after_bounded_attempts() -> None:
    class Dead(FakeSegmenter):
        async def segment(self, image: np.ndarray) -> DecodedFrame:
            raise RetryableError("no replica")

    rig = Rig(Dead())

    summary = rig.run("dead", _frames(2))
    assert summary.frames_failed == 2 and summary.frames_ok == 0
    assert {r.reason for r in rig.results.results} == {"replica_failure"}
    assert rig.pipeline.metrics.retries.labels(deployment="model")._value.get() == 4  # 2 frames x 2 retries


@pytest.mark.parametrize("after_write", [False, True])
def test_write_failure_is_recorded_not_lost(after_write: bool) -> None:
    class BrokenSink(MemoryLabelSink):
        def write(self, frame_id, labels, image=None, cells=None):  # type: ignore[no-untyped-def]
            if frame_id.t == 1:
                raise OSError("disk full")
            return super().write(frame_id, labels, image=image, cells=cells)

    rig = Rig(config=_config(after_write=after_write))
    rig.labels = BrokenSink()
    rig.pipeline.labels = rig.labels

    summary = rig.run("broken", _frames(3))
    results = rig.results.results
    assert summary.frames_ok == 2 and summary.frames_failed == 1
    assert [r.reason for r in results if r.status == "failed"] == ["write_error"]
    statuses = sorted((r.index.t, r.status) for r in results if r.index is not None)
    ok_latency = [r.latency for r in results if r.status == "ok"]
    if after_write:
        # One result per frame, sent once the labels are stored: its latency includes the write.
        assert statuses == [(0, "ok"), (1, "failed"), (2, "ok")]
        assert all("write" in lat and lat["end_to_end"] >= lat["write"] for lat in ok_latency)
    else:
        # Feedback first: every frame's result goes out before the write; frame 1's failure follows it.
        assert statuses == [(0, "ok"), (1, "failed"), (1, "ok"), (2, "ok")]
        assert all("write" not in lat and "dispatch" in lat for lat in ok_latency)
        first_for_1 = next(r for r in results if r.index is not None and r.index.t == 1)
        assert first_for_1.status == "ok"
    entry = rig.pipeline.ledger["broken"]
    assert (entry.segmented, entry.ok, entry.failed) == (3, 2, 1)
    assert rig.pipeline.metrics.written._value.get() == 2


def test_rejections_are_published_and_booked_and_end_reopens_with_start() -> None:
    rig = Rig()

    async def scenario() -> None:
        await rig.pipeline.start()
        frame = _frames(1)[0]
        await rig.acquire("rej", [frame])
        await rig.summary("rej")
        await rig.source.push(_frame_parts("rej", frame, t=5))  # after end: rejected
        bad = _frame_parts("rej", frame, t=6)
        await rig.source.push([bad[0], b"short"])  # size mismatch, id readable
        await rig.source.push([b"{not json", b"x"])  # id unreadable: counted, not published
        rig.results.summaries.clear()
        await rig.acquire("rej", [frame, frame])  # a new start re-opens with fresh books
        await rig.summary("rej")
        await rig.pipeline.stop()

    run(scenario())
    rejected = [r for r in rig.results.results if r.status == "rejected"]
    assert [(r.reason, r.index.t if r.index else None) for r in rejected] == [
        ("acquisition_ended", 5),
        ("size_mismatch", 6),
    ]
    metrics = rig.pipeline.metrics
    assert metrics.rejected.labels(reason="bad_json")._value.get() == 1
    entry = rig.pipeline.ledger["rej"]
    assert (entry.received, entry.ok, entry.rejected) == (2, 2, 0)
    assert rig.labels.is_done(FrameId("rej", 0, 1, 0))


def test_live_mode_drops_are_booked_in_the_summary() -> None:
    segmenter = FakeSegmenter()
    rig = Rig(segmenter, config=_config(live=True, max_concurrent=1, max_queued=2), live=True)

    async def scenario() -> AcquisitionSummary:
        segmenter.gate = asyncio.Event()  # the model is stuck while frames keep coming
        await rig.pipeline.start()
        await rig.acquire("live", _frames(10))
        segmenter.gate.set()
        summary = await rig.summary("live")
        await rig.pipeline.stop()
        return summary

    summary = run(scenario())
    assert summary.frames_dropped > 0
    assert summary.frames_received == 10 == summary.frames_ok + summary.frames_dropped
    assert len(rig.labels.progress("live").done) == summary.frames_ok
    assert rig.pipeline.metrics.dropped.labels(reason="live_overflow")._value.get() == summary.frames_dropped


def test_stop_finishes_every_accepted_frame() -> None:
    segmenter = FakeSegmenter()
    rig = Rig(segmenter)

    async def scenario() -> None:
        segmenter.gate = asyncio.Event()
        await rig.pipeline.start()
        for t, frame in enumerate(_frames(6)):
            await rig.source.push(_frame_parts("stopping", frame, t=t))
        stopping = asyncio.create_task(rig.pipeline.stop())  # frames still queued and in flight
        await asyncio.sleep(0.05)
        segmenter.gate.set()
        await stopping

    run(scenario())
    entry = rig.pipeline.ledger["stopping"]
    assert entry.received == 6 == rig.source.stats.accepted
    assert entry.ok == 6 and entry.failed == 0 and entry.pending == 0
    assert len(rig.labels.progress("stopping").done) == 6


def test_real_sockets_and_model_give_the_model_labels(smoke_model: Any) -> None:
    """The ZeroMQ listener and publisher and the real model in this process, end to end."""
    frames = _frames(3)
    config = _config()
    labels = MemoryLabelSink()
    pipeline = StreamPipeline(
        source=FrameListener(endpoint=config.ingest.endpoint, max_queued=config.ingest.max_queued),
        segmenter=LocalSegmenter(model=smoke_model),
        labels=labels,
        results=ResultPublisher(endpoint=config.results.endpoint),
        config=config,
    )

    async def scenario() -> tuple[list[Any], AcquisitionSummary]:
        await pipeline.start()
        sub = ResultSubscriber(endpoint=pipeline.endpoints["results"], acquisitions=["real"])
        await asyncio.to_thread(sub.wait_ready, 10)

        def send() -> None:
            with FrameSender(endpoint=pipeline.endpoints["ingest"], acquisition="real") as tx:
                tx.start(sizes={"t": len(frames)})
                for t, frame in enumerate(frames):
                    tx.send(frame, t=t)

        await asyncio.to_thread(send)
        results = []
        while True:
            message = await asyncio.to_thread(sub.recv, 60)
            if isinstance(message.payload, AcquisitionSummary):
                summary = message.payload
                break
            results.append(message.payload)
        sub.close()
        await pipeline.stop()
        return results, summary

    results, summary = run(scenario())
    assert summary.frames_ok == 3
    for t, frame in enumerate(frames):
        expected = segment(frame, smoke_model)
        frame_id = FrameId("real", 0, t, 0)
        np.testing.assert_array_equal(labels.read_labels(frame_id), expected.labels)
        want = expected.cells.with_intensities(expected.labels, frame, ["c0"])
        assert untracked(labels.read_cells(frame_id)).equals(want)
        published = next(r for r in results if r.index.t == t)
        assert published.cell_table().equals(want)


def test_decoder_replica_decodes_with_the_configured_window_and_validates_live_updates() -> None:
    """The Decoder deployment class in this process: settings reach `decode`, bad updates are refused."""
    from pydantic import ValidationError

    from cellsam_core.checkpoint import BUNDLED_WEIGHTS
    from cellsam_core.inference import DecodeOptions, decode, encode
    from serving.deployments import Decoder, EncodedFrame

    replica = Decoder.func_or_class(model={"weights": str(BUNDLED_WEIGHTS)})
    assert replica.decoder_settings.window is None  # the model's own default (bundled nano: 32)
    image = synthetic_frame((256, 256), seed=11, modality="nuclear", n_cells=30)[0]
    encoded = EncodedFrame(encode(image, replica.model), 0.0, 1)
    windowed = replica._run(encoded)
    np.testing.assert_array_equal(windowed.labels, decode(encoded.embedding, replica.model).labels)
    replica.reconfigure({"window": "full"})
    full = replica._run(encoded)
    expected = decode(encoded.embedding, replica.model, DecodeOptions(window="full"))
    np.testing.assert_array_equal(full.labels, expected.labels)
    assert not np.array_equal(full.labels, windowed.labels)  # the setting changed the computation
    with pytest.raises(ValidationError):
        replica.reconfigure({"window": 0})
    assert replica.decoder_settings.window == "full"


# -- channel assembly ------------------------------------------------------------------------------


class RecordingSegmenter(FakeSegmenter):
    """Keeps every model input it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[np.ndarray] = []

    async def segment(self, image: np.ndarray) -> DecodedFrame:
        self.inputs.append(np.array(image))
        return DecodedFrame(self.cells_of(image.max(axis=-1) if image.ndim == 3 else image), 0.0, 0.0, 1, 1)


def _two_channels(t: int) -> tuple[np.ndarray, np.ndarray]:
    membrane = synthetic_frame((64, 80), seed=100 + t, n_cells=5, modality="whole_cell")[0]
    nuclei = synthetic_frame((64, 80), seed=t, n_cells=5)[0]
    return membrane, nuclei


def test_per_channel_frames_are_assembled_segmented_once_and_stored_whole() -> None:
    segmenter = RecordingSegmenter()
    rig = Rig(segmenter)
    declaration = {
        "sizes": {"t": 2, "c": 2},
        "channels": {"names": ["membrane", "H2B"], "roles": ["whole_cell", "nuclear"]},
        "pixel_size_um": 0.5,
    }
    frames = {t: _two_channels(t) for t in range(2)}

    async def scenario() -> AcquisitionSummary:
        await rig.pipeline.start()
        await rig.source.push(encode_control(StartMessage(acquisition="mc", **declaration)))
        for t, (membrane, nuclei) in frames.items():
            await rig.source.push(_frame_parts("mc", nuclei, t=t, c=1))  # any channel order
            await rig.source.push(_frame_parts("mc", membrane, t=t, c=0))
        await rig.source.push(encode_control(EndMessage(acquisition="mc")))
        summary = await rig.summary("mc")
        await rig.pipeline.stop()
        return summary

    summary = run(scenario())
    assert (summary.frames_received, summary.frames_ok, summary.frames_failed) == (4, 4, 0)
    assert len(segmenter.inputs) == 2  # once per (t, p, z), not per channel
    results = rig.results.for_acquisition("mc")
    assert [(r.index.t, r.index.c, r.status) for r in results if r.index] == [
        (0, None, "ok"),
        (1, None, "ok"),
    ]
    for t, (membrane, nuclei) in frames.items():
        # The model's blank / nuclear / whole-cell layout, from the declared roles.
        model_in = segmenter.inputs[t]
        assert model_in.shape == (64, 80, 3)
        np.testing.assert_array_equal(model_in[..., 1], nuclei)
        np.testing.assert_array_equal(model_in[..., 2], membrane)
        assert not model_in[..., 0].any()
        frame_id = FrameId("mc", 0, t, 0)
        np.testing.assert_array_equal(rig.labels.read_image(frame_id), np.stack([membrane, nuclei]))
        cells = rig.labels.read_cells(frame_id)
        labels = rig.labels.read_labels(frame_id)
        for name, channel in (("membrane", membrane), ("H2B", nuclei)):
            mean = cells.measurements[f"intensity_mean_{name}"]
            for row, label in enumerate(cells.label):
                assert mean[row] == pytest.approx(channel[labels == label].mean())
        np.testing.assert_allclose(cells.centroid_um, cells.centroid * 0.5)
        published = next(r for r in results if r.index is not None and r.index.t == t)
        assert published.cell_table().with_pixel_size(0.5).equals(untracked(cells))


def test_incomplete_sets_fail_with_their_own_reason() -> None:
    config = _config().model_copy(
        update={"assembly": _config().assembly.model_copy(update={"timeout_s": 0.2, "max_pending_sets": 2})}
    )
    rig = Rig(RecordingSegmenter(), config=config)
    membrane, nuclei = _two_channels(0)

    async def scenario() -> AcquisitionSummary:
        await rig.pipeline.start()
        await rig.source.push(encode_control(StartMessage(acquisition="inc", sizes={"c": 2})))
        await rig.source.push(_frame_parts("inc", nuclei, t=0, c=1))  # c=0 never comes: times out
        await asyncio.sleep(0.6)
        for t in (1, 2, 3):  # three incomplete sets, two may wait: t=1 is evicted
            await rig.source.push(_frame_parts("inc", nuclei, t=t, c=1))
        await rig.source.push(_frame_parts("inc", membrane, t=4))  # a single buffer... of one channel
        await rig.source.push(encode_control(EndMessage(acquisition="inc")))  # t=2, 3 can't complete now
        summary = await rig.summary("inc")
        await rig.pipeline.stop()
        return summary

    summary = run(scenario())
    failed = [r for r in rig.results.for_acquisition("inc") if r.status == "failed"]
    assert [(r.index.t, r.index.c, r.reason) for r in failed if r.index] == [
        (0, 1, "incomplete_channels"),
        (1, 1, "incomplete_channels"),
        (2, 1, "incomplete_channels"),
        (3, 1, "incomplete_channels"),
    ]
    assert "[0]" in (failed[0].detail or "") and "0.2 s" in (failed[0].detail or "")
    assert "incomplete sets" in (failed[1].detail or "") and "ended" in (failed[2].detail or "")
    assert (summary.frames_received, summary.frames_failed, summary.frames_rejected) == (4, 4, 1)
    # The single-channel buffer of a two-channel acquisition was refused when it arrived.
    rejected = [r for r in rig.results.for_acquisition("inc") if r.status == "rejected"]
    assert [(r.index.t, r.reason) for r in rejected if r.index] == [(4, "layout_conflict")]
    assert rig.pipeline.ledger["inc"].failures == {"incomplete_channels": 4}
    assert rig.pipeline.assembler.pending == 0


def test_per_channel_acquisition_over_real_sockets(smoke_model: Any) -> None:
    """FrameSender → FrameListener → pipeline: per-channel frames, one incomplete set, the real model."""
    config = ServiceConfig.model_validate(
        {**_config().model_dump(), "assembly": {"timeout_s": 30.0, "max_pending_sets": 8}}
    )
    labels = MemoryLabelSink()
    pipeline = StreamPipeline(
        source=FrameListener(endpoint=config.ingest.endpoint, max_queued=config.ingest.max_queued),
        segmenter=LocalSegmenter(model=smoke_model),
        labels=labels,
        results=MemoryResultSink(),
        config=config,
    )
    frames = {t: _two_channels(t) for t in range(2)}

    async def scenario() -> AcquisitionSummary:
        await pipeline.start()

        def send() -> None:
            with FrameSender(endpoint=pipeline.endpoints["ingest"], acquisition="real-mc") as tx:
                tx.start(
                    sizes={"t": 3, "c": 2}, channels={"names": ["nuc", "mem"], "nuclear": 0, "whole_cell": 1}
                )
                for t, (membrane, nuclei) in frames.items():
                    tx.send(nuclei, t=t, c=0)
                    tx.send(membrane, t=t, c=1)
                tx.send(frames[0][1], t=2, c=0)  # its membrane never comes

        await asyncio.to_thread(send)
        results = pipeline.results
        assert isinstance(results, MemoryResultSink)
        while not results.summaries:
            await asyncio.sleep(0.01)
        await pipeline.stop()
        return results.summaries[0]

    summary = run(scenario())
    assert (summary.frames_received, summary.frames_ok, summary.frames_failed) == (5, 4, 1)
    for t, (membrane, nuclei) in frames.items():
        frame_id = FrameId("real-mc", 0, t, 0)
        np.testing.assert_array_equal(labels.read_image(frame_id), np.stack([nuclei, membrane]))
        model_in = np.stack([np.zeros_like(nuclei), nuclei, membrane], axis=-1)
        np.testing.assert_array_equal(labels.read_labels(frame_id), segment(model_in, smoke_model).labels)
    assert not labels.is_done(FrameId("real-mc", 0, 2, 0))
