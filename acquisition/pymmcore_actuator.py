"""The pymmcore-plus actuator: a planned MDA with feedback, through pymmcore-plus's queue-driven
``MDARunner.run(iterable)``. Use it through :mod:`acquisition.actuators`.

Neither pymmcore-plus nor useq is imported here; the actuator follows their documented APIs.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from acquisition.actuator_common import FEEDBACK_TAG, InFlight, frame_info_from_mda, stage_of
from acquisition.feedback_errors import FeedbackError
from acquisition.feedback_types import (
    Acquire,
    Callback,
    FrameInfo,
    FrameKey,
    Outcome,
    SetInterval,
    Stop,
    Ticket,
    frame_key,
)

if TYPE_CHECKING:
    from useq import MDAEvent

__all__ = ["PymmcorePlusActuator"]

log = logging.getLogger(__name__)


@dataclass
class _PlanOutline:
    """Stands in for the plan's ``MDASequence`` when the plan is a list of events: what the forwarder
    declares at the start (the sizes; no channels, time or z plan, or positions)."""

    sizes: dict[str, int]
    uid: Any = None
    channels: tuple[Any, ...] = field(default_factory=tuple)
    stage_positions: tuple[Any, ...] = field(default_factory=tuple)
    time_plan: Any = None
    z_plan: Any = None


class PymmcorePlusActuator(Iterator["MDAEvent"]):
    """Run a planned MDA with feedback through pymmcore-plus's queue-driven ``MDARunner.run(iterable)``.

    The actuator is the iterator the runner consumes: it yields the plan's events on time (doing the
    waiting between time points itself, so it can slip in events added meanwhile), and added events as soon
    as the current event is done. Actions:

    - ``Acquire``: its events run next, ahead of the plan, tagged ``metadata["cellsam_feedback"] = id``.
      Their frames are not forwarded to the service (their indices would overwrite planned frames there).
      With ``check_events`` an event whose channel preset does not exist is refused (``failed``), because
      pymmcore-plus would only warn and acquire with the current channel.
    - ``SetInterval``: the time between the remaining time points (from the last one's start).
    - ``Stop``: the run ends after the current event; everything not yet run is ``skipped``.
    - ``Callback``: called on the acquisition thread between two events (it may use the core).

    Frames: at each ``frameReady`` the actuator records the frame's stage position (pymmcore-plus frame
    metadata ``position``, else the event's target), pixel size and time, by ``(t, p, z)``, so the loop knows
    where each result's cells are; then it forwards the planned frames to ``forwarder`` (a
    :class:`~acquisition.adapters.PymmcorePlusForwarder`, optional), announcing the *plan* at sequence start
    (the runner itself only knows an open-ended generator).

    Parameters
    ----------
    runner : pymmcore_plus.mda.MDARunner
        ``core.mda``.
    plan : useq.MDASequence or iterable of useq.MDAEvent
        The planned acquisition (``min_start_time`` of its events gives the timing).
    forwarder : PymmcorePlusForwarder, optional
        Sends planned frames to the service.
    linger_s : float
        After the plan's last event: how long to keep the run open for the feedback of the last frames (it
        ends as soon as every planned frame's result was processed and nothing is queued). 0 ends at once.
    poll_s : float
        Longest sleep between checks for cancellation and new actions while waiting.
    check_events : bool
        Refuse added events whose channel preset the core does not have.

    Examples
    --------
    >>> actuator = PymmcorePlusActuator(core.mda, sequence, forwarder=forwarder).connect()  # doctest: +SKIP
    >>> with FeedbackLoop(actuator, acquisition="exp42", rules=[rule], output=out):        # doctest: +SKIP
    ...     core.mda.run(actuator)
    """

    def __init__(
        self,
        runner: Any,
        plan: Iterable[MDAEvent],
        *,
        forwarder: Any = None,
        linger_s: float = 10.0,
        poll_s: float = 0.05,
        check_events: bool = True,
    ) -> None:
        self.runner = runner
        self.forwarder = forwarder
        self.linger_s = linger_s
        self.poll_s = poll_s
        self.check_events = check_events
        is_sequence = hasattr(plan, "sizes") and hasattr(plan, "uid")
        self._outline: Any = plan if is_sequence else None
        self._plan: deque[MDAEvent] = deque(plan)
        self._planned = {frame_key(e.index) for e in self._plan}
        if self._outline is None:
            sizes: dict[str, int] = {}
            for event in self._plan:
                for axis, value in dict(event.index).items():
                    sizes[str(axis)] = max(sizes.get(str(axis), 0), int(value) + 1)
            self._outline = _PlanOutline(sizes=sizes)
        self._cond = threading.Condition()
        self._frames: dict[FrameKey, FrameInfo] = {}
        self._processed: set[FrameKey] = set()
        self._added: deque[tuple[InFlight, MDAEvent]] = deque()
        self._in_flight: dict[int, InFlight] = {}
        self._callbacks: deque[Ticket] = deque()
        self._stop: Ticket | None = None
        self._finished = False
        self._linger_until: float | None = None
        self._tp_t: int | None = None  # t of the time point being acquired
        self._tp_started = 0.0  # when its first event was handed to the runner (monotonic)
        self._tp_planned = 0.0  # its first event's planned min_start_time
        self.interval_s: float | None = None
        self.stop_reason: str | None = None
        self.added_run = 0
        self._connected: list[tuple[Any, Any]] = []

    # -- wiring ------------------------------------------------------------------------------------

    def connect(self) -> PymmcorePlusActuator:
        """Connect to ``runner.events`` (``sequenceStarted``, ``frameReady``, ``sequenceFinished``).

        Raises
        ------
        FeedbackError
            ``forwarder`` is itself connected to the runner: it would also send the added events' frames,
            under indices that overwrite planned frames in the store. Do not ``connect`` it (or
            ``disconnect()`` it); the actuator forwards the planned frames.
        """
        events = self.runner.events
        if self.forwarder is not None and self.forwarder in events.frameReady:
            raise FeedbackError(
                "the forwarder is connected to the runner's frameReady itself: call forwarder.disconnect() "
                "(the actuator forwards the planned frames, and only those)"
            )
        for signal, slot in (
            (events.sequenceStarted, self._on_started),
            (events.frameReady, self._on_frame),
            (events.sequenceFinished, self._on_finished),
        ):
            signal.connect(slot)
            self._connected.append((signal, slot))
        return self

    def disconnect(self) -> None:
        """Disconnect what :meth:`connect` connected."""
        for signal, slot in self._connected:
            signal.disconnect(slot)
        self._connected.clear()

    def run(self, **kwargs: Any) -> None:
        """Connect if needed and run the MDA on this thread: ``runner.run(self, **kwargs)`` (blocks)."""
        if not self._connected:
            self.connect()
        self.runner.run(self, **kwargs)

    def _on_started(self, sequence: Any, meta: Any = None) -> None:
        if self.forwarder is not None:
            self.forwarder.on_sequence_started(self._outline, meta)

    def _on_frame(self, img: Any, event: MDAEvent, meta: Mapping[str, Any] | None = None) -> None:
        tag = (event.metadata or {}).get(FEEDBACK_TAG)
        if tag is not None:
            self._added_frame(int(tag), stage_of(event, meta))
            return
        info = frame_info_from_mda(img, event, meta)
        with self._cond:
            self._frames[info.key] = info
        if self.forwarder is not None:
            self.forwarder(img, event, meta)

    def _on_finished(self, sequence: Any = None, *_: Any) -> None:
        with self._cond:
            self._finish_locked(skip_detail="the acquisition ended before it ran")
        if self.forwarder is not None:
            self.forwarder.on_sequence_finished(self._outline)

    # -- the Actuator protocol (feedback thread) ---------------------------------------------------

    def submit(self, ticket: Ticket) -> None:
        action = ticket.action
        report: Outcome | None = None
        with self._cond:
            if self._finished:
                report = Outcome("skipped", detail="the acquisition had ended")
            elif isinstance(action, Acquire):
                added = InFlight(ticket=ticket, remaining=len(action.events))
                for event in action.events:
                    meta = {**dict(event.metadata or {}), FEEDBACK_TAG: ticket.id}
                    self._added.append((added, event.model_copy(update={"metadata": meta})))
            elif isinstance(action, SetInterval):
                self.interval_s = float(action.seconds)
                report = Outcome("ran", detail="applies from the next time point", wall=time.time())
            elif isinstance(action, Stop):
                if self._stop is None:
                    self._stop, self.stop_reason = ticket, action.reason
                else:
                    report = Outcome("skipped", detail="a stop was already queued")
            elif isinstance(action, Callback):
                self._callbacks.append(ticket)
            self._cond.notify_all()
        if report is not None:
            ticket.report(report)

    def frame_info(self, key: FrameKey) -> FrameInfo | None:
        with self._cond:
            return self._frames.get(key)

    def processed(self, key: FrameKey) -> None:
        with self._cond:
            self._processed.add(key)
            self._cond.notify_all()

    # -- the iterator (acquisition thread) ---------------------------------------------------------

    def __iter__(self) -> PymmcorePlusActuator:
        return self

    def __next__(self) -> MDAEvent:
        while True:
            callback: Ticket | None = None
            refused: tuple[Ticket, str] | None = None
            with self._cond:
                if self._finished:
                    raise StopIteration
                if self._stop is not None or self._cancel_requested():
                    self._finish_locked(skip_detail="stopped before it ran")
                    raise StopIteration
                now = time.monotonic()
                if self._callbacks:
                    callback = self._callbacks.popleft()
                elif self._added:
                    added, event = self._added.popleft()
                    problem = self._check(event)
                    if problem is None:
                        self._in_flight[added.ticket.id] = added
                        return event
                    self._drop_added(added.ticket.id)
                    refused = (added.ticket, problem)
                elif self._plan:
                    due = self._due(self._plan[0])
                    if now >= due:
                        event = self._plan.popleft()
                        self._time_point_started(event, now)
                        return event.model_copy(update={"min_start_time": None})
                    self._cond.wait(min(due - now, self.poll_s))
                    continue
                else:
                    if self._linger_until is None:
                        self._linger_until = now + self.linger_s
                    acquired = self._planned & set(self._frames)
                    if acquired <= self._processed or now >= self._linger_until:
                        self._finish_locked(skip_detail="the acquisition ended before it ran")
                        raise StopIteration
                    self._cond.wait(min(self._linger_until - now, self.poll_s))
                    continue
            if refused is not None:
                refused[0].report(Outcome("failed", detail=refused[1], wall=time.time()))
            elif callback is not None:
                self._run_callback(callback)

    def _due(self, event: MDAEvent) -> float:
        """When a planned event may start (monotonic): at once within a time point; the next time point
        ``interval`` after the current one started (``SetInterval``'s, else the plan's own spacing)."""
        t = dict(event.index).get("t")
        if t is None or self._tp_t is None or t == self._tp_t:
            return -math.inf
        if self.interval_s is not None:
            gap = self.interval_s
        elif event.reset_event_timer:
            gap = float(event.min_start_time or 0.0)
        else:
            gap = max(0.0, float(event.min_start_time or 0.0) - self._tp_planned)
        return self._tp_started + gap

    def _time_point_started(self, event: MDAEvent, now: float) -> None:
        t = dict(event.index).get("t")
        if t is not None and t != self._tp_t:
            self._tp_t, self._tp_started = int(t), now
            self._tp_planned = float(event.min_start_time or 0.0)

    def _cancel_requested(self) -> bool:
        """``runner.cancel()`` was called: it flags a cancel while acquiring and ends the run (state
        finishing, ``is_running()`` false) while waiting."""
        status = getattr(self.runner, "status", None)
        if getattr(status, "cancel_requested", False):
            return True
        is_running = getattr(self.runner, "is_running", None)
        return callable(is_running) and not is_running()

    def _check(self, event: MDAEvent) -> str | None:
        """Why an added event must not run, or None (a missing channel preset)."""
        if not self.check_events or event.channel is None:
            return None
        core = getattr(getattr(self.runner, "engine", None), "mmcore", None)
        if core is None:
            return None
        group = event.channel.group or core.getChannelGroup()
        try:
            available = core.getAvailableConfigs(group)
        except Exception:  # no such group: pymmcore raises
            available = ()
        if event.channel.config not in tuple(available):
            return f"channel preset {event.channel.config!r} of group {group!r} does not exist"
        return None

    def _drop_added(self, ticket_id: int) -> None:
        self._added = deque(item for item in self._added if item[0].ticket.id != ticket_id)
        self._in_flight.pop(ticket_id, None)

    def _added_frame(self, ticket_id: int, stage: tuple[float | None, float | None, float | None]) -> None:
        done: InFlight | None = None
        with self._cond:
            added = self._in_flight.get(ticket_id)
            if added is None:
                return
            added.stage_xyz = added.stage_xyz or stage
            added.remaining -= 1
            if added.remaining <= 0:
                done = self._in_flight.pop(ticket_id)
                self.added_run += 1
        if done is not None:
            done.ticket.report(Outcome("ran", stage_xyz=done.stage_xyz, wall=time.time()))

    def _run_callback(self, ticket: Ticket) -> None:
        action = ticket.action
        if not isinstance(action, Callback):  # only callbacks are queued here
            return
        try:
            action.fn()
        except Exception as exc:
            log.warning("callback %s (action %d) raised: %s", action.name, ticket.id, exc, exc_info=True)
            ticket.report(Outcome("failed", detail=f"{type(exc).__name__}: {exc}", wall=time.time()))
        else:
            ticket.report(Outcome("ran", wall=time.time()))

    def _finish_locked(self, skip_detail: str) -> None:
        """End the run (holding the lock): report the stop and skip everything still queued."""
        if self._finished:
            return
        self._finished = True
        reports: list[tuple[Ticket, Outcome]] = []
        if self._stop is not None:
            reports.append((self._stop, Outcome("ran", wall=time.time())))
        seen: set[int] = set()
        for added, _ in self._added:
            if added.ticket.id not in seen:
                seen.add(added.ticket.id)
                reports.append((added.ticket, Outcome("skipped", detail=skip_detail)))
        for added in self._in_flight.values():
            if added.ticket.id not in seen:
                reports.append((added.ticket, Outcome("skipped", detail=skip_detail)))
        reports += [(t, Outcome("skipped", detail=skip_detail)) for t in self._callbacks]
        self._added.clear()
        self._in_flight.clear()
        self._callbacks.clear()
        self._cond.notify_all()
        # Reports only update the action table (its own lock); calling them here keeps them in order.
        for ticket, outcome in reports:
            ticket.report(outcome)
