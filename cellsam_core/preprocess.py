"""CellSAM input preprocessing: channel formatting, intensity normalisation and the two encoder inputs.

The functions reproduce the reference implementation (vanvalenlab/cellSAM, commit 35bc6e0) step by step so
that the same weights give the same labels. They use the same library calls wherever the exact numbers
depend on them (``numpy.percentile``, ``skimage.exposure.rescale_intensity`` and ``equalize_adapthist``,
torchvision's v2 ``resize`` and ``normalize``) and write the arithmetic around them in the same dtypes.

Pipeline for one frame::

    img (H, W) | (H, W, C≤3) | (C≤3, H, W)
      -> format_image_shape -> normalize_image        float64 (H, W, 3), values in [0, 1]
      -> to_tensor -> resize_square(·, 1024)          float32 (1, 3, 1024, 1024), stretched (aspect not kept)
      -> embedding_input(·)  -> SAM image encoder
      -> finder_input(·)     -> CellFinder detector

Differences from the reference, all on inputs the reference cannot handle:

* Non-finite values, empty images and non-numeric dtypes raise :class:`~cellsam_core.errors.ImageFormatError`
  instead of propagating NaN or failing deep inside skimage.
* An all-zero image makes the reference's percentile step return a tuple and crash; ours yields zeros.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.exposure import equalize_adapthist, rescale_intensity
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvf

from cellsam_core.errors import ImageFormatError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "embedding_input",
    "finder_input",
    "format_image_shape",
    "minmax_channels",
    "normalize_image",
    "resize_square",
    "to_tensor",
]

#: ImageNet statistics of the reference's ``T.Normalize`` (applied in adversarial mode only).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Percentile of the non-zero values each channel is clipped to in :func:`normalize_image`.
CLIP_PERCENTILE = 99.9
#: CLAHE kernel size of :func:`normalize_image` (pixels of the original image).
CLAHE_KERNEL_SIZE = 128
#: Joint percentile window of the embedding input (over all non-zero values of one image).
EMBEDDING_PERCENTILES: tuple[float, float] = (0.0, 99.5)
#: ``eps`` of the per-channel min-max standardisation (kornia ``normalize_min_max`` default).
STANDARDIZE_EPS = 1e-6


def format_image_shape(img: np.ndarray) -> np.ndarray:
    """Bring an image into the model's 3-channel layout.

    Parameters
    ----------
    img : np.ndarray
        ``(H, W)`` or 3-D with at most 3 channels on any axis. For 3-D input the channel axis is the
        shortest one (``np.argmin(img.shape)``, the first on ties), so ``(3, H, W)`` and ``(H, W, 3)``
        both work. Any real numeric or boolean dtype.

    Returns
    -------
    np.ndarray
        float64 ``(H, W, 3)``. The ``C`` input channels are written into the LAST ``C`` slots and the
        others are zero: grayscale goes to channel 2, two channels to channels 1 and 2, and a
        ``(blank, nuclear, membrane)`` image stays as it is (the layout CellSAM was trained on).

    Raises
    ------
    ImageFormatError
        Wrong number of dimensions, more than 3 channels, an empty image, a non-numeric dtype or
        non-finite values (NaN or inf).
    """
    arr = np.asarray(img)
    if arr.dtype != np.bool_ and not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ImageFormatError(
            f"image dtype {arr.dtype} is not a real number type; pass integer, float or bool pixels"
        )
    if arr.ndim == 2:
        arr = arr[..., None]
    elif arr.ndim == 3:
        channel_axis = int(np.argmin(arr.shape))
        arr = np.moveaxis(arr, channel_axis, -1)
    else:
        raise ImageFormatError(
            f"image has shape {arr.shape}; only (H, W), (H, W, C) or (C, H, W) with C <= 3 are supported"
        )
    height, width, channels = arr.shape
    if height == 0 or width == 0 or channels == 0:
        raise ImageFormatError(f"image of shape {np.asarray(img).shape} is empty; pass at least one pixel")
    if channels > 3:
        raise ImageFormatError(
            f"image has {channels} channels (shape {np.asarray(img).shape}); at most 3 are supported: "
            "pick the nuclear and membrane channels"
        )
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise ImageFormatError(
            f"image contains {n_bad} non-finite values (NaN or inf); replace them (e.g. np.nan_to_num) "
            "before segmenting"
        )
    out = np.zeros((height, width, 3), dtype=np.float64)
    out[:, :, 3 - channels :] = arr
    return out


def normalize_image(img: np.ndarray) -> np.ndarray:
    """Percentile-clip, min-max scale and CLAHE-equalise every channel, at the original resolution.

    Per channel: values above the 99.9th percentile of the channel's non-zero values are set to it (an
    all-zero channel stays zero); a constant channel becomes all zeros; any other channel is min-max
    scaled to [0, 1] (``rescale_intensity``) and equalised with ``equalize_adapthist(kernel_size=128)``.

    Parameters
    ----------
    img : np.ndarray
        Anything :func:`format_image_shape` accepts.

    Returns
    -------
    np.ndarray
        float64 ``(H, W, 3)`` with values in [0, 1].
    """
    image = format_image_shape(img)
    for channel in range(3):
        plane = image[:, :, channel]
        nonzero = plane[plane != 0]
        if nonzero.size:
            upper = np.percentile(nonzero, CLIP_PERCENTILE)
            plane[plane > upper] = upper
    for channel in range(3):
        plane = image[:, :, channel]
        if (plane == plane[0, 0]).all():
            image[:, :, channel] = 0.0
            continue
        scaled = rescale_intensity(plane, out_range=(0.0, 1.0))
        image[:, :, channel] = equalize_adapthist(scaled, kernel_size=CLAHE_KERNEL_SIZE)
    return image


def minmax_channels(img: np.ndarray) -> np.ndarray:
    """Whole-frame per-channel min-max to [0, 1] in float32: the step before tiling a large frame.

    The reference's ``cellsam_pipeline`` casts to float32 and scales each channel by its own min and max
    before cutting tiles (which are then normalised again by :func:`normalize_image`). A constant channel
    is left unchanged. ``(H, W)`` is one channel; ``(H, W, C)`` has channels last. Difference: the
    reference indexes ``img[..., i]`` for i = 0..2, which on a 2-D image scales columns 0-2 only; we scale
    the image.

    Returns
    -------
    np.ndarray
        float32, same shape as ``img`` (a copy).
    """
    out = np.array(img, dtype=np.float32)
    if out.ndim not in (2, 3):
        raise ImageFormatError(f"expected an (H, W) or (H, W, C) image, got shape {out.shape}")
    planes = [out] if out.ndim == 2 else [out[..., c] for c in range(out.shape[-1])]
    for plane in planes:
        lo, hi = plane.min(), plane.max()
        if hi - lo != 0:
            plane[...] = (plane - lo) / (hi - lo)
    return out


def to_tensor(img_hw3: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` array -> float32 tensor ``(1, 3, H, W)`` (float64 values rounded to nearest float32)."""
    arr = np.asarray(img_hw3)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageFormatError(f"expected an (H, W, 3) array, got shape {arr.shape}; see format_image_shape")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().unsqueeze(0)


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """Stretch ``(B, 3, H, W)`` float images to ``(B, 3, size, size)``; the aspect ratio is NOT kept.

    Bilinear, ``align_corners=False``, antialiased (torchvision v2 ``resize``, as the reference's
    ``T.Resize``). Returns the input itself when it already has that size.
    """
    _check_batch(x, "x")
    return tvf.resize(x, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)


def embedding_input(
    x_resized: torch.Tensor,
    *,
    adv_mode: bool,
    pixel_mean: torch.Tensor,
    pixel_std: torch.Tensor,
) -> torch.Tensor:
    """Input of the SAM image encoder (reference ``prep_2`` + ``sam_preprocess(div_255=True)``).

    1. Per image, jointly over its three channels: ``p0, p1`` = 0th and 99.5th percentiles of the
       non-zero values; ``rescale_intensity(x, in_range=(p0, p1), out_range="float32")`` (clip to
       [p0, p1], then ``(x - p0) / (p1 - p0)``; zeros map to 0). An all-zero image stays zero.
    2. If ``adv_mode``: ImageNet ``Normalize``, then per-channel min-max ``(x - min) / (max - min + 1e-6)``.
    3. ``(x - pixel_mean / 255) / (pixel_std / 255)``.

    Parameters
    ----------
    x_resized : torch.Tensor
        float32 ``(B, 3, S, S)``, the output of :func:`resize_square`; any device.
    adv_mode : bool
        Whether the checkpoint uses the adversarially trained encoder copy (``model_cp``).
    pixel_mean, pixel_std : torch.Tensor
        SAM's ``pixel_mean`` / ``pixel_std`` buffers, shape ``(3, 1, 1)``, on the 0-255 scale.

    Returns
    -------
    torch.Tensor
        float32 ``(B, 3, S, S)`` on the device of ``x_resized``.
    """
    _check_batch(x_resized, "x_resized")
    # The percentile statistic is per image and must be numpy's to match bit for bit: CPU copies.
    scaled = [
        torch.from_numpy(_percentile_rescale(image.detach().cpu().numpy().astype(np.float32, copy=False)))
        for image in x_resized
    ]
    x = torch.stack(scaled).to(x_resized.device)
    if adv_mode:
        x = _standardize(tvf.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD)))
    mean, std = _sam_stats(pixel_mean, pixel_std, x)
    return (x - mean / 255) / (std / 255)


def finder_input(
    x_resized: torch.Tensor,
    *,
    adv_mode: bool,
    pixel_mean: torch.Tensor,
    pixel_std: torch.Tensor,
) -> torch.Tensor:
    """Input of the CellFinder detector (reference ``sam_bbox_preprocessing(percentile=False)``).

    1. 8-bit quantisation as the reference's ``ToPILImage`` does it: ``(x * 255).astype(uint8)`` on
       float32, i.e. truncation toward zero (0.999 -> 254), out-of-range values wrapping modulo 256 the
       way x86 float->int32->uint8 casts do (1.5 -> 126, -0.5 -> 129; beyond ±2**31 -> 0). Only
       un-normalised inputs (``normalize=False``) leave [0, 1].
    2. ``(q - pixel_mean) / pixel_std`` (0-255 scale, no division by 255).
    3. If ``adv_mode``: ImageNet ``Normalize``, per-channel min-max ``(x - min) / (max - min + 1e-6)``,
       then the ToRGB fix: if ``max(ch1) == 0`` then ``ch1 = ch2``; then if ``max(ch2) == 0`` then
       ``ch2 = ch1`` (a grayscale frame becomes channels (0, g, g)).

    Parameters and returns as :func:`embedding_input`.
    """
    _check_batch(x_resized, "x_resized")
    q = _truncate_to_uint8(x_resized.float() * 255)
    mean, std = _sam_stats(pixel_mean, pixel_std, x_resized)
    x = (q.to(torch.float32) - mean) / std
    if adv_mode:
        x = _to_rgb(_standardize(tvf.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))))
    return x


def _check_batch(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ImageFormatError(f"{name} must be a (B, 3, H, W) tensor, got {shape}")
    if not x.is_floating_point():
        raise ImageFormatError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _sam_stats(
    pixel_mean: torch.Tensor, pixel_std: torch.Tensor, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.as_tensor(pixel_mean).to(device=like.device, dtype=torch.float32).reshape(3, 1, 1)
    std = torch.as_tensor(pixel_std).to(device=like.device, dtype=torch.float32).reshape(3, 1, 1)
    return mean, std


def _percentile_rescale(image: np.ndarray) -> np.ndarray:
    """Joint (0, 99.5) percentile window over the non-zero values of a float32 ``(3, S, S)`` image."""
    nonzero = image[image != 0]
    if nonzero.size == 0:
        return np.zeros_like(image)
    low, high = np.percentile(nonzero, list(EMBEDDING_PERCENTILES))
    out: np.ndarray = rescale_intensity(image, in_range=(low, high), out_range="float32")
    return np.ascontiguousarray(out, dtype=np.float32)


def _standardize(x: torch.Tensor) -> torch.Tensor:
    """Per image and channel min-max over H·W, ``eps`` in the denominator (kornia normalize_min_max)."""
    x_min = x.amin(dim=(-2, -1), keepdim=True)
    x_max = x.amax(dim=(-2, -1), keepdim=True)
    return (x - x_min) / (x_max - x_min + STANDARDIZE_EPS)


def _to_rgb(x: torch.Tensor) -> torch.Tensor:
    """ToRGB: fill an all-zero-max channel 1 from channel 2, then channel 2 from channel 1 (per image)."""
    x = x.clone()
    ch1_empty = (x[:, 1].amax(dim=(-2, -1)) == 0)[:, None, None]
    x[:, 1] = torch.where(ch1_empty, x[:, 2], x[:, 1])
    ch2_empty = (x[:, 2].amax(dim=(-2, -1)) == 0)[:, None, None]
    x[:, 2] = torch.where(ch2_empty, x[:, 1], x[:, 2])
    return x


def _truncate_to_uint8(v: torch.Tensor) -> torch.Tensor:
    """numpy's float32 -> uint8 ``astype`` on x86, without its 'invalid value' warning.

    The C cast goes through a truncating float -> int32 conversion (out-of-range and NaN give INT_MIN,
    whose low byte is 0) and keeps the low byte.
    """
    t = torch.trunc(v)
    in_range = (t >= -(2.0**31)) & (t < 2.0**31)
    as_int = torch.where(in_range, t, torch.zeros_like(t)).to(torch.int64)
    return torch.bitwise_and(as_int, 0xFF).to(torch.uint8)
