"""Few-shot fine-tuning: a handful of annotated frames adapt the bundled model (or an official one).

* cellsam-nano (the default base, :data:`~cellsam_core.checkpoint.BUNDLED_WEIGHTS`): every part is
  fine-tuned (trunk, dense detector, prompt encoder, mask decoder), with BatchNorm statistics frozen
  because a few frames are too few to re-estimate them.
* The official architecture (a ``cellsam_vit_b`` checkpoint in the official layout): the ViT image
  encoder and the AnchorDETR CellFinder stay fixed and SAM's prompt encoder and mask decoder are
  fine-tuned with box prompts from the annotations (the part of the model that decides mask shapes;
  fine-tuning AnchorDETR needs its set-matching loss, which we do not implement).

The result is an official-layout checkpoint, loadable with :func:`cellsam_core.load_model` and by the
service.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cellsam_core.checkpoint import BUNDLED_WEIGHTS, load_model
from cellsam_core.configs import NanoConfig
from cellsam_core.training.data import prepare_example
from cellsam_core.training.trainer import TrainConfig, train

__all__ = ["finetune"]


def finetune(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    output: str | os.PathLike[str],
    weights: str | os.PathLike[str] | None = None,
    steps: int = 100,
    lr: float = 5e-4,
    batch_size: int = 2,
    seed: int = 0,
    num_threads: int | None = None,
) -> Path:
    """Fine-tune on annotated frames and write the weights.

    Parameters
    ----------
    images : sequence of np.ndarray
        Raw frames, ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` with ``C <= 3`` (the ``segment()``
        conventions), any numeric dtype; typically 1-10 of them.
    labels : sequence of np.ndarray
        ``(H, W)`` integer instance labels of each frame (0 = background).
    output : path
        Where the fine-tuned weights are written (an official-layout checkpoint).
    weights : path, optional
        Base model; default the bundled cellsam-nano weights.
    steps, lr, batch_size, seed : training settings (see :class:`TrainConfig`).
    num_threads : int, optional
        torch CPU threads; None leaves torch's setting.

    Returns
    -------
    Path
        ``output``.
    """
    if len(images) != len(labels) or not images:
        raise ValueError(
            f"need the same non-zero number of images and label images, got {len(images)} and {len(labels)}"
        )
    base = Path(weights) if weights is not None else BUNDLED_WEIGHTS
    model = load_model(base)
    is_nano = isinstance(model.config, NanoConfig)
    examples = [prepare_example(img, lab, model.image_size) for img, lab in zip(images, labels, strict=True)]
    del model
    out = Path(output)
    # The resumable state of so short a run is not worth keeping next to the output.
    with tempfile.TemporaryDirectory(prefix="cellsam-finetune-") as work:
        return train(
            _config(base, out, Path(work), steps, lr, batch_size, len(examples), seed, is_nano, num_threads),
            examples=examples,
        )


def _config(
    base: Path,
    out: Path,
    work: Path,
    steps: int,
    lr: float,
    batch_size: int,
    n_examples: int,
    seed: int,
    is_nano: bool,
    num_threads: int | None,
) -> TrainConfig:
    return TrainConfig(
        init_weights=base,
        output=out,
        work_dir=work,
        steps=steps,
        batch_size=min(batch_size, n_examples),
        lr=lr,
        warmup_steps=min(10, max(steps // 5, 0)),
        seed=seed,
        crop_size=None,
        train_detector=is_nano,
        train_image_encoder=is_nano,
        freeze_batchnorm=True,
        checkpoint_every=max(steps, 1),
        log_every=max(1, steps // 10),
        num_threads=num_threads,
    )
