"""AnchorDETR transformer (Wang et al., AAAI 2022) as CellFinder uses it: one feature level, RCDA.

Queries are anchor points (a learned spatial prior of ``num_query_position`` (x, y) points in [0, 1],
times ``num_query_pattern`` learned patterns). The encoder refines the projected backbone features with
row-column decoupled self-attention; each decoder layer does query self-attention, RCDA cross-attention to
the features and an FFN. The anchor points are not refined between layers: every layer predicts a box as
an offset from the same anchor. Module and parameter names follow the official checkpoint
(``cellfinder.decode_head.transformer.*``).
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from cellsam_core.modeling.rcda import MultiheadRCDA

__all__ = [
    "AnchorDETRTransformer",
    "inverse_sigmoid",
    "mask2pos",
    "pos2posemb1d",
    "pos2posemb2d",
]

_TEMPERATURE = 10000.0


def pos2posemb1d(pos: torch.Tensor, num_pos_feats: int, temperature: float = _TEMPERATURE) -> torch.Tensor:
    """Sine embedding of scalar positions in [0, 1].

    ``out[..., i] = sin(2π p / T^(2⌊i/2⌋/n))`` for even ``i`` and ``cos`` of the same for odd ``i``
    (interleaved), with ``n = num_pos_feats`` and ``T = temperature``.

    Parameters
    ----------
    pos : Tensor, shape (...,), float
    num_pos_feats : int
        Output width ``n`` (even).

    Returns
    -------
    Tensor, shape (..., num_pos_feats), float32 (or ``pos``'s dtype if wider)
    """
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=pos.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    angles = (pos * (2 * math.pi))[..., None] / dim_t
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


def pos2posemb2d(pos: torch.Tensor, num_pos_feats: int, temperature: float = _TEMPERATURE) -> torch.Tensor:
    """Sine embedding of (x, y) points: ``cat(pos2posemb1d(y), pos2posemb1d(x))`` (y first).

    Parameters
    ----------
    pos : Tensor, shape (..., 2), float
        ``pos[..., 0]`` is x, ``pos[..., 1]`` is y, both in [0, 1].
    num_pos_feats : int
        Width per coordinate; the output has ``2 * num_pos_feats`` channels.

    Returns
    -------
    Tensor, shape (..., 2 * num_pos_feats)
    """
    emb_x = pos2posemb1d(pos[..., 0], num_pos_feats, temperature)
    emb_y = pos2posemb1d(pos[..., 1], num_pos_feats, temperature)
    return torch.cat((emb_y, emb_x), dim=-1)


def mask2pos(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised pixel-centre coordinates of the valid (unpadded) part of a feature map.

    Parameters
    ----------
    mask : Tensor, shape (B, H, W), bool
        True on padded pixels. Valid pixels are assumed to form a top-left rectangle.

    Returns
    -------
    y : Tensor, shape (B, H), float32
        ``(i + 0.5) / H_valid`` for row ``i``.
    x : Tensor, shape (B, W), float32
        ``(j + 0.5) / W_valid`` for column ``j``.
    """
    valid = ~mask
    y = valid[:, :, 0].cumsum(1, dtype=torch.float32)
    x = valid[:, 0, :].cumsum(1, dtype=torch.float32)
    return (y - 0.5) / y[:, -1:], (x - 0.5) / x[:, -1:]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``log(x / (1 - x))`` with ``x`` clamped to [0, 1] and both terms clamped below at ``eps``."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class FFN(nn.Module):
    """Post-norm feed-forward block: ``norm2(x + linear2(relu(linear1(x))))``."""

    def __init__(self, d_model: int, d_ffn: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class EncoderLayer(nn.Module):
    """RCDA self-attention over the feature map, then FFN; post-norm residuals."""

    def __init__(self, d_model: int, nhead: int, d_ffn: int) -> None:
        super().__init__()
        self.self_attn = MultiheadRCDA(d_model, nhead)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, d_ffn)

    def forward(self, src: torch.Tensor, posemb_row: torch.Tensor, posemb_col: torch.Tensor) -> torch.Tensor:
        """``src`` (B, H, W, C); ``posemb_row`` (1, 1, W, C); ``posemb_col`` (1, H, 1, C) -> (B, H, W, C)."""
        bsz, height, width, chans = src.shape
        with_row = src + posemb_row
        with_col = src + posemb_col
        out = self.self_attn(
            with_row.reshape(bsz, height * width, chans),
            with_col.reshape(bsz, height * width, chans),
            with_row,
            with_col,
            src,
        )
        src = self.norm1(src + out.view(bsz, height, width, chans))
        return self.ffn(src)


class DecoderLayer(nn.Module):
    """Query self-attention, RCDA cross-attention to the features, FFN; post-norm residuals.

    Attribute order is the checkpoint's: ``cross_attn``, ``norm1``, ``self_attn``, ``norm2``, ``ffn``.
    """

    def __init__(self, d_model: int, nhead: int, d_ffn: int) -> None:
        super().__init__()
        self.cross_attn = MultiheadRCDA(d_model, nhead)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, nhead, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, d_ffn)

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        query_pos_x: torch.Tensor,
        query_pos_y: torch.Tensor,
        memory: torch.Tensor,
        key_row: torch.Tensor,
        key_col: torch.Tensor,
    ) -> torch.Tensor:
        """Update queries.

        Parameters
        ----------
        tgt : Tensor, shape (B, Q, C)
            Query content.
        query_pos, query_pos_x, query_pos_y : Tensor, shape (1, Q, C)
            Anchor embeddings: 2-D (self-attention), x only (row keys) and y only (column keys).
        memory, key_row, key_col : Tensor, shape (B, H, W, C)
            Encoded features (values) and features plus row / column position embeddings (keys).
        """
        q = tgt + query_pos
        attn, _ = self.self_attn(q, q, tgt, need_weights=False)
        tgt = self.norm2(tgt + attn)
        out = self.cross_attn(tgt + query_pos_x, tgt + query_pos_y, key_row, key_col, memory)
        tgt = self.norm1(tgt + out)
        return self.ffn(tgt)


class AnchorDETRTransformer(nn.Module):
    """AnchorDETR encoder-decoder with class and box heads, single feature level, RCDA attention.

    Parameters
    ----------
    d_model : int
        Channel width of features and queries (even; the 2-D anchor embedding uses ``d_model / 2``
        features per coordinate).
    nhead : int
        Attention heads of every attention layer.
    num_encoder_layers, num_decoder_layers : int
    dim_feedforward : int
        Hidden width of the FFNs.
    num_query_position : int
        Number of learned anchor points.
    num_query_pattern : int
        Number of learned query patterns; queries = patterns × anchors (pattern-major).
    num_classes : int
        Width of the (sigmoid) class logits.
    """

    def __init__(
        self,
        *,
        d_model: int,
        nhead: int,
        num_encoder_layers: int,
        num_decoder_layers: int,
        dim_feedforward: int,
        num_query_position: int,
        num_query_pattern: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        if d_model % 2 != 0:
            raise ValueError(f"d_model must be even, got {d_model}")
        self.d_model = d_model
        self.num_classes = num_classes
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(d_model, nhead, dim_feedforward) for _ in range(num_encoder_layers)
        )
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(d_model, nhead, dim_feedforward) for _ in range(num_decoder_layers)
        )
        self.pattern = nn.Embedding(num_query_pattern, d_model)
        self.position = nn.Embedding(num_query_position, 2)
        self.adapt_pos2d = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model))
        self.adapt_pos1d = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model))

        class_embed = nn.Linear(d_model, num_classes)
        bbox_embed = MLP(d_model, d_model, 4, 3)
        # Initialisation of AnchorDETR: focal-loss prior of 1 %, boxes start at the anchors with
        # w = h = sigmoid(-2), anchors uniform in the unit square.
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
        box_out = cast(nn.Linear, bbox_embed.layers[-1])
        nn.init.zeros_(box_out.weight)
        nn.init.zeros_(box_out.bias)
        nn.init.constant_(box_out.bias[2:], -2.0)
        nn.init.uniform_(self.position.weight, 0.0, 1.0)
        # One head shared by every decoder layer, listed once per layer as in the official state dict
        # (loading writes each index into the same module; the last index wins).
        self.class_embed = nn.ModuleList([class_embed] * num_decoder_layers)
        self.bbox_embed = nn.ModuleList([bbox_embed] * num_decoder_layers)

    @property
    def num_queries(self) -> int:
        """Number of detection queries ``Q = num_query_pattern * num_query_position``."""
        return self.pattern.num_embeddings * self.position.num_embeddings

    def _embed(self, mlp: nn.Sequential, emb: torch.Tensor) -> torch.Tensor:
        # Position embeddings are built in float32; cast them to the MLP's dtype so a model converted to
        # bf16/fp16 works (under autocast the weights stay float32 and autocast casts).
        return mlp(emb.to(next(mlp.parameters()).dtype))

    def forward(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Detect objects in projected backbone features.

        Parameters
        ----------
        src : Tensor, shape (B, d_model, H, W)
            Output of ``input_proj``.

        Returns
        -------
        logits : Tensor, shape (B, Q, num_classes), float32
            Class logits of the last decoder layer (apply a sigmoid for scores).
        boxes : Tensor, shape (B, Q, 4), float32
            Boxes of the last decoder layer, normalised (cx, cy, w, h) in [0, 1].
        """
        bsz, chans, height, width = src.shape
        mask = torch.zeros(1, height, width, dtype=torch.bool, device=src.device)
        pos_y, pos_x = mask2pos(mask)
        posemb_row = self._embed(self.adapt_pos1d, pos2posemb1d(pos_x, chans))[:, None]  # (1, 1, W, C)
        posemb_col = self._embed(self.adapt_pos1d, pos2posemb1d(pos_y, chans))[:, :, None]  # (1, H, 1, C)

        memory = src.permute(0, 2, 3, 1)
        for enc in self.encoder_layers:
            memory = enc(memory, posemb_row, posemb_col)

        # Anchors and their embeddings are the same in every layer (not refined): compute them once.
        n_pattern = self.pattern.num_embeddings
        anchors = self.position.weight.float().repeat(n_pattern, 1)[None]  # (1, Q, 2), pattern-major
        query_pos = self._embed(self.adapt_pos2d, pos2posemb2d(anchors, chans // 2))
        query_pos_x = self._embed(self.adapt_pos1d, pos2posemb1d(anchors[..., 0], chans))
        query_pos_y = self._embed(self.adapt_pos1d, pos2posemb1d(anchors[..., 1], chans))
        tgt = self.pattern.weight.repeat_interleave(self.position.num_embeddings, dim=0)
        tgt = tgt[None].expand(bsz, -1, -1)
        key_row = memory + posemb_row
        key_col = memory + posemb_col

        for dec in self.decoder_layers:
            tgt = dec(tgt, query_pos, query_pos_x, query_pos_y, memory, key_row, key_col)

        # Only the last layer's prediction is used at inference (the others are training aux outputs).
        last = len(self.decoder_layers) - 1
        logits = self.class_embed[last](tgt).float()
        offsets = self.bbox_embed[last](tgt).float()
        center = offsets[..., :2] + inverse_sigmoid(anchors)
        boxes = torch.cat((center, offsets[..., 2:]), dim=-1).sigmoid()
        return logits, boxes
