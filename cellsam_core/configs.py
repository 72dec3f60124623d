"""Model sizes as frozen pydantic values: :class:`ModelConfig` (CellSAM), :class:`NanoConfig` (cellsam-nano).

A leaf module: it imports nothing from :mod:`cellsam_core`, so the modules (:mod:`cellsam_core.modeling`),
the builders (:mod:`cellsam_core.registry`) and weight loading (:mod:`cellsam_core.checkpoint`) can all
depend on it without depending on each other.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["NANO_STRIDE", "ModelConfig", "NanoConfig"]

NANO_STRIDE = 4
"""Pixels per embedding cell of cellsam-nano (SAM's mask decoder upsamples 4×: full-resolution masks)."""


def _sam_decoder_problems(prompt_embed_dim: int, decoder_num_heads: int, mask_in_chans: int) -> list[str]:
    """Size constraints of SAM's prompt encoder and mask decoder, shared by every architecture."""
    problems = []
    if prompt_embed_dim % 8:
        problems.append("prompt_embed_dim must be a multiple of 8 (SAM's mask upscaling)")
    # SAM's cross-attentions work at half width.
    if (prompt_embed_dim // 2) % decoder_num_heads:
        problems.append("decoder_num_heads must divide prompt_embed_dim / 2")
    if mask_in_chans % 4:
        problems.append("mask_in_chans must be a multiple of 4")
    return problems


class ModelConfig(BaseModel):
    """Sizes of every part of CellSAM. The three ViTs (two SAM encoders, CellFinder's backbone) share them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_size: int = Field(default=1024, gt=0, description="Side S of the square model input, in pixels.")
    patch_size: int = Field(default=16, gt=0, description="ViT patch side; the token grid is S / patch_size.")
    vit_embed_dim: int = Field(default=768, gt=0, description="ViT width (768 for ViT-B).")
    vit_depth: int = Field(default=12, gt=0, description="Number of ViT blocks.")
    vit_num_heads: int = Field(default=12, gt=0, description="Attention heads per ViT block.")
    vit_mlp_ratio: float = Field(
        default=4.0, gt=0, description="ViT MLP hidden width as a multiple of the width."
    )
    vit_window_size: int = Field(
        default=14, gt=0, description="Window side (tokens) of windowed-attention blocks."
    )
    vit_global_attn_indexes: tuple[int, ...] = Field(
        default=(2, 5, 8, 11), description="Indexes of the ViT blocks with global attention."
    )
    prompt_embed_dim: int = Field(
        default=256,
        gt=0,
        description="SAM embedding width: neck output, prompt tokens and mask decoder width.",
    )
    mask_in_chans: int = Field(
        default=16, gt=0, description="Hidden channels of SAM's mask-prompt downscaler."
    )
    decoder_depth: int = Field(
        default=2, gt=0, description="Layers of SAM's two-way mask-decoder transformer."
    )
    decoder_num_heads: int = Field(
        default=8, gt=0, description="Attention heads of SAM's mask-decoder transformer."
    )
    decoder_mlp_dim: int = Field(
        default=2048, gt=0, description="MLP hidden width of SAM's mask-decoder transformer."
    )
    decoder_iou_head_hidden_dim: int = Field(default=256, gt=0, description="Hidden width of SAM's IoU head.")
    num_multimask_outputs: int = Field(
        default=3, gt=0, description="SAM multimask outputs (mask tokens = this + 1)."
    )
    cellfinder_d_model: int = Field(
        default=256, gt=0, description="CellFinder transformer width (multiple of 32, for the GroupNorm)."
    )
    cellfinder_nheads: int = Field(
        default=8, gt=0, description="Attention heads of every CellFinder attention."
    )
    cellfinder_dim_feedforward: int = Field(default=1024, gt=0, description="CellFinder FFN hidden width.")
    cellfinder_enc_layers: int = Field(default=6, gt=0, description="CellFinder transformer encoder layers.")
    cellfinder_dec_layers: int = Field(default=6, gt=0, description="CellFinder transformer decoder layers.")
    cellfinder_num_query_position: int = Field(
        default=3500, gt=0, description="Learned anchor points (queries)."
    )
    cellfinder_num_query_pattern: int = Field(default=1, gt=0, description="Query patterns per anchor point.")
    cellfinder_num_classes: int = Field(
        default=2, gt=0, description="Class logits per query (sigmoid scores)."
    )
    tile_merge: Literal["centre", "reference"] = Field(
        default="reference",
        description="Default merge of tiled frames (cellsam_core.tiling): the reference's IoU merge, so "
        "the labels of the official models stay equal to the reference implementation's.",
    )
    min_box_score: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Default floor under the dynamic box-score threshold (DecodeOptions.min_box_score); "
        "0: the reference's dynamic threshold alone.",
    )

    @model_validator(mode="after")
    def _check_divisibility(self) -> ModelConfig:
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.vit_embed_dim % self.vit_num_heads:
            problems.append(f"vit_embed_dim {self.vit_embed_dim} is not divisible by vit_num_heads")
        if any(not 0 <= i < self.vit_depth for i in self.vit_global_attn_indexes):
            problems.append(
                f"vit_global_attn_indexes {self.vit_global_attn_indexes} not all in [0, vit_depth)"
            )
        problems += _sam_decoder_problems(self.prompt_embed_dim, self.decoder_num_heads, self.mask_in_chans)
        if self.cellfinder_d_model % 32:
            problems.append("cellfinder_d_model must be a multiple of 32 (GroupNorm with 32 groups)")
        if self.cellfinder_d_model % self.cellfinder_nheads:
            problems.append("cellfinder_nheads must divide cellfinder_d_model")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def grid_size(self) -> int:
        """Side of the ViT token grid, ``image_size // patch_size``."""
        return self.image_size // self.patch_size


#: Box-score floor of cellsam-nano, calibrated on held-out synthetic frames (docs/models.md).
MIN_BOX_SCORE_NANO = 0.45


class NanoConfig(BaseModel):
    """Sizes of cellsam-nano: a conv trunk shared by SAM's encoder role and a dense box detector.

    See :mod:`cellsam_core.modeling.nano` and ``docs/models.md`` for the design.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_size: int = Field(
        default=256, gt=0, description="Side S of the square model input (a multiple of 32)."
    )
    trunk_widths: tuple[int, int, int, int, int] = Field(
        default=(16, 32, 64, 96, 128), description="Trunk channels at strides 2, 4, 8, 16 and 32."
    )
    trunk_dim: int = Field(
        default=64, gt=0, description="Channels of the stride-4 trunk output and of the detector heads."
    )
    prompt_embed_dim: int = Field(
        default=32, gt=0, description="SAM embedding width (neck output, prompt tokens, mask decoder)."
    )
    mask_in_chans: int = Field(
        default=8, gt=0, description="Hidden channels of SAM's mask-prompt downscaler."
    )
    decoder_depth: int = Field(default=2, gt=0, description="Layers of SAM's two-way transformer.")
    decoder_num_heads: int = Field(
        default=2, gt=0, description="Attention heads of SAM's two-way transformer."
    )
    decoder_mlp_dim: int = Field(default=128, gt=0, description="MLP width of SAM's two-way transformer.")
    decoder_iou_head_hidden_dim: int = Field(default=64, gt=0, description="Hidden width of SAM's IoU head.")
    num_multimask_outputs: int = Field(
        default=1, gt=0, description="SAM multimask outputs (inference uses the single-mask token only)."
    )
    decode_window: int | None = Field(
        default=32,
        ge=1,
        description="Default window (tokens per side) each box's mask is decoded over "
        "(cellsam_core.windows); 32 tokens = the 128-pixel crops of the training recipe. None: whole "
        "embedding.",
    )
    tile_merge: Literal["centre", "reference"] = Field(
        default="centre",
        description="Default merge of tiled frames (cellsam_core.tiling): each cell whole from the tile "
        "whose core holds its centre; the reference's IoU merge cuts cells the tiles disagree on at seams.",
    )
    min_box_score: float = Field(
        default=MIN_BOX_SCORE_NANO,
        ge=0,
        le=1,
        description="Default floor under the dynamic box-score threshold, calibrated on held-out frames "
        "with and without cells (docs/models.md): the dynamic threshold alone drops towards 0.3 on a frame "
        "without cells and lets the odd illumination bump through.",
    )

    @model_validator(mode="after")
    def _check_sizes(self) -> NanoConfig:
        problems = []
        if self.image_size % 32:
            problems.append(f"image_size {self.image_size} must be a multiple of 32 (trunk stride)")
        problems += _sam_decoder_problems(self.prompt_embed_dim, self.decoder_num_heads, self.mask_in_chans)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def grid_size(self) -> int:
        """Side of the stride-4 embedding grid, ``image_size // 4``."""
        return self.image_size // NANO_STRIDE
