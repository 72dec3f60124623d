"""CellFinder: the AnchorDETR cell detector of CellSAM, with a SAM ViT backbone.

The detector is split in two for serving: :meth:`CellFinderDetector.encode` (ViT backbone and input
projection: the heavy part, run in the encoder deployment next to SAM's image encoder) and
:meth:`CellFinderDetector.detect` (AnchorDETR transformer and heads, run in the decoder deployment).
``forward(x) == detect(encode(x))``.
"""

from __future__ import annotations

import torch
from torch import nn

from cellsam_core.modeling.anchor_detr import AnchorDETRTransformer
from cellsam_core.modeling.nano import DenseDetector
from cellsam_core.modeling.vit import ViTBackbone

__all__ = ["Backbone", "CellFinder", "CellFinderDetector", "postprocess_detections"]

_GROUPNORM_GROUPS = 32


class Backbone(nn.Module):
    """Holds the ViT as ``body`` (the checkpoint's ``backbone.body.*`` layout)."""

    def __init__(self, *, body: ViTBackbone) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, C_vit, S/16, S/16)."""
        return self.body(x)


class CellFinderDetector(nn.Module):
    """AnchorDETR with one feature level: ViT backbone, 1×1 input projection, transformer.

    Parameters
    ----------
    backbone : Backbone
        Feature extractor with ``body.blocks`` of width ``backbone_channels``.
    transformer : AnchorDETRTransformer
        Detection transformer of width ``transformer.d_model`` (a multiple of 32, for the GroupNorm).
    backbone_channels : int
        Channels of the backbone output (768 for ViT-B).
    """

    def __init__(
        self, *, backbone: Backbone, transformer: AnchorDETRTransformer, backbone_channels: int
    ) -> None:
        super().__init__()
        d_model = transformer.d_model
        if d_model % _GROUPNORM_GROUPS != 0:
            raise ValueError(f"transformer.d_model must be a multiple of {_GROUPNORM_GROUPS}, got {d_model}")
        # Registration order = the checkpoint's key order: transformer, input_proj, backbone.
        self.transformer = transformer
        proj = nn.Conv2d(backbone_channels, d_model, kernel_size=1)
        nn.init.xavier_uniform_(proj.weight, gain=1)
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)
        self.input_proj = nn.ModuleList([nn.Sequential(proj, nn.GroupNorm(_GROUPNORM_GROUPS, d_model))])
        self.backbone = backbone

    @property
    def num_queries(self) -> int:
        """Number of detection queries ``Q``."""
        return self.transformer.num_queries

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone and input projection.

        Parameters
        ----------
        x : Tensor, shape (B, 3, S, S), float
            CellFinder-normalised images at the model input size ``S``.

        Returns
        -------
        Tensor, shape (B, d_model, S / 16, S / 16)
            Projected features; the input of :meth:`detect`.
        """
        return self.input_proj[0](self.backbone(x))

    def detect(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformer and heads on projected features.

        Parameters
        ----------
        memory : Tensor, shape (B, d_model, h, w)
            Output of :meth:`encode`.

        Returns
        -------
        logits : Tensor, shape (B, Q, num_classes), float32
            Class logits of the last decoder layer.
        boxes : Tensor, shape (B, Q, 4), float32
            Normalised (cx, cy, w, h) in [0, 1], relative to the model input.
        """
        return self.transformer(memory)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``detect(encode(x))``: (B, 3, S, S) -> (logits (B, Q, K), boxes (B, Q, 4))."""
        return self.detect(self.encode(x))


class CellFinder(nn.Module):
    """Wrapper whose only child is ``decode_head`` (the checkpoint's ``cellfinder.decode_head.*``).

    ``decode_head`` is AnchorDETR (:class:`CellFinderDetector`, the official model) or cellsam-nano's
    :class:`~cellsam_core.modeling.nano.DenseDetector`; both offer ``encode`` / ``detect``.
    """

    def __init__(self, *, decode_head: CellFinderDetector | DenseDetector) -> None:
        super().__init__()
        self.decode_head = decode_head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Same as ``decode_head(x)``."""
        return self.decode_head(x)


def postprocess_detections(
    logits: torch.Tensor, boxes: torch.Tensor, image_size: int | tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn raw detections into scored XYXY boxes, as AnchorDETR's ``PostProcess``.

    Scores are ``sigmoid(logits)``; the ``Q`` best of the ``Q * num_classes`` (query, class) pairs are
    kept in descending score order, so one query can contribute several boxes (one per class). Class
    labels are dropped (CellSAM does not use them). Boxes are not clipped to the image.

    Parameters
    ----------
    logits : Tensor, shape (B, Q, K)
    boxes : Tensor, shape (B, Q, 4)
        Normalised (cx, cy, w, h).
    image_size : int or (int, int)
        Side of the square model input, or its (H, W); boxes are scaled by (W, H, W, H).

    Returns
    -------
    scores : Tensor, shape (B, Q), float32
        Descending per image.
    boxes_xyxy : Tensor, shape (B, Q, 4), float32
        (x0, y0, x1, y1) in pixels of the model input.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    bsz, n_q, n_cls = logits.shape
    probs = logits.float().sigmoid().reshape(bsz, n_q * n_cls)
    scores, flat_idx = torch.topk(probs, n_q, dim=1)
    query = torch.div(flat_idx, n_cls, rounding_mode="floor")
    cx, cy, w, h = boxes.float().unbind(-1)
    xyxy = torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)
    xyxy = torch.gather(xyxy, 1, query[..., None].expand(bsz, n_q, 4))
    scale = torch.tensor([width, height, width, height], dtype=xyxy.dtype, device=xyxy.device)
    return scores, xyxy * scale
