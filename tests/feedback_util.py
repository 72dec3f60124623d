"""Helpers for the feedback tests (not a test module): a stand-in for the service that "segments" frames of
the virtual microscope by the slide's ground truth and publishes results like the service does."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from skimage.segmentation import relabel_sequential

from acquisition.protocol import AcquisitionSummary, FrameResult, Index
from acquisition.publisher import ResultPublisher
from acquisition.virtual_microscope import VirtualSlide
from cellsam_core.cells import CellTable


class GroundTruthService:
    """Plays the service behind a ``PymmcorePlusForwarder``'s interface: each forwarded frame's labels are
    the slide's ground truth under the camera, published ``delay_s`` later on ``publisher``."""

    def __init__(
        self,
        slide: VirtualSlide,
        publisher: ResultPublisher,
        acquisition: str,
        *,
        sensor_shape: tuple[int, int],
        col_dir: tuple[float, float] = (1.0, 0.0),
        row_dir: tuple[float, float] = (0.0, 1.0),
        delay_s: float = 0.05,
    ) -> None:
        assert slide.labels is not None
        self.truth = VirtualSlide(slide.labels, None, slide.pixel_size_um, slide.origin_um)
        self.publisher = publisher
        self.acquisition = acquisition
        self.view = {"sensor_shape": sensor_shape, "pixel_size_um": slide.pixel_size_um}
        self.dirs = {"col_dir": col_dir, "row_dir": row_dir}
        self.delay_s = delay_s
        self.frames: list[tuple[dict[str, int], float, float]] = []  # (index, x, y) of forwarded frames
        self.started = self.finished = 0
        self._timers: list[threading.Timer] = []

    def on_sequence_started(self, sequence: Any, meta: Any = None) -> None:
        self.started += 1

    def on_sequence_finished(self, sequence: Any) -> None:
        self.finished += 1
        for timer in self._timers:
            timer.join()
        self.publisher.publish_summary(
            AcquisitionSummary(acquisition=self.acquisition, frames_ok=len(self.frames))
        )

    def __call__(self, img: np.ndarray, event: Any, meta: dict[str, Any] | None = None) -> None:
        x, y = (meta or {})["position"]["x"], (meta or {})["position"]["y"]
        index = {k: int(v) for k, v in dict(event.index).items()}
        self.frames.append((index, x, y))
        labels = self.truth.view(x, y, **self.view, **self.dirs).astype(np.int64)
        labels = relabel_sequential(labels)[0]
        received = time.monotonic()

        def publish() -> None:
            cells = CellTable.from_labels(labels)
            self.publisher.publish_result(
                FrameResult(
                    acquisition=self.acquisition,
                    index=Index(t=index.get("t", 0), p=index.get("p", 0), z=index.get("z", 0)),
                    n_cells=len(cells),
                    cells=FrameResult.cell_columns(cells),
                    latency={"end_to_end": time.monotonic() - received},
                )
            )

        timer = threading.Timer(self.delay_s, publish)
        self._timers.append(timer)
        timer.start()


def visible_centre(
    slide: VirtualSlide,
    label: int | Sequence[int],
    stage: tuple[float, float],
    mount: tuple[tuple[float, float], ...],
    sensor: tuple[int, int],
) -> tuple[float, float]:
    """Stage (x, y) of the centre of the part of cell ``label`` (or of the union of several cells) that the
    camera saw at ``stage``: each slide pixel of the cell is put into camera pixels by the mounting's unit
    vectors and kept if on the sensor."""
    col_dir, row_dir = np.asarray(mount[0]), np.asarray(mount[1])
    rr, cc = np.nonzero(np.isin(slide.labels, np.atleast_1d(label)))
    wx, wy = slide.stage_position(rr, cc)
    offset = np.stack([wx - stage[0], wy - stage[1]], axis=-1) / slide.pixel_size_um
    h, w = sensor
    col, row = offset @ col_dir + (w - 1) / 2, offset @ row_dir + (h - 1) / 2
    seen = (np.rint(col) >= 0) & (np.rint(col) < w) & (np.rint(row) >= 0) & (np.rint(row) < h)
    return float(wx[seen].mean()), float(wy[seen].mean())
