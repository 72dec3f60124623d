"""Lineage graphs on disk as GEFF (the ``geff`` package), in physical units, safe to read while they grow.

The graph is :func:`cellsam_core.lineage.lineage_graph`'s (pixels and frames); :func:`to_geff_graph`
converts it, in one place, to what the file holds: node properties ``t`` in seconds, ``y``, ``x`` in µm
(GEFF axes ``t`` (time, second), ``y``, ``x`` (space, micrometer)), ``area`` in µm², plus ``frame``,
``track_id``, ``parent_track_id``, ``lineage_id`` and ``label``; ``track_id`` and ``lineage_id`` are
declared as GEFF's tracklet and lineage properties. Without a pixel size (time interval), positions stay
in pixels (``t`` in frames) and the axis has no unit.

Update scheme (never a torn graph for a reader)
-----------------------------------------------
A GEFF is a Zarr group of many files, which no file system replaces at once. So ``path`` (e.g.
``p0.geff``) is a *symbolic link* to a complete, never-modified version folder in ``<path>.versions/``,
and :meth:`GeffLineageWriter.write`

1. writes the whole graph with ``geff.write`` (structure validated) into a temporary folder there, and
   renames it to its version name (``000000000042``): a version folder is complete once it has its name;
2. points a new link at it and renames that link over ``path`` (``os.replace``, atomic on POSIX): at
   every instant ``path`` names exactly one complete version;
3. deletes versions superseded more than ``keep_s`` seconds ago (keeping the newest ``keep``).

A reader resolves ``path`` once and reads that version (:func:`read_lineage` does, then calls
``geff.read``): the version it reads does not change, and stays on disk ``keep_s`` after being superseded,
so any read shorter than that sees one whole graph. ``geff.read(path)`` on the link itself also works, but
resolves the link again for every file it opens, so a rewrite during that read could mix two versions:
resolve first (``geff.read(os.path.realpath(path))``). The scheme needs a POSIX file system with symbolic
links (local disks, NFS, Lustre, ...), not an object store.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import networkx as nx

from acquisition.errors import TrackFileError

__all__ = ["GeffLineageWriter", "from_geff_graph", "read_lineage", "to_geff_graph"]

_VERSION_DIGITS = 12


def to_geff_graph(
    graph: nx.DiGraph, *, pixel_size_um: float | None, time_interval_s: float | None
) -> nx.DiGraph:
    """The lineage graph with the node properties a GEFF file holds (physical units; module docstring).

    Parameters
    ----------
    graph : networkx.DiGraph
        From :func:`cellsam_core.lineage.lineage_graph` (pixels, frames).
    pixel_size_um, time_interval_s : float or None
        Pixel size in µm and time between frames in s; None keeps pixels / frames.
    """
    for name, value in (("pixel_size_um", pixel_size_um), ("time_interval_s", time_interval_s)):
        if value is not None and not value > 0:
            raise TrackFileError(f"{name} must be > 0 or None, got {value}")
    px = float(pixel_size_um) if pixel_size_um is not None else 1.0
    dt = float(time_interval_s) if time_interval_s is not None else 1.0
    out = nx.DiGraph()
    out.add_nodes_from(
        (
            node,
            {
                "t": int(d["t"]) * dt,
                "y": float(d["y"]) * px,
                "x": float(d["x"]) * px,
                "area": float(d["area"]) * px * px,
                "frame": int(d["t"]),
                "track_id": int(d["track_id"]),
                "parent_track_id": int(d["parent_track_id"]),
                "lineage_id": int(d["lineage_id"]),
                "label": int(d["label"]),
            },
        )
        for node, d in graph.nodes(data=True)
    )
    out.add_edges_from(graph.edges())
    return out


def from_geff_graph(graph: nx.DiGraph, *, pixel_size_um: float | None) -> nx.DiGraph:
    """Inverse of :func:`to_geff_graph`: the lineage graph in pixels and frames, as
    :func:`cellsam_core.lineage.lineage_graph` makes it (``t`` from ``frame``; floats are equal up to
    rounding of the unit conversion), e.g. to extend with :class:`cellsam_core.lineage.LineageBuilder`.

    Parameters
    ----------
    graph : networkx.DiGraph
        As :func:`read_lineage` returns it (node properties of the module docstring).
    pixel_size_um : float or None
        The pixel size it was written with (time needs none: ``frame`` holds the time index).
    """
    px = float(pixel_size_um) if pixel_size_um is not None else 1.0
    out = nx.DiGraph()
    out.add_nodes_from(
        (
            int(node),
            {
                "t": int(d["frame"]),
                "y": float(d["y"]) / px,
                "x": float(d["x"]) / px,
                "track_id": int(d["track_id"]),
                "parent_track_id": int(d["parent_track_id"]),
                "lineage_id": int(d["lineage_id"]),
                "label": int(d["label"]),
                "area": float(d["area"]) / (px * px),
            },
        )
        for node, d in graph.nodes(data=True)
    )
    out.add_edges_from((int(a), int(b)) for a, b in graph.edges())
    return out


def _metadata(pixel_size_um: float | None, time_interval_s: float | None) -> Any:
    from geff_spec import Axis, GeffMetadata

    space = "micrometer" if pixel_size_um is not None else None
    return GeffMetadata(
        directed=True,
        axes=[
            Axis(name="t", type="time", unit="second" if time_interval_s is not None else None),
            Axis(name="y", type="space", unit=space),
            Axis(name="x", type="space", unit=space),
        ],
        track_node_props={"tracklet": "track_id", "lineage": "lineage_id"},
        node_props_metadata={},
        edge_props_metadata={},
        extra={"cellsam_stream": {"pixel_size_um": pixel_size_um, "time_interval_s": time_interval_s}},
    )


class GeffLineageWriter:
    """Writes successive versions of one lineage graph to ``path`` (see the module docstring).

    Parameters
    ----------
    path : str or Path
        The GEFF path readers open (a symbolic link the writer manages; its parent folder is created).
    pixel_size_um, time_interval_s : float or None
        Physical units of the positions (None: pixels / frames).
    keep_s : float
        Superseded versions stay at least this long for readers still reading them.
    keep : int
        Newest versions always kept (≥ 1).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        pixel_size_um: float | None,
        time_interval_s: float | None,
        keep_s: float = 60.0,
        keep: int = 2,
    ) -> None:
        if keep < 1 or keep_s < 0:
            raise TrackFileError(f"keep must be ≥ 1 and keep_s ≥ 0, got {keep}, {keep_s}")
        self.path = Path(path)
        self.versions = self.path.with_name(self.path.name + ".versions")
        self.pixel_size_um = pixel_size_um
        self.time_interval_s = time_interval_s
        self.keep_s = keep_s
        self.keep = keep
        if self.path.exists() and not self.path.is_symlink():
            raise TrackFileError(
                f"{self.path} exists and is not a link this writer manages; choose another path or remove it"
            )
        self.versions.mkdir(parents=True, exist_ok=True)
        done = self._existing()
        self._next = int(done[-1].name) + 1 if done else 0

    def _existing(self) -> list[Path]:
        return sorted(
            p for p in self.versions.iterdir() if p.name.isdigit() and len(p.name) == _VERSION_DIGITS
        )

    def write(self, graph: nx.DiGraph) -> Path:
        """Write ``graph`` (pixels and frames, as :func:`cellsam_core.lineage.lineage_graph`) as the new
        current version; returns that version's folder."""
        import geff

        geff_graph = to_geff_graph(
            graph, pixel_size_um=self.pixel_size_um, time_interval_s=self.time_interval_s
        )
        tmp = self.versions / f".tmp-{uuid.uuid4().hex}"
        version = self.versions / f"{self._next:0{_VERSION_DIGITS}d}"
        try:
            geff.write(
                geff_graph,
                str(tmp),
                metadata=_metadata(self.pixel_size_um, self.time_interval_s),
                zarr_format=3,
            )
            os.rename(tmp, version)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._next += 1
        link_tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.link")
        os.symlink(os.path.relpath(version, self.path.parent), link_tmp)
        os.replace(link_tmp, self.path)
        self._prune()
        return version

    def _prune(self) -> None:
        versions = self._existing()
        now = time.time()
        for i, older in enumerate(versions[: -self.keep]):
            # A version was superseded when the next one was made (its folder's modification time).
            if now - versions[i + 1].stat().st_mtime > self.keep_s:
                shutil.rmtree(older, ignore_errors=True)
        for stale in self.versions.glob(".tmp-*"):  # left by a writer that died mid-write
            if now - stale.stat().st_mtime > self.keep_s:
                shutil.rmtree(stale, ignore_errors=True)


def read_lineage(path: str | Path) -> tuple[nx.DiGraph, Any]:
    """Read the current version of a lineage written by :class:`GeffLineageWriter` (or any GEFF folder)
    with ``geff.read``: ``(graph, metadata)``, properties as written (physical units).

    Raises
    ------
    TrackFileError
        Nothing is at ``path``.
    """
    import geff

    resolved = os.path.realpath(path)
    if not os.path.isdir(resolved):
        raise TrackFileError(f"no lineage at {path}")
    graph, metadata = geff.read(resolved)
    return graph, metadata
