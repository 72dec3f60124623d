"""Shared fixtures: small models whose weights make every stage of the pipeline do real work."""

from __future__ import annotations

import pytest
import torch

from cellsam_core.modeling.cellsam import CellSAM
from cellsam_core.registry import build_model


def make_smoke_model(seed: int = 0) -> CellSAM:
    """``tiny`` with random weights adjusted so that boxes pass the score threshold and masks pass the
    IoU threshold (a fresh AnchorDETR init scores every query at ~0.01, so nothing would be decoded)."""
    torch.manual_seed(seed)
    model = build_model("tiny")
    head = model.cellfinder.decode_head.transformer.class_embed[0]
    torch.nn.init.normal_(head.weight, std=0.5)
    torch.nn.init.zeros_(head.bias)
    for sam in (model.model, model.model_cp):
        sam.mask_decoder.iou_prediction_head.layers[-1].bias.data.fill_(1.0)
    return model.eval()


@pytest.fixture(scope="session")
def smoke_model() -> CellSAM:
    return make_smoke_model()
