"""Whole-slide tiling: cut a large frame into overlapping tiles and merge the tiles' labels back.

Reproduces the reference's ``segment_wsi`` (vanvalenlab/cellSAM, commit 35bc6e0; dask + dask-image there)
with plain numpy, and never runs a model: the caller segments the tiles, possibly elsewhere.

Geometry (``block_size=400, overlap=56`` by default):

* Each axis is cut into chunks of ``block_size`` with a smaller last chunk (1000 -> 400, 400, 200). As
  ``dask.array.overlap`` does, a last chunk shorter than ``overlap`` is fixed up: it borrows pixels from the
  chunk before it if that one stays longer than ``overlap``, otherwise it is merged into it.
* A tile is its chunk grown by ``overlap`` on every side; pixels outside the image wrap around to the
  opposite edge (periodic boundary, ``np.pad(mode="wrap")``).

Merge (:func:`merge_tiles`), as the reference does it:

1. Tile ``k`` (row-major order) with maximum label ``n_k`` gets offset ``2 * sum(n_<k) + n_k`` on its
   non-zero pixels (a running total incremented twice per tile: sparse but unique labels).
2. Tiles are cut down to an ``iou_depth`` margin. At every internal face, the last ``2 * iou_depth`` lines
   of one tile and the first ``2 * iou_depth`` lines of its neighbour show the same image strip; two
   labels whose IoU over that strip is ``>= iou_threshold`` are the same cell.
3. Connected components of that graph over all label values ``0 .. 2 * sum(n)`` (scipy's numbering, so
   the final labels are component ids: unique, not sequential) relabel every tile, and each tile's core
   chunk is written to the output.

Where we differ from the reference (inputs it cannot handle, or plain bugs):

* A side shorter than ``overlap`` is one chunk wrapped periodically (the reference raises).
* A single-tile image is trimmed by ``overlap`` (the reference trims by ``iou_depth`` only and returns a
  larger array when ``overlap > iou_depth``).
* The whole-frame min-max before tiling (:func:`cellsam_core.preprocess.minmax_channels`) scales each
  channel; the reference's ``cellsam_pipeline`` indexes ``img[..., i]`` for i = 0..2, which on a 2-D
  image scales columns 0-2 only.
* Output is uint32 (int32 in the reference); ``sequential=True`` optionally relabels 1..K.

Centre merge (:func:`merge_tiles_by_centre`), our own: where two tiles segment a seam cell differently
(IoU < ``iou_threshold`` over the strip), the reference merge cuts the cell along the seam into two labels.
Here each tile instead keeps the cells whose centre of mass lies in its core chunk and pastes each of them
*whole*, overlap margin included, so no cell is cut at a seam unless it reaches past its tile. The
setting is :attr:`TilePlan.merge`: ``cellsam_nano`` merges by centre, the official models keep the
reference's merge (their labels stay equal to the reference's). See ``docs/models.md`` for measured F1.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import scipy.sparse
from scipy.sparse.csgraph import connected_components

__all__ = [
    "CentreMerge",
    "TileMerge",
    "TilePlan",
    "extract_tiles",
    "iter_tiles",
    "merge_tiles",
    "merge_tiles_by_centre",
    "merge_values",
    "needs_tiling",
    "plan_tiles",
]

#: Frames with a side above this many pixels are tiled by default (the model input is 1024²; beyond ~2x
#: the stretch to 1024² shrinks cells too much to find them).
DEFAULT_TILING_THRESHOLD = 2048

TileMerge = Literal["centre", "reference"]
"""How tile labels are merged: :func:`merge_tiles_by_centre` or the reference's :func:`merge_tiles`."""


@dataclass(frozen=True)
class TilePlan:
    """Geometry of a tiling of an ``(H, W)`` image; make one with :func:`plan_tiles`.

    Attributes
    ----------
    shape : tuple of int
        ``(H, W)`` of the image.
    row_chunks, col_chunks : tuple of int
        Core chunk lengths along y and x; they sum to H and W.
    block_size, overlap, iou_depth : int
        Chunk length, tile margin and half-width of the strips compared at tile faces (pixels).
    iou_threshold : float
        Two labels meeting at a face are merged when their IoU over the strip is at least this.
    merge : {"reference", "centre"}
        Which merge the tiles' labels go through (:func:`merge_tiles` or :func:`merge_tiles_by_centre`);
        the centre merge ignores ``iou_depth`` and ``iou_threshold``.
    """

    shape: tuple[int, int]
    row_chunks: tuple[int, ...]
    col_chunks: tuple[int, ...]
    block_size: int = 400
    overlap: int = 56
    iou_depth: int = 56
    iou_threshold: float = 0.5
    merge: TileMerge = "reference"

    def __post_init__(self) -> None:
        if self.merge not in get_args(TileMerge):
            raise ValueError(f"merge must be one of {get_args(TileMerge)}, got {self.merge!r}")
        if sum(self.row_chunks) != self.shape[0] or sum(self.col_chunks) != self.shape[1]:
            raise ValueError(f"chunks {self.row_chunks} x {self.col_chunks} do not cover shape {self.shape}")

    @property
    def grid(self) -> tuple[int, int]:
        """Number of tiles along y and x."""
        return len(self.row_chunks), len(self.col_chunks)

    @property
    def n_tiles(self) -> int:
        return len(self.row_chunks) * len(self.col_chunks)

    def core_bounds(self, index: tuple[int, int]) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)`` of tile ``index``'s core chunk in image pixels (max exclusive)."""
        i, j = index
        y0 = sum(self.row_chunks[:i])
        x0 = sum(self.col_chunks[:j])
        return y0, y0 + self.row_chunks[i], x0, x0 + self.col_chunks[j]

    def tile_shape(self, index: tuple[int, int]) -> tuple[int, int]:
        """``(h, w)`` of tile ``index``: its core plus ``overlap`` on each side."""
        i, j = index
        return self.row_chunks[i] + 2 * self.overlap, self.col_chunks[j] + 2 * self.overlap

    def indices(self) -> list[tuple[int, int]]:
        """Tile indices in the order tiles are extracted and must be merged (row-major)."""
        return [(i, j) for i in range(len(self.row_chunks)) for j in range(len(self.col_chunks))]


def plan_tiles(
    shape_hw: Sequence[int],
    *,
    block_size: int = 400,
    overlap: int = 56,
    iou_depth: int = 56,
    iou_threshold: float = 0.5,
    merge: TileMerge = "reference",
) -> TilePlan:
    """Plan the tiling of an ``(H, W)`` image (reference ``segment_wsi`` defaults; see :class:`TilePlan`)."""
    if len(shape_hw) < 2 or min(int(shape_hw[0]), int(shape_hw[1])) <= 0:
        raise ValueError(f"shape_hw must be a positive (H, W), got {tuple(shape_hw)}")
    if block_size < 1 or overlap < 1:
        raise ValueError(f"block_size ({block_size}) and overlap ({overlap}) must be positive")
    if overlap > block_size:
        raise ValueError(f"overlap ({overlap}) must not exceed block_size ({block_size})")
    if not 1 <= iou_depth <= overlap:
        raise ValueError(f"iou_depth ({iou_depth}) must be between 1 and overlap ({overlap})")
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold ({iou_threshold}) must be in (0, 1]")
    height, width = int(shape_hw[0]), int(shape_hw[1])
    return TilePlan(
        shape=(height, width),
        row_chunks=_axis_chunks(height, block_size, overlap),
        col_chunks=_axis_chunks(width, block_size, overlap),
        block_size=block_size,
        overlap=overlap,
        iou_depth=iou_depth,
        iou_threshold=iou_threshold,
        merge=merge,
    )


def _axis_chunks(size: int, block: int, depth: int) -> tuple[int, ...]:
    """Chunks of ``block`` with a smaller last one, fixed up like dask's ``ensure_minimum_chunksize``."""
    chunks = [block] * (size // block) + ([size % block] if size % block else [])
    last = chunks[-1]
    if last >= depth or len(chunks) == 1:
        return tuple(chunks)
    before = chunks[-2]
    if before > 2 * depth - last:  # the chunk before can lend (depth - last) and stay longer than depth
        chunks[-2:] = [before - (depth - last), depth]
    else:
        chunks[-2:] = [before + last]
    return tuple(chunks)


def needs_tiling(shape_hw: Sequence[int], threshold: int = DEFAULT_TILING_THRESHOLD) -> bool:
    """Whether a frame of ``(H, W)`` should go through the tiled path: a side longer than ``threshold``."""
    return int(shape_hw[0]) > threshold or int(shape_hw[1]) > threshold


def iter_tiles(image: np.ndarray, plan: TilePlan) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
    """Yield ``(index, tile)`` in row-major order; tiles are ``(h, w[, C])`` copies, periodic at the edges."""
    arr = np.asarray(image)
    if arr.ndim not in (2, 3) or tuple(arr.shape[:2]) != plan.shape:
        raise ValueError(f"image of shape {arr.shape} does not match the plan's (H, W) = {plan.shape}")
    height, width = plan.shape
    for index in plan.indices():
        y0, y1, x0, x1 = plan.core_bounds(index)
        rows = np.arange(y0 - plan.overlap, y1 + plan.overlap) % height
        cols = np.arange(x0 - plan.overlap, x1 + plan.overlap) % width
        yield index, arr[rows][:, cols]


def extract_tiles(image: np.ndarray, plan: TilePlan) -> list[np.ndarray]:
    """All tiles of ``image`` (``(H, W)`` or ``(H, W, C)``) in row-major order; see :func:`iter_tiles`."""
    return [tile for _, tile in iter_tiles(image, plan)]


def merge_tiles(tile_labels: Sequence[np.ndarray], plan: TilePlan, *, sequential: bool = False) -> np.ndarray:
    """Merge per-tile label images into one ``(H, W)`` label image, as the reference does.

    Parameters
    ----------
    tile_labels : sequence of np.ndarray
        One non-negative integer ``(h, w)`` label image per tile, in :meth:`TilePlan.indices` order, each
        of :meth:`TilePlan.tile_shape`. Labels need not be sequential; an all-zero tile is fine.
    plan : TilePlan
        The plan the tiles were extracted with.
    sequential : bool
        Relabel the result 1..K in increasing order of the reference's label values.

    Returns
    -------
    np.ndarray
        uint32 ``(H, W)``.
    """
    indices = plan.indices()
    if len(tile_labels) != len(indices):
        raise ValueError(f"got {len(tile_labels)} tiles for a plan of {len(indices)}")
    offset_tiles: list[np.ndarray] = []
    total = 0
    for index, labels in zip(indices, tile_labels, strict=True):
        arr = np.asarray(labels)
        if arr.shape != plan.tile_shape(index) or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"tile {index}: expected integer labels of shape {plan.tile_shape(index)}, got "
                f"{arr.dtype} {arr.shape}"
            )
        n = int(arr.max()) if arr.size else 0
        if n < 0 or (arr.size and int(arr.min()) < 0):
            raise ValueError(f"tile {index} has negative labels; 0 is background, cells are > 0")
        total += n
        offset_tiles.append(np.where(arr > 0, arr.astype(np.int64) + total, 0))
        total += n

    if plan.n_tiles > 1:
        mapping = _component_labels(offset_tiles, plan, n_nodes=total + 1)
        offset_tiles = [mapping[t] for t in offset_tiles]

    out = np.zeros(plan.shape, dtype=np.uint32)
    ov = plan.overlap
    for index, tile in zip(indices, offset_tiles, strict=True):
        y0, y1, x0, x1 = plan.core_bounds(index)
        out[y0:y1, x0:x1] = tile[ov : ov + y1 - y0, ov : ov + x1 - x0]
    if sequential:
        values, inverse = np.unique(out, return_inverse=True)
        shift = 1 if values[0] == 0 else 0
        out = (inverse.reshape(out.shape) + 1 - shift).astype(np.uint32)
    return out


def _component_labels(tiles: list[np.ndarray], plan: TilePlan, *, n_nodes: int) -> np.ndarray:
    """Map every label value to its connected component over the IoU matches at all internal faces."""
    trim = plan.overlap - plan.iou_depth
    strip = 2 * plan.iou_depth
    n_rows, n_cols = plan.grid
    grid = [[tiles[i * n_cols + j] for j in range(n_cols)] for i in range(n_rows)]
    if trim:
        grid = [[t[trim:-trim, trim:-trim] for t in row] for row in grid]
    edges: list[np.ndarray] = []
    for i in range(n_rows):
        for j in range(n_cols):
            if i + 1 < n_rows:  # face between (i, j) and the tile below
                edges.append(_matching_labels(grid[i][j][-strip:, :], grid[i + 1][j][:strip, :], plan))
            if j + 1 < n_cols:  # face between (i, j) and the tile to the right
                edges.append(_matching_labels(grid[i][j][:, -strip:], grid[i][j + 1][:, :strip], plan))
    pairs = np.concatenate(edges, axis=1) if edges else np.zeros((2, 0), dtype=np.int64)
    graph = scipy.sparse.coo_matrix(
        (np.ones(pairs.shape[1], dtype=np.int8), (pairs[0], pairs[1])), shape=(n_nodes, n_nodes)
    ).tocsr()
    _, component = connected_components(graph, directed=False)
    return component.astype(np.int64)


def _matching_labels(side0: np.ndarray, side1: np.ndarray, plan: TilePlan) -> np.ndarray:
    """``(2, M)`` label pairs (non-zero on both sides) whose IoU over the shared strip is >= threshold.

    ``side0`` and ``side1`` are two tiles' views of the same image strip. IoU of labels ``a`` and ``b`` =
    ``|side0 == a & side1 == b| / (|side0 == a| + |side1 == b| - intersection)``, computed from the
    co-occurring pairs only (what a full confusion matrix would hold where it is non-zero).
    """
    a = side0.ravel()
    b = side1.ravel()
    a_vals, a_idx, a_counts = np.unique(a, return_inverse=True, return_counts=True)
    b_vals, b_idx, b_counts = np.unique(b, return_inverse=True, return_counts=True)
    pair_keys, intersection = np.unique(a_idx.astype(np.int64) * b_vals.size + b_idx, return_counts=True)
    ia, ib = np.divmod(pair_keys, b_vals.size)
    union = a_counts[ia] + b_counts[ib] - intersection
    iou = intersection / union
    keep = (iou >= plan.iou_threshold) & (a_vals[ia] != 0) & (b_vals[ib] != 0)
    return np.stack([a_vals[ia][keep], b_vals[ib][keep]]).astype(np.int64)


@dataclass(frozen=True, eq=False)
class CentreMerge:
    """Labels merged by :func:`merge_tiles_by_centre` and where each label came from.

    Attributes
    ----------
    labels : np.ndarray
        uint32 ``(H, W)``, 0 = background.
    source_tile, source_label : np.ndarray
        int64 ``(L + 1,)`` with ``L`` the largest label handed out: label ``v`` is the cell
        ``source_label[v]`` of tile number ``source_tile[v]`` (its position in :meth:`TilePlan.indices`).
        Row 0 is ``(-1, 0)``. Without ``sequential``, a label that lost all its pixels to other cells is
        absent from ``labels`` but keeps its row.
    """

    labels: np.ndarray
    source_tile: np.ndarray
    source_label: np.ndarray


def merge_tiles_by_centre(
    tile_labels: Sequence[np.ndarray], plan: TilePlan, *, sequential: bool = False
) -> CentreMerge:
    """Merge per-tile label images by cell centre: every cell comes whole from the one tile that owns it.

    A tile owns a cell when the cell's centre of mass, over all its pixels in the tile, lies in the tile's
    core chunk (half-open: ``y0 <= cy < y1``, ``x0 <= cx < x1``, compared exactly on integer sums). A
    centre outside the core lies in a neighbour's core, or outside the frame in a periodic margin where
    the tile across the frame edge sees the same pixels in its core: the tile leaves such cells to that
    other tile. So does a tile (no longer than the frame) whose cell has fewer than half of its pixels
    inside the frame (mostly a periodic copy, or a mask leaking into the wrapped margin). A cell that
    every tile leaves to another (tiles that disagree about where it is) is lost.
    A label is one object: a label found at several places of a tile (e.g. periodic copies in a tile
    longer than the frame) has the centre of all of them.

    Kept cells are pasted whole, overlap margin included, at their frame position; tile pixels outside
    the frame (the periodic margins, see :func:`iter_tiles`) are dropped, never wrapped back. Where two
    pasted cells claim a pixel, the cell from the tile whose core holds the pixel wins (that tile sees it
    at least ``overlap`` from its own edge); between two tiles that both see the pixel in their margins,
    the first in :meth:`TilePlan.indices` order wins.

    Parameters
    ----------
    tile_labels : sequence of np.ndarray
        As for :func:`merge_tiles`: non-negative integer ``(h, w)`` labels per tile, in
        :meth:`TilePlan.indices` order, of :meth:`TilePlan.tile_shape`.
    plan : TilePlan
        The plan the tiles were extracted with (its ``iou_depth`` and ``iou_threshold`` are not used).
    sequential : bool
        Relabel the result 1..K, dropping labels left without pixels. Otherwise labels are handed out
        in tile order, then in increasing tile label order, and may have gaps.

    Returns
    -------
    CentreMerge
        The uint32 ``(H, W)`` labels and each label's source tile and tile label.
    """
    indices = plan.indices()
    if len(tile_labels) != len(indices):
        raise ValueError(f"got {len(tile_labels)} tiles for a plan of {len(indices)}")
    height, width = plan.shape
    out = np.zeros(plan.shape, dtype=np.uint32)
    tiles: list[np.ndarray] = [np.array([-1], dtype=np.int64)]
    labels: list[np.ndarray] = [np.array([0], dtype=np.int64)]
    next_id = 1
    for number, (index, tile) in enumerate(zip(indices, tile_labels, strict=True)):
        arr = np.asarray(tile)
        if arr.shape != plan.tile_shape(index) or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"tile {index}: expected integer labels of shape {plan.tile_shape(index)}, got "
                f"{arr.dtype} {arr.shape}"
            )
        if arr.size and int(arr.min()) < 0:
            raise ValueError(f"tile {index} has negative labels; 0 is background, cells are > 0")
        y0, y1, x0, x1 = plan.core_bounds(index)
        rows, cols = np.nonzero(arr)
        values = arr[rows, cols]
        rows += y0 - plan.overlap  # frame coordinates, outside the frame in the periodic margins
        cols += x0 - plan.overlap
        cells, pixel_cell = np.unique(values, return_inverse=True)
        pixel_cell = pixel_cell.ravel()
        # Pixel counts and coordinate sums are integers held exactly in float64 (< 2**53), so the
        # half-open bounds are tested exactly: y0 <= sum / n < y1  <=>  y0 * n <= sum < y1 * n.
        n = np.bincount(pixel_cell, minlength=cells.size).astype(np.float64)
        sum_y = np.bincount(pixel_cell, weights=rows, minlength=cells.size)
        sum_x = np.bincount(pixel_cell, weights=cols, minlength=cells.size)
        owned = (sum_y >= y0 * n) & (sum_y < y1 * n) & (sum_x >= x0 * n) & (sum_x < x1 * n)
        inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
        if arr.shape[0] <= height and arr.shape[1] <= width:
            # A cell mostly outside the frame is a periodic copy of one across the frame edge (or a
            # mask that leaked there): its in-frame pixels would be a fragment away from its box. (A
            # tile longer than the frame holds its own periodic copies under one label: not there.)
            owned &= 2 * np.bincount(pixel_cell[inside], minlength=cells.size) >= n
        rows, cols, pixel_cell = rows[inside], cols[inside], pixel_cell[inside]
        ids = np.zeros(cells.size, dtype=np.uint32)
        ids[owned] = np.arange(next_id, next_id + int(owned.sum()), dtype=np.uint32)
        next_id += int(owned.sum())
        tiles.append(np.full(int(owned.sum()), number, dtype=np.int64))
        labels.append(cells[owned].astype(np.int64))

        pixel_id = ids[pixel_cell]
        pasted = pixel_id > 0
        rows, cols, pixel_id = rows[pasted], cols[pasted], pixel_id[pasted]
        free = out[rows, cols] == 0
        out[rows[free], cols[free]] = pixel_id[free]
        core = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
        out[rows[core], cols[core]] = pixel_id[core]

    source_tile = np.concatenate(tiles)
    source_label = np.concatenate(labels)
    if sequential:
        present = np.bincount(out.ravel(), minlength=next_id) > 0
        present[0] = True
        relabel = (np.cumsum(present) - 1).astype(np.uint32)
        out = relabel[out]
        source_tile, source_label = source_tile[present], source_label[present]
    return CentreMerge(labels=out, source_tile=source_tile, source_label=source_label)


def merge_values(tile_values: Sequence[np.ndarray], plan: TilePlan) -> np.ndarray:
    """Stitch per-tile value maps (e.g. a score per pixel) from their core chunks into ``(H, W)``.

    Parameters
    ----------
    tile_values : sequence of np.ndarray
        One ``(h, w)`` array per tile in :meth:`TilePlan.indices` order, of :meth:`TilePlan.tile_shape`.
    plan : TilePlan
        The plan the tiles were extracted with.

    Returns
    -------
    np.ndarray
        ``(H, W)`` of the tiles' dtype; the overlap margins are dropped, as in :func:`merge_tiles`.
    """
    indices = plan.indices()
    if len(tile_values) != len(indices) or not indices:
        raise ValueError(f"got {len(tile_values)} tiles for a plan of {len(indices)}")
    arrays = [np.asarray(v) for v in tile_values]
    out = np.zeros(plan.shape, dtype=np.result_type(*arrays))
    ov = plan.overlap
    for index, arr in zip(indices, arrays, strict=True):
        if arr.shape != plan.tile_shape(index):
            raise ValueError(f"tile {index}: expected shape {plan.tile_shape(index)}, got {arr.shape}")
        y0, y1, x0, x1 = plan.core_bounds(index)
        out[y0:y1, x0:x1] = arr[ov : ov + y1 - y0, ov : ov + x1 - x0]
    return out
