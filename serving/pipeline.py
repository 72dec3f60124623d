"""The streaming pipeline: a coordinator over four injected seams, with one ledger per acquisition.

:class:`StreamPipeline` takes events from a :class:`~acquisition.source.FrameSource`, segments frames with
a :class:`~serving.segmenter.Segmenter`, stores them in a :class:`~acquisition.sink.LabelSink` and
publishes every outcome to a :class:`~acquisition.results.ResultSink`. It receives all four, never builds
them, and none of them calls back into it: the ingress deployment runs it with the ZeroMQ listener, the
Ray Serve segmenter, the Zarr sink and the ZeroMQ publisher; tests and notebooks with in-memory ones.
Guarantees (see ``docs/serving.md``):

* every accepted frame ends as stored labels plus an ``ok`` result, or as a recorded failure (counter
  with a reason, log line, ``failed`` result); nothing is silently lost;
* at most ``ingest.max_concurrent`` frames are being segmented or stored at once and at most
  ``ingest.max_queued`` wait in the source; beyond that the source stops taking messages and the sender
  is blocked (or, in live mode, the oldest waiting frame is dropped and counted);
* a replica that dies mid-frame is retried (bounded attempts); a frame that makes the model raise fails
  alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import numpy as np

from acquisition.errors import ListenerClosedError
from acquisition.frames import Frame
from acquisition.outcome import FrameOutcome
from acquisition.results import ResultSink
from acquisition.sink import LabelSink
from acquisition.source import Dropped, Ended, FrameSource, Rejected, SourceEvent, Started
from acquisition.spec import AcquisitionSpec, Sizes
from cellsam_core.cells import CellTable
from serving.config import ServiceConfig
from serving.ledger import AcquisitionLedger, Ledger
from serving.metrics import ServiceMetrics
from serving.segmenter import DecodedFrame, Segmenter

__all__ = ["StreamPipeline"]

log = logging.getLogger(__name__)


class StreamPipeline:
    """Drive events from a frame source through a segmenter into a label sink and a result sink.

    Parameters
    ----------
    source : FrameSource
        Accepted frames and notices, in arrival order.
    segmenter : Segmenter
    labels : LabelSink
        Where labels, images and cell tables are stored.
    results : ResultSink
        Where every outcome and summary is published.
    config : ServiceConfig
        Workers, retries, result timing and output options.
    metrics : ServiceMetrics, optional
    model_name : str
        Reported in every result.
    """

    def __init__(
        self,
        *,
        source: FrameSource,
        segmenter: Segmenter,
        labels: LabelSink,
        results: ResultSink,
        config: ServiceConfig,
        metrics: ServiceMetrics | None = None,
        model_name: str = "",
    ) -> None:
        self.source = source
        self.segmenter = segmenter
        self.labels = labels
        self.results = results
        self.config = config
        self.metrics = metrics or ServiceMetrics()
        self.model_name = model_name
        self.ledger = Ledger()
        self._specs: dict[str, AcquisitionSpec] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._finishers: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._sink_lock = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start both sinks' publishing, the source, and ``ingest.max_concurrent`` workers."""
        self.results.start()
        await self.source.start()
        self._workers = [
            asyncio.create_task(self._worker(), name=f"pipeline-worker-{i}")
            for i in range(self.config.ingest.max_concurrent)
        ]
        log.info("pipeline: frames from %s, results to %s", self.source.endpoint, self.results.endpoint)

    async def stop(self) -> None:
        """Stop taking messages, finish every accepted frame, close finished acquisitions, stop publishing."""
        await self.source.stop()
        if self._workers:
            await asyncio.gather(*self._workers, return_exceptions=True)
        for task in list(self._finishers):
            with contextlib.suppress(Exception):
                await task
        self.results.close()

    @property
    def endpoints(self) -> dict[str, str]:
        return {"ingest": self.source.endpoint, "results": self.results.endpoint}

    # -- events --------------------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            try:
                event = await self.source.get()
            except ListenerClosedError:
                return
            if isinstance(event, Frame):
                await self._on_frame(event)
            else:
                self._on_notice(event)
            self.metrics.queue_depth.set(self.source.queue_depth)

    def _on_notice(self, event: SourceEvent) -> None:
        """Book a notice; runs without awaiting, so notices take effect in arrival order."""
        m = self.metrics
        if isinstance(event, Rejected):
            m.received.inc()
            m.rejected.labels(reason=event.reason).inc()
            log.warning("rejected message (%s): %s", event.reason, event.detail)
            if event.acquisition is not None:
                self.ledger[event.acquisition].rejected += 1
                self._publish(
                    FrameOutcome(
                        event.acquisition, event.index, "rejected", reason=event.reason, detail=event.detail
                    )
                )
        elif isinstance(event, Dropped):
            m.dropped.labels(reason=event.reason).inc(event.count)
            entry = self.ledger[event.acquisition]
            entry.received += event.count
            entry.dropped += event.count
            self._maybe_finish(entry)
        elif isinstance(event, Started):
            entry = self.ledger[event.acquisition]
            if entry.closed:  # a new start re-opens a finished acquisition with fresh counts
                entry = self.ledger.reopen(event.acquisition)
                self._specs.pop(event.acquisition, None)
            entry.declaration = event.message
            log.info("acquisition %s started (sizes %s)", event.acquisition, event.message.sizes.model_dump())
        elif isinstance(event, Ended):
            entry = self.ledger[event.acquisition]
            entry.ended, entry.ended_at = True, time.time()
            entry.frames_declared = event.message.frames
            log.info("acquisition %s ended (%d frames received)", event.acquisition, entry.received)
            self._maybe_finish(entry)
        m.acquisitions_active.set(self.ledger.active)

    async def _on_frame(self, frame: Frame) -> None:
        m = self.metrics
        m.received.inc()
        m.accepted.inc()
        m.bytes_received.inc(frame.nbytes)
        entry = self.ledger[frame.acquisition]
        entry.received += 1
        m.acquisitions_active.set(self.ledger.active)
        self._in_flight += 1
        m.in_flight.set(self._in_flight)
        try:
            await self._process(frame, entry)
        except Exception:  # last line of defence: account for the frame, keep serving
            log.exception("unexpected error processing %r", frame)
            self._fail(frame, entry, "internal_error", "unexpected pipeline error", {})
        finally:
            self._in_flight -= 1
            m.in_flight.set(self._in_flight)
            self._maybe_finish(entry)

    def _maybe_finish(self, entry: AcquisitionLedger) -> None:
        if entry.complete and not entry.closed:
            entry.closed = True
            task = asyncio.get_running_loop().create_task(self._finish(entry))
            self._finishers.add(task)
            task.add_done_callback(self._finishers.discard)

    async def _finish(self, entry: AcquisitionLedger) -> None:
        summary = entry.summary()
        if entry.acquisition in self._specs:
            try:
                await asyncio.to_thread(
                    self.labels.close_acquisition, entry.acquisition, summary.model_dump(mode="json")
                )
            except Exception:
                log.exception("closing acquisition %s in the label sink failed", entry.acquisition)
        self.results.publish_summary(summary)
        self.metrics.acquisitions_active.set(self.ledger.active)
        log.info("acquisition %s complete: %s", entry.acquisition, entry.as_dict())

    # -- frames --------------------------------------------------------------------------------------

    def _spec_for(self, frame: Frame) -> AcquisitionSpec:
        """The store layout of a frame's acquisition: its declaration, else the first frame's extent.

        ``t`` may stay open-ended (the store grows along it). ``p`` and ``z`` are fixed when the store is
        created: undeclared (or null) they hold the first frame's index, and later frames beyond them fail
        with ``write_error`` (declare ``sizes`` in ``start`` for multi-position or z-stack acquisitions).
        """
        start = frame.declaration
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
                await asyncio.to_thread(self.labels.open_acquisition, spec)
                self._specs[frame.acquisition] = spec
        return spec

    async def _segment_with_retries(self, frame: Frame) -> DecodedFrame:
        attempts = self.config.retries.max_attempts
        delay = self.config.retries.backoff_s
        attempt = 1
        while True:
            try:
                return await self.segmenter.segment(np.asarray(frame.data))
            except Exception as exc:
                if not self.segmenter.is_retryable(exc) or attempt == attempts:
                    raise
                self.metrics.retries.labels(deployment="model").inc()
                self.metrics.replica_failures.labels(deployment="model").inc()
                log.warning("frame %r: replica failure (%s), retry %d/%d", frame, exc, attempt, attempts)
                await asyncio.sleep(delay)
                delay *= 2
                attempt += 1

    async def _process(self, frame: Frame, entry: AcquisitionLedger) -> None:
        m = self.metrics
        latency: dict[str, float] = {}
        started = time.monotonic()
        latency["queue"] = started - frame.received_at
        try:
            spec = await self._ensure_open(frame)
        except Exception as exc:
            self._fail(frame, entry, "sink_error", str(exc), latency)
            return
        t_model = time.monotonic()
        try:
            decoded = await self._segment_with_retries(frame)
        except Exception as exc:
            reason = "replica_failure" if self.segmenter.is_retryable(exc) else "model_error"
            self._fail(frame, entry, reason, f"{type(exc).__name__}: {exc}", latency)
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
        entry.segmented += 1
        cells = seg.cells.with_pixel_size(spec.pixel_size_um)
        after_write = self.config.results.after_write
        if not after_write:
            # Feedback first: the microscope gets the result now; the labels are stored right after.
            self._publish_ok(frame, seg.labels, cells, latency)
        t0 = time.monotonic()
        try:
            image = frame.data if spec.write_image else None
            if image is not None and image.ndim == 3:
                image = np.moveaxis(image, -1, 0)
            await asyncio.to_thread(self.labels.write, frame.id, seg.labels, image=image, cells=cells)
        except Exception as exc:
            # With feedback first, this frame's `ok` result is followed by this `failed` one.
            self._fail(frame, entry, "write_error", f"{type(exc).__name__}: {exc}", dict(latency))
            return
        m.stage_seconds.labels(stage="write").observe(time.monotonic() - t0)
        m.written.inc()
        if after_write:
            latency["write"] = time.monotonic() - t0
            self._publish_ok(frame, seg.labels, cells, latency)
        entry.ok += 1
        entry.cells += seg.n_cells

    def _publish_ok(
        self, frame: Frame, labels: np.ndarray, cells: CellTable, latency: dict[str, float]
    ) -> None:
        m = self.metrics
        latency["end_to_end"] = time.monotonic() - frame.received_at
        # The write stage is observed where it happens (after this, in feedback-first mode).
        m.observe_stages((stage, t) for stage, t in latency.items() if stage != "write")
        m.end_to_end_seconds.observe(latency["end_to_end"])
        self._publish(
            FrameOutcome(
                frame.acquisition,
                frame.index,
                "ok",
                labels=labels,
                cells=cells,
                latency=dict(latency),
                model=self.model_name,
            )
        )

    def _fail(
        self, frame: Frame, entry: AcquisitionLedger, reason: str, detail: str, latency: dict[str, float]
    ) -> None:
        log.warning("frame %r failed (%s): %s", frame, reason, detail)
        self.metrics.failed.labels(reason=reason).inc()
        entry.failed += 1
        entry.failures[reason] += 1
        self._publish(
            FrameOutcome(
                frame.acquisition,
                frame.index,
                "failed",
                reason=reason,
                detail=detail,
                latency=latency,
                model=self.model_name,
            )
        )

    def _publish(self, outcome: FrameOutcome) -> None:
        self.results.publish(outcome)
        self.metrics.results_published.labels(status=outcome.status).inc()
