"""FrameListener over real ZeroMQ sockets on loopback (ports picked by the OS).

What every frame source must do (order, rejections, live drops, stop, several consumers) is in
``tests/test_source_conformance.py``, which runs against the listener too; this file keeps what is the
listener's own: ZeroMQ flow control, zero-copy frames, the socket and real senders.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import numpy as np
import pytest
import zmq

from acquisition.client import FrameSender
from acquisition.errors import SendTimeoutError
from acquisition.frames import Frame, FrameId
from acquisition.listener import FrameListener
from acquisition.protocol import Index
from acquisition.source import Ended, Rejected, SourceEvent, Started
from tests.acq_util import (
    ANY_PORT,
    books,
    drain,
    events_until_end,
    frames_in,
    next_frame,
    next_frames,
    run,
    until,
)

pytestmark = pytest.mark.timeout(60)


def push_socket(endpoint: str) -> zmq.Socket[Any]:
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(endpoint)
    return sock


def frame_parts(acq: str = "a1", t: int = 0, shape: tuple[int, ...] = (4, 5), **extra: Any) -> list[Any]:
    image = np.full(shape, t, np.uint16)
    header = {"type": "frame", "v": 1, "acquisition": acq, "index": {"t": t}, "shape": list(shape)}
    header["dtype"] = "uint16"
    header.update(extra)
    return [json.dumps(header).encode(), image]


def test_accepts_valid_and_counts_rejections_by_reason() -> None:
    async def main() -> None:
        async with FrameListener(endpoint=ANY_PORT) as listener:
            sock = push_socket(listener.endpoint)
            sock.send_multipart(frame_parts(t=0))
            sock.send_multipart([b"{not json", b"x"])  # bad_json, id unknown
            sock.send_multipart([frame_parts(t=1)[0], b"short"])  # size_mismatch, id known
            sock.send_multipart(frame_parts(t=2, dtype="complex64"))  # bad_dtype
            sock.send_multipart([json.dumps({"type": "stop", "v": 1}).encode()])  # unknown_type
            sock.send_multipart([*frame_parts(t=3), b"extra"])  # bad_multipart
            sock.send_multipart(frame_parts(t=4))
            events = [await listener.get() for _ in range(7)]
            sock.close()
            assert listener.stats.received == 7
            assert [f.index.t for f in frames_in(events)] == [0, 4]
            assert isinstance(events[0], Frame) and isinstance(events[6], Frame)
            rejected = [e for e in events if isinstance(e, Rejected)]
            assert [e.reason for e in rejected] == [
                "bad_json",
                "size_mismatch",
                "bad_dtype",
                "unknown_type",
                "bad_multipart",
            ]
            assert rejected[0].acquisition is None and rejected[0].index is None
            assert rejected[1].acquisition == "a1" and rejected[1].index == Index(t=1)
            assert all(e.detail for e in rejected)
            stats = listener.stats.as_dict()
            assert stats["accepted"] == 2
            assert stats["rejected"] == {
                "bad_json": 1,
                "size_mismatch": 1,
                "bad_dtype": 1,
                "unknown_type": 1,
                "bad_multipart": 1,
            }
            assert len(books(events)["a1"].rejected) == 3  # size, dtype, multipart

    run(main())


def test_garbage_never_kills_the_listener() -> None:
    rng = np.random.default_rng(0)

    async def main() -> None:
        async with FrameListener(endpoint=ANY_PORT) as listener:
            sock = push_socket(listener.endpoint)
            for _ in range(100):
                n_parts = int(rng.integers(1, 4))
                sock.send_multipart([rng.bytes(int(rng.integers(0, 64))) for _ in range(n_parts)])
            sock.send_multipart(frame_parts(t=9))
            events = [await listener.get() for _ in range(101)]
            sock.close()
            assert all(isinstance(e, Rejected) for e in events[:100])
            assert isinstance(events[100], Frame) and events[100].index.t == 9
            assert listener.stats.received == 101
            assert sum(listener.stats.rejected.values()) == 100

    run(main())


def test_an_internal_error_on_one_message_is_contained(monkeypatch: pytest.MonkeyPatch) -> None:
    # The listener's own guarantee that replaced "callback errors are contained": whatever goes wrong
    # while handling one message becomes a rejection (reason `internal`), and the next message is read.
    import acquisition.intake

    real_decode = acquisition.intake.decode_message

    def flaky_decode(parts: Any, **kwargs: Any) -> Any:
        if bytes(parts[0]) == b"boom":
            raise RuntimeError("decoder bug")
        return real_decode(parts, **kwargs)

    monkeypatch.setattr(acquisition.intake, "decode_message", flaky_decode)

    async def main() -> None:
        async with FrameListener(endpoint=ANY_PORT) as listener:
            sock = push_socket(listener.endpoint)
            sock.send_multipart([b"boom"])
            sock.send_multipart(frame_parts(t=1))
            rejected, frame = await listener.get(), await listener.get()
            sock.close()
            assert isinstance(rejected, Rejected) and rejected.reason == "internal"
            assert "RuntimeError: decoder bug" in rejected.detail
            assert isinstance(frame, Frame) and frame.index.t == 1
            assert listener.stats.rejected == {"internal": 1}

    run(main())


def test_frames_of_an_unstarted_acquisition_use_defaults() -> None:
    async def main() -> None:
        async with FrameListener(endpoint=ANY_PORT) as listener:
            sock = push_socket(listener.endpoint)
            sock.send_multipart(frame_parts("never-started", shape=(4, 4)))
            sock.send_multipart(frame_parts("two-channel", shape=(4, 4, 2)))
            one, two = await listener.get(), await listener.get()
            sock.close()
            assert isinstance(one, Frame) and isinstance(two, Frame)
            assert one.id == FrameId("never-started", 0, 0, 0)
            assert one.declaration is None
            assert one.channels.nuclear is None and one.channels.whole_cell is None
            assert (two.channels.nuclear, two.channels.whole_cell) == (0, 1)
            entry = books([one, two])["never-started"]
            assert entry.start is None and not entry.ended and len(entry.frames) == 1

    run(main())


def test_start_declares_channels_and_end_closes() -> None:
    async def main() -> None:
        async with FrameListener(endpoint=ANY_PORT) as listener:
            with FrameSender(endpoint=listener.endpoint, acquisition="exp") as tx:
                tx.start(sizes={"t": 2}, channels={"names": ["GFP", "H2B"], "nuclear": 1, "whole_cell": 0})
                tx.send(np.zeros((4, 4, 2), np.uint8), t=0)
                tx.end()
                tx.send(np.zeros((4, 4, 2), np.uint8), t=1)  # after end: rejected
                tx.start(sizes={"t": 2})  # re-opens, laid out as before (its store exists)
                tx.send(np.zeros((4, 4, 2), np.uint8), t=1)
            # The first `end`, then the `end` sent on leaving the block.
            events = await events_until_end(listener, "exp")
            events += await events_until_end(listener, "exp")
            kinds = [type(e).__name__ for e in events]
            assert kinds == ["Started", "Frame", "Ended", "Rejected", "Started", "Frame", "Ended"]
            first, second = frames_in(events)
            assert first.channels.names == ("GFP", "H2B") and first.channels.nuclear == 1
            assert first.declaration is not None and first.declaration.sizes.t == 2
            assert second.index.t == 1
            late = events[3]
            assert isinstance(late, Rejected) and late.reason == "acquisition_ended"
            assert (late.acquisition, late.index) == ("exp", Index(t=1))
            assert listener.stats.rejected["acquisition_ended"] == 1
            assert listener.stats.started == 2 and listener.stats.ended == 2
            entry = books(events)["exp"]
            # Counts restart on re-open; the clean exit of the with-block ended it with its frame count.
            assert entry.ended and len(entry.frames) == 1 and entry.frames_declared == 1

    run(main())


def test_frames_are_zero_copy_views_of_the_zmq_message() -> None:
    async def main() -> None:
        async with FrameListener(endpoint=ANY_PORT) as listener:
            sock = push_socket(listener.endpoint)
            image = np.arange(256 * 512, dtype=np.uint16).reshape(256, 512)
            sock.send_multipart([frame_parts(shape=image.shape)[0], image.data])
            frame = await next_frame(listener)
            sock.close()
            np.testing.assert_array_equal(frame.data, image)
            assert not frame.data.flags.writeable
            base: Any = frame.data
            while isinstance(base, np.ndarray | memoryview):
                base = base.base if isinstance(base, np.ndarray) else base.obj
            assert isinstance(base, zmq.Frame)  # the received message itself keeps the pixels alive
            assert np.shares_memory(frame.data, np.frombuffer(base.buffer, np.uint8))

    run(main())


def test_backpressure_blocks_the_sender_without_losing_frames() -> None:
    n_frames = 40
    timed_out = threading.Event()
    timeouts: list[int] = []

    def small_buffers(sock: zmq.Socket[Any]) -> None:
        # Small kernel buffers so the queues fill after a few frames, not after megabytes.
        sock.setsockopt(zmq.SNDBUF, 64 * 1024)
        sock.setsockopt(zmq.RCVBUF, 64 * 1024)

    def produce(endpoint: str) -> None:
        with FrameSender(
            endpoint=endpoint, acquisition="bp", timeout=0.05, sndhwm=1, socket_options=small_buffers
        ) as tx:
            for t in range(n_frames):
                while True:
                    try:
                        tx.send(np.full((256, 256), t, np.uint16), t=t)
                        break
                    except SendTimeoutError:
                        timeouts.append(t)
                        timed_out.set()

    async def main() -> None:
        async with FrameListener(
            endpoint=ANY_PORT, max_queued=2, rcvhwm=1, socket_options=small_buffers
        ) as listener:
            producer = asyncio.create_task(asyncio.to_thread(produce, listener.endpoint))
            # The consumer is stalled until the sender has felt the backpressure.
            await asyncio.to_thread(timed_out.wait, 20)
            assert timed_out.is_set(), "the sender never blocked"
            assert listener.queue_depth <= 2
            got = await next_frames(listener, n_frames)
            await producer
            assert [f.index.t for f in got] == list(range(n_frames))
            assert all(int(f.data[0, 0]) == f.index.t for f in got)
            assert not listener.stats.dropped
            assert timeouts

    run(main())


def test_stop_with_frames_in_flight_loses_no_accepted_frame() -> None:
    async def main() -> None:
        listener = FrameListener(endpoint=ANY_PORT, max_queued=2)
        await listener.start()
        sock = push_socket(listener.endpoint)
        for t in range(6):
            sock.send_multipart(frame_parts(t=t))
        # Two frames accepted and the rest waiting inside ZeroMQ (the listener stopped reading): stop.
        await until(lambda: listener.stats.received >= 2)
        assert listener.queue_depth == 2
        await listener.stop()
        sock.close()
        drained = await drain(listener)
        assert len(drained) == listener.stats.accepted >= 2
        assert [f.index.t for f in frames_in(drained)] == list(range(len(drained)))

    run(main())


def test_sender_that_disappears_mid_acquisition() -> None:
    async def main() -> None:
        async with FrameListener(endpoint=ANY_PORT) as listener:
            first = FrameSender(endpoint=listener.endpoint, acquisition="crash")
            first.start(sizes={"t": 6})
            for t in range(3):
                first.send(np.full((8, 8), t, np.uint8), t=t)
            first.close()  # gone without `end`
            events: list[SourceEvent] = [await listener.get() for _ in range(4)]
            assert isinstance(events[0], Started)
            assert not books(events)["crash"].ended
            # A restarted script resumes the same acquisition from another socket.
            with FrameSender(endpoint=listener.endpoint, acquisition="crash") as second:
                for t in range(3, 6):
                    second.send(np.full((8, 8), t, np.uint8), t=t)
                second.end(frames=6)
            events += await events_until_end(listener, "crash")
            frames = frames_in(events)
            assert [f.index.t for f in frames] == list(range(6))
            # Frames sent after the restart still carry the declaration of the first script's `start`.
            assert all(f.declaration is not None and f.declaration.sizes.t == 6 for f in frames)
            entry = books(events)["crash"]
            assert len(entry.frames) == 6 and entry.frames_declared == 6
            assert isinstance(events[-1], Ended)

    run(main())


def test_bind_conflict_raises() -> None:
    async def main() -> None:
        async with FrameListener(endpoint=ANY_PORT) as first:
            second = FrameListener(endpoint=first.endpoint)
            with pytest.raises(zmq.ZMQError):
                await second.start()

    run(main())


def test_async_iteration_ends_after_stop_once_drained() -> None:
    async def main() -> None:
        listener = FrameListener(endpoint=ANY_PORT)
        await listener.start()
        iterating = asyncio.create_task(_collect(listener))
        sock = push_socket(listener.endpoint)
        for t in range(3):
            sock.send_multipart(frame_parts(t=t))
        await until(lambda: listener.stats.accepted == 3)
        await listener.stop()
        sock.close()
        got = await asyncio.wait_for(iterating, 5)
        assert [f.index.t for f in frames_in(got)] == [0, 1, 2]
        assert [event async for event in listener] == []

    run(main())


async def _collect(listener: FrameListener) -> list[SourceEvent]:
    return [event async for event in listener]


def test_a_full_buffer_resumes_reading_when_the_consumer_catches_up() -> None:
    async def main() -> None:
        async with FrameListener(endpoint=ANY_PORT, max_queued=2) as listener:
            sock = push_socket(listener.endpoint)
            for t in range(20):
                sock.send_multipart(frame_parts(t=t))
            await until(lambda: listener.stats.accepted == 2)
            await asyncio.sleep(0.05)
            assert listener.stats.received == 2  # full: nothing more is read until a frame is taken
            got = await next_frames(listener, 20)
            sock.close()
            assert [f.index.t for f in got] == list(range(20))
            assert listener.stats.accepted == 20 and not listener.stats.dropped

    run(main())


def test_full_notice_queue_pauses_reading_too() -> None:
    async def main() -> None:
        async with FrameListener(endpoint=ANY_PORT, live=True, max_notices=3) as listener:
            sock = push_socket(listener.endpoint)
            for _ in range(10):
                sock.send_multipart([b"not json"])
            await until(lambda: listener.stats.received == 3)
            await asyncio.sleep(0.05)
            assert listener.stats.received == 3  # even in live mode: notices are never dropped
            got = [await listener.get() for _ in range(10)]
            sock.close()
            assert all(isinstance(e, Rejected) and e.reason == "bad_json" for e in got)

    run(main())
