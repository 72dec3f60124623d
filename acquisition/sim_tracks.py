"""Synthetic live-cell movies with known tracks: ground truth for the tracker.

:class:`TrackedMovie` simulates cells that move (a persistent random walk plus a shared drift), grow,
divide into two daughters, enter the field from its edges and leave it, and renders them exactly like
:class:`cellsam_core.synthetic.SyntheticMovie` (same modalities, optics and camera model), so the bundled
model segments them as it segments the simulator's other movies. Its ground truth is in Cell Tracking
Challenge form (:mod:`acquisition.ctc`): label images whose values are track labels, and one
:class:`~acquisition.ctc.CtcTrack` per track with its parent (a division's daughters name their mother;
a cell hidden for some frames, e.g. at the edge, comes back as a new track whose parent is its earlier
track). :class:`acquisition.simulator.SyntheticSource` plays these movies with ``tracked=True``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from acquisition.ctc import to_ctc, write_ctc
from cellsam_core.synthetic import Modality, SyntheticCells, SyntheticMovie

__all__ = ["TrackedMovie"]


class _Cells:
    """Mutable per-cell state of the simulation (arrays of equal length)."""

    names = ("y", "x", "vy", "vx", "a", "b", "theta", "brightness", "ids", "divide_area")

    def __init__(self, **arrays: np.ndarray) -> None:
        self.__dict__.update(arrays)

    def __len__(self) -> int:
        return int(self.ids.size)

    def take(self, index: np.ndarray) -> _Cells:
        return _Cells(**{n: getattr(self, n)[index] for n in self.names})

    @staticmethod
    def concat(parts: list[_Cells]) -> _Cells:
        return _Cells(**{n: np.concatenate([getattr(p, n) for p in parts]) for n in _Cells.names})

    def geometry(self) -> SyntheticCells:
        return SyntheticCells(self.y, self.x, self.a, self.b, self.theta, self.brightness, self.ids)

    # Attributes set through __dict__ (declared for type checkers).
    y: np.ndarray
    x: np.ndarray
    vy: np.ndarray
    vx: np.ndarray
    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray
    brightness: np.ndarray
    ids: np.ndarray
    divide_area: np.ndarray


def _new_cells(
    rng: np.random.Generator,
    y: np.ndarray,
    x: np.ndarray,
    vy: np.ndarray,
    vx: np.ndarray,
    radius: tuple[float, float],
    first_id: int,
) -> _Cells:
    n = y.size
    r = rng.uniform(radius[0], radius[1], n)
    elong = rng.uniform(1.0, 1.4, n)
    a, b = r * np.sqrt(elong), r / np.sqrt(elong)
    return _Cells(
        y=y,
        x=x,
        vy=vy,
        vx=vx,
        a=a,
        b=b,
        theta=rng.uniform(-math.pi, math.pi, n),
        brightness=rng.lognormal(0.0, 0.3, n),
        ids=np.arange(first_id, first_id + n, dtype=np.int64),
        # Cells start at random points of their cycle: each divides at 1.05-2.2 times its area now.
        divide_area=a * b * rng.uniform(1.05, 2.2, n),
    )


class TrackedMovie:
    """A reproducible synthetic time-lapse with known tracks (see the module docstring).

    Parameters
    ----------
    shape : (H, W)
        Frame size in pixels.
    n_frames : int
        Number of time points.
    seed : int
        The same arguments always give the same movie.
    modality : {"nuclear", "whole_cell", "multiplexed", "phase"}
        As :class:`~cellsam_core.synthetic.SyntheticMovie`.
    n_cells : int
        Cells at t = 0, placed at random inside the field.
    cell_radius : (float, float), optional
        Range of initial mean cell radii in pixels (default as ``SyntheticMovie``).
    speed : float
        Root-mean-square speed of each cell's own motion, pixels per frame and axis.
    persistence : float
        In [0, 1): how much of its velocity a cell keeps from one frame to the next.
    drift : (float, float)
        Motion (dy, dx) per frame shared by all cells.
    growth : float
        Mean relative area growth per frame; a cell divides at about twice its birth area.
    entry_rate : float
        Mean number of cells entering the field from its edges per frame.
    dtype, noise
        As ``SyntheticMovie``.

    Attributes
    ----------
    tracks : list of CtcTrack
        Ground-truth tracks, sorted by label.
    cells : list of SyntheticCells
        Geometry per frame (``ids`` are simulation ids, not track labels).
    """

    def __init__(
        self,
        shape: tuple[int, int] = (256, 256),
        n_frames: int = 30,
        *,
        seed: int = 0,
        modality: Modality = "nuclear",
        n_cells: int = 30,
        cell_radius: tuple[float, float] | None = None,
        speed: float = 1.0,
        persistence: float = 0.7,
        drift: tuple[float, float] = (0.3, 0.5),
        growth: float = 0.03,
        entry_rate: float = 0.3,
        dtype: np.dtype | type = np.uint16,
        noise: bool = True,
    ) -> None:
        if not 0 <= persistence < 1:
            raise ValueError(f"persistence must be in [0, 1), got {persistence}")
        if n_frames < 1 or n_cells < 0 or speed < 0 or entry_rate < 0:
            raise ValueError("need n_frames ≥ 1 and n_cells, speed, entry_rate ≥ 0")
        self.shape = (int(shape[0]), int(shape[1]))
        self.n_frames = int(n_frames)
        side = min(self.shape)
        radius = cell_radius or (max(4.0, 0.025 * side), max(5.0, 0.045 * side))
        rng = np.random.default_rng([int(seed), 7])
        geometry, parents = self._simulate(
            rng, n_cells, radius, speed, persistence, drift, growth, entry_rate
        )
        self.cells = geometry
        self._movie = SyntheticMovie(
            self.shape, self.n_frames, seed=seed, modality=modality, dtype=dtype, noise=noise, cells=geometry
        )
        self._labels, self.tracks = to_ctc([self._movie.labels(t) for t in range(self.n_frames)], parents)

    def _simulate(
        self,
        rng: np.random.Generator,
        n_cells: int,
        radius: tuple[float, float],
        speed: float,
        persistence: float,
        drift: tuple[float, float],
        growth: float,
        entry_rate: float,
    ) -> tuple[list[SyntheticCells], dict[int, int]]:
        h, w = self.shape
        noise_scale = speed * math.sqrt(1.0 - persistence**2)
        v0 = rng.normal(0.0, speed, (2, n_cells))
        cells = _new_cells(
            rng, rng.uniform(0, h, n_cells), rng.uniform(0, w, n_cells), v0[0], v0[1], radius, 1
        )
        next_id = n_cells + 1
        parents: dict[int, int] = {}
        frames = [cells.geometry()]
        for _ in range(1, self.n_frames):
            n = len(cells)
            kick = rng.normal(0.0, noise_scale, (2, n))
            cells.vy = persistence * cells.vy + kick[0]
            cells.vx = persistence * cells.vx + kick[1]
            cells.y = cells.y + cells.vy + drift[0]
            cells.x = cells.x + cells.vx + drift[1]
            self._separate(cells)
            g = np.sqrt(1.0 + growth * rng.uniform(0.5, 1.5, n))
            cells.a, cells.b = cells.a * g, cells.b * g
            cells.theta = cells.theta + rng.normal(0.0, 0.05, n)
            cells, next_id = self._divide(rng, cells, parents, next_id)
            # Cells wholly outside the field (with a margin) are gone; new ones come in from the edges.
            margin = 2.0 * cells.a
            inside = (
                (cells.y > -margin) & (cells.y < h + margin) & (cells.x > -margin) & (cells.x < w + margin)
            )
            cells = cells.take(np.flatnonzero(inside))
            k = int(rng.poisson(entry_rate))
            if k:
                cells = _Cells.concat([cells, self._entering(rng, k, radius, speed, next_id)])
                next_id += k
            frames.append(cells.geometry())
        return frames, parents

    @staticmethod
    def _separate(cells: _Cells) -> None:
        """Push apart cells that overlap (one relaxation step), so labels seldom hide one another."""
        if len(cells) < 2:
            return
        r = np.sqrt(cells.a * cells.b)
        pos = np.stack([cells.y, cells.x], axis=1)
        pairs = cKDTree(pos).query_pairs(2.0 * float(r.max()), output_type="ndarray")
        if pairs.size == 0:
            return
        i, j = pairs[:, 0], pairs[:, 1]
        delta = pos[i] - pos[j]
        dist = np.maximum(np.hypot(delta[:, 0], delta[:, 1]), 1e-6)
        overlap = 0.9 * (r[i] + r[j]) - dist
        close = overlap > 0
        push = (delta[close] / dist[close, None]) * (overlap[close, None] / 2.0)
        np.add.at(pos, i[close], push)
        np.subtract.at(pos, j[close], push)
        cells.y, cells.x = pos[:, 0], pos[:, 1]

    @staticmethod
    def _divide(
        rng: np.random.Generator, cells: _Cells, parents: dict[int, int], next_id: int
    ) -> tuple[_Cells, int]:
        divide = cells.a * cells.b >= cells.divide_area
        if not divide.any():
            return cells, next_id
        d = np.flatnonzero(divide)
        mothers = cells.take(d)
        offset = mothers.a / 2.0
        dy, dx = np.cos(mothers.theta) * offset, -np.sin(mothers.theta) * offset
        parts = [cells.take(np.flatnonzero(~divide))]
        for sign in (1.0, -1.0):
            k = d.size
            a = mothers.a / math.sqrt(2.0) * 0.9
            b = mothers.b / math.sqrt(2.0) * 1.1
            ids = np.arange(next_id, next_id + k, dtype=np.int64)
            parts.append(
                _Cells(
                    y=mothers.y + sign * dy,
                    x=mothers.x + sign * dx,
                    vy=mothers.vy + sign * 0.3 * dy / np.maximum(offset, 1e-6),
                    vx=mothers.vx + sign * 0.3 * dx / np.maximum(offset, 1e-6),
                    a=a,
                    b=b,
                    theta=mothers.theta + math.pi / 2,
                    brightness=mothers.brightness * rng.uniform(0.9, 1.1, k),
                    ids=ids,
                    divide_area=a * b * rng.uniform(1.8, 2.4, k),
                )
            )
            parents.update(zip(ids.tolist(), mothers.ids.tolist(), strict=True))
            next_id += k
        return _Cells.concat(parts), next_id

    def _entering(
        self, rng: np.random.Generator, k: int, radius: tuple[float, float], speed: float, first_id: int
    ) -> _Cells:
        h, w = self.shape
        side = rng.integers(0, 4, k)  # top, bottom, left, right
        along = rng.uniform(0.0, 1.0, k)
        out = radius[1]  # start just outside the edge, heading in
        y = np.select([side == 0, side == 1], [-out, h + out], along * h)
        x = np.select([side == 2, side == 3], [-out, w + out], along * w)
        inward = 1.5 * max(speed, 0.5)
        vy = np.select([side == 0, side == 1], [inward, -inward], rng.normal(0.0, speed, k))
        vx = np.select([side == 2, side == 3], [inward, -inward], rng.normal(0.0, speed, k))
        return _new_cells(rng, y, x, vy, vx, radius, first_id)

    # -- frames and ground truth ------------------------------------------------------------------

    def __len__(self) -> int:
        return self.n_frames

    def __getitem__(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image, labels)`` of frame ``t``: the rendered image (as ``SyntheticMovie``) and its (H, W)
        uint32 ground truth whose values are track labels."""
        image, _ = self._movie[t]
        return image, self._labels[t]

    def labels(self, t: int) -> np.ndarray:
        """Ground truth of frame ``t`` alone: (H, W) uint32, values are track labels (0 background)."""
        return self._labels[t]

    @property
    def parents(self) -> dict[int, int]:
        """Track label → parent track label, for tracks that have one."""
        return {tr.label: tr.parent for tr in self.tracks if tr.parent}

    @property
    def divisions(self) -> dict[int, tuple[int, ...]]:
        """Parent track label → its daughters' labels, for parents with two daughters."""
        children: dict[int, list[int]] = {}
        for tr in self.tracks:
            if tr.parent:
                children.setdefault(tr.parent, []).append(tr.label)
        return {p: tuple(sorted(c)) for p, c in children.items() if len(c) == 2}

    def write_ctc(self, directory: str | Path) -> Path:
        """Write the ground truth in CTC form (``man_track.txt`` + ``man_track000.tif`` ...)."""
        return write_ctc(directory, self._labels, self.tracks, kind="gt")

    def describe(self) -> dict[str, Any]:
        """Counts of the ground truth: frames, tracks, divisions, cells per frame (min/max)."""
        per_frame = [int(np.count_nonzero(np.unique(lab))) for lab in self._labels]
        return {
            "frames": self.n_frames,
            "tracks": len(self.tracks),
            "divisions": len(self.divisions),
            "cells_per_frame": (min(per_frame), max(per_frame)),
        }
