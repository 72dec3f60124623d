"""Per-frame cell table: one row per segmented cell (label id, box, centroid, area, score)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from acquisition.sink_errors import InvalidFrameError

__all__ = ["CELL_TABLE_COLUMNS", "CellTable"]

#: Column order of `CellTable.to_array`, also stored in the Zarr sink's table metadata.
CELL_TABLE_COLUMNS: tuple[str, ...] = (
    "label",
    "x0",
    "y0",
    "x1",
    "y1",
    "centroid_x",
    "centroid_y",
    "area",
    "score",
)


@dataclass(frozen=True, eq=False)
class CellTable:
    """Cells of one frame, one row per cell, columns as parallel arrays.

    Coordinates are in the frame's pixels, x along columns and y along rows.

    Attributes
    ----------
    label : ndarray, shape (N,), uint32
        Label id of the cell in the frame's label image (> 0).
    box : ndarray, shape (N, 4), float64
        Bounding box XYXY ``(x0, y0, x1, y1)``; ``x1``/``y1`` are exclusive pixel edges.
    centroid : ndarray, shape (N, 2), float64
        Centroid ``(x, y)``: mean column and row index of the cell's pixels (pixel ``i`` is at
        coordinate ``i``, the `numpy.indices` convention).
    area : ndarray, shape (N,), int64
        Number of pixels of the cell.
    score : ndarray, shape (N,), float64
        Detection score in [0, 1]; NaN when unknown (e.g. a table derived from labels alone).
    """

    label: NDArray[np.uint32]
    box: NDArray[np.float64]
    centroid: NDArray[np.float64]
    area: NDArray[np.int64]
    score: NDArray[np.float64]

    def __post_init__(self) -> None:
        n = len(self.label)
        expected = {
            "label": (n,),
            "box": (n, 4),
            "centroid": (n, 2),
            "area": (n,),
            "score": (n,),
        }
        for name, shape in expected.items():
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or value.shape != shape:
                got = value.shape if isinstance(value, np.ndarray) else type(value).__name__
                raise InvalidFrameError(
                    f"CellTable.{name} must be an ndarray of shape {shape} for {n} cells, got {got}"
                )
        if n and (self.label.min() <= 0 if self.label.dtype.kind == "i" else self.label.min() == 0):
            raise InvalidFrameError("CellTable.label must hold label ids > 0 (0 is background)")
        # Normalise dtypes once so every consumer sees the documented ones.
        object.__setattr__(self, "label", self.label.astype(np.uint32, copy=False))
        object.__setattr__(self, "box", self.box.astype(np.float64, copy=False))
        object.__setattr__(self, "centroid", self.centroid.astype(np.float64, copy=False))
        object.__setattr__(self, "area", self.area.astype(np.int64, copy=False))
        object.__setattr__(self, "score", self.score.astype(np.float64, copy=False))

    def __len__(self) -> int:
        return len(self.label)

    @classmethod
    def empty(cls) -> CellTable:
        """A table with no cells."""
        return cls.from_array(np.zeros((0, len(CELL_TABLE_COLUMNS))))

    @classmethod
    def from_labels(
        cls, labels: NDArray[np.integer], scores: NDArray[np.floating] | None = None
    ) -> CellTable:
        """Measure every non-zero label of a label image.

        Parameters
        ----------
        labels : ndarray, shape (H, W), integer
            Label image, 0 = background.
        scores : ndarray, shape (N,), optional
            Scores in ascending label order; NaN when omitted.
        """
        # find_objects gives each label's bounding slices in one pass; the per-cell work is then
        # confined to its box, which keeps this fast on 2048 x 2048 frames with hundreds of cells.
        slices = ndimage.find_objects(np.asarray(labels))
        found = [(i + 1, sl) for i, sl in enumerate(slices) if sl is not None]
        if not found:
            return cls.empty()
        ids = np.array([label for label, _ in found], dtype=np.uint32)
        box = np.empty((len(found), 4))
        centroid = np.empty((len(found), 2))
        area = np.empty(len(found), dtype=np.int64)
        for row, (label, (sy, sx)) in enumerate(found):
            ys, xs = np.nonzero(labels[sy, sx] == label)
            area[row] = ys.size
            box[row] = (sx.start, sy.start, sx.stop, sy.stop)
            centroid[row] = (sx.start + xs.mean(), sy.start + ys.mean())
        score = np.full(len(ids), np.nan) if scores is None else np.asarray(scores, dtype=np.float64)
        return cls(
            label=ids,
            box=box,
            centroid=centroid,
            area=area,
            score=score,
        )

    def to_array(self) -> NDArray[np.float64]:
        """Rows as an (N, 9) float64 array in `CELL_TABLE_COLUMNS` order (exact for ids < 2**53)."""
        return np.column_stack([self.label, self.box, self.centroid, self.area, self.score]).astype(
            np.float64, copy=False
        )

    @classmethod
    def from_array(cls, rows: NDArray[np.floating]) -> CellTable:
        """Inverse of `to_array`."""
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, len(CELL_TABLE_COLUMNS))
        return cls(
            label=rows[:, 0].astype(np.uint32),
            box=rows[:, 1:5].copy(),
            centroid=rows[:, 5:7].copy(),
            area=rows[:, 7].astype(np.int64),
            score=rows[:, 8].copy(),
        )

    def equals(self, other: CellTable) -> bool:
        """True when both tables hold the same rows (NaN scores compare equal)."""
        return bool(
            len(self) == len(other) and np.array_equal(self.to_array(), other.to_array(), equal_nan=True)
        )
