"""encode / decode / segment: the split is exact, batching changes nothing, semantics follow the reference."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from cellsam_core.cells import CellTable
from cellsam_core.checkpoint import load_bundled_model
from cellsam_core.errors import ImageFormatError
from cellsam_core.inference import (
    DecodeOptions,
    EncodeOptions,
    ImageEmbedding,
    Segmentation,
    _cells_of_input,
    decode,
    encode,
    encode_batch,
    segment,
)
from cellsam_core.modeling.cellfinder import postprocess_detections
from cellsam_core.modeling.cellsam import CellSAM
from cellsam_core.postprocess import dynamic_box_threshold, fill_holes_and_remove_small
from cellsam_core.registry import build_model
from cellsam_core.synthetic import synthetic_frame
from tests.conftest import make_smoke_model


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return synthetic_frame((200, 240), seed=3, modality="nuclear", n_cells=25)[0]


def _reference_loop(image: np.ndarray, model) -> np.ndarray:
    """The reference's per-box loop, written out with the segment-anything modules themselves."""
    emb = encode(image, model)
    sam = model.sam
    size = model.image_size
    h, w = image.shape[:2]
    with torch.inference_mode():
        logits, boxes = model.cellfinder.decode_head.detect(emb.finder)
        scores, xyxy = postprocess_detections(logits, boxes, size)
        s, b = scores[0].numpy(), xyxy[0].numpy()
        b = b[s > dynamic_box_threshold(s, 0.4)]
        masks = []
        for box in b:
            sparse, dense = sam.prompt_encoder(
                points=None, boxes=torch.as_tensor(box)[None, None], masks=None
            )
            low, iou = sam.mask_decoder(
                image_embeddings=emb.sam,
                image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            if iou.item() < 0.5:
                continue
            up = sam.postprocess_masks(low, (size, size), (h, w))
            masks.append((torch.sigmoid(up) > 0.4)[0, 0].numpy().astype(np.int64))
    if not masks:
        return np.zeros((h, w), np.uint32)
    stacked = np.stack(masks) * np.arange(1, len(masks) + 1)[:, None, None]
    labels, _ = fill_holes_and_remove_small(stacked.max(0), min_size=25)
    return labels


def test_segment_is_decode_of_encode(image, smoke_model):
    direct = segment(image, smoke_model)
    split = decode(encode(image, smoke_model), smoke_model)
    np.testing.assert_array_equal(direct.labels, split.labels)
    assert direct.cells.equals(split.cells)
    assert direct.labels.dtype == np.uint32 and direct.labels.shape == image.shape
    assert direct.n_cells >= 1


def test_same_labels_as_the_reference_per_box_loop(image, smoke_model):
    ours = segment(image, smoke_model).labels
    reference = _reference_loop(image, smoke_model)
    # Batched decoding and logit-space thresholding differ from the loop only by float rounding.
    assert (ours == reference).mean() > 0.999
    assert ours.max() == reference.max()


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_box_batch_size_does_not_change_labels(image, smoke_model, chunk):
    emb = encode(image, smoke_model)
    base = decode(emb, smoke_model, DecodeOptions(box_batch_size=1000))
    other = decode(emb, smoke_model, DecodeOptions(box_batch_size=chunk))
    assert (base.labels == other.labels).mean() > 0.999
    assert base.n_cells == other.n_cells


def test_encode_batch_matches_single_encodes(smoke_model):
    frames = [synthetic_frame((128, 160), seed=s, n_cells=10)[0] for s in range(3)]
    batched = encode_batch(frames, smoke_model, max_batch=2)
    for frame, emb in zip(frames, batched, strict=True):
        single = encode(frame, smoke_model)
        torch.testing.assert_close(emb.sam, single.sam, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(emb.finder, single.finder, atol=1e-4, rtol=1e-4)
        assert emb.frame_size == frame.shape[:2]


def test_embedding_is_a_cheap_plain_value(image, smoke_model):
    emb = encode(image, smoke_model)
    assert isinstance(emb, ImageEmbedding)
    assert emb.sam.shape == (1, 64, 16, 16) and emb.finder.shape == (1, 64, 16, 16)
    assert emb.nbytes == 2 * 64 * 16 * 16 * 4
    clone = pickle.loads(pickle.dumps(emb.to("cpu")))
    np.testing.assert_array_equal(decode(clone, smoke_model).labels, decode(emb, smoke_model).labels)


def test_official_size_embedding_is_documented_size():
    # 256 x 64 x 64 float32 per encoder: 4 MiB each, 8 MiB per frame crossing to the decoder.
    emb = ImageEmbedding(
        sam=torch.zeros(1, 256, 64, 64),
        finder=torch.zeros(1, 256, 64, 64),
        tile_sizes=((1024, 1024),),
        frame_size=(1024, 1024),
        input_size=1024,
    )
    assert emb.nbytes == 8 * 1024 * 1024


def test_multichannel_and_channel_first_inputs(smoke_model):
    two = synthetic_frame((128, 128), seed=1, modality="multiplexed", n_cells=8)[0]
    assert two.ndim == 3
    a = segment(two, smoke_model).labels
    b = segment(np.moveaxis(two, -1, 0), smoke_model).labels
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.zeros((64, 64, 4), np.uint16), "channel"),
        (np.full((64, 64), np.nan, np.float32), "finite"),
    ],
)
def test_bad_images_are_refused(bad, match, smoke_model):
    with pytest.raises(ImageFormatError, match=match):
        segment(bad, smoke_model)


@pytest.mark.parametrize("blank", [False, True])
def test_no_detection_gives_empty_labels_not_a_crash(blank):
    # A fresh AnchorDETR init scores every query ~0.01: no box passes (the reference crashes here).
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    frame = np.zeros((96, 80), np.uint16) if blank else synthetic_frame((96, 80), seed=0, n_cells=5)[0]
    result = segment(frame, model)
    assert result.labels.shape == (96, 80) and result.labels.dtype == np.uint32
    assert result.n_cells == 0 and int(result.labels.max()) == 0
    assert result.cells.prompt_box.shape == (0, 4) and result.cells.score.shape == (0,)


def test_tiled_path_covers_the_frame_and_equals_split(smoke_model):
    frame = synthetic_frame((700, 520), seed=5, n_cells=60)[0]
    opts = EncodeOptions(tile=True)
    emb = encode(frame, smoke_model, opts)
    assert emb.plan is not None and emb.sam.shape[0] == emb.plan.n_tiles > 1
    tiled = decode(emb, smoke_model)
    assert tiled.labels.shape == frame.shape
    np.testing.assert_array_equal(segment(frame, smoke_model, encode_options=opts).labels, tiled.labels)
    assert tiled.cells.equals(CellTable.from_labels(tiled.labels, **_prompts(tiled)))


def test_auto_tiling_threshold(smoke_model):
    small = encode(np.ones((300, 300), np.uint16), smoke_model)
    assert small.plan is None
    big = encode(np.ones((600, 300), np.uint16), smoke_model, EncodeOptions(tile_threshold=2.0))
    assert big.plan is not None  # 600 > 2 x 256


def test_decode_refuses_an_embedding_of_another_model_size(image, smoke_model):
    emb = encode(image, smoke_model)
    wrong = ImageEmbedding(emb.sam, emb.finder, emb.tile_sizes, emb.frame_size, input_size=1024)
    with pytest.raises(ImageFormatError, match="same model"):
        decode(wrong, smoke_model)


def test_adv_mode_off_uses_the_first_sam_copy(image):
    model = make_smoke_model(seed=1)
    model.adv_mode = False
    assert model.sam is model.model
    result = segment(image, model)
    assert result.labels.shape == image.shape


def _prompts(seg: Segmentation) -> dict[str, np.ndarray]:
    return {"prompt_boxes": seg.cells.prompt_box, "scores": seg.cells.score}


def _overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two ``(y0, x0, y1, x1)`` boxes (max exclusive) share area."""
    return bool(a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])


def test_cell_table_matches_labels(image, smoke_model):
    result = segment(image, smoke_model)
    assert result.n_cells == len(result.cells) >= 1
    for row, label in enumerate(result.cells.label):
        mask = result.labels == label
        assert result.cells.area[row] == mask.sum()
        ys, xs = np.nonzero(mask)
        np.testing.assert_allclose(result.cells.centroid[row], (ys.mean(), xs.mean()))
        np.testing.assert_array_equal(
            result.cells.bbox[row], (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
        )
    assert set(np.unique(result.labels[result.labels > 0])) == set(result.cells.label)


def test_single_input_prompt_boxes_follow_the_labels_present():
    # Composed masks: 1 = a blob inside the hole of ring 2, 3 = a separate square, 4 = too small.
    composed = np.zeros((40, 60), dtype=np.int32)
    composed[2:20, 2:20] = 2
    composed[5:17, 5:17] = 0
    composed[8:14, 8:14] = 1
    composed[25:35, 40:55] = 3
    composed[0:2, 50:52] = 4
    # XYXY in a 100-pixel model input; the frame is 40 x 60, so y scales by 0.4 and x by 0.6.
    boxes = np.array([[10, 20, 30, 40], [0, 0, 50, 50], [60, 50, 100, 100], [80, 0, 90, 5]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    labels, cells = _cells_of_input(composed, boxes, scores, input_size=100, min_size=5)
    # Label 1 (the blob, relabelled first) is covered when ring 2 fills its hole: labels 2 and 3 remain.
    np.testing.assert_array_equal(cells.label, [2, 3])
    np.testing.assert_allclose(cells.score, [0.8, 0.7], rtol=1e-6)
    np.testing.assert_allclose(cells.prompt_box, [[0, 0, 20, 30], [20, 36, 40, 60]])
    assert cells.equals(
        CellTable.from_labels(labels, **{"prompt_boxes": cells.prompt_box, "scores": cells.score})
    )


@pytest.fixture(scope="module")
def nano() -> CellSAM:
    return load_bundled_model()


def test_segment_table_is_measured_on_its_labels(nano):
    frame = synthetic_frame((256, 256), seed=21, modality="nuclear", n_cells=30)[0]
    seg = segment(frame, nano)
    assert seg.n_cells >= 10
    measured = CellTable.from_labels(seg.labels).columns()
    got = seg.cells.columns()
    for name in ("label", "area", "centroid_y", "centroid_x", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1"):
        np.testing.assert_array_equal(got[name], measured[name], err_msg=name)
    assert np.isfinite(seg.cells.prompt_box).all()
    assert ((seg.cells.score > 0) & (seg.cells.score <= 1)).all()
    split = decode(encode(frame, nano), nano)
    np.testing.assert_array_equal(seg.labels, split.labels)
    assert seg.cells.equals(split.cells)


def test_tiled_prompt_box_and_score_come_from_one_detection(nano):
    frame = synthetic_frame((384, 448), seed=22, modality="nuclear", n_cells=60)[0]
    opts = EncodeOptions(tile=True, block_size=200)
    emb = encode(frame, nano, opts)
    assert emb.plan is not None and emb.plan.n_tiles == 6
    seg = decode(emb, nano)
    cells = seg.cells
    assert seg.n_cells >= 20
    assert np.isfinite(cells.prompt_box).all()
    assert ((cells.score > 0) & (cells.score <= 1)).all()
    for row in range(len(cells)):
        assert _overlaps(cells.prompt_box[row], cells.bbox[row]), (cells.label[row], cells.prompt_box[row])
    split = segment(frame, nano, encode_options=opts)
    np.testing.assert_array_equal(split.labels, seg.labels)
    assert split.cells.equals(cells)
