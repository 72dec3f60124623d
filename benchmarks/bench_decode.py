"""Batched SAM mask decoding vs the reference's one-box-at-a-time loop, on the same embedding.

Prints, for each box count, the seconds of the loop (chunk 1, as the reference decodes) and of chunked
batches, and the ratio loop / batched (> 1 means batching is faster). Both arms produce the same label
image (checked). Random weights: the cost does not depend on the values.

    python benchmarks/bench_decode.py --model tiny --boxes 50 200 1000
    python benchmarks/bench_decode.py --model cellsam_vit_b --boxes 50 200 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from cellsam_core.acceleration import Acceleration
from cellsam_core.inference import DecodeOptions, _masks_for_inputs
from cellsam_core.registry import build_model


def _boxes(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    centre = rng.uniform(0.05 * size, 0.95 * size, (n, 2))
    half = rng.uniform(0.01 * size, 0.03 * size, (n, 2))
    return np.concatenate([centre - half, centre + half], axis=1).astype(np.float32)


def _time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--boxes", type=int, nargs="+", default=[50, 200, 1000])
    parser.add_argument("--chunks", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--attention", default="reference", choices=["reference", "sdpa"])
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_model(args.model).to(args.device, getattr(torch, args.dtype)).eval()
    # The mask decoder is a function of the embedding only: any fixed tensor of the right shape will do.
    sam = model.sam
    c = sam.prompt_encoder.embed_dim
    h, w = sam.prompt_encoder.image_embedding_size
    embedding = torch.randn(c, h, w, device=args.device, dtype=getattr(torch, args.dtype))
    size = model.image_size
    rng = np.random.default_rng(0)
    print(
        f"decode benchmark: model={args.model} input={size}px device={args.device} dtype={args.dtype} "
        f"precision={args.precision} attention={args.attention} "
        f"torch threads={torch.get_num_threads()} ({platform.processor() or platform.machine()})"
    )
    header = " ".join(f"{'chunk ' + str(k):>10}" for k in args.chunks)
    print(f"{'boxes':>6} {'loop s':>8} {header}  best ratio")
    for n in args.boxes:
        boxes = _boxes(n, size, rng)
        results: dict[int, np.ndarray] = {}

        def run(chunk: int, boxes: np.ndarray = boxes, results: dict[int, np.ndarray] = results) -> None:
            accel = Acceleration(precision=args.precision, attention=args.attention)
            opts = DecodeOptions(box_batch_size=chunk, iou_threshold=0.0, acceleration=accel)
            plan = accel.resolve(args.device)
            with torch.inference_mode():
                results[chunk] = _masks_for_inputs(
                    embedding[None], [boxes], [(size, size)], model, opts, plan
                )[0][0]

        loop = _time(lambda: run(1), args.repeat)
        times = {k: _time(lambda k=k: run(k), args.repeat) for k in args.chunks}
        for k in args.chunks:
            agree = float((results[k] == results[1]).mean())
            if agree < 0.999:
                raise SystemExit(f"chunk {k} labels differ from the loop ({agree:.4f} of pixels agree)")
        best = min(times, key=times.__getitem__)
        print(
            f"{n:>6} {loop:>8.2f} "
            + " ".join(f"{times[k]:>9.2f}s" for k in args.chunks)
            + f"  loop/chunk{best} = {loop / times[best]:.2f}x"
        )


if __name__ == "__main__":
    main()
