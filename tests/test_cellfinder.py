"""Known-answer tests of CellFinder: RCDA, position embeddings, the detection head and PostProcess."""

from __future__ import annotations

import math

import pytest
import torch

from cellsam_core.modeling.anchor_detr import (
    AnchorDETRTransformer,
    inverse_sigmoid,
    mask2pos,
    pos2posemb1d,
    pos2posemb2d,
)
from cellsam_core.modeling.cellfinder import postprocess_detections
from cellsam_core.modeling.rcda import MultiheadRCDA
from cellsam_core.registry import MODEL_CONFIGS, build_model


def naive_rcda(attn: MultiheadRCDA, q_row, q_col, k_row, k_col, value) -> torch.Tensor:
    """RCDA written as the paper's formula, one (batch, query, head) at a time."""
    e, heads = attn.embed_dim, attn.num_heads
    hd = e // heads
    w, b = attn.in_proj_weight, attn.in_proj_bias

    def proj(x, i):
        return x @ w[i * e : (i + 1) * e].T + b[i * e : (i + 1) * e]

    bsz, n_q, _ = q_row.shape
    _, height, width, _ = value.shape
    out = torch.zeros(bsz, n_q, e, dtype=torch.float64)
    for bi in range(bsz):
        kr = proj(k_row[bi], 2).mean(dim=0)  # reference: project, then mean over H -> (W, E)
        kc = proj(k_col[bi], 3).mean(dim=1)  # (H, E)
        v = proj(value[bi], 4)  # (H, W, E)
        for qi in range(n_q):
            qr = proj(q_row[bi, qi], 0) * hd**-0.5
            qc = proj(q_col[bi, qi], 1) * hd**-0.5
            for h in range(heads):
                sl = slice(h * hd, (h + 1) * hd)
                a_row = torch.softmax(torch.stack([qr[sl] @ kr[x, sl] for x in range(width)]), 0)
                a_col = torch.softmax(torch.stack([qc[sl] @ kc[y, sl] for y in range(height)]), 0)
                acc = torch.zeros(hd, dtype=torch.float64)
                for y in range(height):
                    for x in range(width):
                        acc += a_col[y] * a_row[x] * v[y, x, sl]
                out[bi, qi, sl] = acc
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


@pytest.mark.parametrize(("height", "width"), [(3, 5), (5, 3), (4, 4)], ids=["H<W", "H>W", "H=W"])
def test_rcda_matches_per_query_formula(height: int, width: int) -> None:
    torch.manual_seed(0)
    attn = MultiheadRCDA(8, 2).double()
    # Non-zero biases, so that the bias path is checked too.
    torch.nn.init.normal_(attn.in_proj_bias)
    torch.nn.init.normal_(attn.out_proj.bias)
    bsz, n_q = 2, 5
    q_row, q_col = torch.randn(2, bsz, n_q, 8, dtype=torch.float64)
    k_row, k_col, value = torch.randn(3, bsz, height, width, 8, dtype=torch.float64)

    with torch.no_grad():
        got = attn(q_row, q_col, k_row, k_col, value)
        expected = naive_rcda(attn, q_row, q_col, k_row, k_col, value)

    assert got.shape == (bsz, n_q, 8)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_rcda_rejects_indivisible_heads() -> None:
    with pytest.raises(ValueError, match="divisible"):
        MultiheadRCDA(10, 3)


def test_pos2posemb1d_values() -> None:
    n = 8
    pos = torch.tensor([0.0, 0.25, 0.7])
    emb = pos2posemb1d(pos, n)
    assert emb.shape == (3, n)
    for pi, p in enumerate(pos.tolist()):
        for i in range(n):
            angle = 2 * math.pi * p / 10000 ** (2 * (i // 2) / n)
            expected = math.sin(angle) if i % 2 == 0 else math.cos(angle)
            assert emb[pi, i].item() == pytest.approx(expected, abs=1e-6)


def test_pos2posemb2d_is_y_then_x() -> None:
    pts = torch.tensor([[0.1, 0.8], [0.6, 0.3]])  # (x, y)
    emb = pos2posemb2d(pts, 4)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[:, :4], pos2posemb1d(pts[:, 1], 4))
    torch.testing.assert_close(emb[:, 4:], pos2posemb1d(pts[:, 0], 4))


def test_mask2pos_pixel_centres_of_valid_region() -> None:
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[1, 2:, :] = True  # second image: only 2 valid rows
    mask[1, :, 4:] = True  # and 4 valid columns
    y, x = mask2pos(mask)
    torch.testing.assert_close(y[0], torch.tensor([0.5, 1.5, 2.5, 3.5]) / 4)
    torch.testing.assert_close(x[0], torch.tensor([0.5, 1.5, 2.5, 3.5, 4.5]) / 5)
    torch.testing.assert_close(y[1], torch.tensor([0.5, 1.5, 1.5, 1.5]) / 2)
    torch.testing.assert_close(x[1], torch.tensor([0.5, 1.5, 2.5, 3.5, 3.5]) / 4)


def test_inverse_sigmoid_clamps() -> None:
    got = inverse_sigmoid(torch.tensor([-0.5, 0.0, 0.5, 0.9, 1.0, 2.0]))
    expected = torch.tensor(
        [math.log(1e-5), math.log(1e-5), 0.0, math.log(9.0), -math.log(1e-5), -math.log(1e-5)]
    )
    torch.testing.assert_close(got, expected)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model("tiny")


def test_detect_shapes_and_split(tiny_model) -> None:
    head = tiny_model.cellfinder.decode_head
    cfg = MODEL_CONFIGS["tiny"]
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        memory = head.encode(x)
        logits, boxes = head.detect(memory)
        logits_f, boxes_f = tiny_model.cellfinder(x)
        logits_0, boxes_0 = head(x[:1])
    grid = cfg.image_size // cfg.patch_size
    assert memory.shape == (2, cfg.cellfinder_d_model, grid, grid)
    assert logits.shape == (2, cfg.cellfinder_num_query_position, cfg.cellfinder_num_classes)
    assert boxes.shape == (2, cfg.cellfinder_num_query_position, 4)
    assert logits.dtype == boxes.dtype == torch.float32
    assert bool(((boxes >= 0) & (boxes <= 1)).all())
    torch.testing.assert_close(logits_f, logits)
    torch.testing.assert_close(boxes_f, boxes)
    # Images in a batch do not interact.
    torch.testing.assert_close(logits_0, logits[:1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(boxes_0, boxes[:1], rtol=1e-5, atol=1e-5)


def test_initial_boxes_sit_on_anchors_pattern_major() -> None:
    # AnchorDETR initialises the box head's last layer to zero (bias -2 for w, h): every query then
    # predicts its anchor as centre and sigmoid(-2) as size, which pins down the query order.
    torch.manual_seed(1)
    tr = AnchorDETRTransformer(
        d_model=32,
        nhead=2,
        num_encoder_layers=1,
        num_decoder_layers=2,
        dim_feedforward=64,
        num_query_position=7,
        num_query_pattern=3,
        num_classes=2,
    ).eval()
    with torch.no_grad():
        logits, boxes = tr(torch.randn(2, 32, 4, 6))
    anchors = tr.position.weight.detach()
    assert logits.shape == (2, 21, 2)
    expected_centres = anchors.repeat(3, 1).expand(2, -1, -1)
    torch.testing.assert_close(boxes[..., :2], expected_centres, rtol=0, atol=1e-6)
    torch.testing.assert_close(boxes[..., 2:], torch.full((2, 21, 2), 1 / (1 + math.exp(2))))
    # The class head is shared by every layer, as in the official checkpoint.
    assert tr.class_embed[0] is tr.class_embed[1]
    assert tr.bbox_embed[0] is tr.bbox_embed[1]


def test_postprocess_hand_computed_with_a_query_giving_two_boxes() -> None:
    logits = torch.tensor(
        [
            [[2.0, -1.0], [0.5, 3.0], [-2.0, -3.0]],
            [[-5.0, -4.0], [-3.0, -6.0], [1.0, 0.0]],
        ]
    )
    boxes = torch.tensor(
        [
            [[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.4, 0.4], [0.3, 0.3, 0.1, 0.1]],
            [[0.5, 0.5, 1.0, 1.0], [0.2, 0.2, 0.2, 0.2], [0.75, 0.25, 0.5, 0.5]],
        ]
    )
    scores, xyxy = postprocess_detections(logits, boxes, (100, 200))  # (H, W)

    sig = torch.sigmoid
    # Image 0: pairs ranked q1c1 (3.0), q0c0 (2.0), q1c0 (0.5): query 1 gives two boxes.
    # Image 1: q2c0 (1.0), q2c1 (0.0), q1c0 (-3.0).
    expected_scores = torch.stack([sig(torch.tensor([3.0, 2.0, 0.5])), sig(torch.tensor([1.0, 0.0, -3.0]))])
    q1 = [-20.0, 70.0, 60.0, 110.0]  # (0.1±0.2)*200, (0.9±0.2)*100: not clipped to the image
    q0 = [80.0, 30.0, 120.0, 70.0]
    b2 = [100.0, 0.0, 200.0, 50.0]
    b1 = [20.0, 10.0, 60.0, 30.0]
    expected_boxes = torch.tensor([[q1, q0, q1], [b2, b2, b1]])
    torch.testing.assert_close(scores, expected_scores)
    torch.testing.assert_close(xyxy, expected_boxes)


def test_postprocess_square_int_size() -> None:
    logits = torch.tensor([[[0.0], [1.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.25, 0.5, 0.5, 1.0]]])
    scores, xyxy = postprocess_detections(logits, boxes, 8)
    torch.testing.assert_close(scores, torch.sigmoid(torch.tensor([[1.0, 0.0]])))
    torch.testing.assert_close(xyxy, torch.tensor([[[0.0, 0.0, 4.0, 8.0], [2.0, 2.0, 6.0, 6.0]]]))
