"""Targets and losses: CenterNet-style detection on the dense grid, box-prompted SAM masks.

Detection (:class:`~cellsam_core.modeling.nano.DenseDetector`): a Gaussian objectness target centred on
each cell's box centre (penalty-reduced focal loss, as CenterNet), and an L1 loss on the centre offset and
the log box sides at the centre cell only. Masks: BCE + Dice between SAM's mask logits (prompted with a
jittered ground-truth box) and the cell's mask, plus MSE between SAM's predicted IoU and the actual IoU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = [
    "DetectionTargets",
    "box_loss",
    "detection_targets",
    "focal_heatmap_loss",
    "instance_boxes",
    "mask_losses",
    "sample_prompts",
]


def instance_boxes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids and tight boxes of the instances of one label image.

    Returns ``(ids int64 (N,), boxes float32 (N, 4))``; boxes are XYXY in pixels with exclusive ends
    (a one-pixel object at (y, x) has box ``(x, y, x + 1, y + 1)``).
    """
    slices = ndimage.find_objects(labels)
    ids, boxes = [], []
    for i, sl in enumerate(slices):
        if sl is None:
            continue
        ids.append(i + 1)
        boxes.append((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop))
    return np.asarray(ids, np.int64), np.asarray(boxes, np.float32).reshape(-1, 4)


@dataclass(frozen=True)
class DetectionTargets:
    """Dense targets of a batch on a ``(h, w)`` grid.

    Attributes
    ----------
    heat : Tensor ``(B, 1, h, w)``
        Gaussian objectness in [0, 1]; exactly 1 at each centre cell.
    box : Tensor ``(B, 4, h, w)``
        ``(dx, dy, log w, log h)`` in grid cells at centre cells (0 elsewhere).
    centre : Tensor ``(B, 1, h, w)``
        1 at centre cells, else 0.
    """

    heat: torch.Tensor
    box: torch.Tensor
    centre: torch.Tensor


def detection_targets(labels: np.ndarray, stride: int) -> DetectionTargets:
    """CenterNet targets of a batch of label images ``int (B, S, S)`` on the stride-``stride`` grid."""
    bsz, height, width = labels.shape
    h, w = height // stride, width // stride
    heat = np.zeros((bsz, 1, h, w), np.float32)
    box = np.zeros((bsz, 4, h, w), np.float32)
    centre = np.zeros((bsz, 1, h, w), np.float32)
    gy = np.arange(h, dtype=np.float32) + 0.5
    gx = np.arange(w, dtype=np.float32) + 0.5
    for b in range(bsz):
        _, boxes = instance_boxes(labels[b])
        # Larger boxes first so that, in the rare case two centres share a cell, the smaller one wins.
        order = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        for x0, y0, x1, y1 in boxes[order] / stride:
            cx, cy, bw, bh = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
            sigma = max(0.5, float(np.sqrt(bw * bh)) / 8)
            r = int(np.ceil(3 * sigma))
            i, j = min(int(cy), h - 1), min(int(cx), w - 1)
            ys, xs = slice(max(i - r, 0), min(i + r + 1, h)), slice(max(j - r, 0), min(j + r + 1, w))
            g = np.exp(-((gy[ys, None] - (i + 0.5)) ** 2 + (gx[None, xs] - (j + 0.5)) ** 2) / (2 * sigma**2))
            heat[b, 0, ys, xs] = np.maximum(heat[b, 0, ys, xs], g)
            box[b, :, i, j] = (cx - (j + 0.5), cy - (i + 0.5), np.log(bw), np.log(bh))
            centre[b, 0, i, j] = 1.0
    return DetectionTargets(torch.from_numpy(heat), torch.from_numpy(box), torch.from_numpy(centre))


def focal_heatmap_loss(logits: torch.Tensor, target: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss (alpha 2, beta 4), normalised by the number of centres."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = centre * (1 - p) ** 2 * torch.log(p)
    neg = (1 - centre) * (1 - target) ** 4 * p**2 * torch.log(1 - p)
    return -(pos.sum() + neg.sum()) / centre.sum().clamp(min=1.0)


def box_loss(pred: torch.Tensor, target: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """L1 on ``(dx, dy, log w, log h)`` at centre cells, per centre."""
    return (F.l1_loss(pred, target, reduction="none") * centre).sum() / centre.sum().clamp(min=1.0)


def sample_prompts(
    labels: np.ndarray, k: int, rng: np.random.Generator, jitter: float
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``k`` instances of one label image, with jittered box prompts.

    Each box side moves by up to ``jitter`` times the box size (and at least a pixel), imitating the
    detector's error.

    Returns
    -------
    boxes : np.ndarray
        ``float32 (K, 4)`` XYXY prompts in pixels of the label image.
    masks : np.ndarray
        ``float32 (K, S, S)`` the instances' masks.
    """
    ids, boxes = instance_boxes(labels)
    if ids.size == 0:
        return np.zeros((0, 4), np.float32), np.zeros((0, *labels.shape), np.float32)
    pick = rng.choice(ids.size, size=min(k, ids.size), replace=False)
    chosen = boxes[pick]
    wh = chosen[:, 2:] - chosen[:, :2]
    scale = np.concatenate([wh, wh], axis=1)
    noise = rng.uniform(-1.0, 1.0, chosen.shape).astype(np.float32) * np.maximum(scale * jitter, 1.0)
    height, width = labels.shape
    jittered = np.clip(chosen + noise, 0, [width, height, width, height]).astype(np.float32)
    masks = (labels[None] == ids[pick][:, None, None]).astype(np.float32)
    return jittered, masks


def mask_losses(
    logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE + Dice on masks and MSE of the predicted IoU.

    Parameters
    ----------
    logits : Tensor ``(K, S, S)``
        Mask logits.
    iou_pred : Tensor ``(K,)``
        SAM's IoU prediction.
    target : Tensor ``(K, S, S)``
        Binary masks.

    Returns
    -------
    (mask_loss, iou_loss) : tuple of scalar Tensors
    """
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).flatten(1).sum(1)
    dice = 1 - (2 * inter + 1) / (p.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)
    with torch.no_grad():
        hard = (logits > 0).float()
        i = (hard * target).flatten(1).sum(1)
        u = ((hard + target) > 0).float().flatten(1).sum(1)
        iou = i / u.clamp(min=1.0)
    return bce + dice.mean(), F.mse_loss(iou_pred, iou)
