"""Wire protocol v1: message models, encoding, decoding and validation (spec: ``docs/protocol.md``).

Pure functions and pydantic models; no sockets. ``decode_message`` turns the parts of one received
multipart message into a validated :class:`FrameMessage`, :class:`StartMessage` or :class:`EndMessage`,
or raises :class:`~acquisition.errors.ProtocolError` with a stable reason code. The pixel buffer is never
copied: the array returned is a view on part 1.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Annotated, Any, Literal, get_args

import msgspec
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from acquisition.errors import ProtocolError

__all__ = [
    "ACQUISITION_ID_PATTERN",
    "DEFAULT_FRAME_ENDPOINT",
    "DEFAULT_MAX_FRAME_BYTES",
    "DEFAULT_RESULT_ENDPOINT",
    "MAX_CHANNELS",
    "MAX_HEADER_BYTES",
    "PROTOCOL_VERSION",
    "SUPPORTED_DTYPES",
    "AcquisitionSizes",
    "AcquisitionSummary",
    "Channels",
    "EndMessage",
    "FrameHeader",
    "FrameMessage",
    "FrameResult",
    "Hello",
    "Index",
    "LabelsInfo",
    "Reason",
    "StartMessage",
    "decode_message",
    "default_channels",
    "encode_control",
    "encode_frame",
    "frame_header",
    "validate_acquisition_id",
]

PROTOCOL_VERSION = 1
DEFAULT_FRAME_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_RESULT_ENDPOINT = "tcp://127.0.0.1:5556"
MAX_HEADER_BYTES = 64 * 1024
MAX_CHANNELS = 16
DEFAULT_MAX_FRAME_BYTES = 1 << 30
ACQUISITION_ID_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"
_ID_RE = re.compile(ACQUISITION_ID_PATTERN)
_DtypeName = Literal["uint8", "uint16", "uint32", "int8", "int16", "int32", "float32", "float64"]
SUPPORTED_DTYPES: frozenset[str] = frozenset(get_args(_DtypeName))
_WIRE_DTYPES: dict[str, np.dtype[Any]] = {name: np.dtype(name).newbyteorder("<") for name in SUPPORTED_DTYPES}


class Reason(str, Enum):
    """Stable reason codes for rejected messages (metric label values; see ``docs/protocol.md``)."""

    BAD_MULTIPART = "bad_multipart"
    HEADER_TOO_LARGE = "header_too_large"
    BAD_JSON = "bad_json"
    BAD_VERSION = "bad_version"
    MISSING_FIELD = "missing_field"
    UNKNOWN_TYPE = "unknown_type"
    BAD_ACQUISITION_ID = "bad_acquisition_id"
    BAD_INDEX = "bad_index"
    BAD_SHAPE = "bad_shape"
    BAD_DTYPE = "bad_dtype"
    BAD_FIELD = "bad_field"
    TOO_LARGE = "too_large"
    SIZE_MISMATCH = "size_mismatch"
    NON_FINITE = "non_finite"
    ACQUISITION_ENDED = "acquisition_ended"
    INTERNAL = "internal"

    def __str__(self) -> str:
        return self.value


_WIRE = ConfigDict(frozen=True, extra="ignore")  # unknown fields are ignored within a version
_STRICT = ConfigDict(frozen=True, extra="forbid")


class Index(BaseModel):
    """Position of a frame in the acquisition; missing axes mean 0, ``c=None`` means all channels."""

    model_config = _STRICT
    t: int = Field(default=0, ge=0, strict=True, description="Time point.")
    p: int = Field(default=0, ge=0, strict=True, description="Stage position.")
    z: int = Field(default=0, ge=0, strict=True, description="Z slice.")
    c: int | None = Field(default=None, ge=0, strict=True, description="Channel, or None for all.")


class Channels(BaseModel):
    """Channel names along the C axis and which channel index is nuclear / whole-cell."""

    model_config = _STRICT
    names: tuple[str, ...] = Field(default=(), description="Channel names, in C-axis order.")
    nuclear: int | None = Field(default=None, ge=0, description="C index of the nuclear channel.")
    whole_cell: int | None = Field(default=None, ge=0, description="C index of the whole-cell channel.")


@functools.lru_cache(maxsize=16)
def default_channels(n_channels: int) -> Channels:
    """Channel roles assumed when neither the frame nor its acquisition declared them.

    One channel: role unspecified (the model's single-channel default); two: ``[nuclear, whole_cell]``;
    otherwise unspecified.
    """
    if n_channels == 2:
        return Channels(nuclear=0, whole_cell=1)
    return Channels()


class AcquisitionSizes(BaseModel):
    """Expected extents per axis; ``None`` means open-ended."""

    model_config = _STRICT
    t: int | None = Field(default=None, ge=1, description="Number of time points.")
    p: int | None = Field(default=None, ge=1, description="Number of positions.")
    z: int | None = Field(default=None, ge=1, description="Number of z slices.")
    c: int | None = Field(default=None, ge=1, description="Number of channels sent as separate frames.")


class FrameHeader(BaseModel):
    """Part 0 of a frame message."""

    # NaN and infinities serialise as JSON's non-standard constants, which encode_frame then refuses.
    model_config = _WIRE | ConfigDict(ser_json_inf_nan="constants")
    type: Literal["frame"] = Field(default="frame", description="Message type.")
    v: Literal[1] = Field(default=1, description="Protocol version.")
    acquisition: str = Field(pattern=ACQUISITION_ID_PATTERN, description="Acquisition id.")
    index: Index = Field(default_factory=Index, description="Frame index (t, p, z, c).")
    shape: tuple[StrictInt, ...] = Field(description="(H, W) or (H, W, C) of the pixel buffer.")
    dtype: str = Field(description="numpy dtype name of the pixel buffer (little-endian).")
    timestamp: float | None = Field(default=None, description="Acquisition time, seconds since epoch.")
    channels: Channels | None = Field(default=None, description="Channel names and roles, if declared.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form JSON metadata.")

    @field_validator("v", mode="before")
    @classmethod
    def _version_is_an_integer(cls, value: Any) -> Any:
        # Literal[1] alone also takes true and 1.0, which the protocol rejects.
        if type(value) is not int:
            raise ValueError(f"version must be the integer 1, got {value!r}")
        return value

    @property
    def nbytes(self) -> int:
        """Size in bytes the pixel buffer must have."""
        dtype = _WIRE_DTYPES.get(self.dtype)
        return math.prod(self.shape) * (dtype if dtype is not None else np.dtype(self.dtype)).itemsize


class StartMessage(BaseModel):
    """Declares (or re-opens) an acquisition."""

    model_config = _WIRE
    type: Literal["start"] = Field(default="start", description="Message type.")
    v: Literal[1] = Field(default=1, description="Protocol version.")
    acquisition: str = Field(pattern=ACQUISITION_ID_PATTERN, description="Acquisition id.")
    sizes: AcquisitionSizes = Field(default_factory=AcquisitionSizes, description="Expected extents.")
    channels: Channels | None = Field(default=None, description="Channel names and roles.")
    shape: tuple[StrictInt, ...] | None = Field(default=None, description="Expected frame shape, if known.")
    dtype: str | None = Field(default=None, description="Expected frame dtype, if known.")
    settings: dict[str, Any] = Field(default_factory=dict, description="Per-acquisition model settings.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form JSON metadata.")


class EndMessage(BaseModel):
    """Closes an acquisition."""

    model_config = _WIRE
    type: Literal["end"] = Field(default="end", description="Message type.")
    v: Literal[1] = Field(default=1, description="Protocol version.")
    acquisition: str = Field(pattern=ACQUISITION_ID_PATTERN, description="Acquisition id.")
    frames: int | None = Field(default=None, ge=0, description="Frames the sender sent, if it counted.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form JSON metadata.")


class LabelsInfo(BaseModel):
    """Describes the label buffer attached as part 2 of a result message."""

    model_config = _STRICT
    shape: tuple[int, ...] = Field(description="(H, W) of the label image.")
    dtype: str = Field(default="uint32", description="numpy dtype name, little-endian.")


class FrameResult(BaseModel):
    """Per-frame result published on ``r/<acquisition>`` (and ``l/<acquisition>``).

    ``boxes`` are XYXY in input pixels, ``centroids`` (y, x) in pixels, ``areas`` in pixels; entry ``i``
    of each list belongs to label value ``i + 1``. ``latency`` is seconds per stage.
    """

    model_config = _WIRE
    type: Literal["result"] = Field(default="result", description="Message type.")
    v: Literal[1] = Field(default=1, description="Protocol version.")
    acquisition: str = Field(pattern=ACQUISITION_ID_PATTERN, description="Acquisition id.")
    index: Index | None = Field(default=None, description="Frame index; None if it could not be read.")
    status: Literal["ok", "failed", "rejected"] = Field(default="ok", description="Outcome.")
    reason: str | None = Field(default=None, description="Reason code when not ok.")
    detail: str | None = Field(default=None, description="Human-readable explanation when not ok.")
    n_cells: int = Field(default=0, ge=0, description="Number of cells found.")
    boxes: list[tuple[float, float, float, float]] = Field(default_factory=list, description="XYXY px.")
    centroids: list[tuple[float, float]] = Field(default_factory=list, description="(y, x) px.")
    areas: list[int] = Field(default_factory=list, description="Cell areas in pixels.")
    scores: list[float] = Field(default_factory=list, description="Detector scores.")
    latency: dict[str, float] = Field(default_factory=dict, description="Seconds per stage.")
    model: str | None = Field(default=None, description="Model name that produced the result.")
    timestamp: float | None = Field(default=None, description="Publication time, seconds since epoch.")
    labels: LabelsInfo | None = Field(default=None, description="Set when part 2 carries labels.")


class AcquisitionSummary(BaseModel):
    """End-of-acquisition summary published after ``end`` and the last accepted frame."""

    model_config = _WIRE
    type: Literal["summary"] = Field(default="summary", description="Message type.")
    v: Literal[1] = Field(default=1, description="Protocol version.")
    acquisition: str = Field(pattern=ACQUISITION_ID_PATTERN, description="Acquisition id.")
    frames_declared: int | None = Field(default=None, description="`frames` of the end message.")
    frames_received: int = Field(default=0, ge=0, description="Frames accepted by the listener.")
    frames_ok: int = Field(default=0, ge=0, description="Frames segmented.")
    frames_failed: int = Field(default=0, ge=0, description="Frames whose segmentation failed.")
    frames_rejected: int = Field(default=0, ge=0, description="Frames rejected by validation.")
    frames_dropped: int = Field(default=0, ge=0, description="Frames dropped in live mode.")
    n_cells_total: int = Field(default=0, ge=0, description="Cells over all frames.")
    started_at: float | None = Field(default=None, description="First message, seconds since epoch.")
    ended_at: float | None = Field(default=None, description="End message, seconds since epoch.")


class Hello(BaseModel):
    """Heartbeat published on topic ``h``; receiving one proves earlier subscriptions are active."""

    model_config = _WIRE
    type: Literal["hello"] = Field(default="hello", description="Message type.")
    v: Literal[1] = Field(default=1, description="Protocol version.")
    time: float = Field(description="Publication time, seconds since epoch.")


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
    def declares_channels(self) -> bool:
        """Whether the header itself names the channels (else its acquisition's or the defaults hold)."""
        if self._wire is not None:
            return isinstance(self._wire.channels, _ChannelsWire)
        return self.header.channels is not None

    def __repr__(self) -> str:
        return f"FrameMessage({self.header!r}, data={self.data.shape} {self.data.dtype})"


def validate_acquisition_id(value: object) -> str:
    """Return ``value`` if it is a safe acquisition id, else raise ``ProtocolError(bad_acquisition_id)``.

    Safe means 1-128 characters from ``[A-Za-z0-9._-]``, not starting with a dot: it can be used as a
    directory name without naming a parent directory, a hidden file or a path outside the output folder.
    """
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ProtocolError(
            Reason.BAD_ACQUISITION_ID,
            f"acquisition id {str(value)[:140]!r} must be 1-128 characters from [A-Za-z0-9._-], "
            "not starting with '.'",
        )
    return value


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed in headers")


# One decoder for every header: ``json.loads`` with keyword arguments builds a new one per call.
_HEADER_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _parse_header(part: Any) -> dict[str, Any]:
    view = memoryview(part)
    if view.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(
            Reason.HEADER_TOO_LARGE, f"header is {view.nbytes} bytes; the limit is {MAX_HEADER_BYTES}"
        )
    try:
        obj = _HEADER_DECODER.decode(view.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(Reason.BAD_JSON, f"header is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(Reason.BAD_JSON, f"header must be a JSON object, got {type(obj).__name__}")
    return obj


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
    if header.dtype not in SUPPORTED_DTYPES:
        raise _frame_error(
            header, Reason.BAD_DTYPE, f"dtype {header.dtype!r} is not one of {sorted(SUPPORTED_DTYPES)}"
        )
    shape = header.shape
    if len(shape) not in (2, 3) or any(n < 1 for n in shape):
        raise _frame_error(
            header, Reason.BAD_SHAPE, f"shape {list(shape)} must be [H, W] or [H, W, C] of ints ≥ 1"
        )
    if len(shape) == 3 and shape[2] > MAX_CHANNELS:
        raise _frame_error(header, Reason.BAD_SHAPE, f"{shape[2]} channels; at most {MAX_CHANNELS} allowed")


def decode_message(
    parts: Sequence[Any], *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> FrameMessage | StartMessage | EndMessage:
    """Decode and validate one multipart message.

    Parameters
    ----------
    parts : sequence of buffer-like
        The message parts (``bytes``, ``memoryview`` or ``zmq.Frame``; anything exposing the buffer
        protocol). Part 1 of a frame is wrapped, not copied.
    max_frame_bytes : int
        Largest accepted pixel buffer; larger frames are rejected with ``too_large``.

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
            return FrameMessage(header, _wrap_buffer(header, parts[1], max_frame_bytes))
    return _decode_full(parts, max_frame_bytes)


def _decode_full(parts: Sequence[Any], max_frame_bytes: int) -> FrameMessage | StartMessage | EndMessage:
    """Every check in order, so a rejection names its first reason: control messages and bad input."""
    if len(parts) == 0:
        raise ProtocolError(Reason.BAD_MULTIPART, "empty message")
    obj = _parse_header(parts[0])
    if "v" not in obj:
        raise ProtocolError(Reason.MISSING_FIELD, "required field 'v' is missing")
    if type(obj["v"]) is not int or obj["v"] != PROTOCOL_VERSION:
        raise ProtocolError(Reason.BAD_VERSION, f"version {obj['v']!r} is not supported; this is v1")
    if "type" not in obj:
        raise ProtocolError(Reason.MISSING_FIELD, "required field 'type' is missing")
    kind = obj["type"]
    if kind not in ("frame", "start", "end"):
        raise ProtocolError(Reason.UNKNOWN_TYPE, f"type {kind!r} is not one of 'frame', 'start', 'end'")
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
    return FrameMessage(header, _wrap_buffer(header, parts[1], max_frame_bytes))


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
    shape: _Shape  # with dtype: what _check_layout checks, but for the channel limit
    dtype: _DtypeName
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
        return math.prod(self.shape) * _WIRE_DTYPES[self.dtype].itemsize


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
    if not _ID_RE.fullmatch(wire.acquisition) or (len(wire.shape) == 3 and wire.shape[2] > MAX_CHANNELS):
        return None
    return wire


def _wrap_buffer(header: FrameHeader | _FrameHeaderWire, part: Any, max_frame_bytes: int) -> np.ndarray:
    """The pixels of ``part`` as a read-only array view, for a header whose layout is checked."""
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
    dtype = _WIRE_DTYPES[header.dtype]  # only supported dtypes get here
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


def _dump(model: BaseModel) -> bytes:
    try:
        return json.dumps(model.model_dump(mode="json"), allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise ProtocolError(Reason.BAD_FIELD, f"message is not JSON-serialisable: {exc}") from None


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
    """``_dump(header)`` in one call of pydantic's serialiser: the per-frame path of senders.

    Anything that path cannot settle (a non-finite number, or text that only looks like one; a value
    without a JSON form) goes through :func:`_dump`, which accepts it or raises the protocol's error.
    """
    try:
        raw = _FRAME_HEADER_TO_JSON(header)
    except ValueError:  # PydanticSerializationError
        return _dump(header)
    if _has_json_constant(raw):
        return _dump(header)
    return raw


def encode_control(message: StartMessage | EndMessage) -> list[bytes]:
    """Return the single part of a control message."""
    return [_dump(message)]
