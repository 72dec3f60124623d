"""The result sink seam: where each frame's outcome and each acquisition's summary are published.

:class:`ResultSink` is the protocol; :class:`~acquisition.publisher.ResultPublisher` (ZeroMQ PUB) and
:class:`MemoryResultSink` (tests, notebooks) implement it and share one conformance suite
(``tests/test_result_conformance.py``). Both publish :meth:`FrameOutcome.result
<acquisition.outcome.FrameOutcome.result>`, the one conversion of an outcome to the wire.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol, runtime_checkable

import numpy as np

from acquisition.outcome import FrameOutcome
from acquisition.protocol import AcquisitionSummary, FrameResult, TrackResult

__all__ = ["MemoryResultSink", "ResultSink", "check_labels"]


def check_labels(labels: np.ndarray | None) -> None:
    """Raise ``ValueError`` unless ``labels`` is None or an (H, W) integer label image (every sink's
    check, made in the caller's thread before anything is queued)."""
    if labels is not None and (labels.ndim != 2 or labels.dtype.kind not in "ui"):
        raise ValueError(f"labels must be an (H, W) integer array, got {labels.shape} {labels.dtype}")


@runtime_checkable
class ResultSink(Protocol):
    """Publishes outcomes and summaries; never blocks the caller and never raises for a slow reader.

    Contract (checked by ``tests/test_result_conformance.py`` for every implementation):

    - :meth:`publish` sends ``outcome.result()`` (stamped with the publication time); an ``ok``
      outcome's label image goes with it to readers that asked for labels. An outcome that cannot be
      published (labels not an (H, W) integer image, an invalid result) raises ``ValueError`` in the
      caller and publishes nothing.
    - :meth:`publish_summary` sends the summary after every result of the acquisition published before.
    - :meth:`publish_tracks` sends a frame's tracks, in order with the acquisition's other messages, to
      readers that asked for tracks (``t/<acquisition>``).
    - Results of one acquisition are delivered in the order they were published.
    - Safe to call from any thread once :meth:`start` returned; :meth:`close` delivers what was published
      before it.
    """

    @property
    def endpoint(self) -> str:
        """Where results go (for logs and ``GET /endpoints``)."""
        ...

    def start(self) -> None:
        """Begin publishing."""
        ...

    def close(self) -> None:
        """Deliver what is queued and stop."""
        ...

    def publish(self, outcome: FrameOutcome) -> None:
        """Publish one frame's outcome."""
        ...

    def publish_summary(self, summary: AcquisitionSummary) -> None:
        """Publish an end-of-acquisition summary."""
        ...

    def publish_tracks(self, tracks: TrackResult) -> None:
        """Publish a frame's tracks (stamped with the publication time), after its result."""
        ...


class MemoryResultSink:
    """Keeps every published result, label image and summary in lists (thread-safe).

    ``results`` and ``labels`` are parallel (the label image of each result, None when it has none);
    ``messages`` holds results, tracks and summaries together, in publication order.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.results: list[FrameResult] = []
        self.labels: list[np.ndarray | None] = []
        self.summaries: list[AcquisitionSummary] = []
        self.tracks: list[TrackResult] = []
        self.messages: list[FrameResult | AcquisitionSummary | TrackResult] = []
        self.started = False
        self.closed = False

    @property
    def endpoint(self) -> str:
        return "memory://"

    def start(self) -> None:
        self.started = True

    def close(self) -> None:
        self.closed = True

    def publish(self, outcome: FrameOutcome) -> None:
        check_labels(outcome.labels)
        result = outcome.result().model_copy(update={"timestamp": time.time()})
        with self._lock:
            self.results.append(result)
            self.labels.append(outcome.labels)
            self.messages.append(result)

    def publish_summary(self, summary: AcquisitionSummary) -> None:
        with self._lock:
            self.summaries.append(summary)
            self.messages.append(summary)

    def publish_tracks(self, tracks: TrackResult) -> None:
        tracks = tracks.model_copy(update={"timestamp": time.time()})
        with self._lock:
            self.tracks.append(tracks)
            self.messages.append(tracks)

    def for_acquisition(self, acquisition: str) -> list[FrameResult]:
        """Results of one acquisition, in publication order."""
        with self._lock:
            return [r for r in self.results if r.acquisition == acquisition]
