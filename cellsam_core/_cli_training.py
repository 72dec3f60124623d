"""``cellsam-stream train | finetune | evaluate``: argument parsing only, the work is in
:mod:`cellsam_core.training` and :mod:`cellsam_core.evaluation`.

:func:`add_training_commands` registers the three subcommands; each parsed namespace carries ``func``, which
returns the exit code: 0 success, 1 the work failed (unreadable files, bad weights or config).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from cellsam_core.errors import CellSAMError

__all__ = ["add_training_commands"]


def _add_annotated_inputs(p: argparse.ArgumentParser) -> None:
    """``--images`` and ``--labels``: annotated frames, as fine-tuning and evaluation take them."""
    p.add_argument("--images", type=Path, nargs="+", required=True, help="image files (.tif, .png, .npy)")
    p.add_argument("--labels", type=Path, nargs="+", required=True, help="label images, same order")


def add_training_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``train``, ``finetune`` and ``evaluate`` on ``subparsers`` (from ``add_subparsers()``)."""
    p = subparsers.add_parser(
        "train",
        help="train a cellsam-nano model on synthetic frames",
        description="Train a model with the recipe of docs/models.md (seeded, checkpointed, resumable).",
    )
    p.add_argument("--config", type=Path, default=None, help="YAML file of TrainConfig fields")
    p.add_argument("--output", "-o", type=Path, default=None, help="weights file to write")
    p.add_argument("--steps", type=int, default=None, help="total optimisation steps (overrides the config)")
    p.add_argument("--resume", action="store_true", help="continue from the run's saved training state")
    p.set_defaults(func=_run_train)

    p = subparsers.add_parser(
        "prepare-data",
        help="write synthetic training frames (an .npz for the train recipe's data_files)",
        description="Generate prepared synthetic training examples (docs/models.md, 'Data').",
    )
    p.add_argument("output", type=Path, help=".npz file to write (images uint8 (N,3,S,S), labels int16)")
    p.add_argument("--frames", type=int, required=True, help="number of examples")
    p.add_argument("--seed", type=int, required=True, help="seed of the sequence of examples")
    p.add_argument("--image-size", type=int, default=256, help="model input side (256 for cellsam-nano)")
    p.add_argument("--modalities", nargs="+", default=None, help="default: the training modalities")
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    p.set_defaults(func=_run_prepare)

    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a model on a few annotated frames",
        description="Few-shot fine-tuning of the bundled model (default) or of official-layout weights.",
    )
    _add_annotated_inputs(p)
    p.add_argument("--weights", type=Path, default=None, help="base weights (default: bundled cellsam-nano)")
    p.add_argument("-o", "--output", type=Path, required=True, help="fine-tuned weights file to write")
    p.add_argument("--steps", type=int, default=100, help="optimisation steps (default 100)")
    p.add_argument("--lr", type=float, default=5e-4, help="learning rate (default 5e-4)")
    p.set_defaults(func=_run_finetune)

    p = subparsers.add_parser(
        "evaluate",
        help="segment annotated images and print F1 / precision / recall",
        description="Segment each image and print instance metrics at IoU 0.50-0.90 (one-to-one matching).",
    )
    _add_annotated_inputs(p)
    p.add_argument("--weights", type=Path, default=None, help="weights file (default: bundled cellsam-nano)")
    p.add_argument("--model", default=None, help="architecture name; inferred from the weights by default")
    p.set_defaults(func=_run_evaluate)


def _read_pairs(images: list[Path], labels: list[Path]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    from cellsam_core.io import read_image

    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} label images; give them in pairs")
    return [read_image(p) for p in images], [read_image(p) for p in labels]


def _fail(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 1


def _run_train(args: argparse.Namespace) -> int:
    from cellsam_core.training import TrainConfig, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        config = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
        updates = {k: v for k, v in (("output", args.output), ("steps", args.steps)) if v is not None}
        config = TrainConfig.model_validate({**config.model_dump(), **updates})
        path = train(config, resume=args.resume)
    except (CellSAMError, ValidationError, ValueError, OSError) as err:
        return _fail(err)
    print(path)
    return 0


def _run_prepare(args: argparse.Namespace) -> int:
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    from tqdm import tqdm

    from cellsam_core.training.data import TRAINING_MODALITIES

    if args.frames < 1:
        return _fail(ValueError(f"--frames must be at least 1, got {args.frames}"))
    modalities = tuple(args.modalities or TRAINING_MODALITIES)
    chunk = 25
    starts = list(range(0, args.frames, chunk))
    make = partial(_prepare_chunk, seed=args.seed, image_size=args.image_size, modalities=modalities)
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    try:
        workers = max(1, args.workers or os.cpu_count() or 1)
        # Spawned, not forked: the parent may hold torch (OpenMP) and other threads, which a fork copies
        # in an undefined state.
        context = multiprocessing.get_context("spawn")
        with (
            ProcessPoolExecutor(workers, mp_context=context) as pool,
            tqdm(total=args.frames, unit="frame", desc="prepare") as bar,
        ):
            for part_images, part_labels in pool.map(
                make, starts, [min(chunk, args.frames - s) for s in starts]
            ):
                images.append(part_images)
                labels.append(part_labels)
                bar.update(len(part_images))
        args.output.parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.output, images=np.concatenate(images), labels=np.concatenate(labels))
    except (ValueError, OSError) as err:
        return _fail(err)
    print(f"wrote {args.frames} examples ({', '.join(modalities)}) to {args.output}")
    return 0


def _prepare_chunk(
    start: int, n: int, *, seed: int, image_size: int, modalities: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
    from cellsam_core.threads import intra_op_threads
    from cellsam_core.training.data import synthetic_examples

    with intra_op_threads(1):
        ex = synthetic_examples(n, seed=seed, image_size=image_size, modalities=modalities, start=start)
    return np.stack([e.image for e in ex]), np.stack([e.labels for e in ex]).astype(np.int16)


def _run_finetune(args: argparse.Namespace) -> int:
    from cellsam_core.training import finetune

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        images, labels = _read_pairs(args.images, args.labels)
        path = finetune(
            images, labels, output=args.output, weights=args.weights, steps=args.steps, lr=args.lr
        )
    except (CellSAMError, ValueError, OSError) as err:
        return _fail(err)
    print(path)
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cellsam_core.checkpoint import BUNDLED_WEIGHTS, load_model
    from cellsam_core.training.assess import evaluate_model

    try:
        images, labels = _read_pairs(args.images, args.labels)
        model = load_model(args.weights or BUNDLED_WEIGHTS, args.model)
        with tqdm(total=len(images), unit="image", desc="evaluate", disable=len(images) < 2) as bar:
            result = evaluate_model(model, images, labels, on_image=lambda done, _: bar.update(done - bar.n))
    except (CellSAMError, ValueError, OSError) as err:
        return _fail(err)
    print(f"{len(images)} images, {sum(c[0.5].tp + c[0.5].fn for c in result.per_image)} annotated objects")
    print(result.table())
    return 0
