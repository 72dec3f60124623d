"""Prometheus metrics of the service: one registry, owned by the ingress, one coherent view.

Every frame passes through the single ingress replica (it owns the ZeroMQ sockets), and the encoder and
decoder replicas return their own timings and batch sizes with each result, so the ingress records every
metric of the application whichever replica did the work. A replica restart therefore never loses or
double-counts a frame; an ingress restart resets the counters, which Prometheus' ``rate()`` handles.

Names follow Prometheus conventions: prefix ``cellsam_``, base units (seconds, bytes), ``_total`` counters,
and no per-frame or per-cell labels. No metric carries the acquisition id (unbounded); per-acquisition
progress is on the HTTP route ``GET /acquisitions``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
    start_http_server,
)

__all__ = ["AUTH_ENDPOINTS", "LATENCY_BUCKETS", "METRIC_NAMES", "STAGES", "ServiceMetrics"]

#: Pipeline stages with a latency histogram (``cellsam_stage_seconds{stage=...}``).
STAGES = ("ingest", "queue", "encode", "dispatch", "decode", "measure", "write", "link")

#: From 1 ms (GPU decode of a small frame) to 2 min (ViT-B on a CPU).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip

_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
_CELL_BUCKETS = (0, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)

#: Every metric family the service exports (sample names add ``_bucket``/``_sum``/``_count``/``_info``).
METRIC_NAMES = (
    "cellsam_frames_received_total",
    "cellsam_frames_accepted_total",
    "cellsam_frames_rejected_total",
    "cellsam_frames_dropped_total",
    "cellsam_frames_failed_total",
    "cellsam_frames_segmented_total",
    "cellsam_frames_written_total",
    "cellsam_bytes_received_total",
    "cellsam_results_published_total",
    "cellsam_retries_total",
    "cellsam_replica_failures_total",
    "cellsam_stage_seconds",
    "cellsam_end_to_end_seconds",
    "cellsam_encoder_batch_size",
    "cellsam_cells_per_frame",
    "cellsam_frames_in_flight",
    "cellsam_queue_depth",
    "cellsam_acquisitions_active",
    "cellsam_track_events_total",
    "cellsam_tracking_errors_total",
    "cellsam_model",
    "cellsam_auth_failures_total",
)

#: Where the service authenticates (``cellsam_auth_failures_total{endpoint=...}``).
AUTH_ENDPOINTS = ("ingest", "results", "http")


class ServiceMetrics:
    """All metrics of one service instance, in their own registry (several instances can coexist)."""

    def __init__(self, *, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "cellsam_frames_received", "Frame messages received on the ingest socket.", registry=r
        )
        self.accepted = Counter("cellsam_frames_accepted", "Frames that passed validation.", registry=r)
        self.rejected = Counter(
            "cellsam_frames_rejected",
            "Messages refused by validation, by reason (see docs/protocol.md).",
            ["reason"],
            registry=r,
        )
        self.dropped = Counter(
            "cellsam_frames_dropped",
            "Accepted frames dropped before segmentation (live mode), by reason.",
            ["reason"],
            registry=r,
        )
        self.failed = Counter(
            "cellsam_frames_failed",
            "Accepted frames that ended as a recorded failure, by reason.",
            ["reason"],
            registry=r,
        )
        self.segmented = Counter("cellsam_frames_segmented", "Frames segmented.", registry=r)
        self.written = Counter("cellsam_frames_written", "Frames whose labels were written.", registry=r)
        self.bytes_received = Counter(
            "cellsam_bytes_received", "Pixel bytes received in accepted frames.", registry=r
        )
        self.results_published = Counter(
            "cellsam_results_published", "Result messages published, by status.", ["status"], registry=r
        )
        self.retries = Counter(
            "cellsam_retries", "Retried calls to a deployment, by deployment.", ["deployment"], registry=r
        )
        self.replica_failures = Counter(
            "cellsam_replica_failures",
            "Calls that failed because a replica died or was unreachable, by deployment.",
            ["deployment"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "cellsam_stage_seconds",
            "Latency of each pipeline stage per frame.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "cellsam_end_to_end_seconds",
            "From frame receipt to labels written and result published.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.encoder_batch_size = Histogram(
            "cellsam_encoder_batch_size",
            "Frames per encoder batch (as seen by each frame).",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.cells_per_frame = Histogram(
            "cellsam_cells_per_frame", "Cells found per frame.", buckets=_CELL_BUCKETS, registry=r
        )
        self.in_flight = Gauge(
            "cellsam_frames_in_flight", "Frames between the listener and the sink.", registry=r
        )
        self.queue_depth = Gauge(
            "cellsam_queue_depth", "Accepted frames waiting for a pipeline slot.", registry=r
        )
        self.acquisitions_active = Gauge(
            "cellsam_acquisitions_active", "Acquisitions started and not yet ended.", registry=r
        )
        self.track_events = Counter(
            "cellsam_track_events",
            "Tracking events by kind (appeared, divided, lost, merged, recovered, disappeared).",
            ["kind"],
            registry=r,
        )
        self.tracking_errors = Counter(
            "cellsam_tracking_errors",
            "Frames whose linking or tracked write failed (their labels are stored; their tracks are not).",
            registry=r,
        )
        self.model = Info("cellsam_model", "The model the service runs.", registry=r)
        self.auth_failures = Counter(
            "cellsam_auth_failures",
            "Refused attempts by endpoint: ZeroMQ peers whose CURVE handshake failed (ingest, results), "
            "HTTP requests without the right bearer token (http).",
            ["endpoint"],
            registry=r,
        )
        for endpoint in AUTH_ENDPOINTS:  # exported at 0 from the start, so rate() sees the first one
            self.auth_failures.labels(endpoint=endpoint)
        self._server_lock = threading.Lock()
        self._server: object | None = None

    def set_model(self, *, name: str, sha256: str, source: str, device: str, dtype: str) -> None:
        self.model.info({"name": name, "sha256": sha256, "source": source, "device": device, "dtype": dtype})

    def observe_stages(self, timings: Iterable[tuple[str, float]]) -> None:
        for stage, seconds in timings:
            if stage in STAGES:
                self.stage_seconds.labels(stage=stage).observe(seconds)

    def exposition(self) -> bytes:
        """The text exposition format of every metric (what ``/metrics`` serves)."""
        return generate_latest(self.registry)

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` over HTTP on ``addr:port`` (``port=0`` picks a free one); returns the port."""
        with self._server_lock:
            if self._server is not None:
                raise RuntimeError("metrics endpoint already started")
            server, _thread = start_http_server(port, addr=addr, registry=self.registry)
            self._server = server
            return int(server.server_port)

    def close(self) -> None:
        with self._server_lock:
            server = self._server
            self._server = None
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]
