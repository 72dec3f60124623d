"""Names of the synthetic imaging modalities (a leaf module: importing it loads nothing else)."""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["MODALITIES", "NUCLEAR_LABELS", "TRANSMITTED", "TWO_CHANNEL", "Modality"]

Modality = Literal[
    "nuclear",
    "whole_cell",
    "multiplexed",
    "phase",
    "bacteria",
    "yeast",
    "tissue",
    "dic",
    "stained",
    "membrane",
]
MODALITIES: tuple[str, ...] = get_args(Modality)
#: Modalities whose image has two channels ``[nuclear, whole_cell]``.
TWO_CHANNEL: frozenset[str] = frozenset({"multiplexed", "tissue"})
#: Transmitted-light modalities: illumination multiplies the signal instead of adding a background.
TRANSMITTED: frozenset[str] = frozenset({"phase", "bacteria", "yeast", "dic", "stained"})
#: Modalities whose labels are nuclei (the others label whole cells).
NUCLEAR_LABELS: frozenset[str] = frozenset({"nuclear", "stained"})
