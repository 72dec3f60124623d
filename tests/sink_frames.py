"""Deterministic synthetic frames for the label sink tests, and writer-process entry points.

Every frame's content is a pure function of its index, so a reader (or a test after a crash) can
check any frame without having kept what was written. Module-level functions so `spawn`ed
processes can import them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from skimage.draw import disk

from acquisition.frames import FrameId
from acquisition.spec import AcquisitionSpec
from acquisition.zarr_sink import ZarrLabelSink
from cellsam_core.cells import CellTable

SHAPE = (64, 64)


def frame_labels(p: int, t: int, z: int, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """uint32 (H, W) labels with 0-4 disks; every 5th time point has zero cells."""
    rng = np.random.default_rng([p, t, z])
    labels = np.zeros(shape, np.uint32)
    n_cells = 0 if t % 5 == 4 else int(rng.integers(1, 5))
    for label in range(1, n_cells + 1):
        radius = int(rng.integers(3, 8))
        centre = rng.integers(radius, np.array(shape) - radius)
        labels[disk(tuple(centre), radius, shape=shape)] = label
    return labels


def frame_image(p: int, t: int, z: int, channels: int, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """uint16 (C, H, W) image: noise plus bright cells."""
    rng = np.random.default_rng([p, t, z, 7])
    image = rng.integers(0, 200, (channels, *shape)).astype(np.uint16)
    image[:, frame_labels(p, t, z, shape) > 0] += 1000
    return image


def varied_image(p: int, t: int, z: int, channels: int, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """uint16 (C, H, W): `frame_image` with a gain per (p, t) and an offset per channel.

    Frames of one acquisition then differ in their intensity range, so a display window must combine
    them; channel c is brighter by 300 * c. The maximum stays far below the dtype's (~6,600).
    """
    gain = 1 + (p + 2 * t + z) % 5
    offsets = 300 * np.arange(channels, dtype=np.uint16)[:, None, None]
    return (frame_image(p, t, z, channels, shape) * gain + offsets).astype(np.uint16)


ImageFn = Callable[[int, int, int, int, tuple[int, int]], np.ndarray]


def frame_cells(
    p: int, t: int, z: int, shape: tuple[int, int] = SHAPE, pixel_size_um: float | None = None
) -> CellTable:
    """The cell table of `frame_labels`, with prompt boxes and scores derived from the index.

    Each cell's prompt box is its bounding box moved by fractions of a pixel, ``(y0, x0, y1, x1)``; the
    last cell of a frame with several has none (NaN), like a cell merged from tiles.
    """
    labels = frame_labels(p, t, z, shape)
    bbox = CellTable.from_labels(labels).bbox.astype(np.float64)
    n = len(bbox)
    prompt_boxes = bbox + np.array([-0.5, -1.25, 0.75, 1.5]) * (1 + z)
    if n > 1:
        prompt_boxes[-1] = np.nan
    scores = (np.arange(n) + 1) / (n + 1) * (0.5 + (t % 3) / 6)
    return CellTable.from_labels(
        labels, prompt_boxes=prompt_boxes, scores=scores, pixel_size_um=pixel_size_um
    )


def write_frame(
    sink: ZarrLabelSink, spec: AcquisitionSpec, p: int, t: int, z: int, image_fn: ImageFn = frame_image
) -> None:
    sink.write(
        FrameId(spec.acquisition, p, t, z),
        frame_labels(p, t, z, spec.frame_shape),
        image_fn(p, t, z, spec.sizes.c, spec.frame_shape),
        frame_cells(p, t, z, spec.frame_shape, spec.pixel_size_um),
    )


def write_frames_worker(
    output: str,
    spec_json: str,
    frames: list[tuple[int, int, int]],
    paused: Any = None,
    resume: Any = None,
    image_fn: ImageFn = frame_image,
) -> None:
    """Process entry point: open (or join) the acquisition and write the given (p, t, z) frames.

    With ``paused``/``resume`` (multiprocessing Events), set ``paused`` after the first half of the
    frames and wait for ``resume`` before writing the rest, so a test can inspect the store
    mid-acquisition while every writer is alive with its arrays open. ``image_fn`` makes each
    frame's image (a module-level function, so it reaches a spawned process).
    """
    spec = AcquisitionSpec.model_validate_json(spec_json)
    sink = ZarrLabelSink(output)
    sink.open_acquisition(spec)
    half = len(frames) // 2
    for i, (p, t, z) in enumerate(frames):
        if i == half and paused is not None and resume is not None:
            paused.set()
            resume.wait()
        write_frame(sink, spec, p, t, z, image_fn)


def write_forever_worker(output: str, spec_json: str) -> None:
    """Process entry point: write t = 0, 1, 2, ... for every (p, z) until killed."""
    spec = AcquisitionSpec.model_validate_json(spec_json)
    sink = ZarrLabelSink(output)
    sink.open_acquisition(spec)
    t = 0
    while True:
        for p in range(spec.sizes.p):
            for z in range(spec.sizes.z):
                write_frame(sink, spec, p, t, z)
        t += 1
