"""StreamPipeline without Ray: accounting of every frame, retries, poison frames, write failures, shutdown.

Real ZeroMQ sockets and a real in-process model; the segmenter seam is swapped for fakes only where a test
needs a failure the real model cannot produce on demand (a dying replica).
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from acquisition.client import FrameSender, ResultSubscriber
from acquisition.frames import FrameId
from acquisition.memory_sink import MemoryLabelSink
from acquisition.protocol import AcquisitionSummary
from cellsam_core.inference import segment
from cellsam_core.synthetic import synthetic_frame
from serving.config import ServiceConfig
from serving.deployments import DecodedFrame
from serving.pipeline import LocalSegmenter, RetryableError, StreamPipeline

pytestmark = pytest.mark.timeout(180)


def _config(**ingest: Any) -> ServiceConfig:
    return ServiceConfig.model_validate(
        {
            "ingest": {"endpoint": "tcp://127.0.0.1:*", "max_in_flight": 2, "queue_size": 4, **ingest},
            "results": {"endpoint": "tcp://127.0.0.1:*"},
            "retries": {"max_attempts": 3, "backoff_s": 0.01},
        }
    )


class FlakySegmenter(LocalSegmenter):
    """The real model, behind a replica that dies on the first attempt of chosen frames."""

    def __init__(self, *, model: Any, die_on: set[int], raise_on: set[int]) -> None:
        super().__init__(model=model)
        self.die_on = set(die_on)
        self.raise_on = raise_on
        self.calls = 0

    async def segment(self, image: np.ndarray, options: dict[str, Any]) -> DecodedFrame:
        marker = int(image[0, 0])
        self.calls += 1
        if marker in self.die_on:
            self.die_on.discard(marker)
            raise RetryableError("replica died")
        if marker in self.raise_on:
            raise ValueError("this frame makes the model raise")
        return await super().segment(image, options)


def _frames(n: int) -> list[np.ndarray]:
    frames = []
    for t in range(n):
        image = synthetic_frame((64, 80), seed=t, n_cells=5)[0]
        image[0, 0] = t  # a marker the fake replica reads
        frames.append(image)
    return frames


async def _run(pipeline: StreamPipeline, frames: list[np.ndarray], acquisition: str) -> tuple[list, Any]:
    await pipeline.start()
    sub = ResultSubscriber(endpoint=pipeline.endpoints["results"], acquisitions=[acquisition])
    await asyncio.to_thread(sub.wait_ready, 10)

    def send() -> None:
        with FrameSender(endpoint=pipeline.endpoints["ingest"], acquisition=acquisition) as tx:
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


def test_retries_poison_and_accounting(smoke_model):
    frames = _frames(6)
    sink = MemoryLabelSink()
    segmenter = FlakySegmenter(model=smoke_model, die_on={1, 4}, raise_on={3})
    pipeline = StreamPipeline(config=_config(), segmenter=segmenter, sink=sink)
    results, summary = asyncio.run(_run(pipeline, frames, "flaky"))
    assert summary.frames_received == 6 and summary.frames_ok == 5 and summary.frames_failed == 1
    failed = [r for r in results if r.status == "failed"]
    assert [(r.index.t, r.reason) for r in failed] == [(3, "model_error")]
    for t, frame in enumerate(frames):
        if t == 3:
            assert not sink.is_done(FrameId("flaky", 0, t, 0))
            continue
        np.testing.assert_array_equal(
            sink.read_labels(FrameId("flaky", 0, t, 0)), segment(frame, smoke_model).labels
        )
    metrics = pipeline.metrics
    assert metrics.retries.labels(deployment="model")._value.get() == 2
    assert metrics.failed.labels(reason="model_error")._value.get() == 1
    assert metrics.written._value.get() == 5
    assert sink.progress("flaky").closed


def test_replica_that_never_comes_back_fails_the_frame_after_bounded_attempts(smoke_model):
    class Dead(LocalSegmenter):
        async def segment(self, image, options):
            raise RetryableError("no replica")

    sink = MemoryLabelSink()
    pipeline = StreamPipeline(config=_config(), segmenter=Dead(model=smoke_model), sink=sink)
    results, summary = asyncio.run(_run(pipeline, _frames(2), "dead"))
    assert summary.frames_failed == 2 and summary.frames_ok == 0
    assert {r.reason for r in results} == {"replica_failure"}
    assert pipeline.metrics.retries.labels(deployment="model")._value.get() == 4  # 2 frames x 2 retries


@pytest.mark.parametrize("after_write", [False, True])
def test_write_failure_is_recorded_not_lost(smoke_model, after_write):
    class BrokenSink(MemoryLabelSink):
        def write(self, frame_id, labels, image=None, cells=None):
            if frame_id.t == 1:
                raise OSError("disk full")
            return super().write(frame_id, labels, image=image, cells=cells)

    sink = BrokenSink()
    config = _config().model_copy(
        update={"results": _config().results.model_copy(update={"after_write": after_write})}
    )
    pipeline = StreamPipeline(config=config, segmenter=LocalSegmenter(model=smoke_model), sink=sink)
    results, summary = asyncio.run(_run(pipeline, _frames(3), "broken"))
    assert summary.frames_ok == 2 and summary.frames_failed == 1
    assert [r.reason for r in results if r.status == "failed"] == ["write_error"]
    statuses = sorted((r.index.t, r.status) for r in results)
    ok_latency = [r.latency for r in results if r.status == "ok"]
    if after_write:
        # One result per frame, sent once the labels are stored: its latency includes the write.
        assert statuses == [(0, "ok"), (1, "failed"), (2, "ok")]
        assert all("write" in lat and lat["end_to_end"] >= lat["write"] for lat in ok_latency)
    else:
        # Feedback first: every frame's result goes out before the write; frame 1's failure follows it.
        assert statuses == [(0, "ok"), (1, "failed"), (1, "ok"), (2, "ok")]
        assert all("write" not in lat and "dispatch" in lat for lat in ok_latency)
        first_for_1 = next(r for r in results if r.index.t == 1)
        assert first_for_1.status == "ok"
    assert pipeline.metrics.written._value.get() == 2
    assert pipeline.metrics.stage_seconds.labels(stage="write")._sum.get() > 0


def test_stop_finishes_every_accepted_frame(smoke_model):
    frames = _frames(8)
    sink = MemoryLabelSink()

    async def scenario() -> StreamPipeline:
        pipeline = StreamPipeline(config=_config(), segmenter=LocalSegmenter(model=smoke_model), sink=sink)
        await pipeline.start()

        def send() -> None:
            with FrameSender(endpoint=pipeline.endpoints["ingest"], acquisition="stopping") as tx:
                for t, frame in enumerate(frames):
                    tx.send(frame, t=t)

        await asyncio.to_thread(send)
        while pipeline.listener.stats.accepted < 3:
            await asyncio.sleep(0.01)
        await pipeline.stop()  # with frames still queued and in flight
        return pipeline

    pipeline = asyncio.run(scenario())
    accepted = pipeline.listener.stats.accepted
    progress = pipeline.acquisitions["stopping"]
    assert accepted >= 3
    assert progress.ok + progress.failed == accepted and progress.failed == 0
    assert len(sink.progress("stopping").done) == accepted


def test_decoder_replica_decodes_with_the_configured_window_and_validates_live_updates() -> None:
    """The Decoder deployment class in this process: settings reach `decode`, bad updates are refused."""
    from pydantic import ValidationError

    from cellsam_core.checkpoint import BUNDLED_WEIGHTS
    from cellsam_core.inference import DecodeOptions, decode, encode
    from serving.deployments import Decoder, EncodedFrame

    replica = Decoder.func_or_class(model={"weights": str(BUNDLED_WEIGHTS)})
    assert replica.decoder_settings.window is None  # the model's own default (bundled nano: 32)
    image = synthetic_frame((256, 256), seed=11, modality="nuclear", n_cells=30)[0]
    encoded = EncodedFrame(encode(image, replica.model), 0.0, 1, {})
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
