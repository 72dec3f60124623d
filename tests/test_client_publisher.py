"""FrameSender -> FrameListener round trips and ResultPublisher -> ResultSubscriber, on real sockets.

Slow joiners: every subscriber calls ``wait_ready()`` (waits for the publisher's heartbeat, which can only
arrive after its data subscriptions reached the publisher) before anything is published.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import zmq

from acquisition.client import FrameSender, ResultSubscriber
from acquisition.errors import AcquisitionError, InvalidAcquisitionIdError, ProtocolError, SendTimeoutError
from acquisition.listener import FrameListener
from acquisition.outcome import FrameOutcome
from acquisition.protocol import AcquisitionSummary, FrameResult, Index
from acquisition.publisher import ResultPublisher
from acquisition.source import Rejected
from cellsam_core.cells import CellTable
from tests.acq_util import ANY_PORT, books, dead_endpoint, events_until_end, next_frame, next_frames, run

pytestmark = pytest.mark.timeout(60)


def cell_table(n_cells: int) -> CellTable:
    """``n_cells`` 2x2 cells side by side along x, with scores."""
    labels = np.zeros((4, 3 * max(n_cells, 1)), np.uint32)
    for i in range(n_cells):
        labels[1:3, 3 * i : 3 * i + 2] = i + 1
    return CellTable.from_labels(labels, scores=np.full(n_cells, 0.9))


def result(acq: str, t: int, n_cells: int = 2) -> FrameResult:
    table = cell_table(n_cells)
    return FrameResult(
        acquisition=acq,
        index=Index(t=t),
        n_cells=len(table),
        cells=FrameResult.cell_columns(table),
        latency={"encode": 0.01, "decode": 0.002},
        model="tiny",
    )


# -- FrameSender -> FrameListener ------------------------------------------------------------------


def test_sender_roundtrip_with_control_messages() -> None:
    async def main() -> None:
        async with FrameListener(endpoint=ANY_PORT) as listener:

            def acquire() -> None:
                with FrameSender(endpoint=listener.endpoint) as tx:
                    tx.start(
                        "exp7",
                        sizes={"t": 3, "p": 1},
                        channels={"names": ["DAPI", "CellMask"], "nuclear": 0, "whole_cell": 1},
                        settings={"model": "tiny"},
                        metadata={"pixel_size_um": 0.65},
                    )
                    for t in range(3):
                        image = np.full((16, 8, 2), t, np.uint16)
                        tx.send(image, t=t, p=0, z=0, metadata={"stage": [1, 2]}, exposure_ms=20)
                    # leaving the block sends `end` with frames=3

            await asyncio.to_thread(acquire)
            events = await events_until_end(listener, "exp7")
            entry = books(events)["exp7"]
            assert entry.start is not None and entry.start.settings == {"model": "tiny"}
            assert entry.start.metadata == {"pixel_size_um": 0.65}
            assert entry.start.sizes.t == 3 and entry.frames_declared == 3
            frames = entry.frames
            assert [f.index.t for f in frames] == [0, 1, 2]
            assert all(f.declaration == entry.start for f in frames)
            assert frames[1].header.metadata == {"stage": [1, 2], "exposure_ms": 20}
            assert frames[1].header.timestamp is not None
            assert frames[2].channels.whole_cell == 1
            np.testing.assert_array_equal(frames[2].data, np.full((16, 8, 2), 2, np.uint16))

    run(main())


def test_sender_converts_big_endian_arrays() -> None:
    async def main() -> None:
        async with FrameListener(endpoint=ANY_PORT) as listener:
            image = np.arange(20, dtype=">i4").reshape(4, 5)
            with FrameSender(endpoint=listener.endpoint, acquisition="be") as tx:
                tx.send(image)
            frame = await next_frame(listener)
            np.testing.assert_array_equal(frame.data, image)

    run(main())


def test_send_times_out_when_nobody_listens() -> None:
    with dead_endpoint() as nowhere:
        tx = FrameSender(endpoint=nowhere, acquisition="x", timeout=0.05, sndhwm=1, linger=0)
        with tx, pytest.raises(SendTimeoutError, match=r"within 0\.05 s"):
            for t in range(20):
                tx.send(np.zeros((4, 4), np.uint8), t=t)


def test_non_blocking_send_raises_immediately() -> None:
    with dead_endpoint() as nowhere:
        tx = FrameSender(endpoint=nowhere, acquisition="x", timeout=0, sndhwm=1, linger=0)
        with tx, pytest.raises(SendTimeoutError):
            for t in range(20):
                tx.send(np.zeros((4, 4), np.uint8), t=t)


def test_sender_validates_locally() -> None:
    with dead_endpoint() as nowhere, FrameSender(endpoint=nowhere, linger=0) as tx:
        with pytest.raises(AcquisitionError, match="no acquisition id"):
            tx.send(np.zeros((4, 4), np.uint8))
        with pytest.raises(ProtocolError) as info:
            tx.send(np.zeros((4, 4), np.bool_), acquisition="x")
        assert info.value.reason == "bad_dtype"
        with pytest.raises(ProtocolError) as info:
            tx.send(np.zeros((4,), np.uint8), acquisition="x")
        assert info.value.reason == "bad_shape"
        with pytest.raises(InvalidAcquisitionIdError) as bad_id:
            tx.send(np.zeros((4, 4), np.uint8), acquisition="../x")
        assert bad_id.value.reason == "bad_acquisition_id" and isinstance(bad_id.value, ProtocolError)


def test_context_manager_leaves_acquisition_open_after_an_error() -> None:
    async def main() -> None:
        async with FrameListener(endpoint=ANY_PORT) as listener:
            with (
                pytest.raises(RuntimeError),
                FrameSender(endpoint=listener.endpoint, acquisition="err") as tx,
            ):
                tx.start()
                tx.send(np.zeros((4, 4), np.uint8))
                raise RuntimeError("microscope fault")
            await next_frames(listener, 1)
            await asyncio.sleep(0.05)
            assert listener.stats.started == 1 and listener.stats.ended == 0

    run(main())


# -- ResultPublisher -> ResultSubscriber ------------------------------------------------------------


@pytest.fixture
def publisher() -> Any:
    with ResultPublisher(endpoint=ANY_PORT, heartbeat_interval=0.02) as pub:
        yield pub


def test_topics_filter_by_exact_acquisition(publisher: ResultPublisher) -> None:
    with (
        ResultSubscriber(endpoint=publisher.endpoint, acquisitions=["exp4"]) as sub4,
        ResultSubscriber(endpoint=publisher.endpoint, acquisitions=["exp42"]) as sub42,
        ResultSubscriber(endpoint=publisher.endpoint) as sub_all,
    ):
        for sub in (sub4, sub42, sub_all):
            sub.wait_ready(timeout=10)
        publisher.publish_result(result("exp42", 0))
        publisher.publish_result(result("exp4", 1, n_cells=3))
        publisher.publish_summary(AcquisitionSummary(acquisition="exp4", frames_received=1, frames_ok=1))

        got4 = [sub4.recv(timeout=10), sub4.recv(timeout=10)]
        assert [m.topic for m in got4] == ["r/exp4", "r/exp4"]  # r/exp42 matched the prefix but is dropped
        assert isinstance(got4[0].payload, FrameResult) and got4[0].payload.n_cells == 3
        assert isinstance(got4[1].payload, AcquisitionSummary) and got4[1].payload.frames_ok == 1
        assert got4[0].labels is None

        m42 = sub42.recv(timeout=10)
        assert m42.acquisition == "exp42" and m42.payload.index is not None  # type: ignore[union-attr]
        with pytest.raises(TimeoutError):
            sub42.recv(timeout=0.2)
        assert [sub_all.recv(timeout=10).acquisition for _ in range(3)] == ["exp42", "exp4", "exp4"]


def test_labels_only_for_subscribers_that_ask(publisher: ResultPublisher) -> None:
    labels = np.zeros((6, 5), np.uint16)
    labels[1:3, 1:3] = 1
    labels[4:6, 2:5] = 2
    assert not publisher.wants_labels("lab")
    with (
        ResultSubscriber(endpoint=publisher.endpoint, acquisitions=["lab"], labels=True) as with_labels,
        ResultSubscriber(endpoint=publisher.endpoint, acquisitions=["lab"]) as without,
    ):
        with_labels.wait_ready(timeout=10)
        without.wait_ready(timeout=10)
        publisher.publish_result(result("lab", 0), labels=labels)
        got = with_labels.recv(timeout=10)
        assert got.topic == "l/lab"
        assert got.labels is not None and got.labels.dtype == np.uint32
        np.testing.assert_array_equal(got.labels, labels)
        assert isinstance(got.payload, FrameResult) and got.payload.labels is not None
        plain = without.recv(timeout=10)
        assert (
            plain.labels is None and isinstance(plain.payload, FrameResult) and plain.payload.labels is None
        )
        assert publisher.wants_labels("lab")


def test_async_receive(publisher: ResultPublisher) -> None:
    with ResultSubscriber(endpoint=publisher.endpoint, acquisitions=["aio"]) as sub:
        sub.wait_ready(timeout=10)

        async def main() -> list[int]:
            publisher.publish_result(result("aio", 0))
            publisher.publish_result(result("aio", 1))
            out = []
            async for message in sub:
                assert isinstance(message.payload, FrameResult) and message.payload.index is not None
                out.append(message.payload.index.t)
                if len(out) == 2:
                    break
            return out

        assert run(main()) == [0, 1]
        with pytest.raises(TimeoutError):
            run(sub.arecv(timeout=0.1))


def test_rejections_from_the_listener_are_published(publisher: ResultPublisher) -> None:
    # The consumer turns each Rejected notice that names an acquisition into a rejected outcome.
    with ResultSubscriber(endpoint=publisher.endpoint) as sub:
        sub.wait_ready(timeout=10)

        async def main() -> None:
            async with FrameListener(endpoint=ANY_PORT) as listener:
                push: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.PUSH)
                push.connect(listener.endpoint)
                header = b'{"type":"frame","v":1,"acquisition":"rej","index":{"t":4},'
                header += b'"shape":[4,4],"dtype":"uint8"}'
                push.send_multipart([b"garbage", b""])  # no id: counted, not published
                push.send_multipart([header, b"abc"])  # size_mismatch for a known id: published
                push.close(linger=1000)
                for _ in range(2):
                    event = await listener.get()
                    assert isinstance(event, Rejected)
                    if event.acquisition is not None:
                        publisher.publish(
                            FrameOutcome(
                                event.acquisition,
                                event.index,
                                "rejected",
                                reason=event.reason,
                                detail=event.detail,
                            )
                        )
                assert sum(listener.stats.rejected.values()) == 2

        run(main())
        message = sub.recv(timeout=10)
        payload = message.payload
        assert isinstance(payload, FrameResult)
        assert (payload.acquisition, payload.status, payload.reason) == ("rej", "rejected", "size_mismatch")
        assert payload.index is not None and payload.index.t == 4
        assert payload.detail and "3 bytes" in payload.detail
        with pytest.raises(TimeoutError):
            sub.recv(timeout=0.2)


def test_wait_ready_times_out_without_publisher() -> None:
    with (
        dead_endpoint() as nowhere,
        ResultSubscriber(endpoint=nowhere) as sub,
        pytest.raises(TimeoutError, match="heartbeat"),
    ):
        sub.wait_ready(timeout=0.2)


def test_publish_validates_labels_and_outcomes_in_the_caller(publisher: ResultPublisher) -> None:
    with pytest.raises(ValueError, match="labels"):
        publisher.publish_result(result("x", 0), labels=np.zeros((2, 2, 2), np.uint32))
    with pytest.raises(ValueError, match="labels"):
        publisher.publish_result(result("x", 0), labels=np.zeros((2, 2), np.float32))
    bad = np.zeros((2, 2, 2), np.uint32)
    with pytest.raises(ValueError, match="labels"):
        publisher.publish(FrameOutcome("x", Index(), "ok", labels=bad, cells=CellTable.empty()))
    with pytest.raises(ValueError):
        publisher.publish(FrameOutcome("x", None, "maybe"))  # type: ignore[arg-type]
    assert publisher.published == 0
