"""Shutdown and sustained load through ``cellsam-stream serve`` (tiny model, random weights, loopback).

Two measurements, each against a baseline taken in the same run:

* ``drain``: a backlog of ``--frames`` accepted frames, then SIGTERM. Prints the time from the signal to the
  exit, how many frames were finished or failed as ``shutdown``, and the ratio of the drain time to the
  time the same number of frames takes in steady streaming (measured first, in the same service).
* ``soak``: frames sent flat out for ``--minutes``; the resident memory (RSS) of every process of the
  service (the CLI, Ray's GCS and raylet, the Serve controller and proxy, the Ingress, Encoder and Decoder
  replicas) is sampled every few seconds. Prints each process's RSS after warm-up and at the end, and its
  growth per minute over the second half (a leak grows steadily; warm-up does not).

Usage::

    python benchmarks/bench_lifecycle.py drain --frames 100
    python benchmarks/bench_lifecycle.py soak --minutes 10 --size 512
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acquisition.client import FrameSender, ResultSubscriber
from acquisition.protocol import FrameResult
from cellsam_core.synthetic import synthetic_frame
from tests.serve_util import ServeProcess


def _serve(tmp: Path, max_queued: int) -> ServeProcess:
    config = tmp / "config.yaml"
    config.write_text(f"ingest:\n  max_queued: {max_queued}\n")
    return ServeProcess.start(
        "--random-weights", "--model", "tiny", "--output", str(tmp / "out"), "--config", str(config),
        "--drain-timeout", "600",
    )  # fmt: skip


def _wait_results(sub: ResultSubscriber, n: int, timeout: float = 1200) -> None:
    deadline = time.monotonic() + timeout
    got = 0
    while got < n:
        msg = sub.recv(timeout=deadline - time.monotonic())
        if isinstance(msg.payload, FrameResult):
            got += 1


def drain(frames: int, size: int) -> None:
    images = [synthetic_frame((size, size), seed=t, n_cells=20)[0] for t in range(frames)]
    with tempfile.TemporaryDirectory() as tmp:
        service = _serve(Path(tmp), max_queued=frames + 8)
        try:
            with ResultSubscriber(endpoint=service.results) as sub:
                sub.wait_ready(30)
                with FrameSender(endpoint=service.ingest, acquisition="steady") as tx:
                    tx.wait_connected(30)
                    t0 = time.perf_counter()
                    for t, image in enumerate(images):
                        tx.send(image, t=t)
                    _wait_results(sub, frames)
                    steady = time.perf_counter() - t0
                tx = FrameSender(endpoint=service.ingest, acquisition="backlog", linger=30)
                tx.wait_connected(30)
                for t, image in enumerate(images):
                    tx.send(image, t=t)
                tx.close()
                time.sleep(0.5)  # let the listener take the whole backlog
                t0 = time.perf_counter()
                code, printed = service.stop(signal.SIGTERM, timeout=1800)
                drained = time.perf_counter() - t0
        finally:
            service.close()
    last = [line for line in printed.splitlines() if line.startswith("stopped")]
    print(f"backlog of {frames} frames of {size}x{size}, tiny model on CPU")
    print(f"  steady streaming of {frames} frames: {steady:7.2f} s ({frames / steady:.1f} frames/s)")
    print(f"  SIGTERM -> exit with the backlog:  {drained:7.2f} s (exit code {code}; {last})")
    print(f"  drain / steady:                    {drained / steady:7.2f}x")


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _name(process: psutil.Process) -> str:
    try:
        cmd = " ".join(process.cmdline())
    except psutil.Error:
        return "?"
    for key in ("Ingress", "Encoder", "Decoder", "ServeController", "ProxyActor"):
        if key in cmd:
            return key
    for key in ("gcs_server", "raylet", "dashboard", "log_monitor", "runtime_env", "serving.cli"):
        if key in cmd:
            return key
    return f"{process.name()}[{process.pid}]"


def soak(minutes: float, size: int) -> None:
    images = [synthetic_frame((size, size), seed=t, n_cells=30)[0] for t in range(16)]
    with tempfile.TemporaryDirectory() as tmp:
        service = _serve(Path(tmp), max_queued=8)
        stop = threading.Event()
        sent = [0]

        def send() -> None:
            with FrameSender(endpoint=service.ingest, acquisition="soak", timeout=600) as tx:
                tx.wait_connected(30)
                t = 0
                while not stop.is_set():
                    tx.send(images[t % len(images)], t=t)
                    t += 1
                    sent[0] = t

        samples: list[tuple[float, dict[str, float]]] = []
        sender = threading.Thread(target=send, daemon=True)
        try:
            sender.start()
            began = time.monotonic()
            while time.monotonic() - began < minutes * 60:
                rss: dict[str, float] = {}
                for process in _tree(service.proc.pid):
                    try:
                        rss[_name(process)] = rss.get(_name(process), 0) + process.memory_info().rss / 2**20
                    except psutil.Error:
                        continue
                samples.append((time.monotonic() - began, rss))
                elapsed = samples[-1][0]
                total = sum(rss.values())
                print(
                    f"  {elapsed / 60:5.1f} min  {sent[0]:6d} frames sent  RSS {total:8.0f} MiB", flush=True
                )
                time.sleep(10)
        finally:
            stop.set()
            service.close()
    half = [s for s in samples if s[0] >= samples[-1][0] / 2]
    print(f"\nsoak: {minutes:g} min flat out, {size}x{size} uint16, tiny model, {sent[0]} frames sent")
    print(f"  {'process':<20} {'RSS @1/2 (MiB)':>15} {'RSS end (MiB)':>14} {'growth 2nd half (MiB/min)':>26}")
    for name in sorted(samples[-1][1]):
        series = [(t, rss[name]) for t, rss in half if name in rss]
        if len(series) < 2:
            continue
        ts = np.array([t for t, _ in series]) / 60
        values = np.array([v for _, v in series])
        slope = float(np.polyfit(ts, values, 1)[0])
        print(f"  {name:<20} {values[0]:15.0f} {values[-1]:14.0f} {slope:26.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("drain", help="time SIGTERM -> exit with a backlog")
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--size", type=int, default=256)
    p = sub.add_parser("soak", help="RSS of every service process under sustained load")
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    if args.mode == "drain":
        drain(args.frames, args.size)
    else:
        soak(args.minutes, args.size)


if __name__ == "__main__":
    main()
