"""Cell geometry and per-modality rendering for :mod:`cellsam_core.synthetic` (pure numpy/scipy).

The geometry of every modality is a set of ellipses (:class:`SyntheticCells`) painted in order, later
cells winning shared pixels. What differs per modality is how the ellipses are drawn (round nuclei, rods
in aligned colonies, round budding yeast, densely packed tissue) and how an image is rendered from them:

``bacteria``     rods 2.5–5× longer than wide (``radius`` is the geometric mean of the semi-axes) in
                 dense, locally aligned colonies, touching but not crossing; phase contrast (dark rods,
                 bright halo, bright lines where rods touch).
``yeast``        round cells, about a third with a bud; brightfield (grey background, a dark rim, the
                 interior slightly brighter or darker depending on focus).
``tissue``       densely packed cells (polygonal contacts); two channels ``[nuclear, membrane]``.
``dic``          differential interference contrast: the derivative of an optical-thickness relief along
                 a shear direction (one side of each cell bright, the other dark).
``stained``      brightfield image of a nuclear stain: nuclei attenuate the light (dark on bright).
``membrane``     densely packed cells seen by their outlines only (a plasma-membrane or cell-wall stain,
                 as in plant tissue): bright boundaries about 3 px wide, faint or dark interiors; one channel.

Renderers return a float signal (~0–1.5) that :class:`~cellsam_core.synthetic.SyntheticMovie` blurs and
passes through its camera model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage
from skimage.draw import ellipse

__all__ = ["SyntheticCells", "initial_cells", "lut", "paint", "render"]


@dataclass(frozen=True, slots=True)
class SyntheticCells:
    """Cell geometry at one time point; all arrays have shape (N,).

    ``y, x`` centre (pixels), ``a, b`` semi-axes along / across ``theta`` (radians, skimage's
    ``rotation``), ``brightness`` relative stain intensity, ``ids`` label values (lineage-stable: a cell
    keeps its id until it divides; daughters get new ids).
    """

    y: np.ndarray
    x: np.ndarray
    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray
    brightness: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.size)


def initial_cells(
    rng: np.random.Generator,
    shape: tuple[int, int],
    n_cells: int,
    radius: tuple[float, float],
    *,
    modality: str = "nuclear",
    elongation: tuple[float, float] = (1.0, 1.5),
    brightness_spread: float = 0.3,
) -> SyntheticCells:
    """Cells at t = 0; ``radius`` is the range of mean radii (geometric mean of the semi-axes)."""
    h, w = shape
    if modality == "bacteria":
        return _colonies(rng, shape, n_cells, radius)
    if modality == "yeast":
        return _budding(rng, shape, n_cells, radius)
    if modality in ("tissue", "membrane"):
        return _packed(rng, shape, n_cells)
    r = rng.uniform(radius[0], radius[1], n_cells)
    elong = rng.uniform(elongation[0], elongation[1], n_cells)
    return SyntheticCells(
        y=rng.uniform(0, h, n_cells),
        x=rng.uniform(0, w, n_cells),
        a=r * np.sqrt(elong),
        b=r / np.sqrt(elong),
        theta=rng.uniform(-math.pi, math.pi, n_cells),
        brightness=rng.lognormal(0.0, brightness_spread, n_cells),
        ids=np.arange(1, n_cells + 1, dtype=np.int64),
    )


def condense(cells: SyntheticCells, rng: np.random.Generator, fraction: float) -> SyntheticCells:
    """Make about ``fraction`` of the cells small (0.5–0.8× the radius) and 2.5–5× brighter."""
    pick = rng.random(len(cells)) < fraction
    shrink = np.where(pick, rng.uniform(0.5, 0.8, len(cells)), 1.0)
    boost = np.where(pick, rng.uniform(2.5, 5.0, len(cells)), 1.0)
    return replace(cells, a=cells.a * shrink, b=cells.b * shrink, brightness=cells.brightness * boost)


def _colonies(
    rng: np.random.Generator, shape: tuple[int, int], n_cells: int, radius: tuple[float, float]
) -> SyntheticCells:
    """Rods in colonies whose cells share an orientation field (as in a growing microcolony).

    Rods are placed one by one near their colony's centre, each where it does not cross the rods already
    placed (neighbours may touch, as in a monolayer): a new rod's axis keeps at least 0.9 of the two
    half-widths from every other axis. A rod that finds no room after a few dozen tries farther and
    farther out is left out, so a crowded field holds fewer than ``n_cells``.
    """
    h, w = shape
    n_col = max(1, int(rng.integers(1, 5)))
    centres = rng.uniform(0, 1, (n_col, 2)) * (h, w)
    colony = rng.integers(0, n_col, n_cells)
    r = rng.uniform(radius[0], radius[1], n_cells)
    elong = rng.uniform(2.5, 5.0, n_cells)
    a, b = r * np.sqrt(elong), r / np.sqrt(elong)
    # Colony extent from the area its cells need at ~75 % coverage.
    per_colony = np.bincount(colony, minlength=n_col)
    mean_r = float(r.mean()) if n_cells else 0.0
    spread = np.sqrt(per_colony * mean_r**2 / 0.75) / 1.5
    angle0 = rng.uniform(-math.pi, math.pi, n_col)
    bend = rng.uniform(-0.02, 0.02, n_col)
    along = np.linspace(-1.0, 1.0, 7)  # points sampled along each rod's axis
    axes = np.zeros((n_cells, along.size, 2))  # of the rods placed so far: the first len(kept) rows
    kept: list[tuple[float, float, float, int]] = []
    for i in range(n_cells):
        c = colony[i]
        half = max(a[i] - b[i], 0.0)
        placed = [k for *_, k in kept]
        for attempt in range(40):
            off = rng.normal(0.0, 1.0, 2) * spread[c] * (1.0 + attempt / 8)
            y, x = centres[c, 0] + off[0], centres[c, 1] + off[1]
            theta = angle0[c] + bend[c] * (off[0] + off[1]) + rng.normal(0.0, 0.35)
            pts = np.stack([y + along * half * math.sin(theta), x + along * half * math.cos(theta)], -1)
            if kept:
                gaps = np.linalg.norm(axes[: len(kept), :, None] - pts[None, None], axis=-1).min(axis=(1, 2))
                if np.any(gaps < 0.9 * (b[placed] + b[i])):
                    continue
            axes[len(kept)] = pts
            kept.append((y, x, theta, i))
            break
    if kept:
        y_k, x_k, theta_k, idx = (np.asarray(v) for v in zip(*kept, strict=True))
        idx = idx.astype(np.int64)
    else:
        y_k = x_k = theta_k = np.zeros(0)
        idx = np.zeros(0, np.int64)
    return SyntheticCells(
        y=np.clip(y_k, 0, h - 1),
        x=np.clip(x_k, 0, w - 1),
        a=a[idx],
        b=b[idx],
        theta=theta_k,
        brightness=rng.lognormal(0.0, 0.2, idx.size),
        ids=np.arange(1, idx.size + 1, dtype=np.int64),
    )


def _budding(
    rng: np.random.Generator, shape: tuple[int, int], n_cells: int, radius: tuple[float, float]
) -> SyntheticCells:
    """Round mothers; about a third carry a bud (its own label) touching them at a random angle."""
    h, w = shape
    n_mother = max(1, round(n_cells / 1.33)) if n_cells else 0
    r = rng.uniform(radius[0], radius[1], n_mother)
    elong = rng.uniform(1.0, 1.25, n_mother)
    y, x = rng.uniform(0, h, n_mother), rng.uniform(0, w, n_mother)
    theta = rng.uniform(-math.pi, math.pi, n_mother)
    buds = np.flatnonzero(rng.random(n_mother) < 0.33)[: max(0, n_cells - n_mother)]
    rb = r[buds] * rng.uniform(0.35, 0.7, buds.size)
    phi = rng.uniform(-math.pi, math.pi, buds.size)
    dist = r[buds] + rb * 0.8
    parts_y = np.concatenate([y, np.clip(y[buds] + dist * np.sin(phi), 0, h - 1)])
    parts_x = np.concatenate([x, np.clip(x[buds] + dist * np.cos(phi), 0, w - 1)])
    count = n_mother + buds.size
    return SyntheticCells(
        y=parts_y,
        x=parts_x,
        a=np.concatenate([r * np.sqrt(elong), rb * 1.05]),
        b=np.concatenate([r / np.sqrt(elong), rb / 1.05]),
        theta=np.concatenate([theta, phi]),
        brightness=rng.lognormal(0.0, 0.15, count),
        ids=np.arange(1, count + 1, dtype=np.int64),
    )


def _packed(rng: np.random.Generator, shape: tuple[int, int], n_cells: int) -> SyntheticCells:
    """Cells on a jittered grid, sized to cover the field (neighbours overlap: polygonal contacts)."""
    h, w = shape
    cols = max(1, round(math.sqrt(n_cells * w / h)))
    rows = max(1, math.ceil(n_cells / cols))
    idx = np.arange(n_cells)
    pitch_y, pitch_x = h / rows, w / cols
    y = (idx // cols + 0.5 + rng.uniform(-0.3, 0.3, n_cells)) * pitch_y
    x = (idx % cols + 0.5 + (idx // cols % 2) * 0.5 + rng.uniform(-0.3, 0.3, n_cells)) * pitch_x
    r = math.sqrt(pitch_y * pitch_x / math.pi) * rng.uniform(0.95, 1.25, n_cells)
    elong = rng.uniform(1.0, 1.6, n_cells)
    return SyntheticCells(
        y=np.clip(y, 0, h - 1),
        x=np.mod(x, w),
        a=r * np.sqrt(elong),
        b=r / np.sqrt(elong),
        theta=rng.uniform(-math.pi, math.pi, n_cells),
        brightness=rng.lognormal(0.0, 0.3, n_cells),
        ids=np.arange(1, n_cells + 1, dtype=np.int64),
    )


def paint(cells: SyntheticCells, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Label image (H, W) int32: ellipses scaled by ``scale``, drawn in order (later cells win)."""
    labels = np.zeros(shape, np.int32)
    for i in range(len(cells)):
        rr, cc = ellipse(
            cells.y[i],
            cells.x[i],
            max(cells.a[i] * scale, 1.0),
            max(cells.b[i] * scale, 1.0),
            shape=shape,
            rotation=cells.theta[i],
        )
        labels[rr, cc] = cells.ids[i]
    return labels


def lut(cells: SyntheticCells, values: np.ndarray) -> np.ndarray:
    """Lookup table id -> value (index 0 = background = 0)."""
    table = np.zeros(int(cells.ids.max(initial=0)) + 1, np.float32)
    table[cells.ids] = values
    return table


def _boundaries(labels: np.ndarray, width: int = 3) -> np.ndarray:
    return ndimage.grey_dilation(labels, size=width) != ndimage.grey_erosion(labels, size=width)


def phase(
    cell_labels: np.ndarray, texture: np.ndarray, *, darkness: float = 0.35, rims: bool = True
) -> np.ndarray:
    """Phase contrast: dark interior, bright halo outside, bright lines between touching cells.

    ``rims=False`` keeps the bright lines to contacts between cells (thin rods would otherwise be all
    rim); with ``rims=True`` every cell's inner rim is brightened as well.
    """
    mask = (cell_labels > 0).astype(np.float32)
    edges = _boundaries(cell_labels)
    if not rims:
        edges &= ~ndimage.binary_dilation(cell_labels == 0)
    soft = ndimage.gaussian_filter(mask, 3.0)
    halo = np.clip(soft - mask, 0.0, None) * 3.0 + 0.4 * (edges & (mask > 0))
    return 0.5 + halo - darkness * mask * texture


def render(
    modality: str,
    cells: SyntheticCells,
    cell_labels: np.ndarray,
    nuc_labels: np.ndarray,
    texture: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Signal of one of this module's modalities (see the module docstring)."""
    if modality == "bacteria":
        return phase(cell_labels, texture, darkness=float(rng.uniform(0.3, 0.45)), rims=False)
    if modality == "yeast":
        return _brightfield(cell_labels, texture, rng)
    if modality == "tissue":
        nuc = lut(cells, cells.brightness)[nuc_labels] * texture
        membrane = _boundaries(cell_labels, 3).astype(np.float32) * (cell_labels > 0)
        membrane = membrane * (0.7 + 0.3 * texture) + 0.08 * (cell_labels > 0)
        return np.stack([nuc, membrane], axis=-1)
    if modality == "membrane":
        # Outlines only (a plasma-membrane or cell-wall stain): bright, uneven boundaries, faint interiors.
        outline = _boundaries(cell_labels, 3).astype(np.float32)
        interior = float(rng.uniform(0.0, 0.12))
        return (outline * (0.6 + 0.4 * texture) + interior * (cell_labels > 0)).astype(np.float32)
    if modality == "dic":
        return _dic(cell_labels, rng)
    if modality == "stained":
        # Absorbing dye in transmitted light: Beer-Lambert attenuation by the stained nuclei.
        stain = lut(cells, cells.brightness)[nuc_labels] * texture
        return np.exp(-float(rng.uniform(0.6, 1.2)) * stain).astype(np.float32)
    raise ValueError(f"no renderer for modality {modality!r}")


def _brightfield(cell_labels: np.ndarray, texture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightfield: grey background, a dark rim (a bright one when defocused the other way)."""
    mask = (cell_labels > 0).astype(np.float32)
    inner = ndimage.binary_erosion(cell_labels > 0, iterations=2) & ~_boundaries(cell_labels, 3)
    rim = mask - inner.astype(np.float32)
    focus = 1.0 if rng.random() < 0.75 else -1.0
    interior = float(rng.uniform(-0.12, 0.12))
    outer = np.clip(ndimage.gaussian_filter(mask, 2.0) - mask, 0.0, None)
    return 0.6 + focus * (-0.35 * rim + 0.25 * outer) + interior * inner * texture


def _dic(cell_labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """DIC: shear derivative of a dome-shaped optical thickness of every cell."""
    dist = ndimage.distance_transform_edt(cell_labels > 0) * (~_boundaries(cell_labels, 3))
    height = ndimage.gaussian_filter(np.sqrt(dist).astype(np.float32), 1.0)
    angle = float(rng.uniform(0.0, 2.0 * math.pi))
    gy, gx = np.gradient(height)
    relief = math.sin(angle) * gy + math.cos(angle) * gx
    return 0.5 + 0.6 * relief / max(float(np.abs(relief).max()), 1e-6)
