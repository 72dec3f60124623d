"""Wire codec: received multipart messages to validated models, and frames to parts (``docs/protocol.md``).

``decode_message`` turns the parts of one received message into a validated :class:`FrameMessage`,
:class:`~acquisition.protocol.StartMessage` or :class:`~acquisition.protocol.EndMessage`, or raises
:class:`~acquisition.errors.ProtocolError` with a stable reason code. The pixel buffer is never copied:
the array returned is a view on part 1. Frame headers take a fast path first, a strict msgspec schema of
the v1 header; anything it does not take goes to the full decoder, which names the rejection reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
from pydantic import ValidationError

from acquisition.errors import ProtocolError
from acquisition.header_json import parse_header, readable_id, short, too_deep
from acquisition.ids import is_acquisition_id, validate_acquisition_id
from acquisition.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    MAX_CHANNELS,
    MAX_HEADER_BYTES,
    MIN_FRAME_SIDE,
    PROTOCOL_VERSION,
    WIRE_DTYPES,
    Channels,
    DtypeName,
    EndMessage,
    FrameHeader,
    Index,
    Reason,
    StartMessage,
    dump_json,
    shape_problem,
)
from cellsam_core.pixels import pixel_dtype_problem

__all__ = [
    "FrameMessage",
    "decode_message",
    "encode_control",
    "encode_frame",
    "frame_header",
]


class FrameMessage:
    """A decoded, validated frame: header plus a zero-copy, read-only view of the pixel buffer.

    ``data`` has shape ``header.shape`` ((H, W) or (H, W, C)) and dtype ``header.dtype`` (little-endian).
    On the per-frame path the header arrives as a compact, already validated record and the pydantic
    :class:`FrameHeader` is built from it the first time ``header`` is read; ``acquisition`` and
    ``position`` are read without building it.
    """

    __slots__ = ("_header", "_wire", "data")

    def __init__(self, header: FrameHeader | _FrameHeaderWire, data: np.ndarray) -> None:
        self._header: FrameHeader | None = header if isinstance(header, FrameHeader) else None
        self._wire: _FrameHeaderWire | None = header if isinstance(header, _FrameHeaderWire) else None
        self.data = data

    @property
    def header(self) -> FrameHeader:
        """The validated header."""
        if self._header is None:
            assert self._wire is not None
            self._header = self._wire.model()
        return self._header

    @property
    def acquisition(self) -> str:
        """Acquisition id."""
        return self._wire.acquisition if self._wire is not None else self.header.acquisition

    @property
    def position(self) -> tuple[int, int, int]:
        """``(t, p, z)`` of the frame's index."""
        if self._wire is not None:
            return self._wire.index.position
        i = self.header.index
        return i.t, i.p, i.z

    @property
    def channel(self) -> int | None:
        """``index.c``: the channel this frame carries alone, or None when it carries all of them."""
        if self._wire is not None:
            c = self._wire.index.c
            return None if c is None or c is msgspec.UNSET else int(c)
        return self.header.index.c

    @property
    def declares_channels(self) -> bool:
        """Whether the header itself names the channels (else its acquisition's or the defaults hold)."""
        if self._wire is not None:
            return isinstance(self._wire.channels, _ChannelsWire)
        return self.header.channels is not None

    def __repr__(self) -> str:
        return f"FrameMessage({self.header!r}, data={self.data.shape} {self.data.dtype})"


_LOC_REASON = {"index": Reason.BAD_INDEX, "shape": Reason.BAD_SHAPE, "dtype": Reason.BAD_DTYPE}


def _model_error(exc: ValidationError, acquisition: str) -> ProtocolError:
    err = exc.errors()[0]
    field = str(err["loc"][0]) if err["loc"] else "?"
    if err["type"] == "missing" and len(err["loc"]) == 1:
        reason = Reason.MISSING_FIELD
        detail = f"required field {field!r} is missing"
    else:
        reason = _LOC_REASON.get(field, Reason.BAD_FIELD)
        loc = ".".join(str(x) for x in err["loc"])
        detail = f"field {loc!r}: {err['msg']}"
    return ProtocolError(reason, detail, acquisition=acquisition)


def _frame_error(header: FrameHeader | _FrameHeaderWire, reason: Reason, detail: str) -> ProtocolError:
    """A rejection of a frame whose header was valid: it names the acquisition and index."""
    if isinstance(header, _FrameHeaderWire):
        header = header.model()
    return ProtocolError(reason, detail, acquisition=header.acquisition, index=header.index.model_dump())


def _check_layout(header: FrameHeader) -> None:
    problem = pixel_dtype_problem(header.dtype)
    if problem is not None:
        raise _frame_error(header, Reason.BAD_DTYPE, problem)
    problem = shape_problem(header.shape)
    if problem is not None:
        raise _frame_error(header, Reason.BAD_SHAPE, problem)


def decode_message(
    parts: Sequence[Any],
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    max_frame_pixels: int | None = None,
) -> FrameMessage | StartMessage | EndMessage:
    """Decode and validate one multipart message.

    Parameters
    ----------
    parts : sequence of buffer-like
        The message parts (``bytes``, ``memoryview`` or ``zmq.Frame``; anything exposing the buffer
        protocol). Part 1 of a frame is wrapped, not copied.
    max_frame_bytes : int
        Largest accepted pixel buffer; larger frames are rejected with ``too_large``.
    max_frame_pixels : int, optional
        Most pixels of one frame plane (``H * W``); larger frames are rejected with ``too_large``.

    Returns
    -------
    FrameMessage or StartMessage or EndMessage

    Raises
    ------
    ProtocolError
        With ``reason`` one of :class:`Reason` and, when it was valid, the message's acquisition id.
    """
    if len(parts) == 2:
        header = _frame_header_fast(parts[0])
        if header is not None:  # its layout is checked already
            return FrameMessage(header, _wrap_buffer(header, parts[1], max_frame_bytes, max_frame_pixels))
    return _decode_full(parts, max_frame_bytes, max_frame_pixels)


def _decode_full(
    parts: Sequence[Any], max_frame_bytes: int, max_frame_pixels: int | None
) -> FrameMessage | StartMessage | EndMessage:
    """Every check in order, so a rejection names its first reason: control messages and bad input.

    Rejections found before the acquisition id is checked (version, type) still name the id when it is a
    valid one, so that they can be published to its subscribers.
    """
    if len(parts) == 0:
        raise ProtocolError(Reason.BAD_MULTIPART, "empty message")
    obj = parse_header(parts[0])
    readable = readable_id(obj)
    if "v" not in obj:
        raise ProtocolError(Reason.MISSING_FIELD, "required field 'v' is missing", acquisition=readable)
    if type(obj["v"]) is not int or obj["v"] != PROTOCOL_VERSION:
        raise ProtocolError(
            Reason.BAD_VERSION,
            f"version {short(obj['v'])} is not supported; this is v1",
            acquisition=readable,
        )
    if "type" not in obj:
        raise ProtocolError(Reason.MISSING_FIELD, "required field 'type' is missing", acquisition=readable)
    kind = obj["type"]
    if kind not in ("frame", "start", "end"):
        raise ProtocolError(
            Reason.UNKNOWN_TYPE,
            f"type {short(kind)} is not one of 'frame', 'start', 'end'",
            acquisition=readable,
        )
    if "acquisition" not in obj:
        raise ProtocolError(Reason.MISSING_FIELD, "required field 'acquisition' is missing")
    acquisition = validate_acquisition_id(obj["acquisition"])
    expected_parts = 2 if kind == "frame" else 1
    if len(parts) != expected_parts:
        raise ProtocolError(
            Reason.BAD_MULTIPART,
            f"a {kind!r} message has {expected_parts} part(s), got {len(parts)}",
            acquisition=acquisition,
        )
    if kind == "start":
        try:
            return StartMessage.model_validate(obj)
        except ValidationError as exc:
            raise _model_error(exc, acquisition) from None
    if kind == "end":
        try:
            return EndMessage.model_validate(obj)
        except ValidationError as exc:
            raise _model_error(exc, acquisition) from None
    if "index" not in obj:
        # A missing index is a protocol error (the spec requires it), even though its axes default.
        raise ProtocolError(
            Reason.MISSING_FIELD, "required field 'index' is missing", acquisition=acquisition
        )
    try:
        header = FrameHeader.model_validate(obj)
    except ValidationError as exc:
        raise _model_error(exc, acquisition) from None
    _check_layout(header)
    return FrameMessage(header, _wrap_buffer(header, parts[1], max_frame_bytes, max_frame_pixels))


_FRAME_HEADER_TO_JSON = FrameHeader.__pydantic_serializer__.to_json

# The per-frame header as msgspec types: what a valid v1 frame header is, and nothing the full path
# would refuse (msgspec is strict: no bool or float for an int, no NaN, no lone surrogate, no BOM).
# ``type``, ``v`` and ``index`` are required, as the spec says; UNSET marks an optional field that was
# absent, so the pydantic model built from it knows which fields were set.
_NonNegative = Annotated[int, msgspec.Meta(ge=0)]
_Shape = Annotated[tuple[Annotated[int, msgspec.Meta(ge=1)], ...], msgspec.Meta(min_length=2, max_length=3)]


class _IndexWire(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    t: _NonNegative | msgspec.UnsetType = msgspec.UNSET
    p: _NonNegative | msgspec.UnsetType = msgspec.UNSET
    z: _NonNegative | msgspec.UnsetType = msgspec.UNSET
    c: _NonNegative | msgspec.UnsetType | None = msgspec.UNSET

    @property
    def position(self) -> tuple[int, int, int]:
        """``(t, p, z)``, a missing axis being 0 (UNSET is false)."""
        return self.t or 0, self.p or 0, self.z or 0


class _ChannelsWire(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    names: tuple[str, ...] | msgspec.UnsetType = msgspec.UNSET
    nuclear: _NonNegative | msgspec.UnsetType | None = msgspec.UNSET
    whole_cell: _NonNegative | msgspec.UnsetType | None = msgspec.UNSET


class _FrameHeaderWire(msgspec.Struct, frozen=True):  # unknown fields are ignored, as in FrameHeader
    type: Literal["frame"]
    v: Literal[1]
    acquisition: str
    index: _IndexWire
    shape: _Shape  # with dtype: what _check_layout checks, but for the side and channel limits
    dtype: DtypeName
    timestamp: float | msgspec.UnsetType | None = msgspec.UNSET
    channels: _ChannelsWire | msgspec.UnsetType | None = msgspec.UNSET
    metadata: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET

    def model(self) -> FrameHeader:
        """The same header as :class:`FrameHeader`, assembled without validating again."""
        fields = _given(self)
        fields["index"] = Index.model_construct(**_given(self.index))
        if isinstance(self.channels, _ChannelsWire):
            fields["channels"] = Channels.model_construct(**_given(self.channels))
        return FrameHeader.model_construct(**fields)

    @property
    def nbytes(self) -> int:
        """Size in bytes the pixel buffer must have (``dtype`` must be supported)."""
        return math.prod(self.shape) * WIRE_DTYPES[self.dtype].itemsize


_FRAME_HEADER_WIRE = msgspec.json.Decoder(_FrameHeaderWire)


def _given(wire: msgspec.Struct) -> dict[str, Any]:
    """The fields of ``wire`` that the message carried."""
    given = ((name, getattr(wire, name)) for name in wire.__struct_fields__)
    return {name: value for name, value in given if value is not msgspec.UNSET}


def _has_json_constant(raw: bytes) -> bool:
    """``NaN``/``Infinity`` in ``raw``: JSON extensions the protocol refuses (and pydantic writes)."""
    return b"NaN" in raw or b"Infinity" in raw


def _frame_header_fast(part: Any) -> _FrameHeaderWire | None:
    """The frame header in ``part`` when it is valid as it stands, else ``None``.

    One pass of msgspec's strict JSON decoder instead of ``json`` plus model validation: the per-frame
    path. It accepts only what the full path in :func:`decode_message` accepts, with the same result
    (``.model()`` gives the same values, types and set fields); anything else (including every invalid
    header) returns ``None`` and the full path finds the reason.
    """
    raw = part if isinstance(part, bytes) else memoryview(part)
    if len(raw) > MAX_HEADER_BYTES:
        return None
    try:
        wire = _FRAME_HEADER_WIRE.decode(raw)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        return None
    shape = wire.shape
    if (
        not is_acquisition_id(wire.acquisition)
        or shape[0] < MIN_FRAME_SIDE
        or shape[1] < MIN_FRAME_SIDE
        or (len(shape) == 3 and shape[2] > MAX_CHANNELS)
    ):
        return None
    if wire.metadata and too_deep(bytes(raw), wire.metadata, 2):  # the full path names the reason
        return None
    return wire


def _wrap_buffer(
    header: FrameHeader | _FrameHeaderWire, part: Any, max_frame_bytes: int, max_frame_pixels: int | None
) -> np.ndarray:
    """The pixels of ``part`` as a read-only array view, for a header whose layout is checked."""
    shape = header.shape
    if max_frame_pixels is not None and shape[0] * shape[1] > max_frame_pixels:
        raise _frame_error(
            header,
            Reason.TOO_LARGE,
            f"frame of {shape[0]}x{shape[1]} = {shape[0] * shape[1]} pixels exceeds the limit of "
            f"{max_frame_pixels} pixels (ingest.max_frame_pixels)",
        )
    view = memoryview(part)
    declared = header.nbytes
    if declared > max_frame_bytes or view.nbytes > max_frame_bytes:
        raise _frame_error(
            header,
            Reason.TOO_LARGE,
            f"frame of {max(declared, view.nbytes)} bytes exceeds the limit of {max_frame_bytes}",
        )
    if view.nbytes != declared:
        raise _frame_error(
            header,
            Reason.SIZE_MISMATCH,
            f"buffer has {view.nbytes} bytes; shape {list(header.shape)} of {header.dtype} needs {declared}",
        )
    dtype = WIRE_DTYPES[header.dtype]  # only supported dtypes get here
    data = np.ndarray(header.shape, dtype, buffer=view)  # a view: one array object, no copy
    data.flags.writeable = False
    if dtype.kind == "f" and not np.isfinite(data).all():
        raise _frame_error(header, Reason.NON_FINITE, "float frame contains NaN or infinite values")
    return data


def frame_header(
    array_shape: Sequence[int],
    dtype: np.dtype[Any] | str,
    *,
    acquisition: str,
    index: Index | Mapping[str, int | None] | None = None,
    timestamp: float | None = None,
    channels: Channels | Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> FrameHeader:
    """Build a validated :class:`FrameHeader` for an array of the given shape and dtype.

    Raises ``ProtocolError`` (same reasons as the listener would use) for an unsendable shape or dtype.
    """
    acquisition = validate_acquisition_id(acquisition)
    try:
        header = FrameHeader(
            acquisition=acquisition,
            index=Index.model_validate(dict(index or {})) if not isinstance(index, Index) else index,
            shape=tuple(int(n) for n in array_shape),
            dtype=np.dtype(dtype).name,
            timestamp=timestamp,
            channels=Channels.model_validate(dict(channels)) if isinstance(channels, Mapping) else channels,
            metadata=dict(metadata or {}),
        )
    except ValidationError as exc:
        raise _model_error(exc, acquisition) from None
    _check_layout(header)
    return header


def encode_frame(header: FrameHeader, data: np.ndarray) -> list[Any]:
    """Return the two parts ``[header bytes, buffer]`` of a frame message.

    ``data`` is passed through when it is C-contiguous and little-endian (zero-copy send); otherwise a
    C-contiguous little-endian copy is made. Its shape and dtype must match the header.
    """
    if tuple(data.shape) != header.shape or data.dtype.name != header.dtype:
        raise ProtocolError(
            Reason.SIZE_MISMATCH,
            f"array {data.shape} {data.dtype} does not match header {list(header.shape)} {header.dtype}",
        )
    le = data.dtype.newbyteorder("<")
    if data.dtype != le:
        data = data.astype(le)
    return [_dump_frame_header(header), np.ascontiguousarray(data)]


def _dump_frame_header(header: FrameHeader) -> bytes:
    """``dump_json(header)`` in one call of pydantic's serialiser: the per-frame path of senders.

    Anything that path cannot settle (a non-finite number, or text that only looks like one; a value
    without a JSON form) goes through :func:`~acquisition.protocol.dump_json`, which accepts it or
    raises the protocol's error.
    """
    try:
        raw = _FRAME_HEADER_TO_JSON(header)
    except ValueError:  # PydanticSerializationError
        return dump_json(header)
    if _has_json_constant(raw):
        return dump_json(header)
    return raw


def encode_control(message: StartMessage | EndMessage) -> list[bytes]:
    """Return the single part of a control message."""
    return [dump_json(message)]
