"""Training loop: seeded, reproducible, checkpointed and resumable. ``train(TrainConfig) -> weights path``.

Reproducibility: all randomness of step ``t`` (which examples, augmentation, input variant, prompt
sampling and jitter) comes from ``numpy.random.default_rng([seed, t])``, and the model is built after
``torch.manual_seed(seed)``. A run resumed from a checkpoint at step ``t`` therefore continues exactly as
the uninterrupted run would (given the same number of threads; results can differ across machines).
The learning-rate schedule (linear warm-up, then step decays at fixed steps) does not depend on the total
number of steps, so extending a run with more steps is the same as having asked for them at the start.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field

from cellsam_core.checkpoint import load_model, save_model
from cellsam_core.modeling.cellsam import CellSAM
from cellsam_core.modeling.nano import DenseDetector, NanoImageEncoder
from cellsam_core.registry import build_model
from cellsam_core.training import losses
from cellsam_core.training.data import (
    TRAINING_MODALITIES,
    PreparedExample,
    augment_batch,
    model_inputs,
    synthetic_examples,
)

__all__ = ["TrainConfig", "train"]

log = logging.getLogger(__name__)

_STATE_FILE = "train_state.pt"
#: Settings that may differ between a run and its resumption (they do not change the trajectory).
_RESUMABLE_CHANGES = frozenset({"steps", "output", "work_dir", "log_every", "checkpoint_every"})


class TrainConfig(BaseModel):
    """Everything a training (or fine-tuning) run depends on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field("cellsam_nano", description="Registry name of the architecture to build.")
    init_weights: Path | None = Field(
        None, description="Start from these weights (an official-layout checkpoint) instead of random ones."
    )
    output: Path = Field(Path("cellsam_nano.pt"), description="Where the final weights are written.")
    work_dir: Path | None = Field(
        None, description="Directory of the resumable training state; default '<output>.work/'."
    )
    steps: int = Field(4000, ge=0, description="Total optimisation steps.")
    batch_size: int = Field(4, ge=1, description="Frames per step.")
    lr: float = Field(2e-3, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(100, ge=0, description="Linear learning-rate warm-up steps.")
    lr_drops: tuple[int, ...] = Field(
        (), description="Steps at which the learning rate is multiplied by 0.2 (fixed, for resumability)."
    )
    seed: int = Field(0, description="Seed of the model initialisation, the data and every step.")
    n_examples: int = Field(400, ge=1, description="Synthetic frames generated when no data_files are given.")
    modalities: tuple[str, ...] = Field(
        TRAINING_MODALITIES, description="Synthetic modalities to train on ('empty': frames without cells)."
    )
    data_files: tuple[Path, ...] = Field(
        (),
        description="Prepared examples (.npz with 'images' uint8 (N, 3, S, S) and 'labels' (N, S, S)) "
        "used instead of generating frames.",
    )
    crop_size: int | None = Field(
        128,
        gt=0,
        multiple_of=32,
        description="Train on random crops of this side (offsets on the stride-32 lattice) for speed; "
        "None trains on whole model inputs. Box prompts and SAM's positional encodings keep the crop's "
        "absolute position, so the crop is exactly a window of the full-input computation.",
    )
    prompts_per_image: int = Field(6, ge=1, description="Box prompts (cells) per frame for the mask loss.")
    box_jitter: float = Field(0.1, ge=0, description="Box prompt jitter as a fraction of the box size.")
    mask_weight: float = Field(1.0, ge=0, description="Weight of the mask loss (BCE + Dice).")
    iou_weight: float = Field(1.0, ge=0, description="Weight of the IoU-prediction MSE.")
    box_weight: float = Field(1.0, ge=0, description="Weight of the box L1 loss.")
    train_detector: bool = Field(True, description="Optimise the detector (off: masks only).")
    train_image_encoder: bool = Field(
        True, description="Optimise SAM's image encoder (off: it runs without gradients)."
    )
    freeze_batchnorm: bool = Field(
        False, description="Keep BatchNorm statistics fixed (fine-tuning on a handful of frames)."
    )
    checkpoint_every: int = Field(500, ge=1, description="Write the resumable state every this many steps.")
    log_every: int = Field(50, ge=1, description="Log losses every this many steps.")
    num_threads: int | None = Field(1, ge=1, description="torch CPU threads (None leaves torch's default).")

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """Read a YAML mapping of the fields above."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(
                f"{path} must hold a YAML mapping of TrainConfig fields, got {type(data).__name__}"
            )
        return cls.model_validate(data)

    @property
    def state_dir(self) -> Path:
        """Directory of the resumable state."""
        return self.work_dir or self.output.with_name(self.output.name + ".work")


def _lr_factor(step: int, config: TrainConfig) -> float:
    warm = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    return warm * 0.2 ** sum(step >= s for s in config.lr_drops)


def _load_examples(config: TrainConfig, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    if config.data_files:
        images, labels = [], []
        for path in config.data_files:
            with np.load(path) as data:
                images.append(data["images"])
                labels.append(data["labels"])
        imgs, labs = np.concatenate(images), np.concatenate(labels)
    else:
        ex = synthetic_examples(
            config.n_examples, seed=config.seed, image_size=image_size, modalities=config.modalities
        )
        imgs, labs = np.stack([e.image for e in ex]), np.stack([e.labels for e in ex])
    if imgs.shape[-1] != image_size or labs.shape[-1] != image_size:
        raise ValueError(
            f"training examples are {imgs.shape[-1]} pixels wide but the model takes {image_size}; "
            "prepare them at the model input size"
        )
    return imgs, labs


def _trainable(model: CellSAM, config: TrainConfig) -> list[torch.nn.Parameter]:
    modules: list[torch.nn.Module] = [model.sam.prompt_encoder, model.sam.mask_decoder]
    if config.train_image_encoder:
        modules.append(model.sam.image_encoder)
    if config.train_detector:
        modules.append(model.cellfinder)
    seen: dict[int, torch.nn.Parameter] = {}
    for m in modules:
        for p in m.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def _crop(
    images: np.ndarray, labels: np.ndarray, crop: int | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """A random window of the batch (one offset for the whole batch), on the stride-32 lattice."""
    size = images.shape[-1]
    if crop is None or crop >= size:
        return images, labels, (0, 0)
    oy, ox = (int(v) * 32 for v in rng.integers(0, (size - crop) // 32 + 1, size=2))
    window = (slice(oy, oy + crop), slice(ox, ox + crop))
    return (
        np.ascontiguousarray(images[:, :, window[0], window[1]]),
        np.ascontiguousarray(labels[:, window[0], window[1]]),
        (oy, ox),
    )


def _features(
    model: CellSAM, images: np.ndarray, rng: np.random.Generator, config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM embedding ``(B, C, h, w)`` and detector memory of a batch of prepared images."""
    sam = model.sam
    emb_in, fin_in = model_inputs(
        images, pixel_mean=sam.pixel_mean, pixel_std=sam.pixel_std, adv_mode=model.adv_mode
    )
    encoder, detector = sam.image_encoder, model.cellfinder.decode_head
    if not config.train_image_encoder:
        with torch.no_grad():
            embedding = encoder(emb_in)
            memory = detector.encode(fin_in)
        return embedding, memory
    if isinstance(encoder, NanoImageEncoder) and isinstance(detector, DenseDetector):
        # One pass of the shared trunk serves both heads; its input alternates between the two
        # normalisations (they differ by a percentile stretch and 8-bit quantisation) so the trunk
        # serves both equally well at inference.
        feat = encoder.trunk(emb_in if rng.random() < 0.5 else fin_in)
        return encoder.neck(feat), detector.proj(feat)
    return encoder(emb_in), detector.encode(fin_in)


def _step_losses(
    model: CellSAM, images: np.ndarray, labels: np.ndarray, rng: np.random.Generator, config: TrainConfig
) -> dict[str, torch.Tensor]:
    images, labels, (oy, ox) = _crop(images, labels, config.crop_size, rng)
    embedding, memory = _features(model, images, rng, config)
    out: dict[str, torch.Tensor] = {}
    detector = model.cellfinder.decode_head
    if config.train_detector:
        if not isinstance(detector, DenseDetector):
            raise ValueError(
                "detector training is implemented for the dense cellsam-nano detector; for the official "
                "AnchorDETR CellFinder set train_detector=False (masks only)"
            )
        heat, box = detector.raw_outputs(memory)
        targets = losses.detection_targets(labels, detector.stride)
        out["heat"] = losses.focal_heatmap_loss(heat, targets.heat, targets.centre)
        out["box"] = config.box_weight * losses.box_loss(box, targets.box, targets.centre)
    sam = model.sam
    # The crop's window of SAM's absolute positional encoding (the embedding grid has stride
    # image_size / grid).
    stride = model.image_size // sam.prompt_encoder.image_embedding_size[0]
    gy, gx = oy // stride, ox // stride
    gh, gw = embedding.shape[-2:]
    dense_pe = sam.prompt_encoder.get_dense_pe()[:, :, gy : gy + gh, gx : gx + gw]
    offset = np.array([ox, oy, ox, oy], np.float32)
    mask_terms, iou_terms = [], []
    for b in range(images.shape[0]):
        boxes, masks = losses.sample_prompts(labels[b], config.prompts_per_image, rng, config.box_jitter)
        if boxes.shape[0] == 0:
            continue
        prompt = torch.from_numpy(boxes + offset)[:, None, :]
        sparse, dense = sam.prompt_encoder(points=None, boxes=prompt, masks=None)
        dense = dense[:, :, gy : gy + gh, gx : gx + gw]
        low_res, iou = sam.mask_decoder(
            image_embeddings=embedding[b : b + 1],
            image_pe=dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        size = labels.shape[-1]
        if low_res.shape[-1] != size:
            low_res = torch.nn.functional.interpolate(
                low_res, (size, size), mode="bilinear", align_corners=False
            )
        m, i = losses.mask_losses(low_res[:, 0], iou[:, 0], torch.from_numpy(masks))
        mask_terms.append(m)
        iou_terms.append(i)
    if mask_terms:
        out["mask"] = config.mask_weight * torch.stack(mask_terms).mean()
        out["iou"] = config.iou_weight * torch.stack(iou_terms).mean()
    return out


def _save_state(
    path: Path, model: CellSAM, optimizer: torch.optim.Optimizer, step: int, config: TrainConfig
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "config": config.model_dump_json(exclude=set(_RESUMABLE_CHANGES)),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _initial_model(config: TrainConfig) -> CellSAM:
    torch.manual_seed(config.seed)
    if config.init_weights is not None:
        return load_model(config.init_weights)
    return build_model(config.model)


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    examples: Sequence[PreparedExample] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> Path:
    """Train (or fine-tune) a model and write its weights as an official-layout checkpoint.

    Parameters
    ----------
    config : TrainConfig
    resume : bool
        Continue from ``config.state_dir`` if a state is there (from an earlier, interrupted or shorter
        run with the same settings); otherwise start afresh.
    examples : sequence of PreparedExample, optional
        Training data at the model input size; by default ``config.data_files`` or synthetic frames.
    on_step : callable, optional
        Called after every step with the step number (1-based) and the loss terms (progress hooks, tests).

    Returns
    -------
    Path
        ``config.output``, loadable with :func:`cellsam_core.load_model`.
    """
    previous_threads = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    try:
        return _train(config, resume, examples, on_step)
    finally:
        # The thread count is process-global; leave it as the caller had it.
        torch.set_num_threads(previous_threads)


def _train(
    config: TrainConfig,
    resume: bool,
    examples: Sequence[PreparedExample] | None,
    on_step: Callable[[int, dict[str, float]], None] | None,
) -> Path:
    model = _initial_model(config)
    size = model.image_size
    if examples is not None:
        if not examples:
            raise ValueError("examples is empty; pass at least one annotated frame")
        images = np.stack([e.image for e in examples])
        labels = np.stack([e.labels for e in examples])
    else:
        images, labels = _load_examples(config, size)
    params = _trainable(model, config)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    state_path = config.state_dir / _STATE_FILE
    start = 0
    if resume and state_path.is_file():
        state: dict[str, Any] = torch.load(state_path, map_location="cpu", weights_only=True)
        # Compared as validated configs, so fields added since the state was written take their defaults.
        saved = TrainConfig.model_validate(
            {**json.loads(state["config"]), **{k: getattr(config, k) for k in _RESUMABLE_CHANGES}}
        )
        if saved != config:
            raise ValueError(
                f"the training state in {state_path} was written with other settings; resume with the same "
                f"config (only {', '.join(sorted(_RESUMABLE_CHANGES))} may change) or delete that directory"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        log.info("resumed from %s at step %d", state_path, start)
    model.train()
    if config.freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
    t0 = time.perf_counter()
    running: dict[str, float] = {}
    for step in range(start, config.steps):
        rng = np.random.default_rng([config.seed, step])
        idx = rng.choice(images.shape[0], size=min(config.batch_size, images.shape[0]), replace=False)
        batch_images, batch_labels = augment_batch(images[idx], labels[idx].astype(np.int32), rng)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(step, config)
        terms = _step_losses(model, batch_images, batch_labels, rng, config)
        loss = torch.stack(list(terms.values())).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        optimizer.step()
        values = {k: float(v.detach()) for k, v in terms.items()}
        for k, v in values.items():
            running[k] = running.get(k, 0.0) + v
        done = step + 1
        if on_step is not None:
            on_step(done, values)
        if done % config.log_every == 0 or done == config.steps:
            n = done % config.log_every or config.log_every
            rate = (done - start) / max(time.perf_counter() - t0, 1e-9)
            text = " ".join(f"{k}={v / n:.4f}" for k, v in running.items())
            log.info("step %d/%d %s (%.2f steps/s)", done, config.steps, text, rate)
            running = {}
        if done % config.checkpoint_every == 0 or done == config.steps:
            _save_state(state_path, model, optimizer, done, config)
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"loss became {float(loss.detach())} at step {step}; lower lr")
    model.eval()
    config.output.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, config.output)
    return config.output
