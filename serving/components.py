"""The service's seam implementations, built from its configuration (one place, used by the ingress).

The pipeline receives these; it never builds them. Tests and notebooks pass in-memory ones instead.
"""

from __future__ import annotations

from acquisition.listener import FrameListener
from acquisition.publisher import ResultPublisher
from acquisition.zarr_sink import ZarrLabelSink
from serving.config import ServiceConfig

__all__ = ["frame_listener", "label_store", "result_publisher"]


def frame_listener(config: ServiceConfig) -> FrameListener:
    """The ZeroMQ frame source described by ``config.ingest``."""
    ingest = config.ingest
    return FrameListener(
        endpoint=ingest.endpoint,
        max_queued=ingest.max_queued,
        live=ingest.live,
        max_frame_bytes=ingest.max_frame_bytes,
        rcvhwm=ingest.rcvhwm,
        retain_buffers=ingest.retain_buffers,
    )


def result_publisher(config: ServiceConfig) -> ResultPublisher:
    """The ZeroMQ result sink described by ``config.results``."""
    return ResultPublisher(endpoint=config.results.endpoint)


def label_store(config: ServiceConfig) -> ZarrLabelSink:
    """The OME-Zarr label sink under ``config.output.directory``."""
    return ZarrLabelSink(config.output.directory)
