"""Ingest throughput: FrameSender -> FrameListener -> consumer, against bare pyzmq PUSH/PULL.

Sends ``--frames`` frames of ``--shape`` uint16 (default 2048x2048, 8 MiB) over ``tcp://127.0.0.1`` and
``ipc://`` and reports frames/s, GB/s and the ratio to a bare pyzmq PUSH/PULL of the same buffers in the
same run. Senders run in a child process, like a microscope script; ``copy=False`` on both sides; time is
measured from the first to the last frame received. Also reports the receiving process's page faults per
frame and its resident memory before and after, to show it stays flat.

Both arms run in this process, so they share its ``malloc`` settings: the listener's ``retain_buffers``
(default on) applies to the bare arm too. ``--no-retain-buffers`` measures both with glibc's defaults.

    python benchmarks/bench_ingest.py --frames 2000
    python benchmarks/bench_ingest.py --frames 10000 --transports tcp
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from acquisition.client import FrameSender
from acquisition.listener import FrameListener


def rss_mib() -> float:
    """Resident set size of this process in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def minor_faults() -> int:
    """Minor page faults of this process so far (all threads, ZeroMQ's I/O thread included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _frames(shape: tuple[int, int]) -> list[np.ndarray]:
    # A few distinct buffers, reused: the sender must not allocate per frame either.
    rng = np.random.default_rng(0)
    return [rng.integers(0, 4096, shape, dtype=np.uint16) for _ in range(4)]


def _sender_process(kind: str, endpoint: str, shape: tuple[int, int], n: int) -> None:
    """Runs in a child process, like a microscope script: sends ``n`` frames to ``endpoint``."""
    frames = _frames(shape)
    if kind == "bare":
        ctx = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.connect(endpoint)
        header = json.dumps({"type": "frame", "v": 1}).encode()
        for i in range(n):
            push.send_multipart([header, frames[i % len(frames)].data], copy=False)
        push.close(linger=-1)
        ctx.term()  # returns once every zero-copy frame has left
    else:
        with FrameSender(endpoint=endpoint, acquisition="bench", timeout=None) as tx:
            for i in range(n):
                tx.send(frames[i % len(frames)], t=i)


def _spawn(kind: str, endpoint: str, shape: tuple[int, int], n: int) -> Any:
    proc = multiprocessing.get_context("spawn").Process(
        target=_sender_process, args=(kind, endpoint, shape, n)
    )
    proc.start()
    return proc


def bare_pyzmq(endpoint: str, shape: tuple[int, int], n: int) -> float:
    """Seconds between the first and the last of ``n`` frames through a plain PUSH/PULL (zero-copy)."""
    pull: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.PULL)
    pull.bind(endpoint)
    proc = _spawn("bare", pull.getsockopt_string(zmq.LAST_ENDPOINT), shape, n)
    pull.setsockopt(zmq.RCVTIMEO, 30_000)  # a crashed sender fails the run instead of hanging it
    pull.recv_multipart(copy=False)
    start = time.perf_counter()
    for _ in range(n - 1):
        pull.recv_multipart(copy=False)
    elapsed = time.perf_counter() - start
    proc.join()
    pull.close(linger=0)
    return elapsed


def ours(endpoint: str, shape: tuple[int, int], n: int, retain_buffers: bool = True) -> float:
    """Seconds between the first and the last of ``n`` frames FrameSender -> FrameListener -> consumer."""

    async def main() -> float:
        async with FrameListener(
            endpoint=endpoint, max_in_flight=8, max_frame_bytes=1 << 30, retain_buffers=retain_buffers
        ) as listener:
            proc = _spawn("ours", listener.endpoint, shape, n)
            await asyncio.wait_for(listener.get(), 30)

            async def drain() -> None:
                for _ in range(n - 1):
                    await listener.get()

            start = time.perf_counter()
            # One timeout around the loop, not one per frame: wait_for wraps each call in a task, which
            # would measure asyncio's task overhead rather than the listener.
            await asyncio.wait_for(drain(), 30 + n * 0.1)
            elapsed = time.perf_counter() - start
            await asyncio.to_thread(proc.join)
            return elapsed

    return asyncio.run(main())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--shape", type=int, nargs=2, default=(2048, 2048))
    parser.add_argument(
        "--rounds", type=int, default=5, help="alternating rounds of each side (best and median reported)"
    )
    parser.add_argument("--transports", nargs="+", default=["tcp", "ipc"], choices=["tcp", "ipc"])
    parser.add_argument(
        "--no-retain-buffers",
        dest="retain_buffers",
        action="store_false",
        help="leave glibc's malloc thresholds alone (frame buffers are unmapped and faulted in per frame)",
    )
    args = parser.parse_args(argv)
    shape = (int(args.shape[0]), int(args.shape[1]))
    nbytes = shape[0] * shape[1] * 2
    report: dict[str, Any] = {
        "frame_bytes": nbytes,
        "frames": args.frames,
        "retain_buffers": args.retain_buffers,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for transport in args.transports:
            endpoint = "tcp://127.0.0.1:*" if transport == "tcp" else f"ipc://{tmp}/bench-{transport}"
            # Warm-up: imports, first allocations (and the listener's malloc settings, for both arms).
            ours(endpoint, shape, min(20, args.frames), args.retain_buffers)
            rss_before = rss_mib()
            # Alternate rounds and keep each side's best: this machine's noise is larger than the gap.
            bare_times, our_times = [], []
            faults = {"bare": 0, "ours": 0}
            for _ in range(args.rounds):
                before = minor_faults()
                bare_times.append(bare_pyzmq(endpoint, shape, args.frames))
                middle = minor_faults()
                our_times.append(ours(endpoint, shape, args.frames, args.retain_buffers))
                faults["bare"] += middle - before
                faults["ours"] += minor_faults() - middle
            t_bare, t_ours = min(bare_times), min(our_times)
            median_ratio = float(np.median(bare_times) / np.median(our_times))
            rss_after = rss_mib()
            row = {
                "bare_fps": (args.frames - 1) / t_bare,
                "bare_GBps": (args.frames - 1) * nbytes / t_bare / 1e9,
                "ours_fps": (args.frames - 1) / t_ours,
                "ours_GBps": (args.frames - 1) * nbytes / t_ours / 1e9,
                "ratio": t_bare / t_ours,
                "median_ratio": median_ratio,
                "bare_faults_per_frame": faults["bare"] / (args.rounds * args.frames),
                "ours_faults_per_frame": faults["ours"] / (args.rounds * args.frames),
                "rss_before_MiB": rss_before,
                "rss_after_MiB": rss_after,
            }
            report[transport] = row
            print(
                f"{transport}: bare {row['bare_fps']:.0f} frames/s ({row['bare_GBps']:.2f} GB/s), "
                f"ours {row['ours_fps']:.0f} frames/s ({row['ours_GBps']:.2f} GB/s), "
                f"ratio {row['ratio']:.2f} (best of {args.rounds}; of medians {median_ratio:.2f}), "
                f"page faults/frame bare {row['bare_faults_per_frame']:.0f} "
                f"ours {row['ours_faults_per_frame']:.0f}, "
                f"RSS {rss_before:.0f} -> {rss_after:.0f} MiB"
            )
    return report


if __name__ == "__main__":
    main()
