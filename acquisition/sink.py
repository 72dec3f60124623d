"""The label sink seam: where segmented frames (labels, optional raw image, cell table) are stored.

`LabelSink` is the protocol; `acquisition.zarr_sink.ZarrLabelSink` (OME-Zarr on disk) and
`acquisition.memory_sink.MemoryLabelSink` (tests, notebooks) implement it and share one conformance
suite (`tests/test_sink_conformance.py`). `prepare_frame` holds the input checks both apply, so a
frame refused by one is refused by the other with the same error.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from acquisition import protocol
from acquisition.cell_table import CellTable
from acquisition.frames import FrameId
from acquisition.sink_errors import InvalidFrameError, InvalidIdentifierError

__all__ = [
    "ACQUISITION_ID_PATTERN",
    "AcquisitionProgress",
    "AcquisitionSpec",
    "FrameId",
    "LabelSink",
    "PreparedFrame",
    "Sizes",
    "StorageOptions",
    "check_acquisition_id",
    "check_frame_index",
    "prepare_frame",
]

#: Acquisition ids (the wire protocol's rule): one safe path component, never hidden, never `..`.
ACQUISITION_ID_PATTERN = re.compile(protocol.ACQUISITION_ID_PATTERN)

#: Label dtypes accepted by `write`; all convert to the stored uint32 without loss.
_LABEL_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32))

Codec = Literal["blosc-zstd", "zstd", "none"]


def check_acquisition_id(acquisition: object) -> str:
    """Return ``acquisition`` if it is a valid id, else raise `InvalidIdentifierError`.

    Valid ids match `ACQUISITION_ID_PATTERN`: 1–128 of ``[A-Za-z0-9._-]``, not starting with a dot,
    so an id can never name a parent directory, a hidden file or a path outside the output folder.
    """
    if not isinstance(acquisition, str) or ACQUISITION_ID_PATTERN.fullmatch(acquisition) is None:
        raise InvalidIdentifierError(
            f"acquisition id {acquisition!r} is not allowed: use 1-128 characters from [A-Za-z0-9._-], "
            "not starting with '.'"
        )
    return acquisition


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

    acquisition: str = Field(
        description="Acquisition id, [A-Za-z0-9._-], 1-128 chars, not starting with '.'."
    )
    sizes: Sizes = Field(default_factory=Sizes, description="Extent along t, p, z, c.")
    frame_shape: tuple[int, int] = Field(description="Frame size (H, W) in pixels.")
    image_dtype: str = Field(default="uint16", description="NumPy dtype name of the raw image.")
    channel_names: tuple[str, ...] | None = Field(
        default=None, description="One name per channel (sizes.c of them); None = 'c0', 'c1', ..."
    )
    pixel_size_um: float | None = Field(
        default=None, gt=0, description="Pixel size in y and x (micrometres)."
    )
    z_step_um: float | None = Field(
        default=None, gt=0, description="Distance between z planes (micrometres)."
    )
    time_interval_s: float | None = Field(default=None, gt=0, description="Time between time points (s).")
    write_image: bool = Field(default=True, description="Store the raw image next to the labels.")
    storage: StorageOptions = Field(default_factory=StorageOptions, description="On-disk layout options.")

    @field_validator("acquisition")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        if ACQUISITION_ID_PATTERN.fullmatch(value) is None:
            raise ValueError(f"{value!r}: use 1-128 characters from [A-Za-z0-9._-], not starting with '.'")
        return value

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
        return self

    @property
    def channels(self) -> tuple[str, ...]:
        """Channel names, defaulted to 'c0', 'c1', ..."""
        return self.channel_names or tuple(f"c{i}" for i in range(self.sizes.c))


@dataclass(frozen=True)
class AcquisitionProgress:
    """What a sink holds for one acquisition.

    Attributes
    ----------
    acquisition : str
        The acquisition id.
    done : tuple of FrameId
        Frames marked done, sorted by (p, t, z).
    t_size : int
        Max done t + 1 (0 when nothing is done): the time points that hold data.
    closed : bool
        True after `LabelSink.close_acquisition` (until reopened).
    summary : mapping or None
        The summary given to `close_acquisition`.
    """

    acquisition: str
    done: tuple[FrameId, ...]
    t_size: int
    closed: bool
    summary: Mapping[str, Any] | None = None

    @property
    def frames_done(self) -> int:
        return len(self.done)


@dataclass(frozen=True)
class PreparedFrame:
    """A frame after `prepare_frame`: checked and in the stored dtypes and shapes.

    Attributes
    ----------
    labels : ndarray, shape (H, W), uint32
    image : ndarray, shape (C, H, W), spec.image_dtype, or None
        None when no image was given or the spec does not store images.
    cells : CellTable
    """

    labels: NDArray[np.uint32]
    image: NDArray[Any] | None
    cells: CellTable


def check_frame_index(spec: AcquisitionSpec, frame_id: FrameId) -> tuple[int, int, int]:
    """Return ``(p, t, z)`` of ``frame_id`` as ints, or raise `InvalidIdentifierError`.

    ``frame_id.acquisition`` must be ``spec.acquisition``; ``p`` in [0, sizes.p), ``z`` in
    [0, sizes.z), ``t`` >= 0 and < sizes.t when t is bounded.
    """
    if frame_id.acquisition != spec.acquisition:
        raise InvalidIdentifierError(f"{frame_id!r} does not belong to acquisition {spec.acquisition!r}")
    try:
        p, t, z = (operator.index(v) for v in (frame_id.p, frame_id.t, frame_id.z))
    except TypeError as err:
        raise InvalidIdentifierError(f"frame index of {frame_id!r} must be integers") from err
    sizes = spec.sizes
    limits = {"p": (p, sizes.p), "t": (t, sizes.t), "z": (z, sizes.z)}
    for name, (value, size) in limits.items():
        if value < 0 or (size is not None and value >= size):
            bound = "[0, inf)" if size is None else f"[0, {size})"
            raise InvalidIdentifierError(f"{frame_id!r}: {name}={value} is outside {bound}")
    return p, t, z


def prepare_frame(
    spec: AcquisitionSpec,
    frame_id: FrameId,
    labels: object,
    image: object = None,
    cells: object = None,
) -> PreparedFrame:
    """Check one frame against its acquisition and convert it to the stored form.

    Parameters
    ----------
    spec : AcquisitionSpec
        The acquisition the frame belongs to (``frame_id.acquisition == spec.acquisition``).
    frame_id : FrameId
        ``p`` in [0, sizes.p), ``z`` in [0, sizes.z), ``t`` >= 0 and < sizes.t when t is bounded.
    labels : ndarray, shape (H, W), uint8/uint16/uint32
        Label image, 0 = background.
    image : ndarray, shape (C, H, W) or (H, W) when C == 1, dtype spec.image_dtype, optional
        Raw image; dropped when ``spec.write_image`` is False.
    cells : CellTable, optional
        Cell table; measured from ``labels`` (scores NaN) when omitted.

    Raises
    ------
    InvalidIdentifierError
        Index out of range or not an integer.
    InvalidFrameError
        Shape or dtype mismatch, wrong types.
    """
    sizes = spec.sizes
    check_frame_index(spec, frame_id)
    height, width = spec.frame_shape
    if not isinstance(labels, np.ndarray):
        raise InvalidFrameError(f"labels must be a numpy array, got {type(labels).__name__}")
    if labels.shape != (height, width):
        raise InvalidFrameError(
            f"labels of {frame_id!r} have shape {labels.shape}, expected (H, W) = {(height, width)}"
        )
    if labels.dtype not in _LABEL_DTYPES:
        raise InvalidFrameError(
            f"labels of {frame_id!r} have dtype {labels.dtype}; give uint8, uint16 or uint32 "
            "(cast signed labels after checking they are >= 0)"
        )
    out_labels = np.ascontiguousarray(labels, dtype=np.uint32)

    out_image: NDArray[Any] | None = None
    if image is not None and spec.write_image:
        if not isinstance(image, np.ndarray):
            raise InvalidFrameError(f"image must be a numpy array, got {type(image).__name__}")
        if image.ndim == 2 and sizes.c == 1:
            image = image[np.newaxis]
        expected = (sizes.c, height, width)
        if image.shape != expected:
            raise InvalidFrameError(
                f"image of {frame_id!r} has shape {image.shape}, expected (C, H, W) = {expected}"
            )
        if image.dtype != np.dtype(spec.image_dtype):
            raise InvalidFrameError(
                f"image of {frame_id!r} has dtype {image.dtype}, expected {spec.image_dtype}"
            )
        out_image = np.ascontiguousarray(image)

    if cells is None:
        table = CellTable.from_labels(out_labels)
    elif isinstance(cells, CellTable):
        table = cells
    else:
        raise InvalidFrameError(f"cells must be a CellTable or None, got {type(cells).__name__}")
    return PreparedFrame(labels=out_labels, image=out_image, cells=table)


@runtime_checkable
class LabelSink(Protocol):
    """Stores segmented frames of acquisitions.

    Contract (checked by `tests/test_sink_conformance.py` for every implementation):

    - `open_acquisition` must precede writes and reads; opening an acquisition that already exists with
      an equal spec reopens it (resume after a crash or restart, or a second writer process), a closed
      one included. A different spec raises `IncompatibleStoreError`.
    - `write` is idempotent per `FrameId`: writing a frame again replaces it, leaving one result.
      After `write` returns the frame is done: `is_done` is True and the read helpers return it.
      A frame is either done with all its parts (labels, cell table, image if given) or not done.
    - Frames of one acquisition may be written in any order, concurrently from threads and (for
      persistent sinks) processes; unbounded acquisitions (``sizes.t is None``) accept any t >= 0.
    - Bad input raises `InvalidFrameError` / `InvalidIdentifierError` and changes nothing.
    - `close_acquisition` records the summary and refuses further writes (`AcquisitionClosedError`)
      until the acquisition is opened again.
    - A frame with zero cells is done with an all-zero label image and an empty table; a missing frame
      is not done and its reads raise `FrameNotWrittenError`.
    """

    def open_acquisition(self, spec: AcquisitionSpec) -> None:
        """Create the acquisition's storage, or reopen it when it exists with an equal spec."""
        ...

    def write(
        self,
        frame_id: FrameId,
        labels: NDArray[Any],
        image: NDArray[Any] | None = None,
        cells: CellTable | None = None,
    ) -> None:
        """Store one frame; see `prepare_frame` for accepted shapes and dtypes. Thread-safe."""
        ...

    def close_acquisition(self, acquisition: str, summary: Mapping[str, Any] | None = None) -> None:
        """Finish an acquisition: record ``summary`` (JSON-serialisable) and refuse further writes."""
        ...

    def is_done(self, frame_id: FrameId) -> bool:
        """True when the frame was written completely."""
        ...

    def read_labels(self, frame_id: FrameId) -> NDArray[np.uint32]:
        """Labels (H, W) uint32 of a done frame."""
        ...

    def read_image(self, frame_id: FrameId) -> NDArray[Any] | None:
        """Raw image (C, H, W) of a done frame, None when it was written without one."""
        ...

    def read_cells(self, frame_id: FrameId) -> CellTable:
        """Cell table of a done frame."""
        ...

    def progress(self, acquisition: str) -> AcquisitionProgress:
        """Done frames, time extent and closed state of an opened acquisition."""
        ...
