"""One conformance suite for every `FrameSource`: subclass `SourceConformance`, give it a source and a feed.

The contract is the `acquisition.source.FrameSource` docstring. `FrameListener` is fed through a real
ZeroMQ PUSH socket on loopback, `MemoryFrameSource` with `push`; both must show the same events.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pytest
import zmq

from acquisition.errors import ListenerClosedError
from acquisition.frames import Frame
from acquisition.limits import Limits
from acquisition.listener import FrameListener
from acquisition.protocol import EndMessage, Index, StartMessage
from acquisition.source import (
    Dropped,
    Ended,
    EventQueue,
    FrameSource,
    MemoryFrameSource,
    Rejected,
    SourceEvent,
    SourceStats,
    Started,
)
from acquisition.spec import AcquisitionSpec, Sizes, StoredAcquisition
from acquisition.wire import encode_control, encode_frame, frame_header
from tests.acq_util import ANY_PORT, drain, frames_in, next_frames, run, until

pytestmark = pytest.mark.timeout(60)


# -- messages ------------------------------------------------------------------------------------------


def frame(acq: str = "a", t: int = 0, shape: tuple[int, ...] = (4, 5), **header: Any) -> list[Any]:
    """A valid frame message whose pixels are all ``t`` (uint16)."""
    data = np.full(shape, t, np.uint16)
    return encode_frame(frame_header(data.shape, data.dtype, acquisition=acq, index={"t": t}, **header), data)


def start(acq: str = "a", **fields: Any) -> list[Any]:
    return encode_control(StartMessage(acquisition=acq, **fields))


def end(acq: str = "a", **fields: Any) -> list[Any]:
    return encode_control(EndMessage(acquisition=acq, **fields))


def raw_header(**fields: Any) -> bytes:
    """A frame header as JSON, ``fields`` over a valid (4, 4) uint16 one of acquisition ``a``, t=3."""
    base: dict[str, Any] = {"type": "frame", "v": 1, "acquisition": "a", "index": {"t": 3}}
    return json.dumps(base | {"shape": [4, 4], "dtype": "uint16"} | fields).encode()


PIXELS = np.arange(16, dtype="<u2").tobytes()  # a valid (4, 4) uint16 buffer


@dataclass(frozen=True)
class Rejection:
    name: str
    parts: list[Any]
    reason: str
    acquisition: str | None = None  # when the message named a valid one
    index: Index | None = None  # when its index could be read


MAX_FRAME_BYTES = 1024  # the limit of the rejection tests' sources

REJECTIONS = [
    Rejection("bad_json", [b"{not json", PIXELS], "bad_json"),
    Rejection("json_not_an_object", [b"[1, 2]", PIXELS], "bad_json"),
    Rejection("bad_version", [raw_header(v=2), PIXELS], "bad_version", "a"),
    Rejection("version_not_an_int", [raw_header(v=True), PIXELS], "bad_version", "a"),
    Rejection("unknown_type", [raw_header(type="stop"), PIXELS], "unknown_type", "a"),
    Rejection("unknown_type_bad_id", [raw_header(type="stop", acquisition="../a"), PIXELS], "unknown_type"),
    Rejection("nested_too_deep", [b"[" * 20_000 + b"]" * 20_000, PIXELS], "bad_json"),
    Rejection(
        "missing_index",
        [json.dumps({"type": "frame", "v": 1, "acquisition": "a"}).encode(), PIXELS],
        "missing_field",
        "a",
    ),
    Rejection("path_escape_id", [raw_header(acquisition="../x"), PIXELS], "bad_acquisition_id"),
    Rejection("hidden_id", [raw_header(acquisition=".x"), PIXELS], "bad_acquisition_id"),
    Rejection("id_not_a_string", [raw_header(acquisition=5), PIXELS], "bad_acquisition_id"),
    Rejection(
        "start_with_bad_id",
        [json.dumps({"type": "start", "v": 1, "acquisition": "a/b"}).encode()],
        "bad_acquisition_id",
    ),
    Rejection("size_mismatch", [raw_header(), PIXELS[:-1]], "size_mismatch", "a", Index(t=3)),
    Rejection("bad_dtype", [raw_header(dtype="complex64"), PIXELS * 2], "bad_dtype", "a", Index(t=3)),
    Rejection("bad_shape", [raw_header(shape=[4]), PIXELS], "bad_shape", "a", Index(t=3)),
    Rejection("frame_too_small", [raw_header(shape=[1, 16]), PIXELS[:32]], "bad_shape", "a", Index(t=3)),
    Rejection(
        "nan_in_float_frame",
        [raw_header(dtype="float32"), np.array([0.0, np.nan] + [1.0] * 14, "<f4").tobytes()],
        "non_finite",
        "a",
        Index(t=3),
    ),
    Rejection("frame_with_three_parts", [raw_header(), PIXELS, b"extra"], "bad_multipart", "a"),
    Rejection("frame_with_one_part", [raw_header()], "bad_multipart", "a"),
    Rejection("start_with_two_parts", [start("a")[0], b"x"], "bad_multipart", "a"),
    Rejection(
        "too_large",
        [raw_header(shape=[32, 32]), np.zeros((32, 32), "<u2").tobytes()],
        "too_large",
        "a",
        Index(t=3),
    ),
]


# -- the suite -----------------------------------------------------------------------------------------


class Feed(Protocol):
    """Delivers messages to a started source, in order, waiting while the source applies backpressure."""

    async def send(self, parts: Sequence[Any]) -> None: ...

    def close(self) -> None: ...


def chan(acq: str, c: int | None, *, t: int = 0, shape: tuple[int, ...] = (4, 5), **index: int) -> list[Any]:
    """A frame of channel ``c`` (None: all channels in one buffer) whose pixels are ``10 * t + c``."""
    data = np.full(shape, (10 * t + (c or 0)) % 65536, np.uint16)
    header = frame_header(data.shape, data.dtype, acquisition=acq, index={"t": t, "c": c, **index})
    return encode_frame(header, data)


@dataclass(frozen=True)
class LayoutCase:
    """Frames after a declaration: which are accepted, and the reason of each one that is not."""

    name: str
    declaration: dict[str, Any] | None  # the start's fields; None: no start
    frames: list[list[Any]]
    outcome: list[str]  # "ok" or the rejection reason, one per frame
    declared: str = "started"  # what became of the start: "started" or its rejection reason


LAYOUT_CASES = [
    LayoutCase(
        "per-channel frames of a declared channel count",
        {"sizes": {"t": 2, "c": 2}},
        [chan("L", 0), chan("L", 1), chan("L", 0, t=1), chan("L", 1, t=1)],
        ["ok", "ok", "ok", "ok"],
    ),
    LayoutCase(
        "a channel beyond the declared count",
        {"sizes": {"c": 2}},
        [chan("L", 0), chan("L", 2)],
        ["ok", "out_of_range"],
    ),
    LayoutCase(
        "separate channels without a declared count",
        None,
        [chan("L", 0), chan("L", 1)],
        ["ok", "undeclared_channel"],
    ),
    LayoutCase(
        "a time point beyond the declared sizes",
        {"sizes": {"t": 5}},
        [chan("L", None, t=4), chan("L", None, t=5), chan("L", None, t=2**40)],
        ["ok", "out_of_range", "out_of_range"],
    ),
    LayoutCase(
        "positions beyond the first frame's, undeclared",
        None,
        [chan("L", None, p=1), chan("L", None, p=0), chan("L", None, p=2)],
        ["ok", "ok", "out_of_range"],
    ),
    LayoutCase(
        "a time index beyond the service's ceiling, undeclared or declared",
        None,
        [chan("L", None, t=3), chan("L", None, t=2**40), chan("L", None, t=10_000_000)],
        ["ok", "out_of_range", "out_of_range"],
    ),
    LayoutCase(
        "no declaration beyond the time ceiling",
        {"sizes": {"t": 10**12}},
        [chan("L", None, t=9_999_999), chan("L", None, t=10**9)],
        ["ok", "out_of_range"],
        declared="out_of_range",
    ),
    LayoutCase(
        "positions at the service's ceiling, undeclared",
        None,
        [chan("L", None, p=4096), chan("L", None, p=4095), chan("L", None, p=0)],
        ["out_of_range", "ok", "ok"],
    ),
    LayoutCase(
        "z at the service's ceiling, undeclared",
        None,
        [chan("L", None, z=4096), chan("L", None, z=3)],
        ["out_of_range", "ok"],
    ),
    LayoutCase(
        "no declaration beyond the position ceiling",
        {"sizes": {"p": 4097}},
        [chan("L", None, p=1)],
        ["ok"],
        declared="out_of_range",
    ),
    LayoutCase(
        "no declaration beyond the channel ceiling",
        {"sizes": {"c": 65}},
        [chan("L", 1)],
        ["undeclared_channel"],
        declared="out_of_range",
    ),
    LayoutCase(
        "no declaration of frames beyond the pixel ceiling",
        {"shape": (8192, 8193)},
        [chan("L", None)],
        ["ok"],
        declared="too_large",
    ),
    LayoutCase(
        "a declared (H, W, C) shape fixes the channel count",
        {"shape": (4, 5, 3)},
        [chan("L", None, shape=(4, 5, 2)), chan("L", None, shape=(4, 5, 3))],
        ["layout_conflict", "ok"],
    ),
    LayoutCase(
        "z beyond the declared z",
        {"sizes": {"z": 3}},
        [chan("L", None, z=2), chan("L", None, z=3)],
        ["ok", "out_of_range"],
    ),
    LayoutCase(
        "shape conflicting with the first frame",
        None,
        [chan("L", None), chan("L", None, shape=(5, 4)), chan("L", None, shape=(4, 4))],
        ["ok", "layout_conflict", "layout_conflict"],
    ),
    LayoutCase(
        "shape conflicting with the declared shape",
        {"shape": (8, 8)},
        [chan("L", None)],
        ["layout_conflict"],
    ),
    LayoutCase(
        "dtype conflicting with the declared dtype",
        {"dtype": "uint8"},
        [chan("L", None)],
        ["layout_conflict"],
    ),
    LayoutCase(
        "mixed single-buffer and per-channel frames of two channels",
        {"sizes": {"c": 2}},
        [
            chan("L", None, shape=(4, 5, 2)),
            chan("L", 0, t=1),
            chan("L", 1, t=1),
            chan("L", None, shape=(4, 5, 3)),
        ],
        ["ok", "ok", "ok", "layout_conflict"],
    ),
    LayoutCase(
        "a per-channel frame must carry one channel",
        {"sizes": {"c": 2}},
        [chan("L", 0, shape=(4, 5, 2))],
        ["bad_shape"],
    ),
]


@dataclass(frozen=True)
class LifecycleCase:
    """Messages of one acquisition ``L`` (starts, frames, ends) and what each becomes.

    ``stored`` is what the label sink holds of ``L`` (a restarted service); outcomes: ``started``,
    ``ended``, ``ok`` (an accepted frame) or a rejection reason.
    """

    name: str
    messages: list[list[Any]]
    outcome: list[str]
    stored: StoredAcquisition | None = None


def stored_spec(
    t: int | None = 5, *, declared: dict[str, Any] | None = None, **fields: Any
) -> AcquisitionSpec:
    """What a sink holds of ``L``: 4x5 uint16 frames, ``sizes.t = t``, declared by ``declared``."""
    declaration = None
    if declared is not None:
        declaration = StartMessage(acquisition="L", **declared).model_dump(mode="json")
    return AcquisitionSpec(
        acquisition="L",
        sizes=Sizes(t=t, **fields.pop("sizes", {})),
        frame_shape=(4, 5),
        image_dtype="uint16",
        declaration=declaration,
        **fields,
    )


LIFECYCLE_CASES = [
    LifecycleCase(
        "the same start again is a no-op",
        [start("L", sizes={"t": 5}), chan("L", None, t=1), start("L", sizes={"t": 5}), chan("L", None, t=4)],
        ["started", "ok", "started", "ok"],
    ),
    LifecycleCase(
        "a start with more time points extends the acquisition",
        [start("L", sizes={"t": 5}), chan("L", None, t=1), start("L", sizes={"t": 10}), chan("L", None, t=7)],
        ["started", "ok", "started", "ok"],
    ),
    LifecycleCase(
        "a start with fewer time points is a conflict, the acquisition stays as it was",
        [start("L", sizes={"t": 5}), chan("L", None, t=1), start("L", sizes={"t": 3}), chan("L", None, t=4)],
        ["started", "ok", "layout_conflict", "ok"],
    ),
    LifecycleCase(
        "a start with another frame shape or dtype is a conflict",
        [
            start("L"),
            chan("L", None),
            start("L", shape=(8, 8)),
            start("L", dtype="uint8"),
            start("L", sizes={"p": 3}),
        ],
        ["started", "ok", "layout_conflict", "layout_conflict", "layout_conflict"],
    ),
    LifecycleCase(
        "a start with another pixel size is a conflict; leaving it out is not",
        [
            start("L", pixel_size_um=0.5),
            chan("L", None),
            start("L", pixel_size_um=0.65),
            start("L"),
            chan("L", None, t=1),
        ],
        ["started", "ok", "layout_conflict", "started", "ok"],
    ),
    LifecycleCase(
        "before any frame a start may still change everything",
        [start("L", sizes={"t": 5}, pixel_size_um=0.5), start("L", sizes={"t": 2}), chan("L", None, t=1)],
        ["started", "started", "ok"],
    ),
    LifecycleCase(
        "end, then start re-opens",
        [start("L"), chan("L", None), end("L"), chan("L", None, t=1), start("L"), chan("L", None, t=1)],
        ["started", "ok", "ended", "acquisition_ended", "started", "ok"],
    ),
    LifecycleCase(
        "a stored acquisition resumes without a start, with its stored layout",
        [chan("L", None, t=3), chan("L", None, t=5), chan("L", None, t=3, shape=(8, 8))],
        ["ok", "out_of_range", "layout_conflict"],
        stored=StoredAcquisition(stored_spec(5, declared={"sizes": {"t": 5}}), closed=False),
    ),
    LifecycleCase(
        "a stored acquisition: the same start, then a longer one",
        [start("L", sizes={"t": 5}), chan("L", None, t=4), start("L", sizes={"t": 8}), chan("L", None, t=7)],
        ["started", "ok", "started", "ok"],
        stored=StoredAcquisition(stored_spec(5, declared={"sizes": {"t": 5}}), closed=False),
    ),
    LifecycleCase(
        "a stored acquisition: a start that differs from the store is rejected",
        [
            start("L", sizes={"t": 5, "p": 2}),
            start("L", shape=(4, 6)),
            start("L", time_interval_s=2.0),
            chan("L", None, t=4),
        ],
        ["layout_conflict", "layout_conflict", "layout_conflict", "ok"],
        stored=StoredAcquisition(stored_spec(5, time_interval_s=1.0), closed=False),
    ),
    LifecycleCase(
        "a stored acquisition that ended takes frames again only after a start",
        [chan("L", None, t=1), start("L"), chan("L", None, t=1)],
        ["acquisition_ended", "started", "ok"],
        stored=StoredAcquisition(stored_spec(None), closed=True),
    ),
]


class SourceConformance:
    """Behaviour every `FrameSource` must show; see the `FrameSource` docstring for the contract."""

    def make_source(self, **options: Any) -> FrameSource:
        """The source under test; ``options``: ``max_queued``, ``live``, ``max_frame_bytes``,
        ``max_notices``, ``limits``."""
        raise NotImplementedError

    def make_feed(self, source: FrameSource) -> Feed:
        """A feed into ``source`` (started)."""
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def opened(self, **options: Any) -> AsyncIterator[tuple[FrameSource, Feed]]:
        source = self.make_source(**options)
        await source.start()
        feed = self.make_feed(source)
        try:
            yield source, feed
        finally:
            feed.close()
            await source.stop()

    async def send_all(self, feed: Feed, messages: Sequence[Sequence[Any]]) -> None:
        for parts in messages:
            await feed.send(parts)

    async def fed(self, source: FrameSource, feed: Feed, messages: Sequence[Sequence[Any]]) -> None:
        """Send ``messages`` and wait until the source has taken every one."""
        before = source.stats.received
        await self.send_all(feed, messages)
        await until(lambda: source.stats.received == before + len(messages))

    # -- events --------------------------------------------------------------------------------------

    def test_satisfies_protocol(self) -> None:
        assert isinstance(self.make_source(), FrameSource)

    def test_get_before_start_raises(self) -> None:
        with pytest.raises(ListenerClosedError, match="before start"):
            run(self.make_source().get())

    def test_events_come_in_arrival_order(self) -> None:
        messages = [
            start("a", sizes={"t": 4}),
            frame("a", 0),
            [b"{not json"],
            frame("a", 1),
            frame("b", 0),
            end("a", frames=2),
            frame("a", 2),
            start("a", sizes={"t": 4}),
            frame("a", 3),
        ]

        async def main() -> None:
            async with self.opened() as (source, feed):
                await self.send_all(feed, messages)
                events = [await source.get() for _ in messages]
                summary = [(type(e).__name__, getattr(e, "acquisition", None)) for e in events]
                assert summary == [
                    ("Started", "a"),
                    ("Frame", "a"),
                    ("Rejected", None),
                    ("Frame", "a"),
                    ("Frame", "b"),
                    ("Ended", "a"),
                    ("Rejected", "a"),
                    ("Started", "a"),
                    ("Frame", "a"),
                ]
                assert [f.index.t for f in frames_in(events)] == [0, 1, 0, 3]
                started, ended = events[0], events[5]
                assert isinstance(started, Started) and started.message.sizes.t == 4
                assert isinstance(ended, Ended) and ended.message.frames == 2
                assert source.queue_depth == 0

        run(main())

    def test_frames_carry_their_acquisitions_latest_declaration(self) -> None:
        declared = {"names": ["GFP", "H2B"], "nuclear": 1, "whole_cell": 0}
        own = {"names": ["x", "y"], "nuclear": 0, "whole_cell": None}
        messages = [
            start("a", sizes={"t": 3}, channels=declared, metadata={"objective": "20x"}),
            frame("a", 0, shape=(4, 5, 2)),
            frame("a", 1, shape=(4, 5, 2), channels=own),
            start("a", sizes={"t": 3}, channels={"nuclear": 0}),
            frame("a", 2, shape=(4, 5, 2)),
            frame("b", 0, shape=(4, 5)),
            frame("c", 0, shape=(4, 5, 2)),
        ]

        async def main() -> None:
            async with self.opened() as (source, feed):
                await self.send_all(feed, messages)
                events = [await source.get() for _ in messages]
                first_start, second_start = events[0], events[3]
                assert isinstance(first_start, Started) and isinstance(second_start, Started)
                a0, a1, a2, b0, c0 = frames_in(events)
                assert a0.declaration == first_start.message
                assert a0.declaration is not None and a0.declaration.metadata == {"objective": "20x"}
                assert a0.channels.names == ("GFP", "H2B") and (
                    a0.channels.nuclear,
                    a0.channels.whole_cell,
                ) == (1, 0)
                assert a1.declaration == first_start.message
                assert a1.channels.names == ("x", "y") and a1.channels.whole_cell is None  # its own win
                assert a2.declaration == second_start.message  # the latest start
                assert a2.channels.nuclear == 0 and a2.channels.names == ()
                # Never started: no declaration, the protocol's defaults by channel count.
                assert b0.declaration is None and c0.declaration is None
                assert (b0.channels.nuclear, b0.channels.whole_cell) == (None, None)
                assert (c0.channels.nuclear, c0.channels.whole_cell) == (0, 1)

        run(main())

    def test_frames_hold_the_pixels_sent_read_only(self) -> None:
        image = np.arange(6 * 7 * 2, dtype=np.uint16).reshape(6, 7, 2)

        async def main() -> None:
            async with self.opened() as (source, feed):
                header = frame_header(
                    image.shape, image.dtype, acquisition="px", index={"t": 1, "p": 2, "z": 3}
                )
                await feed.send(encode_frame(header, image))
                (got,) = await next_frames(source, 1)
                np.testing.assert_array_equal(got.data, image)
                assert got.data.dtype == np.uint16 and not got.data.flags.writeable
                assert (got.id.acquisition, got.id.p, got.id.t, got.id.z) == ("px", 2, 1, 3)
                assert got.nbytes == image.nbytes and got.received_at > 0

        run(main())

    # -- rejections ----------------------------------------------------------------------------------

    @pytest.mark.parametrize("case", REJECTIONS, ids=[c.name for c in REJECTIONS])
    def test_every_rejection_is_a_notice_and_the_source_keeps_serving(self, case: Rejection) -> None:
        async def main() -> None:
            async with self.opened(max_frame_bytes=MAX_FRAME_BYTES) as (source, feed):
                await feed.send(case.parts)
                await feed.send(frame("a", 9))
                rejected, accepted = await source.get(), await source.get()
                assert isinstance(rejected, Rejected), rejected
                assert (rejected.reason, rejected.acquisition, rejected.index) == (
                    case.reason,
                    case.acquisition,
                    case.index,
                )
                assert rejected.detail
                assert isinstance(accepted, Frame) and accepted.index.t == 9
                assert source.stats.rejected == {case.reason: 1}
                assert (source.stats.received, source.stats.accepted) == (2, 1)

        run(main())

    @pytest.mark.parametrize("case", LAYOUT_CASES, ids=[c.name for c in LAYOUT_CASES])
    def test_frames_must_fit_their_acquisitions_layout(self, case: LayoutCase) -> None:
        """Checked when the frame arrives, so an accepted frame can always be segmented and stored."""

        async def main() -> None:
            async with self.opened(max_queued=32) as (source, feed):
                messages = [] if case.declaration is None else [start("L", **case.declaration)]
                await self.fed(source, feed, [*messages, *case.frames])
                events = [await source.get() for _ in range(len(messages) + len(case.frames))]
                got = [
                    "started" if isinstance(e, Started) else "ok" if isinstance(e, Frame) else e.reason
                    for e in events
                    if isinstance(e, (Frame, Rejected, Started))
                ]
                assert got == ([case.declared] if messages else []) + case.outcome
                for event in events[len(messages) :]:
                    if isinstance(event, Rejected):
                        assert event.acquisition == "L" and event.index is not None and event.detail
                    if isinstance(event, Frame):
                        assert event.layout is not None and event.layout.shape == (4, 5)

        run(main())

    @pytest.mark.parametrize("case", LIFECYCLE_CASES, ids=[c.name for c in LIFECYCLE_CASES])
    def test_declarations_and_resume(self, case: LifecycleCase) -> None:
        """Re-declaration rules and resuming an acquisition the label sink holds (protocol.md §1.2)."""
        looked_up: list[str] = []

        def stored(acquisition: str) -> StoredAcquisition | None:
            looked_up.append(acquisition)
            return case.stored if acquisition == "L" else None

        async def main() -> None:
            async with self.opened(max_queued=32, stored=stored) as (source, feed):
                await self.fed(source, feed, case.messages)
                events = [await source.get() for _ in case.messages]
                outcome = {Started: "started", Ended: "ended", Frame: "ok"}
                got = [e.reason if isinstance(e, Rejected) else outcome[type(e)] for e in events]
                assert got == case.outcome
                for event in events:
                    if isinstance(event, Rejected):
                        assert event.acquisition == "L" and event.detail
                    if isinstance(event, Frame) and case.stored is not None:
                        assert event.layout is not None and event.layout.p == case.stored.spec.sizes.p

        run(main())
        assert looked_up == ["L"]  # the store is asked once, when the acquisition is first seen

    def test_an_internal_error_on_one_message_is_a_rejection(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import acquisition.intake

        real_decode = acquisition.intake.decode_message

        def flaky_decode(parts: Any, **kwargs: Any) -> Any:
            if bytes(parts[0]) == b"boom":
                raise RuntimeError("decoder bug")
            return real_decode(parts, **kwargs)

        monkeypatch.setattr(acquisition.intake, "decode_message", flaky_decode)

        async def main() -> None:
            async with self.opened() as (source, feed):
                await self.send_all(feed, [[b"boom"], frame("a", 1)])
                rejected, accepted = await source.get(), await source.get()
                assert isinstance(rejected, Rejected) and rejected.reason == "internal"
                assert "RuntimeError: decoder bug" in rejected.detail
                assert isinstance(accepted, Frame) and accepted.index.t == 1

        run(main())

    def test_frames_after_end_are_rejected_until_a_new_start(self) -> None:
        messages = [
            start("a", sizes={"t": 9}),
            frame("a", 0),
            end("a"),
            frame("a", 1),
            frame("b", 0),  # another acquisition is not affected
            end("a"),  # a second end changes nothing
            frame("a", 2),
            start("a", sizes={"t": 12}),  # re-opens, with more time points
            frame("a", 3),
        ]

        async def main() -> None:
            async with self.opened() as (source, feed):
                await self.send_all(feed, messages)
                events = [await source.get() for _ in messages]
                late = [e for e in events if isinstance(e, Rejected)]
                assert [(e.reason, e.acquisition, e.index) for e in late] == [
                    ("acquisition_ended", "a", Index(t=1)),
                    ("acquisition_ended", "a", Index(t=2)),
                ]
                assert [(f.acquisition, f.index.t) for f in frames_in(events)] == [
                    ("a", 0),
                    ("b", 0),
                    ("a", 3),
                ]
                reopened = frames_in(events)[-1]
                assert reopened.declaration is not None and reopened.declaration.sizes.t == 12
                assert source.stats.rejected == {"acquisition_ended": 2}
                assert (source.stats.started, source.stats.ended) == (2, 2)

        run(main())

    def test_a_redeclaration_must_keep_the_store_its_frames_fixed(self) -> None:
        messages = [
            start("r", sizes={"t": 4}),
            start("r", sizes={"t": 8}, shape=(4, 5)),  # no frame yet: anything goes
            frame("r", 0),
            start("r", sizes={"t": 8}, metadata={"run": 2}),  # the same store
            start("r", sizes={"t": 9}),  # more time points: extends it
            start("r", sizes={"t": 5}),  # fewer: a conflict
            start("r", sizes={"t": 9}, dtype="uint8"),
            start("r", sizes={"t": 9, "c": 2}),
            frame("r", 8),
            end("r"),
            start("r"),  # re-opening after `end`: leaving everything out changes nothing
            start("r", sizes={"t": 9}),
            frame("r", 2),
        ]

        async def main() -> None:
            async with self.opened() as (source, feed):
                await self.send_all(feed, messages)
                events = [await source.get() for _ in messages]
                got = [e.reason if isinstance(e, Rejected) else type(e).__name__ for e in events]
                conflict = "layout_conflict"
                assert got == [
                    *("Started", "Started", "Frame", "Started", "Started"),
                    *(conflict, conflict, conflict),
                    *("Frame", "Ended", "Started", "Started", "Frame"),
                ]
                last = frames_in(events)[-1]
                assert last.declaration is not None and last.declaration.sizes.t == 9
                rejected = events[5]
                assert isinstance(rejected, Rejected) and rejected.acquisition == "r"
                assert "sizes.t: 9 -> 5" in rejected.detail
                assert "dtype: uint16 -> uint8" in events[6].detail  # type: ignore[union-attr]
                assert "sizes.c: 1 -> 2" in events[7].detail  # type: ignore[union-attr]

        run(main())

    def test_open_acquisitions_are_capped_and_end_frees_a_slot(self) -> None:
        messages = [
            frame("a", 0),
            start("b"),
            frame("a", 1),  # already open: fine
            frame("c", 0),
            start("c"),
            end("a"),
            frame("c", 1),
            frame("a", 2),  # ended, not re-opened
        ]

        async def main() -> None:
            async with self.opened(limits=Limits(max_open_acquisitions=2)) as (source, feed):
                await self.send_all(feed, messages)
                events = [await source.get() for _ in messages]
                got = [e.reason if isinstance(e, Rejected) else type(e).__name__ for e in events]
                full = "too_many_acquisitions"
                assert got == ["Frame", "Started", "Frame", full, full, "Ended", "Frame", "acquisition_ended"]
                refused = events[3]
                assert isinstance(refused, Rejected)
                assert (refused.acquisition, refused.index) == ("c", Index(t=0))
                assert "ingest.max_open_acquisitions" in refused.detail
                assert source.stats.open_acquisitions == 2
                assert source.stats.rejected == {full: 2, "acquisition_ended": 1}

        run(main())

    def test_idle_acquisitions_are_reported_ended_and_a_frame_reopens_them(self) -> None:
        async def until_idle(source: FrameSource, acquisition: str) -> list[SourceEvent]:
            """Events up to ``acquisition``'s idle close (a stalled test machine may close others too)."""
            events: list[SourceEvent] = []
            while True:
                event = await source.get()
                events.append(event)
                idle = isinstance(event, Ended) and event.idle and event.acquisition == acquisition
                if idle and frames_in(events):
                    return events

        def busy(events: list[SourceEvent]) -> list[str]:
            return [type(e).__name__ for e in events if not (isinstance(e, Ended) and e.idle)]

        async def main() -> None:
            limits = Limits(idle_timeout_s=0.05, max_open_acquisitions=1)
            async with self.opened(limits=limits) as (source, feed):
                await self.send_all(feed, [start("i", sizes={"t": 3}), frame("i", 0)])
                events = await until_idle(source, "i")  # nothing else arrives: the source closes it
                assert busy(events) == ["Started", "Frame"]
                idle = events[-1]
                assert isinstance(idle, Ended) and idle.message.frames is None
                assert source.stats.idle_closed >= 1 and source.stats.open_acquisitions == 0
                # Its slot is free (another acquisition opens), and a frame re-opens it as it was.
                await self.send_all(feed, [frame("j", 0), end("j"), frame("i", 1)])
                events = await until_idle(source, "i")
                assert busy(events) == ["Frame", "Ended", "Frame"]
                again = frames_in(events)[-1]
                assert again.acquisition == "i" and again.index.t == 1
                assert again.declaration is not None and again.declaration.sizes.t == 3
                assert again.layout is not None and again.layout.t == 3
                assert not source.stats.rejected

        run(main())

    # -- flow control --------------------------------------------------------------------------------

    def test_backpressure_queues_at_most_max_queued_and_loses_nothing(self) -> None:
        n = 20

        async def main() -> None:
            async with self.opened(max_queued=3) as (source, feed):
                sender = asyncio.create_task(self.send_all(feed, [frame("bp", t) for t in range(n)]))
                await until(lambda: source.queue_depth == 3)
                await asyncio.sleep(0.05)
                # Full: the source takes nothing more until a consumer takes a frame.
                assert source.stats.received == 3 and source.queue_depth == 3
                assert source.stats.queue_depth == 3
                got = await next_frames(source, n)
                await asyncio.wait_for(sender, 10)
                assert [f.index.t for f in got] == list(range(n))
                assert all(int(f.data[0, 0]) == f.index.t for f in got)
                assert source.stats.accepted == n and not source.stats.dropped
                assert source.queue_depth == 0

        run(main())

    def test_notices_are_bounded_too(self) -> None:
        async def main() -> None:
            async with self.opened(max_notices=2) as (source, feed):
                sender = asyncio.create_task(self.send_all(feed, [[b"bad"]] * 6 + [frame("a", 0)]))
                await until(lambda: source.stats.received == 2)
                await asyncio.sleep(0.05)
                assert source.stats.received == 2
                events = [await source.get() for _ in range(7)]
                await asyncio.wait_for(sender, 10)
                assert [type(e) for e in events] == [Rejected] * 6 + [Frame]

        run(main())

    def check_live(self, sent: dict[str, int], events: list[SourceEvent], source: FrameSource) -> None:
        """Every frame sent is delivered or inside exactly one `Dropped` notice, in its place."""
        dropped = [e for e in events if isinstance(e, Dropped)]
        assert all(d.count >= 1 and d.reason == "live_overflow" for d in dropped)
        for acq, n in sent.items():
            seen: list[int] = []
            for e in events:
                if isinstance(e, Frame) and e.acquisition == acq:
                    seen.append(e.index.t)
                elif isinstance(e, Dropped) and e.acquisition == acq:
                    seen += range(e.index.t - e.count + 1, e.index.t + 1)  # ends at the last one dropped
            assert seen == list(range(n)), acq
        # Adjacent drops of one acquisition are one notice.
        for a, b in itertools.pairwise(events):
            assert not (isinstance(a, Dropped) and isinstance(b, Dropped) and a.acquisition == b.acquisition)
        delivered = len(frames_in(events))
        assert delivered + sum(d.count for d in dropped) == sum(sent.values())
        assert source.stats.dropped == ({"live_overflow": sum(d.count for d in dropped)} if dropped else {})
        assert source.stats.accepted == sum(sent.values())

    def test_live_mode_drops_the_oldest_in_place(self) -> None:
        async def main() -> None:
            async with self.opened(live=True, max_queued=3) as (source, feed):
                await self.fed(source, feed, [frame("live", t) for t in range(10)])
                assert source.queue_depth == 3
                events = [await source.get() for _ in range(4)]
                assert isinstance(events[0], Dropped)
                assert (events[0].acquisition, events[0].index, events[0].count) == ("live", Index(t=6), 7)
                assert [f.index.t for f in frames_in(events)] == [7, 8, 9]
                self.check_live({"live": 10}, events, source)

        run(main())

    def test_live_drops_keep_notices_in_order(self) -> None:
        async def main() -> None:
            async with self.opened(live=True, max_queued=3) as (source, feed):
                messages = [start("a"), *(frame("a", t) for t in range(5)), [b"bad"]]
                messages += [frame("a", t) for t in range(5, 10)]
                await self.fed(source, feed, messages)
                events = [await source.get() for _ in range(7)]
                kinds = [type(e).__name__ for e in events]
                assert kinds == ["Started", "Dropped", "Rejected", "Dropped", "Frame", "Frame", "Frame"]
                first, second = events[1], events[3]
                assert isinstance(first, Dropped) and (first.index.t, first.count) == (4, 5)
                assert isinstance(second, Dropped) and (second.index.t, second.count) == (6, 2)
                self.check_live({"a": 10}, events, source)

        run(main())

    def test_live_drops_of_interleaved_acquisitions(self) -> None:
        async def main() -> None:
            async with self.opened(live=True, max_queued=2) as (source, feed):
                messages = [frame(acq, t) for t in range(6) for acq in ("a", "b")]
                messages += [frame("a", t) for t in range(6, 9)]
                await self.fed(source, feed, messages)
                events: list[SourceEvent] = []
                while source.queue_depth:
                    events.append(await source.get())
                self.check_live({"a": 9, "b": 6}, events, source)
                assert [(f.acquisition, f.index.t) for f in frames_in(events)] == [("a", 7), ("a", 8)]

        run(main())

    # -- stop and consumers --------------------------------------------------------------------------

    def test_stop_drains_queued_events_then_raises(self) -> None:
        async def main() -> None:
            source = self.make_source(max_queued=8)
            await source.start()
            feed = self.make_feed(source)
            messages = [start("s"), *(frame("s", t) for t in range(5)), [b"bad"]]
            await self.fed(source, feed, messages)
            await source.stop()
            # A stopped source takes nothing more (the memory source refuses, ZeroMQ just keeps it).
            with contextlib.suppress(ListenerClosedError, TimeoutError):
                await asyncio.wait_for(feed.send(frame("s", 99)), 1)
            await asyncio.sleep(0.05)
            feed.close()
            drained = await drain(source)
            assert [type(e).__name__ for e in drained] == ["Started"] + ["Frame"] * 5 + ["Rejected"]
            assert [f.index.t for f in frames_in(drained)] == list(range(5))
            assert source.stats.received == len(messages)
            with pytest.raises(ListenerClosedError):
                await source.get()
            await source.stop()  # idempotent

        run(main())

    def test_stop_ends_callers_already_waiting(self) -> None:
        async def main() -> None:
            source = self.make_source()
            await source.start()
            waiting = [asyncio.create_task(source.get()) for _ in range(3)]
            await asyncio.sleep(0.05)
            assert not any(task.done() for task in waiting)
            await source.stop()
            for task in waiting:
                with pytest.raises(ListenerClosedError):
                    await asyncio.wait_for(task, 5)

        run(main())

    def test_waiting_consumers_each_get_one_event_in_order(self) -> None:
        async def main() -> None:
            async with self.opened() as (source, feed):
                consumers = [asyncio.create_task(source.get()) for _ in range(3)]
                await asyncio.sleep(0.05)  # all three are waiting on an empty queue
                await self.send_all(feed, [frame("w", t) for t in range(3)])
                got = await asyncio.gather(*consumers)
                assert [f.index.t for f in frames_in(got)] == [0, 1, 2]
                assert source.queue_depth == 0

        run(main())

    def test_concurrent_consumers_get_distinct_events(self) -> None:
        messages = [start("c")]
        for t in range(30):
            messages.append(frame("c", t))
            if t % 7 == 0:
                messages.append([b"bad"])
        messages.append(end("c"))

        async def main() -> None:
            source = self.make_source(max_queued=2)
            await source.start()
            feed = self.make_feed(source)

            async def consume() -> list[tuple[int, SourceEvent]]:
                got = []
                with contextlib.suppress(ListenerClosedError):
                    while True:
                        event = await source.get()
                        got.append((order.pop(0), event))
                        await asyncio.sleep(0)  # let the others take the next ones
                return got

            order = list(range(len(messages)))  # the position each event was taken in
            consumers = [asyncio.create_task(consume()) for _ in range(4)]
            await self.fed(source, feed, messages)
            await until(lambda: not order)
            await source.stop()
            feed.close()
            results = await asyncio.gather(*consumers)
            assert sum(1 for r in results if r) > 1, "one consumer took every event"
            taken = sorted((i, e) for r in results for i, e in r)
            events = [e for _, e in taken]
            assert len({id(e) for e in events}) == len(messages)  # each event to exactly one consumer
            assert [type(e).__name__ for e in events] == [
                "Started",
                *("Frame" if len(m) == 2 else "Rejected" for m in messages[1:-1]),
                "Ended",
            ]
            assert [f.index.t for f in frames_in(events)] == list(range(30))
            for r in results:  # and each consumer saw its own share in arrival order
                assert [i for i, _ in r] == sorted(i for i, _ in r)

        run(main())

    # -- stats ---------------------------------------------------------------------------------------

    def test_stats_count_every_message(self) -> None:
        async def main() -> None:
            async with self.opened(max_queued=8) as (source, feed):
                assert source.stats == SourceStats()
                messages = [start("st"), frame("st", 0), frame("st", 1), [b"x"], end("st")]
                messages += [frame("st", 2), [raw_header(v=3), PIXELS], frame("st", 3, shape=(4, 6))]
                await self.fed(source, feed, messages)
                assert source.queue_depth == 2
                assert source.stats.as_dict() == {
                    "received": 8,
                    "accepted": 2,
                    "bytes_accepted": 4 * 5 * 2 * 2,
                    "started": 1,
                    "ended": 1,
                    "idle_closed": 0,
                    "open_acquisitions": 0,
                    "rejected": {"bad_json": 1, "acquisition_ended": 2, "bad_version": 1},
                    "dropped": {},
                    "queue_depth": 2,
                }
                json.dumps(source.stats.as_dict())
                for _ in messages:
                    await source.get()
                assert source.queue_depth == 0 and source.stats.queue_depth == 0

        run(main())


# -- implementations -------------------------------------------------------------------------------------


class ZmqFeed:
    """A PUSH socket connected to the listener; never blocks the event loop."""

    def __init__(self, endpoint: str) -> None:
        self._socket: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.PUSH)
        self._socket.connect(endpoint)

    async def send(self, parts: Sequence[Any]) -> None:
        while True:
            try:
                self._socket.send_multipart(list(parts), zmq.NOBLOCK)
                return
            except zmq.Again:  # the listener applies backpressure: wait, as a sender would
                await asyncio.sleep(0.002)

    def close(self) -> None:
        self._socket.close(linger=0)


class TestFrameListener(SourceConformance):
    def make_source(self, **options: Any) -> FrameSource:
        return FrameListener(endpoint=ANY_PORT, **options)

    def make_feed(self, source: FrameSource) -> Feed:
        return ZmqFeed(source.endpoint)


class MemoryFeed:
    def __init__(self, source: MemoryFrameSource) -> None:
        self._source = source

    async def send(self, parts: Sequence[Any]) -> None:
        await self._source.push(parts)

    def close(self) -> None:
        pass


class TestMemoryFrameSource(SourceConformance):
    def make_source(self, **options: Any) -> FrameSource:
        return MemoryFrameSource(**options)

    def make_feed(self, source: FrameSource) -> Feed:
        assert isinstance(source, MemoryFrameSource)
        return MemoryFeed(source)

    def test_push_before_start_and_after_stop_raises(self) -> None:
        async def main() -> None:
            source = MemoryFrameSource()
            with pytest.raises(RuntimeError, match="before start"):
                await source.push(frame())
            await source.start()
            await source.stop()
            with pytest.raises(ListenerClosedError):
                await source.push(frame())

        run(main())

    def test_a_pusher_waiting_for_room_is_released_by_stop(self) -> None:
        async def main() -> None:
            source = MemoryFrameSource(max_queued=1)
            await source.start()
            await source.push(frame("a", 0))
            blocked = asyncio.create_task(source.push(frame("a", 1)))
            await asyncio.sleep(0.05)
            assert not blocked.done()
            await source.stop()
            with pytest.raises(ListenerClosedError):
                await asyncio.wait_for(blocked, 5)
            assert [f.index.t for f in frames_in(await drain(source))] == [0]

        run(main())


# -- the shared queue ------------------------------------------------------------------------------------


def test_a_consumer_cancelled_after_being_woken_passes_the_event_on() -> None:
    # Both sources queue events in EventQueue: a consumer woken for an event but cancelled before it ran
    # must not take the event with it.
    async def main() -> None:
        queue = EventQueue(max_queued=4, live=False, stats=SourceStats())
        first, second = (asyncio.create_task(queue.get()) for _ in range(2))
        await asyncio.sleep(0.01)
        queue.put(Rejected("bad_json", "x"))  # wakes `first`...
        first.cancel()  # ...which is cancelled before it runs
        event = await asyncio.wait_for(second, 5)
        assert isinstance(event, Rejected)
        assert first.cancelled()

    run(main())


def test_event_queue_refuses_a_zero_bound() -> None:
    with pytest.raises(ValueError, match="max_queued"):
        EventQueue(max_queued=0, live=False, stats=SourceStats())
