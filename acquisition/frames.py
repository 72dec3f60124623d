"""The :class:`Frame` value type that flows from the listener to the segmentation service."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from acquisition.protocol import Channels, FrameHeader, Index, StartMessage, default_channels
from acquisition.wire import FrameMessage

if TYPE_CHECKING:
    from acquisition.layout import Layout

__all__ = ["Frame", "FrameId"]


class FrameId(NamedTuple):
    """Names a frame and the Zarr chunk its labels go to: ``(acquisition, p, t, z)``."""

    acquisition: str
    p: int
    t: int
    z: int


class Frame:
    """One accepted frame: a decoded message, when it arrived, and its acquisition's declaration.

    ``declaration`` is the acquisition's latest ``start`` when the frame was accepted (None if none came):
    its channel roles hold when the frame's own header names none, and its sizes and metadata describe
    the acquisition. The header, index and channel roles are read from the message when first asked for.

    Attributes
    ----------
    data : numpy.ndarray
        Pixels, shape (H, W) or (H, W, C), dtype ``header.dtype``. Read-only: when it came from the
        listener it is a zero-copy view on the received ZeroMQ message, which it keeps alive.
    received_at : float
        ``time.monotonic()`` when the listener accepted the frame (for ingest/end-to-end latency).
    declaration : StartMessage or None
        The acquisition's ``start`` (sizes, channels, metadata), if one came before the frame.
    layout : Layout or None
        The acquisition's extent and frame layout the frame was checked against (set by the sources).
    """

    __slots__ = ("_channels", "_message", "data", "declaration", "layout", "received_at")

    def __init__(
        self,
        message: FrameMessage,
        *,
        received_at: float,
        declaration: StartMessage | None = None,
        layout: Layout | None = None,
    ) -> None:
        self._message = message
        self.data = message.data
        self.received_at = received_at
        self.declaration = declaration
        self.layout = layout
        self._channels: Channels | None = None

    @property
    def header(self) -> FrameHeader:
        """The validated wire header (acquisition, index, shape, dtype, channels, metadata)."""
        return self._message.header

    @property
    def acquisition(self) -> str:
        """Acquisition id."""
        return self._message.acquisition

    @property
    def index(self) -> Index:
        """Frame index (t, p, z, c)."""
        return self._message.header.index

    @property
    def channel(self) -> int | None:
        """``index.c``: the one channel this frame carries, or None when it carries all of them."""
        return self._message.channel

    @property
    def id(self) -> FrameId:
        """``FrameId(acquisition, p, t, z)``."""
        t, p, z = self._message.position
        return FrameId(self._message.acquisition, p, t, z)

    @property
    def channels(self) -> Channels:
        """Channel roles: the frame's own declaration, else its acquisition's ``start``, else
        :func:`~acquisition.protocol.default_channels`."""
        if self._channels is None:
            message = self._message
            if message.declares_channels:
                resolved = message.header.channels
            else:
                resolved = self.declaration.channels if self.declaration is not None else None
            if resolved is None:
                resolved = default_channels(self.data.shape[2] if self.data.ndim == 3 else 1)
            self._channels = resolved
        return self._channels

    @property
    def nbytes(self) -> int:
        """Size of the pixel buffer in bytes."""
        return int(self.data.nbytes)

    def __repr__(self) -> str:
        i = self.index
        return (
            f"Frame({self.acquisition!r}, t={i.t}, p={i.p}, z={i.z}, c={i.c}, "
            f"shape={self.data.shape}, dtype={self.data.dtype})"
        )
