"""An acquisition's frame layout, fixed by its declaration and first frame, and the check of every frame.

What a frame may be is decided when it arrives, before anything is segmented or stored: a frame whose
index lies outside the acquisition (or beyond the service's :class:`~acquisition.limits.Limits`), whose
shape or dtype differs from the acquisition's, or which carries a channel the acquisition never declared
is rejected with its reason, so an accepted frame can always be stored (no ``ok`` result for a frame that
is never written). The same :class:`Layout` then lays out the acquisition's store.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from acquisition.errors import ProtocolError
from acquisition.limits import DEFAULT_MAX_TIME_POINTS, Limits
from acquisition.protocol import Reason, StartMessage
from acquisition.wire import FrameMessage

__all__ = ["DEFAULT_MAX_TIME_POINTS", "METADATA", "FirstFrame", "Layout", "declared_metadata", "redeclare"]


@dataclass(frozen=True, slots=True)
class FirstFrame:
    """What a layout takes from an acquisition's first accepted frame (no pixels are kept).

    Attributes
    ----------
    p, z : int
        Its position and z plane.
    channel : int or None
        Its ``index.c`` (None: every channel in one buffer).
    shape : (int, int)
        ``(H, W)``.
    channels : int
        ``C`` of an ``(H, W, C)`` buffer, 1 for ``(H, W)``.
    dtype : str
        numpy dtype name.
    """

    p: int
    z: int
    channel: int | None
    shape: tuple[int, int]
    channels: int
    dtype: str

    @classmethod
    def of(cls, message: FrameMessage) -> FirstFrame:
        _, p, z = message.position
        data = message.data
        return cls(
            p=p,
            z=z,
            channel=message.channel,
            shape=(int(data.shape[0]), int(data.shape[1])),
            channels=int(data.shape[2]) if data.ndim == 3 else 1,
            dtype=data.dtype.name,
        )


@dataclass(frozen=True, slots=True)
class Layout:
    """Extent and pixel layout of one acquisition.

    Attributes
    ----------
    t : int or None
        Time points (None: open-ended, the store grows).
    p, z : int
        Positions and z planes: declared, else fixed by the first frame (``index + 1``).
    c : int
        Channels of the stored image: declared ``sizes.c``, else the channel count of a declared
        ``(H, W, C)`` shape, else the first frame's (``C`` of an ``(H, W, C)`` buffer, 1 for ``(H, W)``).
    shape : (int, int)
        ``(H, W)`` of every frame (declared ``shape``, else the first frame's).
    dtype : str
        Pixel dtype of every frame (declared, else the first frame's).
    declared_channels : bool
        Whether ``sizes.c`` was declared (only then may frames carry single channels beyond ``c=0``).
    first : FirstFrame
        The first frame the layout was fixed with (a re-declaration is laid out with it again).
    limits : Limits
        The service's ceilings: no frame may have ``t``, ``p`` or ``z`` at or beyond them, declared or
        not (a time index is a store extent: one frame at ``t = 2**63`` must not grow a store).
    """

    t: int | None
    p: int
    z: int
    c: int
    shape: tuple[int, int]
    dtype: str
    declared_channels: bool
    first: FirstFrame = field(compare=False)
    limits: Limits = field(default_factory=Limits, compare=False)

    @classmethod
    def of(
        cls, start: StartMessage | None, first: FrameMessage | FirstFrame, limits: Limits | None = None
    ) -> Layout:
        """The layout of an acquisition from its ``start`` (if any) and its first accepted frame."""
        seed = first if isinstance(first, FirstFrame) else FirstFrame.of(first)
        sizes = start.sizes if start is not None else None
        declared_shape = start.shape if start is not None else None
        declared_c = sizes.c if sizes is not None else None
        if declared_c is not None:
            c = declared_c
        elif declared_shape is not None and len(declared_shape) == 3:
            c = int(declared_shape[2])
        elif seed.channel is not None:
            c = 1
        else:
            c = seed.channels
        return cls(
            t=sizes.t if sizes is not None else None,
            p=(sizes.p if sizes is not None and sizes.p else seed.p + 1),
            z=(sizes.z if sizes is not None and sizes.z else seed.z + 1),
            c=c,
            shape=(
                (int(declared_shape[0]), int(declared_shape[1])) if declared_shape is not None else seed.shape
            ),
            dtype=(start.dtype if start is not None and start.dtype else seed.dtype),
            declared_channels=declared_c is not None,
            first=seed,
            limits=limits or Limits(),
        )

    def redeclared(self, start: StartMessage) -> Layout:
        """The layout a new ``start`` would give this acquisition (same first frame, same limits)."""
        return Layout.of(start, self.first, self.limits)

    def same_store(self, other: Layout) -> bool:
        """Whether ``other`` lays out the same store (extent, frame shape and dtype)."""
        return (self.t, self.p, self.z, self.c, self.shape, self.dtype) == (
            other.t,
            other.p,
            other.z,
            other.c,
            other.shape,
            other.dtype,
        )

    def describe(self) -> str:
        """The store layout in words, for rejection details."""
        t = "open-ended" if self.t is None else str(self.t)
        return (
            f"t={t}, p={self.p}, z={self.z}, c={self.c}, frames {self.shape[0]}x{self.shape[1]} {self.dtype}"
        )

    def check(self, message: FrameMessage) -> None:
        """Raise :class:`ProtocolError` when ``message`` does not fit this acquisition."""
        t, p, z = message.position
        data = message.data
        limits = self.limits
        for axis, value, limit in (
            ("t", t, limits.max_time_points),
            ("p", p, limits.max_positions),
            ("z", z, limits.max_z_planes),
        ):
            if value >= limit:
                self._fail(
                    message,
                    Reason.OUT_OF_RANGE,
                    f"index {axis}={value} is at or beyond the service's limit of {limit} "
                    f"({limits.axis_limit(axis)[1]})",
                )
        for axis, value, size in (("t", t, self.t), ("p", p, self.p), ("z", z, self.z)):
            if size is not None and value >= size:
                self._fail(
                    message,
                    Reason.OUT_OF_RANGE,
                    f"index {axis}={value} is outside the acquisition's {axis} size {size} (declared in "
                    f"'start', else fixed by its first frame): declare sizes.{axis} to send more",
                )
        c = message.channel
        if c is not None:
            if data.ndim != 2:
                self._fail(message, Reason.BAD_SHAPE, f"a frame with index c={c} carries one channel (H, W)")
            if c >= self.c:
                if not self.declared_channels:
                    self._fail(
                        message,
                        Reason.UNDECLARED_CHANNEL,
                        f"channel c={c} of an acquisition that declared no channel count: declare sizes.c "
                        "in 'start' to send channels as separate frames",
                    )
                self._fail(
                    message, Reason.OUT_OF_RANGE, f"channel c={c} is outside the declared sizes.c={self.c}"
                )
        else:
            channels = int(data.shape[2]) if data.ndim == 3 else 1
            if channels != self.c:
                self._fail(
                    message,
                    Reason.LAYOUT_CONFLICT,
                    f"frame has {channels} channel(s); the acquisition has {self.c}",
                )
        if (int(data.shape[0]), int(data.shape[1])) != self.shape or data.dtype.name != self.dtype:
            self._fail(
                message,
                Reason.LAYOUT_CONFLICT,
                f"frame is {data.shape[0]}x{data.shape[1]} {data.dtype.name}; the acquisition's frames are "
                f"{self.shape[0]}x{self.shape[1]} {self.dtype}",
            )

    @staticmethod
    def _fail(message: FrameMessage, reason: Reason, detail: str) -> None:
        header = message.header
        raise ProtocolError(reason, detail, acquisition=header.acquisition, index=header.index.model_dump())


#: The physical metadata fields a further ``start`` must not change (:func:`redeclare`).
METADATA = (
    "pixel_size_um",
    "time_interval_s",
    "z_step_um",
    "channels.names",
    "channels.colors",
    "positions",
)


def declared_metadata(start: StartMessage | None) -> dict[str, Any]:
    """Physical metadata a declaration fixes (pixel size, intervals, channel names and colours,
    positions), for comparing a later ``start`` with it (all None for an undeclared acquisition)."""
    if start is None:
        return dict.fromkeys(METADATA)
    channels = start.channels
    return {
        "pixel_size_um": start.pixel_size,
        "time_interval_s": start.time_interval_s,
        "z_step_um": start.z_step_um,
        "channels.names": tuple(channels.names) if channels is not None and channels.names else None,
        "channels.colors": tuple(channels.colors) if channels is not None and channels.colors else None,
        "positions": start.positions or None,
    }


def redeclare(layout: Layout | None, reference: dict[str, Any], start: StartMessage) -> Layout | None:
    """The layout of an acquisition under a further ``start``: the same, or with more time points.

    A ``start`` may repeat what the acquisition already is (a no-op), leave out what it does not change,
    or declare more time points (or none: open-ended stays open-ended). Anything else it declares must
    equal the acquisition's ``layout`` (what its store already holds) and ``reference`` (its physical
    metadata, :func:`declared_metadata`).

    Raises
    ------
    ProtocolError
        ``layout_conflict`` naming every field that differs.
    """
    if layout is None:
        return None  # no frame yet and nothing stored: nothing is fixed
    conflicts: list[str] = []
    for name, before in reference.items():
        after = declared_metadata(start).get(name)
        if after is not None and after != before:
            conflicts.append(f"{name}: {before!r} -> {after!r}")
    new_layout = layout
    sizes = start.sizes
    if sizes.t is not None:
        if layout.t is None or sizes.t < layout.t:
            conflicts.append(f"sizes.t: {layout.t} -> {sizes.t} (time points may only be added)")
        else:
            new_layout = replace(layout, t=sizes.t)
    for axis in ("p", "z", "c"):
        declared = getattr(sizes, axis)
        if declared is not None and declared != getattr(layout, axis):
            conflicts.append(f"sizes.{axis}: {getattr(layout, axis)} -> {declared}")
    if start.shape is not None and tuple(start.shape[:2]) != layout.shape:
        conflicts.append(f"shape: {layout.shape} -> {tuple(start.shape[:2])}")
    if start.dtype is not None and start.dtype != layout.dtype:
        conflicts.append(f"dtype: {layout.dtype} -> {start.dtype}")
    if conflicts:
        raise ProtocolError(
            Reason.LAYOUT_CONFLICT,
            f"'start' conflicts with acquisition {start.acquisition!r} as it already is "
            f"({'; '.join(conflicts)}); use a new acquisition id for a different acquisition",
            acquisition=start.acquisition,
        )
    return new_layout
