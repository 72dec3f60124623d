"""Training data: synthetic live-cell frames across modalities, prepared exactly as inference prepares them.

Every example goes through the inference path's own functions
(:func:`~cellsam_core.preprocess.normalize_image`, :func:`~cellsam_core.preprocess.resize_square`,
then :func:`~cellsam_core.preprocess.embedding_input` /
:func:`~cellsam_core.preprocess.finder_input` at batch time), so the model is trained on the very tensors
``segment()`` will give it. Examples are stored compactly as the 8-bit normalised image CellFinder sees
(``trunc(255 * x)``, which :func:`~cellsam_core.preprocess.finder_input` computes anyway) and the label
image resized to the model input with nearest-neighbour sampling.

Photometric augmentation (gamma, blur, extra noise, background, brightness) acts on the raw frame before
normalisation, because normalisation would undo most of it afterwards; geometric augmentation (flips,
90° rotations) acts on the prepared tensors at batch time, where it is cheap and exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from cellsam_core import preprocess
from cellsam_core.synthetic import MODALITIES, SyntheticMovie

#: Synthetic modalities kept out of training, to measure generalisation and few-shot fine-tuning on
#: modalities the model never saw.
HELD_OUT: tuple[str, ...] = ("dic", "stained", "membrane")
#: What the default model trains on: every other synthetic modality, plus frames with no cells at all.
TRAINING_MODALITIES: tuple[str, ...] = (*(m for m in MODALITIES if m not in HELD_OUT), "empty")

__all__ = [
    "HELD_OUT",
    "TRAINING_MODALITIES",
    "PreparedExample",
    "augment_batch",
    "model_inputs",
    "prepare_example",
    "random_frame",
    "synthetic_examples",
]


@dataclass(frozen=True)
class PreparedExample:
    """One training example at the model input size ``S``.

    Attributes
    ----------
    image : np.ndarray
        ``uint8 (3, S, S)``: the normalised, resized frame quantised as CellFinder quantises it.
    labels : np.ndarray
        ``int32 (S, S)``: instance labels (0 = background), nearest-neighbour resized.
    """

    image: np.ndarray
    labels: np.ndarray


def prepare_example(image: np.ndarray, labels: np.ndarray, image_size: int) -> PreparedExample:
    """Normalise and resize a raw frame and its labels as :func:`cellsam_core.inference.encode` does.

    Parameters
    ----------
    image : np.ndarray
        Raw frame, ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` with ``C <= 3``, any numeric dtype.
    labels : np.ndarray
        ``(H, W)`` integer instance labels of the frame.
    image_size : int
        Side ``S`` of the square model input.
    """
    normed = preprocess.normalize_image(np.asarray(image))
    x = preprocess.resize_square(preprocess.to_tensor(normed), image_size)[0]
    q = torch.clamp(torch.trunc(x * 255), 0, 255).to(torch.uint8).numpy()
    lab = np.asarray(labels)
    if lab.shape != normed.shape[:2]:
        raise ValueError(f"labels of shape {lab.shape} do not match the image's (H, W) {normed.shape[:2]}")
    h, w = lab.shape
    rows = np.minimum((np.arange(image_size) + 0.5) * h / image_size, h - 1).astype(np.int64)
    cols = np.minimum((np.arange(image_size) + 0.5) * w / image_size, w - 1).astype(np.int64)
    return PreparedExample(image=q, labels=lab[rows][:, cols].astype(np.int32))


def random_frame(rng: np.random.Generator, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic frame with randomised geometry and photometric augmentation.

    Varies frame size and aspect (so cells are seen at several scales and stretches after resizing),
    density, cell radius and shape, texture, brightness (including a few small, very bright condensed
    nuclei), blur, noise, gamma, illumination ramps and vignetting. ``modality`` is
    one of :data:`~cellsam_core.synthetic.MODALITIES` or ``"empty"``: a frame of a random modality with
    no cells at all (background, noise and illumination only), so the detector learns to find nothing.
    Returns ``(image float32 (H, W) or (H, W, 2), labels int32 (H, W))``.
    """
    empty = modality == "empty"
    if empty:
        modality = str(rng.choice([m for m in TRAINING_MODALITIES if m != "empty"]))
    side = int(rng.choice([256, 256, 320, 384, 512]))
    base = side / 256
    # Non-square fields (the model input stretches them to a square, squashing the cells).
    shape = (side, side)
    if rng.random() < 0.35:
        other = int(side * rng.uniform(0.55, 0.9)) // 8 * 8
        shape = (side, other) if rng.random() < 0.5 else (other, side)
    r_lo = float(rng.uniform(4.0, 9.0)) * base
    if modality == "bacteria":
        r_lo = float(rng.uniform(3.5, 7.0)) * base
    r_hi = r_lo * float(rng.uniform(1.2, 1.9))
    # Density: from sparse to crowded (touching, overlapping) fields; tissue always fills the field.
    area_frac = 1.0 if modality == "tissue" else float(rng.uniform(0.1, 0.65))
    area = shape[0] * shape[1]
    n_cells = 0 if empty else max(1, int(area_frac * area / (np.pi * ((r_lo + r_hi) / 2) ** 2)))
    n_frames = int(rng.integers(1, 4))
    movie = SyntheticMovie(
        shape,
        n_frames,
        seed=int(rng.integers(2**31)),
        modality=modality,  # type: ignore[arg-type]
        n_cells=n_cells,
        cell_radius=(r_lo, r_hi),
        dtype=np.float32,
        elongation=(1.0, float(rng.uniform(1.3, 2.2))),
        texture=(float(rng.uniform(0.1, 0.6)), float(rng.uniform(1.0, 3.0))),
        bright_fraction=float(rng.uniform(0.0, 0.12)),
        brightness_spread=float(rng.uniform(0.2, 0.6)),
    )
    image, labels = movie[n_frames - 1]
    image = image.astype(np.float32)
    lo = float(image.min())
    scaled = (image - lo) / max(float(image.max()) - lo, 1e-6)
    if rng.random() < 0.5:
        scaled = scaled ** float(rng.uniform(0.6, 1.6))
    if rng.random() < 0.4:
        sigma = float(rng.uniform(0.3, 1.5))
        sig = (sigma, sigma, 0.0) if scaled.ndim == 3 else sigma
        scaled = ndimage.gaussian_filter(scaled, sig)
    if rng.random() < 0.4:
        scaled = scaled + rng.normal(0.0, float(rng.uniform(0.005, 0.05)), scaled.shape).astype(np.float32)
    yy = np.linspace(-1.0, 1.0, shape[0], dtype=np.float32)[:, None]
    xx = np.linspace(-1.0, 1.0, shape[1], dtype=np.float32)[None, :]
    if rng.random() < 0.3:
        ramp = float(rng.uniform(-0.2, 0.2)) * yy + float(rng.uniform(-0.2, 0.2)) * xx
        scaled = scaled + (ramp[..., None] if scaled.ndim == 3 else ramp)
    if rng.random() < 0.3:
        # Vignetting: illumination falling off towards the corners.
        cy, cx = rng.uniform(-0.3, 0.3, 2)
        falloff = 1.0 - float(rng.uniform(0.1, 0.5)) * ((yy - cy) ** 2 + (xx - cx) ** 2) / 2.0
        scaled = scaled * (falloff[..., None] if scaled.ndim == 3 else falloff)
    return scaled.astype(np.float32), labels


def synthetic_examples(
    n: int,
    *,
    seed: int,
    image_size: int,
    modalities: Sequence[str] = TRAINING_MODALITIES,
    start: int = 0,
) -> list[PreparedExample]:
    """Examples ``start .. start + n - 1`` of the sequence that cycles through ``modalities``.

    Example ``i`` depends only on ``(seed, i)``, so the same arguments give the same list and a long
    sequence can be prepared in parts (in parallel) and concatenated.
    """
    known = (*MODALITIES, "empty")
    unknown = [m for m in modalities if m not in known]
    if unknown or not modalities:
        raise ValueError(f"modalities must be a non-empty subset of {known}, got {list(modalities)}")
    out = []
    for i in range(start, start + n):
        rng = np.random.default_rng([seed, i])
        image, labels = random_frame(rng, modalities[i % len(modalities)])
        out.append(prepare_example(image, labels, image_size))
    return out


def augment_batch(
    images: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random flips and 90° rotations, per example.

    Parameters
    ----------
    images : np.ndarray
        ``uint8 (B, 3, S, S)``.
    labels : np.ndarray
        ``int32 (B, S, S)``.
    """
    out_i, out_l = [], []
    for img, lab in zip(images, labels, strict=True):
        k = int(rng.integers(4))
        img, lab = np.rot90(img, k, axes=(1, 2)), np.rot90(lab, k)
        if rng.random() < 0.5:
            img, lab = img[:, :, ::-1], lab[:, ::-1]
        out_i.append(np.ascontiguousarray(img))
        out_l.append(np.ascontiguousarray(lab))
    return np.stack(out_i), np.stack(out_l)


def model_inputs(
    images: np.ndarray, *, pixel_mean: torch.Tensor, pixel_std: torch.Tensor, adv_mode: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SAM-encoder and CellFinder inputs of a batch of prepared images.

    Parameters
    ----------
    images : np.ndarray
        ``uint8 (B, 3, S, S)`` from :class:`PreparedExample`.
    pixel_mean, pixel_std : torch.Tensor
        The model's SAM pixel statistics ``(3, 1, 1)`` on the 0-255 scale.
    adv_mode : bool
        The model's ``adv_mode`` (the official checkpoint's extra normalisation).

    Returns
    -------
    (embedding_input, finder_input) : tuple of torch.Tensor
        float32 ``(B, 3, S, S)`` each, as :mod:`cellsam_core.preprocess` computes them.
    """
    # The half-step makes trunc(255 * x) give back exactly the stored byte inside finder_input.
    x = (torch.from_numpy(images).float() + 0.5) / 255.0
    emb = preprocess.embedding_input(x, adv_mode=adv_mode, pixel_mean=pixel_mean, pixel_std=pixel_std)
    fin = preprocess.finder_input(x, adv_mode=adv_mode, pixel_mean=pixel_mean, pixel_std=pixel_std)
    return emb, fin
