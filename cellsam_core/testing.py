"""Models for tests, benchmarks and smoke runs (not for segmentation).

A freshly initialised CellSAM decodes nothing: AnchorDETR's prior scores every query at ~0.01, below the
box threshold. :func:`smoke_model` adjusts a random ``tiny`` model so that boxes pass the score threshold
and masks pass the IoU threshold, so every stage of the pipeline does real work on any input.
"""

from __future__ import annotations

from typing import Any

import torch

from cellsam_core.modeling.cellsam import CellSAM
from cellsam_core.registry import build_model

__all__ = ["smoke_model"]


def smoke_model(seed: int = 0, name: str = "tiny") -> CellSAM:
    """A seeded random model (``name`` from the registry) whose every stage produces output; eval mode."""
    torch.manual_seed(seed)
    model = build_model(name)
    transformer: Any = model.cellfinder.decode_head.transformer
    head = transformer.class_embed[0]
    torch.nn.init.normal_(head.weight, std=0.5)
    torch.nn.init.zeros_(head.bias)
    for sam in (model.model, model.model_cp):
        sam.mask_decoder.iou_prediction_head.layers[-1].bias.data.fill_(1.0)
    return model.eval()
