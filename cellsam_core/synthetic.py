"""Synthetic live-cell images and time-lapses with ground-truth labels (pure numpy/scipy/scikit-image).

Cells are ellipses that drift, jitter, grow, divide and bleach; they touch and overlap (the cell drawn
later wins the shared pixels, so labels never overlap). Images are rendered from the same geometry as the
labels, then blurred (PSF), put on an uneven background and passed through a camera model
(shot noise with Poisson variance + Gaussian read noise + offset). Everything is reproducible from ``seed``.

Modalities
----------
``nuclear``       fluorescent nuclei; labels are nuclei.
``whole_cell``    cytoplasmic fluorescence (nucleus dimmer); labels are whole cells.
``multiplexed``   (H, W, 2) image ``[nuclear, whole_cell]``; labels are whole cells.
``phase``         phase-contrast-like: dark cell interior with a bright halo; labels are whole cells.
``bacteria``      phase-contrast rods in dense, aligned colonies.
``yeast``         brightfield budding yeast (buds are labelled separately).
``tissue``        (H, W, 2) ``[nuclear, membrane]`` image of densely packed cells; labels are whole cells.
``dic``           differential interference contrast relief; labels are whole cells.
``stained``       brightfield nuclear stain (e.g. haematoxylin): dark nuclei on a bright field; labels are
                  nuclei.
``membrane``      outlines only (a membrane or cell-wall stain, as in plant tissue) of densely packed cells,
                  one channel; labels are whole cells.

Geometry and the renderers of the last six live in :mod:`cellsam_core.synthetic_cells`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import fields, replace

import numpy as np
from scipy import ndimage

from cellsam_core import synthetic_cells
from cellsam_core.modalities import MODALITIES, NUCLEAR_LABELS, TRANSMITTED, TWO_CHANNEL, Modality
from cellsam_core.synthetic_cells import SyntheticCells, initial_cells, lut, paint

__all__ = ["MODALITIES", "TWO_CHANNEL", "Modality", "SyntheticCells", "SyntheticMovie", "synthetic_frame"]


def _step(
    rng: np.random.Generator,
    cells: SyntheticCells,
    shape: tuple[int, int],
    *,
    drift: tuple[float, float],
    growth: float,
    divide_area: np.ndarray,
    next_id: int,
) -> tuple[SyntheticCells, np.ndarray, int]:
    """Advance one frame; returns new cells, their division-area thresholds and the next free id."""
    n = len(cells)
    h, w = shape
    jitter = rng.normal(0.0, 0.6, (2, n))
    y = np.clip(cells.y + drift[0] + jitter[0], 0, h - 1)
    x = np.clip(cells.x + drift[1] + jitter[1], 0, w - 1)
    g = np.sqrt(1.0 + growth * rng.uniform(0.5, 1.5, n))
    a, b = cells.a * g, cells.b * g
    theta = cells.theta + rng.normal(0.0, 0.05, n)
    divide = a * b >= divide_area
    keep = ~divide
    parts = [
        replace(
            cells,
            y=y[keep],
            x=x[keep],
            a=a[keep],
            b=b[keep],
            theta=theta[keep],
            brightness=cells.brightness[keep],
            ids=cells.ids[keep],
        )
    ]
    thresholds = [divide_area[keep]]
    if divide.any():
        # Each mother splits along its long axis into two daughters of half its area.
        d = np.flatnonzero(divide)
        offset = a[d] / 2.0
        dy, dx = np.cos(theta[d]) * offset, -np.sin(theta[d]) * offset
        for sign in (1.0, -1.0):
            k = d.size
            parts.append(
                SyntheticCells(
                    y=np.clip(y[d] + sign * dy, 0, h - 1),
                    x=np.clip(x[d] + sign * dx, 0, w - 1),
                    a=a[d] / math.sqrt(2.0) * 0.9,
                    b=b[d] / math.sqrt(2.0) * 1.1,
                    theta=theta[d] + math.pi / 2,
                    brightness=cells.brightness[d] * rng.uniform(0.9, 1.1, k),
                    ids=np.arange(next_id, next_id + k, dtype=np.int64),
                )
            )
            thresholds.append(divide_area[d])
            next_id += k
    merged = SyntheticCells(
        *(np.concatenate([getattr(p, f) for p in parts]) for f in (fl.name for fl in fields(SyntheticCells)))
    )
    return merged, np.concatenate(thresholds), next_id


class SyntheticMovie:
    """A reproducible synthetic time-lapse; ``movie[t]`` and iteration give ``(image, labels)``.

    Parameters
    ----------
    shape : (H, W)
        Frame size in pixels.
    n_frames : int
        Number of time points.
    seed : int
        Seed; the same arguments always give the same movie.
    modality : one of :data:`MODALITIES`
        What the image shows (see module docstring).
    n_cells : int
        Cells at t = 0 (divisions add more).
    cell_radius : (float, float)
        Range of initial mean cell radii in pixels; default scales with the frame (2.5–4.5 % of min(H, W),
        at least 4 px).
    dtype : numpy dtype
        ``uint16`` (default, 12-bit-like counts), ``uint8`` (scaled) or a float type (counts as floats).
    drift : (float, float)
        Mean motion per frame (dy, dx) in pixels shared by all cells (stage drift / flow).
    growth : float
        Mean relative area growth per frame; cells divide at about twice their initial area.
    bleach_rate : float
        Fluorescence decays as ``exp(-bleach_rate * t)``.
    noise : bool
        Apply the camera model (set False for clean renders).
    cells : sequence of SyntheticCells, optional
        Cell geometry of every frame, given instead of simulated (``n_frames`` must equal its length;
        ``n_cells``, ``cell_radius``, ``drift`` and ``growth`` are then unused). Label values are the
        ``ids`` (> 0).
    elongation : (float, float)
        Range of the long-to-short axis ratio of round cells (nuclear, whole_cell, multiplexed, phase).
    texture : (float, float)
        Relative strength and length scale (pixels) of the intensity texture inside cells (chromatin,
        cytoplasm granularity); ``(0.25, 2.0)`` by default.
    bright_fraction : float
        Fraction of cells that are small and 2.5–5× brighter than the rest at t = 0, as mitotic or
        apoptotic nuclei with condensed chromatin are (saturated blobs after normalisation).
    brightness_spread : float
        Standard deviation of the log of the cells' stain brightness (0.3).

    Notes
    -----
    ``image`` is (H, W) or, for ``multiplexed`` and ``tissue``, (H, W, 2); ``labels`` is (H, W) int32 with 0 =
    background and lineage-stable ids (a cell keeps its value across frames until it divides).
    """

    def __init__(
        self,
        shape: tuple[int, int] = (256, 256),
        n_frames: int = 10,
        *,
        seed: int = 0,
        modality: Modality = "nuclear",
        n_cells: int = 40,
        cell_radius: tuple[float, float] | None = None,
        dtype: np.dtype | type = np.uint16,
        drift: tuple[float, float] = (0.3, 0.5),
        growth: float = 0.02,
        bleach_rate: float = 0.002,
        noise: bool = True,
        cells: Sequence[SyntheticCells] | None = None,
        elongation: tuple[float, float] = (1.0, 1.5),
        texture: tuple[float, float] = (0.25, 2.0),
        bright_fraction: float = 0.0,
        brightness_spread: float = 0.3,
    ) -> None:
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITIES)}")
        if len(shape) != 2 or min(shape) < 8:
            raise ValueError(f"shape must be (H, W) with H, W ≥ 8, got {shape}")
        if n_frames < 1 or n_cells < 0:
            raise ValueError(f"need n_frames ≥ 1 and n_cells ≥ 0, got {n_frames}, {n_cells}")
        self.shape = (int(shape[0]), int(shape[1]))
        self.n_frames = int(n_frames)
        self.seed = int(seed)
        self.modality = modality
        self.dtype = np.dtype(dtype)
        self.bleach_rate = bleach_rate
        self.noise = noise
        self.texture = (float(texture[0]), float(texture[1]))
        side = min(self.shape)
        radius = cell_radius or (max(4.0, 0.025 * side), max(5.0, 0.045 * side))
        rng = np.random.default_rng([self.seed, 0])
        self.cells: list[SyntheticCells]
        if cells is not None:
            if len(cells) != self.n_frames:
                raise ValueError(f"cells holds {len(cells)} frames of geometry for n_frames={self.n_frames}")
            self.cells = list(cells)
        else:
            state = initial_cells(rng, self.shape, n_cells, radius, modality=modality, elongation=elongation)
            divide_area = state.a * state.b * rng.uniform(1.8, 2.4, len(state))
            next_id = len(state) + 1
            self.cells = [state]
            for _ in range(1, self.n_frames):
                state, divide_area, next_id = _step(
                    rng,
                    state,
                    self.shape,
                    drift=drift,
                    growth=growth,
                    divide_area=divide_area,
                    next_id=next_id,
                )
                self.cells.append(state)
        # Per-movie constants: uneven illumination and peak signal level.
        self._background = self._make_background(rng)
        self._peak = float(rng.uniform(600, 1200))

    def _make_background(self, rng: np.random.Generator) -> np.ndarray:
        coarse = rng.normal(0.0, 1.0, (4, 4))
        field = ndimage.zoom(
            coarse, (self.shape[0] / 4, self.shape[1] / 4), order=3, grid_mode=True, mode="nearest"
        )[: self.shape[0], : self.shape[1]]
        yy, xx = np.linspace(-1, 1, self.shape[0])[:, None], np.linspace(-1, 1, self.shape[1])[None, :]
        gy, gx = rng.uniform(-0.25, 0.25, 2)
        return (1.0 + 0.1 * field + gy * yy + gx * xx).astype(np.float32)

    def __len__(self) -> int:
        return self.n_frames

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for t in range(self.n_frames):
            yield self[t]

    def labels(self, t: int) -> np.ndarray:
        """Ground-truth labels of frame ``t`` alone (no image rendered): (H, W) int32, as ``self[t][1]``."""
        cells = self.cells[self._index(t)]
        return paint(cells, self.shape, 0.55 if self.modality in NUCLEAR_LABELS else 1.0)

    def _index(self, t: int) -> int:
        if not -self.n_frames <= t < self.n_frames:
            raise IndexError(f"frame {t} out of range for a movie of {self.n_frames} frames")
        return t % self.n_frames

    def __getitem__(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        t = self._index(t)
        rng = np.random.default_rng([self.seed, 1, t])
        cells = self.cells[t]
        cell_labels = paint(cells, self.shape, 1.0)
        nuc_labels = paint(cells, self.shape, 0.55)
        strength, scale = self.texture
        texture = ndimage.gaussian_filter(rng.standard_normal(self.shape, dtype=np.float32), scale)
        texture = 1.0 + strength * texture / max(float(texture.std()), 1e-6)
        bleach = math.exp(-self.bleach_rate * t)
        nuc = lut(cells, cells.brightness)[nuc_labels] * texture
        if self.modality == "nuclear":
            signal, labels = nuc * bleach, nuc_labels
        elif self.modality == "whole_cell":
            signal, labels = self._cytoplasm(cells, cell_labels, nuc_labels, texture) * bleach, cell_labels
        elif self.modality == "multiplexed":
            cyto = self._cytoplasm(cells, cell_labels, nuc_labels, texture)
            signal, labels = np.stack([nuc, 0.7 * cyto], axis=-1) * bleach, cell_labels
        elif self.modality == "phase":
            signal, labels = synthetic_cells.phase(cell_labels, texture), cell_labels
        else:
            signal = synthetic_cells.render(self.modality, cells, cell_labels, nuc_labels, texture, rng)
            labels = nuc_labels if self.modality in NUCLEAR_LABELS else cell_labels
        return self._camera(signal.astype(np.float32), rng), labels

    @staticmethod
    def _cytoplasm(
        cells: SyntheticCells, cell_labels: np.ndarray, nuc_labels: np.ndarray, texture: np.ndarray
    ) -> np.ndarray:
        cyto = lut(cells, 0.6 * cells.brightness[::-1])[cell_labels] * texture
        return np.where(nuc_labels > 0, 0.6 * cyto, cyto)

    def _camera(self, signal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        sigma = (1.0, 1.0, 0.0) if signal.ndim == 3 else 1.0
        optical = ndimage.gaussian_filter(signal, sigma)
        bg = self._background[..., None] if signal.ndim == 3 else self._background
        if self.modality in TRANSMITTED:
            expected = self._peak * optical * bg
        else:
            expected = self._peak * optical + 60.0 * bg
        expected = np.clip(expected, 0.0, None)
        counts = expected + 100.0  # camera offset
        if self.noise:
            # Shot noise (variance = expected photons) plus read noise (3 counts rms), drawn as one
            # Gaussian: at these photon counts (≥ 60 per pixel) Poisson is Gaussian to within a few
            # percent, and a float32 normal draw is several times faster than an exact Poisson draw.
            read_var = 9.0
            counts += np.sqrt(expected + read_var) * rng.standard_normal(expected.shape, dtype=np.float32)
        if self.dtype.kind == "f":
            return counts.astype(self.dtype)
        if self.dtype == np.uint8:
            counts = counts * (255.0 / 4095.0)
        info = np.iinfo(self.dtype)
        return np.clip(np.rint(counts), info.min, info.max).astype(self.dtype)


def synthetic_frame(
    shape: tuple[int, int] = (256, 256),
    *,
    seed: int = 0,
    modality: Modality = "nuclear",
    n_cells: int = 40,
    dtype: np.dtype | type = np.uint16,
    noise: bool = True,
    cell_radius: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image and its labels: ``(image, labels)``; see :class:`SyntheticMovie`.

    ``image`` is (H, W) (``multiplexed``, ``tissue``: (H, W, 2)) of ``dtype``; ``labels`` (H, W) int32,
    0 = background. ``cell_radius`` overrides the default range of cell radii (which scales with the frame).
    """
    movie = SyntheticMovie(
        shape,
        1,
        seed=seed,
        modality=modality,
        n_cells=n_cells,
        dtype=dtype,
        noise=noise,
        cell_radius=cell_radius,
    )
    return movie[0]
