"""Write throughput of `ZarrLabelSink` against raw `numpy.save` of the same bytes to the same disk.

Frames: ``--size`` x ``--size`` uint32 labels with ``--cells`` disk-shaped cells and a uint16 image
(noisy background, bright cells). Each configuration writes the same frames into a fresh store under
``--dir``; the baseline writes each frame's labels and image with `numpy.save`. Reports frames/s,
MB/s of raw (uncompressed) bytes, the ratio to the baseline, and stored size / raw size per array.

Usage::

    python benchmarks/bench_zarr.py --frames 20 --size 2048 --cells 300 --threads 1 2
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from skimage.draw import disk

from acquisition.frames import FrameId
from acquisition.spec import AcquisitionSpec, Sizes, StorageOptions
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--cells", type=int, default=300)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
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
