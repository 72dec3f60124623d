"""Wire protocol v1: the message models (spec: ``docs/protocol.md``).

Pydantic models of every message, the reason codes of rejections and the one JSON encoder of outgoing
messages (:func:`dump_json`). Turning received parts into these models, and frames into parts, is
:mod:`acquisition.wire`; no sockets here.
"""

from __future__ import annotations

import functools
import json
import math
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from acquisition.errors import ProtocolError
from acquisition.ids import AcquisitionId
from cellsam_core.pixels import MIN_IMAGE_SIDE, PIXEL_DTYPES, PixelDtypeName, pixel_dtype_problem

if TYPE_CHECKING:
    from cellsam_core.cells import CellTable

__all__ = [
    "DEFAULT_FRAME_ENDPOINT",
    "DEFAULT_MAX_FRAME_BYTES",
    "DEFAULT_RESULT_ENDPOINT",
    "MAX_CHANNELS",
    "MAX_HEADER_BYTES",
    "MAX_NESTING",
    "MIN_FRAME_SIDE",
    "PROTOCOL_VERSION",
    "SUPPORTED_DTYPES",
    "AcquisitionSizes",
    "AcquisitionSummary",
    "CellValue",
    "ChannelRole",
    "Channels",
    "EndMessage",
    "FrameHeader",
    "FrameResult",
    "Hello",
    "Index",
    "LabelsInfo",
    "PositionInfo",
    "Reason",
    "ResultIndex",
    "StartMessage",
    "TrackResult",
    "default_channels",
    "dump_json",
    "shape_problem",
]

PROTOCOL_VERSION = 1
DEFAULT_FRAME_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_RESULT_ENDPOINT = "tcp://127.0.0.1:5556"
MAX_HEADER_BYTES = 64 * 1024
MAX_CHANNELS = 16
#: Fewest pixels along y and along x of a frame (see ``cellsam_core.pixels.MIN_IMAGE_SIDE``).
MIN_FRAME_SIDE = MIN_IMAGE_SIDE
DEFAULT_MAX_FRAME_BYTES = 1 << 30

#: Nesting depth of JSON arrays and objects a header may have (the header object itself is level 1).
MAX_NESTING = 64

#: Pixel dtype names: one rule for the wire, ``POST /segment`` and the CLI (``cellsam_core.pixels``).
DtypeName = PixelDtypeName
SUPPORTED_DTYPES: frozenset[str] = PIXEL_DTYPES
WIRE_DTYPES: dict[str, np.dtype[Any]] = {name: np.dtype(name).newbyteorder("<") for name in SUPPORTED_DTYPES}


def shape_problem(shape: tuple[int, ...]) -> str | None:
    """Why ``shape`` cannot be a frame's, or None: ``(H, W)`` or ``(H, W, C)``, H and W at least
    ``MIN_FRAME_SIDE``, C from 1 to ``MAX_CHANNELS``."""
    if (
        len(shape) in (2, 3)
        and min(shape[:2]) >= MIN_FRAME_SIDE
        and shape[-1] >= 1
        and (len(shape) == 2 or shape[2] <= MAX_CHANNELS)
    ):
        return None
    return (
        f"shape {list(shape)[:8]} must be [H, W] or [H, W, C] with H, W ≥ {MIN_FRAME_SIDE} and "
        f"1 ≤ C ≤ {MAX_CHANNELS}"
    )


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
    OUT_OF_RANGE = "out_of_range"
    UNDECLARED_CHANNEL = "undeclared_channel"
    LAYOUT_CONFLICT = "layout_conflict"
    TOO_MANY_ACQUISITIONS = "too_many_acquisitions"
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


class ResultIndex(BaseModel):
    """A result's index when it covers a whole z-stack: its (t, p), ``z=None``, ``c=None``.

    Under a projection z policy (``z.policy`` ``max_projection`` or ``plane``) one result covers every z
    plane and channel of a (t, p); every other result names its frame with an :class:`Index`.
    """

    model_config = _STRICT
    t: int = Field(default=0, ge=0, strict=True, description="Time point.")
    p: int = Field(default=0, ge=0, strict=True, description="Stage position.")
    z: None = Field(default=None, description="None: every z plane of (t, p).")
    c: None = Field(default=None, description="None: every channel.")


#: What a channel is for the model: CellSAM's nuclear or whole-cell input, or not an input at all.
ChannelRole = Literal["nuclear", "whole_cell", "ignore"]


class Channels(BaseModel):
    """Channel names along the C axis, their roles for the model and their display colours.

    Roles are given either per channel (``roles``) or as the index of the nuclear and the whole-cell
    channel (``nuclear``, ``whole_cell``; the v1 form); :attr:`nuclear_channel` and
    :attr:`whole_cell_channel` read either.
    """

    model_config = _STRICT
    names: tuple[str, ...] = Field(default=(), description="Channel names, in C-axis order.")
    nuclear: int | None = Field(default=None, ge=0, description="C index of the nuclear channel.")
    whole_cell: int | None = Field(default=None, ge=0, description="C index of the whole-cell channel.")
    roles: tuple[ChannelRole, ...] = Field(
        default=(), description="Role of each channel (nuclear, whole_cell, ignore), in C-axis order."
    )
    colors: tuple[Annotated[str, Field(pattern=r"^[0-9A-Fa-f]{6}$")] | None, ...] = Field(
        default=(), description="Display colour of each channel as RRGGBB hex (null: the viewer's choice)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Channels:
        for name, values in (("roles", self.roles), ("colors", self.colors)):
            if values and self.names and len(values) != len(self.names):
                raise ValueError(f"{len(values)} {name} for {len(self.names)} channel names")
        if self.roles:
            for field, role in (("nuclear", "nuclear"), ("whole_cell", "whole_cell")):
                index = getattr(self, field)
                if index is not None and (index >= len(self.roles) or self.roles[index] != role):
                    raise ValueError(f"{field}={index} contradicts roles {list(self.roles)}")
            for role in ("nuclear", "whole_cell"):
                if self.roles.count(role) > 1:
                    raise ValueError(f"more than one {role} channel in roles {list(self.roles)}")
        return self

    def _index(self, role: ChannelRole, fallback: int | None) -> int | None:
        if self.roles:
            return self.roles.index(role) if role in self.roles else None
        return fallback

    @property
    def nuclear_channel(self) -> int | None:
        """C index of the nuclear channel, from ``roles`` or ``nuclear``."""
        return self._index("nuclear", self.nuclear)

    @property
    def whole_cell_channel(self) -> int | None:
        """C index of the whole-cell channel, from ``roles`` or ``whole_cell``."""
        return self._index("whole_cell", self.whole_cell)


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
    acquisition: AcquisitionId
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
        dtype = WIRE_DTYPES.get(self.dtype)
        return math.prod(self.shape) * (dtype if dtype is not None else np.dtype(self.dtype)).itemsize


class PositionInfo(BaseModel):
    """A stage position of the acquisition (index ``p``)."""

    model_config = _WIRE
    name: str | None = Field(default=None, description="Position name (e.g. a well and field).")
    x_um: float | None = Field(default=None, allow_inf_nan=False, description="Stage x, micrometres.")
    y_um: float | None = Field(default=None, allow_inf_nan=False, description="Stage y, micrometres.")
    z_um: float | None = Field(default=None, allow_inf_nan=False, description="Stage z, micrometres.")


class StartMessage(BaseModel):
    """Declares (or re-opens) an acquisition: its plan, as far as the sender knows it."""

    model_config = _WIRE
    type: Literal["start"] = Field(default="start", description="Message type.")
    v: Literal[1] = Field(default=1, description="Protocol version.")
    acquisition: AcquisitionId
    sizes: AcquisitionSizes = Field(default_factory=AcquisitionSizes, description="Expected extents.")
    channels: Channels | None = Field(default=None, description="Channel names and roles.")
    shape: tuple[StrictInt, ...] | None = Field(default=None, description="Expected frame shape, if known.")
    dtype: str | None = Field(default=None, description="Expected frame dtype, if known.")
    settings: dict[str, Any] = Field(default_factory=dict, description="Per-acquisition model settings.")
    pixel_size_um: float | None = Field(default=None, gt=0, allow_inf_nan=False, description="Pixel size.")
    time_interval_s: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="Time between time points, seconds."
    )
    z_step_um: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="Distance between z planes, micrometres."
    )
    positions: tuple[PositionInfo, ...] = Field(
        default=(), description="Stage positions, in index p order (names and stage coordinates)."
    )
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form JSON metadata.")

    @field_validator("shape")
    @classmethod
    def _frame_shape(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        problem = None if value is None else shape_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("dtype")
    @classmethod
    def _pixel_dtype(cls, value: str | None) -> str | None:
        problem = None if value is None else pixel_dtype_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _channel_counts_agree(self) -> StartMessage:
        c = self.sizes.c
        if self.shape is not None and len(self.shape) == 3 and c is not None and c != self.shape[2]:
            raise ValueError(f"shape {list(self.shape)} has {self.shape[2]} channels but sizes.c is {c}")
        return self

    @property
    def pixel_size(self) -> float | None:
        """``pixel_size_um``, or the v1 form ``metadata["pixel_size_um"]`` when that is a number > 0."""
        if self.pixel_size_um is not None:
            return self.pixel_size_um
        value = self.metadata.get("pixel_size_um")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return float(value) if math.isfinite(value) and value > 0 else None


class EndMessage(BaseModel):
    """Closes an acquisition."""

    model_config = _WIRE
    type: Literal["end"] = Field(default="end", description="Message type.")
    v: Literal[1] = Field(default=1, description="Protocol version.")
    acquisition: AcquisitionId
    frames: int | None = Field(default=None, ge=0, description="Frames the sender sent, if it counted.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form JSON metadata.")


class LabelsInfo(BaseModel):
    """Describes the label buffer attached as part 2 of a result message."""

    model_config = _STRICT
    shape: tuple[int, ...] = Field(description="(H, W) of the label image.")
    dtype: str = Field(default="uint32", description="numpy dtype name, little-endian.")


#: One JSON value per cell in a result's ``cells`` columns: NaN (unknown) travels as ``null``.
CellValue = int | float | None


class FrameResult(BaseModel):
    """Per-frame result published on ``r/<acquisition>`` (and ``l/<acquisition>``).

    ``cells`` is the frame's cell table (:class:`cellsam_core.CellTable`) as columns: the same names,
    values and (y, x) array-axis-order convention as the table stored with the labels, NaN as ``null``.
    Row ``i`` of every column is one cell; ``cells["label"][i]`` is its value in the label image.
    :meth:`cell_table` gives it back as a ``CellTable``. ``latency`` is seconds per stage.
    """

    model_config = _WIRE
    type: Literal["result"] = Field(default="result", description="Message type.")
    v: Literal[1] = Field(default=1, description="Protocol version.")
    acquisition: AcquisitionId
    index: Index | ResultIndex | None = Field(
        default=None,
        description="Frame index; z null: the whole z-stack of (t, p) (projection z policies); None if it "
        "could not be read.",
    )
    status: Literal["ok", "failed", "rejected"] = Field(default="ok", description="Outcome.")
    reason: str | None = Field(default=None, description="Reason code when not ok.")
    detail: str | None = Field(default=None, description="Human-readable explanation when not ok.")
    n_cells: int = Field(default=0, ge=0, description="Number of cells found.")
    cells: dict[str, list[CellValue]] = Field(
        default_factory=dict,
        description="Cell table columns (CellTable.column_names), one entry per cell.",
    )
    latency: dict[str, float] = Field(default_factory=dict, description="Seconds per stage.")
    model: str | None = Field(default=None, description="Model name that produced the result.")
    timestamp: float | None = Field(default=None, description="Publication time, seconds since epoch.")
    labels: LabelsInfo | None = Field(default=None, description="Set when part 2 carries labels.")

    @classmethod
    def cell_columns(cls, table: CellTable) -> dict[str, list[CellValue]]:
        """The ``cells`` field for a cell table (the one conversion of a table to the wire)."""
        columns: dict[str, list[CellValue]] = {}
        for name, values in table.columns().items():
            if values.dtype.kind in "ui":
                columns[name] = [int(v) for v in values]
            else:
                columns[name] = [float(v) if math.isfinite(v) else None for v in values]
        return columns

    def cell_table(self) -> CellTable:
        """The ``cells`` columns as a :class:`cellsam_core.CellTable` (empty when there are none).

        The pixel size is not sent; ``area_um2`` is then NaN.
        """
        from cellsam_core.cells import CellTable

        if not self.cells:
            return CellTable.empty()
        names = list(self.cells)
        rows = np.array(
            [[np.nan if v is None else v for v in self.cells[c]] for c in names], dtype=np.float64
        ).T
        return CellTable.from_array(rows.reshape(-1, len(names)), names)

    @property
    def centroids(self) -> list[tuple[float, float]]:
        """``(y, x)`` centroid of each cell, in pixels."""
        ys, xs = self.cells.get("centroid_y", []), self.cells.get("centroid_x", [])
        return [(float(y or 0.0), float(x or 0.0)) for y, x in zip(ys, xs, strict=True)]


class AcquisitionSummary(BaseModel):
    """End-of-acquisition summary published after ``end`` and the last accepted frame."""

    model_config = _WIRE
    type: Literal["summary"] = Field(default="summary", description="Message type.")
    v: Literal[1] = Field(default=1, description="Protocol version.")
    acquisition: AcquisitionId
    frames_declared: int | None = Field(default=None, description="`frames` of the end message.")
    frames_received: int = Field(default=0, ge=0, description="Frames accepted by the listener.")
    frames_ok: int = Field(default=0, ge=0, description="Frames segmented and stored (final status ok).")
    frames_failed: int = Field(
        default=0, ge=0, description="Frames that ended failed (model, replica or write error)."
    )
    frames_rejected: int = Field(default=0, ge=0, description="Frames rejected by validation.")
    frames_dropped: int = Field(default=0, ge=0, description="Frames dropped in live mode.")
    n_cells_total: int = Field(default=0, ge=0, description="Cells over all frames.")
    frames_stored: int | None = Field(
        default=None,
        ge=0,
        description="Frame sets (one per t, p, z) whose labels the store holds: the whole acquisition, "
        "across restarts of the service (the other counts are this run's).",
    )
    started_at: float | None = Field(default=None, description="First message, seconds since epoch.")
    ended_at: float | None = Field(default=None, description="End message, seconds since epoch.")


class TrackResult(BaseModel):
    """A frame's cells linked over time, published on ``t/<acquisition>`` once the frame is linked.

    Linking goes in time order per position (and label plane), so it can wait for earlier frames: this
    message follows the frame's :class:`FrameResult` instead of delaying it. Row ``i`` of ``labels``,
    ``track_ids`` and ``parent_track_ids`` is one cell (``labels[i]`` its value in the frame's label
    image, the ``label`` column of its result); a track id is the cell's value in the tracked label image
    (``labels/tracks`` in the store), the same across time; ``parent_track_ids`` is 0 for a cell whose
    track has no parent. ``events`` are what happened at this frame: ``appeared``, ``divided`` (parent
    ``track_id`` -> ``daughters``), ``lost``, ``merged`` (``into``), ``recovered`` (after ``gap`` frames),
    ``disappeared``.
    """

    model_config = _WIRE
    type: Literal["tracks"] = Field(default="tracks", description="Message type.")
    v: Literal[1] = Field(default=1, description="Protocol version.")
    acquisition: AcquisitionId
    index: Index | ResultIndex = Field(description="The frame (set) linked.")
    labels: list[int] = Field(default_factory=list, description="Cell label values, one per cell.")
    track_ids: list[int] = Field(default_factory=list, description="Track id of each cell.")
    parent_track_ids: list[int] = Field(default_factory=list, description="Parent track of each cell, or 0.")
    events: list[dict[str, Any]] = Field(default_factory=list, description="Tracking events at this frame.")
    timestamp: float | None = Field(default=None, description="Publication time, seconds since epoch.")


class Hello(BaseModel):
    """Heartbeat published on topic ``h``; receiving one proves earlier subscriptions are active."""

    model_config = _WIRE
    type: Literal["hello"] = Field(default="hello", description="Message type.")
    v: Literal[1] = Field(default=1, description="Protocol version.")
    time: float = Field(description="Publication time, seconds since epoch.")


def dump_json(model: BaseModel) -> bytes:
    """Compact JSON of an outgoing message; refuses NaN/Infinity and values without a JSON form.

    Raises
    ------
    ProtocolError
        ``bad_field``: the message cannot be encoded as standard JSON.
    """
    try:
        return json.dumps(model.model_dump(mode="json"), allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise ProtocolError(Reason.BAD_FIELD, f"message is not JSON-serialisable: {exc}") from None
