"""Instance metrics against hand-computed cases."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from cellsam_core.evaluation import (
    IOU_THRESHOLDS,
    Counts,
    evaluate,
    evaluate_image,
    iou_matrix,
    match_instances,
)
from tests.label_util import rect_labels

_labels = rect_labels


@dataclass(frozen=True)
class Case:
    name: str
    gt: np.ndarray
    pred: np.ndarray
    tp: int
    fp: int
    fn: int


# 4x4 square (16 px); shifted by one column: intersection 12, union 20, IoU 0.6.
SQUARE = (1, 0, 4, 0, 4)
CASES = [
    Case("identical", _labels(SQUARE), _labels(SQUARE), 1, 0, 0),
    Case("both empty", _labels(), _labels(), 0, 0, 0),
    Case("nothing predicted", _labels(SQUARE), _labels(), 0, 0, 1),
    Case("only false positives", _labels(), _labels(SQUARE, (2, 6, 8, 6, 8)), 0, 2, 0),
    Case("shift: IoU 0.6 matches", _labels(SQUARE), _labels((5, 0, 4, 1, 5)), 1, 0, 0),
    # 4x4 vs 4x2 inside it: IoU 8 / 16 = 0.5 exactly, which matches (>= threshold).
    Case("IoU exactly 0.5", _labels(SQUARE), _labels((3, 0, 4, 0, 2)), 1, 0, 0),
    # 4x4 vs 3x4 region shifted down 2 rows: inter 8, union 20, IoU 0.4.
    Case("IoU 0.4 no match", _labels(SQUARE), _labels((1, 2, 5, 0, 4)), 0, 1, 1),
    # One prediction covering two GT objects: at most one match (one-to-one).
    Case(
        "merge counts once",
        _labels((1, 0, 4, 0, 4), (2, 0, 4, 4, 6)),
        _labels((1, 0, 4, 0, 6)),
        1,
        0,
        1,
    ),
    # Two predictions splitting one GT object in halves: each IoU 0.5 -> only one matches.
    Case("split counts once", _labels(SQUARE), _labels((1, 0, 4, 0, 2), (2, 0, 4, 2, 4)), 1, 1, 0),
    Case("label values need not agree", _labels((7, 0, 4, 0, 4)), _labels((42, 0, 4, 0, 4)), 1, 0, 0),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_counts_at_iou_half(case: Case) -> None:
    counts = evaluate_image(case.gt, case.pred, thresholds=(0.5,))[0.5]
    assert (counts.tp, counts.fp, counts.fn) == (case.tp, case.fp, case.fn)


def test_iou_matrix_values() -> None:
    gt = _labels((1, 0, 4, 0, 4), (3, 6, 8, 6, 8))
    pred = _labels((5, 0, 4, 1, 5))
    iou, gt_ids, pred_ids = iou_matrix(gt, pred)
    assert gt_ids.tolist() == [1, 3] and pred_ids.tolist() == [5]
    np.testing.assert_allclose(iou, [[12 / 20], [0.0]])


def test_match_pairs_and_threshold_sweep() -> None:
    gt = _labels(SQUARE)
    pred = _labels((5, 0, 4, 1, 5))  # IoU 0.6
    m = match_instances(gt, pred, 0.5)
    assert m.gt_ids.tolist() == [1] and m.pred_ids.tolist() == [5]
    np.testing.assert_allclose(m.ious, [0.6])
    per_t = evaluate_image(gt, pred)
    # Matches at 0.50, 0.55, 0.60; not from 0.65 on.
    assert [per_t[t].tp for t in IOU_THRESHOLDS] == [1, 1, 1, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize(
    ("counts", "precision", "recall", "f1"),
    [
        (Counts(3, 1, 2), 0.75, 0.6, 6 / 9),
        (Counts(0, 0, 0), 1.0, 1.0, 1.0),
        (Counts(0, 2, 0), 0.0, 1.0, 0.0),
        (Counts(0, 0, 4), 1.0, 0.0, 0.0),
    ],
)
def test_metric_formulas(counts: Counts, precision: float, recall: float, f1: float) -> None:
    assert counts.precision == pytest.approx(precision)
    assert counts.recall == pytest.approx(recall)
    assert counts.f1 == pytest.approx(f1)


def test_aggregate_is_micro_average_and_mean_over_thresholds() -> None:
    gt1, pred1 = _labels(SQUARE), _labels(SQUARE)  # TP 1
    gt2, pred2 = _labels(SQUARE, (2, 6, 9, 6, 9)), _labels((9, 6, 9, 6, 9))  # TP 1, FN 1
    result = evaluate([gt1, gt2], [pred1, pred2])
    total = result.total(0.5)
    assert (total.tp, total.fp, total.fn) == (2, 0, 1)
    assert result.f1(0.5) == pytest.approx(4 / 5)
    # Exact matches hold at every threshold, so the mean equals the value at 0.5.
    assert result.mean_f1() == pytest.approx(4 / 5)
    assert "mean" in result.table()


@pytest.mark.parametrize(
    ("gt", "pred", "match"),
    [
        (np.zeros((4, 4), np.int32), np.zeros((5, 4), np.int32), "shape"),
        (np.zeros((4, 4), np.float32), np.zeros((4, 4), np.int32), "integer"),
        (-np.ones((4, 4), np.int32), np.zeros((4, 4), np.int32), ">= 0"),
    ],
)
def test_bad_inputs(gt: np.ndarray, pred: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        evaluate_image(gt, pred)
