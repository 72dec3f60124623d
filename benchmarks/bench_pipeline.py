"""The whole path: FrameSender -> ZeroMQ -> Serve app (Ingress, Encoder, Decoder) -> OME-Zarr, vs segment().

In one run:

(a) direct baseline: ``segment()`` in this process on the first ``--direct-frames`` of the same frames,
    frames/s, measured before and after (b) so that a change of machine load shows (the ratio uses the
    faster of the two). It runs with ``--direct-threads`` torch threads (default 1, like each replica
    on a 2-core machine): on a loaded machine torch's default intra-op pool can be ~20x slower, as its
    threads wait on each other at every op, which would flatter the pipeline;
(b) the same frames through a local Ray + Serve app (like ``tests/test_serving.py``): a sender thread
    pushes them (``--fps`` paced, 0 = as fast as backpressure allows) while a ``ResultSubscriber``
    records when each result arrives. Reports steady-state throughput (the first ``--warmup`` results are
    left out), p50/p99 of each stage of the results' ``latency`` (queue/encode/dispatch/decode/
    end_to_end; dispatch = Serve routing, batching wait and transfers), the ratio pipeline fps / direct
    fps, and the latency added outside model compute, p50(end_to_end - encode - decode). Results are
    published before the Zarr write, so the write's mean comes from the service's /metrics.

The model is ``tiny`` with random weights adjusted so that boxes and masks pass their thresholds (a fresh
init decodes nothing, which would make the decoder free); the weights are saved to a temporary file that
both arms load. ``encode`` is the encoder's batch time (shared by the frames of a batch).

    python benchmarks/bench_pipeline.py --frames 40 --size 256
    python benchmarks/bench_pipeline.py --frames 200 --size 512 --fps 5 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from acquisition.client import FrameSender, ResultSubscriber
from acquisition.protocol import AcquisitionSummary, FrameResult
from cellsam_core.checkpoint import load_model, save_model
from cellsam_core.inference import segment
from cellsam_core.synthetic import synthetic_frame
from cellsam_core.testing import smoke_model
from serving.config import EncoderSettings

STAGES = ("queue", "encode", "dispatch", "decode", "measure", "end_to_end")


def _smoke_weights(path: Path, seed: int = 0) -> None:
    """Save ``tiny`` with random weights that detect boxes and keep masks (see module docstring)."""
    save_model(smoke_model(seed), path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _direct(frames: list[np.ndarray], weights: Path, device: str) -> tuple[float, float]:
    """(frames/s, mean cells per frame) of in-process ``segment()``, after one warm-up frame."""
    model = load_model(weights, "tiny", device=device)
    segment(frames[0], model)
    t0 = time.perf_counter()
    cells = sum(segment(frame, model).n_cells for frame in frames)
    return len(frames) / (time.perf_counter() - t0), cells / len(frames)


def _send(endpoint: str, acquisition: str, frames: list[np.ndarray], fps: float, sent: list[float]) -> None:
    period = 1.0 / fps if fps > 0 else 0.0
    with FrameSender(endpoint=endpoint, acquisition=acquisition, timeout=None) as tx:
        tx.start(sizes={"t": len(frames), "p": 1, "z": 1})
        t0 = time.monotonic()
        for t, frame in enumerate(frames):
            if period:
                time.sleep(max(0.0, t0 + t * period - time.monotonic()))
            sent.append(time.monotonic())
            tx.send(frame, t=t)


def _pipeline(
    frames: list[np.ndarray], weights: Path, args: argparse.Namespace, out: Path
) -> tuple[list[tuple[float, FrameResult]], AcquisitionSummary, list[float], float, str]:
    """Stream ``frames`` through a local Serve app.

    Returns ``([(arrival time, result)], summary, send times, setup seconds, /metrics text)``; times are
    ``monotonic``.
    """
    import ray
    from ray import serve

    from serving.app import build_app

    t_setup = time.perf_counter()
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = {
            "model": {"name": "tiny", "weights": str(weights), "device": args.device},
            "ingest": {"endpoint": "tcp://127.0.0.1:*", "max_concurrent": args.max_concurrent},
            "results": {"endpoint": "tcp://127.0.0.1:*"},
            "output": {"directory": str(out)},
            "metrics": {"port": 0},
            "encoder": {"max_batch_size": args.batch, "batch_wait_timeout_s": args.batch_wait},
        }
        serve.run(build_app(config), name="cellsam", route_prefix="/")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/endpoints", timeout=120) as r:
            endpoints = json.loads(r.read())
        # Warm both replicas (first torch call, lazy allocations) outside the measurement.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=300) as r:
            r.read()
        setup = time.perf_counter() - t_setup

        acquisition = "bench-pipeline"
        arrivals: list[tuple[float, FrameResult]] = []
        sent: list[float] = []
        with ResultSubscriber(endpoint=endpoints["results"], acquisitions=[acquisition]) as sub:
            sub.wait_ready(30)
            sender = threading.Thread(
                target=_send, args=(endpoints["ingest"], acquisition, frames, args.fps, sent), daemon=True
            )
            sender.start()
            deadline = time.monotonic() + args.timeout
            while True:
                msg = sub.recv(timeout=max(0.1, deadline - time.monotonic()))
                now = time.monotonic()
                if isinstance(msg.payload, AcquisitionSummary):
                    summary = msg.payload
                    break
                arrivals.append((now, msg.payload))
            sender.join()
        # Results go out before the write, so the write stage is read from the service's metrics.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            metrics_text = r.read().decode()
        return arrivals, summary, sent, setup, metrics_text
    finally:
        serve.shutdown()
        ray.shutdown()


def _stage_totals(metrics_text: str, stage: str) -> tuple[float, float]:
    """``(sum, count)`` of ``cellsam_stage_seconds{stage=...}`` in a /metrics scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    totals = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "cellsam_stage_seconds":
            continue
        for sample in family.samples:
            kind = sample.name.rsplit("_", 1)[-1]
            if sample.labels.get("stage") == stage and kind in totals:
                totals[kind] += sample.value
    return totals["sum"], totals["count"]


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--size", type=int, default=256, help="frame side in pixels")
    parser.add_argument("--fps", type=float, default=0.0, help="send rate; 0 = as fast as possible")
    parser.add_argument("--warmup", type=int, default=5, help="first results left out of the statistics")
    parser.add_argument("--direct-frames", type=int, default=10, help="frames per direct measurement")
    parser.add_argument("--direct-threads", type=int, default=1, help="torch threads of the direct arm")
    parser.add_argument("--cells", type=int, default=40, help="cells per synthetic frame")
    parser.add_argument("--batch", type=int, default=4, help="encoder max_batch_size")
    parser.add_argument(
        "--batch-wait",
        type=float,
        default=EncoderSettings().batch_wait_timeout_s,
        help="encoder batch_wait_timeout_s (default: the service's)",
    )
    parser.add_argument("--max-concurrent", type=int, default=8)
    parser.add_argument("--ray-cpus", type=int, default=4, help="num_cpus given to the local Ray")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for all results")
    args = parser.parse_args()
    if args.frames <= args.warmup + 1:
        raise SystemExit(f"--frames ({args.frames}) must exceed --warmup + 1 ({args.warmup + 1})")

    frames = [
        synthetic_frame((args.size, args.size), seed=i, n_cells=args.cells)[0] for i in range(args.frames)
    ]
    load = os.getloadavg()
    print(
        f"pipeline benchmark: model=tiny (adjusted random weights) frames={args.frames} "
        f"size={args.size}x{args.size} fps={'max' if args.fps <= 0 else args.fps} device={args.device} "
        f"direct torch threads={args.direct_threads} (default {torch.get_num_threads()}) "
        f"cpus={os.cpu_count()} "
        f"load avg={load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        weights = Path(tmp) / "tiny-smoke.pt"
        _smoke_weights(weights)
        torch.set_num_threads(args.direct_threads)
        direct = frames[: args.direct_frames]
        before, cells = _direct(direct, weights, args.device)
        print(f"(a) direct segment() before (b): {before:.3f} frames/s, {cells:.1f} cells/frame")
        arrivals, summary, sent, setup, metrics_text = _pipeline(frames, weights, args, Path(tmp) / "out")
        after, _ = _direct(direct, weights, args.device)
        print(f"(a) direct segment() after (b):  {after:.3f} frames/s")
    direct_fps = max(before, after)
    load = os.getloadavg()

    ok = [(t, r) for t, r in arrivals if r.status == "ok"]
    print(
        f"(b) pipeline: setup {setup:.1f} s (Ray + Serve + replicas), "
        f"{summary.frames_ok} ok / {summary.frames_failed} failed of {args.frames}"
    )
    if len(ok) <= args.warmup + 1:
        raise SystemExit("too few successful results to measure a steady state")
    ok.sort(key=lambda x: x[0])
    steady = ok[args.warmup :]
    span = steady[-1][0] - steady[0][0]
    pipe_fps = (len(steady) - 1) / span if span > 0 else float("nan")
    overall = len(ok) / (ok[-1][0] - sent[0]) if sent else float("nan")

    results = [r for _, r in steady]
    table = {s: [r.latency[s] for r in results if s in r.latency] for s in STAGES}
    outside = [
        r.latency["end_to_end"] - r.latency["encode"] - r.latency["decode"]
        for r in results
        if {"end_to_end", "encode", "decode"} <= set(r.latency)
    ]
    print()
    print(f"latency over results {args.warmup + 1}..{len(ok)} (ms)")
    print(f"  {'stage':<22}{'p50':>10}{'p99':>10}")
    for stage, values in table.items():
        print(f"  {stage:<22}{_pct(values, 50) * 1e3:>10.1f}{_pct(values, 99) * 1e3:>10.1f}")
    print(f"  {'e2e - encode - decode':<22}{_pct(outside, 50) * 1e3:>10.1f}{_pct(outside, 99) * 1e3:>10.1f}")
    write_sum, write_count = _stage_totals(metrics_text, "write")
    if write_count:
        print(f"  {'write (mean, after the result)':<32}{write_sum / write_count * 1e3:>10.1f}")
    print()
    print(f"  {'direct segment() fps (best)':<34}{direct_fps:>10.3f}")
    print(f"  {'pipeline fps (steady state)':<34}{pipe_fps:>10.2f}")
    print(f"  {'pipeline fps (first send to last)':<34}{overall:>10.2f}")
    print(f"  {'ratio pipeline / direct':<34}{pipe_fps / direct_fps:>10.2f}")
    print(f"  {'added latency outside model, p50':<34}{_pct(outside, 50) * 1e3:>8.1f} ms")
    print(f"load avg at the end: {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}")


if __name__ == "__main__":
    main()
