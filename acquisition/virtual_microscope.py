"""A microscope in software, to try feedback rules without hardware (and to test them).

:func:`virtual_core` returns a pymmcore-plus ``UniMMCore`` whose real MDA engine drives a pure-Python XY
stage and a pure-Python camera that images a :class:`VirtualSlide` (a large synthetic live-cell image with
its ground-truth labels) at the stage position. Micro-Manager itself is not needed. The camera's mounting
is given as the world directions of its image axes, written out here independently of
:mod:`acquisition.stage`, so tests can check the pixel → stage mapping against a physical setup:

==============================  ======================================================================
``ImageOrientation``            camera mounting (``col_dir``, ``row_dir``), world (x, y) unit vectors
==============================  ======================================================================
default                         ``(1, 0)``, ``(0, 1)``
``flip_x=True``                 ``(-1, 0)``, ``(0, 1)``
``flip_y=True``                 ``(1, 0)``, ``(0, -1)``
``transpose=True``              ``(0, 1)``, ``(1, 0)``
==============================  ======================================================================

pymmcore-plus is imported only when :func:`virtual_core` is called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["VirtualSlide", "virtual_core"]


@dataclass
class VirtualSlide:
    """A sample: an image of the slide with its ground truth, placed on the stage.

    Attributes
    ----------
    image : ndarray (H, W)
        What the camera sees (replace it to change the sample, e.g. to make a cell appear).
    labels : ndarray (H, W) int or None
        Ground-truth cell labels of ``image`` (0 = background).
    pixel_size_um : float
        Size of one slide pixel.
    origin_um : (x, y)
        Stage coordinates of the centre of slide pixel (0, 0); slide columns run along +x, rows along +y.
    """

    image: NDArray[Any]
    labels: NDArray[Any] | None
    pixel_size_um: float
    origin_um: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def synthetic(
        cls,
        shape: tuple[int, int] = (1024, 1024),
        *,
        n_cells: int = 150,
        seed: int = 0,
        pixel_size_um: float = 0.5,
        origin_um: tuple[float, float] = (0.0, 0.0),
    ) -> VirtualSlide:
        """A synthetic nuclear-stain slide (``cellsam_core.synthetic``) with its labels."""
        from cellsam_core.synthetic import synthetic_frame

        image, labels = synthetic_frame(shape, seed=seed, n_cells=n_cells)
        return cls(image=image, labels=labels, pixel_size_um=pixel_size_um, origin_um=origin_um)

    def slide_pixel(self, x_um: Any, y_um: Any) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(row, col) of the slide at stage position(s) (x, y) µm."""
        col = (np.asarray(x_um, dtype=np.float64) - self.origin_um[0]) / self.pixel_size_um
        row = (np.asarray(y_um, dtype=np.float64) - self.origin_um[1]) / self.pixel_size_um
        return row, col

    def stage_position(self, row: Any, col: Any) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Stage (x, y) µm of slide pixel(s) (row, col)."""
        x = self.origin_um[0] + np.asarray(col, dtype=np.float64) * self.pixel_size_um
        y = self.origin_um[1] + np.asarray(row, dtype=np.float64) * self.pixel_size_um
        return x, y

    def label_at(self, x_um: float, y_um: float) -> int:
        """Ground-truth label under stage position (x, y) (0 outside cells or outside the slide)."""
        if self.labels is None:
            raise ValueError("this slide has no labels")
        row, col = (round(float(v)) for v in self.slide_pixel(x_um, y_um))
        h, w = self.labels.shape
        return int(self.labels[row, col]) if 0 <= row < h and 0 <= col < w else 0

    def view(
        self,
        x_um: float,
        y_um: float,
        *,
        sensor_shape: tuple[int, int],
        pixel_size_um: float,
        col_dir: tuple[float, float],
        row_dir: tuple[float, float],
    ) -> NDArray[Any]:
        """The camera image at stage (x, y): image pixel (r, c) shows the world point
        ``(x, y) + pixel_size · ((c - (w-1)/2) · col_dir + (r - (h-1)/2) · row_dir)`` (nearest slide pixel;
        outside the slide: the slide's darkest value)."""
        h, w = sensor_shape
        dr, dc = np.meshgrid(np.arange(h) - (h - 1) / 2.0, np.arange(w) - (w - 1) / 2.0, indexing="ij")
        wx = x_um + pixel_size_um * (dc * col_dir[0] + dr * row_dir[0])
        wy = y_um + pixel_size_um * (dc * col_dir[1] + dr * row_dir[1])
        row, col = (np.rint(v).astype(np.int64) for v in self.slide_pixel(wx, wy))
        sh, sw = self.image.shape[:2]
        inside = (row >= 0) & (row < sh) & (col >= 0) & (col < sw)
        out = np.full((h, w), self.image.min(), dtype=self.image.dtype)
        out[inside] = self.image[row[inside], col[inside]]
        return out


def virtual_core(
    slide: VirtualSlide,
    *,
    sensor_shape: tuple[int, int] = (256, 256),
    pixel_size_um: float | None = None,
    col_dir: tuple[float, float] = (1.0, 0.0),
    row_dir: tuple[float, float] = (0.0, 1.0),
    start_um: tuple[float, float] = (0.0, 0.0),
) -> Any:
    """A ``UniMMCore`` with a camera imaging ``slide`` and an XY stage, both pure Python.

    ``pixel_size_um`` (default: the slide's) is set as the core's pixel size configuration, so
    pymmcore-plus reports it with every frame. ``col_dir`` / ``row_dir`` mount the camera (module docstring).
    The camera counts its snaps in ``core.virtual_camera.snaps``, each as ``(x_um, y_um)`` of the stage.
    """
    from pymmcore_plus.experimental import unicore
    from pymmcore_plus.experimental.unicore.devices._stage import XYStageDevice

    size = float(pixel_size_um if pixel_size_um is not None else slide.pixel_size_um)

    class Stage(XYStageDevice):
        def __init__(self) -> None:
            super().__init__()
            self.xy = (float(start_um[0]), float(start_um[1]))

        def set_position_um(self, x: float, y: float) -> None:
            self.xy = (float(x), float(y))

        def get_position_um(self) -> tuple[float, float]:
            return self.xy

        def set_origin_x(self) -> None:
            self.xy = (0.0, self.xy[1])

        def set_origin_y(self) -> None:
            self.xy = (self.xy[0], 0.0)

        def home(self) -> None:
            self.xy = (0.0, 0.0)

        def stop(self) -> None:
            pass

    stage = Stage()

    class Camera(unicore.SimpleCameraDevice):
        def __init__(self) -> None:
            super().__init__()
            self.exposure = 10.0
            self.snaps: list[tuple[float, float]] = []

        def get_exposure(self) -> float:
            return self.exposure

        def set_exposure(self, exposure: float) -> None:
            self.exposure = exposure

        def sensor_shape(self) -> tuple[int, int]:
            return sensor_shape

        def dtype(self) -> Any:
            return slide.image.dtype

        def snap(self, buffer: NDArray[Any]) -> dict[str, Any]:
            x, y = stage.xy
            self.snaps.append((x, y))
            buffer[:] = slide.view(
                x, y, sensor_shape=sensor_shape, pixel_size_um=size, col_dir=col_dir, row_dir=row_dir
            )
            return {}

    camera = Camera()
    core: Any = unicore.UniMMCore()
    core.loadPyDevice("Camera", camera)
    core.initializeDevice("Camera")
    core.setCameraDevice("Camera")
    core.loadPyDevice("XY", stage)
    core.initializeDevice("XY")
    core.setXYStageDevice("XY")
    core.setAutoShutter(False)
    core.definePixelSizeConfig("virtual")
    core.setPixelSizeUm("virtual", size)
    core.setPixelSizeConfig("virtual")
    core.virtual_camera = camera
    core.virtual_stage = stage
    return core
