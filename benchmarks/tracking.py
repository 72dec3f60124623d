"""Tracking accuracy and cost, in one run: the live linker against an offline tracker on the same cells.

On simulated live-cell movies with known tracks (:class:`acquisition.sim_tracks.TrackedMovie`: cells move,
grow, divide, enter and leave the field), prints the Cell Tracking Challenge measures TRA, DET, LNK and
division precision / recall / F1 (``traccuracy``; :mod:`acquisition.track_metrics`) for

  (a) the live linker (:class:`cellsam_core.tracking.OnlineTracker`) on the ground-truth masks,
  (b) the live linker on the segmentation by the bundled model (``cellsam_core.load_bundled_model()``),
  (c) laptrack, offline (global LAP with gap closing and splitting), on the same segmentation,

plus laptrack on the ground-truth masks, the live-minus-offline TRA difference, and the linking cost:
p50 / p95 milliseconds per frame of ``OnlineTracker.link`` (cost matrix, assignment, divisions, events and
the tracked label image) at about ``--cost-cells`` cells per frame, on synthetic label images.

    python benchmarks/tracking.py                       # 256² × 40 frames, seeds 0 and 1
    python benchmarks/tracking.py --seeds 0 --frames 30 --no-model
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # traccuracy's and laptrack's progress bars

import numpy as np

from acquisition.sim_tracks import TrackedMovie
from acquisition.track_metrics import tracking_metrics
from cellsam_core.cells import CellTable
from cellsam_core.tracking import OnlineTracker, TrackerConfig, track_sequence

COLUMNS = ("TRA", "DET", "LNK", "division_f1", "division_precision", "division_recall")


def live(labels: list[np.ndarray], tables: list[CellTable] | None, config: TrackerConfig):
    frames = list(track_sequence(labels, config, tables=tables))
    parents: dict[int, int] = {}
    for f in frames:
        parents.update(
            (k, p) for k, p in zip(f.track_ids.tolist(), f.parent_track_ids.tolist(), strict=True) if p
        )
    return [f.track_labels for f in frames], parents


def laptrack(labels: list[np.ndarray], tables: list[CellTable], config: TrackerConfig):
    """laptrack on the cells' centroids; returns track label images and parents (ids shifted by 1)."""
    import pandas as pd
    from laptrack import LapTrack

    rows = [
        (t, int(lab), y, x)
        for t, table in enumerate(tables)
        for lab, (y, x) in zip(table.label.tolist(), table.centroid.tolist(), strict=True)
    ]
    df = pd.DataFrame(rows, columns=["frame", "label", "y", "x"])
    tracker = LapTrack(
        cutoff=config.max_distance**2,
        gap_closing_cutoff=config.max_distance**2,
        gap_closing_max_frame_count=config.gap_frames,
        splitting_cutoff=config.division_distance**2,
    )
    track_df, split_df, _ = tracker.predict_dataframe(df, ["y", "x"], only_coordinate_cols=False)
    out = []
    for t, lab in enumerate(labels):
        sub = track_df[track_df["frame"] == t]
        lut = np.zeros(int(lab.max(initial=0)) + 1, np.uint32)
        lut[sub["label"].to_numpy(int)] = sub["track_id"].to_numpy(int) + 1
        out.append(lut[lab])
    parents = {
        int(c) + 1: int(p) + 1
        for p, c in zip(
            split_df["parent_track_id"].tolist(), split_df["child_track_id"].tolist(), strict=True
        )
    }
    return out, parents


def segment_movie(movie: TrackedMovie, model) -> tuple[list[np.ndarray], list[CellTable], float]:
    from cellsam_core.inference import segment

    labels, tables = [], []
    begin = time.perf_counter()
    for t in range(len(movie)):
        seg = segment(movie[t][0], model)
        labels.append(np.asarray(seg.labels))
        tables.append(seg.cells)
    return labels, tables, (time.perf_counter() - begin) / len(movie)


def linking_cost(cells: int, frames: int, config: TrackerConfig, seed: int) -> dict[str, float]:
    """Per-frame cost of ``OnlineTracker.link``: wall-clock and CPU-time percentiles in ms (on a shared
    machine the wall clock also counts time other processes held the CPU)."""
    side = round(float(np.sqrt(cells / 500.0)) * 1024)
    movie = TrackedMovie(
        (side, side),
        frames,
        seed=seed,
        n_cells=int(0.96 * cells),
        cell_radius=(8.0, 12.0),
        growth=0.005,
        noise=False,
    )
    labels = [movie.labels(t) for t in range(frames)]
    tables = [CellTable.from_labels(lab) for lab in labels]
    tracker = OnlineTracker(config)
    wall, cpu = [], []
    for t, (lab, table) in enumerate(zip(labels, tables, strict=True)):
        w0, c0 = time.perf_counter(), time.process_time()
        tracker.link(t, lab, table)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    # Frame 0 has nothing to link to.
    w, c = 1e3 * np.asarray(wall[1:]), 1e3 * np.asarray(cpu[1:])
    return {
        "cells": float(np.mean([len(t) for t in tables])),
        "side": float(side),
        "wall_p50": float(np.percentile(w, 50)),
        "wall_p95": float(np.percentile(w, 95)),
        "cpu_p50": float(np.percentile(c, 50)),
        "cpu_p95": float(np.percentile(c, 95)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=256, help="frame side in pixels")
    parser.add_argument("--frames", type=int, default=40, help="frames per movie")
    parser.add_argument("--cells", type=int, default=30, help="cells at t = 0")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one movie per seed")
    parser.add_argument("--no-model", action="store_true", help="skip (b) and (c): ground-truth masks only")
    parser.add_argument("--cost-cells", type=int, default=500, help="cells per frame for the cost")
    parser.add_argument("--cost-frames", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the segmentation")
    args = parser.parse_args()

    config = TrackerConfig()
    model = None
    if not args.no_model:
        import torch

        from cellsam_core.checkpoint import load_bundled_model

        if args.threads:
            torch.set_num_threads(args.threads)
        model = load_bundled_model()
    print(f"tracking benchmark ({platform.machine()}, {os.cpu_count()} CPUs); {config!r}")
    results: dict[str, list[dict[str, float]]] = {}
    for seed in args.seeds:
        movie = TrackedMovie((args.size, args.size), args.frames, seed=seed, n_cells=args.cells)
        info = movie.describe()
        lo, hi = info["cells_per_frame"]
        print(
            f"movie seed {seed}: {args.size}² × {args.frames} frames, {info['tracks']} tracks, "
            f"{info['divisions']} divisions, {lo}-{hi} cells/frame",
            flush=True,
        )
        truth = [movie.labels(t) for t in range(len(movie))]
        truth_tables = [CellTable.from_labels(lab) for lab in truth]
        runs = {
            "(a) live, truth masks": live(truth, truth_tables, config),
            "    laptrack, truth masks": laptrack(truth, truth_tables, config),
        }
        if model is not None:
            seg_labels, seg_tables, sec = segment_movie(movie, model)
            print(
                f"  segmented in {sec:.2f} s/frame, {np.mean([len(t) for t in seg_tables]):.1f} cells/frame"
            )
            runs["(b) live, model masks"] = live(seg_labels, seg_tables, config)
            runs["(c) laptrack, model masks"] = laptrack(seg_labels, seg_tables, config)
        for name, (frames, parents) in runs.items():
            results.setdefault(name, []).append(tracking_metrics(truth, movie.tracks, frames, parents))

    print(f"\nmean over {len(args.seeds)} movie(s)")
    print(f"{'':28}" + "".join(f"{c.replace('division_', 'div ')[:9]:>10}" for c in COLUMNS))
    mean = {name: {c: float(np.mean([r[c] for r in rs])) for c in COLUMNS} for name, rs in results.items()}
    for name, scores in mean.items():
        print(f"{name:28}" + "".join(f"{scores[c]:10.4f}" for c in COLUMNS))
    if "(b) live, model masks" in mean:
        b, c = mean["(b) live, model masks"], mean["(c) laptrack, model masks"]
        print(
            f"live - offline on model masks: TRA {b['TRA'] - c['TRA']:+.4f}, LNK {b['LNK'] - c['LNK']:+.4f}, "
            f"division F1 {b['division_f1'] - c['division_f1']:+.4f}; TRA ratio {b['TRA'] / c['TRA']:.4f}"
        )
    for name, cfg in (("default", config), ("centroid only", TrackerConfig(overlap_weight=0.0))):
        cost = linking_cost(args.cost_cells, args.cost_frames, cfg, seed=99)
        print(
            f"linking cost ({name}, {cost['cells']:.0f} cells/frame, {cost['side']:.0f}² labels): "
            f"wall p50 {cost['wall_p50']:.2f} ms, p95 {cost['wall_p95']:.2f} ms; "
            f"CPU p50 {cost['cpu_p50']:.2f} ms, p95 {cost['cpu_p95']:.2f} ms per frame"
        )


if __name__ == "__main__":
    main()
