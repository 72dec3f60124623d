"""What a label sink is told about an acquisition: its extent, frame layout, physical sizes, storage.

:class:`AcquisitionSpec` is given once to ``LabelSink.open_acquisition``; :func:`check_frame_index` is the
one check that a frame index lies inside it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from acquisition.frames import FrameId
from acquisition.ids import AcquisitionId
from acquisition.protocol import PositionInfo
from acquisition.sink_errors import InvalidIdentifierError
from cellsam_core.stacks import ZPolicy

__all__ = [
    "AcquisitionSpec",
    "Codec",
    "Sizes",
    "StorageOptions",
    "StoredAcquisition",
    "check_frame_index",
    "spec_differences",
    "spec_extends",
]

Codec = Literal["blosc-zstd", "zstd", "none"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Sizes(_Frozen):
    """Extent of an acquisition along each index."""

    t: int | None = Field(
        default=None,
        ge=1,
        description="Number of time points; None = unknown, the store grows as frames come.",
    )
    p: int = Field(default=1, ge=1, description="Number of stage positions (one OME-Zarr series each).")
    z: int = Field(default=1, ge=1, description="Number of z planes per time point.")
    c: int = Field(default=1, ge=1, description="Number of channels of the raw image.")


class StorageOptions(_Frozen):
    """How the Zarr sink lays arrays out on disk (the in-memory sink ignores these)."""

    chunk_yx: tuple[int, int] | None = Field(
        default=None, description="Chunk size (y, x) within a frame; None = one chunk per frame plane."
    )
    shard_t: int | None = Field(
        default=None,
        ge=1,
        description="Frames per shard along t (Zarr v3 sharding); None = no sharding, one file per chunk.",
    )
    label_codec: Codec = Field(default="blosc-zstd", description="Compressor of the label arrays.")
    image_codec: Codec = Field(default="blosc-zstd", description="Compressor of the raw image arrays.")
    compression_level: int = Field(default=3, ge=0, le=9, description="Compression level of both codecs.")
    levels: int = Field(
        default=1, ge=1, le=8, description="Multiscale levels; level k is downsampled 2**k in y and x."
    )
    t_growth: int = Field(
        default=64, ge=1, description="Time points added at once when an unbounded acquisition grows."
    )

    @field_validator("chunk_yx")
    @classmethod
    def _positive_chunks(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and min(value) < 1:
            raise ValueError(f"chunk_yx must be positive, got {value}")
        return value


class AcquisitionSpec(_Frozen):
    """Everything a sink needs to lay out one acquisition; given once to `LabelSink.open_acquisition`."""

    acquisition: AcquisitionId
    sizes: Sizes = Field(default_factory=Sizes, description="Extent along t, p, z, c.")
    frame_shape: tuple[int, int] = Field(description="Frame size (H, W) in pixels.")
    image_dtype: str = Field(default="uint16", description="NumPy dtype name of the raw image.")
    channel_names: tuple[str, ...] | None = Field(
        default=None, description="One name per channel (sizes.c of them); None = 'c0', 'c1', ..."
    )
    channel_colors: tuple[Annotated[str, Field(pattern=r"^#?[0-9A-Fa-f]{6}$")] | None, ...] | None = Field(
        default=None,
        description="Display colour per channel as RRGGBB hex, '#' optional (sizes.c of them; None "
        "entries and None = a default palette).",
    )
    positions: tuple[PositionInfo, ...] = Field(
        default=(), description="Name and stage coordinates (µm) of each position, in index p order."
    )
    pixel_size_um: float | None = Field(
        default=None, gt=0, description="Pixel size in y and x (micrometres)."
    )
    z_step_um: float | None = Field(
        default=None, gt=0, description="Distance between z planes (micrometres)."
    )
    time_interval_s: float | None = Field(default=None, gt=0, description="Time between time points (s).")
    write_image: bool = Field(default=True, description="Store the raw image next to the labels.")
    z_policy: ZPolicy = Field(
        default_factory=ZPolicy,
        description="What of each z-stack was segmented: every plane (labels per (t, p, z)) or one "
        "projection (max or a chosen plane; labels once per (t, p), one label plane).",
    )
    storage: StorageOptions = Field(default_factory=StorageOptions, description="On-disk layout options.")
    declaration: dict[str, Any] | None = Field(
        default=None,
        description="The acquisition's `start` message as JSON (None: it was never declared). Kept in the "
        "store so that a restarted service resumes the acquisition, channel roles included, without a new "
        "`start`.",
    )

    @field_validator("frame_shape")
    @classmethod
    def _positive_shape(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 1:
            raise ValueError(f"frame_shape must be positive (H, W), got {value}")
        return value

    @field_validator("image_dtype")
    @classmethod
    def _numeric_dtype(cls, value: str) -> str:
        try:
            dtype = np.dtype(value)
        except TypeError as err:
            raise ValueError(f"image_dtype {value!r} is not a NumPy dtype") from err
        if dtype.kind not in "uif" or dtype.byteorder == ">":
            raise ValueError(f"image_dtype must be a native integer or float dtype, got {value!r}")
        return dtype.name

    @model_validator(mode="after")
    def _channels_match(self) -> AcquisitionSpec:
        if self.channel_names is not None and len(self.channel_names) != self.sizes.c:
            raise ValueError(f"{len(self.channel_names)} channel_names given for sizes.c={self.sizes.c}")
        if self.channel_colors is not None and len(self.channel_colors) != self.sizes.c:
            raise ValueError(f"{len(self.channel_colors)} channel_colors given for sizes.c={self.sizes.c}")
        if len(self.positions) > self.sizes.p:
            raise ValueError(f"{len(self.positions)} positions given for sizes.p={self.sizes.p}")
        plane = self.z_policy.plane
        if plane is not None and plane >= self.sizes.z:
            raise ValueError(f"z_policy plane {plane} is outside the {self.sizes.z} z plane(s) of sizes.z")
        return self

    @property
    def channels(self) -> tuple[str, ...]:
        """Channel names, defaulted to 'c0', 'c1', ..."""
        return self.channel_names or tuple(f"c{i}" for i in range(self.sizes.c))

    @property
    def label_z(self) -> int:
        """Label planes per (t, p): ``sizes.z`` when every plane is segmented, 1 under a projection.

        A stored frame is one label plane: ``FrameId.z`` is in [0, label_z), and under a projection a
        frame (``z = 0``) holds the raw pixels of all ``sizes.z`` planes.
        """
        return 1 if self.z_policy.projects else self.sizes.z


@dataclass(frozen=True)
class StoredAcquisition:
    """What a label sink holds of an acquisition before it is opened (``LabelSink.stored``): the spec in
    force, and whether the acquisition was closed (it ended)."""

    spec: AcquisitionSpec
    closed: bool


def check_frame_index(spec: AcquisitionSpec, frame_id: FrameId) -> tuple[int, int, int]:
    """Return ``(p, t, z)`` of ``frame_id`` as ints, or raise `InvalidIdentifierError` (the one index check).

    ``frame_id.acquisition`` must be ``spec.acquisition``; ``p`` in [0, sizes.p), ``z`` in
    [0, spec.label_z) (sizes.z, or 1 under a projection z policy), ``t`` >= 0 and < sizes.t when t is
    bounded.
    """
    if frame_id.acquisition != spec.acquisition:
        raise InvalidIdentifierError(f"{frame_id!r} does not belong to acquisition {spec.acquisition!r}")
    try:
        p, t, z = (operator.index(v) for v in (frame_id.p, frame_id.t, frame_id.z))
    except TypeError as err:
        raise InvalidIdentifierError(f"frame index of {frame_id!r} must be integers") from err
    sizes = spec.sizes
    limits = {"p": (p, sizes.p), "t": (t, sizes.t), "z": (z, spec.label_z)}
    for name, (value, size) in limits.items():
        if value < 0 or (size is not None and value >= size):
            bound = "[0, inf)" if size is None else f"[0, {size})"
            projected = name == "z" and spec.z_policy.projects
            why = " (one label plane per (t, p): a projection z policy)" if projected else ""
            raise InvalidIdentifierError(f"{frame_id!r}: {name}={value} is outside {bound}{why}")
    return p, t, z


def spec_differences(stored: AcquisitionSpec, new: AcquisitionSpec) -> list[str]:
    """What differs between two specs of one acquisition, as ``"field: stored -> new"`` lines.

    ``sizes`` is compared per axis (``sizes.t: 5 -> 10``); ``declaration`` is not compared (it follows
    from the rest, and a longer declared time-lapse changes it).
    """
    out: list[str] = []
    for axis in ("t", "p", "z", "c"):
        before, after = getattr(stored.sizes, axis), getattr(new.sizes, axis)
        if before != after:
            out.append(f"sizes.{axis}: {before} -> {after}")
    for name in AcquisitionSpec.model_fields:
        if name not in ("sizes", "declaration") and getattr(stored, name) != getattr(new, name):
            out.append(f"{name}: {getattr(stored, name)!r} -> {getattr(new, name)!r}")
    return out


def spec_extends(stored: AcquisitionSpec, new: AcquisitionSpec) -> bool:
    """True when ``new`` is ``stored`` with more time points (and possibly a new declaration).

    The one change a stored acquisition accepts: a bounded time-lapse declared again with a larger (or
    an open-ended) ``sizes.t``. Everything else that lays out the store must be equal.
    """
    if stored.sizes.t is None:
        grows = new.sizes.t is None
    else:
        grows = new.sizes.t is None or new.sizes.t >= stored.sizes.t
    same_sizes = stored.sizes.model_copy(update={"t": new.sizes.t}) == new.sizes
    rest = {k for k in AcquisitionSpec.model_fields if k not in ("sizes", "declaration")}
    return grows and same_sizes and all(getattr(stored, k) == getattr(new, k) for k in rest)
