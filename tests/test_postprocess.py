"""Known-answer tests of cellsam_core.postprocess (reference semantics, sections 3.5 and 3.7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.draw import disk
from sklearn.cluster import KMeans

from cellsam_core.postprocess import (
    LabelComposer,
    dynamic_box_threshold,
    fill_holes_and_remove_small,
    select_boxes,
)


def _bimodal_scores() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.concatenate([rng.beta(1, 30, 3300), rng.beta(30, 3, 200)]).astype(np.float32)


def test_dynamic_threshold_bimodal_matches_formula() -> None:
    scores = _bimodal_scores()
    centers = KMeans(n_clusters=2, random_state=42, n_init="auto").fit(scores[:, None]).cluster_centers_
    expected = 0.66 * 0.4 + 0.33 * float(np.mean(centers))
    thr = dynamic_box_threshold(scores, 0.4)
    assert thr == pytest.approx(expected, rel=1e-6)
    # Centres near 0.03 and 0.9 -> between the modes, above the 0.264 floor.
    assert 0.264 < thr < 0.5


def test_dynamic_threshold_degenerate_scores_keep_kmeans_result_without_warning() -> None:
    # All-equal scores make sklearn warn (one distinct cluster); the warning must not escape (the suite
    # runs with warnings as errors) and the result is KMeans' (both centres = 0.3), not the fallback.
    scores = np.full(3500, 0.3, dtype=np.float32)
    thr = dynamic_box_threshold(scores, 0.4)
    assert thr == pytest.approx(0.66 * 0.4 + 0.33 * 0.3, rel=1e-6)
    assert thr != pytest.approx(0.4)


@pytest.mark.parametrize("scores", [np.zeros(0, np.float32), np.array([0.9], np.float32)])
def test_dynamic_threshold_falls_back_with_too_few_scores(scores: np.ndarray) -> None:
    assert dynamic_box_threshold(scores, 0.4) == 0.4


def test_dynamic_threshold_falls_back_on_error() -> None:
    assert dynamic_box_threshold(np.array([np.nan, 0.5, 0.7], np.float32), 0.35) == 0.35


def test_select_boxes_strict_and_order_preserving() -> None:
    scores = np.array([0.9, 0.5, 0.5000001, 0.3, 0.7], dtype=np.float32)
    boxes = np.arange(20, dtype=np.float32).reshape(5, 4)
    kept_scores, kept_boxes = select_boxes(scores, boxes, 0.5)
    np.testing.assert_array_equal(kept_scores, scores[[0, 2, 4]])
    np.testing.assert_array_equal(kept_boxes, boxes[[0, 2, 4]])
    # A threshold <= 0 keeps everything (reference filters only when thr > 0).
    assert select_boxes(scores, boxes, 0.0)[1].shape == (5, 4)
    with pytest.raises(ValueError):
        select_boxes(scores, boxes[:3], 0.5)


def _random_masks(n: int, shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, *shape), dtype=bool)
    for k in range(n):
        rr, cc = disk(tuple(rng.integers(0, shape[0], 2)), int(rng.integers(3, 12)), shape=shape)
        masks[k, rr, cc] = True
    return masks


def test_compose_later_mask_wins() -> None:
    masks = np.zeros((3, 6, 6), dtype=bool)
    masks[0, 0:4, 0:4] = True
    masks[1, 2:6, 2:6] = True
    masks[2, 0:2, 0:2] = True  # fully covers mask 0's corner
    composer = LabelComposer((6, 6))
    composer.add(masks)
    labels = composer.labels()
    assert labels[0, 0] == 3
    assert labels[3, 3] == 2  # overlap of 1 and 2 -> later (2)
    assert labels[0, 3] == 1
    assert labels[5, 0] == 0
    expected = np.max(masks * np.arange(1, 4)[:, None, None], axis=0)
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize("as_torch", [False, True])
def test_compose_incremental_chunks_equal_one_shot(as_torch: bool) -> None:
    masks = _random_masks(50, (48, 40), seed=1)
    expected = np.max(masks * np.arange(1, 51)[:, None, None], axis=0)
    composer = LabelComposer((48, 40))
    box_ids = np.arange(100, 150)
    for start, stop in [(0, 7), (7, 7), (7, 30), (30, 50)]:
        chunk = torch.from_numpy(masks[start:stop]) if as_torch else masks[start:stop]
        composer.add(chunk, indices=box_ids[start:stop])
    np.testing.assert_array_equal(composer.labels(), expected)
    assert composer.count == 50
    np.testing.assert_array_equal(composer.indices(), box_ids)


def test_compose_rejects_wrong_shapes() -> None:
    composer = LabelComposer((4, 4))
    with pytest.raises(ValueError):
        composer.add(np.zeros((2, 4, 5), dtype=bool))
    with pytest.raises(ValueError):
        composer.add(np.zeros((2, 4, 4), dtype=bool), indices=np.arange(3))


def test_fill_holes_overwrites_other_label_inside_hole() -> None:
    labels = np.zeros((12, 12), dtype=np.int64)
    labels[1:11, 1:11] = 1
    labels[4:8, 4:8] = 2  # label 2 sits in label 1's hole
    out, kept = fill_holes_and_remove_small(labels, min_size=5)
    # Label 1 is processed first: its filled mask covers label 2, which then has no pixels left.
    np.testing.assert_array_equal(out[1:11, 1:11], 1)
    np.testing.assert_array_equal(kept, [1])
    assert out.dtype == np.uint32
    assert labels[5, 5] == 2  # input untouched


def test_fill_holes_can_leave_a_relabelled_object_absent() -> None:
    # Label 1 sits in the hole of label 2: 1 is relabelled first (kept, new id 1), then 2's filled mask
    # covers it. Ids 1..K are not all present afterwards; callers index by the labels they find.
    labels = np.zeros((12, 12), dtype=np.int64)
    labels[1:11, 1:11] = 2
    labels[3:9, 3:9] = 0
    labels[4:8, 4:8] = 1
    out, kept = fill_holes_and_remove_small(labels, min_size=5)
    np.testing.assert_array_equal(kept, [1, 2])
    np.testing.assert_array_equal(np.unique(out), [0, 2])
    np.testing.assert_array_equal(out[1:11, 1:11], 2)


def test_fill_holes_fills_background_hole() -> None:
    labels = np.zeros((9, 9), dtype=np.int32)
    labels[1:8, 1:8] = 4
    labels[3:6, 3:6] = 0
    out, kept = fill_holes_and_remove_small(labels, min_size=5)
    np.testing.assert_array_equal(out[1:8, 1:8], 1)
    np.testing.assert_array_equal(kept, [4])


def test_remove_small_and_sequential_relabel_order() -> None:
    labels = np.zeros((20, 20), dtype=np.int64)
    labels[0:2, 0:2] = 1  # 4 px -> removed
    labels[5:11, 0:6] = 3  # 36 px
    labels[12:20, 12:20] = 7  # 64 px
    labels[0:5, 10:15] = 5  # 25 px -> kept (not < 25)
    out, kept = fill_holes_and_remove_small(labels, min_size=25)
    np.testing.assert_array_equal(kept, [3, 5, 7])
    assert out[6, 2] == 1 and out[2, 12] == 2 and out[15, 15] == 3
    assert out[0, 0] == 0
    assert set(np.unique(out)) == {0, 1, 2, 3}


def test_fill_holes_empty_and_disabled_size_filter() -> None:
    out, kept = fill_holes_and_remove_small(np.zeros((5, 5), dtype=np.int64))
    assert out.sum() == 0 and kept.size == 0
    labels = np.zeros((5, 5), dtype=np.int64)
    labels[0, 0] = 2
    out, kept = fill_holes_and_remove_small(labels, min_size=0)
    assert out[0, 0] == 1
    np.testing.assert_array_equal(kept, [2])
    with pytest.raises(ValueError):
        fill_holes_and_remove_small(np.zeros((2, 2, 2), dtype=np.int64))


def test_fill_holes_npix_counted_after_earlier_overwrites() -> None:
    # Label 3 lies partly in label 2's hole: after 2 is filled, 3 keeps only 20 px < 25 -> removed.
    labels = np.zeros((30, 30), dtype=np.int64)
    labels[0:12, 0:12] = 2
    labels[2:10, 2:10] = 0
    labels[2:10, 2:10] = 3  # 64 px inside the hole
    labels[10:12, 12:22] = 3  # 20 px outside
    out, kept = fill_holes_and_remove_small(labels, min_size=25)
    np.testing.assert_array_equal(kept, [2])
    assert out[5, 5] == 1
    assert out[11, 15] == 0
