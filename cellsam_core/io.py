"""Reading images and writing label images (TIFF, PNG, NPY): the file formats the CLI and HTTP route take."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from cellsam_core.errors import ImageFormatError, ImageTooLargeError
from cellsam_core.pixels import MIN_IMAGE_SIDE, pixel_dtype_problem

__all__ = ["decode_image_bytes", "encode_labels_bytes", "read_image", "write_labels"]

_TIFF_SUFFIXES = {".tif", ".tiff"}


def read_image(path: str | Path, *, max_pixels: int | None = None) -> np.ndarray:
    """Read a TIFF, PNG or NPY file as an array ``(H, W)`` or ``(H, W, C)`` (or ``(C, H, W)``).

    The same checks as :func:`decode_image_bytes` (dtype, dimensions, ``max_pixels``).

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ImageFormatError
        The suffix is not one of ``.tif``, ``.tiff``, ``.png``, ``.npy``, or the file cannot be decoded.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image file not found: {p}")
    return decode_image_bytes(p.read_bytes(), name=p.name, max_pixels=max_pixels)


def decode_image_bytes(data: bytes, *, name: str = "", max_pixels: int | None = None) -> np.ndarray:
    """Decode image bytes; the format is sniffed from the content (TIFF, PNG, NPY magic numbers).

    The image's header is read first: its shape and (TIFF, NPY) dtype are checked before any pixel is
    decoded, so an image too large to accept (a few kilobytes of compressed zeros can declare gigapixels)
    costs nothing to refuse.

    Parameters
    ----------
    data : bytes
        The whole file.
    name : str
        Names the image in error messages.
    max_pixels : int, optional
        Most pixels of one plane (``H * W``; for 3-D images the shortest axis is the channel axis, as
        :func:`cellsam_core.preprocess.format_image_shape` reads it). None: no limit.

    Returns
    -------
    np.ndarray
        ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` with ``C`` at most 16 and ``H``, ``W`` at least
        :data:`~cellsam_core.pixels.MIN_IMAGE_SIDE`, of a dtype
        :func:`cellsam_core.pixels.pixel_dtype_problem` accepts (the wire protocol's dtypes).

    Raises
    ------
    ImageTooLargeError
        More pixels than ``max_pixels``.
    ImageFormatError
        Unknown format, undecodable content, an unsupported dtype (``bool``, ``float16``, 64-bit
        integers, complex, big-endian NPY), or not 2-D or 3-D with at most 16 channels and at least
        4 pixels along y and x.
    """
    label = name or "(bytes)"
    try:
        if data[:6] == b"\x93NUMPY":
            shape, dtype = _npy_header(data)
            _check_header(shape, dtype, label, max_pixels)
            image = np.load(io.BytesIO(data), allow_pickle=False)
        elif data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                series = tif.series[0]
                _check_header(tuple(series.shape), series.dtype, label, max_pixels)
                image = np.asarray(series.asarray())
        elif data[:8] == b"\x89PNG\r\n\x1a\n":
            import imageio.v3 as iio

            _check_header(_png_shape(data), None, label, max_pixels)
            image = np.asarray(iio.imread(io.BytesIO(data), extension=".png"))
        else:
            raise ImageFormatError(f"unrecognised image format {label}: expected TIFF, PNG or NPY content")
    except ImageFormatError:
        raise
    except Exception as exc:  # decoder libraries raise many types; report them as one
        raise ImageFormatError(f"could not decode image {label}: {exc}") from exc
    _check_header(image.shape, image.dtype, label, max_pixels)  # what was decoded, whatever the header said
    return image


#: Most channels of a 3-D image (the wire protocol's limit on ``C``).
_MAX_CHANNELS = 16


def _check_header(
    shape: tuple[int, ...], dtype: np.dtype[Any] | None, label: str, max_pixels: int | None
) -> None:
    """Refuse an image by its shape and dtype, before (and after) decoding its pixels."""
    if dtype is not None:
        problem = pixel_dtype_problem(np.dtype(dtype))
        if problem is not None:
            raise ImageFormatError(f"image {label}: {problem}")
    if len(shape) not in (2, 3) or min(shape, default=0) < 1:
        raise ImageFormatError(
            f"image {label} has shape {tuple(shape)}; only (H, W), (H, W, C) or (C, H, W) images are taken"
        )
    channels = min(shape) if len(shape) == 3 else 1
    if channels > _MAX_CHANNELS:
        raise ImageFormatError(
            f"image {label} has shape {tuple(shape)}: {channels} channels on its shortest axis; "
            f"at most {_MAX_CHANNELS} are taken"
        )
    sides = list(shape)
    if len(shape) == 3:
        sides.pop(int(np.argmin(shape)))  # the channel axis, as the model reads it
    if min(sides) < MIN_IMAGE_SIDE:
        raise ImageFormatError(
            f"image {label} has shape {tuple(shape)}; images need at least {MIN_IMAGE_SIDE} pixels along "
            "y and x"
        )
    pixels = math.prod(shape) // channels
    if max_pixels is not None and pixels > max_pixels:
        raise ImageTooLargeError(
            f"image {label} has {pixels} pixels per plane (shape {tuple(shape)}); the limit is "
            f"{max_pixels}: bin or crop it",
            pixels=pixels,
            limit=max_pixels,
        )


def _npy_header(data: bytes) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and dtype from an NPY file's header (no pixel is read)."""
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return tuple(int(n) for n in shape), dtype


def _png_shape(data: bytes) -> tuple[int, int]:
    """``(H, W)`` from a PNG's IHDR chunk, which the format puts first."""
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ImageFormatError("PNG without an IHDR chunk first")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return height, width


def encode_labels_bytes(labels: np.ndarray, fmt: str) -> bytes:
    """Encode a label image as ``"tiff"`` (zlib-compressed) or ``"npy"`` bytes."""
    buf = io.BytesIO()
    if fmt == "npy":
        np.save(buf, labels, allow_pickle=False)
    elif fmt == "tiff":
        tifffile.imwrite(buf, labels, compression="zlib", photometric="minisblack")
    else:
        raise ValueError(f"unknown label format {fmt!r}: use 'tiff' or 'npy'")
    return buf.getvalue()


def write_labels(path: str | Path, labels: np.ndarray) -> Path:
    """Write a label image to ``.tif``/``.tiff`` (zlib-compressed) or ``.npy``; returns the path."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in _TIFF_SUFFIXES:
        fmt = "tiff"
    elif suffix == ".npy":
        fmt = "npy"
    else:
        raise ValueError(f"cannot write labels to {p}: use a .tif, .tiff or .npy file name")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(encode_labels_bytes(labels, fmt))
    return p
