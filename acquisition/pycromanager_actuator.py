"""The pycromanager actuator: feedback actions into a running pycromanager ``Acquisition``.

pycromanager is not imported; the actuator follows its documented event API (events are dicts with
``axes``, ``x``/``y``/``z`` in µm, ``exposure`` in ms, ``config_group`` ``[group, preset]``;
``Acquisition.acquire``/``submit`` and ``abort``; ``image_process_fn(image, metadata)`` with Micro-Manager's
tags). It is checked against that API with a stand-in ``Acquisition``, not against pycromanager itself,
which needs a Micro-Manager installation.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from acquisition.actuator_common import FEEDBACK_TAG, InFlight, finite_float
from acquisition.feedback_types import (
    Acquire,
    Callback,
    FrameInfo,
    FrameKey,
    Outcome,
    SetInterval,
    Stop,
    Ticket,
)

if TYPE_CHECKING:
    from useq import MDAEvent

__all__ = ["PycromanagerActuator", "pycromanager_event"]

_PYCRO_AXES = {"time": "t", "position": "p", "z": "z"}


def pycromanager_event(event: MDAEvent, action_id: int, n: int = 0) -> dict[str, Any]:
    """A pycromanager acquisition event (a dict) for an added ``useq.MDAEvent``.

    ``axes`` identify the image uniquely (``cellsam_feedback``: the action id, ``cellsam_event``: its n-th
    event); ``x``/``y``/``z`` (µm), ``exposure`` (ms) and ``config_group`` ``[group, preset]`` follow the
    event when it sets them.
    """
    out: dict[str, Any] = {"axes": {FEEDBACK_TAG: int(action_id), "cellsam_event": int(n)}}
    for key, value in (
        ("x", event.x_pos),
        ("y", event.y_pos),
        ("z", event.z_pos),
        ("exposure", event.exposure),
    ):
        if value is not None:
            out[key] = float(value)
    if event.channel is not None:
        out["config_group"] = [event.channel.group or "Channel", event.channel.config]
    return out


class PycromanagerActuator:
    """Feed actions to a running pycromanager ``Acquisition`` (its documented event API).

    Create the ``Acquisition`` with ``image_process_fn=actuator.image_process_fn``, then :meth:`bind` it.
    ``image_process_fn`` records each image's stage position (Micro-Manager's ``XPositionUm`` /
    ``YPositionUm`` / ``ZPositionUm`` / ``PixelSizeUm`` tags) by its ``Axes`` and passes planned images to
    ``forwarder`` (a :class:`~acquisition.adapters.PycromanagerForwarder`); images of added events are not
    forwarded. Actions: ``Acquire`` → ``acq.submit(events)`` (or ``acq.acquire`` on older versions);
    ``Stop`` → ``acq.abort()``; ``Callback`` → called at once on the feedback thread; ``SetInterval`` →
    ``failed`` (pycromanager runs the events it was given; submit the plan one time point at a time and
    choose the interval yourself). pycromanager runs events in submission order, so added events run after
    the events already submitted.

    Not tested against pycromanager itself here (it needs a Micro-Manager installation); the tests check
    the event dicts and the calls against the documented API.
    """

    def __init__(self, *, forwarder: Any = None) -> None:
        self.forwarder = forwarder
        self.acquisition: Any = None
        self._frames: dict[FrameKey, FrameInfo] = {}
        self._in_flight: dict[int, InFlight] = {}
        self._lock = threading.Lock()

    def bind(self, acquisition: Any) -> PycromanagerActuator:
        """The running ``pycromanager.Acquisition`` to feed."""
        self.acquisition = acquisition
        return self

    def image_process_fn(self, image: Any, metadata: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """pycromanager ``image_process_fn(image, metadata)``: record, forward planned images, return both."""
        axes = dict(metadata.get("Axes", {}) or {})
        stage = tuple(finite_float(metadata.get(k)) for k in ("XPositionUm", "YPositionUm", "ZPositionUm"))
        if FEEDBACK_TAG in axes:
            done: InFlight | None = None
            with self._lock:
                added = self._in_flight.get(int(axes[FEEDBACK_TAG]))
                if added is not None:
                    added.stage_xyz = added.stage_xyz or stage  # type: ignore[assignment]
                    added.remaining -= 1
                    if added.remaining <= 0:
                        done = self._in_flight.pop(added.ticket.id)
            if done is not None:
                done.ticket.report(Outcome("ran", stage_xyz=done.stage_xyz, wall=time.time()))
            return image, metadata
        key = (*(int(axes.get(name, 0)) for name in _PYCRO_AXES),)
        pixel = finite_float(metadata.get("PixelSizeUm"))
        info = FrameInfo(
            key=(key[0], key[1], key[2]),
            event=None,
            stage_x_um=stage[0],
            stage_y_um=stage[1],
            stage_z_um=stage[2],
            pixel_size_um=pixel if pixel is not None and pixel > 0 else None,
            frame_shape=(int(getattr(image, "shape", (0, 0))[0]), int(getattr(image, "shape", (0, 0))[1])),
            ready_at=time.monotonic(),
            ready_wall=time.time(),
        )
        with self._lock:
            self._frames[info.key] = info
        if self.forwarder is not None:
            return self.forwarder(image, metadata)
        return image, metadata

    def submit(self, ticket: Ticket) -> None:
        action = ticket.action
        acq = self.acquisition
        try:
            if acq is None:
                raise RuntimeError("no pycromanager Acquisition bound: call actuator.bind(acq)")
            if isinstance(action, Acquire):
                events = [pycromanager_event(e, ticket.id, n) for n, e in enumerate(action.events)]
                with self._lock:
                    self._in_flight[ticket.id] = InFlight(ticket=ticket, remaining=len(events))
                (getattr(acq, "submit", None) or acq.acquire)(events)
                return
            if isinstance(action, Stop):
                acq.abort()
            elif isinstance(action, Callback):
                action.fn()
            elif isinstance(action, SetInterval):
                ticket.report(Outcome("failed", detail="pycromanager cannot change the interval of a run"))
                return
        except Exception as exc:
            with self._lock:
                self._in_flight.pop(ticket.id, None)
            ticket.report(Outcome("failed", detail=f"{type(exc).__name__}: {exc}", wall=time.time()))
            return
        ticket.report(Outcome("ran", wall=time.time()))

    def frame_info(self, key: FrameKey) -> FrameInfo | None:
        with self._lock:
            return self._frames.get(key)

    def processed(self, key: FrameKey) -> None:
        """pycromanager runs what it was given; nothing waits for feedback here."""
