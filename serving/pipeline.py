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
from serving.assembly import ChannelAssembler, FrameSet, model_input
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
        self.assembler = ChannelAssembler(
            timeout_s=config.assembly.timeout_s, max_pending=config.assembly.max_pending_sets
        )
        self._specs: dict[str, AcquisitionSpec] = {}
        self._janitor: asyncio.Task[None] | None = None
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
        self._janitor = asyncio.create_task(self._expire_sets(), name="pipeline-assembly-timeouts")
        log.info("pipeline: frames from %s, results to %s", self.source.endpoint, self.results.endpoint)

    async def stop(self) -> None:
        """Stop taking messages, finish every accepted frame, close finished acquisitions, stop publishing."""
        await self.source.stop()
        if self._workers:
            await asyncio.gather(*self._workers, return_exceptions=True)
        if self._janitor is not None:
            self._janitor.cancel()
            await asyncio.gather(self._janitor, return_exceptions=True)
        for frame_set in self.assembler.take():
            self._fail_set(frame_set, "incomplete_channels", self._missing(frame_set, "the service stopped"))
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
            # Every frame of the acquisition came before its end: sets still incomplete never will be.
            for frame_set in self.assembler.take(event.acquisition):
                self._fail_set(
                    frame_set, "incomplete_channels", self._missing(frame_set, "the acquisition ended")
                )
            self._maybe_finish(entry)
        m.acquisitions_active.set(self.ledger.active)

    async def _on_frame(self, frame: Frame) -> None:
        m = self.metrics
        m.received.inc()
        m.accepted.inc()
        m.bytes_received.inc(frame.nbytes)
        entry = self.ledger[frame.acquisition]
        if entry.closed:  # closed for idleness (the source re-opened it): as a new `start` does
            entry = self.ledger.reopen(frame.acquisition)
            entry.declaration = frame.declaration
            self._specs.pop(frame.acquisition, None)
        entry.received += 1
        m.acquisitions_active.set(self.ledger.active)
        complete, evicted = self.assembler.add(frame)
        for frame_set in evicted:
            detail = f"more than {self.assembler.max_pending} incomplete sets waiting"
            self._fail_set(frame_set, "incomplete_channels", self._missing(frame_set, detail))
        if complete is None:
            return  # waits for its other channels
        self._in_flight += 1
        m.in_flight.set(self._in_flight)
        try:
            await self._process(complete, entry)
        except Exception:  # last line of defence: account for the frames, keep serving
            log.exception("unexpected error processing %s", complete.frame_id)
            self._fail_set(complete, "internal_error", "unexpected pipeline error", {})
        finally:
            self._in_flight -= 1
            m.in_flight.set(self._in_flight)
            self._maybe_finish(entry)

    async def _expire_sets(self) -> None:
        """Fail the frames of sets whose channels did not all arrive within the assembly timeout."""
        period = min(1.0, self.assembler.timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            for frame_set in self.assembler.expired():
                detail = f"not complete {self.assembler.timeout_s:g} s after its first channel"
                self._fail_set(frame_set, "incomplete_channels", self._missing(frame_set, detail))

    @staticmethod
    def _missing(frame_set: FrameSet, why: str) -> str:
        return f"channels {frame_set.missing} of {frame_set.frame_id} never arrived ({why})"

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
        """The store layout of a frame's acquisition: its layout (declaration and first frame) and the
        declaration's physical sizes, channel names and colours, and positions."""
        layout = frame.layout
        if layout is None:  # a source that does not check layouts: the frame alone
            channels = int(frame.data.shape[2]) if frame.data.ndim == 3 else 1
            sizes = Sizes(p=frame.index.p + 1, z=frame.index.z + 1, c=channels)
            shape, dtype = (int(frame.data.shape[0]), int(frame.data.shape[1])), frame.data.dtype.name
        else:
            sizes = Sizes(t=layout.t, p=layout.p, z=layout.z, c=layout.c)
            shape, dtype = layout.shape, layout.dtype
        start = frame.declaration
        declared = start.channels if start is not None else None
        names = colors = None
        if declared is not None and len(declared.names) == sizes.c:
            names = tuple(declared.names)
        elif frame.channel is None and len(frame.channels.names) == sizes.c:
            names = tuple(frame.channels.names)
        if declared is not None and len(declared.colors) == sizes.c:
            colors = tuple(declared.colors)
        return AcquisitionSpec(
            acquisition=frame.acquisition,
            sizes=sizes,
            frame_shape=shape,
            image_dtype=dtype,
            channel_names=names,
            channel_colors=colors,
            pixel_size_um=_pixel_size(frame),
            z_step_um=start.z_step_um if start is not None else None,
            time_interval_s=start.time_interval_s if start is not None else None,
            positions=start.positions[: sizes.p] if start is not None else (),
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

    async def _segment_with_retries(self, frame_set: FrameSet, image: np.ndarray) -> DecodedFrame:
        attempts = self.config.retries.max_attempts
        delay = self.config.retries.backoff_s
        attempt = 1
        while True:
            try:
                return await self.segmenter.segment(image)
            except Exception as exc:
                if not self.segmenter.is_retryable(exc) or attempt == attempts:
                    raise
                self.metrics.retries.labels(deployment="model").inc()
                self.metrics.replica_failures.labels(deployment="model").inc()
                log.warning(
                    "frame %s: replica failure (%s), retry %d/%d", frame_set.frame_id, exc, attempt, attempts
                )
                await asyncio.sleep(delay)
                delay *= 2
                attempt += 1

    async def _process(self, frame_set: FrameSet, entry: AcquisitionLedger) -> None:
        m = self.metrics
        latency: dict[str, float] = {}
        started = time.monotonic()
        latency["queue"] = started - frame_set.received_at
        try:
            spec = await self._ensure_open(frame_set.first)
        except Exception as exc:
            self._fail_set(frame_set, "sink_error", str(exc), latency)
            return
        pixels = frame_set.pixels()
        t_model = time.monotonic()
        try:
            decoded = await self._segment_with_retries(frame_set, model_input(pixels, frame_set.roles()))
        except Exception as exc:
            reason = "replica_failure" if self.segmenter.is_retryable(exc) else "model_error"
            self._fail_set(frame_set, reason, f"{type(exc).__name__}: {exc}", latency)
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
        entry.segmented += len(frame_set.frames)
        t_measure = time.monotonic()
        try:
            cells = await asyncio.to_thread(
                seg.cells.with_pixel_size(spec.pixel_size_um).with_intensities,
                seg.labels,
                pixels,
                spec.channels,
            )
        except Exception as exc:
            self._fail_set(frame_set, "model_error", f"measuring the cells failed: {exc}", latency)
            return
        latency["measure"] = time.monotonic() - t_measure
        after_write = self.config.results.after_write
        if not after_write:
            # Feedback first: the microscope gets the result now; the labels are stored right after.
            self._publish_ok(frame_set, seg.labels, cells, latency)
        t0 = time.monotonic()
        try:
            image = np.moveaxis(pixels, -1, 0) if spec.write_image else None
            await asyncio.to_thread(
                self.labels.write, frame_set.frame_id, seg.labels, image=image, cells=cells
            )
        except Exception as exc:
            # With feedback first, this set's `ok` result is followed by this `failed` one.
            self._fail_set(frame_set, "write_error", f"{type(exc).__name__}: {exc}", dict(latency))
            return
        m.stage_seconds.labels(stage="write").observe(time.monotonic() - t0)
        m.written.inc()
        if after_write:
            latency["write"] = time.monotonic() - t0
            self._publish_ok(frame_set, seg.labels, cells, latency)
        entry.ok += len(frame_set.frames)
        entry.cells += seg.n_cells

    def _publish_ok(
        self, frame_set: FrameSet, labels: np.ndarray, cells: CellTable, latency: dict[str, float]
    ) -> None:
        m = self.metrics
        latency["end_to_end"] = time.monotonic() - frame_set.received_at
        # The write stage is observed where it happens (after this, in feedback-first mode).
        m.observe_stages((stage, t) for stage, t in latency.items() if stage != "write")
        m.end_to_end_seconds.observe(latency["end_to_end"])
        self._publish(
            FrameOutcome(
                frame_set.frame_id.acquisition,
                frame_set.index,
                "ok",
                labels=labels,
                cells=cells,
                latency=dict(latency),
                model=self.model_name,
            )
        )

    def _fail_set(
        self, frame_set: FrameSet, reason: str, detail: str, latency: dict[str, float] | None = None
    ) -> None:
        """Every frame of the set ends failed: counted, logged and published with its own index."""
        entry = self.ledger[frame_set.frame_id.acquisition]
        log.warning("frame %s failed (%s): %s", frame_set.frame_id, reason, detail)
        n = len(frame_set.frames)
        self.metrics.failed.labels(reason=reason).inc(n)
        entry.failed += n
        entry.failures[reason] += n
        for frame in frame_set.frames:
            self._publish(
                FrameOutcome(
                    frame.acquisition,
                    frame.index,
                    "failed",
                    reason=reason,
                    detail=detail,
                    latency=dict(latency or {}),
                    model=self.model_name,
                )
            )
        self._maybe_finish(entry)

    def _publish(self, outcome: FrameOutcome) -> None:
        self.results.publish(outcome)
        self.metrics.results_published.labels(status=outcome.status).inc()


def _pixel_size(frame: Frame) -> float | None:
    """The frame's pixel size in µm: its acquisition's declaration, else its own metadata
    (``pixel_size_um``, or pymmcore-plus's ``frame_meta.pixel_size_um``)."""
    if frame.declaration is not None and frame.declaration.pixel_size is not None:
        return frame.declaration.pixel_size
    metadata = frame.header.metadata
    nested = metadata.get("frame_meta")
    for value in (
        metadata.get("pixel_size_um"),
        nested.get("pixel_size_um") if isinstance(nested, dict) else None,
    ):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return None
