"""Models and measures for tests, benchmarks and smoke runs (not for segmentation).

A freshly initialised CellSAM decodes nothing: AnchorDETR's prior scores every query at ~0.01, below the
box threshold. :func:`smoke_model` adjusts a random ``tiny`` model so that boxes pass the score threshold
and masks pass the IoU threshold, so every stage of the pipeline does real work on any input.
:func:`benchmark_model` does the same for any registered size (the official ``cellsam_vit_b`` included)
and gives every ViT attention a non-zero relative-position term, so that term is exercised too;
:func:`fix_box_count` then sets how many boxes every frame yields. :func:`label_agreement`
compares two label images the way the fast paths are judged (matched IoU, cell count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from segment_anything.modeling.image_encoder import Attention
from torch.utils.hooks import RemovableHandle

from cellsam_core.configs import ModelConfig
from cellsam_core.modeling.cellsam import CellSAM
from cellsam_core.registry import build_model

__all__ = ["LabelAgreement", "benchmark_model", "fix_box_count", "label_agreement", "smoke_model"]


def smoke_model(seed: int = 0, name: str = "tiny", *, config: ModelConfig | None = None) -> CellSAM:
    """A seeded random model (``name`` from the registry, or ``config``) whose every stage produces output.

    In eval mode.
    """
    torch.manual_seed(seed)
    model = build_model(name, config=config)
    transformer: Any = model.cellfinder.decode_head.transformer
    head = transformer.class_embed[0]
    torch.nn.init.normal_(head.weight, std=0.5)
    torch.nn.init.zeros_(head.bias)
    for sam in (model.model, model.model_cp):
        sam.mask_decoder.iou_prediction_head.layers[-1].bias.data.fill_(1.0)
    return model.eval()


def benchmark_model(
    name: str = "cellsam_vit_b",
    seed: int = 0,
    *,
    config: ModelConfig | None = None,
    rel_pos_std: float = 0.1,
) -> CellSAM:
    """:func:`smoke_model` of any registered size, with random relative-position embeddings.

    segment-anything initialises ``rel_pos_h`` / ``rel_pos_w`` to zero; trained ViTs have them non-zero,
    and the SDPA path turns them into an attention mask, so they are drawn from
    ``N(0, rel_pos_std²)`` here. Every mask also passes the IoU threshold (predicted IoU exactly 1), so
    the masks decoded are exactly the boxes detected.
    """
    model = smoke_model(seed, name, config=config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Attention) and module.use_rel_pos:
                for p in (module.rel_pos_h, module.rel_pos_w):
                    p.copy_(torch.randn(p.shape, generator=gen) * rel_pos_std)
        for sam in (model.model, model.model_cp):
            sam.mask_decoder.iou_prediction_head.layers[-1].weight.zero_()
    return model


def fix_box_count(model: CellSAM, count: int, *, seed: int = 0, margin: float = 20.0) -> RemovableHandle:
    """Make exactly ``count`` of CellFinder's queries pass the box threshold, on any frame, at any precision.

    Random weights give every query almost the same score (queries differ only through attention that
    random weights spread evenly), so how many pass the dynamic threshold swings between none and all
    with the slightest rounding. This adds ``+margin`` to the class-0 logit of ``count`` queries drawn
    with ``seed`` and ``-margin`` to every other logit, through a forward hook on the (shared) class
    head: CellFinder still runs in full, the scores become two clean clusters, and the boxes that pass
    are those queries' boxes (their anchors, their box-head sizes).

    Returns
    -------
    torch.utils.hooks.RemovableHandle
        ``handle.remove()`` restores the model.
    """
    transformer: Any = model.cellfinder.decode_head.transformer
    n_queries, n_classes = transformer.num_queries, transformer.num_classes
    if not 0 <= count <= n_queries:
        raise ValueError(f"count must be in [0, {n_queries}] (the model's queries), got {count}")
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n_queries, generator=gen)[:count]
    offset = torch.full((n_queries, n_classes), -margin)
    offset[chosen, 0] = margin

    def add_offset(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output + offset.to(output.device, output.dtype)

    head: torch.nn.Module = transformer.class_embed[0]
    return head.register_forward_hook(add_offset)


@dataclass(frozen=True)
class LabelAgreement:
    """How closely a label image matches a reference one.

    Attributes
    ----------
    matched_iou : float
        Mean over the reference's cells of the IoU with their one-to-one match in the other image
        (Hungarian, pairs above IoU 0.1; an unmatched cell counts 0). 1.0 when both are empty.
    count_reference, count_other : int
        Cells in each image.
    pixel_agreement : float
        Fraction of pixels whose foreground/background state agrees.
    """

    matched_iou: float
    count_reference: int
    count_other: int
    pixel_agreement: float

    @property
    def count_change(self) -> float:
        """``|count_other - count_reference| / max(count_reference, 1)``."""
        return abs(self.count_other - self.count_reference) / max(self.count_reference, 1)

    def as_dict(self) -> dict[str, float]:
        """Plain numbers, for JSON."""
        return {
            "matched_iou": self.matched_iou,
            "count_reference": self.count_reference,
            "count_other": self.count_other,
            "count_change": self.count_change,
            "pixel_agreement": self.pixel_agreement,
        }


def label_agreement(reference: np.ndarray, other: np.ndarray) -> LabelAgreement:
    """Matched IoU and cell counts of ``other`` against ``reference`` (two ``(H, W)`` label images)."""
    from cellsam_core.evaluation import match_instances

    ref, oth = np.asarray(reference), np.asarray(other)
    n_ref = len(np.unique(ref[ref > 0]))
    n_oth = len(np.unique(oth[oth > 0]))
    pixels = float(((ref > 0) == (oth > 0)).mean()) if ref.size else 1.0
    if n_ref == 0:
        return LabelAgreement(1.0 if n_oth == 0 else 0.0, 0, n_oth, pixels)
    matching = match_instances(ref, oth, iou_threshold=0.1)
    matched = float(np.sum(matching.ious)) / n_ref
    return LabelAgreement(matched, n_ref, n_oth, pixels)
