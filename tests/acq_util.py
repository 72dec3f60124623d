"""Helpers shared by the acquisition socket tests (not a test module)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from acquisition.errors import ListenerClosedError
from acquisition.frames import Frame
from acquisition.protocol import EndMessage, StartMessage
from acquisition.source import Dropped, Ended, FrameSource, Rejected, SourceEvent, Started
from cellsam_core.cells import CellTable

ANY_PORT = "tcp://127.0.0.1:*"


def run(coro: Awaitable[Any], timeout: float = 30.0) -> Any:
    """Run a test coroutine with a deadline, so a hang fails instead of blocking."""

    async def main() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(main())


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait (polling) until ``condition()`` is true; ``TimeoutError`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.005)


@contextmanager
def dead_endpoint() -> Iterator[str]:
    """A loopback TCP endpoint nobody accepts on: the port is held (bound, not listening), so no other
    test or process can take it while a sender keeps trying to connect to it."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    try:
        yield f"tcp://127.0.0.1:{holder.getsockname()[1]}"
    finally:
        holder.close()


# -- reading a FrameSource ---------------------------------------------------------------------------


async def next_frame(source: FrameSource) -> Frame:
    """The next frame from ``source``, skipping notices."""
    while True:
        event = await source.get()
        if isinstance(event, Frame):
            return event


async def next_frames(source: FrameSource, n: int) -> list[Frame]:
    """The next ``n`` frames from ``source``, skipping notices."""
    return [await next_frame(source) for _ in range(n)]


async def events_until_end(source: FrameSource, acquisition: str) -> list[SourceEvent]:
    """Every event (frames and notices of any acquisition) up to and including ``acquisition``'s
    :class:`Ended`."""
    events: list[SourceEvent] = []
    while True:
        event = await source.get()
        events.append(event)
        if isinstance(event, Ended) and event.acquisition == acquisition:
            return events


async def drain(source: FrameSource) -> list[SourceEvent]:
    """Every event left in a stopped source (``get`` until it raises ``ListenerClosedError``)."""
    events: list[SourceEvent] = []
    while True:
        try:
            events.append(await source.get())
        except ListenerClosedError:
            return events


def frames_in(events: Iterable[SourceEvent]) -> list[Frame]:
    """The frames among ``events``, in order."""
    return [e for e in events if isinstance(e, Frame)]


@dataclass
class Books:
    """What a consumer knows of one acquisition from the events it received (the listener used to keep
    these itself).

    Counts restart when a ``start`` (re-)opens the acquisition, as a consumer's ledger does.
    """

    start: StartMessage | None = None
    end: EndMessage | None = None
    frames: list[Frame] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    dropped: int = 0

    @property
    def ended(self) -> bool:
        return self.end is not None

    @property
    def frames_declared(self) -> int | None:
        """``frames`` of the ``end`` message."""
        return None if self.end is None else self.end.frames


def books(events: Iterable[SourceEvent]) -> dict[str, Books]:
    """Per-acquisition :class:`Books` kept from ``events`` (rejections without an id are left out)."""
    out: dict[str, Books] = {}
    for event in events:
        acquisition = event.acquisition
        if acquisition is None:
            continue
        if isinstance(event, Started):
            out[acquisition] = Books(start=event.message)
            continue
        entry = out.setdefault(acquisition, Books())
        if isinstance(event, Ended):
            entry.end = event.message
        elif isinstance(event, Frame):
            entry.frames.append(event)
        elif isinstance(event, Rejected):
            entry.rejected.append(event)
        elif isinstance(event, Dropped):
            entry.dropped += event.count
    return out


def python_camera_core(shape: tuple[int, int], fill: Callable[[np.ndarray, int], None]) -> Any:
    """A UniMMCore with a pure-Python camera: pymmcore-plus's real MDA engine without Micro-Manager.

    ``fill(buffer, n)`` writes the ``n``-th snapped image (uint16, ``shape``) into ``buffer``.
    """
    import pytest

    unicore = pytest.importorskip("pymmcore_plus.experimental.unicore")

    class Camera(unicore.SimpleCameraDevice):  # type: ignore[name-defined]
        def __init__(self) -> None:
            super().__init__()
            self._exposure = 10.0
            self._n = 0

        def get_exposure(self) -> float:
            return self._exposure

        def set_exposure(self, exposure: float) -> None:
            self._exposure = exposure

        def sensor_shape(self) -> tuple[int, int]:
            return shape

        def dtype(self) -> Any:
            return np.uint16

        def snap(self, buffer: np.ndarray) -> dict[str, Any]:
            fill(buffer, self._n)
            self._n += 1
            return {}

    core = unicore.UniMMCore()
    core.loadPyDevice("Camera", Camera())
    core.initializeDevice("Camera")
    core.setCameraDevice("Camera")
    core.setAutoShutter(False)
    return core


def untracked(table: CellTable) -> CellTable:
    """``table`` without the tracking columns the store adds once a frame is linked (the published
    result's table is the frame's own, sent before linking)."""
    names = table.column_names
    keep = [i for i, name in enumerate(names) if name not in ("track_id", "parent_track_id")]
    return CellTable.from_array(
        table.to_array()[:, keep], [names[i] for i in keep], pixel_size_um=table.pixel_size_um
    )
