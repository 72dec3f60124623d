"""cellsam-nano: a compact CellSAM with a convolutional trunk and a dense (CenterNet-style) box detector.

The module tree keeps CellSAM's interfaces, so :mod:`cellsam_core.inference` runs it unchanged:

* ``model.sam.image_encoder`` is a :class:`NanoImageEncoder` (conv trunk + 1×1 neck) producing a SAM image
  embedding at stride 4; segment-anything's ``PromptEncoder`` / ``MaskDecoder`` work on it as on ViT
  embeddings (the mask decoder upsamples 4×, so its masks come out at the full model input resolution).
* ``model.cellfinder.decode_head`` is a :class:`DenseDetector`: ``encode`` = trunk + projection (the
  memory), ``detect`` = per-location heads. Every location of the stride-4 grid is a query that predicts
  an objectness logit and a ``(cx, cy, w, h)`` box. A 3×3 max-pool keeps only local maxima of the
  objectness map (CenterNet's peak extraction), so each cell gives one box and the dynamic KMeans
  threshold of the inference path sees "peaks" against "everything else".

The trunk module is shared by the SAM encoder and the detector (the two inputs differ only by 8-bit
quantisation and a percentile stretch), which halves training compute; see ``docs/models.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvTrunk", "DenseDetector", "NanoImageEncoder"]

#: Logit given to suppressed (non-peak) locations and to the unused second class: sigmoid ~ 1e-13.
SUPPRESSED_LOGIT = -30.0
_MAX_LOG_SIZE = 6.0  # box sides up to e^6 = 403 grid cells


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn(channels, channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class ConvTrunk(nn.Module):
    """Five-stage residual CNN with a top-down feature pyramid, output at stride 4.

    Parameters
    ----------
    widths : tuple of 5 int
        Channels at strides 2, 4, 8, 16, 32.
    out_dim : int
        Channels of the stride-4 output.

    Input ``(B, 3, S, S)`` float, output ``(B, out_dim, S / 4, S / 4)``; ``S`` must be a multiple of 32.
    """

    def __init__(self, *, widths: tuple[int, ...], out_dim: int) -> None:
        super().__init__()
        if len(widths) != 5:
            raise ValueError(f"widths must give 5 stage widths (strides 2..32), got {widths}")
        stages = []
        cin = 3
        for w in widths:
            stages.append(nn.Sequential(_conv_bn(cin, w, stride=2), _Residual(w)))
            cin = w
        self.stages = nn.ModuleList(stages)
        # Laterals from strides 4..32 into the pyramid.
        self.lateral = nn.ModuleList(nn.Conv2d(w, out_dim, 1) for w in widths[1:])
        self.smooth = _conv_bn(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        top = self.lateral[-1](feats[-1])
        for lat, f in zip(reversed(self.lateral[:-1]), reversed(feats[1:-1]), strict=True):
            top = lat(f) + F.interpolate(top, size=f.shape[-2:], mode="nearest")
        return self.smooth(top)


class NanoImageEncoder(nn.Module):
    """SAM image encoder role: trunk + 1×1 neck to the prompt width.

    Parameters
    ----------
    trunk : ConvTrunk
        Shared feature extractor, stride 4, ``trunk_dim`` channels.
    img_size : int
        Side ``S`` of the square model input (SAM reads ``image_encoder.img_size``).
    trunk_dim, out_chans : int
        Trunk channels and SAM embedding width (``prompt_embed_dim``).

    ``(B, 3, S, S) -> (B, out_chans, S / 4, S / 4)``.
    """

    def __init__(self, *, trunk: ConvTrunk, img_size: int, trunk_dim: int, out_chans: int) -> None:
        super().__init__()
        self.img_size = img_size
        # Stored so that a checkpoint records the input size (conv weights do not determine it).
        self.register_buffer("input_size", torch.tensor(img_size, dtype=torch.int64))
        self.trunk = trunk
        self.neck = nn.Sequential(nn.Conv2d(trunk_dim, out_chans, 1), nn.GroupNorm(1, out_chans))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.trunk(x))


class DenseDetector(nn.Module):
    """CellFinder role: one query per stride-4 location; ``forward(x) == detect(encode(x))``.

    Parameters
    ----------
    trunk : ConvTrunk
        Shared feature extractor.
    trunk_dim : int
        Its output channels; also the width of the memory and of the heads.
    stride : int
        Pixels per grid cell (4).
    image_size : int
        Side ``S`` of the model input; boxes are normalised by it.
    """

    def __init__(self, *, trunk: ConvTrunk, trunk_dim: int, stride: int, image_size: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.stride = stride
        self.image_size = image_size
        self.proj = _conv_bn(trunk_dim, trunk_dim)
        self.heatmap = nn.Sequential(_conv_bn(trunk_dim, trunk_dim), nn.Conv2d(trunk_dim, 1, 1))
        self.box = nn.Sequential(_conv_bn(trunk_dim, trunk_dim), nn.Conv2d(trunk_dim, 4, 1))
        # CenterNet's prior: almost every location is background at the start of training.
        last = self.heatmap[-1]
        if isinstance(last, nn.Conv2d) and last.bias is not None:
            nn.init.constant_(last.bias, -4.0)

    @property
    def num_queries(self) -> int:
        """``Q = (S / stride)²``."""
        return (self.image_size // self.stride) ** 2

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` CellFinder input -> memory ``(B, D, S / 4, S / 4)``."""
        return self.proj(self.trunk(x))

    def raw_outputs(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense head outputs before peak extraction (what training supervises).

        Returns
        -------
        heat : Tensor, shape (B, 1, h, w)
            Objectness logits.
        box : Tensor, shape (B, 4, h, w)
            ``(dx, dy, log w, log h)``: centre offset from the cell centre and log box sides, both in
            grid cells.
        """
        return self.heatmap(memory), self.box(memory)

    def decode_boxes(self, box: torch.Tensor) -> torch.Tensor:
        """``(B, 4, h, w)`` raw box outputs -> ``(B, h * w, 4)`` normalised ``(cx, cy, w, h)``."""
        _, _, h, w = box.shape
        ys = torch.arange(h, device=box.device, dtype=box.dtype).view(1, h, 1) + 0.5
        xs = torch.arange(w, device=box.device, dtype=box.dtype).view(1, 1, w) + 0.5
        cx = (xs + box[:, 0]) / w
        cy = (ys + box[:, 1]) / h
        bw = torch.exp(box[:, 2].clamp(max=_MAX_LOG_SIZE)) / w
        bh = torch.exp(box[:, 3].clamp(max=_MAX_LOG_SIZE)) / h
        return torch.stack((cx, cy, bw, bh), dim=-1).flatten(1, 2)

    def detect(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Heads and peak extraction on the memory.

        Returns
        -------
        logits : Tensor, shape (B, Q, 2), float32
            Column 0: the objectness logit at local maxima of the objectness map, ``-30`` elsewhere;
            column 1: ``-30`` (kept for the two-class interface of CellFinder).
        boxes : Tensor, shape (B, Q, 4), float32
            Normalised ``(cx, cy, w, h)`` in [0, 1] of the model input.
        """
        heat, box = self.raw_outputs(memory)
        peak = F.max_pool2d(heat, 3, stride=1, padding=1) == heat
        logit = torch.where(peak, heat, torch.full_like(heat, SUPPRESSED_LOGIT)).flatten(1)
        logits = torch.stack((logit, torch.full_like(logit, SUPPRESSED_LOGIT)), dim=-1)
        return logits.float(), self.decode_boxes(box).float()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.detect(self.encode(x))
