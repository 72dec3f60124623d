"""Image files in (TIFF, PNG, NPY): what ``POST /segment`` and the CLI take, refused before decoding.

The dtype rule is the wire protocol's (one function, ``cellsam_core.pixels.pixel_dtype_problem``): checked
here against ``acquisition.wire`` for every dtype. The pixel limit is read from each format's header, so a
small compressed file that declares a huge image is refused without decoding it.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from acquisition.errors import ProtocolError
from acquisition.wire import decode_message
from cellsam_core.errors import ImageFormatError, ImageTooLargeError
from cellsam_core.io import decode_image_bytes, encode_labels_bytes
from cellsam_core.pixels import PIXEL_DTYPES, pixel_dtype_problem


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=array.dtype.hasobject)  # a pickled file is refused when read
    return buf.getvalue()


def tiff(array: np.ndarray, **options: Any) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array, **options)
    return buf.getvalue()


def png(array: np.ndarray) -> bytes:
    return bytes(iio.imwrite("<bytes>", array, extension=".png"))


def png_declaring(height: int, width: int) -> bytes:
    """A PNG whose header declares ``height x width`` 8-bit grey pixels and whose data is one short row."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 2))
        + chunk(b"IEND", b"")
    )


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    expected: str  # "ok", "too_large" or "format" (refused, 415)
    max_pixels: int | None = 64 * 64


IMAGE = np.arange(48 * 40, dtype=np.uint16).reshape(48, 40)

CASES = [
    Case("npy_uint16", npy(IMAGE), "ok"),
    Case("npy_float32_three_channels", npy(np.zeros((3, 48, 40), np.float32)), "ok"),
    Case("npy_at_the_limit", npy(np.zeros((64, 64), np.uint8)), "ok"),
    Case("npy_over_the_limit", npy(np.zeros((64, 65), np.uint8)), "too_large"),
    Case("npy_over_the_limit_with_channels", npy(np.zeros((65, 64, 3), np.uint8)), "too_large"),
    Case("npy_no_limit", npy(np.zeros((65, 64), np.uint8)), "ok", max_pixels=None),
    Case("npy_bool", npy(np.zeros((8, 8), bool)), "format"),
    Case("npy_big_endian", npy(IMAGE.astype(">u2")), "format"),
    Case("npy_float16", npy(np.zeros((8, 8), np.float16)), "format"),
    Case("npy_int64", npy(np.zeros((8, 8), np.int64)), "format"),
    Case("npy_complex", npy(np.zeros((8, 8), np.complex64)), "format"),
    Case("npy_structured", npy(np.zeros((8, 8), [("a", "<u2")])), "format"),
    Case("npy_one_dimensional", npy(np.zeros(64, np.uint8)), "format"),
    Case("npy_four_dimensional", npy(np.zeros((2, 2, 8, 8), np.uint8)), "format"),
    Case("npy_seventeen_planes", npy(np.zeros((17, 20, 20), np.uint8)), "format"),
    Case("npy_empty", npy(np.zeros((0, 8), np.uint8)), "format"),
    Case("npy_three_rows", npy(np.zeros((3, 100), np.uint8)), "format"),
    Case("npy_two_columns_three_channels", npy(np.zeros((100, 2, 3), np.uint8)), "format"),
    Case("npy_smallest", npy(np.zeros((4, 4), np.uint8)), "ok"),
    Case("npy_truncated", npy(IMAGE)[:-10], "format"),
    Case("tiff_uint16", tiff(IMAGE), "ok"),
    Case("tiff_big_endian_file", tiff(IMAGE, byteorder=">"), "ok"),  # decoded to native order
    Case(
        "tiff_zlib_zeros_4096_squared",
        tiff(np.zeros((4096, 4096), np.uint8), compression="zlib"),
        "too_large",
    ),
    Case("tiff_int64", tiff(np.zeros((8, 8), np.int64)), "format"),
    Case("tiff_float16", tiff(np.zeros((8, 8), np.float16)), "format"),
    Case("tiff_page_stack", tiff(np.zeros((20, 30, 40), np.uint8)), "format"),
    Case("png_uint8", png(np.zeros((48, 40), np.uint8)), "ok"),
    Case("png_uint16", png(np.zeros((48, 40), np.uint16)), "ok"),
    Case("png_rgb", png(np.zeros((48, 40, 3), np.uint8)), "ok"),
    Case("png_declaring_a_gigapixel", png_declaring(40_000, 40_000), "too_large"),
    Case("png_one_bit", png(np.zeros((8, 8), bool)), "format"),
    Case("not_an_image", b"definitely not an image", "format"),
    Case("empty", b"", "format"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decode(case: Case) -> None:
    if case.expected == "ok":
        image = decode_image_bytes(case.data, max_pixels=case.max_pixels)
        assert pixel_dtype_problem(image.dtype) is None and image.ndim in (2, 3)
        return
    error = ImageTooLargeError if case.expected == "too_large" else ImageFormatError
    with pytest.raises(error) as info:
        decode_image_bytes(case.data, name="x", max_pixels=case.max_pixels)
    if case.expected == "format":
        assert not isinstance(info.value, ImageTooLargeError)
    else:
        assert info.value.limit == case.max_pixels and info.value.pixels > case.max_pixels


def test_pixels_come_back_unchanged() -> None:
    for data in (npy(IMAGE), tiff(IMAGE), png(IMAGE)):
        np.testing.assert_array_equal(decode_image_bytes(data, max_pixels=IMAGE.size), IMAGE)
    labels = np.arange(20, dtype=np.uint32).reshape(4, 5)
    for fmt in ("tiff", "npy"):
        np.testing.assert_array_equal(decode_image_bytes(encode_labels_bytes(labels, fmt)), labels)


DTYPES = [*sorted(PIXEL_DTYPES), "bool", "float16", "int64", "uint64", "complex64", "complex128", "object"]


@pytest.mark.parametrize("name", DTYPES)
def test_the_wire_and_image_files_take_the_same_dtypes(name: str) -> None:
    header = {"type": "frame", "v": 1, "acquisition": "a", "index": {}, "shape": [4, 4], "dtype": name}
    itemsize = np.dtype(name).itemsize
    try:
        decode_message([json.dumps(header).encode(), bytes(16 * itemsize)])
        wire = True
    except ProtocolError as exc:
        assert exc.reason == "bad_dtype"
        wire = False
    try:
        decode_image_bytes(npy(np.zeros((4, 4), name)))
        file = True
    except ImageFormatError:
        file = False
    assert wire == file == (name in PIXEL_DTYPES)
