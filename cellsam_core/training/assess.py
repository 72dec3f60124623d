"""Model assessment through the inference path: segment frames with :func:`~cellsam_core.inference.segment`
and score them with :mod:`cellsam_core.evaluation`; the held-out synthetic benchmark of ``docs/models.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from cellsam_core.evaluation import EvaluationResult, evaluate
from cellsam_core.inference import DecodeOptions, segment
from cellsam_core.modeling.cellsam import CellSAM
from cellsam_core.synthetic import MODALITIES, synthetic_frame

__all__ = ["HELDOUT_CELLS", "HELDOUT_SEED", "evaluate_model", "heldout_frames"]

#: Seeds of held-out frames start here; training draws its movie seeds from a generator, never these.
HELDOUT_SEED = 900_000
#: Cells per held-out frame (256², 512²); packed tissue needs more cells to have cells of the usual size.
HELDOUT_CELLS: dict[str, tuple[int, int]] = {"tissue": (150, 600), "membrane": (150, 600)}


def heldout_frames(
    modality: str, n: int, *, seed: int = HELDOUT_SEED
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``n`` synthetic frames of ``modality`` that training never saw, alternating 256² (40 cells) and
    512² (80 cells) fields (tissue and membrane: 150 and 600, so that packed cells have their usual
    size), with the generator's default cell sizes. Returns ``(images, labels)``."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITIES)}")
    images, labels = [], []
    for i in range(n):
        small, large = HELDOUT_CELLS.get(modality, (40, 80))
        side, cells = (256, small) if i % 2 == 0 else (512, large)
        img, lab = synthetic_frame((side, side), seed=seed + i, modality=modality, n_cells=cells)  # type: ignore[arg-type]
        images.append(img)
        labels.append(lab)
    return images, labels


def evaluate_model(
    model: CellSAM,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    decode_options: DecodeOptions | None = None,
    on_image: Callable[[int, int], None] | None = None,
) -> EvaluationResult:
    """Segment every image with ``segment()`` and evaluate against ``labels`` (same order).

    ``on_image(done, total)`` is called after each image is segmented (progress bars).
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} label images; pass them in pairs")
    preds = []
    for img in images:
        preds.append(segment(img, model, decode_options=decode_options).labels)
        if on_image is not None:
            on_image(len(preds), len(images))
    return evaluate([np.asarray(lab) for lab in labels], [p.astype(np.int64) for p in preds])
