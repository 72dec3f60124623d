"""Write throughput of `ZarrLabelSink` against raw `numpy.save` of the same bytes to the same disk.

Frames: ``--size`` x ``--size`` uint32 labels with ``--cells`` disk-shaped cells and a uint16 image
(noisy background, bright cells). Each configuration writes the same frames into a fresh store under
``--dir``; the baseline writes each frame's labels and image with `numpy.save`. Reports frames/s,
MB/s of raw (uncompressed) bytes, the ratio to the baseline, and stored size / raw size per array.

The ``window`` section measures what the display window (the ``omero`` contrast range kept up to date
as frames arrive) adds to a frame write: the frame's robust intensity range alone (the per-frame
work), and whole writes with and without the window update, interleaved rounds, median.

Usage::

    python benchmarks/bench_zarr.py --frames 20 --size 2048 --cells 300 --threads 1 2
    python benchmarks/bench_zarr.py --frames 32 --sections window
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
from skimage.draw import disk

import acquisition.zarr_sink
from acquisition.frames import FrameId
from acquisition.spec import AcquisitionSpec, Sizes, StorageOptions
from acquisition.zarr_layout import frame_intensity_range
from acquisition.zarr_sink import ZarrLabelSink
from cellsam_core.cells import CellTable


def make_frame(rng: np.random.Generator, size: int, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels (size, size) uint32 with ``n_cells`` disks, and a matching uint16 image."""
    labels = np.zeros((size, size), np.uint32)
    radius = max(4, size // 100)
    for label in range(1, n_cells + 1):
        r = rng.integers(radius // 2, radius * 2)
        centre = rng.integers(r, size - r, 2)
        labels[disk(tuple(centre), r, shape=labels.shape)] = label
    image = rng.normal(200, 20, (size, size)).clip(0, 65535)
    image[labels > 0] += 1500
    return labels, image.astype(np.uint16)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_numpy(root: Path, frames: list[tuple[np.ndarray, np.ndarray]]) -> float:
    out = root / "npy"
    out.mkdir()
    start = time.perf_counter()
    for i, (labels, image) in enumerate(frames):
        np.save(out / f"labels_{i}.npy", labels)
        np.save(out / f"image_{i}.npy", image)
    return time.perf_counter() - start


def bench_sink(
    root: Path,
    name: str,
    frames: list[tuple[np.ndarray, np.ndarray]],
    tables: list[CellTable],
    storage: StorageOptions,
    threads: int,
) -> tuple[float, Path]:
    size = frames[0][0].shape
    spec = AcquisitionSpec(
        acquisition=name,
        sizes=Sizes(t=None, p=1, z=1, c=1),
        frame_shape=size,
        pixel_size_um=0.65,
        storage=storage,
    )
    sink = ZarrLabelSink(root)
    sink.open_acquisition(spec)

    def write(i: int) -> None:
        labels, image = frames[i]
        sink.write(FrameId(name, 0, i, 0), labels, image, tables[i])

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, range(len(frames))))
    elapsed = time.perf_counter() - start
    sink.close_acquisition(name)
    return elapsed, sink.store_path(name)


def bench_window(
    root: Path,
    frames: list[tuple[np.ndarray, np.ndarray]],
    tables: list[CellTable],
    rounds: int,
) -> None:
    """Print the display window's cost per frame: its own work, and whole writes with and without it.

    The window's work per frame is the frame's robust range (always) plus, when the range is not yet
    covered, one widening (a locked rewrite of the root's and every position's metadata); widenings are
    counted and timed by wrapping the sink's method, and spread over the frames written.
    """
    images = [image[np.newaxis] for _, image in frames]
    frame_intensity_range(images[0])  # warm-up
    start = time.perf_counter()
    for image in images:
        frame_intensity_range(image)
    range_s = (time.perf_counter() - start) / len(images)

    widenings: list[float] = []
    widen = ZarrLabelSink._widen_windows

    def timed_widen(self: ZarrLabelSink, *args: Any) -> None:
        begin = time.perf_counter()
        widen(self, *args)
        widenings.append(time.perf_counter() - begin)

    with_window: list[float] = []
    without: list[float] = []
    for i in range(rounds):  # interleaved, so load on a shared machine hits both arms alike
        with mock.patch.object(ZarrLabelSink, "_widen_windows", timed_widen):
            elapsed, store = bench_sink(root, f"window-on-{i}", frames, tables, StorageOptions(), 1)
        with_window.append(elapsed / len(frames))
        shutil.rmtree(store)
        # The arm without the window: the sink gets no range to merge (as for labels-only frames).
        with mock.patch.object(acquisition.zarr_sink, "frame_intensity_range", lambda image: None):
            elapsed, store = bench_sink(root, f"window-off-{i}", frames, tables, StorageOptions(), 1)
        without.append(elapsed / len(frames))
        shutil.rmtree(store)
    on, off = statistics.median(with_window), statistics.median(without)
    widen_s = sum(widenings) / (rounds * len(frames))
    per_frame = range_s + widen_s
    print(
        f"display window, blosc-zstd, 1 writer thread, {len(frames)} frames x {rounds} interleaved rounds:\n"
        f"  frame's robust range (0.1/99.9 percentiles): {range_s * 1e3:6.2f} ms/frame\n"
        f"  widenings: {len(widenings) / rounds:.1f} per run of {len(frames)} frames, "
        f"{statistics.mean(widenings) * 1e3:.1f} ms each = {widen_s * 1e3:.2f} ms/frame\n"
        f"  window work per frame: {per_frame * 1e3:.2f} ms = {per_frame / on:.2%} of a frame write "
        f"({on * 1e3:.1f} ms, median)\n"
        f"  whole write with / without the window: {on * 1e3:.1f} / {off * 1e3:.1f} ms/frame "
        f"(ratio {on / off:.3f}; on a busy machine this difference is mostly noise)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--cells", type=int, default=300)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--sections", nargs="+", choices=("codecs", "window"), default=["codecs", "window"])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the window section")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    # Cycle a few distinct frames: generating hundreds of 2048^2 frames would dominate the run.
    distinct = [make_frame(rng, args.size, args.cells) for _ in range(min(args.frames, 4))]
    frames = [distinct[i % len(distinct)] for i in range(args.frames)]
    tables = [CellTable.from_labels(labels) for labels, _ in frames]
    raw_mb = sum(lab.nbytes + img.nbytes for lab, img in frames) / 1e6
    label_raw = sum(lab.nbytes for lab, _ in frames)
    image_raw = sum(img.nbytes for _, img in frames)

    root = Path(tempfile.mkdtemp(prefix="bench_zarr_", dir=args.dir))
    try:
        if "window" in args.sections:
            bench_window(root, frames, tables, args.rounds)
        if "codecs" not in args.sections:
            return
        t_np = bench_numpy(root, frames)
        print(
            f"frames: {args.frames} x {args.size}^2, {args.cells} cells, raw {raw_mb:.0f} MB (labels + image)"
        )
        header = ("config", "frames/s", "MB/s", "vs np.save", "labels size", "image size")
        print(
            f"{header[0]:<28} {header[1]:>9} {header[2]:>8} {header[3]:>10} {header[4]:>11} {header[5]:>10}"
        )
        np_fps, np_mbs = args.frames / t_np, raw_mb / t_np
        print(f"{'numpy.save':<28} {np_fps:9.1f} {np_mbs:8.0f} {1.0:10.2f} {1.0:11.3f} {1.0:10.3f}")
        configs = {
            "none": StorageOptions(label_codec="none", image_codec="none"),
            "blosc-zstd": StorageOptions(),
            "zstd": StorageOptions(label_codec="zstd", image_codec="zstd"),
            "blosc-zstd+shard8": StorageOptions(shard_t=8),
        }
        for threads in args.threads:
            for cname, storage in configs.items():
                name = f"{cname.replace('+', '_')}-{threads}"
                elapsed, store = bench_sink(root, name, frames, tables, storage, threads)
                label_ratio = dir_bytes(store / "0" / "labels" / "cells" / "0") / label_raw
                image_ratio = dir_bytes(store / "0" / "0") / image_raw
                print(
                    f"{cname + f' ({threads} thr)':<28} {args.frames / elapsed:9.1f} {raw_mb / elapsed:8.0f} "
                    f"{t_np / elapsed:10.2f} {label_ratio:11.4f} {image_ratio:10.3f}"
                )
                shutil.rmtree(store)
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
