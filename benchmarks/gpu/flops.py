"""Matrix-product FLOPs of one CellSAM frame, counted from the architecture (2 FLOPs per multiply-add).

What is counted: every Linear, convolution, attention product (``q·kᵀ``, ``attn·v``) and
relative-position einsum; not normalisations, activations, softmax or resizing (a few per cent at most).
``tests/test_gpu_script.py`` checks the counts against ``torch.utils.flop_counter`` on the real modules.

    python benchmarks/gpu/flops.py            # cellsam_vit_b at 1024², 200 boxes, and the physical floor
"""

from __future__ import annotations

import argparse
import math
from typing import Any

#: bf16 dense matrix rate measured on an H200 of this workplace (8192³ product, random data).
H200_BF16_FLOPS = 790e12


def vit_flops(cfg: Any, *, neck: bool) -> dict[str, float]:
    """One pass of SAM's ViT image encoder (``neck=False``: CellFinder's backbone) on one image."""
    g = cfg.image_size // cfg.patch_size
    dim, heads = cfg.vit_embed_dim, cfg.vit_num_heads
    d = dim // heads
    hidden = int(dim * cfg.vit_mlp_ratio)
    n = g * g
    out: dict[str, float] = {"patch_embed": 2.0 * n * (3 * cfg.patch_size**2) * dim}
    linear = attention = 0.0
    for i in range(cfg.vit_depth):
        if i in cfg.vit_global_attn_indexes:
            side, windows = g, 1
        else:
            side = cfg.vit_window_size
            windows = math.ceil(g / side) ** 2  # windows are padded to whole windows
        tokens = windows * side * side  # qkv and proj run on the padded tokens
        linear += 2.0 * tokens * dim * 3 * dim + 2.0 * tokens * dim * dim + 2.0 * 2 * n * dim * hidden
        per_window = side * side
        attention += windows * heads * (2.0 * 2 * per_window * per_window * d)  # q·kᵀ and attn·v
        attention += windows * heads * (2.0 * 2 * per_window * side * d)  # rel-pos einsums (h and w)
    out["blocks_linear"] = linear
    out["blocks_attention"] = attention
    if neck:
        c = cfg.prompt_embed_dim
        out["neck"] = 2.0 * n * dim * c + 2.0 * n * 9 * c * c
    return out


def cellfinder_transformer_flops(cfg: Any) -> dict[str, float]:
    """CellFinder's input projection, AnchorDETR encoder and decoder (RCDA) and heads, one image."""
    g = cfg.image_size // cfg.patch_size
    e, f = cfg.cellfinder_d_model, cfg.cellfinder_dim_feedforward
    q = cfg.cellfinder_num_query_position * cfg.cellfinder_num_query_pattern
    hw = g * g

    def rcda(n_q: int) -> float:
        proj = 2.0 * 2 * n_q * e * e + 2.0 * 2 * g * e * e + 2.0 * hw * e * e + 2.0 * n_q * e * e
        weights = 2.0 * n_q * (g + g) * e
        contract = 2.0 * n_q * g * g * e + 2.0 * n_q * g * e
        return proj + weights + contract

    ffn = 4.0 * e * f
    encoder = cfg.cellfinder_enc_layers * (rcda(hw) + hw * ffn)
    self_attn = 2.0 * q * e * 3 * e + 2.0 * 2 * q * q * e + 2.0 * q * e * e
    decoder = cfg.cellfinder_dec_layers * (self_attn + rcda(q) + q * ffn)
    positions = 2.0 * 2 * (g + g) * e * e + 3 * 2.0 * 2 * q * e * e
    heads = 2.0 * q * e * cfg.cellfinder_num_classes + 2.0 * q * (2 * e * e + 4 * e)
    return {
        "input_proj": 2.0 * hw * cfg.vit_embed_dim * e,
        "encoder": encoder,
        "decoder": decoder,
        "positions_and_heads": positions + heads,
    }


def mask_decoder_flops(cfg: Any, *, single_mask: bool = True) -> dict[str, float]:
    """SAM's mask decoder for one box prompt (``single_mask``: only what ``multimask_output=False`` keeps).

    SAM's own ``predict_masks`` computes all mask tokens' hypernetworks and masks and then drops all but
    one; the batched path computes the kept one only.
    """
    g = cfg.grid_size
    e, m = cfg.prompt_embed_dim, cfg.decoder_mlp_dim
    i = e // 2  # cross attentions work at half width
    n = g * g
    mask_tokens = cfg.num_multimask_outputs + 1
    t = 1 + mask_tokens + 2  # IoU token, mask tokens, two box corners

    def cross_token_to_image() -> float:
        return 2.0 * t * e * i + 2.0 * 2 * n * e * i + 2.0 * 2 * t * n * i + 2.0 * t * i * e

    def cross_image_to_token() -> float:
        return 2.0 * n * e * i + 2.0 * 2 * t * e * i + 2.0 * 2 * n * t * i + 2.0 * n * i * e

    self_attn = 2.0 * 3 * t * e * e + 2.0 * 2 * t * t * e + 2.0 * t * e * e
    layer = self_attn + cross_token_to_image() + 2.0 * 2 * t * e * m + cross_image_to_token()
    transformer = cfg.decoder_depth * layer + cross_token_to_image()
    upscaling = 2.0 * (2 * g) ** 2 * (e // 4) * e + 2.0 * (4 * g) ** 2 * (e // 8) * (e // 4)
    masks_out = 1 if single_mask else mask_tokens
    hyper = masks_out * 2.0 * (2 * e * e + e * (e // 8))
    product = 2.0 * masks_out * (e // 8) * (4 * g) ** 2
    h = cfg.decoder_iou_head_hidden_dim
    iou_head = 2.0 * (e * h + h * h + h * mask_tokens)
    return {"transformer": transformer, "upscaling": upscaling, "hyper_and_masks": hyper + product + iou_head}


def frame_flops(cfg: Any, boxes: int) -> dict[str, float]:
    """FLOPs of one frame: two ViT passes, CellFinder's transformer and ``boxes`` mask decodes."""
    sam = sum(vit_flops(cfg, neck=True).values())
    finder_backbone = sum(vit_flops(cfg, neck=False).values())
    finder_head = sum(cellfinder_transformer_flops(cfg).values())
    per_box = sum(mask_decoder_flops(cfg).values())
    total = sam + finder_backbone + finder_head + boxes * per_box
    return {
        "sam_image_encoder": sam,
        "cellfinder_backbone": finder_backbone,
        "cellfinder_transformer": finder_head,
        "mask_decoder_per_box": per_box,
        "boxes": float(boxes),
        "mask_decoder": boxes * per_box,
        "total": total,
    }


def floor_frames_per_s(cfg: Any, boxes: int, rate: float = H200_BF16_FLOPS) -> float:
    """Frames/s if every FLOP ran at ``rate`` (the arithmetic floor; memory traffic not counted)."""
    return rate / frame_flops(cfg, boxes)["total"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="cellsam_vit_b")
    parser.add_argument("--boxes", type=int, default=200)
    args = parser.parse_args()
    from cellsam_core.registry import MODEL_CONFIGS

    cfg = MODEL_CONFIGS[args.model]
    counts = frame_flops(cfg, args.boxes)
    for name, value in counts.items():
        print(f"{name:>24}: {value / 1e9:10.1f} GFLOP" if name != "boxes" else f"{name:>24}: {value:10.0f}")
    print(f"{'floor at 790 TFLOP/s':>24}: {floor_frames_per_s(cfg, args.boxes):10.1f} frames/s")


if __name__ == "__main__":
    main()
