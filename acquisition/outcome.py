"""``FrameOutcome``: what became of one frame, the one value its stored record and its result come from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from acquisition.frames import FrameId
from acquisition.protocol import FrameResult, Index, ResultIndex
from cellsam_core.cells import CellTable

__all__ = ["FrameOutcome", "OutcomeStatus"]

OutcomeStatus = Literal["ok", "failed", "rejected"]


@dataclass(frozen=True, eq=False)
class FrameOutcome:
    """One frame's outcome: segmented (``ok``), ``failed`` after it was accepted, or ``rejected``.

    The label sink stores ``labels`` and ``cells`` of an ``ok`` outcome; the result sink publishes
    :meth:`result` of every outcome. Both read this one value, so the stored table and the published
    cells are the same table.

    Attributes
    ----------
    acquisition : str
        Acquisition id.
    index : Index, ResultIndex or None
        The frame's wire index (t, p, z, c); a :class:`ResultIndex` (``z=None``) for the whole z-stack of a
        (t, p) under a projection z policy; None for a rejected message whose index was unreadable.
    status : {"ok", "failed", "rejected"}
    labels : ndarray, uint32 (H, W), or None
        Label image of an ``ok`` outcome (0 = background).
    cells : CellTable or None
        Cell table of an ``ok`` outcome, in (y, x) array axis order.
    reason, detail : str or None
        Stable reason code and explanation of a ``failed``/``rejected`` outcome.
    latency : dict of str to float
        Seconds per stage so far (``queue``, ``encode``, ``decode``, ``dispatch``, ``write``, ...).
    model : str
        Model that produced the labels.
    """

    acquisition: str
    index: Index | ResultIndex | None
    status: OutcomeStatus
    labels: NDArray[np.uint32] | None = None
    cells: CellTable | None = None
    reason: str | None = None
    detail: str | None = None
    latency: dict[str, float] = field(default_factory=dict)
    model: str = ""

    @property
    def frame_id(self) -> FrameId | None:
        """``FrameId(acquisition, p, t, z)``: the stored frame this outcome is about (None if unknown).

        A z-stack's outcome (``index.z`` None) is stored as label plane 0 of its (t, p).
        """
        if self.index is None:
            return None
        return FrameId(self.acquisition, self.index.p, self.index.t, self.index.z or 0)

    @property
    def n_cells(self) -> int:
        """Number of cells (0 unless ``ok``)."""
        return 0 if self.cells is None else len(self.cells)

    def result(self) -> FrameResult:
        """The wire result of this outcome (``docs/protocol.md`` §3)."""
        return FrameResult(
            acquisition=self.acquisition,
            index=self.index,
            status=self.status,
            reason=self.reason,
            detail=None if self.detail is None else self.detail[:500],
            n_cells=self.n_cells,
            cells={} if self.cells is None else FrameResult.cell_columns(self.cells),
            latency=dict(self.latency),
            model=self.model or None,
        )
