"""The lineage graph of tracked frames: one node per cell per frame, one edge per link, as ``networkx``.

Nodes are identified by :func:`node_id` ``(t, track_id)`` and carry, in pixels and frames (array axis
order, as everywhere in ``cellsam_core``):

=================== ====== ===================================================================
attribute           type   meaning
=================== ====== ===================================================================
``t``               int    time index
``y``, ``x``        float  centroid, pixels
``track_id``        int    the cell's track (its value in ``track_labels``)
``parent_track_id`` int    the track it descends from by division, 0 for none
``lineage_id``      int    the root track of its lineage tree
``label``           int    its value in the frame's cell labels
``area``            float  pixels
=================== ====== ===================================================================

Edges go forward in time: from a track's previous cell to its next one (skipping frames where gap closing
bridged them), and from a parent's last cell to each daughter's first. :mod:`acquisition.lineage`
writes this graph as GEFF, in physical units.
"""

from __future__ import annotations

from collections.abc import Iterable

import networkx as nx

from cellsam_core.tracking import TrackedFrame

__all__ = ["LineageBuilder", "lineage_graph", "node_id"]

_TRACK_BITS = 32


def node_id(t: int, track_id: int) -> int:
    """Node id of track ``track_id`` at time ``t``: ``t · 2**32 + track_id`` (unique, sortable by time)."""
    return (int(t) << _TRACK_BITS) | int(track_id)


class LineageBuilder:
    """Grows a lineage graph one tracked frame at a time, in time order.

    Parameters
    ----------
    graph : networkx.DiGraph, optional
        A graph built before (e.g. read back after a restart) to extend; its nodes must carry the
        attributes of the module docstring.
    """

    def __init__(self, graph: nx.DiGraph | None = None) -> None:
        self.graph: nx.DiGraph = graph if graph is not None else nx.DiGraph()
        self._last: dict[int, int] = {}  # track id -> its latest node
        self._lineage: dict[int, int] = {}  # track id -> root track id
        latest: dict[int, int] = {}
        for node, data in self.graph.nodes(data=True):
            tid = int(data["track_id"])
            if node_id(data["t"], tid) != node:
                continue
            if tid not in latest or data["t"] > latest[tid]:
                latest[tid] = int(data["t"])
                self._lineage[tid] = int(data["lineage_id"])
        self._last = {tid: node_id(t, tid) for tid, t in latest.items()}

    def add(self, frame: TrackedFrame) -> None:
        """Add a frame's cells and their links (call in time order; adding a frame twice changes nothing)."""
        cells = frame.cells
        ids = frame.track_ids.tolist()
        parents = frame.parent_track_ids.tolist()
        nodes, edges = [], []
        for row, (tid, parent) in enumerate(zip(ids, parents, strict=True)):
            node = node_id(frame.t, tid)
            if tid not in self._lineage:
                self._lineage[tid] = self._lineage.get(parent, parent) if parent else tid
            nodes.append(
                (
                    node,
                    {
                        "t": frame.t,
                        "y": float(cells.centroid[row, 0]),
                        "x": float(cells.centroid[row, 1]),
                        "track_id": tid,
                        "parent_track_id": parent,
                        "lineage_id": self._lineage[tid],
                        "label": int(cells.label[row]),
                        "area": float(cells.area[row]),
                    },
                )
            )
            previous = self._last.get(tid)
            if previous is None and parent:
                previous = self._last.get(parent)
            if previous is not None and previous != node:
                edges.append((previous, node))
        self.graph.add_nodes_from(nodes)
        self.graph.add_edges_from(edges)
        for tid in ids:
            self._last[tid] = node_id(frame.t, tid)


def lineage_graph(frames: Iterable[TrackedFrame]) -> nx.DiGraph:
    """The lineage graph of tracked frames given in time order (see the module docstring)."""
    builder = LineageBuilder()
    for frame in frames:
        builder.add(frame)
    return builder.graph
