"""Hostile input: every kind of message a sender must not be able to hurt the service with, and its reason.

One table of cases (``docs/protocol.md`` section 2), each a short sequence of raw multipart messages and
what must become of each: accepted (``frame``, ``start``, ``end``) or rejected with a reason. The table is
played twice over real ZeroMQ sockets (a plain PUSH socket, so anything can be sent):

* against a bare :class:`~acquisition.listener.FrameListener`, case by case: each message gives exactly
  its expected event, rejections name the acquisition exactly when it was valid (then they are
  published), and the listener keeps serving;
* all cases through one :class:`~serving.pipeline.StreamPipeline` with the real Zarr label store in a
  temporary directory and a fast fake segmenter: nothing is written outside the output directory, every
  accepted frame ends as labels on disk or a published failure (never ``ok`` and then ``failed``), and
  every rejection with a readable acquisition is published with its reason.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from acquisition.frames import Frame
from acquisition.ids import is_acquisition_id
from acquisition.limits import Limits
from acquisition.listener import FrameListener
from acquisition.protocol import MAX_HEADER_BYTES
from acquisition.results import MemoryResultSink
from acquisition.source import Ended, Rejected, SourceEvent, Started
from acquisition.zarr_sink import open_position
from serving import components
from serving.config import ServiceConfig
from serving.pipeline import StreamPipeline
from tests.acq_util import ANY_PORT, run, until
from tests.test_pipeline import FakeSegmenter

pytestmark = pytest.mark.timeout(300)

ID = "ACQ"  # stands for the case's own acquisition id (three characters, like its replacement)
ESCAPED = Path("/tmp/cellsam-hostile-escape")  # an absolute id must not create this (checked in the run)

#: The service's limits in these runs (small, so that crossing them costs nothing).
LIMITS = Limits(
    max_time_points=1000,
    max_positions=8,
    max_z_planes=8,
    max_channels=4,
    max_frame_pixels=256 * 256,
    max_open_acquisitions=3,
)
MAX_FRAME_BYTES = 256 * 1024


def pixels(shape: Sequence[int] = (4, 5), dtype: str = "<u2") -> bytes:
    """A little-endian buffer of ``shape`` with a bright square (cells for the fake segmenter)."""
    data = np.ones(shape, dtype)
    data[: max(1, shape[0] // 2), : max(1, shape[1] // 2)] = 9
    return data.tobytes()


PX = pixels()


def header(acq: Any = ID, *, drop: Sequence[str] = (), **fields: Any) -> bytes:
    """A frame header: ``fields`` over a valid (4, 5) uint16 one at t=0, without the fields in ``drop``."""
    base: dict[str, Any] = {"type": "frame", "v": 1, "acquisition": acq, "index": {"t": 0}, "shape": [4, 5]}
    base |= {"dtype": "uint16"} | fields
    for name in drop:
        base.pop(name)
    return json.dumps(base).encode()


def frame(
    acq: Any = ID,
    *,
    shape: Sequence[int] = (4, 5),
    dtype: str = "uint16",
    data: bytes | None = None,
    **index: Any,
) -> list[bytes]:
    """A frame message; its buffer fits its header unless ``data`` is given."""
    buffer = pixels(shape, np.dtype(dtype).newbyteorder("<").str) if data is None else data
    return [header(acq, index={"t": 0} | index, shape=list(shape), dtype=dtype), buffer]


def control(kind: str, acq: Any = ID, **fields: Any) -> list[bytes]:
    return [json.dumps({"type": kind, "v": 1, "acquisition": acq} | fields).encode()]


def start(acq: Any = ID, **fields: Any) -> list[bytes]:
    return control("start", acq, **fields)


def end(acq: Any = ID, **fields: Any) -> list[bytes]:
    return control("end", acq, **fields)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def with_metadata(raw_metadata: bytes) -> list[bytes]:
    """A valid frame whose ``metadata`` is the given raw JSON text (which may be anything)."""
    return [header(metadata=0).replace(b'"metadata": 0', b'"metadata": ' + raw_metadata), PX]


@dataclass(frozen=True)
class Case:
    """Messages and what must become of each one.

    ``expected`` has one entry per message: ``frame``, ``start`` or ``end`` (accepted), a rejection reason
    (the rejection names one of the case's acquisitions and is published to it) or ``~reason`` (a
    rejection that names no acquisition: its id was missing, invalid or unreadable).
    """

    name: str
    messages: list[list[bytes]]
    expected: list[str]


def case(name: str, *messages: list[bytes], expect: str | Sequence[str]) -> Case:
    expected = [expect] if isinstance(expect, str) else list(expect)
    assert len(expected) == len(messages), name
    return Case(name, list(messages), expected)


CASES = [
    # -- framing and JSON
    case("not_json", [b"{not json", PX], expect="~bad_json"),
    case("binary_header", [bytes(range(256)), PX], expect="~bad_json"),
    case("not_utf8", [b"\xff\xfe{}", PX], expect="~bad_json"),
    case("utf8_byte_order_mark", [b"\xef\xbb\xbf" + header(), PX], expect="~bad_json"),
    case("empty_header", [b"", PX], expect="~bad_json"),
    case("top_level_array", [b"[1, 2]", PX], expect="~bad_json"),
    case("top_level_string", [b'"frame"'], expect="~bad_json"),
    case("top_level_null", [b"null"], expect="~bad_json"),
    case("nested_20000_levels", [nested(20_000), PX], expect="~bad_json"),
    case("nested_20000_levels_in_metadata", with_metadata(nested(20_000)), expect="~bad_json"),
    case("nested_100_levels_in_metadata", with_metadata(nested(100)), expect="bad_json"),
    case("nested_10_levels_in_metadata", with_metadata(b'{"x": ' + nested(9) + b"}"), expect="frame"),
    case("nan_in_header", [header(timestamp=float("nan")), PX], expect="~bad_json"),
    case("infinity_in_metadata", with_metadata(b'{"x": -Infinity}'), expect="~bad_json"),
    case("number_overflow", with_metadata(b'{"x": 1e400}'), expect="~bad_json"),
    case(
        "integer_of_5000_digits",
        [header(index=0).replace(b": 0", b": " + b"9" * 5000), PX],
        expect="~bad_json",
    ),
    case(
        "header_too_large", [header(metadata={"pad": "x" * MAX_HEADER_BYTES}), PX], expect="~header_too_large"
    ),
    case("lone_surrogate_in_metadata", with_metadata(b'{"x": "\\ud800"}'), expect="frame"),
    case("unknown_top_level_field", [header(future={"x": [1]}), PX], expect="frame"),
    case(
        "duplicate_key_last_wins",
        [header().replace(b'"acquisition": "ACQ"', b'"acquisition": "ACQ", "acquisition": "../x"'), PX],
        expect="~bad_acquisition_id",
    ),
    # -- parts
    case("frame_with_one_part", [header()], expect="bad_multipart"),
    case("frame_with_three_parts", [header(), PX, b"x"], expect="bad_multipart"),
    case("frame_with_five_parts", [header(), PX, PX, PX, PX], expect="bad_multipart"),
    case("start_with_two_parts", [*start(), b"x"], expect="bad_multipart"),
    case("end_with_two_parts", [*end(), PX], expect="bad_multipart"),
    case("bad_json_with_one_part", [b"{"], expect="~bad_json"),
    # -- version and type
    case("missing_version", [header(drop=["v"]), PX], expect="missing_field"),
    case("version_2", [header(v=2), PX], expect="bad_version"),
    case("version_0", [header(v=0), PX], expect="bad_version"),
    case("version_string", [header(v="1"), PX], expect="bad_version"),
    case("version_float", [header(v=1.0), PX], expect="bad_version"),
    case("version_bool", [header(v=True), PX], expect="bad_version"),
    case("version_null", [header(v=None), PX], expect="bad_version"),
    case("version_2_with_bad_id", [header("../x", v=2), PX], expect="~bad_version"),
    case("missing_type", [header(drop=["type"]), PX], expect="missing_field"),
    case("unknown_type", [header(type="stop"), PX], expect="unknown_type"),
    case("type_upper_case", [header(type="FRAME"), PX], expect="unknown_type"),
    case("type_number", [header(type=5), PX], expect="unknown_type"),
    case("type_null", [header(type=None), PX], expect="unknown_type"),
    case("unknown_type_with_bad_id", [header("a/b", type="stop"), PX], expect="~unknown_type"),
    # -- acquisition ids
    case("id_parent", frame(".."), expect="~bad_acquisition_id"),
    case("id_dot", frame("."), expect="~bad_acquisition_id"),
    case("id_escapes", frame("../x"), expect="~bad_acquisition_id"),
    case("id_escapes_far", frame("../../../escape"), expect="~bad_acquisition_id"),
    case("id_absolute", frame(str(ESCAPED)), expect="~bad_acquisition_id"),
    case("id_hidden", frame(".hidden"), expect="~bad_acquisition_id"),
    case("id_slash", frame("a/b"), expect="~bad_acquisition_id"),
    case("id_backslash", frame("a\\b"), expect="~bad_acquisition_id"),
    case("id_nul", frame("a\x00b"), expect="~bad_acquisition_id"),
    case("id_unicode", frame("café"), expect="~bad_acquisition_id"),
    case("id_fullwidth_solidus", frame("a\uff0fb"), expect="~bad_acquisition_id"),
    case("id_space", frame("a b"), expect="~bad_acquisition_id"),
    case("id_newline", frame("a\nb"), expect="~bad_acquisition_id"),
    case("id_empty", frame(""), expect="~bad_acquisition_id"),
    case("id_129_characters", frame(ID + "a" * 126), expect="~bad_acquisition_id"),
    case("id_128_characters", frame(ID + "a" * 125), expect="frame"),
    case("id_number", frame(5), expect="~bad_acquisition_id"),
    case("id_null", frame(None), expect="~bad_acquisition_id"),
    case("id_list", frame([ID]), expect="~bad_acquisition_id"),
    case("id_missing", [header(drop=["acquisition"]), PX], expect="~missing_field"),
    case("start_id_escapes", start("../x"), expect="~bad_acquisition_id"),
    case("end_id_slash", end("a/b"), expect="~bad_acquisition_id"),
    # -- fields
    case("missing_index", [header(drop=["index"]), PX], expect="missing_field"),
    case("missing_shape", [header(drop=["shape"]), PX], expect="missing_field"),
    case("missing_dtype", [header(drop=["dtype"]), PX], expect="missing_field"),
    case("index_negative", frame(t=-1), expect="bad_index"),
    case("index_float", frame(t=1.5), expect="bad_index"),
    case("index_integral_float", frame(p=1.0), expect="bad_index"),
    case("index_string", frame(t="1"), expect="bad_index"),
    case("index_bool", frame(t=True), expect="bad_index"),
    case("index_null", frame(t=None), expect="bad_index"),
    case("index_channel_negative", frame(c=-1), expect="bad_index"),
    case("index_unknown_axis", frame(q=1), expect="bad_index"),
    case("index_not_an_object", [header(index=[0, 0]), PX], expect="bad_index"),
    case("shape_rank_1", [header(shape=[20]), PX], expect="bad_shape"),
    case("shape_rank_4", [header(shape=[1, 4, 5, 1]), PX], expect="bad_shape"),
    case("shape_zero", [header(shape=[0, 5]), b""], expect="bad_shape"),
    case("shape_negative", [header(shape=[-4, -5]), PX], expect="bad_shape"),
    case("shape_float", [header(shape=[4.0, 5]), PX], expect="bad_shape"),
    case("shape_bool", [header(shape=[True, 20]), PX], expect="bad_shape"),
    case("shape_string", [header(shape="4x5"), PX], expect="bad_shape"),
    case("shape_17_channels", [header(shape=[4, 5, 17]), bytes(4 * 5 * 17 * 2)], expect="bad_shape"),
    case("dtype_complex", [header(dtype="complex64"), bytes(160)], expect="bad_dtype"),
    case("dtype_object", [header(dtype="object"), bytes(160)], expect="bad_dtype"),
    case("dtype_bool", [header(dtype="bool"), bytes(20)], expect="bad_dtype"),
    case("dtype_float16", [header(dtype="float16"), PX], expect="bad_dtype"),
    case("dtype_big_endian", [header(dtype=">u2"), PX], expect="bad_dtype"),
    case("dtype_explicit_little_endian", [header(dtype="<u2"), PX], expect="bad_dtype"),
    case("dtype_int64", [header(dtype="int64"), bytes(160)], expect="bad_dtype"),
    case("dtype_bytes", [header(dtype="S2"), PX], expect="bad_dtype"),
    case("dtype_number", [header(dtype=2), PX], expect="bad_dtype"),
    case("metadata_not_an_object", [header(metadata=[1]), PX], expect="bad_field"),
    case("timestamp_text", [header(timestamp="now"), PX], expect="bad_field"),
    case("channel_names_not_a_list", [header(channels={"names": 3}), PX], expect="bad_field"),
    case("channel_role_negative", [header(channels={"nuclear": -1}), PX], expect="bad_field"),
    # -- size
    case("buffer_short", frame(data=PX[:-1]), expect="size_mismatch"),
    case("buffer_long", frame(data=PX + b"\0\0"), expect="size_mismatch"),
    case("buffer_empty", frame(data=b""), expect="size_mismatch"),
    case("declared_20000_squared_short_buffer", frame(shape=(20_000, 20_000), data=PX), expect="too_large"),
    case("declared_2_pow_31_squared", frame(shape=(2**31, 2**31), data=PX), expect="too_large"),
    case("too_many_pixels", frame(shape=(257, 256), dtype="uint8"), expect="too_large"),
    case("too_many_bytes", frame(shape=(256, 256, 8), dtype="uint8", data=PX), expect="too_large"),
    case("largest_frame", frame(shape=(256, 256), dtype="float32"), expect="frame"),
    # -- values
    case(
        "nan_float32",
        frame(dtype="float32", data=np.full((4, 5), np.nan, "<f4").tobytes()),
        expect="non_finite",
    ),
    case(
        "inf_float64",
        frame(dtype="float64", data=np.full((4, 5), np.inf, "<f8").tobytes()),
        expect="non_finite",
    ),
    case(
        "minus_inf_in_one_pixel",
        frame(dtype="float32", data=np.array([-np.inf] + [1.0] * 19, "<f4").tobytes()),
        expect="non_finite",
    ),
    case("finite_float32", frame(dtype="float32"), expect="frame"),
    case("one_by_one", frame(shape=(1, 1)), expect="bad_shape"),
    case("three_by_hundred", frame(shape=(3, 100)), expect="bad_shape"),
    case("hundred_by_two_by_three", frame(shape=(100, 2, 3), dtype="uint8"), expect="bad_shape"),
    case("four_by_four", frame(shape=(4, 4)), expect="frame"),
    case("sixteen_channels", frame(shape=(4, 5, 16), dtype="uint8"), expect="frame"),
    case("explicit_channel_null", frame(c=None), expect="frame"),
    # -- acquisition state
    case("frame_after_end", frame(t=0), end(), frame(t=1), expect=["frame", "end", "acquisition_ended"]),
    case("end_before_start", end(), frame(), expect=["end", "acquisition_ended"]),
    case("end_twice", frame(), end(), end(), expect=["frame", "end", "end"]),
    case("duplicate_frames", frame(t=0), frame(t=0), expect=["frame", "frame"]),
    case(
        "frames_before_start",
        frame(t=0),
        start(shape=[4, 5], dtype="uint16"),
        frame(t=1),
        expect=["frame", "start", "frame"],
    ),
    case(
        "start_after_frames_changes_shape", frame(), start(shape=[8, 8]), expect=["frame", "layout_conflict"]
    ),
    case(
        "redeclared_more_time_points",
        start(sizes={"t": 5}),
        frame(),
        start(sizes={"t": 10}),
        frame(t=7),
        expect=["start", "frame", "start", "frame"],
    ),
    case(
        "redeclared_fewer_time_points",
        start(sizes={"t": 5}),
        frame(),
        start(sizes={"t": 3}),
        frame(t=4),
        expect=["start", "frame", "layout_conflict", "frame"],
    ),
    case(
        "redeclared_positions",
        start(sizes={"t": 5}),
        frame(),
        start(sizes={"t": 5, "p": 2}),
        expect=["start", "frame", "layout_conflict"],
    ),
    case(
        "redeclared_pixel_size",
        start(sizes={"t": 5}, pixel_size_um=0.5),
        frame(),
        start(sizes={"t": 5}, pixel_size_um=0.25),
        expect=["start", "frame", "layout_conflict"],
    ),
    case(
        "redeclared_after_end",
        start(sizes={"t": 5}),
        frame(),
        end(),
        start(sizes={"t": 4}),
        frame(t=1),
        expect=["start", "frame", "end", "layout_conflict", "acquisition_ended"],
    ),
    case(
        "reopened_after_end",
        start(sizes={"t": 5}),
        frame(),
        end(),
        start(sizes={"t": 5}, metadata={"run": 2}),
        frame(t=1),
        expect=["start", "frame", "end", "start", "frame"],
    ),
    case(
        "redeclared_before_frames",
        start(sizes={"t": 5}),
        start(sizes={"t": 10}),
        frame(t=7),
        expect=["start", "start", "frame"],
    ),
    case("t_beyond_declared", start(sizes={"t": 2}), frame(t=2), expect=["start", "out_of_range"]),
    case("p_beyond_first_frame", frame(p=0), frame(p=1), expect=["frame", "out_of_range"]),
    case("z_beyond_declared", start(sizes={"z": 2}), frame(z=2), expect=["start", "out_of_range"]),
    case("c_beyond_declared", start(sizes={"c": 2}), frame(c=2), expect=["start", "out_of_range"]),
    case("undeclared_channel", frame(c=0), frame(c=1), expect=["frame", "undeclared_channel"]),
    case("t_at_service_limit", frame(t=1000), expect="out_of_range"),
    case("t_2_pow_63", frame(t=2**63), expect="out_of_range"),
    case("t_2_pow_64", frame(t=2**64), expect="out_of_range"),
    case("p_at_service_limit", frame(p=8), expect="out_of_range"),
    case("z_at_service_limit", frame(z=8), expect="out_of_range"),
    case("first_frame_at_last_position", frame(p=7, z=7), expect="frame"),
    case("start_more_positions_than_allowed", start(sizes={"p": 9}), expect="out_of_range"),
    case("start_more_channels_than_allowed", start(sizes={"c": 5}), expect="out_of_range"),
    case("start_more_time_points_than_allowed", start(sizes={"t": 1001}), expect="out_of_range"),
    case("start_frames_with_too_many_pixels", start(shape=[512, 512]), expect="too_large"),
    case("start_negative_size", start(sizes={"t": -1}), expect="bad_field"),
    case("start_zero_size", start(sizes={"z": 0}), expect="bad_field"),
    case("start_sizes_not_an_object", start(sizes=[1, 2]), expect="bad_field"),
    case("start_pixel_size_text", start(pixel_size_um="abc"), expect="bad_field"),
    case("start_pixel_size_negative", start(pixel_size_um=-0.5), expect="bad_field"),
    case(
        "start_pixel_size_overflow",
        [start(pixel_size_um=1)[0].replace(b": 1}", b": 1e400}")],
        expect="~bad_json",
    ),
    case("start_shape_rank_1", start(shape=[8]), expect="bad_shape"),
    case("start_shape_zero", start(shape=[0, 8]), expect="bad_shape"),
    case("start_frames_too_small", start(shape=[2, 64]), expect="bad_shape"),
    case("start_dtype_complex", start(dtype="complex64"), expect="bad_dtype"),
    case("start_dtype_bool", start(dtype="bool"), expect="bad_dtype"),
    case("start_shape_contradicts_sizes_c", start(shape=[4, 5, 3], sizes={"c": 2}), expect="bad_field"),
    case("start_two_nuclear_channels", start(channels={"roles": ["nuclear", "nuclear"]}), expect="bad_field"),
    case("start_positions_not_a_list", start(positions=5), expect="bad_field"),
    case("start_colour_not_hex", start(channels={"names": ["a"], "colors": ["red"]}), expect="bad_field"),
    case("end_frames_negative", end(frames=-1), expect="bad_field"),
    case("end_frames_text", end(frames="ten"), expect="bad_field"),
    case(
        "one_by_one_after_four_by_five",
        frame(),
        frame(t=1, shape=(1, 1)),
        expect=["frame", "bad_shape"],
    ),
    case("dtype_conflict", frame(), frame(t=1, dtype="uint8"), expect=["frame", "layout_conflict"]),
    case("shape_conflicts_with_declared", start(shape=[8, 8]), frame(), expect=["start", "layout_conflict"]),
    case("dtype_conflicts_with_declared", start(dtype="uint8"), frame(), expect=["start", "layout_conflict"]),
    case(
        "channel_count_conflict",
        frame(shape=(4, 5, 2)),
        frame(t=1, shape=(4, 5, 3)),
        expect=["frame", "layout_conflict"],
    ),
    case(
        "channel_frame_with_channels",
        start(sizes={"c": 2}),
        frame(c=0, shape=(4, 5, 2)),
        expect=["start", "bad_shape"],
    ),
    case(
        "channel_set_complete",
        start(sizes={"c": 2}),
        frame(c=1),
        frame(c=0),
        expect=["start", "frame", "frame"],
    ),
    case("channel_set_incomplete", start(sizes={"c": 2}), frame(c=0), expect=["start", "frame"]),
    case(
        "too_many_acquisitions",
        frame(ID + "-1"),
        start(ID + "-2"),
        frame(ID + "-3"),
        frame(ID + "-4"),
        start(ID + "-4"),
        frame(ID + "-1", t=1),
        end(ID + "-1"),
        frame(ID + "-4"),
        expect=[
            "frame",
            "start",
            "frame",
            "too_many_acquisitions",
            "too_many_acquisitions",
            "frame",
            "end",
            "frame",
        ],
    ),
]


def test_the_table_is_large_and_covers_every_reason() -> None:
    from acquisition.protocol import Reason

    reasons = {e.lstrip("~") for c in CASES for e in c.expected}
    assert len(CASES) >= 80 and len({c.name for c in CASES}) == len(CASES)
    assert set(Reason) - {Reason.INTERNAL} <= {
        Reason(r) for r in reasons if r not in ("frame", "start", "end")
    }


# -- playing a case ----------------------------------------------------------------------------------------


def for_case(number: int, case: Case) -> list[list[bytes]]:
    """The case's messages, its ids made its own (``ACQ`` -> three digits), then an ``end`` for each of
    its valid ids (so the next case starts with no acquisition open)."""
    prefix = f"{number:03d}".encode()
    messages = [[parts[0].replace(b'"ACQ', b'"' + prefix), *parts[1:]] for parts in case.messages]
    ids = sorted(
        {a for a in map(_acquisition_of, messages) if a is not None and a.startswith(prefix.decode())}
    )
    return messages + [end(a) for a in ids]


def _acquisition_of(parts: list[bytes]) -> str | None:
    try:
        value = json.loads(parts[0]).get("acquisition")
    except (ValueError, AttributeError, RecursionError):
        return None
    return value if is_acquisition_id(value) else None


def _index_of(parts: list[bytes]) -> tuple[int, int, int, int | None]:
    index = {"t": 0, "p": 0, "z": 0, "c": None} | json.loads(parts[0])["index"]
    return index["t"], index["p"], index["z"], index["c"]


class Push:
    """A plain ZeroMQ PUSH socket: sends whatever it is given, waiting while the receiver is full."""

    def __init__(self, endpoint: str) -> None:
        self.socket: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.PUSH)
        self.socket.connect(endpoint)

    async def send(self, parts: Sequence[bytes]) -> None:
        while True:
            try:
                self.socket.send_multipart(list(parts), zmq.NOBLOCK)
                return
            except zmq.Again:
                await asyncio.sleep(0.002)

    def close(self) -> None:
        self.socket.close(linger=0)


def outcome(event: SourceEvent) -> str:
    if isinstance(event, Frame):
        return "frame"
    if isinstance(event, Started):
        return "start"
    if isinstance(event, Ended):
        return "end"
    assert isinstance(event, Rejected)
    return event.reason if event.acquisition is not None else "~" + event.reason


@pytest.mark.parametrize("number", range(len(CASES)), ids=[c.name for c in CASES])
def test_the_listener_refuses_each_hostile_message_with_its_reason(number: int) -> None:
    case = CASES[number]
    messages = for_case(number, case)
    after = messages[len(case.messages) :]
    prefix = f"{number:03d}"

    async def main() -> None:
        listener = FrameListener(
            endpoint=ANY_PORT, max_frame_bytes=MAX_FRAME_BYTES, limits=LIMITS, max_queued=32
        )
        async with listener:
            push = Push(listener.endpoint)
            try:
                for parts in [*messages, frame("sentinel")]:
                    await push.send(parts)
                events = [await listener.get() for _ in range(len(messages) + 1)]
            finally:
                push.close()
        got = [outcome(e) for e in events]
        assert got == case.expected + ["end"] * len(after) + ["frame"]
        for event in events:
            if isinstance(event, Rejected):
                assert event.detail
                assert event.acquisition is None or event.acquisition.startswith(prefix)
        # The listener kept serving, and every message was counted once.
        assert listener.stats.received == len(messages) + 1
        assert sum(listener.stats.rejected.values()) == sum(
            1 for g in got if g not in ("frame", "start", "end")
        )

    run(main())


# -- the same messages through the pipeline, with the store on disk ---------------------------------------


def _tree(root: Path, skip: Path) -> set[str]:
    """Every path under ``root`` except those under ``skip`` (relative, with file sizes)."""
    out = set()
    for path in root.rglob("*"):
        if path == skip or skip in path.parents:
            continue
        out.add(f"{path.relative_to(root)}:{path.stat().st_size if path.is_file() else 'dir'}")
    return out


def test_hostile_messages_through_the_pipeline_write_nothing_outside_and_lose_no_frame(
    tmp_path: Path,
) -> None:
    output = tmp_path / "deep" / "er" / "out"  # an id escaping three levels up would land in tmp_path
    output.mkdir(parents=True)
    (tmp_path / "sentinel.txt").write_text("here before")
    before = _tree(tmp_path, output)
    escaped_before = ESCAPED.exists() or ESCAPED.with_suffix(".ome.zarr").exists()
    config = ServiceConfig.model_validate(
        {
            "ingest": {
                "endpoint": ANY_PORT,
                "max_concurrent": 4,
                "max_queued": 8,
                "max_frame_bytes": MAX_FRAME_BYTES,
                "max_time_points": LIMITS.max_time_points,
                "max_positions": LIMITS.max_positions,
                "max_z_planes": LIMITS.max_z_planes,
                "max_channels": LIMITS.max_channels,
                "max_frame_pixels": LIMITS.max_frame_pixels,
                "max_open_acquisitions": LIMITS.max_open_acquisitions,
                "idle_timeout_s": None,
                "retain_buffers": False,
            },
            "results": {"endpoint": ANY_PORT},
            "output": {"directory": str(output)},
            "assembly": {"timeout_s": 600},
        }
    )
    played = [(number, for_case(number, c)) for number, c in enumerate(CASES)]
    results = MemoryResultSink()
    pipeline = StreamPipeline(
        source=components.frame_listener(config),
        segmenter=FakeSegmenter(),
        labels=components.label_store(config),
        results=results,
        config=config,
        model_name="fake",
    )

    async def main() -> None:
        await pipeline.start()
        push = Push(pipeline.source.endpoint)
        try:
            for _, messages in played:
                for parts in messages:
                    await push.send(parts)
            total = sum(len(m) for _, m in played)
            await until(lambda: pipeline.source.stats.received == total, timeout=120)
        finally:
            push.close()
            await pipeline.stop()  # finishes every accepted frame

    run(main(), timeout=280)

    # Nothing was written outside the output directory.
    assert _tree(tmp_path, output) == before
    assert not escaped_before and not ESCAPED.exists() and not ESCAPED.with_suffix(".ome.zarr").exists()
    assert all(re.fullmatch(r"\.?\d{3}.*", p.name) for p in output.iterdir()), sorted(output.iterdir())

    by_acquisition: dict[str, list[Any]] = {}
    for result in results.results:
        by_acquisition.setdefault(result.acquisition, []).append(result)
    failures = Counter(r.reason for r in results.results if r.status == "failed")
    assert set(failures) <= {"incomplete_channels"}, failures  # input errors are rejections, not failures
    for number, c in enumerate(CASES):
        prefix = f"{number:03d}"
        mine = [r for a, rs in by_acquisition.items() if a.startswith(prefix) for r in rs]
        # Every rejection with a readable id was published to it, with its reason.
        published = Counter(r.reason for r in mine if r.status == "rejected")
        assert published == Counter(
            e for e in c.expected if e not in ("frame", "start", "end") and e[0] != "~"
        ), c.name
        # Every accepted frame ended as labels in the store or as a published failure, never both.
        messages = played[number][1]
        for parts, expected in zip(messages, c.expected, strict=False):
            if expected != "frame":
                continue
            acquisition = _acquisition_of(parts)
            assert acquisition is not None
            t, p, z, channel = _index_of(parts)
            same = [
                r
                for r in by_acquisition.get(acquisition, [])
                if r.index is not None and (r.index.t, r.index.p, r.index.z) == (t, p, z)
            ]
            statuses = {r.status for r in same if r.status != "rejected" and r.index.c in (None, channel)}
            assert statuses in ({"ok"}, {"failed"}), (c.name, statuses)
            if statuses == {"ok"}:
                series = open_position(output / f"{acquisition}.ome.zarr", p)
                assert series["cellsam/done"][t, z] & 1, (c.name, t, p, z)
            else:
                assert c.name == "channel_set_incomplete"
    # Every acquisition ended: no store is left open, none counted as active.
    assert pipeline.ledger.active == 0
    assert pipeline.metrics.acquisitions_active._value.get() == 0
