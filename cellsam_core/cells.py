"""The cell record: one row per segmented cell, in array axis order, used everywhere the cells of a frame go.

:class:`CellTable` is built once, by :func:`cellsam_core.decode` from the final label image, and the same
value is what the Python API returns, what the service publishes per frame and what the label store
writes. Every coordinate is in **array axis order** ``(y, x)`` = ``(row, column)`` of the frame, in
pixels, the order numpy, scikit-image, napari and OME-NGFF (``...zyx``) use:

=================  =======  ================================================================================
column             dtype    meaning
=================  =======  ================================================================================
``label``          uint32   the cell's value in the frame's label image (1..N)
``area``           int64    number of pixels
``area_um2``       float64  ``area × pixel_size_um²``; NaN when the pixel size is unknown
``centroid_y/_x``  float64  mean row / column index of the cell's pixels (pixel ``i`` is at ``i``)
``bbox_y0.._x1``   int64    tight bounding box ``(y0, x0, y1, x1)``, max exclusive:
                            ``labels[y0:y1, x0:x1]`` holds the cell (scikit-image's ``bbox``)
``prompt_y0.._x1`` float64  the detector box that prompted SAM for this cell, ``(y0, x0, y1, x1)`` in
                            frame pixels (see :func:`cellsam_core.decode`); NaN when unknown (labels alone)
``score``          float64  CellFinder confidence of the prompt box in [0, 1]; NaN when unknown
=================  =======  ================================================================================

Measurements come from :func:`skimage.measure.regionprops_table`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cellsam_core.errors import CellTableError

__all__ = ["CELL_COLUMNS", "CellTable", "CellTableError", "intensity_column"]

#: Column names of :meth:`CellTable.columns` / :meth:`CellTable.to_array`, in that order.
CELL_COLUMNS: tuple[str, ...] = (
    "label",
    "area",
    "area_um2",
    "centroid_y",
    "centroid_x",
    "centroid_y_um",
    "centroid_x_um",
    "bbox_y0",
    "bbox_x0",
    "bbox_y1",
    "bbox_x1",
    "prompt_y0",
    "prompt_x0",
    "prompt_y1",
    "prompt_x1",
    "score",
)


def _as(value: object, dtype: type, shape: tuple[int, ...], name: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.shape != shape:
        raise CellTableError(f"CellTable.{name} must have shape {shape}, got {arr.shape}")
    return arr.astype(dtype, copy=False)


@dataclass(frozen=True, eq=False)
class CellTable:
    """The cells of one frame, one row per cell in increasing label order (see the module docstring).

    Attributes
    ----------
    label : ndarray, uint32 (N,)
        Label value of each cell (> 0).
    area : ndarray, int64 (N,)
        Pixel count.
    centroid : ndarray, float64 (N, 2)
        ``(y, x)`` centroid in pixels.
    bbox : ndarray, int64 (N, 4)
        Tight box ``(y0, x0, y1, x1)``, max exclusive.
    prompt_box : ndarray, float64 (N, 4)
        Prompt box ``(y0, x0, y1, x1)`` in frame pixels; NaN rows where there is none.
    score : ndarray, float64 (N,)
        Detection score; NaN where unknown.
    pixel_size_um : float or None
        Pixel size in micrometres, when known (gives :attr:`area_um2` and :attr:`centroid_um`).
    measurements : mapping of str to ndarray, float64 (N,)
        Further per-cell columns, after :data:`CELL_COLUMNS` in :meth:`columns` (e.g. the per-channel
        intensities of :meth:`with_intensities`, named by :func:`intensity_column`).
    """

    label: NDArray[np.uint32]
    area: NDArray[np.int64]
    centroid: NDArray[np.float64]
    bbox: NDArray[np.int64]
    prompt_box: NDArray[np.float64]
    score: NDArray[np.float64]
    pixel_size_um: float | None = None
    measurements: Mapping[str, NDArray[np.float64]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = int(np.asarray(self.label).shape[0]) if np.ndim(self.label) == 1 else -1
        if n < 0:
            raise CellTableError(f"CellTable.label must be 1-D, got shape {np.shape(self.label)}")
        set_ = object.__setattr__
        set_(self, "label", _as(self.label, np.uint32, (n,), "label"))
        set_(self, "area", _as(self.area, np.int64, (n,), "area"))
        set_(self, "centroid", _as(self.centroid, np.float64, (n, 2), "centroid"))
        set_(self, "bbox", _as(self.bbox, np.int64, (n, 4), "bbox"))
        set_(self, "prompt_box", _as(self.prompt_box, np.float64, (n, 4), "prompt_box"))
        set_(self, "score", _as(self.score, np.float64, (n,), "score"))
        if n and int(self.label.min()) == 0:
            raise CellTableError("CellTable.label must hold label ids > 0 (0 is background), got a 0")
        if self.pixel_size_um is not None and not self.pixel_size_um > 0:
            raise CellTableError(f"pixel_size_um must be > 0, got {self.pixel_size_um}")
        clash = [name for name in self.measurements if name in CELL_COLUMNS]
        if clash:
            raise CellTableError(f"measurement columns {clash} would shadow cell table columns")
        set_(
            self,
            "measurements",
            {str(k): _as(v, np.float64, (n,), f"measurements[{k!r}]") for k, v in self.measurements.items()},
        )

    def __len__(self) -> int:
        return int(self.label.shape[0])

    @property
    def n_cells(self) -> int:
        """Number of cells (rows)."""
        return len(self)

    @property
    def area_um2(self) -> NDArray[np.float64]:
        """float64 (N,) area in µm²; NaN when :attr:`pixel_size_um` is unknown."""
        if self.pixel_size_um is None:
            return np.full(len(self), np.nan)
        return self.area.astype(np.float64) * float(self.pixel_size_um) ** 2

    @property
    def centroid_um(self) -> NDArray[np.float64]:
        """float64 (N, 2) ``(y, x)`` centroid in µm from the frame's origin; NaN when the pixel size is
        unknown."""
        if self.pixel_size_um is None:
            return np.full((len(self), 2), np.nan)
        return self.centroid * float(self.pixel_size_um)

    @property
    def column_names(self) -> tuple[str, ...]:
        """:data:`CELL_COLUMNS` then the measurement columns."""
        return (*CELL_COLUMNS, *self.measurements)

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def empty(cls, pixel_size_um: float | None = None) -> CellTable:
        """A table with no cells."""
        return cls.from_labels(np.zeros((1, 1), dtype=np.uint32), pixel_size_um=pixel_size_um)

    @classmethod
    def from_labels(
        cls,
        labels: NDArray[np.integer],
        *,
        prompt_boxes: ArrayLike | None = None,
        scores: ArrayLike | None = None,
        pixel_size_um: float | None = None,
    ) -> CellTable:
        """Measure every non-zero label of a label image.

        Parameters
        ----------
        labels : ndarray, (H, W), non-negative integers
            0 is background.
        prompt_boxes : array_like, float (N, 4), optional
            ``(y0, x0, y1, x1)`` per present label, in increasing label order; NaN when omitted.
        scores : array_like, float (N,), optional
            Per present label, in increasing label order; NaN when omitted.
        pixel_size_um : float, optional

        Raises
        ------
        CellTableError
            ``labels`` is not a 2-D non-negative integer array, or ``prompt_boxes`` / ``scores`` do not
            have one row per present label.
        """
        from skimage.measure import regionprops_table

        arr = np.asarray(labels)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise CellTableError(f"labels must be a 2-D integer array, got {arr.dtype} {arr.shape}")
        if arr.size and arr.min() < 0:
            raise CellTableError("labels must be non-negative (0 = background)")
        props = regionprops_table(arr, properties=("label", "area", "centroid", "bbox"))
        n = len(props["label"])
        centroid = np.stack([props["centroid-0"], props["centroid-1"]], axis=1).reshape(n, 2)
        bbox = np.stack([props[f"bbox-{i}"] for i in range(4)], axis=1).reshape(n, 4)
        return cls(
            label=props["label"],
            area=props["area"],
            centroid=centroid,
            bbox=bbox,
            prompt_box=np.full((n, 4), np.nan)
            if prompt_boxes is None
            else np.asarray(prompt_boxes, np.float64),
            score=np.full(n, np.nan) if scores is None else np.asarray(scores, np.float64),
            pixel_size_um=pixel_size_um,
        )

    def with_pixel_size(self, pixel_size_um: float | None) -> CellTable:
        """The same cells with a known pixel size (gives physical areas and centroids)."""
        return replace(self, pixel_size_um=pixel_size_um)

    def with_measurements(self, columns: Mapping[str, ArrayLike]) -> CellTable:
        """The same cells with more per-cell columns (one value per cell, in row order)."""
        return replace(self, measurements={**self.measurements, **dict(columns)})  # type: ignore[arg-type]

    def with_intensities(
        self, labels: NDArray[np.integer], image: NDArray[np.generic], channel_names: Sequence[str]
    ) -> CellTable:
        """Add each cell's mean and integrated intensity in every channel of ``image``.

        Parameters
        ----------
        labels : ndarray, (H, W)
            The label image this table was measured from.
        image : ndarray, (H, W) or (H, W, C)
            Raw pixels, channels last.
        channel_names : sequence of str
            One name per channel (``C``), used in the column names (:func:`intensity_column`).

        Returns
        -------
        CellTable
            With columns ``intensity_mean_<name>`` and ``intensity_sum_<name>`` per channel (float64; the
            sum is mean × area, the reporter's total signal in the cell).
        """
        pixels = np.asarray(image)
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        flat_labels = np.asarray(labels)
        if pixels.ndim != 3 or pixels.shape[:2] != flat_labels.shape:
            raise CellTableError(
                f"image {pixels.shape} does not match labels {flat_labels.shape}: give (H, W) or (H, W, C)"
            )
        if len(channel_names) != pixels.shape[2]:
            raise CellTableError(f"{len(channel_names)} channel names for {pixels.shape[2]} channels")
        ids = flat_labels.ravel().astype(np.intp, copy=False)
        n_bins = int(ids.max()) + 1 if ids.size else 1
        if len(self) and (
            n_bins <= int(self.label.max())
            or np.any(np.bincount(ids, minlength=n_bins)[self.label] != self.area)
        ):
            raise CellTableError("labels do not hold this table's cells; measure on its own label image")
        columns: dict[str, np.ndarray] = {}
        seen: set[str] = set()
        for c, name in enumerate(channel_names):
            # One pass over the pixels per channel: the sum of each label's values (a weighted histogram).
            sums = np.bincount(ids, weights=pixels[..., c].ravel(), minlength=n_bins)[self.label]
            columns[intensity_column(name, "mean", seen)] = sums / np.maximum(self.area, 1)
            columns[intensity_column(name, "sum", seen)] = sums
        return self.with_measurements(columns)

    # -- columns -----------------------------------------------------------------------------------

    def columns(self) -> dict[str, NDArray[np.generic]]:
        """Column name → 1-D array, in :attr:`column_names` order (pandas: ``DataFrame(t.columns())``)."""
        cy, cx = self.centroid.T
        cy_um, cx_um = self.centroid_um.T
        by0, bx0, by1, bx1 = self.bbox.T
        py0, px0, py1, px1 = self.prompt_box.T
        values = (self.label, self.area, self.area_um2, cy, cx, cy_um, cx_um, by0, bx0, by1, bx1)
        core = dict(zip(CELL_COLUMNS, (*values, py0, px0, py1, px1, self.score), strict=True))
        return {**core, **self.measurements}

    def to_array(self) -> NDArray[np.float64]:
        """float64 (N, len(column_names)) in :attr:`column_names` order (exact for ids < 2**53)."""
        cols = self.columns().values()
        return np.column_stack([np.asarray(c, dtype=np.float64) for c in cols]).reshape(
            len(self), len(self.column_names)
        )

    @classmethod
    def from_array(
        cls,
        rows: NDArray[np.floating],
        columns: Sequence[str] = CELL_COLUMNS,
        *,
        pixel_size_um: float | None = None,
    ) -> CellTable:
        """Inverse of :meth:`to_array`: ``columns`` names the columns of ``rows`` (any order; names not in
        :data:`CELL_COLUMNS` become measurements); ``area_um2`` and the µm centroids are recomputed from
        ``pixel_size_um``, which the caller keeps."""
        names = list(columns)
        missing = [c for c in CELL_COLUMNS if c not in names]
        if missing:
            raise CellTableError(f"cell table rows lack the columns {missing}")
        data = np.asarray(rows, dtype=np.float64)
        if data.size == 0:
            data = data.reshape(0, len(names))
        if data.ndim != 2 or data.shape[1] != len(names):
            raise CellTableError(
                f"cell table rows must be (N, {len(names)}) for {len(names)} column names, got {data.shape}"
            )
        col: Mapping[str, np.ndarray] = {name: data[:, i] for i, name in enumerate(names)}
        return cls(
            label=col["label"].astype(np.uint32),
            area=col["area"].astype(np.int64),
            centroid=np.stack([col["centroid_y"], col["centroid_x"]], axis=1),
            bbox=np.stack([col[f"bbox_{a}"] for a in ("y0", "x0", "y1", "x1")], axis=1).astype(np.int64),
            prompt_box=np.stack([col[f"prompt_{a}"] for a in ("y0", "x0", "y1", "x1")], axis=1),
            score=col["score"].copy(),
            pixel_size_um=pixel_size_um,
            measurements={name: col[name].copy() for name in names if name not in CELL_COLUMNS},
        )

    def equals(self, other: CellTable) -> bool:
        """True when both tables hold the same columns and rows (NaN compares equal)."""
        return bool(
            len(self) == len(other)
            and self.column_names == other.column_names
            and np.array_equal(self.to_array(), other.to_array(), equal_nan=True)
        )

    def __repr__(self) -> str:
        px = "" if self.pixel_size_um is None else f", pixel_size_um={self.pixel_size_um}"
        return f"CellTable({len(self)} cells{px})"


def intensity_column(channel: str, statistic: str, taken: set[str] | None = None) -> str:
    """Column name of a per-channel intensity: ``intensity_<statistic>_<channel>``.

    Characters other than ``[A-Za-z0-9_.-]`` in the channel name become ``_``; a name already in
    ``taken`` (updated in place) gets a numeric suffix, so every channel keeps its own column.
    """
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", channel) or "channel"
    name = f"intensity_{statistic}_{safe}"
    if taken is not None:
        base, k = name, 2
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
    return name
