"""The streaming pipeline: a coordinator over four injected seams, with one ledger per acquisition.

:class:`StreamPipeline` takes events from a :class:`~acquisition.source.FrameSource`, segments frames with
a :class:`~serving.segmenter.Segmenter`, stores them in a :class:`~acquisition.sink.LabelSink` and
publishes every outcome to a :class:`~acquisition.results.ResultSink`. It receives all four, never builds
them, and none of them calls back into it: the ingress deployment runs it with the ZeroMQ listener, the
Ray Serve segmenter, the Zarr sink and the ZeroMQ publisher; tests and notebooks with in-memory ones.
Guarantees (see ``docs/serving.md``):

* every accepted frame ends as stored labels plus an ``ok`` result, or as a recorded failure (counter
  with a reason, log line, ``failed`` result); nothing is silently lost. One ``ok`` result covers a frame
  set: the channels of a (t, p, z), or under a projection z policy (``config.z``) the whole z-stack of a
  (t, p), segmented once and stored with every plane;
* at most ``ingest.max_concurrent`` frames are being segmented or stored at once and at most
  ``ingest.max_queued`` wait in the source; beyond that the source stops taking messages and the sender
  is blocked (or, in live mode, the oldest waiting frame is dropped and counted);
* a replica that dies mid-frame is retried (bounded attempts); a frame that makes the model raise fails
  alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np

from acquisition.errors import ListenerClosedError
from acquisition.frames import Frame, FrameId
from acquisition.outcome import FrameOutcome
from acquisition.results import ResultSink
from acquisition.sink import LabelSink
from acquisition.source import Dropped, Ended, FrameSource, Rejected, SourceEvent, Started
from acquisition.spec import AcquisitionSpec, Sizes
from cellsam_core.cells import CellTable
from cellsam_core.stacks import ZPolicy
from serving.assembly import ChannelAssembler, FrameSet, model_input
from serving.config import ServiceConfig
from serving.ledger import AcquisitionLedger, Ledger
from serving.metrics import ServiceMetrics
from serving.segmenter import DecodedFrame, RetryableError, Segmenter
from serving.tracking import LiveTracking

__all__ = ["DrainReport", "StreamPipeline"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DrainReport:
    """How :meth:`StreamPipeline.stop` ended.

    Attributes
    ----------
    unfinished : int
        Accepted frames that had not ended when the drain deadline passed (or that were still waiting for
        their other channels): each got a ``failed`` result with reason ``shutdown``, recorded in its
        store, so a sender that re-sends them after a restart completes the acquisition.
    seconds : float
        Time the drain took.
    deadline_s : float or None
        The deadline it ran under (None: no deadline).
    """

    unfinished: int
    seconds: float
    deadline_s: float | None

    def as_dict(self) -> dict[str, float | int | None]:
        return {"unfinished": self.unfinished, "seconds": self.seconds, "deadline_s": self.deadline_s}


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
        self._active: set[int] = set()  # ids of frame sets being processed that have not ended yet
        self._stopping = False  # the drain deadline passed: whatever has not ended fails as `shutdown`
        self._unfinished = 0
        self._drained: DrainReport | None = None
        self.tracking = (
            LiveTracking(labels=labels, results=results, settings=config.tracking, metrics=self.metrics)
            if config.tracking.enabled
            else None
        )

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

    async def stop(self, deadline_s: float | None = None) -> DrainReport:
        """Drain: stop taking messages, finish every accepted frame, then stop publishing.

        Frames already accepted (queued in the source or being segmented) are finished: segmented,
        published and stored. When ``deadline_s`` passes first, every frame that has not ended (and every
        frame still waiting for its other channels) gets a ``failed`` result with reason ``shutdown``,
        recorded in its store; a write already under way is let finish. Calling it again returns the
        first call's report.
        """
        if self._drained is not None:
            return self._drained
        began = time.monotonic()
        await self.source.stop()
        if self._workers:
            _, late = await asyncio.wait(self._workers, timeout=deadline_s)
            if late:
                self._stopping = True
                log.warning(
                    "drain deadline of %g s passed with %d frame(s) in flight: they fail as `shutdown`",
                    deadline_s,
                    self._in_flight,
                )
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
                await self._fail_queued()
        if self._janitor is not None:
            self._janitor.cancel()
            await asyncio.gather(self._janitor, return_exceptions=True)
        self._stopping = True
        for frame_set in self.assembler.take():
            self._fail_incomplete(frame_set, "the service stopped", reason="shutdown")
        while self._finishers:
            await asyncio.gather(*list(self._finishers), return_exceptions=True)
        if self.tracking is not None:
            await self.tracking.close()
        self.results.close()
        self._drained = DrainReport(self._unfinished, time.monotonic() - began, deadline_s)
        log.info("pipeline stopped: %s", self._drained.as_dict())
        return self._drained

    async def _fail_queued(self) -> None:
        """After the deadline: frames still queued in the source fail as ``shutdown``; notices apply."""
        while True:
            try:
                event = await self.source.get()
            except ListenerClosedError:
                return
            if isinstance(event, Frame):
                self.ledger[event.acquisition].received += 1
                self.metrics.received.inc()
                self.metrics.accepted.inc()
                stack = self._z_policy(event).projects
                key = FrameId(event.acquisition, event.index.p, event.index.t, 0) if stack else event.id
                frame_set = FrameSet(key, [], 1, stack=stack)
                frame_set.add(event)
                self._fail_set(frame_set, "shutdown", "the service stopped before segmenting it")
            else:
                self._on_notice(event)

    async def acquisitions(self) -> list[dict[str, Any]]:
        """Every acquisition's ledger (``AcquisitionLedger.as_dict``) with ``frames_stored``: the frame sets
        its store holds, read from the store's done map (None for an acquisition with no store yet)."""
        out = []
        for entry in self.ledger.values():
            status = entry.as_dict()
            status["frames_stored"] = None
            if entry.acquisition in self._specs:
                try:
                    state = await asyncio.to_thread(self.labels.progress, entry.acquisition)
                    status["frames_stored"] = state.frames_done
                except Exception as exc:  # a status route must answer even when a store does not
                    log.warning("progress of %s unreadable: %s", entry.acquisition, exc)
            out.append(status)
        return out

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
            # The next frame opens the store again: the start may add time points (the source checked
            # that it changes nothing else).
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
                self._fail_incomplete(frame_set, "the acquisition ended")
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
        z_policy = self._z_policy(frame)
        if z_policy.plane is not None and frame.layout is not None and z_policy.plane >= frame.layout.z:
            z = frame.layout.z
            detail = (
                f"z.plane {z_policy.plane} is not among this acquisition's {z} z planes (0..{z - 1}): set "
                f"z.plane below {z} or another z.policy"
            )
            self._fail_set(FrameSet(frame.id, [frame], 1), "z_policy_conflict", detail)
            return
        complete, evicted = self.assembler.add(frame, stack=z_policy.projects)
        for frame_set in evicted:
            self._fail_incomplete(
                frame_set, f"more than {self.assembler.max_pending} incomplete sets waiting"
            )
        if complete is None:
            return  # waits for its other channels
        if self._stopping:
            self._fail_set(complete, "shutdown", "the service stopped before segmenting it")
            return
        self._in_flight += 1
        m.in_flight.set(self._in_flight)
        self._active.add(id(complete))
        try:
            await self._process(complete, entry)
        except asyncio.CancelledError:  # the drain deadline passed
            if id(complete) in self._active:
                self._fail_set(complete, "shutdown", "the service stopped before the frame was finished")
            raise
        except Exception:  # last line of defence: account for the frames, keep serving
            log.exception("unexpected error processing %s", complete.frame_id)
            self._fail_set(complete, "internal_error", "unexpected pipeline error", {})
        finally:
            self._active.discard(id(complete))
            self._in_flight -= 1
            m.in_flight.set(self._in_flight)
            self._maybe_finish(entry)

    async def _expire_sets(self) -> None:
        """Fail the frames of sets whose channels did not all arrive within the assembly timeout."""
        period = min(1.0, self.assembler.timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            for frame_set in self.assembler.expired():
                self._fail_incomplete(
                    frame_set, f"not complete {self.assembler.timeout_s:g} s after its first frame"
                )

    def _fail_incomplete(self, frame_set: FrameSet, why: str, reason: str | None = None) -> None:
        """Fail an incomplete set: ``incomplete_stack`` when whole z planes are missing, else
        ``incomplete_channels`` (or ``reason``, e.g. ``shutdown``)."""
        name = f"the z-stack (t={frame_set.frame_id.t}, p={frame_set.frame_id.p})" if frame_set.stack else ""
        what = f"{frame_set.describe_missing()} of {name or frame_set.frame_id}"
        self._fail_set(frame_set, reason or frame_set.incomplete_reason, f"{what} never arrived ({why})")

    def _maybe_finish(self, entry: AcquisitionLedger) -> None:
        if entry.complete and not entry.closed:
            entry.closed = True
            self._in_background(self._finish(entry))

    async def _finish(self, entry: AcquisitionLedger) -> None:
        summary = entry.summary()
        if self.tracking is not None:
            await self.tracking.finish(entry.acquisition)
        if entry.acquisition in self._specs:
            try:
                state = await asyncio.to_thread(self.labels.progress, entry.acquisition)
                summary = summary.model_copy(update={"frames_stored": state.frames_done})
                await asyncio.to_thread(
                    self.labels.close_acquisition, entry.acquisition, summary.model_dump(mode="json")
                )
            except Exception:
                log.exception("closing acquisition %s in the label sink failed", entry.acquisition)
        self.results.publish_summary(summary)
        self.metrics.acquisitions_active.set(self.ledger.active)
        log.info("acquisition %s complete: %s", entry.acquisition, entry.as_dict())

    # -- frames --------------------------------------------------------------------------------------

    def _z_policy(self, frame: Frame) -> ZPolicy:
        """The z policy of a frame's acquisition: the service's (``config.z``), except that an acquisition
        of one z plane (``sizes.z`` declared 1, or undeclared and fixed by its first frame) or without a
        layout is segmented plane by plane: a single plane is its own projection."""
        layout = frame.layout
        if layout is None or layout.z == 1:
            return ZPolicy()
        return self.config.z

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
            declaration=start.model_dump(mode="json") if start is not None else None,
            z_policy=self._z_policy(frame),
        )

    async def _ensure_open(self, frame: Frame) -> AcquisitionSpec:
        spec = self._specs.get(frame.acquisition)
        if spec is not None and self._current(spec, frame):
            return spec
        async with self._sink_lock:
            cached = self._specs.get(frame.acquisition)
            if cached is not None and self._current(cached, frame):
                return cached
            opened, done_before = await asyncio.to_thread(self._open, frame)
            entry = self.ledger[frame.acquisition]
            if entry.stored_before is None:
                entry.stored_before = done_before
            self._specs[frame.acquisition] = opened
        return opened

    @staticmethod
    def _current(spec: AcquisitionSpec, frame: Frame) -> bool:
        """Whether ``spec`` (opened earlier) still holds ``frame``: a later ``start`` may have added time
        points, which the frame's layout (fixed when it arrived) already has."""
        return frame.layout is None or frame.layout.t == spec.sizes.t

    def _open(self, frame: Frame) -> tuple[AcquisitionSpec, int]:
        """Open (create, resume or extend) a frame's acquisition in the label sink; runs in a thread.

        The store is the source of truth: an acquisition it already holds keeps its stored spec, with
        the time points and declaration of a later ``start`` (which the source has checked changes
        nothing else). Returns the spec and the frames done before this run opened it.
        """
        stored = self.labels.stored(frame.acquisition)
        if stored is None:
            spec = self._spec_for(frame)
            if spec.z_policy != self.config.z:
                log.info(
                    "acquisition %s has %d z plane(s): segmented plane by plane, not by z policy %r "
                    "(declare sizes.z in its start to have z-stacks projected)",
                    frame.acquisition,
                    spec.sizes.z,
                    self.config.z.describe(),
                )
        else:
            spec = stored.spec
            update: dict[str, object] = {}
            if frame.layout is not None and frame.layout.t != spec.sizes.t:
                update["sizes"] = spec.sizes.model_copy(update={"t": frame.layout.t})
            if frame.declaration is not None:
                declaration = frame.declaration.model_dump(mode="json")
                if declaration != spec.declaration:
                    update["declaration"] = declaration
            spec = spec.model_copy(update=update) if update else spec
            if stored.closed or update:
                log.info("acquisition %s: resuming its store (%s)", frame.acquisition, ", ".join(update))
        self.labels.open_acquisition(spec)
        return spec, self.labels.progress(frame.acquisition).frames_done

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
                deployment = exc.deployment if isinstance(exc, RetryableError) else "model"
                self.metrics.retries.labels(deployment=deployment).inc()
                self.metrics.replica_failures.labels(deployment=deployment).inc()
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
        # What is stored, (H, W, C), and what is segmented and measured: the same pixels; or for a z-stack
        # (Z, H, W, C) and its projection (max or chosen plane), made off the event loop.
        if frame_set.stack:
            pixels, segmented = await asyncio.to_thread(_project, frame_set, spec.z_policy)
        else:
            pixels = segmented = frame_set.pixels()
        t_model = time.monotonic()
        try:
            decoded = await self._segment_with_retries(frame_set, model_input(segmented, frame_set.roles()))
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
                segmented,
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
        if self.tracking is not None:
            self.tracking.writing(frame_set.frame_id)
        image = np.moveaxis(pixels, -1, 0) if spec.write_image else None  # (C, [Z,] H, W)
        write = asyncio.ensure_future(
            asyncio.to_thread(self.labels.write, frame_set.frame_id, seg.labels, image=image, cells=cells)
        )
        cancelled = False
        while True:
            try:
                await asyncio.shield(write)
                break
            except asyncio.CancelledError:
                # The drain deadline passed during the write, which goes on in its thread: let it end so
                # the frame ends as what it is (stored, or failed), then stop.
                cancelled = True
            except Exception as exc:
                # With feedback first, this set's `ok` result is followed by this `failed` one.
                self._fail_set(frame_set, "write_error", f"{type(exc).__name__}: {exc}", dict(latency))
                if cancelled:
                    raise asyncio.CancelledError from None
                return
        m.stage_seconds.labels(stage="write").observe(time.monotonic() - t0)
        m.written.inc()
        if after_write:
            latency["write"] = time.monotonic() - t0
            self._publish_ok(frame_set, seg.labels, cells, latency)
        entry.ok += len(frame_set.frames)
        entry.cells += seg.n_cells
        self._active.discard(id(frame_set))
        if cancelled:
            raise asyncio.CancelledError
        if self.tracking is not None:
            try:
                await self.tracking.stored(frame_set.frame_id, seg.labels, cells, stack=frame_set.stack)
            except Exception:
                self.metrics.tracking_errors.inc()
                log.exception("tracking %s failed; its labels are stored", frame_set.frame_id)

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
        self._active.discard(id(frame_set))
        if reason == "shutdown":
            self._unfinished += len(frame_set.frames)
        if frame_set.frame_id.acquisition in self._specs:
            self._in_background(self._record_failure(frame_set, reason, detail))
        if self.tracking is not None and reason != "shutdown":
            # A frame that failed for good is linked across; one the service did not finish because it
            # stopped is sent again after the restart, and its position's later frames wait for it.
            self._in_background(self.tracking.failed(frame_set.frame_id))
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

    async def _record_failure(self, frame_set: FrameSet, reason: str, detail: str) -> None:
        try:
            await asyncio.to_thread(self.labels.record_failure, frame_set.frame_id, reason, detail)
        except Exception:
            log.exception("recording the failure of %s in the label sink failed", frame_set.frame_id)

    def _in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task that :meth:`stop` waits for."""
        task = asyncio.get_running_loop().create_task(coro)
        self._finishers.add(task)
        task.add_done_callback(self._finishers.discard)

    def _publish(self, outcome: FrameOutcome) -> None:
        self.results.publish(outcome)
        self.metrics.results_published.labels(status=outcome.status).inc()


def _project(frame_set: FrameSet, z_policy: ZPolicy) -> tuple[np.ndarray, np.ndarray]:
    """A z-stack's pixels ``(Z, H, W, C)`` and their projection ``(H, W, C)``."""
    stack = frame_set.pixels()
    return stack, z_policy.project(stack)


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
