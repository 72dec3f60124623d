"""Reading images and writing label images (TIFF, PNG, NPY): the file formats the CLI and HTTP route take."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import tifffile

from cellsam_core.errors import ImageFormatError

__all__ = ["decode_image_bytes", "encode_labels_bytes", "read_image", "write_labels"]

_TIFF_SUFFIXES = {".tif", ".tiff"}


def read_image(path: str | Path) -> np.ndarray:
    """Read a TIFF, PNG or NPY file as an array ``(H, W)`` or ``(H, W, C)`` (or ``(C, H, W)``).

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
    return decode_image_bytes(p.read_bytes(), name=p.name)


def decode_image_bytes(data: bytes, *, name: str = "") -> np.ndarray:
    """Decode image bytes; the format is sniffed from the content (TIFF, PNG, NPY magic numbers)."""
    try:
        if data[:6] == b"\x93NUMPY":
            return np.load(io.BytesIO(data), allow_pickle=False)
        if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return np.asarray(tifffile.imread(io.BytesIO(data)))
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            import imageio.v3 as iio

            return np.asarray(iio.imread(io.BytesIO(data), extension=".png"))
    except Exception as exc:  # decoder libraries raise many types; report them as one
        raise ImageFormatError(f"could not decode image {name or '(bytes)'}: {exc}") from exc
    raise ImageFormatError(
        f"unrecognised image format {name or '(bytes)'}: expected TIFF, PNG or NPY content"
    )


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
