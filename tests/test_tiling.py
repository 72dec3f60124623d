"""Tests of cellsam_core.tiling: geometry, periodic extraction and the reference's IoU merge."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk
from skimage.measure import label as connected_label

from cellsam_core.tiling import (
    TilePlan,
    extract_tiles,
    merge_tiles,
    merge_values,
    needs_tiling,
    plan_tiles,
)


def test_plan_for_1000x1300() -> None:
    plan = plan_tiles((1000, 1300))
    assert plan.row_chunks == (400, 400, 200)
    assert plan.col_chunks == (400, 400, 400, 100)
    assert plan.grid == (3, 4) and plan.n_tiles == 12
    assert plan.tile_shape((2, 3)) == (312, 212)
    assert plan.core_bounds((1, 2)) == (400, 800, 800, 1200)
    assert plan.indices()[:5] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (400, (400,)),
        (456, (400, 56)),  # last chunk == overlap: unchanged
        (420, (364, 56)),  # too short: borrows from the chunk before
        (30, (30,)),  # shorter than the overlap: one chunk, wrapped
        (800, (400, 400)),
    ],
)
def test_plan_fixes_short_last_chunk_like_dask(size: int, expected: tuple[int, ...]) -> None:
    assert plan_tiles((size, 400)).row_chunks == expected


def test_plan_fixes_short_last_chunk_by_merging_when_it_cannot_borrow() -> None:
    # block 100, overlap 80: last chunk 20 cannot borrow 60 from 100 (it would drop below 80) -> merged.
    assert plan_tiles((220, 100), block_size=100, overlap=80, iou_depth=80).row_chunks == (100, 120)


def test_plan_chunks_agree_with_dask_when_available() -> None:
    overlap_mod = pytest.importorskip("dask.array.overlap")
    for size in range(56, 1700, 13):
        regular = tuple([400] * (size // 400) + ([size % 400] if size % 400 else []))
        assert plan_tiles((size, 64)).row_chunks == overlap_mod.ensure_minimum_chunksize(56, regular)


@pytest.mark.parametrize(
    "kwargs",
    [{"iou_depth": 60}, {"iou_depth": 0}, {"overlap": 500}, {"iou_threshold": 0.0}, {"block_size": 0}],
)
def test_plan_rejects_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        plan_tiles((500, 500), **kwargs)  # type: ignore[arg-type]


def test_needs_tiling() -> None:
    assert not needs_tiling((2048, 2048), 2048)
    assert needs_tiling((2049, 100), 2048)
    assert needs_tiling((100, 5000))


@pytest.mark.parametrize("channels", [None, 2])
def test_extract_tiles_is_periodic(channels: int | None) -> None:
    rng = np.random.default_rng(0)
    shape = (1000, 1300) if channels is None else (1000, 1300, channels)
    image = rng.random(shape)
    plan = plan_tiles((1000, 1300))
    pad = ((56, 56), (56, 56)) + (((0, 0),) if channels else ())
    padded = np.pad(image, pad, mode="wrap")
    tiles = extract_tiles(image, plan)
    assert len(tiles) == 12
    for index, tile in zip(plan.indices(), tiles, strict=True):
        y0, y1, x0, x1 = plan.core_bounds(index)
        assert tile.shape[:2] == plan.tile_shape(index)
        np.testing.assert_array_equal(tile, padded[y0 : y1 + 112, x0 : x1 + 112])


def test_extract_tiles_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        extract_tiles(np.zeros((10, 10)), plan_tiles((20, 20)))


def _two_tile_plan() -> TilePlan:
    return plan_tiles((100, 200), block_size=100, overlap=20, iou_depth=20)


def _tiles_from_mask(mask: np.ndarray, plan: TilePlan) -> list[np.ndarray]:
    """'Segment' each tile by connected components of a binary image (tile-local labels 1..n)."""
    return [connected_label(t).astype(np.int32) for t in extract_tiles(mask, plan)]


def test_merge_joins_cell_across_seam_and_keeps_others_distinct() -> None:
    plan = _two_tile_plan()
    assert plan.grid == (1, 2)
    mask = np.zeros((100, 200), dtype=bool)
    mask[40:60, 85:115] = True  # spans the seam at x = 100
    mask[10:20, 10:20] = True  # left tile only
    mask[70:80, 160:170] = True  # right tile only
    merged = merge_tiles(_tiles_from_mask(mask, plan), plan)
    assert merged.dtype == np.uint32 and merged.shape == (100, 200)
    assert len(np.unique(merged[40:60, 85:115])) == 1  # ONE label across the seam
    ids = {int(merged[50, 90]), int(merged[15, 15]), int(merged[75, 165])}
    assert len(ids) == 3 and 0 not in ids
    np.testing.assert_array_equal(merged > 0, mask)


def test_merge_does_not_join_distinct_cells_meeting_at_seam() -> None:
    plan = _two_tile_plan()
    left = np.zeros((140, 140), dtype=np.int32)
    right = np.zeros((140, 140), dtype=np.int32)
    # Tile pixel (r, c) is image (r - 20, c - 20) on the left and (r - 20, c + 80) on the right; the
    # strip both tiles see is image x 80..120.
    left[60:80, 100:120] = 1  # image y 40..60, x 80..100: in the strip
    right[60:80, 30:50] = 1  # image x 110..130: partly in the strip, but not overlapping the left one
    merged = merge_tiles([left, right], plan)
    assert merged[50, 90] != merged[50, 125]
    assert merged[50, 90] > 0 and merged[50, 125] > 0


def test_merge_offsets_follow_reference_running_total() -> None:
    plan = _two_tile_plan()
    left = np.zeros((140, 140), dtype=np.int32)
    right = np.zeros((140, 140), dtype=np.int32)
    left[30:40, 30:40] = 2  # image (10..20, 10..20); n_left = 2 -> offset 2 -> value 4
    right[30:40, 80:90] = 3  # image (10..20, 160..170); n_right = 3 -> offset 2*2 + 3 = 7 -> value 10
    merged = merge_tiles([left, right], plan)
    # Component ids over 0..2*(2+3)=10 in scipy order: unconnected values keep their index.
    assert merged[15, 15] == 4
    assert merged[15, 165] == 10
    sequential = merge_tiles([left, right], plan, sequential=True)
    assert sequential[15, 15] == 1 and sequential[15, 165] == 2


def test_merge_single_tile_trims_overlap() -> None:
    plan = plan_tiles((50, 60))
    tile = np.zeros(plan.tile_shape((0, 0)), dtype=np.int32)
    tile[56:66, 56:66] = 1
    merged = merge_tiles([tile], plan)
    assert merged.shape == (50, 60)
    assert merged[0, 0] == 2  # reference offsets a single tile's labels by its maximum too


def test_merge_rejects_wrong_tiles() -> None:
    plan = _two_tile_plan()
    with pytest.raises(ValueError):
        merge_tiles([np.zeros((140, 140), np.int32)], plan)
    with pytest.raises(ValueError):
        merge_tiles([np.zeros((140, 140), np.int32), np.zeros((10, 10), np.int32)], plan)


def _disk_image(shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.zeros(shape, dtype=np.float32)
    placed = 0
    while placed < 60:
        center = rng.integers(15, np.array(shape) - 15)
        radius = int(rng.integers(6, 14))
        rr, cc = disk(tuple(center), radius + 3, shape=shape)
        if image[rr, cc].any():  # keep a gap so thresholding separates the disks
            continue
        rr, cc = disk(tuple(center), radius, shape=shape)
        image[rr, cc] = rng.uniform(0.5, 1.0)
        placed += 1
    return image


def test_round_trip_equals_whole_image_segmentation() -> None:
    image = _disk_image((500, 620), seed=3)
    plan = plan_tiles(image.shape, block_size=200, overlap=40, iou_depth=40)
    tiles = [connected_label(t > 0.25).astype(np.int32) for t in extract_tiles(image, plan)]
    merged = merge_tiles(tiles, plan)
    whole = connected_label(image > 0.25)
    merged_ids = np.unique(merged[merged > 0])
    assert merged_ids.size == whole.max()
    for obj in range(1, whole.max() + 1):
        region = whole == obj
        ids, counts = np.unique(merged[region], return_counts=True)
        best = ids[np.argmax(counts)]
        assert best != 0
        other = merged == best
        iou = np.logical_and(region, other).sum() / np.logical_or(region, other).sum()
        assert iou > 0.98


def test_merge_values_stitches_cores() -> None:
    plan = plan_tiles((100, 200), block_size=100, overlap=20, iou_depth=20)
    maps = [np.full((140, 140), 0.25, np.float32), np.full((140, 140), 0.75, np.float32)]
    out = merge_values(maps, plan)
    assert out.dtype == np.float32 and out.shape == (100, 200)
    np.testing.assert_array_equal(out[:, :100], 0.25)
    np.testing.assert_array_equal(out[:, 100:], 0.75)
    with pytest.raises(ValueError):
        merge_values(maps[:1], plan)
