"""Encoder throughput (both ViT passes) at batch 1, 2 and 4, as frames/s and as a ratio to batch 1.

python benchmarks/bench_encode.py --model tiny
python benchmarks/bench_encode.py --model cellsam_vit_b --batches 1 2 4 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

import torch

from cellsam_core.acceleration import Acceleration
from cellsam_core.inference import EncodeOptions, encode_batch
from cellsam_core.registry import build_model
from cellsam_core.synthetic import synthetic_frame


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--size", type=int, default=None, help="frame side (default: model input size)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--frames", type=int, default=8, help="frames per measurement")
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"], help="autocast")
    parser.add_argument("--attention", default="reference", choices=["reference", "sdpa"])
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_model(args.model).to(args.device, getattr(torch, args.dtype)).eval()
    side = args.size or model.image_size
    frames = [synthetic_frame((side, side), seed=i, n_cells=40)[0] for i in range(args.frames)]
    print(
        f"encode benchmark: model={args.model} frame={side}px device={args.device} dtype={args.dtype} "
        f"precision={args.precision} attention={args.attention} "
        f"torch threads={torch.get_num_threads()}"
    )
    options = EncodeOptions(acceleration=Acceleration(precision=args.precision, attention=args.attention))
    encode_batch(frames[:1], model, options, max_batch=1)  # warm-up
    base = None
    for b in args.batches:
        t0 = time.perf_counter()
        for start in range(0, len(frames), b):
            encode_batch(frames[start : start + b], model, options, max_batch=b)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        fps = len(frames) / (time.perf_counter() - t0)
        base = base or fps
        print(f"batch {b}: {fps:7.2f} frames/s  ({fps / base:.2f}x batch 1)")


if __name__ == "__main__":
    main()
