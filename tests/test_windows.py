"""Windowed SAM mask decoding (`cellsam_core.windows`): the same computation as SAM on each window."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything.modeling import Sam

from cellsam_core.checkpoint import load_bundled_model
from cellsam_core.inference import DecodeOptions, decode, decode_window, encode
from cellsam_core.modeling.cellsam import CellSAM
from cellsam_core.postprocess import LabelComposer
from cellsam_core.synthetic import synthetic_frame
from cellsam_core.testing import smoke_model
from cellsam_core.windows import Windows, decode_windows, plan_windows, window_masks_to_frame


@pytest.fixture(scope="module")
def nano() -> CellSAM:
    return load_bundled_model()


def _prompts(sam: Sam, boxes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    sparse, dense = sam.prompt_encoder(points=None, boxes=torch.as_tensor(boxes)[:, None, :], masks=None)
    return sparse, dense


def test_plan_windows_centres_clamps_and_grows() -> None:
    boxes = np.array(
        [
            [100.0, 100.0, 120.0, 110.0],  # small, mid-image
            [0.0, 0.0, 10.0, 10.0],  # top-left corner
            [246.0, 250.0, 256.0, 256.0],  # bottom-right corner
        ],
        dtype=np.float32,
    )
    plan = plan_windows(boxes, window=16, grid=64, input_size=256)
    assert plan.side == 16
    # centre (110, 105) px = token (27.5, 26.25) -> origin (row 26.25 - 8, col 27.5 - 8) rounded
    assert plan.origins.tolist() == [[18, 20], [0, 0], [48, 48]]
    sizes = {"window": 16, "grid": 64, "input_size": 256}
    big = plan_windows(np.array([[0.0, 0.0, 100.0, 60.0]], dtype=np.float32), **sizes)
    assert big.side == 56  # 25 tokens wide -> twice that, rounded up to a multiple of 8
    huge = plan_windows(np.array([[0.0, 0.0, 250.0, 250.0]], dtype=np.float32), **sizes)
    assert huge.side == 64


def test_decode_windows_equals_sam_on_each_cropped_window(nano: CellSAM) -> None:
    sam = nano.sam
    frame = synthetic_frame((256, 256), seed=3, modality="nuclear", n_cells=20)[0]
    emb = encode(frame, nano).sam[:1]
    boxes = np.array([[30, 40, 60, 70], [200, 10, 230, 30], [120, 120, 150, 160]], dtype=np.float32)
    plan = plan_windows(boxes, window=24, grid=64, input_size=256)
    with torch.inference_mode():
        sparse, dense = _prompts(sam, boxes)
        pe = sam.prompt_encoder.get_dense_pe()
        masks, iou = decode_windows(sam.mask_decoder, emb, pe, sparse, dense[:1], plan)
        for i, (r, c) in enumerate(plan.origins):
            window = (slice(None), slice(None), slice(r, r + plan.side), slice(c, c + plan.side))
            ref_masks, ref_iou = sam.mask_decoder(
                image_embeddings=emb[window],
                image_pe=pe[window],
                sparse_prompt_embeddings=sparse[i : i + 1],
                dense_prompt_embeddings=dense[i : i + 1][window],
                multimask_output=False,
            )
            torch.testing.assert_close(masks[i : i + 1], ref_masks, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(iou[i : i + 1], ref_iou, rtol=1e-4, atol=1e-5)
    assert masks.shape == (3, 1, 4 * plan.side, 4 * plan.side)


def test_whole_grid_window_equals_sam_and_postprocess(nano: CellSAM) -> None:
    sam = nano.sam
    frame = synthetic_frame((256, 256), seed=4, modality="whole_cell", n_cells=20)[0]
    emb = encode(frame, nano).sam[:1]
    boxes = np.array([[30, 40, 60, 70], [120, 120, 150, 160]], dtype=np.float32)
    whole = Windows(origins=np.zeros((2, 2), dtype=np.int64), side=64)
    with torch.inference_mode():
        sparse, dense = _prompts(sam, boxes)
        pe = sam.prompt_encoder.get_dense_pe()
        masks, iou = decode_windows(sam.mask_decoder, emb, pe, sparse, dense[:1], whole)
        ref_masks, ref_iou = sam.mask_decoder(
            image_embeddings=emb,
            image_pe=pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        torch.testing.assert_close(masks, ref_masks, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(iou, ref_iou, rtol=1e-4, atol=1e-5)
        for out_size in [(256, 256), (512, 512), (300, 421), (200, 130)]:
            region, offsets = window_masks_to_frame(
                masks, whole, grid=64, low_res_size=256, input_size=256, out_size=out_size
            )
            ref = sam.postprocess_masks(ref_masks, (256, 256), out_size)[:, 0]
            assert offsets.tolist() == [[0, 0], [0, 0]]
            torch.testing.assert_close(region, ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    ("low_res_size", "input_size", "out_size"),
    [(256, 256, (512, 512)), (256, 256, (300, 421)), (256, 1024, (1024, 1024)), (256, 1024, (700, 1300))],
)
def test_window_region_equals_full_resize_inside_the_window(
    low_res_size: int, input_size: int, out_size: tuple[int, int]
) -> None:
    """Inside a window, its region of the output equals the same region of the full path's resize."""
    grid = 64
    per_token = low_res_size // grid
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(1, 1, low_res_size, low_res_size, generator=gen)
    plan = Windows(origins=np.array([[10, 20], [40, 3], [0, 48]]), side=16)
    crops = torch.cat(
        [
            full[:, :, r * per_token : (r + 16) * per_token, c * per_token : (c + 16) * per_token]
            for r, c in plan.origins
        ]
    )
    region, offsets = window_masks_to_frame(
        crops, plan, grid=grid, low_res_size=low_res_size, input_size=input_size, out_size=out_size
    )
    up = torch.nn.functional.interpolate(full, (input_size, input_size), mode="bilinear", align_corners=False)
    ref = torch.nn.functional.interpolate(up, out_size, mode="bilinear", align_corners=False)[0, 0]
    h, w = region.shape[1:]
    margin = 2 * max(1, round(max(out_size) / input_size * input_size / low_res_size))
    for i, (y, x) in enumerate(offsets):
        inner = (slice(margin, h - margin), slice(margin, w - margin))
        expected = ref[y : y + h, x : x + w][inner]
        torch.testing.assert_close(region[i][inner], expected, rtol=1e-4, atol=1e-4)


def test_add_regions_equals_add_of_full_frame_masks() -> None:
    rng = np.random.default_rng(0)
    shape = (40, 50)
    masks = rng.random((6, 12, 15)) > 0.5
    offsets = np.array([[0, 0], [28, 35], [10, 10], [5, 30], [20, 0], [14, 20]])
    full = np.zeros((6, *shape), dtype=bool)
    for m, (y, x), f in zip(masks, offsets, full, strict=True):
        f[y : y + 12, x : x + 15] = m
    a, b = LabelComposer(shape), LabelComposer(shape)
    a.add_regions(masks[:4], offsets[:4], np.arange(4) * 10)
    a.add_regions(masks[4:], offsets[4:], np.arange(4, 6) * 10)
    b.add(full[:4], np.arange(4) * 10)
    b.add(full[4:], np.arange(4, 6) * 10)
    np.testing.assert_array_equal(a.labels(), b.labels())
    np.testing.assert_array_equal(a.indices(), b.indices())
    with pytest.raises(ValueError, match="leave"):
        a.add_regions(masks[:1], np.array([[35, 0]]))


def test_decode_window_defaults_per_model(nano: CellSAM) -> None:
    assert decode_window(nano, DecodeOptions()) == 32
    assert decode_window(nano, DecodeOptions(window="full")) is None
    assert decode_window(nano, DecodeOptions(window=16)) == 16
    assert decode_window(smoke_model(), DecodeOptions()) is None  # official family: the reference's path


def test_windowed_decode_matches_full_when_window_covers_grid_and_agrees_when_smaller(nano: CellSAM) -> None:
    frame = synthetic_frame((512, 512), seed=7, modality="nuclear", n_cells=40)[0]
    emb = encode(frame, nano)
    full = decode(emb, nano, DecodeOptions(window="full"))
    whole = decode(emb, nano, DecodeOptions(window=64))
    np.testing.assert_array_equal(whole.labels, full.labels)
    windowed = decode(emb, nano)  # the model's 32-token window
    assert windowed.n_cells > 20
    # Same boxes, masks from a smaller context: nearly the same foreground.
    fg_full, fg_win = full.labels > 0, windowed.labels > 0
    assert (fg_full & fg_win).sum() / (fg_full | fg_win).sum() > 0.9
