"""CellFinder's backbone: a SAM ViT image encoder without its neck.

The official checkpoint stores, under ``cellfinder.decode_head.backbone.body``, a third ViT (besides the two
SAM copies) with ``pos_embed``, ``patch_embed`` and ``blocks`` only; CellFinder projects its 768-channel
(ViT-B) output with its own 1×1 convolution instead of SAM's neck. The building blocks are
segment-anything's, so the arithmetic is exactly SAM's.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from segment_anything.modeling.image_encoder import Block, PatchEmbed
from torch import nn

__all__ = ["ViTBackbone"]


class ViTBackbone(nn.Module):
    """SAM ViT (absolute + decomposed relative position embeddings, windowed attention), no neck.

    Parameters
    ----------
    img_size : int
        Side ``S`` of the square input; the token grid is ``S // patch_size`` on each side.
    patch_size : int
        Side of the square, non-overlapping patches.
    embed_dim, depth, num_heads : int
        Width, number of blocks and attention heads of the ViT.
    mlp_ratio : float
        Hidden width of each block's MLP, as a multiple of ``embed_dim``.
    window_size : int
        Side of the attention windows of the non-global blocks.
    global_attn_indexes : sequence of int
        Blocks that attend over the whole token grid.
    """

    def __init__(
        self,
        *,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        window_size: int,
        global_attn_indexes: Sequence[int],
    ) -> None:
        super().__init__()
        grid = img_size // patch_size
        self.img_size = img_size
        self.patch_embed = PatchEmbed(
            kernel_size=(patch_size, patch_size),
            stride=(patch_size, patch_size),
            in_chans=3,
            embed_dim=embed_dim,
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
                act_layer=nn.GELU,
                use_rel_pos=True,
                rel_pos_zero_init=True,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode images.

        Parameters
        ----------
        x : Tensor, shape (B, 3, S, S), float
            Normalised images at the model's input size.

        Returns
        -------
        Tensor, shape (B, embed_dim, S / patch_size, S / patch_size)
            Token features, channels first.
        """
        x = self.patch_embed(x) + self.pos_embed  # (B, h, w, C)
        for block in self.blocks:
            x = block(x)
        return x.permute(0, 3, 1, 2)
