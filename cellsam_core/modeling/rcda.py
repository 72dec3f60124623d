"""Row-column decoupled attention (RCDA), the attention of AnchorDETR (Wang et al., AAAI 2022).

A query attends to the rows and to the columns of a feature map separately: it gets one softmax over the
W columns (from keys averaged over H) and one over the H rows (from keys averaged over W), and its output
is the value map weighted by their outer product, ``out[q] = Σ_h Σ_w A_col[q, h] A_row[q, w] v[h, w]``.
Cost is ``O(Q (H + W))`` attention weights instead of ``O(Q H W)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MultiheadRCDA"]


class MultiheadRCDA(nn.Module):
    """Multi-head row-column decoupled attention.

    Parameters are laid out like the official checkpoint: ``in_proj_weight`` ``(5 * embed_dim,
    embed_dim)`` and ``in_proj_bias`` ``(5 * embed_dim,)`` hold, in blocks of ``embed_dim`` rows, the
    projections of query-row, query-column, key-row, key-column and value; ``out_proj`` is a Linear.

    Parameters
    ----------
    embed_dim : int
        Channel width ``E`` of queries, keys and values.
    num_heads : int
        Number of heads; must divide ``embed_dim``.
    """

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(5 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(5 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform input projection, zero biases (AnchorDETR's initialisation)."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def _project(self, x: torch.Tensor, block: int) -> torch.Tensor:
        e = self.embed_dim
        rows = slice(block * e, (block + 1) * e)
        return F.linear(x, self.in_proj_weight[rows], self.in_proj_bias[rows])

    def forward(
        self,
        query_row: torch.Tensor,
        query_col: torch.Tensor,
        key_row: torch.Tensor,
        key_col: torch.Tensor,
        value: torch.Tensor,
    ) -> torch.Tensor:
        """Attend from ``Q`` queries to an ``(H, W)`` feature map.

        Parameters
        ----------
        query_row, query_col : Tensor, shape (B, Q, E)
            Queries for the column axis (softmax over W) and for the row axis (softmax over H).
        key_row, key_col : Tensor, shape (B, H, W, E)
            Keys; ``key_row`` is averaged over H (one key per column), ``key_col`` over W.
        value : Tensor, shape (B, H, W, E)

        Returns
        -------
        Tensor, shape (B, Q, E)
            Attention output after ``out_proj``. No padding mask: the whole map is valid.
        """
        bsz, n_q, _ = query_row.shape
        _, height, width, _ = value.shape
        heads, hd = self.num_heads, self.head_dim
        scale = float(hd) ** -0.5

        # (B, Q, E) -> (B, heads, Q, hd); the scale is applied after the projection, as the reference.
        q_row = (self._project(query_row, 0) * scale).view(bsz, n_q, heads, hd).transpose(1, 2)
        q_col = (self._project(query_col, 1) * scale).view(bsz, n_q, heads, hd).transpose(1, 2)
        # The projection is affine, so projecting the H-mean (W-mean) equals the reference's mean of the
        # projections up to rounding, at 1/H (1/W) of the cost.
        k_row = self._project(key_row.mean(dim=1), 2).view(bsz, width, heads, hd).transpose(1, 2)
        k_col = self._project(key_col.mean(dim=2), 3).view(bsz, height, heads, hd).transpose(1, 2)
        # (B, H, W, E) -> (B, heads, H, W, hd)
        v = self._project(value, 4).view(bsz, height, width, heads, hd).permute(0, 3, 1, 2, 4)

        attn_row = torch.softmax(q_row @ k_row.transpose(-1, -2), dim=-1)  # (B, heads, Q, W)
        attn_col = torch.softmax(q_col @ k_col.transpose(-1, -2), dim=-1)  # (B, heads, Q, H)

        # Contract the longer axis first so the (Q, other axis, hd) intermediate is the smaller one;
        # with H == W the column (H) axis goes first, matching the reference's order of rounding.
        if height < width:
            # (B, heads, Q, W) @ (B, heads, W, H*hd) -> (B, heads, Q, H, hd)
            v_w = v.permute(0, 1, 3, 2, 4).reshape(bsz, heads, width, height * hd)
            partial = (attn_row @ v_w).view(bsz, heads, n_q, height, hd)
            out = (attn_col.unsqueeze(-2) @ partial).squeeze(-2)
        else:
            # (B, heads, Q, H) @ (B, heads, H, W*hd) -> (B, heads, Q, W, hd)
            partial = (attn_col @ v.reshape(bsz, heads, height, width * hd)).view(bsz, heads, n_q, width, hd)
            out = (attn_row.unsqueeze(-2) @ partial).squeeze(-2)
        # (B, heads, Q, hd) -> (B, Q, E), heads concatenated along channels.
        out = out.transpose(1, 2).reshape(bsz, n_q, self.embed_dim)
        return self.out_proj(out)
