"""Windowed SAM mask decoding: each box attends over a window of the embedding around it.

SAM's mask decoder attends over every token of the image embedding for every box, then upsamples the whole
(per-box) embedding to a full-input mask, and :func:`~cellsam_core.inference.decode` resizes that mask to the
whole frame. Cells are small: almost all of that work lies far from the box. Windowed decoding gives each box
an ``n × n``-token window of the embedding (and of SAM's dense positional encoding, so every token keeps its
absolute position), centred on the box, and maps the window's mask back onto the matching region of the
frame only. Cost per box falls with the window's area.

This is a different computation from the full-context decoder (attention is normalised over the window's
tokens only), so it is a property of how a model was trained: cellsam-nano is trained on 128-pixel crops,
i.e. 32 × 32-token windows, and decodes with that window by default (``NanoConfig.decode_window``). The
official models decode with the full embedding, as the reference does. When the window covers the whole
grid the result equals the full-context path up to float rounding (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder

from cellsam_core.acceleration import Plan
from cellsam_core.masks import predict_single_masks

__all__ = ["Windows", "decode_windows", "plan_windows", "window_masks_to_frame"]


@dataclass(frozen=True)
class Windows:
    """Where the windows of a chunk of boxes lie on the embedding grid.

    Attributes
    ----------
    origins : np.ndarray
        int64 ``(n, 2)``: ``(row, col)`` of each window's first token.
    side : int
        Tokens per window side (one side for the whole chunk, so the chunk is one batch).
    """

    origins: np.ndarray
    side: int


def plan_windows(boxes: np.ndarray, *, window: int, grid: int, input_size: int) -> Windows:
    """Windows centred on ``boxes``, large enough to hold each box with a margin.

    Parameters
    ----------
    boxes : np.ndarray
        ``(n, 4)`` XYXY in model-input pixels (``0 .. input_size``).
    window : int
        Smallest window side in tokens. A box up to half this side fits with a quarter-window margin on
        each side; a chunk holding a larger box gets a larger window (twice the box, up to the grid).
    grid : int
        Side of the embedding grid in tokens.
    input_size : int
        Side of the square model input in pixels.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    per_token = input_size / grid
    extent = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) / per_token if len(b) else np.zeros(0)
    need = int(math.ceil(2 * float(extent.max()) / 8) * 8) if len(b) else window
    side = min(grid, max(window, need))
    centre_y = (b[:, 1] + b[:, 3]) / 2 / per_token
    centre_x = (b[:, 0] + b[:, 2]) / 2 / per_token
    origins = np.stack([centre_y, centre_x], axis=1) - side / 2
    origins = np.clip(np.rint(origins), 0, grid - side).astype(np.int64)
    return Windows(origins=origins, side=side)


def _gather(grid: torch.Tensor, windows: Windows) -> torch.Tensor:
    """``(1, C, G, G)`` -> ``(n, C, side, side)``: each window, stacked (faster than one index op here)."""
    side = windows.side
    return torch.stack([grid[0, :, r : r + side, c : c + side] for r, c in windows.origins.tolist()])


def decode_windows(
    mask_decoder: MaskDecoder,
    embedding: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    windows: Windows,
    *,
    plan: Plan | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's single-mask prediction for each prompt over its own window of the embedding.

    The same computation as ``MaskDecoder(..., multimask_output=False)`` on the cropped embedding and
    positional encoding, batched over prompts whose windows differ (SAM's own ``predict_masks`` takes one
    image per call).

    Parameters
    ----------
    mask_decoder : MaskDecoder
    embedding : torch.Tensor
        ``(1, C, G, G)`` image embedding.
    image_pe : torch.Tensor
        ``(1, C, G, G)`` SAM dense positional encoding.
    sparse : torch.Tensor
        ``(n, k, C)`` prompt tokens (one box: ``k = 2``).
    dense : torch.Tensor
        ``(1, C, G, G)`` dense prompt embedding, the same for every prompt (boxes carry no mask prompt:
        SAM's "no mask" embedding).
    windows : Windows
        One window per prompt.
    plan : Plan, optional
        Autocast of the transformer (:func:`cellsam_core.masks.predict_single_masks`).

    Returns
    -------
    masks : torch.Tensor
        ``(n, 1, side * r, side * r)`` low-resolution mask logits of each window (``r = 4``: SAM upsamples
        its embedding 4×).
    iou : torch.Tensor
        ``(n, 1)`` predicted mask IoU.
    """
    if dense.shape[0] != 1:
        raise ValueError(f"dense must be one (1, C, G, G) embedding shared by all prompts, got {dense.shape}")
    # One gather for the embedding (plus the dense prompt) and the positional encoding together.
    both = _gather(torch.cat([embedding + dense, image_pe], dim=1), windows)
    src, pos = both.split(embedding.shape[1], dim=1)
    return predict_single_masks(mask_decoder, src, pos, sparse, plan=plan)


def window_masks_to_frame(
    low_res: torch.Tensor,
    windows: Windows,
    *,
    grid: int,
    low_res_size: int,
    input_size: int,
    out_size: tuple[int, int],
) -> tuple[torch.Tensor, np.ndarray]:
    """Resize window masks onto the matching regions of the output image, as the full path would.

    The full path resizes the ``(L, L)`` low-resolution mask to ``(S, S)`` and then to ``out_size``
    (bilinear, ``align_corners=False``, ``Sam.postprocess_masks``). Here each window goes through the same
    two steps restricted to its region: an exact integer upsampling to input pixels, then bilinear sampling
    at the source coordinate of every output pixel of the region. Where interpolation would need values
    beyond the window's edge it uses the edge value, as the full path does at the image's edge (the window
    margin keeps such pixels far from the cell).

    Parameters
    ----------
    low_res : torch.Tensor
        ``(n, 1, l, l)`` mask logits of the windows, ``l = windows.side * L / grid``.
    windows : Windows
        Where the windows lie (:func:`plan_windows`).
    grid, low_res_size, input_size : int
        Embedding grid side ``G``, full low-resolution mask side ``L`` and model input side ``S``
        (``S`` a multiple of ``L``, ``L`` a multiple of ``G``).
    out_size : (int, int)
        ``(H, W)`` of the image the masks are for.

    Returns
    -------
    logits : torch.Tensor
        float32 ``(n, h, w)`` mask logits of each window's region of the output image.
    offsets : np.ndarray
        int64 ``(n, 2)``: ``(row, col)`` of each region in the output image.
    """
    if input_size % low_res_size or low_res_size % grid:
        raise ValueError(
            f"windowed decoding needs S ({input_size}) a multiple of L ({low_res_size}) and L a multiple "
            f"of the grid ({grid})"
        )
    factor = input_size // low_res_size
    x = low_res.float()
    if factor != 1:
        # Windows start on whole low-res pixels, so an integer upsampling of the window alone is exact.
        x = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    m = x.shape[-1]  # window side in input pixels
    origin_in = torch.as_tensor(windows.origins * (input_size // grid), dtype=torch.float64)
    h_out, w_out = out_size
    axes = []
    offsets = []
    for axis, size_out in enumerate((h_out, w_out)):
        scale = input_size / size_out
        region = min(size_out, math.ceil(m / scale))
        start = torch.clamp(torch.floor(origin_in[:, axis] / scale), 0, size_out - region)
        dst = start[:, None] + torch.arange(region, dtype=torch.float64)
        # torch's bilinear source coordinate, relative to the window, normalised for grid_sample.
        src = (dst + 0.5) * scale - 0.5 - origin_in[:, axis : axis + 1]
        axes.append(((2 * src + 1) / m - 1).to(x.device, torch.float32))
        offsets.append(start.to(torch.int64).numpy())
    gy, gx = axes
    sample_grid = torch.stack(
        [gx[:, None, :].expand(-1, gy.shape[1], -1), gy[:, :, None].expand(-1, -1, gx.shape[1])], dim=-1
    )
    logits = F.grid_sample(x, sample_grid, mode="bilinear", padding_mode="border", align_corners=False)
    return logits[:, 0], np.stack(offsets, axis=1)
