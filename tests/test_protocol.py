"""Wire protocol v1: every rejection reason and the valid variants, table-driven (docs/protocol.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from acquisition.errors import InvalidAcquisitionIdError, ProtocolError
from acquisition.ids import validate_acquisition_id
from acquisition.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    MAX_HEADER_BYTES,
    AcquisitionSizes,
    EndMessage,
    FrameResult,
    Index,
    Reason,
    StartMessage,
    dump_json,
)
from acquisition.wire import (
    FrameMessage,
    _decode_full,
    _dump_frame_header,
    _frame_header_fast,
    _wrap_buffer,
    decode_message,
    encode_control,
    encode_frame,
    frame_header,
)
from cellsam_core.cells import CellTable

DROP = object()  # marks a field to remove from the base header


def header(**changes: Any) -> bytes:
    base: dict[str, Any] = {
        "type": "frame",
        "v": 1,
        "acquisition": "exp-1",
        "index": {"t": 2, "p": 1, "z": 0},
        "shape": [4, 6],
        "dtype": "uint16",
    }
    for key, value in changes.items():
        if value is DROP:
            base.pop(key, None)
        else:
            base[key] = value
    return json.dumps(base).encode()


PIXELS = np.arange(24, dtype="<u2").tobytes()  # a valid (4, 6) uint16 buffer


def control(kind: str, **changes: Any) -> bytes:
    base: dict[str, Any] = {"type": kind, "v": 1, "acquisition": "exp-1"}
    base.update(changes)
    return json.dumps(base).encode()


@dataclass(frozen=True)
class Case:
    name: str
    parts: list[bytes]
    expected: str  # a Reason value, or "frame" / "start" / "end" for valid messages
    max_frame_bytes: int = 1 << 20
    max_frame_pixels: int | None = None


CASES = [
    # valid variants
    Case("frame_uint16_2d", [header(), PIXELS], "frame"),
    Case("frame_index_axes_default", [header(index={}), PIXELS], "frame"),
    Case("frame_with_channel_index", [header(index={"t": 0, "c": 3}), PIXELS], "frame"),
    Case(
        "frame_rgb_uint8",
        [header(shape=[4, 6, 3], dtype="uint8"), np.zeros((4, 6, 3), np.uint8).tobytes()],
        "frame",
    ),
    Case("frame_float32", [header(dtype="float32"), np.ones((4, 6), "<f4").tobytes()], "frame"),
    Case(
        "frame_optional_fields",
        [
            header(
                timestamp=1.7e9,
                channels={"names": ["DAPI"], "nuclear": 0},
                metadata={"exposure_ms": 20, "event": {"index": {"t": 2}}},
            ),
            PIXELS,
        ],
        "frame",
    ),
    Case("frame_unknown_fields_ignored", [header(future_field={"x": 1}), PIXELS], "frame"),
    Case("frame_id_max_length", [header(acquisition="a" * 128), PIXELS], "frame"),
    Case("start_minimal", [control("start")], "start"),
    Case(
        "start_full",
        [
            control(
                "start",
                sizes={"t": 10, "p": None, "z": 2},
                channels={"names": ["n", "c"], "nuclear": 0, "whole_cell": 1},
                shape=[64, 64],
                dtype="uint16",
                settings={"model": "cellsam_general"},
            )
        ],
        "start",
    ),
    Case("end_minimal", [control("end")], "end"),
    Case("end_with_count", [control("end", frames=12)], "end"),
    # framing
    Case("no_parts", [], Reason.BAD_MULTIPART),
    Case("frame_without_buffer", [header()], Reason.BAD_MULTIPART),
    Case("frame_three_parts", [header(), PIXELS, b"x"], Reason.BAD_MULTIPART),
    Case("control_with_buffer", [control("start"), b"x"], Reason.BAD_MULTIPART),
    Case(
        "header_too_large", [header(metadata={"x": "a" * MAX_HEADER_BYTES}), PIXELS], Reason.HEADER_TOO_LARGE
    ),
    # JSON
    Case("not_json", [b"hello", PIXELS], Reason.BAD_JSON),
    Case("not_utf8", [b"\xff\xfe{}", PIXELS], Reason.BAD_JSON),
    Case("json_array", [b"[1, 2]", PIXELS], Reason.BAD_JSON),
    Case("json_nan", [b'{"v": 1, "type": "frame", "x": NaN}', PIXELS], Reason.BAD_JSON),
    Case(
        "json_number_overflow", [header(timestamp=1).replace(b": 1}", b": 1e400}"), PIXELS], Reason.BAD_JSON
    ),
    Case("json_nested_too_deep", [b"[" * 20_000 + b"]" * 20_000, PIXELS], Reason.BAD_JSON),
    Case(
        "metadata_nested_too_deep",
        [header(metadata={"x": 1}).replace(b"1}", b"[" * 100 + b"]" * 100 + b"}"), PIXELS],
        Reason.BAD_JSON,
    ),
    Case(
        "metadata_nested_at_limit",
        [header(metadata={"x": 1}).replace(b"1}", b"[" * 62 + b"]" * 62 + b"}"), PIXELS],
        "frame",
    ),
    # version, type, id
    Case("version_2", [header(v=2), PIXELS], Reason.BAD_VERSION),
    Case("version_string", [header(v="1"), PIXELS], Reason.BAD_VERSION),
    Case("version_bool", [header(v=True), PIXELS], Reason.BAD_VERSION),
    Case("missing_v", [header(v=DROP), PIXELS], Reason.MISSING_FIELD),
    Case("missing_type", [header(type=DROP), PIXELS], Reason.MISSING_FIELD),
    Case("unknown_type", [header(type="frames"), PIXELS], Reason.UNKNOWN_TYPE),
    Case("missing_acquisition", [header(acquisition=DROP), PIXELS], Reason.MISSING_FIELD),
    Case("id_parent_dir", [header(acquisition=".."), PIXELS], Reason.BAD_ACQUISITION_ID),
    Case("id_path", [header(acquisition="../etc"), PIXELS], Reason.BAD_ACQUISITION_ID),
    Case("id_slash", [header(acquisition="a/b"), PIXELS], Reason.BAD_ACQUISITION_ID),
    Case("id_hidden", [header(acquisition=".hidden"), PIXELS], Reason.BAD_ACQUISITION_ID),
    Case("id_empty", [header(acquisition=""), PIXELS], Reason.BAD_ACQUISITION_ID),
    Case("id_too_long", [header(acquisition="a" * 129), PIXELS], Reason.BAD_ACQUISITION_ID),
    Case("id_not_string", [header(acquisition=42), PIXELS], Reason.BAD_ACQUISITION_ID),
    # fields
    Case("missing_index", [header(index=DROP), PIXELS], Reason.MISSING_FIELD),
    Case("missing_shape", [header(shape=DROP), PIXELS], Reason.MISSING_FIELD),
    Case("missing_dtype", [header(dtype=DROP), PIXELS], Reason.MISSING_FIELD),
    Case("index_negative", [header(index={"t": -1}), PIXELS], Reason.BAD_INDEX),
    Case("index_float", [header(index={"t": 1.5}), PIXELS], Reason.BAD_INDEX),
    Case("index_string", [header(index={"t": "1"}), PIXELS], Reason.BAD_INDEX),
    Case("index_unknown_axis", [header(index={"q": 1}), PIXELS], Reason.BAD_INDEX),
    Case("index_not_object", [header(index=[1, 2]), PIXELS], Reason.BAD_INDEX),
    Case("shape_rank_1", [header(shape=[24]), PIXELS], Reason.BAD_SHAPE),
    Case("shape_rank_4", [header(shape=[1, 4, 6, 1]), PIXELS], Reason.BAD_SHAPE),
    Case("shape_zero", [header(shape=[0, 6]), b""], Reason.BAD_SHAPE),
    Case("shape_one_by_one", [header(shape=[1, 1]), PIXELS[:2]], Reason.BAD_SHAPE),
    Case("shape_three_rows", [header(shape=[3, 8]), PIXELS], Reason.BAD_SHAPE),
    Case("shape_smallest", [header(shape=[4, 4]), PIXELS[:32]], "frame"),
    Case("shape_string_dims", [header(shape=["4", 6]), PIXELS], Reason.BAD_SHAPE),
    Case("shape_too_many_channels", [header(shape=[1, 1, 17], dtype="uint8"), bytes(17)], Reason.BAD_SHAPE),
    Case("dtype_complex", [header(dtype="complex64"), PIXELS], Reason.BAD_DTYPE),
    Case("dtype_float16", [header(dtype="float16"), PIXELS], Reason.BAD_DTYPE),
    Case("dtype_object", [header(dtype="object"), PIXELS], Reason.BAD_DTYPE),
    Case("dtype_not_string", [header(dtype=2), PIXELS], Reason.BAD_DTYPE),
    Case("metadata_not_object", [header(metadata=[1]), PIXELS], Reason.BAD_FIELD),
    Case("timestamp_string", [header(timestamp="now"), PIXELS], Reason.BAD_FIELD),
    Case("channels_bad", [header(channels={"names": 3}), PIXELS], Reason.BAD_FIELD),
    Case("start_zero_size", [control("start", sizes={"t": 0})], Reason.BAD_FIELD),
    Case("start_pixel_size_text", [control("start", pixel_size_um="abc")], Reason.BAD_FIELD),
    Case("start_shape_rank_1", [control("start", shape=[64])], Reason.BAD_SHAPE),
    Case("start_shape_negative", [control("start", shape=[64, -1])], Reason.BAD_SHAPE),
    Case("start_shape_too_small", [control("start", shape=[2, 64])], Reason.BAD_SHAPE),
    Case("start_dtype_bool", [control("start", dtype="bool")], Reason.BAD_DTYPE),
    Case("start_dtype_big_endian", [control("start", dtype=">u2")], Reason.BAD_DTYPE),
    Case("start_channels_disagree", [control("start", shape=[8, 8, 3], sizes={"c": 2})], Reason.BAD_FIELD),
    Case("end_negative_frames", [control("end", frames=-1)], Reason.BAD_FIELD),
    # size and values
    Case("buffer_short", [header(), PIXELS[:-2]], Reason.SIZE_MISMATCH),
    Case("buffer_long", [header(), PIXELS + b"\0\0"], Reason.SIZE_MISMATCH),
    Case("declared_too_large", [header(shape=[4096, 4096]), PIXELS], Reason.TOO_LARGE),
    Case("buffer_too_large", [header(), bytes(64)], Reason.TOO_LARGE, max_frame_bytes=47),
    Case("too_many_pixels", [header(), PIXELS], Reason.TOO_LARGE, max_frame_pixels=23),
    Case("pixels_at_limit", [header(), PIXELS], "frame", max_frame_pixels=24),
    Case("frame_at_limit", [header(), PIXELS], "frame", max_frame_bytes=48),
    Case(
        "float_nan",
        [header(dtype="float32"), np.array([np.nan] + [0.0] * 23, "<f4").tobytes()],
        Reason.NON_FINITE,
    ),
    Case(
        "float_inf",
        [header(dtype="float64"), np.array([0.0] * 23 + [-np.inf], "<f8").tobytes()],
        Reason.NON_FINITE,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decode(case: Case) -> None:
    if case.expected in ("frame", "start", "end"):
        message = decode_message(
            case.parts, max_frame_bytes=case.max_frame_bytes, max_frame_pixels=case.max_frame_pixels
        )
        expected_type = {"frame": FrameMessage, "start": StartMessage, "end": EndMessage}[case.expected]
        assert isinstance(message, expected_type)
        if isinstance(message, FrameMessage):
            assert message.data.shape == message.header.shape
            assert message.data.tobytes() == case.parts[1]
            assert not message.data.flags.writeable
    else:
        with pytest.raises(ProtocolError) as info:
            decode_message(
                case.parts, max_frame_bytes=case.max_frame_bytes, max_frame_pixels=case.max_frame_pixels
            )
        assert info.value.reason == case.expected
        assert str(case.expected) in str(info.value)


@pytest.mark.parametrize(
    ("raw", "acquisition"),
    [
        (header(v=2), "exp-1"),
        (header(v=DROP), "exp-1"),
        (header(type="stop"), "exp-1"),
        (header(type=DROP), "exp-1"),
        (header(v=2, acquisition="../x"), None),
        (header(type=["frame"], acquisition=7), None),
    ],
)
def test_rejections_before_the_id_check_name_a_valid_id(raw: bytes, acquisition: str | None) -> None:
    """So that they are published to the acquisition's subscribers, like every later rejection."""
    with pytest.raises(ProtocolError) as info:
        decode_message([raw, PIXELS])
    assert info.value.acquisition == acquisition


def test_every_input_reason_has_a_case() -> None:
    covered = {c.expected for c in CASES}
    # Checked by the sources against the acquisition (tests/test_source_conformance.py, test_layout.py).
    listener_only = {
        Reason.ACQUISITION_ENDED,
        Reason.INTERNAL,
        Reason.OUT_OF_RANGE,
        Reason.UNDECLARED_CHANNEL,
        Reason.LAYOUT_CONFLICT,
        Reason.TOO_MANY_ACQUISITIONS,
    }
    assert set(Reason) - listener_only <= covered


def test_rejection_carries_acquisition_when_known() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_message([header(), PIXELS[:-2]])
    assert info.value.acquisition == "exp-1"
    assert info.value.index == {"t": 2, "p": 1, "z": 0, "c": None}
    with pytest.raises(ProtocolError) as info:
        decode_message([b"garbage", PIXELS])
    assert info.value.acquisition is None
    assert isinstance(info.value, ValueError)


def test_decode_wraps_buffer_without_copy() -> None:
    buffer = bytearray(PIXELS)
    message = decode_message([header(), buffer])
    assert isinstance(message, FrameMessage)
    assert np.shares_memory(message.data, np.frombuffer(buffer, np.uint8))
    assert message.data[0, 1] == 1 and message.data[3, 5] == 23


def test_encode_decode_roundtrip() -> None:
    image = np.arange(4 * 5 * 2, dtype=np.float32).reshape(4, 5, 2)
    h = frame_header(
        image.shape, image.dtype, acquisition="a.b_c-1", index={"t": 5, "c": 1}, metadata={"k": [1, 2]}
    )
    parts = encode_frame(h, image)
    assert parts[1] is image  # C-contiguous little-endian: passed through for a zero-copy send
    message = decode_message([parts[0], memoryview(parts[1].data)])
    assert isinstance(message, FrameMessage)
    assert message.header == h
    np.testing.assert_array_equal(message.data, image)


def test_encode_converts_big_endian_and_non_contiguous() -> None:
    big = np.arange(20, dtype=">u2").reshape(4, 5)
    h = frame_header(big.shape, big.dtype, acquisition="x")
    message = decode_message([encode_frame(h, big)[0], encode_frame(h, big)[1].tobytes()])
    assert isinstance(message, FrameMessage)
    np.testing.assert_array_equal(message.data, big)
    strided = np.arange(48, dtype=np.uint8).reshape(4, 12)[:, ::2]
    h2 = frame_header(strided.shape, strided.dtype, acquisition="x")
    assert encode_frame(h2, strided)[1].flags.c_contiguous


@pytest.mark.parametrize(
    ("shape", "dtype", "reason"),
    [
        ((4, 4), np.bool_, Reason.BAD_DTYPE),
        ((4, 4), np.complex64, Reason.BAD_DTYPE),
        ((2, 4, 4, 1), np.uint8, "bad_shape"),
    ],
)
def test_frame_header_rejects_unsendable_arrays(shape: tuple[int, ...], dtype: Any, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        frame_header(shape, dtype, acquisition="x")
    assert info.value.reason == reason


def test_control_roundtrip() -> None:
    start = StartMessage(acquisition="e1", sizes=AcquisitionSizes(t=3), settings={"model": "m"})
    decoded = decode_message(encode_control(start))
    assert decoded == start
    end = EndMessage(acquisition="e1", frames=3)
    assert decode_message(encode_control(end)) == end


def test_validate_acquisition_id() -> None:
    assert validate_acquisition_id("Exp_1.2-a") == "Exp_1.2-a"
    for bad in ["", ".", "..", ".x", "a b", "ä", "a" * 129, "a\n", "a\r\n", "\na", "a/b", None]:
        with pytest.raises(InvalidAcquisitionIdError) as info:
            validate_acquisition_id(bad)
        assert isinstance(info.value, ProtocolError) and info.value.reason == Reason.BAD_ACQUISITION_ID


def test_frame_result_carries_the_cell_table_and_reads_it_back() -> None:
    labels = np.zeros((12, 20), np.uint16)
    labels[1:4, 2:9] = 1  # wider than tall: centroid_y != centroid_x
    labels[6:11, 14:17] = 2
    cells = CellTable.from_labels(
        labels, prompt_boxes=np.array([[1, 2, 4, 9], [np.nan] * 4]), scores=np.array([0.9, np.nan])
    )
    result = FrameResult(
        acquisition="e1",
        index=Index(t=1),
        n_cells=2,
        cells=FrameResult.cell_columns(cells),
        latency={"encode": 0.1},
        model="tiny",
    )
    wire = dump_json(result)  # standard JSON: NaN travels as null
    assert b"NaN" not in wire and b"null" in wire
    again = FrameResult.model_validate_json(wire)
    assert again == result
    assert again.status == "ok" and again.index is not None and again.index.t == 1
    assert again.cell_table().equals(cells)
    assert again.centroids == [(2.0, 5.0), (8.0, 15.0)]  # (y, x)
    assert again.cells["bbox_x1"] == [9, 17] and again.cells["score"] == [0.9, None]


# -- the per-frame fast path accepts exactly what the full decoder accepts -------------------------------

_VARIANTS: dict[str, list[Any]] = {
    "type": [DROP, "frame", "start", "FRAME", 1, None],
    "v": [DROP, 1, 2, 0, True, 1.0, "1", None, [1]],
    "acquisition": [DROP, "exp-1", "../up", ".hidden", "", "a" * 129, "a" * 128, "exp-1\n", 7, None, "é"],
    "index": [
        DROP,
        {},
        {"t": 1},
        {"t": 1, "p": 2, "z": 3, "c": 0},
        {"t": -1},
        {"t": 1.0},
        {"t": True},
        {"t": "1"},
        {"t": 2**70},
        {"t": 1, "q": 4},
        {"c": None},
        [],
        None,
    ],
    "shape": [
        DROP,
        [4, 6],
        [6, 4],
        [4, 6, 1],
        [1, 3, 16],
        [1, 1, 17],
        [24],
        [4, 6, 1, 1],
        [4, 6.0],
        [4, True],
        ["4", 6],
        [0, 6],
        [-4, 6],
        None,
    ],
    "dtype": [DROP, "uint16", "<u2", "float64", "complex64", "object", 16, None],
    "timestamp": [DROP, None, 1.7e9, 17, "17", True, [1]],
    "channels": [
        DROP,
        None,
        {},
        {"names": ["dapi"], "nuclear": 0},
        {"nuclear": True},
        {"nuclear": -1},
        {"names": "dapi"},
        {"extra": 1},
        [],
    ],
    "metadata": [
        DROP,
        {},
        {"exposure_ms": 20, "pos": [1.5, 2.5]},
        {"deep": {"a": [{"b": None}]}},
        [],
        "x",
        None,
    ],
}

_RAW_VARIANTS = [
    b"",
    b"{}",
    b"[]",
    b"null",
    b"\xef\xbb\xbf" + header(),  # UTF-8 byte-order mark
    header().decode().encode("utf-16"),
    header() + b" trailing",
    header() + b"  \n",
    b"  " + header(),
    header().replace(b'"dtype"', b'"dtype": "uint8", "dtype"'),  # duplicate key: the last one counts
    header().replace(b'"acquisition": "exp-1"', b'"acquisition": "../x", "acquisition": "exp-1"'),
    header(metadata={"x": 1}).replace(b'{"x": 1}', b'{"x": NaN}'),
    header(metadata={"x": 1}).replace(b'{"x": 1}', b'{"x": -Infinity}'),
    header(metadata={"x": "NaN and Infinity in a string"}),
    header(metadata={"x": 1}).replace(b'{"x": 1}', b'{"x": "\\ud800"}'),  # lone surrogate
    header(metadata={"x": 1}).replace(b'{"x": 1}', b'{"x": 1e400}'),
    header(metadata={"x": 1}).replace(b'{"x": 1}', b'{"x": ' + b"[" * 300 + b"]" * 300 + b"}"),
    header(metadata={"pad": "x" * MAX_HEADER_BYTES}),
    header(timestamp=1).replace(b'"timestamp": 1', b'"timestamp": 1E2'),
    header().replace(b'"v": 1', b'"v": 1.0'),
    header().replace(b'"v": 1', b'"v": 1e0'),
    header().replace(b'"v": 1', b'"v": -0'),
]


def _header_variants() -> list[bytes]:
    out = [header(**{key: value}) for key, values in _VARIANTS.items() for value in values]
    return out + _RAW_VARIANTS


def _outcome(decode: Any) -> Any:
    """A decode's result as comparable data: the header, or the rejection's reason and context."""
    try:
        message = decode()
    except ProtocolError as exc:
        return ("rejected", exc.reason, exc.acquisition, exc.index)
    except RecursionError:
        return ("recursion",)
    h = message.header
    # Equality alone would take 17 for 17.0: the repr of the set fields (nested too) pins down types.
    # What the listener reads without building the model must agree with the model.
    read = (message.acquisition, message.position, message.declares_channels)
    return ("accepted", h, h.model_fields_set, repr(h.model_dump(exclude_unset=True)), read)


def test_fast_frame_path_gives_the_full_paths_result_whenever_it_takes_a_header() -> None:
    taken = 0
    for raw in _header_variants():
        full = _outcome(lambda raw=raw: _decode_full([raw, PIXELS], DEFAULT_MAX_FRAME_BYTES, None))
        header = _frame_header_fast(raw)
        if header is None:  # left to the full path: always allowed
            continue
        taken += 1
        # Taking a header the full path rejects (bad version, missing index, NaN, ...) fails here.
        fast = _outcome(
            lambda h=header: FrameMessage(h, _wrap_buffer(h, PIXELS, DEFAULT_MAX_FRAME_BYTES, None))
        )
        assert fast == full, raw[:200]
        assert _outcome(lambda raw=raw: decode_message([raw, PIXELS])) == full
    assert taken >= 20  # the valid variants above do take the fast path


def test_fast_frame_path_takes_ordinary_valid_frames() -> None:
    image = np.zeros((4, 6), np.uint16)
    for extra in ({}, {"timestamp": 1.7e9}, {"metadata": {"exposure_ms": 20.5, "stage": [1, 2, 3]}}):
        raw = encode_frame(frame_header(image.shape, image.dtype, acquisition="a", **extra), image)[0]
        assert _frame_header_fast(raw) is not None, raw


@pytest.mark.parametrize(
    "metadata",
    [
        {},
        {"exposure_ms": 20.5, "pos_um": [1.25, -3.5e-7, 1e300], "name": "é µm \u2603", "none": None},
        {"nested": {"a": [{"b": [1, 2, {"c": True}]}]}, "big": 2**80},
        {"x": "NaN and Infinity, as text"},
        {"x": float("nan")},
        {"x": float("-inf")},
        {"x": {1, 2}},
        {"x": b"bytes"},
        {"x": np.int64(3)},
        {"x": object()},
    ],
)
def test_sender_header_fast_path_matches_the_reference_encoding(metadata: dict[str, Any]) -> None:
    header = frame_header((4, 6), "uint16", acquisition="a", timestamp=1.7e9, metadata=metadata)

    def outcome(dump: Any) -> Any:
        try:
            return json.loads(dump(header))
        except ProtocolError as exc:
            return exc.reason

    assert outcome(_dump_frame_header) == outcome(dump_json)
