"""CellSAM post-processing: box-score threshold, label composition and clean-up of the label image.

Reproduces the reference (vanvalenlab/cellSAM, commit 35bc6e0) so the same weights give the same labels:

* :func:`dynamic_box_threshold` / :func:`select_boxes`: a 2-cluster KMeans over the detector's scores moves
  the user's ``bbox_threshold`` towards the gap between "cell" and "background" scores.
* :class:`LabelComposer`: masks in box order, a later mask wins where masks overlap (the reference's
  ``max(stack(masks) * arange(1, N + 1))``), fed in chunks so all masks never sit in memory at once.
* :func:`fill_holes_and_remove_small`: the cellpose-derived clean-up (small objects dropped, holes filled,
  labels made sequential), exactly in the reference's order of in-place updates.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.ndimage import binary_fill_holes, find_objects
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning

__all__ = [
    "LabelComposer",
    "dynamic_box_threshold",
    "fill_holes_and_remove_small",
    "select_boxes",
]

#: Objects with fewer pixels are removed by the reference's clean-up.
MIN_OBJECT_SIZE = 25


def dynamic_box_threshold(scores: np.ndarray, bbox_threshold: float) -> float:
    """Score threshold of the reference: ``0.66 * bbox_threshold + 0.33 * mean(KMeans(2) centres)``.

    ``KMeans(n_clusters=2, random_state=42, n_init="auto")`` is fitted on ``scores[:, None]``. The weights
    sum to 0.99, as in the reference. With one score or less, or if the fit raises, ``bbox_threshold`` is
    returned. Scores with fewer than two distinct values make sklearn warn (``ConvergenceWarning``) and
    still return centres; the reference goes on with them, so do we, without letting the warning out.

    Parameters
    ----------
    scores : np.ndarray
        ``(Q,)`` detector scores. Pass them as float32, as the detector produces them: the fit and the
        arithmetic then run in float32 like the reference's, and the result is bit-identical.
    bbox_threshold : float
        The user's threshold (reference default 0.4).

    Returns
    -------
    float
        The threshold for :func:`select_boxes` (a float32 value when ``scores`` are float32).

    Notes
    -----
    One fit on 3,500 float32 scores takes about 1-2 ms on a CPU core (the first call in a process ~25 ms).
    """
    data = np.asarray(scores).reshape(-1, 1)
    if data.shape[0] <= 1:
        return float(bbox_threshold)
    try:
        # catch_warnings is process-global state; the fit is short and the filter only mutes one category.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            centers = KMeans(n_clusters=2, random_state=42, n_init="auto").fit(data).cluster_centers_
        # Same expression and dtypes as the reference: with float32 centres numpy keeps it in float32.
        threshold = 0.66 * bbox_threshold + 0.33 * np.mean(centers)
    except Exception:  # the reference falls back on any failure of the fit
        return float(bbox_threshold)
    return float(threshold)


def select_boxes(scores: np.ndarray, boxes: np.ndarray, thr: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep the boxes whose score is strictly above ``thr``, in their original (score-sorted) order.

    As in the reference, a threshold ``<= 0`` keeps every box.

    Parameters
    ----------
    scores : np.ndarray
        ``(Q,)`` scores (float32 from the detector; the comparison then runs in float32 like the reference).
    boxes : np.ndarray
        ``(Q, 4)`` boxes, any convention (XYXY in the 1024 frame for CellFinder output).
    thr : float
        Threshold from :func:`dynamic_box_threshold`.

    Returns
    -------
    (scores, boxes) : tuple of np.ndarray
        ``(K,)`` and ``(K, 4)``, the kept rows.
    """
    scores = np.asarray(scores)
    boxes = np.asarray(boxes)
    if scores.ndim != 1 or boxes.ndim != 2 or boxes.shape[0] != scores.shape[0]:
        raise ValueError(
            f"scores (Q,) and boxes (Q, 4) must have the same Q; got {scores.shape} and {boxes.shape}"
        )
    if not thr > 0.0:
        return scores, boxes
    keep = scores > thr
    return scores[keep], boxes[keep]


class LabelComposer:
    """Build a label image from masks given in box order; a later mask wins where masks overlap.

    Label ``k`` (1-based) is the ``k``-th mask added, which equals the reference's
    ``max(stack(masks) * arange(1, N + 1)[:, None, None], axis=0)``. A mask completely covered by later
    masks leaves no pixel. Masks are added in chunks (:meth:`add`), so 1,000 masks of 1024² never have to
    be in memory together. The label image lives on ``device`` (a torch tensor): chunks of masks made on
    a GPU are composed there, and the host gets the labels once, from :meth:`labels`.

    Parameters
    ----------
    shape : tuple of int
        ``(H, W)`` of the label image.
    device : torch.device or str, optional
        Where the label image is kept and composed (default: the CPU).
    """

    def __init__(self, shape: tuple[int, int], *, device: torch.device | str | None = None) -> None:
        if len(shape) != 2 or min(shape) <= 0:
            raise ValueError(f"shape must be a positive (H, W), got {shape}")
        self._shape = (int(shape[0]), int(shape[1]))
        self._labels = torch.zeros(self._shape, dtype=torch.int32, device=device)
        self._indices: list[np.ndarray] = []
        self._count = 0

    @property
    def count(self) -> int:
        """Number of masks added so far (the largest label that can appear)."""
        return self._count

    def indices(self) -> np.ndarray:
        """int64 ``(count,)``: ``indices()[k - 1]`` is the caller's index of the mask labelled ``k``."""
        if not self._indices:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(self._indices)

    def add(self, masks: np.ndarray | torch.Tensor, indices: np.ndarray | None = None) -> None:
        """Append a chunk of masks.

        Parameters
        ----------
        masks : np.ndarray or torch.Tensor
            bool ``(n, H, W)`` (other dtypes: non-zero = inside), in box order after the previous chunk;
            a tensor on another device than the labels is copied over.
        indices : np.ndarray, optional
            ``(n,)`` caller's ids of these masks (e.g. box indices); defaults to their running positions.
        """
        n = int(masks.shape[0])
        if masks.ndim != 3 or tuple(masks.shape[1:]) != self._shape:
            raise ValueError(
                f"masks must be (n, {self._shape[0]}, {self._shape[1]}), got {tuple(masks.shape)}"
            )
        ids = self._ids(indices, n)
        if n == 0:
            return
        m = self._as_bool(masks)
        # argmax over the flipped stack finds the last True (first maximum of a 0/1 array).
        last = (n - 1) - torch.flip(m, dims=(0,)).to(torch.uint8).argmax(dim=0).to(torch.int32)
        self._labels = torch.where(m.any(dim=0), self._count + 1 + last, self._labels)
        self._indices.append(ids)
        self._count += n

    def add_regions(
        self, masks: np.ndarray | torch.Tensor, offsets: np.ndarray, indices: np.ndarray | None = None
    ) -> None:
        """Append a chunk of masks that each cover only a region of the image (windowed decoding).

        Parameters
        ----------
        masks : np.ndarray or torch.Tensor
            bool ``(n, h, w)``: mask ``i`` covers rows ``offsets[i, 0] .. + h`` and columns
            ``offsets[i, 1] .. + w`` of the image (regions must lie inside it).
        offsets : np.ndarray
            int ``(n, 2)`` ``(row, col)`` of each region.
        indices : np.ndarray, optional
            As in :meth:`add`.
        """
        m = self._as_bool(masks)
        n = int(m.shape[0])
        offs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        height, width = self._shape
        if m.ndim != 3 or offs.shape[0] != n:
            raise ValueError(
                f"masks must be (n, h, w) with one offset each, got {tuple(m.shape)}, {offs.shape}"
            )
        h, w = m.shape[1:]
        if n and (offs.min() < 0 or offs[:, 0].max() + h > height or offs[:, 1].max() + w > width):
            raise ValueError(f"mask regions of {h}x{w} at {offs.tolist()} leave the {height}x{width} image")
        ids = self._ids(indices, n)
        for j in range(n):
            y, x = offs[j]
            # Later masks win: assigning in box order overwrites earlier labels, as in ``add``.
            self._labels[y : y + h, x : x + w][m[j]] = self._count + 1 + j
        if n:
            self._indices.append(ids)
            self._count += n

    def _as_bool(self, masks: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = masks if isinstance(masks, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(masks))
        return t.to(device=self._labels.device, dtype=torch.bool)

    def _ids(self, indices: np.ndarray | None, n: int) -> np.ndarray:
        """The caller's ids of ``n`` new masks (default: their running positions)."""
        if indices is None:
            return np.arange(self._count, self._count + n, dtype=np.int64)
        ids = np.asarray(indices, dtype=np.int64).reshape(-1)
        if ids.shape[0] != n:
            raise ValueError(f"got {ids.shape[0]} indices for {n} masks; pass one per mask")
        return ids

    def labels(self) -> np.ndarray:
        """int32 ``(H, W)``: the composed label image on the host (a copy; 0 = background)."""
        return self._labels.cpu().numpy().copy()


def fill_holes_and_remove_small(
    labels: np.ndarray, min_size: int = MIN_OBJECT_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Drop small objects, fill holes and relabel 1..K, with the reference's exact in-place order.

    Bounding boxes of all labels are computed first (``scipy.ndimage.find_objects``), before anything
    changes. Then for label ``i = 1, 2, ...`` in increasing order, inside its (original) box: the
    pixels currently equal to ``i`` are counted; fewer than ``min_size`` -> set to 0; otherwise
    ``binary_fill_holes`` (cross connectivity, holes relative to the box) and every pixel of the filled
    mask gets the next sequential label, overwriting pixels of other labels that lie in the hole. A label
    that has lost all its pixels to earlier fills is dropped. ``min_size <= 0`` disables the size filter.

    Parameters
    ----------
    labels : np.ndarray
        ``(H, W)`` non-negative integer label image; not modified.
    min_size : int
        Minimum number of pixels of a kept object (reference: 25).

    Returns
    -------
    labels : np.ndarray
        uint32 ``(H, W)``, labels in 1..K. A label can be missing from it: a later object's filled hole
        may cover all pixels of an earlier, already relabelled object.
    kept : np.ndarray
        int64 ``(K,)``: ``kept[k - 1]`` is the input label that became label ``k``.
    """
    arr = np.asarray(labels)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be a 2-D integer array, got {arr.dtype} {arr.shape}")
    if arr.size and arr.min() < 0:
        raise ValueError("labels must be non-negative (0 = background)")
    work = arr.astype(np.int64, copy=True)
    slices = find_objects(work)
    kept: list[int] = []
    for i, window_slice in enumerate(slices):
        if window_slice is None:
            continue
        window = work[window_slice]  # a view: writes land in `work`
        mask = window == i + 1
        npix = int(mask.sum())
        if min_size > 0 and npix < min_size:
            window[mask] = 0
        elif npix > 0:
            window[binary_fill_holes(mask)] = len(kept) + 1
            kept.append(i + 1)
    return work.astype(np.uint32), np.asarray(kept, dtype=np.int64)
