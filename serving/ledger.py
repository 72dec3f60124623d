"""The per-acquisition ledger: the one place where what happened to each acquisition's frames is counted.

The pipeline owns it and is its only writer: the frame source and the sinks report (by the events they
return and the calls that succeed or raise), they do not keep books of their own. ``GET /acquisitions``
and each acquisition's summary are read from it.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from acquisition.protocol import AcquisitionSummary, StartMessage

__all__ = ["AcquisitionLedger", "Ledger"]


@dataclass
class AcquisitionLedger:
    """Counts of one acquisition's frames in this run of the service.

    ``stored_before`` is what its store already held when this run opened it (an acquisition resumed
    after a restart); the summary's ``frames_stored`` is read from the store's done map when it ends.

    Every frame the source accepted is ``received``; it ends ``dropped`` (live mode, never segmented),
    ``ok`` (segmented and stored) or ``failed`` (with a reason in ``failures``); until then it is
    ``pending``. ``segmented`` counts frames the model finished (an ``ok`` result was published, which in
    feedback-first mode happens before the store; a frame whose write then fails is also ``failed``).
    ``rejected`` messages never became frames.
    """

    acquisition: str
    received: int = 0
    rejected: int = 0
    dropped: int = 0
    segmented: int = 0
    ok: int = 0
    failed: int = 0
    cells: int = 0
    declaration: StartMessage | None = None
    ended: bool = False
    closed: bool = False
    frames_declared: int | None = None
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    failures: Counter[str] = field(default_factory=Counter)
    #: Frames the store held when this run of the service first opened the acquisition (None: not yet).
    stored_before: int | None = None

    @property
    def stored(self) -> int:
        """Frames whose labels are stored (= ``ok``)."""
        return self.ok

    @property
    def pending(self) -> int:
        """Frames received that have not ended yet."""
        return self.received - self.dropped - self.ok - self.failed

    @property
    def complete(self) -> bool:
        """Ended, and every frame received before the end has ended too."""
        return self.ended and self.pending == 0

    def summary(self) -> AcquisitionSummary:
        """The end-of-acquisition summary published to subscribers and recorded in the store."""
        return AcquisitionSummary(
            acquisition=self.acquisition,
            frames_declared=self.frames_declared,
            frames_received=self.received,
            frames_ok=self.ok,
            frames_failed=self.failed,
            frames_rejected=self.rejected,
            frames_dropped=self.dropped,
            n_cells_total=self.cells,
            started_at=self.started_at,
            ended_at=self.ended_at,
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict copy (``GET /acquisitions``)."""
        return {
            "acquisition": self.acquisition,
            "received": self.received,
            "rejected": self.rejected,
            "dropped": self.dropped,
            "segmented": self.segmented,
            "ok": self.ok,
            "stored": self.stored,
            "failed": self.failed,
            "pending": self.pending,
            "cells": self.cells,
            "declared": self.declaration is not None,
            "ended": self.ended,
            "closed": self.closed,
            "frames_declared": self.frames_declared,
            "stored_before": self.stored_before,
            "failures": dict(self.failures),
        }


class Ledger:
    """Ledgers of every acquisition seen since the service started."""

    def __init__(self) -> None:
        self._acquisitions: dict[str, AcquisitionLedger] = {}

    def __getitem__(self, acquisition: str) -> AcquisitionLedger:
        """The acquisition's ledger, created on first use."""
        entry = self._acquisitions.get(acquisition)
        if entry is None:
            entry = self._acquisitions[acquisition] = AcquisitionLedger(acquisition)
        return entry

    def __contains__(self, acquisition: object) -> bool:
        return acquisition in self._acquisitions

    def reopen(self, acquisition: str) -> AcquisitionLedger:
        """A fresh ledger for an acquisition re-opened by ``start`` after it was closed."""
        entry = self._acquisitions[acquisition] = AcquisitionLedger(acquisition)
        return entry

    def values(self) -> list[AcquisitionLedger]:
        return list(self._acquisitions.values())

    @property
    def active(self) -> int:
        """Acquisitions opened (started, sent a frame or ended) and not closed yet: an id that only ever
        had messages rejected (e.g. ``too_many_acquisitions``) was never opened."""
        return sum(
            1
            for e in self._acquisitions.values()
            if not e.closed and (e.received or e.declaration is not None or e.ended)
        )
