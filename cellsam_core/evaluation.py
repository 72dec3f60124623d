"""Instance-segmentation metrics of the field: one-to-one matching by IoU, precision / recall / F1.

A predicted object and a ground-truth object match when their IoU is at least the threshold; matching is
one-to-one, chosen by the Hungarian algorithm to maximise the summed IoU over pairs above the threshold
(for thresholds >= 0.5 a pair above the threshold is the only candidate of both objects, so this equals
greedy matching). At each threshold: ``TP`` = matched pairs, ``FP`` = unmatched predictions, ``FN`` =
unmatched ground-truth objects, ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``,
``F1 = 2 TP / (2 TP + FP + FN)``; an image with no objects in either label image scores 1 everywhere.

Aggregates over images sum ``TP/FP/FN`` first (micro average), as is usual for cell segmentation
benchmarks. "Averaged over IoU 0.5-0.9" means the mean of the metric at the nine thresholds
0.50, 0.55, ..., 0.90.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = [
    "IOU_THRESHOLDS",
    "Counts",
    "EvaluationResult",
    "Matching",
    "evaluate",
    "evaluate_image",
    "iou_matrix",
    "match_instances",
]

IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(9))
"""The IoU thresholds 0.50, 0.55, ..., 0.90 over which metrics are averaged."""


def _check_labels(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"label images differ in shape: ground truth {gt.shape}, prediction {pred.shape}")
    for name, arr in (("ground truth", gt), ("prediction", pred)):
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} labels must be an integer array, got {arr.dtype}")
        if arr.size and arr.min() < 0:
            raise ValueError(f"{name} labels must be >= 0 (0 = background)")
    return gt, pred


def iou_matrix(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every (ground-truth, predicted) object pair.

    Parameters
    ----------
    gt, pred : np.ndarray
        Integer label images of the same shape (any dimensionality); 0 is background.

    Returns
    -------
    iou : np.ndarray
        ``float64 (G, P)``.
    gt_ids, pred_ids : np.ndarray
        ``(G,)`` and ``(P,)`` the label values of the rows and columns.
    """
    gt, pred = _check_labels(gt, pred)
    gt_ids, g_inv = np.unique(gt, return_inverse=True)
    pred_ids, p_inv = np.unique(pred, return_inverse=True)
    n_g, n_p = gt_ids.size, pred_ids.size
    inter = np.bincount(g_inv.ravel() * n_p + p_inv.ravel(), minlength=n_g * n_p).reshape(n_g, n_p)
    # Drop the background row / column (label 0) where present.
    g_keep = gt_ids != 0
    p_keep = pred_ids != 0
    area_g = inter.sum(axis=1)[g_keep]
    area_p = inter.sum(axis=0)[p_keep]
    inter = inter[np.ix_(g_keep, p_keep)].astype(np.float64)
    union = area_g[:, None] + area_p[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return iou, gt_ids[g_keep], pred_ids[p_keep]


@dataclass(frozen=True)
class Matching:
    """One-to-one matched pairs at a threshold: ``gt_ids[k]`` matches ``pred_ids[k]`` with ``ious[k]``."""

    gt_ids: np.ndarray
    pred_ids: np.ndarray
    ious: np.ndarray
    n_gt: int
    n_pred: int


def _match(iou: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    if iou.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    weight = np.where(iou >= threshold, iou, 0.0)
    rows, cols = linear_sum_assignment(weight, maximize=True)
    ok = iou[rows, cols] >= threshold
    return rows[ok], cols[ok]


def match_instances(gt: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> Matching:
    """Match ground-truth and predicted objects one-to-one at ``iou_threshold`` (see module docstring)."""
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    iou, gt_ids, pred_ids = iou_matrix(gt, pred)
    rows, cols = _match(iou, iou_threshold)
    return Matching(gt_ids[rows], pred_ids[cols], iou[rows, cols], int(gt_ids.size), int(pred_ids.size))


@dataclass(frozen=True)
class Counts:
    """True positives, false positives and false negatives, and the metrics they give."""

    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        denom = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denom if denom else 1.0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)


def evaluate_image(
    gt: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = IOU_THRESHOLDS
) -> dict[float, Counts]:
    """Counts at each IoU threshold for one pair of label images."""
    iou, gt_ids, pred_ids = iou_matrix(gt, pred)
    out = {}
    for t in thresholds:
        if not 0.0 < t <= 1.0:
            raise ValueError(f"IoU thresholds must be in (0, 1], got {t}")
        tp = int(_match(iou, t)[0].size)
        out[float(t)] = Counts(tp=tp, fp=int(pred_ids.size) - tp, fn=int(gt_ids.size) - tp)
    return out


@dataclass(frozen=True)
class EvaluationResult:
    """Per-image and aggregate (micro-averaged) counts at each threshold."""

    thresholds: tuple[float, ...]
    per_image: tuple[dict[float, Counts], ...]

    def total(self, threshold: float) -> Counts:
        """Counts summed over the images at one threshold."""
        return sum((c[threshold] for c in self.per_image), Counts(0, 0, 0))

    def f1(self, threshold: float = 0.5) -> float:
        return self.total(threshold).f1

    def precision(self, threshold: float = 0.5) -> float:
        return self.total(threshold).precision

    def recall(self, threshold: float = 0.5) -> float:
        return self.total(threshold).recall

    def mean_f1(self) -> float:
        """Aggregate F1 averaged over :attr:`thresholds`."""
        return float(np.mean([self.f1(t) for t in self.thresholds]))

    def table(self) -> str:
        """A plain-text table: one row per threshold plus the average."""
        lines = [f"{'IoU':>6} {'TP':>6} {'FP':>6} {'FN':>6} {'prec':>7} {'recall':>7} {'F1':>7}"]
        for t in self.thresholds:
            c = self.total(t)
            counts = f"{c.tp:>6d} {c.fp:>6d} {c.fn:>6d}"
            lines.append(f"{t:>6.2f} {counts} {c.precision:>7.3f} {c.recall:>7.3f} {c.f1:>7.3f}")
        mean_p = float(np.mean([self.precision(t) for t in self.thresholds]))
        mean_r = float(np.mean([self.recall(t) for t in self.thresholds]))
        lines.append(
            f"{'mean':>6} {'':>6} {'':>6} {'':>6} {mean_p:>7.3f} {mean_r:>7.3f} {self.mean_f1():>7.3f}"
        )
        return "\n".join(lines)


def evaluate(
    gts: Sequence[np.ndarray], preds: Sequence[np.ndarray], thresholds: Sequence[float] = IOU_THRESHOLDS
) -> EvaluationResult:
    """Evaluate pairs of label images (ground truth, prediction), in order."""
    if len(gts) != len(preds):
        raise ValueError(f"{len(gts)} ground-truth images but {len(preds)} predictions; pass them in pairs")
    ts = tuple(float(t) for t in thresholds)
    return EvaluationResult(
        thresholds=ts, per_image=tuple(evaluate_image(g, p, ts) for g, p in zip(gts, preds, strict=True))
    )
