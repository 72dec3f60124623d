"""Channel assembly: the per-channel frames of one (t, p, z) become one frame set, segmented once.

Microscope software sends one frame per channel (``index.c``); a frame without ``c`` carries every
channel in one ``(H, W)`` or ``(H, W, C)`` buffer and is a set on its own. A set is complete when each of
the acquisition's ``C`` channels has arrived (the count its :class:`~acquisition.layout.Layout` fixed);
sets that do not complete in time, or that must make room, are handed back as incomplete so the pipeline
can fail their frames with a reason. Memory held by incomplete sets is bounded by ``max_pending``.

Under a projection z policy a set is a whole z-stack: every frame of one (t, p), complete when each of
the acquisition's ``Z`` planes has all its channels (``stack=True`` in :meth:`ChannelAssembler.add`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from acquisition.frames import Frame, FrameId
from acquisition.protocol import Channels, Index, ResultIndex, default_channels

__all__ = ["ChannelAssembler", "FrameSet", "model_input"]


@dataclass
class FrameSet:
    """The frames of one ``(acquisition, p, t, z)``, or of one ``(acquisition, p, t)`` z-stack: what is
    segmented and stored together.

    Attributes
    ----------
    frame_id : FrameId
        Where its labels are stored: ``(acquisition, p, t, z)``; a z-stack's has ``z = 0`` (its one label
        plane).
    frames : list of Frame
        In arrival order; one per channel and plane (a re-sent one replaces the pixels, both frames stay).
    channels : int
        Channels of the acquisition (``C``).
    planes : int
        z planes the set gathers: ``Z`` for a z-stack, else 1.
    stack : bool
        Whether the set is a whole (t, p) z-stack (a projection z policy).
    started : float
        ``time.monotonic()`` when the first frame arrived (for the assembly timeout).
    """

    frame_id: FrameId
    frames: list[Frame]
    channels: int
    planes: int = 1
    stack: bool = False
    started: float = field(default_factory=time.monotonic)
    _planes: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (z within the set, c)

    @property
    def complete(self) -> bool:
        return len(self._planes) == self.channels * self.planes

    @property
    def first(self) -> Frame:
        return self.frames[0]

    @property
    def index(self) -> Index | ResultIndex:
        """The set's index: its frames' t, p, z and ``c=None`` (all channels); a z-stack's has ``z=None``."""
        i = self.first.index
        if self.stack:
            return ResultIndex(t=i.t, p=i.p)
        return Index(t=i.t, p=i.p, z=i.z)

    @property
    def received_at(self) -> float:
        """When the first of its frames was accepted (``time.monotonic()``)."""
        return min(f.received_at for f in self.frames)

    @property
    def missing(self) -> list[int]:
        """Channels not received yet (of any plane)."""
        return [
            c for c in range(self.channels) if any((z, c) not in self._planes for z in range(self.planes))
        ]

    @property
    def missing_planes(self) -> list[int]:
        """z planes of a z-stack of which no frame arrived."""
        return [
            z for z in range(self.planes) if all((z, c) not in self._planes for c in range(self.channels))
        ]

    @property
    def incomplete_reason(self) -> str:
        """Why an incomplete set fails: ``incomplete_stack`` when whole z planes are missing, else
        ``incomplete_channels``."""
        return "incomplete_stack" if self.missing_planes else "incomplete_channels"

    def describe_missing(self) -> str:
        """What has not arrived, for a failure's detail: ``channels [0]``, ``z planes [2]``, ..."""
        if not self.stack:
            return f"channels {self.missing}"
        whole = self.missing_planes
        parts = [f"z planes {whole}"] if whole else []
        for z in range(self.planes):
            absent = [c for c in range(self.channels) if (z, c) not in self._planes]
            if absent and z not in whole:
                parts.append(f"channels {absent} of z plane {z}")
        return "; ".join(parts)

    def add(self, frame: Frame) -> None:
        self.frames.append(frame)
        z = frame.index.z if self.stack else 0
        c = frame.channel
        if c is None:
            data = frame.data if frame.data.ndim == 3 else frame.data[..., None]
            for k in range(data.shape[2]):
                self._planes[z, k] = data[..., k]
        else:
            self._planes[z, c] = frame.data

    def pixels(self) -> np.ndarray:
        """``(H, W, C)`` raw pixels, channel ``k`` from its frame (a single buffer is returned as is).

        Of a z-stack: ``(Z, H, W, C)``, plane ``z`` and channel ``k`` from their frame, a view of a
        C-contiguous ``(C, Z, H, W)`` array (the stored layout: gathering it is whole-plane copies, and
        ``np.moveaxis(pixels, -1, 0)`` gives it back without copying).
        """
        if self.stack:
            first = self._planes[0, 0]
            stored = np.empty((self.channels, self.planes, *first.shape), dtype=first.dtype)
            for (z, c), plane in self._planes.items():
                stored[c, z] = plane
            return np.moveaxis(stored, 0, -1)
        if len(self.frames) == 1 and self.first.channel is None:
            data = self.first.data
            return data if data.ndim == 3 else data[..., None]
        return self._plane(0)

    def _plane(self, z: int) -> np.ndarray:
        return np.stack([self._planes[z, k] for k in range(self.channels)], axis=-1)

    def roles(self) -> Channels:
        """Channel names and roles: the acquisition's declaration, else the defaults for ``C``."""
        frame = self.first
        if frame.channel is None:
            return frame.channels
        declared = frame.declaration.channels if frame.declaration is not None else None
        return declared if declared is not None else default_channels(self.channels)


def model_input(pixels: np.ndarray, channels: Channels) -> np.ndarray:
    """The image the model takes, built from the channel roles (CellSAM's blank/nuclear/whole-cell).

    With both a nuclear and a whole-cell channel: ``(H, W, 3)`` = (blank, nuclear, whole-cell). With only
    one of them: that channel alone, ``(H, W)`` (the reference's single-channel convention). With no
    roles at all: the pixels as they are (the model's own default for their channel count).
    """
    nuclear, whole_cell = channels.nuclear_channel, channels.whole_cell_channel
    if nuclear is None and whole_cell is None:
        return pixels[..., 0] if pixels.shape[2] == 1 else pixels
    if nuclear is None or whole_cell is None:
        return pixels[..., nuclear if nuclear is not None else whole_cell]
    stack = np.zeros((*pixels.shape[:2], 3), dtype=pixels.dtype)
    stack[..., 1] = pixels[..., nuclear]
    stack[..., 2] = pixels[..., whole_cell]
    return stack


class ChannelAssembler:
    """Gathers per-channel frames into :class:`FrameSet` objects (not thread-safe: one event loop).

    Parameters
    ----------
    timeout_s : float
        A set still incomplete this long after its first frame is expired (:meth:`expired`).
    max_pending : int
        Incomplete sets held at once; a new one beyond it evicts the oldest.
    """

    def __init__(self, *, timeout_s: float = 30.0, max_pending: int = 64) -> None:
        if timeout_s <= 0 or max_pending < 1:
            raise ValueError(f"timeout_s must be > 0 and max_pending ≥ 1, got {timeout_s}, {max_pending}")
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self._pending: OrderedDict[FrameId, FrameSet] = OrderedDict()

    @property
    def pending(self) -> int:
        """Incomplete sets held."""
        return len(self._pending)

    def add(self, frame: Frame, *, stack: bool = False) -> tuple[FrameSet | None, list[FrameSet]]:
        """Take one frame: ``(the set it completed or None, sets evicted to make room)``.

        With ``stack`` the frame belongs to the z-stack of its (t, p), which its acquisition's layout
        says has ``Z`` planes (one without a layout: 1).
        """
        layout = frame.layout
        channels = layout.c if layout is not None else 1
        key = FrameId(frame.acquisition, frame.index.p, frame.index.t, 0) if stack else frame.id
        pending = self._pending.get(key)
        if pending is None:
            planes = layout.z if stack and layout is not None else 1
            pending = FrameSet(key, [], channels, planes=planes, stack=stack)
        pending.add(frame)
        if pending.complete:
            self._pending.pop(key, None)
            return pending, []
        evicted: list[FrameSet] = []
        if key not in self._pending:
            self._pending[key] = pending
            while len(self._pending) > self.max_pending:
                evicted.append(self._pending.popitem(last=False)[1])
        return None, evicted

    def expired(self, now: float | None = None) -> list[FrameSet]:
        """Remove and return the sets incomplete for longer than ``timeout_s``."""
        now = time.monotonic() if now is None else now
        out = [s for s in self._pending.values() if now - s.started > self.timeout_s]
        for s in out:
            del self._pending[s.frame_id]
        return out

    def take(self, acquisition: str | None = None) -> list[FrameSet]:
        """Remove and return every incomplete set (of one acquisition, or all)."""
        out = [s for k, s in self._pending.items() if acquisition is None or k.acquisition == acquisition]
        for s in out:
            del self._pending[s.frame_id]
        return out
