"""Synthetic live-cell generator: determinism, label/image consistency, modalities, dynamics."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from scipy import ndimage

from cellsam_core.synthetic import MODALITIES, SyntheticMovie, synthetic_frame
from cellsam_core.synthetic_cells import paint


@dataclass(frozen=True)
class Case:
    name: str
    modality: str
    image_shape: tuple[int, ...]
    bright_cells: bool  # fluorescence: cells brighter than background; phase: darker


CASES = [
    Case("nuclear", "nuclear", (96, 128), True),
    Case("whole_cell", "whole_cell", (96, 128), True),
    Case("multiplexed", "multiplexed", (96, 128, 2), True),
    Case("phase", "phase", (96, 128), False),
]


def _boundary(labels: np.ndarray) -> np.ndarray:
    return ndimage.grey_dilation(labels, size=3) != ndimage.grey_erosion(labels, size=3)


def _rim_darker(image: np.ndarray, labels: np.ndarray) -> bool:
    rim = _boundary(labels) & (labels > 0)
    outside = ~ndimage.binary_dilation(labels > 0, iterations=6)
    return bool(image[rim].mean() < image[outside].mean() - 20)


def _elongated(image: np.ndarray, labels: np.ndarray) -> bool:
    """Rods (long/short axis > 2) that are darker than the background (phase contrast)."""
    from skimage.measure import regionprops

    ratios = [p.axis_major_length / max(p.axis_minor_length, 1.0) for p in regionprops(labels)]
    inside = ndimage.binary_erosion(labels > 0, iterations=1)
    outside = ~ndimage.binary_dilation(labels > 0, iterations=6)
    return bool(np.median(ratios) > 2.0) and bool(image[inside].mean() < image[outside].mean() - 20)


def _membranes(image: np.ndarray, labels: np.ndarray) -> bool:
    """Bright outlines in the membrane channel (the second of tissue's, the only one of membrane's)."""
    membrane = (image[..., 1] if image.ndim == 3 else image).astype(float)
    interior = ndimage.binary_erosion(labels > 0, iterations=3)
    return bool(membrane[_boundary(labels) & (labels > 0)].mean() > membrane[interior].mean() + 50) and bool(
        (labels > 0).mean() > 0.8
    )


def _relief(image: np.ndarray, labels: np.ndarray) -> bool:
    inside = ndimage.binary_erosion(labels > 0, iterations=1)
    outside = ~ndimage.binary_dilation(labels > 0, iterations=6)
    return bool(image[inside].std() > 3 * image[outside].std())


@dataclass(frozen=True)
class LookCase:
    modality: str
    channels: int
    looks_right: object  # (image, labels) -> bool


def _dark_nuclei(image: np.ndarray, labels: np.ndarray) -> bool:
    inside = ndimage.binary_erosion(labels > 0, iterations=1)
    outside = ~ndimage.binary_dilation(labels > 0, iterations=6)
    return bool(image[inside].mean() < 0.8 * image[outside].mean())


LOOK_CASES = [
    LookCase("bacteria", 1, _elongated),
    LookCase("yeast", 1, _rim_darker),
    LookCase("tissue", 2, _membranes),
    LookCase("dic", 1, _relief),
    LookCase("stained", 1, _dark_nuclei),
    LookCase("membrane", 1, _membranes),
]


def test_cases_cover_every_modality() -> None:
    assert {c.modality for c in CASES} | {c.modality for c in LOOK_CASES} == set(MODALITIES)


@pytest.mark.parametrize("case", LOOK_CASES, ids=[c.modality for c in LOOK_CASES])
def test_transmitted_and_tissue_modalities(case: LookCase) -> None:
    image, labels = synthetic_frame((128, 128), seed=5, modality=case.modality, n_cells=30)  # type: ignore[arg-type]
    assert image.dtype == np.uint16 and labels.shape == (128, 128)
    assert image.shape == ((128, 128, 2) if case.channels == 2 else (128, 128))
    assert np.unique(labels[labels > 0]).size >= 15
    assert case.looks_right(image, labels)  # type: ignore[operator]
    again, again_labels = synthetic_frame((128, 128), seed=5, modality=case.modality, n_cells=30)  # type: ignore[arg-type]
    np.testing.assert_array_equal(again, image)
    np.testing.assert_array_equal(again_labels, labels)


def test_bacteria_rods_touch_but_do_not_cross() -> None:
    """Rods in a colony lie side by side as in a monolayer: each keeps nearly all of its own area."""
    movie = SyntheticMovie((256, 256), 1, seed=3, modality="bacteria", n_cells=60)
    cells = movie.cells[0]
    labels = paint(cells, (256, 256), 1.0)
    inside = (cells.y > 10) & (cells.y < 245) & (cells.x > 10) & (cells.x < 245)  # not cut by the edge
    visible = np.bincount(labels.ravel(), minlength=int(cells.ids.max()) + 1)[cells.ids[inside]]
    drawn = np.pi * cells.a[inside] * cells.b[inside]
    assert len(cells) >= 40 and inside.sum() >= 20
    assert np.median(visible / drawn) > 0.9
    assert (visible / drawn).min() > 0.6


def test_yeast_buds_are_their_own_cells() -> None:
    movie = SyntheticMovie((256, 256), 1, seed=2, modality="yeast", n_cells=40)
    cells = movie.cells[0]
    mothers = round(40 / 1.33)
    assert len(cells) > mothers  # some buds
    bud_size = cells.a[mothers:] * cells.b[mothers:]
    assert bud_size.max() < (cells.a[:mothers] * cells.b[:mothers]).max()


def test_no_cells_gives_an_empty_label_image() -> None:
    for modality in MODALITIES:
        image, labels = synthetic_frame((64, 64), seed=1, modality=modality, n_cells=0)  # type: ignore[arg-type]
        assert not labels.any() and np.isfinite(image.astype(float)).all()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_modalities(case: Case) -> None:
    image, labels = synthetic_frame((96, 128), seed=3, modality=case.modality, n_cells=12)  # type: ignore[arg-type]
    assert image.shape == case.image_shape and image.dtype == np.uint16
    assert labels.shape == (96, 128) and labels.dtype == np.int32
    ids = np.unique(labels[labels > 0])
    assert 8 <= ids.size <= 12  # a few may be hidden under neighbours
    plane = image[..., -1] if image.ndim == 3 else image
    # Compare cell interiors with background away from cells (edges are blurred and haloed).
    inside = ndimage.binary_erosion(labels > 0, iterations=2)
    outside = ~ndimage.binary_dilation(labels > 0, iterations=6)
    contrast = plane[inside].mean() - plane[outside].mean()
    assert (contrast > 0) == case.bright_cells
    assert abs(contrast) > 5 * plane[outside].std() / np.sqrt(outside.sum()) + 20


def test_multiplexed_nuclear_channel_marks_nuclei() -> None:
    image, labels = synthetic_frame((96, 96), seed=1, modality="multiplexed", n_cells=10, noise=False)
    nuclear_labels = synthetic_frame((96, 96), seed=1, modality="nuclear", n_cells=10, noise=False)[1]
    nuc = image[..., 0].astype(float)
    in_nuclei = ndimage.binary_erosion(nuclear_labels > 0, iterations=1)
    cytoplasm_only = ndimage.binary_erosion((labels > 0) & (nuclear_labels == 0), iterations=1)
    assert cytoplasm_only.sum() > 20
    assert nuc[in_nuclei].mean() > nuc[cytoplasm_only].mean() + 50
    assert (nuclear_labels > 0).sum() < (labels > 0).sum()  # nuclei lie inside whole cells


def test_seeded_and_reproducible() -> None:
    a = SyntheticMovie((64, 64), 4, seed=11, n_cells=8)
    b = SyntheticMovie((64, 64), 4, seed=11, n_cells=8)
    c = SyntheticMovie((64, 64), 4, seed=12, n_cells=8)
    for (ia, la), (ib, lb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a[2][0], c[2][0])
    np.testing.assert_array_equal(a[3][0], list(a)[3][0])  # random access equals iteration
    np.testing.assert_array_equal(a[-1][1], a[3][1])
    with pytest.raises(IndexError):
        a[4]


def test_noise_is_shot_and_read_noise() -> None:
    clean, _ = synthetic_frame((128, 128), seed=2, n_cells=10, noise=False, dtype=np.float32)
    noisy, _ = synthetic_frame((128, 128), seed=2, n_cells=10, dtype=np.float32)
    residual = noisy - clean
    dim, bright = clean < np.percentile(clean, 20), clean > np.percentile(clean, 95)
    assert abs(residual.mean()) < 1.0
    assert residual[bright].std() > residual[dim].std() * 1.5  # shot noise grows with signal
    assert residual[dim].std() ** 2 == pytest.approx(float((clean[dim] - 100).mean()) + 9, rel=0.2)


def test_cells_move_grow_divide_and_bleach() -> None:
    movie = SyntheticMovie((128, 128), 40, seed=4, n_cells=10, growth=0.05, bleach_rate=0.02, noise=False)
    counts = [len(cells) for cells in movie.cells]
    assert counts[0] == 10 and counts[-1] > 10  # divisions happened
    first, last = movie.cells[0], movie.cells[-1]
    assert last.ids.max() > 10  # daughters get new ids
    # Cells that did not divide keep their id and move a little each frame.
    step = movie.cells[1]
    common = np.intersect1d(first.ids, step.ids)
    assert common.size > 0
    i0 = np.searchsorted(first.ids, common)
    order = np.argsort(step.ids)
    i1 = order[np.searchsorted(step.ids[order], common)]
    moved = np.hypot(step.y[i1] - first.y[i0], step.x[i1] - first.x[i0])
    assert 0 < moved.mean() < 5
    # Mean cell signal decays with photobleaching.
    img0, lab0 = movie[0]
    img_late, lab_late = movie[39]
    assert img_late[lab_late > 0].mean() < img0[lab0 > 0].mean()


def test_labels_never_overlap_and_touching_cells_exist() -> None:
    _, labels = synthetic_frame((96, 96), seed=0, modality="whole_cell", n_cells=40)
    # Two different labels adjacent somewhere: dense fields have touching cells.
    horiz = (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)
    assert horiz.any()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_dtypes(dtype: type) -> None:
    image, _ = synthetic_frame((32, 32), seed=0, n_cells=3, dtype=dtype)
    assert image.dtype == np.dtype(dtype)
    assert np.isfinite(image).all() and image.max() > 0


def test_empty_field_and_invalid_arguments() -> None:
    image, labels = synthetic_frame((32, 32), n_cells=0)
    assert labels.max() == 0 and image.min() > 0
    with pytest.raises(ValueError, match="modality"):
        SyntheticMovie((32, 32), 1, modality="brightfield")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        SyntheticMovie((4, 32), 1)
