"""The bundled cellsam-nano through ``segment()``: frames/s and F1 per decode window, in one run.

Segments the same held-out synthetic frames (all four modalities, ground truth known) with each decode
window and prints frames/s, the split between ``encode()`` and ``decode()``, F1 at IoU 0.5, and the
speed-up over full-context decoding (``--windows full`` is the baseline of the ratio).

    python benchmarks/bench_nano.py                     # 512² frames, windows 32 (default) and full
    python benchmarks/bench_nano.py --windows full 16 24 32 48 --chunks 8 16 32 --size 512
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from cellsam_core.checkpoint import load_bundled_model
from cellsam_core.evaluation import evaluate
from cellsam_core.inference import DecodeOptions, decode, encode
from cellsam_core.synthetic import MODALITIES, synthetic_frame


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--windows", nargs="+", default=["full", "32"], help="'full' or tokens per side")
    parser.add_argument("--chunks", type=int, nargs="+", default=[16], help="box_batch_size values")
    parser.add_argument("--size", type=int, default=512, help="frame side in pixels")
    parser.add_argument("--cells", type=int, default=80, help="cells drawn per frame")
    parser.add_argument("--frames", type=int, default=3, help="frames per modality")
    parser.add_argument(
        "--modalities",
        nargs="+",
        default=list(MODALITIES),
        choices=list(MODALITIES),
        help="synthetic modalities to draw frames from (default: all)",
    )
    parser.add_argument("--repeat", type=int, default=2, help="timed passes (best one counts)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = load_bundled_model()
    frames, truths = [], []
    for m, modality in enumerate(args.modalities):
        for i in range(args.frames):
            image, labels = synthetic_frame(
                (args.size, args.size), seed=970_000 + 100 * m + i, modality=modality, n_cells=args.cells
            )
            frames.append(image)
            truths.append(labels)
    print(
        f"cellsam-nano segment() on {len(frames)} frames of {args.size}² ({platform.machine()}, "
        f"{args.threads} torch threads)"
    )
    encode(frames[0], model)  # warm-up
    t_enc = float("inf")
    embeddings = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        embeddings = [encode(f, model) for f in frames]
        t_enc = min(t_enc, time.perf_counter() - t0)
    base = None
    header = ("window", "chunk", "frames/s", "encode ms", "decode ms", "F1@0.5", "ratio")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (6, 5, 8, 9, 9, 6, 6), strict=True)))
    for window in args.windows:
        opt_window = window if window == "full" else int(window)
        for chunk in args.chunks:
            options = DecodeOptions(window=opt_window, box_batch_size=chunk)
            decode(embeddings[0], model, options)
            t_dec = float("inf")
            results = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                results = [decode(e, model, options) for e in embeddings]
                t_dec = min(t_dec, time.perf_counter() - t0)
            fps = len(frames) / (t_enc + t_dec)
            base = fps if base is None else base
            f1 = evaluate(truths, [r.labels for r in results]).f1(0.5)
            print(
                f"{window:>6} {chunk:>5} {fps:8.2f} {1e3 * t_enc / len(frames):9.1f} "
                f"{1e3 * t_dec / len(frames):9.1f} {f1:6.3f} {fps / base:6.2f}",
                flush=True,
            )
    cells = np.mean([r.n_cells for r in results])
    print(f"({cells:.0f} cells per frame found; ratio = frames/s over the first row's)")


if __name__ == "__main__":
    main()
