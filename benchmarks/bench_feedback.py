"""Feedback latency: from the camera's frame (frameReady) to the action enqueued in the MDA runner.

Two parts, in one run:

(a) ``loop``: the feedback loop alone. A ``ResultPublisher`` publishes ``--micro-frames`` results of a
    ``--size``² frame with ``--cells`` cells (the service's wire format, over ZeroMQ on loopback) at
    ``--micro-rate`` per second; a ``FeedbackLoop`` with one rule (acquire the largest cell) hands one action
    per frame to a recording actuator. Reports p50/p99 of *delivery* (the service's publish → the loop has
    the parsed result: ZeroMQ, JSON, pydantic) and *loop* (parsed result → action enqueued: cell table,
    rule, stage mapping, safety checks, action table row, hand-over).
(b) ``e2e``: the whole loop. The service (``serving.runner.start_service``, embedded Ray, the bundled
    cellsam-nano model unless ``--weights``) and pymmcore-plus's real MDA runner on the virtual microscope
    (``acquisition.virtual_microscope``: a pure-Python ``--size``² camera imaging a synthetic slide),
    ``PymmcorePlusForwarder`` → service, ``FeedbackLoop`` → ``PymmcorePlusActuator`` with the same rule;
    ``--frames`` time points at ``--interval`` s (slow enough that frames do not queue). Per frame:

    ====================  =========================================================================
    total                 frameReady → the first action of the frame is in the actuator's queue
    to_service            frameReady → the service accepted the frame (forwarder, ZeroMQ, listener)
    queue/encode/...      the service's own stages, from each result's ``latency``
    end_to_end            the service: accepted → result published
    delivery              published → the loop has the parsed result
    loop                  parsed result → action enqueued (the feedback loop's own overhead)
    ====================  =========================================================================

    ``to_service`` and ``delivery`` cross processes and use ``time.time()`` on one machine.

    python benchmarks/bench_feedback.py                       # both parts, defaults below
    python benchmarks/bench_feedback.py --skip-e2e --micro-frames 2000
    python benchmarks/bench_feedback.py --frames 60 --interval 1.5 --json feedback.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from acquisition.actuators import PymmcorePlusActuator, RecordingActuator
from acquisition.feedback import FeedbackLimits, FeedbackLoop, FrameInput, FrameTiming
from acquisition.feedback_types import Acquire, FrameInfo
from acquisition.protocol import FrameResult, Index
from acquisition.publisher import ResultPublisher
from cellsam_core.cells import CellTable
from cellsam_core.synthetic import synthetic_frame


def acquire_largest_cell(frame: FrameInput) -> Acquire | None:
    """The benchmark's rule: one action per frame, on its largest cell."""
    if not frame.n_cells:
        return None
    return frame.acquire_cell(int(np.argmax(frame.cells.area)), exposure_ms=10)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def summarise(name: str, values: list[float]) -> dict[str, Any]:
    return {"stage": name, "n": len(values), "p50_ms": 1e3 * pct(values, 50), "p99_ms": 1e3 * pct(values, 99)}


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    print(f"{'stage':<14}{'n':>6}{'p50 ms':>10}{'p99 ms':>10}")
    for r in rows:
        print(f"{r['stage']:<14}{r['n']:>6}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}")


# -- (a) the loop alone ----------------------------------------------------------------------------------


def bench_loop(frames: int, rate: float, size: int, cells: int) -> list[dict[str, Any]]:
    _, labels = synthetic_frame((size, size), seed=1, n_cells=cells)
    table = CellTable.from_labels(labels)
    columns = FrameResult.cell_columns(table)
    actuator = RecordingActuator(outcome=None)
    limits = FeedbackLimits(
        max_added_events=frames + 10, max_actions_per_s=10 * rate + 100, burst=frames + 10
    )
    with ResultPublisher(endpoint="tcp://127.0.0.1:*") as publisher:
        loop = FeedbackLoop(
            actuator,
            acquisition="bench",
            rules=[acquire_largest_cell],
            results=publisher.endpoint,
            limits=limits,
        )
        with loop:
            for t in range(frames):
                actuator.record(
                    FrameInfo(
                        key=(t, 0, 0), event=None, stage_x_um=0.0, stage_y_um=0.0, stage_z_um=0.0,
                        pixel_size_um=0.5, frame_shape=(size, size), ready_at=time.monotonic(),
                        ready_wall=time.time(),
                    )
                )  # fmt: skip
                publisher.publish_result(
                    FrameResult(acquisition="bench", index=Index(t=t), n_cells=len(table), cells=columns)
                )
                time.sleep(1.0 / rate)
            deadline = time.monotonic() + 10
            while len(loop.timings) < frames and time.monotonic() < deadline:
                time.sleep(0.01)
        timings = list(loop.timings)
    n_actions = len(actuator.tickets)
    print(f"(a) loop: {len(timings)}/{frames} results, {len(table)} cells per frame, {n_actions} actions")
    delivery = [t.received_wall - t.published_wall for t in timings if t.published_wall is not None]
    own = [t.first_enqueued_at - t.received_at for t in timings if t.first_enqueued_at is not None]
    return [
        summarise("delivery", delivery),
        summarise("loop", own),
        summarise("delivery+loop", [a + b for a, b in zip(delivery, own, strict=False)]),
    ]


# -- (b) the whole loop ----------------------------------------------------------------------------------


def bench_e2e(
    frames: int, interval: float, size: int, cells: int, weights: str | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import useq

    from acquisition.adapters import PymmcorePlusForwarder
    from acquisition.client import FrameSender
    from acquisition.virtual_microscope import VirtualSlide, virtual_core
    from cellsam_core.checkpoint import BUNDLED_WEIGHTS
    from serving.config import ServiceConfig
    from serving.runner import free_port, start_service

    out = Path(tempfile.mkdtemp(prefix="bench-feedback-"))
    config = ServiceConfig.model_validate(
        {
            "model": {"weights": weights or str(BUNDLED_WEIGHTS)},
            "ingest": {"endpoint": "tcp://127.0.0.1:*", "max_concurrent": 2},
            "results": {"endpoint": "tcp://127.0.0.1:*"},
            "output": {"directory": str(out)},
            "metrics": {"port": 0},
        }
    )
    print("(b) starting the service (embedded Ray, Serve, model replicas)...", flush=True)
    service = start_service(config, http_port=free_port())
    try:
        slide = VirtualSlide.synthetic((2 * size, 2 * size), n_cells=4 * cells, seed=3, pixel_size_um=0.5)
        core = virtual_core(slide, sensor_shape=(size, size))
        centre = 0.5 * size * 0.5
        plan = useq.MDASequence(
            time_plan={"interval": interval, "loops": frames},
            stage_positions=[(centre + 40.0, centre + 40.0)],
        )
        acq = "bench-feedback"
        limits = FeedbackLimits(max_added_events=frames + 10, max_result_age_s=60, burst=frames + 10)
        with FrameSender(endpoint=service.ingest, timeout=60) as sender:
            forwarder = PymmcorePlusForwarder(sender, acquisition=acq, core=core)
            actuator = PymmcorePlusActuator(core.mda, plan, forwarder=forwarder, linger_s=120).connect()
            loop = FeedbackLoop(
                actuator, acquisition=acq, rules=[acquire_largest_cell], results=service.results,
                output=str(out), limits=limits,
            )  # fmt: skip
            with loop:
                began = time.monotonic()
                core.mda.run(actuator)
                loop.wait_summary(120)
                took = time.monotonic() - began
        timings: list[FrameTiming] = list(loop.timings)
    finally:
        service.stop()
    print(f"(b) e2e: {len(timings)}/{frames} frames in {took:.1f} s, {actuator.added_run} added events ran")
    ok = [t for t in timings if t.first_enqueued_at is not None and t.ready_at is not None]
    stages: dict[str, list[float]] = {
        k: [] for k in ("total", "to_service", "end_to_end", "delivery", "loop")
    }
    service_stages: dict[str, list[float]] = {}
    for t in ok:
        assert t.ready_at is not None and t.first_enqueued_at is not None and t.ready_wall is not None
        e2e = t.service_latency.get("end_to_end", float("nan"))
        stages["total"].append(t.first_enqueued_at - t.ready_at)
        if t.published_wall is not None:
            stages["to_service"].append(t.published_wall - e2e - t.ready_wall)
            stages["delivery"].append(t.received_wall - t.published_wall)
        stages["end_to_end"].append(e2e)
        stages["loop"].append(t.first_enqueued_at - t.received_at)
        for name, value in t.service_latency.items():
            if name != "end_to_end":
                service_stages.setdefault(name, []).append(value)
    rows = [summarise("total", stages["total"]), summarise("to_service", stages["to_service"])]
    rows += [summarise(f"  {k}", v) for k, v in service_stages.items()]
    rows += [summarise(k, stages[k]) for k in ("end_to_end", "delivery", "loop")]
    return rows, {"frames": len(timings), "seconds": took, "added_run": actuator.added_run}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=512, help="frame size (square), pixels")
    parser.add_argument("--cells", type=int, default=40, help="cells per frame (about)")
    parser.add_argument("--micro-frames", type=int, default=500, help="(a) results published")
    parser.add_argument("--micro-rate", type=float, default=50.0, help="(a) results per second")
    parser.add_argument("--frames", type=int, default=30, help="(b) time points")
    parser.add_argument("--interval", type=float, default=2.0, help="(b) seconds between time points")
    parser.add_argument("--weights", help="(b) model weights (default: the bundled cellsam-nano)")
    parser.add_argument("--skip-e2e", action="store_true", help="only (a)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    report: dict[str, Any] = {"args": vars(args), "load_before": os.getloadavg()}
    loop_rows = bench_loop(args.micro_frames, args.micro_rate, args.size, args.cells)
    print_table("(a) the feedback loop alone", loop_rows)
    report["loop"] = loop_rows
    if not args.skip_e2e:
        e2e_rows, info = bench_e2e(args.frames, args.interval, args.size, args.cells, args.weights)
        print_table(f"(b) frameReady → action enqueued, {args.size}² frames, service + loop", e2e_rows)
        report["e2e"], report["e2e_info"] = e2e_rows, info
    report["load_after"] = os.getloadavg()
    print(f"\nload average after: {report['load_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
