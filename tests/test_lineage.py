"""Lineage as GEFF: written with physical units, read back with geff's reader, never torn while rewritten."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import geff
import networkx as nx
import numpy as np
import pytest

from acquisition.errors import TrackFileError
from acquisition.lineage import GeffLineageWriter, read_lineage
from acquisition.sim_tracks import TrackedMovie
from cellsam_core.lineage import LineageBuilder, lineage_graph, node_id
from cellsam_core.tracking import track_sequence


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    movie = TrackedMovie((128, 128), 10, seed=2, n_cells=10, growth=0.08, noise=False)
    return lineage_graph(track_sequence(movie.labels(t) for t in range(len(movie))))


def test_geff_round_trip_in_physical_units(tmp_path: Path, graph: nx.DiGraph) -> None:
    writer = GeffLineageWriter(tmp_path / "p0.geff", pixel_size_um=0.5, time_interval_s=30.0)
    version = writer.write(graph)
    assert (tmp_path / "p0.geff").is_symlink() and os.path.samefile(tmp_path / "p0.geff", version)
    back, metadata = geff.read(os.path.realpath(tmp_path / "p0.geff"))
    assert set(back.nodes) == set(graph.nodes) and set(back.edges) == set(graph.edges)
    node = next(iter(graph.nodes))
    src, got = graph.nodes[node], back.nodes[node]
    assert got["t"] == pytest.approx(src["t"] * 30.0) and got["frame"] == src["t"]
    assert got["y"] == pytest.approx(src["y"] * 0.5) and got["x"] == pytest.approx(src["x"] * 0.5)
    assert got["area"] == pytest.approx(src["area"] * 0.25)
    assert got["track_id"] == src["track_id"] and got["lineage_id"] == src["lineage_id"]
    axes = {a.name: (a.type, a.unit) for a in metadata.axes}
    assert axes == {"t": ("time", "second"), "y": ("space", "micrometer"), "x": ("space", "micrometer")}
    assert metadata.track_node_props == {"tracklet": "track_id", "lineage": "lineage_id"}
    assert any(graph.out_degree(n) == 2 for n in graph.nodes), "the movie should hold a division"


def test_unknown_units_keep_pixels_and_frames(tmp_path: Path, graph: nx.DiGraph) -> None:
    GeffLineageWriter(tmp_path / "g.geff", pixel_size_um=None, time_interval_s=None).write(graph)
    back, metadata = read_lineage(tmp_path / "g.geff")
    node = next(iter(graph.nodes))
    assert back.nodes[node]["y"] == pytest.approx(graph.nodes[node]["y"])
    assert [a.unit for a in metadata.axes] == [None, None, None]


def test_empty_graph_and_refusals(tmp_path: Path) -> None:
    GeffLineageWriter(tmp_path / "e.geff", pixel_size_um=1.0, time_interval_s=1.0).write(nx.DiGraph())
    assert read_lineage(tmp_path / "e.geff")[0].number_of_nodes() == 0
    (tmp_path / "plain.geff").mkdir()
    with pytest.raises(TrackFileError, match="not a link"):
        GeffLineageWriter(tmp_path / "plain.geff", pixel_size_um=1.0, time_interval_s=1.0)
    with pytest.raises(TrackFileError, match="no lineage"):
        read_lineage(tmp_path / "missing.geff")
    with pytest.raises(TrackFileError, match="pixel_size_um"):
        GeffLineageWriter(tmp_path / "x.geff", pixel_size_um=0.0, time_interval_s=1.0).write(nx.DiGraph())


def test_old_versions_are_pruned_and_writing_resumes(tmp_path: Path, graph: nx.DiGraph) -> None:
    path = tmp_path / "p.geff"
    writer = GeffLineageWriter(path, pixel_size_um=1.0, time_interval_s=1.0, keep_s=0.0, keep=2)
    for _ in range(4):
        writer.write(graph)
    names = sorted(p.name for p in writer.versions.iterdir())
    assert len(names) == 2 and Path(os.path.realpath(path)).name == names[-1]
    again = GeffLineageWriter(path, pixel_size_um=1.0, time_interval_s=1.0)
    assert int(again.write(graph).name) == int(names[-1]) + 1


def chain(n: int) -> nx.DiGraph:
    """Version n of a growing graph: one track of n cells; its nodes and edges say which n it is."""
    g = nx.DiGraph()
    for t in range(n):
        g.add_node(
            node_id(t, 1),
            t=t,
            y=float(n),
            x=float(t),
            track_id=1,
            parent_track_id=0,
            lineage_id=1,
            label=n,
            area=float(n),
        )
        if t:
            g.add_edge(node_id(t - 1, 1), node_id(t, 1))
    return g


def test_reader_never_sees_a_torn_graph_during_rewrites(tmp_path: Path) -> None:
    path = tmp_path / "live.geff"
    writer = GeffLineageWriter(path, pixel_size_um=2.0, time_interval_s=1.0, keep_s=30.0)
    writer.write(chain(1))
    stop = threading.Event()
    reads: list[int] = []
    problems: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                g, _ = read_lineage(path)
            except Exception as exc:  # any failure to read a whole graph is a torn read
                problems.append(repr(exc))
                continue
            n = g.number_of_nodes()
            labels = {d["label"] for _, d in g.nodes(data=True)}
            ys = {d["y"] for _, d in g.nodes(data=True)}
            if labels != {n} or ys != {2.0 * n} or g.number_of_edges() != n - 1:
                problems.append(f"mixed graph: {n} nodes, labels {labels}, {g.number_of_edges()} edges")
            reads.append(n)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for n in range(2, 42):
            writer.write(chain(n))
    finally:
        stop.set()
        thread.join()
    assert not problems, problems[:3]
    assert reads and reads == sorted(reads), "a reader sees versions in order"
    assert len(set(reads)) > 1, "the reader should have read while the writer rewrote"


def test_builder_resumes_from_a_graph(graph: nx.DiGraph) -> None:
    movie = TrackedMovie((128, 128), 10, seed=2, n_cells=10, growth=0.08, noise=False)
    frames = list(track_sequence(movie.labels(t) for t in range(len(movie))))
    first = LineageBuilder()
    for f in frames[:6]:
        first.add(f)
    resumed = LineageBuilder(first.graph.copy())
    for f in frames[6:]:
        resumed.add(f)
    resumed.add(frames[-1])  # adding a frame twice changes nothing
    assert set(resumed.graph.edges) == set(graph.edges) and set(resumed.graph.nodes) == set(graph.nodes)
    assert np.all([resumed.graph.nodes[n] == graph.nodes[n] for n in graph.nodes])
