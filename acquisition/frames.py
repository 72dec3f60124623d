"""The :class:`Frame` value type that flows from the listener to the segmentation service."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from acquisition.protocol import Channels, FrameHeader, Index, default_channels

__all__ = ["Frame", "FrameId"]


class FrameId(NamedTuple):
    """Names a frame and the Zarr chunk its labels go to: ``(acquisition, p, t, z)``."""

    acquisition: str
    p: int
    t: int
    z: int


@dataclass(frozen=True, slots=True, eq=False)
class Frame:
    """One accepted frame.

    Attributes
    ----------
    header : FrameHeader
        The validated wire header (acquisition, index, shape, dtype, channels, metadata).
    data : numpy.ndarray
        Pixels, shape (H, W) or (H, W, C), dtype ``header.dtype``. Read-only: when it came from the
        listener it is a zero-copy view on the received ZeroMQ message, which it keeps alive.
    received_at : float
        ``time.monotonic()`` when the listener accepted the frame (for ingest/end-to-end latency).
    channels : Channels
        Channel roles: the frame's own declaration, else its acquisition's ``start``, else
        :func:`~acquisition.protocol.default_channels`.
    """

    header: FrameHeader
    data: np.ndarray
    received_at: float
    channels: Channels

    @classmethod
    def from_header(
        cls, header: FrameHeader, data: np.ndarray, *, received_at: float, channels: Channels | None = None
    ) -> Frame:
        """Build a frame, resolving channel roles (frame header > ``channels`` argument > defaults)."""
        n_channels = data.shape[2] if data.ndim == 3 else 1
        resolved = header.channels or channels or default_channels(n_channels)
        return cls(header=header, data=data, received_at=received_at, channels=resolved)

    @property
    def acquisition(self) -> str:
        """Acquisition id."""
        return self.header.acquisition

    @property
    def index(self) -> Index:
        """Frame index (t, p, z, c)."""
        return self.header.index

    @property
    def id(self) -> FrameId:
        """``FrameId(acquisition, p, t, z)``."""
        i = self.header.index
        return FrameId(self.header.acquisition, i.p, i.t, i.z)

    @property
    def nbytes(self) -> int:
        """Size of the pixel buffer in bytes."""
        return int(self.data.nbytes)

    def __repr__(self) -> str:
        i = self.header.index
        return (
            f"Frame({self.acquisition!r}, t={i.t}, p={i.p}, z={i.z}, c={i.c}, "
            f"shape={self.data.shape}, dtype={self.data.dtype})"
        )
