"""The service's seam implementations, built from its configuration (one place, used by the ingress).

The pipeline receives these; it never builds them. Tests and notebooks pass in-memory ones instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from acquisition.listener import FrameListener
from acquisition.publisher import ResultPublisher
from acquisition.security import CurveServer
from acquisition.spec import StoredAcquisition
from acquisition.zarr_sink import ZarrLabelSink
from serving.config import ServiceConfig

__all__ = ["frame_listener", "label_store", "result_publisher"]


def _secured(curve: CurveServer | None, name: str) -> dict[str, Any]:
    """Socket options and context of a CURVE-secured socket named ``name`` (nothing without CURVE)."""
    return curve.socket_kwargs(name) if curve is not None else {}


def frame_listener(
    config: ServiceConfig,
    *,
    curve: CurveServer | None = None,
    stored: Callable[[str], StoredAcquisition | None] | None = None,
) -> FrameListener:
    """The ZeroMQ frame source described by ``config.ingest`` (CURVE-secured when ``curve`` is given;
    resuming acquisitions the label sink holds when ``stored`` is its `LabelSink.stored`)."""
    ingest = config.ingest
    return FrameListener(
        stored=stored,
        endpoint=ingest.endpoint,
        max_queued=ingest.max_queued,
        live=ingest.live,
        max_frame_bytes=ingest.max_frame_bytes,
        rcvhwm=ingest.rcvhwm,
        limits=ingest.limits(),
        max_acquisitions=max(1024, ingest.max_open_acquisitions),
        retain_buffers=ingest.retain_buffers,
        **_secured(curve, "ingest"),
    )


def result_publisher(config: ServiceConfig, *, curve: CurveServer | None = None) -> ResultPublisher:
    """The ZeroMQ result sink described by ``config.results`` (CURVE-secured when ``curve`` is given)."""
    return ResultPublisher(endpoint=config.results.endpoint, **_secured(curve, "results"))


def label_store(config: ServiceConfig) -> ZarrLabelSink:
    """The OME-Zarr label sink under ``config.output.directory``."""
    return ZarrLabelSink(config.output.directory)
