"""Channel assembly: the per-channel frames of one (t, p, z) become one frame set, segmented once.

Microscope software sends one frame per channel (``index.c``); a frame without ``c`` carries every
channel in one ``(H, W)`` or ``(H, W, C)`` buffer and is a set on its own. A set is complete when each of
the acquisition's ``C`` channels has arrived (the count its :class:`~acquisition.layout.Layout` fixed);
sets that do not complete in time, or that must make room, are handed back as incomplete so the pipeline
can fail their frames with a reason. Memory held by incomplete sets is bounded by ``max_pending``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from acquisition.frames import Frame, FrameId
from acquisition.protocol import Channels, Index, default_channels

__all__ = ["ChannelAssembler", "FrameSet", "model_input"]


@dataclass
class FrameSet:
    """The frames of one ``(acquisition, p, t, z)``: what is segmented and stored together.

    Attributes
    ----------
    frame_id : FrameId
    frames : list of Frame
        In arrival order; one per channel (a re-sent channel replaces the pixels, both frames stay).
    channels : int
        Channels of the acquisition (``C``).
    started : float
        ``time.monotonic()`` when the first frame arrived (for the assembly timeout).
    """

    frame_id: FrameId
    frames: list[Frame]
    channels: int
    started: float = field(default_factory=time.monotonic)
    _planes: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self._planes) == self.channels

    @property
    def first(self) -> Frame:
        return self.frames[0]

    @property
    def index(self) -> Index:
        """The set's index: its frames' t, p, z and ``c=None`` (all channels)."""
        i = self.first.index
        return Index(t=i.t, p=i.p, z=i.z)

    @property
    def received_at(self) -> float:
        """When the first of its frames was accepted (``time.monotonic()``)."""
        return min(f.received_at for f in self.frames)

    @property
    def missing(self) -> list[int]:
        """Channels not received yet."""
        return [c for c in range(self.channels) if c not in self._planes]

    def add(self, frame: Frame) -> None:
        self.frames.append(frame)
        c = frame.channel
        if c is None:
            data = frame.data if frame.data.ndim == 3 else frame.data[..., None]
            for k in range(data.shape[2]):
                self._planes[k] = data[..., k]
        else:
            self._planes[c] = frame.data

    def pixels(self) -> np.ndarray:
        """``(H, W, C)`` raw pixels, channel ``k`` from its frame (a single buffer is returned as is)."""
        if len(self.frames) == 1 and self.first.channel is None:
            data = self.first.data
            return data if data.ndim == 3 else data[..., None]
        return np.stack([self._planes[k] for k in range(self.channels)], axis=-1)

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

    def add(self, frame: Frame) -> tuple[FrameSet | None, list[FrameSet]]:
        """Take one frame: ``(the set it completed or None, sets evicted to make room)``."""
        layout = frame.layout
        channels = layout.c if layout is not None else 1
        key = frame.id
        pending = self._pending.get(key)
        if frame.channel is None and pending is None:
            single = FrameSet(key, [], channels)
            single.add(frame)
            return single, []
        evicted: list[FrameSet] = []
        if pending is None:
            pending = FrameSet(key, [], channels)
            self._pending[key] = pending
            while len(self._pending) > self.max_pending:
                evicted.append(self._pending.popitem(last=False)[1])
        pending.add(frame)
        if pending.complete:
            del self._pending[key]
            return pending, evicted
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
