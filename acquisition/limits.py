"""The ceilings a frame source holds every sender to: extents, frame size, open acquisitions, idleness.

One value, :class:`Limits`, given to a source (``FrameListener(limits=...)``, ``MemoryFrameSource``) and
built by the service from ``ingest.*`` settings. Everything a store is laid out from (its extent along
``t``, ``p``, ``z``, ``c`` and its frame size) is bounded here, declared or not, so that no message can
make the service create a store of unbounded size; the number of acquisitions open at once is bounded
too, and acquisitions that went quiet are closed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from acquisition.errors import ProtocolError
from acquisition.protocol import Reason, StartMessage

__all__ = [
    "DEFAULT_MAX_CHANNELS",
    "DEFAULT_MAX_FRAME_PIXELS",
    "DEFAULT_MAX_OPEN_ACQUISITIONS",
    "DEFAULT_MAX_POSITIONS",
    "DEFAULT_MAX_TIME_POINTS",
    "DEFAULT_MAX_Z_PLANES",
    "Limits",
]

#: Default ceiling on any frame's time index (a day at 10 frames/s is 864,000).
DEFAULT_MAX_TIME_POINTS = 10_000_000
#: Default ceiling on stage positions (a 1536-well plate with two fields per well is 3,072).
DEFAULT_MAX_POSITIONS = 4096
#: Default ceiling on z planes.
DEFAULT_MAX_Z_PLANES = 4096
#: Default ceiling on channels sent as separate frames (``sizes.c``).
DEFAULT_MAX_CHANNELS = 64
#: Default ceiling on the pixels of one frame plane, ``H * W`` (8192 x 8192).
DEFAULT_MAX_FRAME_PIXELS = 1 << 26
#: Default ceiling on acquisitions open at once.
DEFAULT_MAX_OPEN_ACQUISITIONS = 64


@dataclass(frozen=True, slots=True)
class Limits:
    """What a source allows: per acquisition (declared or not) and over all of them.

    Attributes
    ----------
    max_time_points, max_positions, max_z_planes, max_channels : int
        Largest extent along ``t``, ``p``, ``z`` and ``c``: a frame whose index reaches it is rejected
        (``out_of_range``), and so is a ``start`` declaring more. Each extent becomes a store's shape (one
        OME-Zarr series per position, created when the store is), so none may be left to the sender.
    max_frame_pixels : int
        Most pixels of one frame plane (``H * W``): larger frames, and declarations of them, are rejected
        (``too_large``) before their buffer is looked at.
    max_open_acquisitions : int
        Acquisitions open at once (started, or sent a frame, and neither ended nor closed for idleness).
        A ``start`` or frame that would open one more is rejected (``too_many_acquisitions``).
    idle_timeout_s : float or None
        An open acquisition that received nothing for this long (or for twice its declared
        ``time_interval_s``, when that is longer) is closed: the source reports it ended
        (``Ended(idle=True)``). A later frame re-opens it. None: never.
    """

    max_time_points: int = DEFAULT_MAX_TIME_POINTS
    max_positions: int = DEFAULT_MAX_POSITIONS
    max_z_planes: int = DEFAULT_MAX_Z_PLANES
    max_channels: int = DEFAULT_MAX_CHANNELS
    max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS
    max_open_acquisitions: int = DEFAULT_MAX_OPEN_ACQUISITIONS
    idle_timeout_s: float | None = None

    def __post_init__(self) -> None:
        for name in (
            "max_time_points",
            "max_positions",
            "max_z_planes",
            "max_channels",
            "max_frame_pixels",
            "max_open_acquisitions",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be an integer ≥ 1, got {value!r}")
        timeout = self.idle_timeout_s
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"Limits.idle_timeout_s must be > 0 seconds or None, got {timeout!r}")

    def axis_limit(self, axis: str) -> tuple[int, str]:
        """The ceiling on ``axis`` (``t``, ``p``, ``z`` or ``c``) and the service setting that sets it."""
        return {
            "t": (self.max_time_points, "ingest.max_time_points"),
            "p": (self.max_positions, "ingest.max_positions"),
            "z": (self.max_z_planes, "ingest.max_z_planes"),
            "c": (self.max_channels, "ingest.max_channels"),
        }[axis]

    def idle_timeout_of(self, start: StartMessage | None) -> float | None:
        """How long ``start``'s acquisition may stay quiet before it is closed (None: forever)."""
        if self.idle_timeout_s is None:
            return None
        interval = start.time_interval_s if start is not None else None
        return max(self.idle_timeout_s, 2 * interval) if interval is not None else self.idle_timeout_s

    def check_declaration(self, start: StartMessage) -> None:
        """Raise :class:`ProtocolError` when ``start`` declares more than these limits allow."""
        sizes = start.sizes
        for axis, value in (("t", sizes.t), ("p", sizes.p), ("z", sizes.z), ("c", sizes.c)):
            limit, setting = self.axis_limit(axis)
            if value is not None and value > limit:
                raise ProtocolError(
                    Reason.OUT_OF_RANGE,
                    f"sizes.{axis}={value} exceeds the service's limit of {limit} ({setting})",
                    acquisition=start.acquisition,
                )
        if start.shape is not None:
            pixels = start.shape[0] * start.shape[1]
            if pixels > self.max_frame_pixels:
                raise ProtocolError(
                    Reason.TOO_LARGE,
                    f"declared shape {list(start.shape)} has {pixels} pixels per frame; the limit is "
                    f"{self.max_frame_pixels} (ingest.max_frame_pixels)",
                    acquisition=start.acquisition,
                )
