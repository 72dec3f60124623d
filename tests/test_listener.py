"""FrameListener over real ZeroMQ sockets on loopback (ports picked by the OS)."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import numpy as np
import pytest
import zmq

from acquisition.client import FrameSender
from acquisition.errors import ListenerClosedError, SendTimeoutError
from acquisition.frames import Frame, FrameId
from acquisition.listener import FrameListener, ListenerEvent
from tests.acq_util import ANY_PORT, run, until

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
    events: list[ListenerEvent] = []

    async def main() -> None:
        async with FrameListener(endpoint=ANY_PORT, on_event=events.append) as listener:
            sock = push_socket(listener.endpoint)
            sock.send_multipart(frame_parts(t=0))
            sock.send_multipart([b"{not json", b"x"])  # bad_json, id unknown
            sock.send_multipart([frame_parts(t=1)[0], b"short"])  # size_mismatch, id known
            sock.send_multipart(frame_parts(t=2, dtype="complex64"))  # bad_dtype
            sock.send_multipart([json.dumps({"type": "stop", "v": 1}).encode()])  # unknown_type
            sock.send_multipart([*frame_parts(t=3), b"extra"])  # bad_multipart
            sock.send_multipart(frame_parts(t=4))
            got = [await listener.get(), await listener.get()]
            await until(lambda: listener.stats.received == 7)
            sock.close()
            assert [f.index.t for f in got] == [0, 4]
            stats = listener.stats.as_dict()
            assert stats["accepted"] == 2
            assert stats["rejected"] == {
                "bad_json": 1,
                "size_mismatch": 1,
                "bad_dtype": 1,
                "unknown_type": 1,
                "bad_multipart": 1,
            }
            assert listener.acquisitions["a1"].frames_rejected == 3  # size, dtype, multipart

    run(main())
    rejected = [e for e in events if e.kind == "rejected"]
    assert [e.reason for e in rejected] == [
        "bad_json",
        "size_mismatch",
        "bad_dtype",
        "unknown_type",
        "bad_multipart",
    ]
    assert rejected[0].acquisition is None
    assert rejected[1].acquisition == "a1" and rejected[1].index == {"t": 1, "p": 0, "z": 0, "c": None}
    assert sum(e.kind == "accepted" for e in events) == 2


def test_garbage_never_kills_the_listener() -> None:
    rng = np.random.default_rng(0)

    async def main() -> None:
        async with FrameListener(endpoint=ANY_PORT) as listener:
            sock = push_socket(listener.endpoint)
            for _ in range(100):
                n_parts = int(rng.integers(1, 4))
                sock.send_multipart([rng.bytes(int(rng.integers(0, 64))) for _ in range(n_parts)])
            sock.send_multipart(frame_parts(t=9))
            frame = await listener.get()
            sock.close()
            assert frame.index.t == 9
            assert listener.stats.received == 101
            assert sum(listener.stats.rejected.values()) == 100

    run(main())


def test_callback_errors_are_contained() -> None:
    def explode(event: ListenerEvent) -> None:
        raise RuntimeError("boom")

    async def main() -> None:
        async with FrameListener(endpoint=ANY_PORT, on_event=explode) as listener:
            sock = push_socket(listener.endpoint)
            sock.send_multipart([b"bad"])
            sock.send_multipart(frame_parts(t=1))
            assert (await listener.get()).index.t == 1
            sock.close()

    run(main())


def test_unknown_acquisition_is_accepted_with_defaults() -> None:
    async def main() -> None:
        async with FrameListener(endpoint=ANY_PORT) as listener:
            sock = push_socket(listener.endpoint)
            sock.send_multipart(frame_parts("never-started", shape=(3, 3)))
            sock.send_multipart(frame_parts("two-channel", shape=(3, 3, 2)))
            one, two = await listener.get(), await listener.get()
            sock.close()
            assert one.id == FrameId("never-started", 0, 0, 0)
            assert one.channels.nuclear is None and one.channels.whole_cell is None
            assert (two.channels.nuclear, two.channels.whole_cell) == (0, 1)
            state = listener.acquisitions["never-started"]
            assert not state.declared and not state.ended and state.frames_accepted == 1
            assert state.as_dict()["sizes"] is None

    run(main())


def test_start_declares_channels_and_end_closes() -> None:
    async def main() -> None:
        async with FrameListener(endpoint=ANY_PORT) as listener:
            with FrameSender(endpoint=listener.endpoint, acquisition="exp") as tx:
                tx.start(sizes={"t": 2}, channels={"names": ["GFP", "H2B"], "nuclear": 1, "whole_cell": 0})
                tx.send(np.zeros((4, 4, 2), np.uint8), t=0)
                tx.end()
                tx.send(np.zeros((4, 4, 2), np.uint8), t=1)  # after end: rejected
                tx.start()  # re-opens
                tx.send(np.zeros((4, 4, 2), np.uint8), t=1)
            first, second = await listener.get(), await listener.get()
            await until(lambda: listener.stats.received == 7)  # + the `end` sent on leaving the block
            assert first.channels.names == ("GFP", "H2B") and first.channels.nuclear == 1
            assert second.index.t == 1
            assert listener.stats.rejected["acquisition_ended"] == 1
            state = listener.acquisitions["exp"]
            # Counters restart on re-open; the clean exit of the with-block ended it with its frame count.
            assert (
                state.declared and state.ended and state.frames_accepted == 1 and state.frames_declared == 1
            )

    run(main())


def test_frames_are_zero_copy_views_of_the_zmq_message() -> None:
    async def main() -> None:
        async with FrameListener(endpoint=ANY_PORT) as listener:
            sock = push_socket(listener.endpoint)
            image = np.arange(256 * 512, dtype=np.uint16).reshape(256, 512)
            sock.send_multipart([frame_parts(shape=image.shape)[0], image.data])
            frame = await listener.get()
            sock.close()
            np.testing.assert_array_equal(frame.data, image)
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
            endpoint=ANY_PORT, max_in_flight=2, rcvhwm=1, socket_options=small_buffers
        ) as listener:
            producer = asyncio.create_task(asyncio.to_thread(produce, listener.endpoint))
            # The consumer is stalled until the sender has felt the backpressure.
            await asyncio.to_thread(timed_out.wait, 20)
            assert timed_out.is_set(), "the sender never blocked"
            assert listener.queue_depth <= 2
            got = [await listener.get() for _ in range(n_frames)]
            await producer
            assert [f.index.t for f in got] == list(range(n_frames))
            assert all(int(f.data[0, 0]) == f.index.t for f in got)
            assert not listener.stats.dropped
            assert timeouts

    run(main())


def test_live_mode_drops_the_oldest_and_counts() -> None:
    events: list[ListenerEvent] = []

    async def main() -> None:
        async with FrameListener(
            endpoint=ANY_PORT, live=True, max_in_flight=3, on_event=events.append
        ) as listener:
            sock = push_socket(listener.endpoint)
            for t in range(10):
                sock.send_multipart(frame_parts("live", t=t))
            await until(lambda: listener.stats.received == 10)
            got = [await listener.get() for _ in range(3)]
            sock.close()
            assert [f.index.t for f in got] == [7, 8, 9]
            assert listener.stats.dropped == {"live_overflow": 7}
            assert listener.acquisitions["live"].frames_dropped == 7
            assert listener.stats.accepted == 10

    run(main())
    assert [e.index["t"] for e in events if e.kind == "dropped" and e.index] == list(range(7))


def test_stop_drains_frames_already_accepted() -> None:
    async def main() -> None:
        listener = FrameListener(endpoint=ANY_PORT, max_in_flight=8)
        await listener.start()
        sock = push_socket(listener.endpoint)
        for t in range(5):
            sock.send_multipart(frame_parts(t=t))
        await until(lambda: listener.stats.accepted == 5)
        await listener.stop()
        sock.close()
        drained = [frame async for frame in listener]
        assert [f.index.t for f in drained] == list(range(5))
        with pytest.raises(ListenerClosedError):
            await listener.get()

    run(main())


def test_stop_with_frames_in_flight_loses_no_accepted_frame() -> None:
    async def main() -> None:
        listener = FrameListener(endpoint=ANY_PORT, max_in_flight=2)
        await listener.start()
        sock = push_socket(listener.endpoint)
        for t in range(6):
            sock.send_multipart(frame_parts(t=t))
        # Two frames accepted and the rest waiting inside ZeroMQ (the listener stopped reading): stop.
        await until(lambda: listener.stats.received >= 2)
        assert listener.queue_depth == 2
        await listener.stop()
        sock.close()
        drained: list[Frame] = [frame async for frame in listener]
        assert len(drained) == listener.stats.accepted >= 2
        assert [f.index.t for f in drained] == list(range(len(drained)))

    run(main())


def test_sender_that_disappears_mid_acquisition() -> None:
    async def main() -> None:
        async with FrameListener(endpoint=ANY_PORT) as listener:
            first = FrameSender(endpoint=listener.endpoint, acquisition="crash")
            first.start(sizes={"t": 6})
            for t in range(3):
                first.send(np.full((8, 8), t, np.uint8), t=t)
            first.close()  # gone without `end`
            got = [await listener.get() for _ in range(3)]
            assert not listener.acquisitions["crash"].ended
            # A restarted script resumes the same acquisition from another socket.
            with FrameSender(endpoint=listener.endpoint, acquisition="crash") as second:
                for t in range(3, 6):
                    second.send(np.full((8, 8), t, np.uint8), t=t)
                second.end(frames=6)
            got += [await listener.get() for _ in range(3)]
            await until(lambda: listener.acquisitions["crash"].ended)
            assert [f.index.t for f in got] == list(range(6))
            state = listener.acquisitions["crash"]
            assert state.frames_accepted == 6 and state.frames_declared == 6

    run(main())


def test_bind_conflict_raises() -> None:
    async def main() -> None:
        async with FrameListener(endpoint=ANY_PORT) as first:
            second = FrameListener(endpoint=first.endpoint)
            with pytest.raises(zmq.ZMQError):
                await second.start()

    run(main())


def test_get_before_start_raises() -> None:
    with pytest.raises(ListenerClosedError):
        run(FrameListener(endpoint=ANY_PORT).get())


def test_waiting_consumers_each_get_one_frame_in_order() -> None:
    async def main() -> None:
        async with FrameListener(endpoint=ANY_PORT) as listener:
            consumers = [asyncio.create_task(listener.get()) for _ in range(3)]
            await asyncio.sleep(0.05)  # all three are waiting on an empty buffer
            sock = push_socket(listener.endpoint)
            for t in range(3):
                sock.send_multipart(frame_parts(t=t))
            got = await asyncio.gather(*consumers)
            sock.close()
            assert [f.index.t for f in got] == [0, 1, 2]
            assert listener.queue_depth == 0

    run(main())


def test_a_consumer_cancelled_after_being_woken_passes_the_frame_on() -> None:
    async def main() -> None:
        tasks: list[asyncio.Task[Frame]] = []

        def cancel_first(event: ListenerEvent) -> None:
            # The first waiter has just been woken for this frame but has not run yet: cancel it then.
            if event.kind == "accepted" and not tasks[0].done():
                tasks[0].cancel()

        async with FrameListener(endpoint=ANY_PORT, on_event=cancel_first) as listener:
            tasks.extend(asyncio.create_task(listener.get()) for _ in range(2))
            await asyncio.sleep(0.05)
            sock = push_socket(listener.endpoint)
            sock.send_multipart(frame_parts(t=7))
            frame = await asyncio.wait_for(tasks[1], 5)
            sock.close()
            assert frame.index.t == 7
            assert tasks[0].cancelled()

    run(main())


def test_stop_ends_consumers_waiting_on_an_empty_buffer() -> None:
    async def main() -> None:
        listener = FrameListener(endpoint=ANY_PORT)
        await listener.start()
        waiting = asyncio.create_task(listener.get())
        iterating = asyncio.create_task(asyncio.wait_for(_collect(listener), 5))
        await asyncio.sleep(0.05)
        await listener.stop()
        with pytest.raises(ListenerClosedError):
            await asyncio.wait_for(waiting, 5)
        assert await iterating == []

    run(main())


async def _collect(listener: FrameListener) -> list[Frame]:
    return [frame async for frame in listener]


def test_a_full_buffer_resumes_reading_when_the_consumer_catches_up() -> None:
    async def main() -> None:
        async with FrameListener(endpoint=ANY_PORT, max_in_flight=2) as listener:
            sock = push_socket(listener.endpoint)
            for t in range(20):
                sock.send_multipart(frame_parts(t=t))
            await until(lambda: listener.stats.accepted == 2)
            await asyncio.sleep(0.05)
            assert listener.stats.received == 2  # full: nothing more is read until a frame is taken
            got = [await listener.get() for _ in range(20)]
            sock.close()
            assert [f.index.t for f in got] == list(range(20))
            assert listener.stats.accepted == 20 and not listener.stats.dropped

    run(main())
