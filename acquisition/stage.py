"""Where a pixel of a frame is on the stage: cell centroids (y, x) in pixels → stage (x, y) in µm, and back.

Getting this wrong points the microscope at the wrong cell, so it is one function, :func:`pixel_to_stage`,
with its inverse :func:`stage_to_pixel`, used by every rule and actuator.

Conventions
-----------
- Pixels are in **array axis order** ``(y, x)`` = (row, column), pixel ``i`` at coordinate ``i``, as the cell
  table gives centroids (:mod:`cellsam_core.cells`).
- The stage position of a frame (Micro-Manager's XY stage position, ``MDAEvent.x_pos/y_pos``) is where the
  **centre of the image** is: pixel ``((H - 1) / 2, (W - 1) / 2)``. (A camera ROI off the optical axis
  breaks that assumption: use a centred ROI or shift ``stage_xy`` accordingly.)
- Stage coordinates are named ``x`` and ``y`` in micrometres, never put in an unnamed pair: functions
  return :class:`StageXY` so the two orders cannot be mixed up.

How the image lies on the stage is :class:`ImageOrientation`: by default image columns run along stage +x
and image rows along stage +y; ``transpose`` swaps the two image axes (camera turned by 90°), then
``flip_x`` / ``flip_y`` reverse the stage direction of each. Or give Micro-Manager's calibrated pixel-size
affine (``core.getPixelSizeAffine()``), which then replaces the flags and the pixel size. Check once on a
new system: image a bead, move the stage to ``pixel_to_stage`` of a point off centre, and the bead must
come to the centre.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray
from pydantic import BaseModel, ConfigDict, Field, field_validator

from acquisition.feedback_errors import StageMappingError

__all__ = ["AffineTuple", "ImageOrientation", "StageXY", "pixel_to_stage", "stage_to_pixel"]

#: Micro-Manager's pixel-size affine ``(a, b, tx, c, d, ty)``: ``stage_x = a·col + b·row + tx``,
#: ``stage_y = c·col + d·row + ty``, in µm (pymmcore-plus: ``ImageInfo.pixel_size_affine``).
AffineTuple = tuple[float, float, float, float, float, float]


class StageXY(NamedTuple):
    """A stage position (or positions) in micrometres; ``x`` and ``y`` are floats or arrays of one shape."""

    x: Any
    y: Any


class ImageOrientation(BaseModel):
    """How camera pixels map onto the stage axes (see the module docstring for the conventions)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    transpose: bool = Field(
        default=False,
        description="Image rows run along stage x and image columns along stage y (applied before flips).",
    )
    flip_x: bool = Field(default=False, description="The image axis that runs along stage x points to -x.")
    flip_y: bool = Field(default=False, description="The image axis that runs along stage y points to -y.")
    affine: AffineTuple | None = Field(
        default=None,
        description=(
            "Micro-Manager's calibrated pixel-size affine (a, b, tx, c, d, ty), camera pixels (column, row) "
            "to stage µm; replaces the flags and the pixel size when given (tx, ty are ignored: offsets are "
            "taken from the image centre). Micro-Manager reports the identity when none is calibrated: "
            "use the flags then."
        ),
    )

    @field_validator("affine")
    @classmethod
    def _invertible(cls, value: AffineTuple | None) -> AffineTuple | None:
        if value is not None:
            a, b, _, c, d, _ = value
            if not all(math.isfinite(v) for v in value) or abs(a * d - b * c) < 1e-12:
                raise ValueError(f"affine {value} is not an invertible, finite pixel-to-stage transform")
        return value

    def matrix(self, pixel_size_um: float | None) -> NDArray[np.float64]:
        """The 2×2 matrix ``M`` with ``(dx, dy) = M @ (dcol, drow)``: µm of stage per pixel of image.

        Raises
        ------
        StageMappingError
            No affine is set and ``pixel_size_um`` is unknown or not positive.
        """
        if self.affine is not None:
            a, b, _, c, d, _ = self.affine
            return np.array([[a, b], [c, d]], dtype=np.float64)
        if pixel_size_um is None or not pixel_size_um > 0 or not math.isfinite(pixel_size_um):
            raise StageMappingError(
                f"pixel size {pixel_size_um!r} µm is unknown or not positive: configure the pixel size in "
                "Micro-Manager (a pixel size config) or pass pixel_size_um to the feedback loop"
            )
        m = np.array([[0.0, 1.0], [1.0, 0.0]]) if self.transpose else np.eye(2)
        m[0] *= -1.0 if self.flip_x else 1.0
        m[1] *= -1.0 if self.flip_y else 1.0
        return m * float(pixel_size_um)


def _centre(frame_shape: tuple[int, ...]) -> tuple[float, float]:
    if len(frame_shape) < 2 or min(frame_shape[:2]) < 1:
        raise StageMappingError(f"frame shape must be (H, W) with H, W >= 1, got {frame_shape!r}")
    return (frame_shape[0] - 1) / 2.0, (frame_shape[1] - 1) / 2.0


def _stage(stage_xy: tuple[float | None, float | None] | StageXY) -> tuple[float, float]:
    x, y = stage_xy
    if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
        raise StageMappingError(
            f"the frame's stage position {tuple(stage_xy)!r} is unknown: the microscope needs an XY stage "
            "whose position is recorded with each frame (pymmcore-plus frame metadata 'position')"
        )
    return float(x), float(y)


def pixel_to_stage(
    yx: ArrayLike,
    *,
    frame_shape: tuple[int, ...],
    stage_xy: tuple[float | None, float | None] | StageXY,
    pixel_size_um: float | None,
    orientation: ImageOrientation | None = None,
) -> StageXY:
    """Stage position (µm) of pixel position(s) ``yx`` of a frame taken at ``stage_xy``.

    Parameters
    ----------
    yx : array_like, float (2,) or (N, 2)
        Pixel position(s) in array axis order ``(y, x)`` (e.g. a cell's ``centroid``).
    frame_shape : (H, W)
        Shape of the frame the pixels belong to.
    stage_xy : (x, y)
        Stage position of that frame in µm: where its image centre is.
    pixel_size_um : float or None
        Size of one pixel on the sample; ignored when ``orientation.affine`` is set.
    orientation : ImageOrientation, optional
        How the image lies on the stage; default: columns along +x, rows along +y.

    Returns
    -------
    StageXY
        ``x`` and ``y`` in µm: floats for one position, float64 arrays (N,) for N.

    Raises
    ------
    StageMappingError
        Unknown pixel size or stage position, bad frame shape, or ``yx`` not of shape (2,) or (N, 2).
    """
    points = np.asarray(yx, dtype=np.float64)
    if points.shape[-1:] != (2,) or points.ndim > 2:
        raise StageMappingError(f"yx must have shape (2,) or (N, 2) in (y, x) order, got {points.shape}")
    cy, cx = _centre(frame_shape)
    x0, y0 = _stage(stage_xy)
    m = (orientation or ImageOrientation()).matrix(pixel_size_um)
    drow, dcol = points[..., 0] - cy, points[..., 1] - cx
    x = x0 + m[0, 0] * dcol + m[0, 1] * drow
    y = y0 + m[1, 0] * dcol + m[1, 1] * drow
    if points.ndim == 1:
        return StageXY(float(x), float(y))
    return StageXY(x, y)


def stage_to_pixel(
    xy: StageXY | tuple[ArrayLike, ArrayLike],
    *,
    frame_shape: tuple[int, ...],
    stage_xy: tuple[float | None, float | None] | StageXY,
    pixel_size_um: float | None,
    orientation: ImageOrientation | None = None,
) -> NDArray[np.float64]:
    """Pixel position(s) ``(y, x)`` in a frame taken at ``stage_xy`` of stage position(s) ``xy``.

    The inverse of :func:`pixel_to_stage` (same parameters). Returns float64 ``(2,)`` for one position,
    ``(N, 2)`` for arrays; positions outside the frame are returned as they are (not clipped).
    """
    x, y = (np.asarray(v, dtype=np.float64) for v in xy)
    cy, cx = _centre(frame_shape)
    x0, y0 = _stage(stage_xy)
    inv = np.linalg.inv((orientation or ImageOrientation()).matrix(pixel_size_um))
    dx, dy = x - x0, y - y0
    col = cx + inv[0, 0] * dx + inv[0, 1] * dy
    row = cy + inv[1, 0] * dx + inv[1, 1] * dy
    return np.stack([row, col], axis=-1)
