"""The streaming pipeline: listener → segmenter → sink + publisher, with accounting for every frame.

:class:`StreamPipeline` is plain asyncio and knows nothing of Ray: the ingress deployment runs it with a
:class:`Segmenter` that calls the encoder and decoder deployments, tests and notebooks can run it with
:class:`LocalSegmenter`. Guarantees (see ``docs/serving.md``):

* every accepted frame ends as written labels plus an ``ok`` result, or as a recorded failure (counter
  with a reason, log line, ``failed`` result); nothing is silently lost;
* at most ``max_in_flight`` frames are between the listener and the sink; beyond that the listener stops
  reading and ZeroMQ pushes back on the sender (or, in live mode, drops the oldest waiting frame);
* a replica that dies mid-frame is retried (bounded attempts); a frame that makes the model raise fails
  alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from acquisition.cell_table import CellTable
from acquisition.errors import ListenerClosedError
from acquisition.frames import Frame
from acquisition.listener import FrameListener, ListenerEvent
from acquisition.protocol import AcquisitionSummary, FrameResult
from acquisition.publisher import ResultPublisher
from acquisition.security import CurveServer
from acquisition.sink import AcquisitionSpec, LabelSink, Sizes
from serving.config import ServiceConfig
from serving.deployments import DecodedFrame
from serving.metrics import ServiceMetrics

__all__ = [
    "AcquisitionProgress",
    "LocalSegmenter",
    "RetryableError",
    "Segmenter",
    "StreamPipeline",
    "cell_table_from",
]

log = logging.getLogger(__name__)


class RetryableError(RuntimeError):
    """A segmenter failure worth retrying (the replica died or was unreachable), not the frame's fault."""


class Segmenter(Protocol):
    """Segments one frame.

    ``segment`` returns a :class:`~serving.deployments.DecodedFrame`. It raises
    :class:`RetryableError` (or an exception ``is_retryable`` accepts) when the failure is the
    infrastructure's (a replica died); any other exception means the frame itself failed.
    """

    async def segment(self, image: np.ndarray, options: dict[str, Any]) -> DecodedFrame: ...

    def is_retryable(self, exc: BaseException) -> bool: ...


class LocalSegmenter:
    """Runs :func:`cellsam_core.encode`/``decode`` in this process, in a worker thread."""

    def __init__(self, *, model: Any, box_batch_size: int | None = None, bbox_threshold: float = 0.4):
        self.model = model
        self.box_batch_size = box_batch_size
        self.bbox_threshold = bbox_threshold
        self._lock = asyncio.Lock()

    def _run(self, image: np.ndarray, options: dict[str, Any]) -> DecodedFrame:
        from cellsam_core.inference import DecodeOptions, EncodeOptions, decode, encode

        t0 = time.perf_counter()
        embedding = encode(image, self.model, EncodeOptions.model_validate(options))
        t1 = time.perf_counter()
        seg = decode(
            embedding,
            self.model,
            DecodeOptions(box_batch_size=self.box_batch_size, bbox_threshold=self.bbox_threshold),
        )
        return DecodedFrame(seg, t1 - t0, time.perf_counter() - t1, 1, embedding.nbytes)

    async def segment(self, image: np.ndarray, options: dict[str, Any]) -> DecodedFrame:
        async with self._lock:  # one model, one frame at a time
            return await asyncio.to_thread(self._run, image, options)

    def is_retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, RetryableError)


@dataclass
class AcquisitionProgress:
    """Per-acquisition accounting of the pipeline (``GET /acquisitions``)."""

    acquisition: str
    accepted: int = 0
    ok: int = 0
    failed: int = 0
    dropped: int = 0
    rejected: int = 0
    cells: int = 0
    ended: bool = False
    closed: bool = False
    frames_declared: int | None = None
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def pending(self) -> int:
        return self.accepted - self.dropped - self.ok - self.failed

    def as_dict(self) -> dict[str, Any]:
        return {
            "acquisition": self.acquisition,
            "accepted": self.accepted,
            "ok": self.ok,
            "failed": self.failed,
            "dropped": self.dropped,
            "rejected": self.rejected,
            "pending": self.pending,
            "cells": self.cells,
            "ended": self.ended,
            "closed": self.closed,
            "frames_declared": self.frames_declared,
            "failures": dict(self.failures),
        }


def cell_table_from(seg: Any) -> CellTable:
    """The sink's cell table from a :class:`~cellsam_core.inference.Segmentation`."""
    n = seg.n_cells
    return CellTable(
        label=np.arange(1, n + 1, dtype=np.uint32),
        box=np.asarray(seg.boxes, dtype=np.float64).reshape(n, 4),
        centroid=np.asarray(seg.centroids, dtype=np.float64).reshape(n, 2)[:, ::-1].copy(),
        area=np.asarray(seg.areas, dtype=np.int64),
        score=np.asarray(seg.scores, dtype=np.float64),
    )


class StreamPipeline:
    """Drive frames from a :class:`FrameListener` through a :class:`Segmenter` into a sink and publisher.

    Parameters
    ----------
    config : ServiceConfig
        Ingest/results endpoints, in-flight bound, retries, output options.
    segmenter : Segmenter
    sink : LabelSink
    metrics : ServiceMetrics, optional
    model_name : str
        Reported in every result.
    curve : CurveServer, optional
        Started CURVE server securing both sockets (see :mod:`acquisition.security`).
    """

    def __init__(
        self,
        *,
        config: ServiceConfig,
        segmenter: Segmenter,
        sink: LabelSink,
        metrics: ServiceMetrics | None = None,
        model_name: str = "",
        on_result: Callable[[FrameResult], None] | None = None,
        curve: CurveServer | None = None,
    ) -> None:
        self.config = config
        self.segmenter = segmenter
        self.sink = sink
        self.metrics = metrics or ServiceMetrics()
        self.model_name = model_name
        self.on_result = on_result
        secured: Callable[[str], dict[str, Any]] = curve.socket_kwargs if curve else lambda _: {}
        self.publisher = ResultPublisher(endpoint=config.results.endpoint, **secured("results"))
        self.listener = FrameListener(
            endpoint=config.ingest.endpoint,
            max_in_flight=config.ingest.queue_size,
            live=config.ingest.live,
            max_frame_bytes=config.ingest.max_frame_bytes,
            rcvhwm=config.ingest.rcvhwm,
            retain_buffers=config.ingest.retain_buffers,
            on_event=self._on_event,
            **secured("ingest"),
        )
        self.acquisitions: dict[str, AcquisitionProgress] = {}
        self._specs: dict[str, AcquisitionSpec] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._finishers: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._sink_lock = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind both sockets and start ``max_in_flight`` workers."""
        self.publisher.start()
        await self.listener.start()
        self._workers = [
            asyncio.create_task(self._worker(), name=f"pipeline-worker-{i}")
            for i in range(self.config.ingest.max_in_flight)
        ]
        log.info(
            "pipeline: frames on %s, results on %s, labels to %s",
            self.listener.endpoint,
            self.publisher.endpoint,
            self.config.output.directory,
        )

    async def stop(self) -> None:
        """Stop accepting frames, finish every accepted one, close acquisitions, close the sockets."""
        await self.listener.stop()
        if self._workers:
            await asyncio.gather(*self._workers, return_exceptions=True)
        for task in list(self._finishers):
            with contextlib.suppress(Exception):
                await task
        self.publisher.close()

    @property
    def endpoints(self) -> dict[str, str]:
        return {"ingest": self.listener.endpoint, "results": self.publisher.endpoint}

    # -- listener events ---------------------------------------------------------------------------

    def _progress(self, acquisition: str) -> AcquisitionProgress:
        prog = self.acquisitions.get(acquisition)
        if prog is None:
            prog = self.acquisitions[acquisition] = AcquisitionProgress(acquisition)
        return prog

    def _on_event(self, event: ListenerEvent) -> None:
        m = self.metrics
        if event.kind in ("accepted", "rejected"):
            m.received.inc()
        if event.kind == "accepted" and event.frame is not None:
            m.accepted.inc()
            m.bytes_received.inc(event.frame.nbytes)
            self._progress(event.frame.acquisition).accepted += 1
        elif event.kind == "rejected":
            m.rejected.labels(reason=event.reason or "unknown").inc()
            if event.acquisition is not None:
                self._progress(event.acquisition).rejected += 1
                self.publisher.on_listener_event(event)
                m.results_published.labels(status="rejected").inc()
        elif event.kind == "dropped":
            m.dropped.labels(reason=event.reason or "live_overflow").inc()
            if event.acquisition is not None:
                prog = self._progress(event.acquisition)
                prog.dropped += 1
                self._maybe_finish(prog)
        elif event.kind == "started" and event.acquisition is not None:
            self._progress(event.acquisition)
        elif event.kind == "ended" and event.acquisition is not None:
            prog = self._progress(event.acquisition)
            prog.ended = True
            prog.ended_at = time.time()
            if event.control is not None:
                prog.frames_declared = getattr(event.control, "frames", None)
            self._maybe_finish(prog)
        m.queue_depth.set(self.listener.queue_depth)
        m.acquisitions_active.set(sum(1 for p in self.acquisitions.values() if not p.closed))

    def _maybe_finish(self, prog: AcquisitionProgress) -> None:
        if prog.ended and not prog.closed and prog.pending == 0:
            prog.closed = True
            task = asyncio.get_running_loop().create_task(self._finish(prog))
            self._finishers.add(task)
            task.add_done_callback(self._finishers.discard)

    async def _finish(self, prog: AcquisitionProgress) -> None:
        summary = AcquisitionSummary(
            acquisition=prog.acquisition,
            frames_declared=prog.frames_declared,
            frames_received=prog.accepted,
            frames_ok=prog.ok,
            frames_failed=prog.failed,
            frames_rejected=prog.rejected,
            frames_dropped=prog.dropped,
            n_cells_total=prog.cells,
            started_at=prog.started_at,
            ended_at=prog.ended_at,
        )
        if prog.acquisition in self._specs:
            try:
                await asyncio.to_thread(
                    self.sink.close_acquisition, prog.acquisition, summary.model_dump(mode="json")
                )
            except Exception:
                log.exception("closing acquisition %s in the sink failed", prog.acquisition)
        self.publisher.publish_summary(summary)
        self.metrics.acquisitions_active.set(sum(1 for p in self.acquisitions.values() if not p.closed))
        log.info("acquisition %s complete: %s", prog.acquisition, prog.as_dict())

    # -- frames ------------------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            try:
                frame = await self.listener.get()
            except ListenerClosedError:
                return
            self._in_flight += 1
            self.metrics.in_flight.set(self._in_flight)
            self.metrics.queue_depth.set(self.listener.queue_depth)
            try:
                await self._process(frame)
            except Exception:  # last line of defence: account for the frame, keep serving
                log.exception("unexpected error processing %r", frame)
                self._record_failure(frame, "internal_error", "unexpected pipeline error", {})
            finally:
                self._in_flight -= 1
                self.metrics.in_flight.set(self._in_flight)
                self._maybe_finish(self._progress(frame.acquisition))

    def _spec_for(self, frame: Frame) -> AcquisitionSpec:
        """The store layout of a frame's acquisition: declared sizes, else the first frame's extent.

        ``t`` may stay open-ended (the store grows along it). ``p`` and ``z`` are fixed when the store is
        created: undeclared (or null) they hold the first frame's index, and later frames beyond them fail
        with ``write_error`` (declare ``sizes`` in ``start`` for multi-position or z-stack acquisitions).
        """
        state = self.listener.acquisitions.get(frame.acquisition)
        start = state.start if state is not None else None
        declared = start.sizes if start is not None else None
        index = frame.index
        metadata = dict(start.metadata) if start is not None else {}
        pixel_size = metadata.get("pixel_size_um") or frame.header.metadata.get("pixel_size_um")
        return AcquisitionSpec(
            acquisition=frame.acquisition,
            sizes=Sizes(
                t=declared.t if declared is not None else None,
                p=(declared.p if declared is not None and declared.p else index.p + 1),
                z=(declared.z if declared is not None and declared.z else index.z + 1),
                c=frame.data.shape[2] if frame.data.ndim == 3 else 1,
            ),
            frame_shape=(int(frame.data.shape[0]), int(frame.data.shape[1])),
            image_dtype=str(frame.data.dtype),
            channel_names=tuple(frame.channels.names) or None,
            pixel_size_um=float(pixel_size) if pixel_size else None,
            write_image=self.config.output.write_images,
        )

    async def _ensure_open(self, frame: Frame) -> AcquisitionSpec:
        spec = self._specs.get(frame.acquisition)
        if spec is not None:
            return spec
        async with self._sink_lock:
            spec = self._specs.get(frame.acquisition)
            if spec is None:
                spec = self._spec_for(frame)
                await asyncio.to_thread(self.sink.open_acquisition, spec)
                self._specs[frame.acquisition] = spec
        return spec

    async def _segment_with_retries(self, frame: Frame) -> DecodedFrame:
        attempts = self.config.retries.max_attempts
        delay = self.config.retries.backoff_s
        for attempt in range(1, attempts + 1):
            try:
                return await self.segmenter.segment(np.asarray(frame.data), {})
            except Exception as exc:
                if not self.segmenter.is_retryable(exc) or attempt == attempts:
                    raise
                self.metrics.retries.labels(deployment="model").inc()
                self.metrics.replica_failures.labels(deployment="model").inc()
                log.warning("frame %r: replica failure (%s), retry %d/%d", frame, exc, attempt, attempts)
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    async def _process(self, frame: Frame) -> None:
        m = self.metrics
        latency: dict[str, float] = {}
        started = time.monotonic()
        latency["queue"] = started - frame.received_at
        try:
            spec = await self._ensure_open(frame)
        except Exception as exc:
            self._record_failure(frame, "sink_error", str(exc), latency)
            return
        t_model = time.monotonic()
        try:
            decoded = await self._segment_with_retries(frame)
        except Exception as exc:
            reason = "replica_failure" if self.segmenter.is_retryable(exc) else "model_error"
            self._record_failure(frame, reason, f"{type(exc).__name__}: {exc}", latency)
            return
        seg = decoded.segmentation
        latency["encode"] = decoded.encode_seconds
        latency["decode"] = decoded.decode_seconds
        # Time of the model call not spent in either model stage: routing to the replicas, the encoder's
        # batching wait, moving the embedding and the result between processes (and any retries).
        latency["dispatch"] = max(
            0.0, time.monotonic() - t_model - decoded.encode_seconds - decoded.decode_seconds
        )
        m.segmented.inc()
        m.encoder_batch_size.observe(decoded.batch_size)
        m.cells_per_frame.observe(seg.n_cells)
        after_write = self.config.results.after_write
        result = None
        if not after_write:
            # Feedback first: the microscope gets the result now; the labels are stored right after.
            result = self._publish_ok(frame, seg, latency)
        t0 = time.monotonic()
        try:
            image = frame.data if spec.write_image else None
            if image is not None and image.ndim == 3:
                image = np.moveaxis(image, -1, 0)
            await asyncio.to_thread(
                self.sink.write, frame.id, seg.labels, image=image, cells=cell_table_from(seg)
            )
        except Exception as exc:
            # With feedback first, this frame's `ok` result is followed by this `failed` one.
            self._record_failure(frame, "write_error", f"{type(exc).__name__}: {exc}", dict(latency))
            return
        m.stage_seconds.labels(stage="write").observe(time.monotonic() - t0)
        m.written.inc()
        if result is None:
            latency["write"] = time.monotonic() - t0
            result = self._publish_ok(frame, seg, latency)
        prog = self._progress(frame.acquisition)
        prog.ok += 1
        prog.cells += seg.n_cells
        if self.on_result is not None:
            self.on_result(result)

    def _publish_ok(self, frame: Frame, seg: Any, latency: dict[str, float]) -> FrameResult:
        m = self.metrics
        latency["end_to_end"] = time.monotonic() - frame.received_at
        # The write stage is observed where it happens (after this, in feedback-first mode).
        m.observe_stages((stage, t) for stage, t in latency.items() if stage != "write")
        m.end_to_end_seconds.observe(latency["end_to_end"])
        result = FrameResult(
            acquisition=frame.acquisition,
            index=frame.index,
            status="ok",
            n_cells=seg.n_cells,
            boxes=[tuple(map(float, b)) for b in seg.boxes],
            centroids=[tuple(map(float, c)) for c in seg.centroids],
            areas=[int(a) for a in seg.areas],
            scores=[float(s) for s in seg.scores],
            latency=dict(latency),
            model=self.model_name,
        )
        self.publisher.publish_frame(result, labels=seg.labels)
        m.results_published.labels(status="ok").inc()
        return result

    def _record_failure(self, frame: Frame, reason: str, detail: str, latency: dict[str, float]) -> None:
        log.warning("frame %r failed (%s): %s", frame, reason, detail)
        self.metrics.failed.labels(reason=reason).inc()
        prog = self._progress(frame.acquisition)
        prog.failed += 1
        prog.failures[reason] = prog.failures.get(reason, 0) + 1
        result = FrameResult(
            acquisition=frame.acquisition,
            index=frame.index,
            status="failed",
            reason=reason,
            detail=detail[:500],
            latency=latency,
            model=self.model_name,
        )
        self.publisher.publish_frame(result)
        self.metrics.results_published.labels(status="failed").inc()
        if self.on_result is not None:
            self.on_result(result)
