"""Known-answer tests of cellsam_core.preprocess (reference semantics, section 3.1-3.3)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.draw import disk
from skimage.exposure import equalize_adapthist

from cellsam_core.errors import ImageFormatError
from cellsam_core.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    embedding_input,
    finder_input,
    format_image_shape,
    minmax_channels,
    normalize_image,
    resize_square,
    to_tensor,
)

PIXEL_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
PIXEL_STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
H, W = 20, 30


def _planes(n: int) -> np.ndarray:
    """(n, H, W) planes with distinct values so placement can be read back."""
    return np.stack([np.full((H, W), 10.0 * (k + 1)) for k in range(n)])


@dataclass(frozen=True)
class PlacementCase:
    name: str
    image: np.ndarray
    expected_channel_values: tuple[float, float, float]


PLACEMENT_CASES = [
    PlacementCase("HW", _planes(1)[0], (0.0, 0.0, 10.0)),
    PlacementCase("HW1", _planes(1).transpose(1, 2, 0), (0.0, 0.0, 10.0)),
    PlacementCase("HW2", _planes(2).transpose(1, 2, 0), (0.0, 10.0, 20.0)),
    PlacementCase("2HW", _planes(2), (0.0, 10.0, 20.0)),
    PlacementCase("3HW", _planes(3), (10.0, 20.0, 30.0)),
    PlacementCase("HW3", _planes(3).transpose(1, 2, 0), (10.0, 20.0, 30.0)),
    PlacementCase("HW3-uint16", _planes(3).transpose(1, 2, 0).astype(np.uint16), (10.0, 20.0, 30.0)),
]


@pytest.mark.parametrize("case", PLACEMENT_CASES, ids=lambda c: c.name)
def test_format_image_shape_places_channels_last(case: PlacementCase) -> None:
    out = format_image_shape(case.image)
    assert out.dtype == np.float64
    assert out.shape == (H, W, 3)
    for channel, value in enumerate(case.expected_channel_values):
        np.testing.assert_array_equal(out[:, :, channel], value)


def test_format_image_shape_channel_axis_is_first_minimum_on_ties() -> None:
    cube = np.arange(27, dtype=float).reshape(3, 3, 3)
    np.testing.assert_array_equal(format_image_shape(cube), np.moveaxis(cube, 0, -1))


@pytest.mark.parametrize(
    ("name", "image", "message"),
    [
        ("four-channels", np.zeros((H, W, 4)), "channels"),
        ("four-channels-first", np.zeros((4, H, W)), "channels"),
        ("1-D", np.zeros(10), "shape"),
        ("4-D", np.zeros((1, 3, H, W)), "shape"),
        ("empty", np.zeros((0, W)), "empty"),
        ("nan", np.where(np.eye(H, W) > 0, np.nan, 1.0), "non-finite"),
        ("inf", np.full((H, W), np.inf), "non-finite"),
        ("complex", np.zeros((H, W), dtype=complex), "dtype"),
        ("strings", np.full((H, W), "a"), "dtype"),
    ],
)
def test_format_image_shape_rejects(name: str, image: np.ndarray, message: str) -> None:
    with pytest.raises(ImageFormatError, match=message):
        format_image_shape(image)
    assert issubclass(ImageFormatError, ValueError)


def test_normalize_image_clips_at_999_percentile_of_nonzero_values() -> None:
    rng = np.random.default_rng(0)
    img = rng.uniform(1.0, 100.0, size=(64, 64))
    img[:8] = 0.0  # zeros are excluded from the percentile
    img[40, 40] = 1e6  # a hot pixel
    clipped = img.copy()
    upper = np.percentile(img[img != 0], 99.9)
    clipped[clipped > upper] = upper
    # The expected value chains the documented steps on the clipped channel.
    expected = equalize_adapthist(
        (clipped - clipped.min()) / (clipped.max() - clipped.min()), kernel_size=128
    )
    out = normalize_image(img)
    np.testing.assert_allclose(out[:, :, 2], expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(out[:, :, :2], 0.0)
    # Without the clip the hot pixel would squash every other value towards 0 before CLAHE.
    assert out[:, :, 2][8:].mean() > 0.2


def test_normalize_image_constant_channel_becomes_zero() -> None:
    rng = np.random.default_rng(1)
    img = np.stack([np.full((32, 32), 7.0), rng.uniform(0, 1, (32, 32)), np.zeros((32, 32))], axis=-1)
    out = normalize_image(img)
    np.testing.assert_array_equal(out[:, :, 0], 0.0)
    np.testing.assert_array_equal(out[:, :, 2], 0.0)
    assert out[:, :, 1].min() == 0.0
    assert out[:, :, 1].max() == 1.0


def test_to_tensor_layout_and_dtype() -> None:
    arr = np.random.default_rng(2).random((5, 7, 3))
    t = to_tensor(arr)
    assert t.shape == (1, 3, 5, 7)
    assert t.dtype == torch.float32
    np.testing.assert_array_equal(t[0, 1].numpy(), arr[:, :, 1].astype(np.float32))


def test_resize_square_identity_and_stretch() -> None:
    x = torch.rand(2, 3, 16, 16)
    assert resize_square(x, 16) is x
    y = resize_square(torch.rand(2, 3, 10, 40), 16)
    assert y.shape == (2, 3, 16, 16)
    # Bilinear antialiased interpolation, aspect ratio not kept.
    x2 = torch.rand(1, 3, 10, 40)
    expected = F.interpolate(x2, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(resize_square(x2, 16), expected, rtol=0, atol=0)


def test_resize_square_batch_equals_single_images() -> None:
    x = torch.rand(3, 3, 24, 18)
    batch = resize_square(x, 32)
    for b in range(3):
        assert torch.equal(batch[b], resize_square(x[b : b + 1], 32)[0])


def _disk_batch() -> torch.Tensor:
    img = np.zeros((2, 3, 32, 32), dtype=np.float32)
    rr, cc = disk((16, 16), 9)
    img[0, 2, rr, cc] = np.linspace(0.1, 0.9, rr.size, dtype=np.float32)
    img[0, 1, 2:6, 2:6] = 0.05
    img[1, 0] = np.random.default_rng(3).random((32, 32), dtype=np.float32)
    return torch.from_numpy(img)


def _percentile_window(image: np.ndarray) -> np.ndarray:
    nz = image[image != 0]
    p0, p1 = np.percentile(nz, [0, 99.5])
    return (np.clip(image, p0, p1) - p0) / (p1 - p0)


def test_embedding_input_plain_mode_matches_formula() -> None:
    x = _disk_batch()
    out = embedding_input(x, adv_mode=False, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD)
    assert out.shape == x.shape
    assert out.dtype == torch.float32
    mean = PIXEL_MEAN.numpy() / 255
    std = PIXEL_STD.numpy() / 255
    for b in range(2):  # the window is per image, joint over channels
        expected = (_percentile_window(x[b].numpy().astype(np.float64)) - mean) / std
        np.testing.assert_allclose(out[b].numpy(), expected, rtol=0, atol=1e-4)


def test_embedding_input_adv_mode_standardizes_each_channel() -> None:
    x = _disk_batch()
    out = embedding_input(x, adv_mode=True, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD)
    imagenet_mean = np.array(IMAGENET_MEAN)[:, None, None]
    imagenet_std = np.array(IMAGENET_STD)[:, None, None]
    for b in range(2):
        v = (_percentile_window(x[b].numpy().astype(np.float64)) - imagenet_mean) / imagenet_std
        lo = v.min(axis=(1, 2), keepdims=True)
        hi = v.max(axis=(1, 2), keepdims=True)
        v = (v - lo) / (hi - lo + 1e-6)
        expected = (v - PIXEL_MEAN.numpy() / 255) / (PIXEL_STD.numpy() / 255)
        np.testing.assert_allclose(out[b].numpy(), expected, rtol=0, atol=1e-4)
    plain = embedding_input(x, adv_mode=False, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD)
    assert not torch.allclose(out, plain)


def test_embedding_input_all_zero_image_gives_normalised_zeros() -> None:
    x = torch.zeros(1, 3, 8, 8)
    out = embedding_input(x, adv_mode=False, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD)
    expected = (-PIXEL_MEAN / 255) / (PIXEL_STD / 255)
    torch.testing.assert_close(out[0], expected.expand(3, 8, 8))


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0.0, 0), (0.999, 254), (1.0, 255), (0.5, 127), (1.5, 126), (2.0, 254), (-0.5, 129), (-1.0, 1)],
)
def test_finder_input_truncates_like_to_pil_image(value: float, expected: int) -> None:
    x = torch.full((1, 3, 4, 4), value, dtype=torch.float32)
    out = finder_input(x, adv_mode=False, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD)
    torch.testing.assert_close(out[0], ((expected - PIXEL_MEAN) / PIXEL_STD).expand(3, 4, 4))


def test_finder_input_matches_numpy_uint8_cast() -> None:
    rng = np.random.default_rng(4)
    x = rng.uniform(-3, 3, size=(1, 3, 16, 16)).astype(np.float32)
    with np.errstate(invalid="ignore"):  # numpy flags out-of-range casts; the reference does this cast
        q = (x * 255).astype(np.uint8).astype(np.float32)
    out = finder_input(torch.from_numpy(x), adv_mode=False, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD)
    expected = (q - PIXEL_MEAN.numpy()) / PIXEL_STD.numpy()
    np.testing.assert_array_equal(out.numpy(), expected.astype(np.float32))


def test_finder_input_adv_mode_to_rgb_fills_empty_channels() -> None:
    gray = np.zeros((1, 3, 16, 16), dtype=np.float32)
    gray[0, 2] = np.random.default_rng(5).random((16, 16), dtype=np.float32)
    out = finder_input(torch.from_numpy(gray), adv_mode=True, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD)
    # Channel 0 is constant -> standardised to 0; channel 1 (empty) copies channel 2.
    assert torch.all(out[0, 0] == 0)
    assert torch.equal(out[0, 1], out[0, 2])
    assert float(out[0, 2].max()) == pytest.approx(1.0, abs=1e-5)
    assert float(out[0, 2].min()) == 0.0


def test_finder_input_adv_mode_channel2_from_channel1() -> None:
    img = np.zeros((2, 3, 8, 8), dtype=np.float32)
    img[0, 1] = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)  # channel 2 empty in image 0
    img[1] = np.random.default_rng(6).random((3, 8, 8), dtype=np.float32)  # image 1 untouched
    out = finder_input(torch.from_numpy(img), adv_mode=True, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD)
    assert torch.equal(out[0, 2], out[0, 1])
    assert not torch.equal(out[1, 2], out[1, 1])
    plain = finder_input(torch.from_numpy(img), adv_mode=False, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD)
    assert not torch.equal(plain[0, 2], plain[0, 1])


@pytest.mark.parametrize("fn", [embedding_input, finder_input])
def test_batch_inputs_rejected_when_malformed(fn: object) -> None:
    with pytest.raises(ImageFormatError):
        fn(torch.zeros(3, 8, 8), adv_mode=False, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD)  # type: ignore[operator]


def test_minmax_channels_per_channel() -> None:
    img = np.stack([np.arange(12.0).reshape(3, 4), np.full((3, 4), 5.0)], axis=-1)
    out = minmax_channels(img)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[..., 0], np.arange(12.0).reshape(3, 4) / 11.0, rtol=1e-6)
    np.testing.assert_array_equal(out[..., 1], 5.0)  # constant channel left as is
    gray = minmax_channels(np.arange(20.0).reshape(4, 5))
    assert gray.min() == 0.0 and gray.max() == 1.0
    assert img[0, 1, 0] == 1.0  # input untouched
