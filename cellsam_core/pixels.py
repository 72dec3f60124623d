"""Which pixel dtypes (and frame sizes) cellsam-stream takes: the one rule for every input path.

Frames on the wire (``acquisition.protocol``), images posted to ``POST /segment`` and files read by the
CLI (:mod:`cellsam_core.io`) all go through :func:`pixel_dtype_problem`, so an array one path accepts the
others accept too, and an array one refuses (``bool``, ``float16``, ``complex``, 64-bit integers,
big-endian data) the others refuse with the same explanation.
"""

from __future__ import annotations

import sys
from typing import Any, Literal, get_args

import numpy as np

__all__ = ["MIN_IMAGE_SIDE", "PIXEL_DTYPES", "PixelDtypeName", "pixel_dtype_problem"]

#: Names of the supported pixel dtypes (numpy names; the data is little-endian).
PixelDtypeName = Literal["uint8", "uint16", "uint32", "int8", "int16", "int32", "float32", "float64"]
PIXEL_DTYPES: frozenset[str] = frozenset(get_args(PixelDtypeName))

#: Fewest pixels along y and along x. The model reads the shortest axis of a 3-D image as its channel
#: axis (:func:`cellsam_core.preprocess.format_image_shape`), so with at most 3 channels a side of 4 or
#: more keeps ``(H, W, C)`` unambiguous; a smaller frame would come back with labels of another shape.
MIN_IMAGE_SIDE = 4

_BIG_ENDIAN_HOST = sys.byteorder == "big"


def pixel_dtype_problem(dtype: Any) -> str | None:
    """Why ``dtype`` cannot carry pixels, or None when it can.

    Parameters
    ----------
    dtype : str or np.dtype
        A dtype *name* as a wire header gives it (exactly one of :data:`PIXEL_DTYPES`; spellings such
        as ``"<u2"`` or ``"u2"`` are not names), or the ``np.dtype`` of a decoded array (its kind and
        size must match one of the names, its byte order must be little-endian).

    Returns
    -------
    str or None
        A sentence naming the dtype and the supported ones; None when the dtype is supported.
    """
    supported = ", ".join(sorted(PIXEL_DTYPES))
    if isinstance(dtype, str):
        if dtype in PIXEL_DTYPES:
            return None
        return f"dtype {dtype[:40]!r} is not one of {supported}"
    if not isinstance(dtype, np.dtype):
        return f"dtype {str(dtype)[:40]!r} is not one of {supported}"
    if dtype.name not in PIXEL_DTYPES or dtype.fields is not None or dtype.subdtype is not None:
        return f"dtype {dtype.name} ({dtype.str}) is not one of {supported}; convert the pixels first"
    big = dtype.byteorder == ">" or (dtype.byteorder == "=" and _BIG_ENDIAN_HOST)
    if big and dtype.itemsize > 1:
        little = dtype.newbyteorder("<").str
        return f"dtype {dtype.str} is big-endian; pixels must be little-endian ({little})"
    return None
