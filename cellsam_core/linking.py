"""One linking step: which live track continues into which cell of a new frame, and which cells divided.

This is the arithmetic behind :class:`cellsam_core.tracking.OnlineTracker`, on plain arrays (no ids,
events or time order; those live in :mod:`cellsam_core.tracking`). Coordinates are in array axis order
``(y, x)``, in pixels.

Cost model
----------
Each live track ``k`` predicts where its cell is at frame ``t``: its last centroid plus
``velocity_weight × velocity × dt`` (``dt = t - t_last``; the velocity is its last displacement per frame).
A link ``k → j`` to cell ``j`` is possible when the predicted centroid is within
``radius_k = max_distance × √dt`` of ``j``'s centroid, and then costs::

    (1 - overlap_weight) × distance / radius_k
    + overlap_weight × (1 - IoU(track box moved by the prediction, cell box))
    + gap_cost × missed_k

where ``missed_k`` counts the linked frames in which the track was not found (gap closing). Ending a
track and starting one each cost 1, so every possible link is worth taking unless it competes with a
cheaper one. The assignment minimising the total cost over all tracks and cells at once is solved as a
sparse linear assignment problem (``scipy.sparse.csgraph.min_weight_full_bipartite_matching``) on the
usual block matrix of links, track ends and track starts (Jaqaman et al., Nat. Methods 2008).

Divisions: a track seen in the previous frame divided when two cells of frame ``t`` each hold a
``division_area_ratio`` fraction of its area within ``division_distance`` of its predicted centroid,
one of them left unlinked (a new cell) and the other either linked to it or unlinked too. Candidate
(new cell, parent) pairs are resolved by ``scipy.optimize.linear_sum_assignment``.

Merges: a track seen in the previous frame and not found now whose predicted centroid falls inside a
cell that continued another track and grew by ``merge_area_ratio`` or more was probably merged into
that cell by the segmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from scipy.spatial import cKDTree

from cellsam_core.tracking_config import TrackerConfig

__all__ = ["Assignment", "Detections", "LiveTracks", "assign"]

# Ending a track and starting one each cost this much on top of the offset below: a link is taken when its
# cost is under twice this (always, for links within reach) and no cheaper assignment competes.
_NO_LINK_COST = 1.0
# Added to every entry of the sparse matrix: the sparse solver reads an explicit 0 as a missing edge.
_OFFSET = 1.0
# Cost of an impossible pairing in the small dense division problem.
_INFEASIBLE = 1e6


@dataclass(frozen=True, slots=True)
class Detections:
    """The cells of one frame, in table row order.

    Attributes
    ----------
    centroid : ndarray, float64 (M, 2)
        ``(y, x)`` in pixels.
    area : ndarray, float64 (M,)
        Pixel count.
    bbox : ndarray, float64 (M, 4)
        ``(y0, x0, y1, x1)``, max exclusive.
    """

    centroid: NDArray[np.float64]
    area: NDArray[np.float64]
    bbox: NDArray[np.float64]

    def __len__(self) -> int:
        return int(self.area.shape[0])


@dataclass(frozen=True, slots=True)
class LiveTracks:
    """Tracks that can still be continued (seen in the last ``gap_frames + 1`` linked frames), sorted by
    ``track_id``; all arrays have the same first dimension K.

    Attributes
    ----------
    track_id, parent_track_id : ndarray, int64 (K,)
        Ids (``parent_track_id`` 0 for none).
    t_last : ndarray, int64 (K,)
        Time index of the track's last cell.
    missed : ndarray, int64 (K,)
        Linked frames since then in which the track was not found.
    centroid, velocity : ndarray, float64 (K, 2)
        Last ``(y, x)`` centroid; last displacement per frame ``(vy, vx)`` (0 for a track seen once).
    area : ndarray, float64 (K,)
    bbox : ndarray, float64 (K, 4)
        Last cell's area and box ``(y0, x0, y1, x1)``.
    """

    track_id: NDArray[np.int64]
    parent_track_id: NDArray[np.int64]
    t_last: NDArray[np.int64]
    missed: NDArray[np.int64]
    centroid: NDArray[np.float64]
    velocity: NDArray[np.float64]
    area: NDArray[np.float64]
    bbox: NDArray[np.float64]

    def __len__(self) -> int:
        return int(self.track_id.shape[0])

    @classmethod
    def empty(cls) -> LiveTracks:
        i, f = np.zeros(0, np.int64), np.zeros(0, np.float64)
        return cls(i, i, i, i, f.reshape(0, 2), f.reshape(0, 2), f, f.reshape(0, 4))

    def take(self, index: NDArray[np.intp] | NDArray[np.bool_]) -> LiveTracks:
        """The tracks selected by an index or boolean mask, in that order."""
        return LiveTracks(*(getattr(self, f.name)[index] for f in fields(self)))

    @classmethod
    def concat(cls, parts: list[LiveTracks]) -> LiveTracks:
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))


@dataclass(frozen=True, slots=True)
class Assignment:
    """What :func:`assign` decided for one frame.

    Attributes
    ----------
    link : ndarray, int64 (K,)
        Row of the cell each live track continues into, -1 where it does not continue (divided tracks
        included: their cells are in ``divisions``).
    divisions : list of (k, j1, j2)
        Live track ``k`` divided into the cells in rows ``j1`` and ``j2``.
    merges : list of (k, j)
        Live track ``k``, seen in the previous frame and not found now, looks merged into row ``j``.
    """

    link: NDArray[np.int64]
    divisions: list[tuple[int, int, int]]
    merges: list[tuple[int, int]]


def _predict(tracks: LiveTracks, t: int, config: TrackerConfig) -> tuple[np.ndarray, np.ndarray]:
    dt = (t - tracks.t_last).astype(np.float64)
    predicted = tracks.centroid + config.velocity_weight * tracks.velocity * dt[:, None]
    return predicted, dt


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of paired boxes ``(y0, x0, y1, x1)``, (P, 4) each → (P,)."""
    inter_y = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0.0, None)
    inter_x = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0.0, None)
    inter = inter_y * inter_x
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a + area_b - inter, 1e-9)


def _candidate_links(
    tracks: LiveTracks, cells: Detections, predicted: np.ndarray, dt: np.ndarray, config: TrackerConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Track rows, cell rows and costs of every possible link."""
    radius = config.max_distance * np.sqrt(dt)
    pairs = cKDTree(predicted).sparse_distance_matrix(
        cKDTree(cells.centroid), float(radius.max()), output_type="ndarray"
    )
    k, j, d = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64), pairs["v"]
    near = d <= radius[k]
    k, j, d = k[near], j[near], d[near]
    w = config.overlap_weight
    cost = (1.0 - w) * d / radius[k] + config.gap_cost * tracks.missed[k]
    if w > 0:
        shift = predicted[k] - tracks.centroid[k]
        moved = tracks.bbox[k] + np.concatenate([shift, shift], axis=1)
        cost += w * (1.0 - _box_iou(moved, cells.bbox[j]))
    return k, j, cost


def _solve_links(n_tracks: int, n_cells: int, k: np.ndarray, j: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Minimum-cost links; -1 for tracks that end. Rows: tracks then cell starts; columns: cells then
    track ends."""
    kk, mm = n_tracks, n_cells
    ends, starts = np.arange(kk), np.arange(mm)
    rows = np.concatenate([k, ends, kk + starts, kk + j])
    cols = np.concatenate([j, mm + ends, starts, mm + k])
    values = np.concatenate(
        [
            cost + _OFFSET,
            np.full(kk, _NO_LINK_COST + _OFFSET),
            np.full(mm, _NO_LINK_COST + _OFFSET),
            np.full(k.size, _OFFSET),  # pairs a start with an end when their link is taken
        ]
    )
    matrix = csr_matrix((values, (rows, cols)), shape=(kk + mm, kk + mm))
    rows_matched, cols_matched = min_weight_full_bipartite_matching(matrix)
    link = np.full(kk, -1, np.int64)
    real = (rows_matched < kk) & (cols_matched < mm)
    link[rows_matched[real]] = cols_matched[real]
    return link


def _divisions(
    tracks: LiveTracks,
    cells: Detections,
    predicted: np.ndarray,
    link: np.ndarray,
    config: TrackerConfig,
) -> list[tuple[int, int, int]]:
    """(track row, cell row, cell row) of each division; ``link`` is updated for divided tracks."""
    linked_cells = link[link >= 0]
    is_new = np.ones(len(cells), bool)
    is_new[linked_cells] = False
    new = np.flatnonzero(is_new)
    parents = np.flatnonzero(tracks.missed == 0)
    if new.size == 0 or parents.size == 0:
        return []
    lo, hi = config.division_area_ratio
    reach = config.division_distance
    pairs = cKDTree(predicted[parents]).sparse_distance_matrix(
        cKDTree(cells.centroid[new]), reach, output_type="ndarray"
    )
    # Slots: a parent that continued into a cell takes one more daughter; one that ended takes two.
    slot_parent: list[int] = []
    slot_of: dict[tuple[int, int], int] = {}
    entries: list[tuple[int, int, float]] = []
    for p_row, n_row, dist in zip(pairs["i"].tolist(), pairs["j"].tolist(), pairs["v"].tolist(), strict=True):
        k, jn = int(parents[p_row]), int(new[n_row])
        parent_area = tracks.area[k]
        if not lo <= cells.area[jn] / parent_area <= hi:
            continue
        sibling = int(link[k])
        if sibling >= 0:
            sib_dist = float(np.hypot(*(cells.centroid[sibling] - predicted[k])))
            if sib_dist > reach or not lo <= cells.area[sibling] / parent_area <= hi:
                continue
            mid = (cells.centroid[sibling] + cells.centroid[jn]) / 2.0
            cost = float(np.hypot(*(mid - predicted[k]))) / reach
            slots = [(k, 0)]
        else:
            cost = dist / reach
            slots = [(k, 0), (k, 1)]
        for key in slots:
            if key not in slot_of:
                slot_of[key] = len(slot_parent)
                slot_parent.append(k)
            entries.append((n_row, slot_of[key], cost))
    if not entries:
        return []
    matrix = np.full((new.size, len(slot_parent)), _INFEASIBLE)
    for n_row, slot, cost in entries:
        matrix[n_row, slot] = cost
    rows, cols = linear_sum_assignment(matrix)
    daughters: dict[int, list[int]] = {}
    for n_row, slot in zip(rows.tolist(), cols.tolist(), strict=True):
        if matrix[n_row, slot] < _INFEASIBLE:
            daughters.setdefault(slot_parent[slot], []).append(int(new[n_row]))
    found: list[tuple[int, int, int]] = []
    for k, cells_k in sorted(daughters.items()):
        if link[k] >= 0:
            found.append((k, int(link[k]), cells_k[0]))
        elif len(cells_k) == 2:
            found.append((k, *sorted(cells_k)))  # type: ignore[arg-type]
    for k, _, _ in found:
        link[k] = -1
    return found


def _merges(
    tracks: LiveTracks, cells: Detections, predicted: np.ndarray, link: np.ndarray, config: TrackerConfig
) -> list[tuple[int, int]]:
    lost = np.flatnonzero((link < 0) & (tracks.missed == 0))
    linked = np.flatnonzero(link >= 0)
    if lost.size == 0 or linked.size == 0:
        return []
    target = link[linked]
    grew = cells.area[target] >= config.merge_area_ratio * tracks.area[linked]
    target = target[grew]
    if target.size == 0:
        return []
    box = cells.bbox[target]
    found = []
    for k in lost.tolist():
        y, x = predicted[k]
        inside = (box[:, 0] <= y) & (y < box[:, 2]) & (box[:, 1] <= x) & (x < box[:, 3])
        if inside.any():
            found.append((k, int(target[np.flatnonzero(inside)[0]])))
    return found


def assign(tracks: LiveTracks, cells: Detections, t: int, config: TrackerConfig) -> Assignment:
    """Link the live tracks to the cells of frame ``t`` (see the module docstring for the costs).

    Parameters
    ----------
    tracks : LiveTracks
        Tracks that can be continued; every ``t_last`` is < ``t``.
    cells : Detections
        The cells of frame ``t``.
    t : int
        Time index of the frame.
    config : TrackerConfig

    Returns
    -------
    Assignment
    """
    n_tracks, n_cells = len(tracks), len(cells)
    link = np.full(n_tracks, -1, np.int64)
    if n_tracks == 0 or n_cells == 0:
        return Assignment(link, [], [])
    predicted, dt = _predict(tracks, t, config)
    k, j, cost = _candidate_links(tracks, cells, predicted, dt, config)
    if k.size:
        link = _solve_links(n_tracks, n_cells, k, j, cost)
    divisions = _divisions(tracks, cells, predicted, link, config) if config.divisions else []
    divided = {d[0] for d in divisions}
    merges = [m for m in _merges(tracks, cells, predicted, link, config) if m[0] not in divided]
    return Assignment(link, divisions, merges)
