"""Real-time feedback: from each frame's result to a microscope action (guide: ``docs/feedback.md``).

:class:`FeedbackLoop` subscribes to one acquisition's results, calls your rules on each segmented frame on
its own thread, checks every action they return against :class:`FeedbackLimits`, hands the ones that pass
to an :class:`~acquisition.feedback_types.Actuator` (``acquisition.actuators``: pymmcore-plus, pycromanager,
or a recording dry run), and records every decision in the acquisition's action table
(:mod:`acquisition.action_table`). A rule is any callable ``rule(frame) -> None | action | [actions]``::

    from acquisition.feedback import FeedbackLoop, FrameInput, Stop

    def stop_when_crowded(frame: FrameInput):
        if frame.n_cells > 500:
            return Stop(f"{frame.n_cells} cells at t={frame.index.t}")

The microscope is never blocked: results are received, rules run and actions are queued on the loop's
thread; the actuator only takes queued actions between two events. Safety: a rule that raises is contained
and recorded (and disabled after ``max_rule_errors`` in a row); a stale result triggers nothing; actions are
rate-limited; added events per acquisition are capped; targets outside the stage limits are dropped.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from acquisition.action_table import ActionTable, action_fields, frame_fields
from acquisition.client import ResultSubscriber
from acquisition.feedback_errors import InvalidActionError
from acquisition.feedback_limits import FeedbackLimits
from acquisition.feedback_rules import AcquireNewCells, IntervalWhenCount, StopWhenConfluent
from acquisition.feedback_types import (
    ACTION_TYPES,
    Acquire,
    Action,
    Actuator,
    Callback,
    FrameInfo,
    FrameInput,
    FrameKey,
    Outcome,
    RuleInput,
    RuleOutput,
    SetInterval,
    Stop,
    Ticket,
    frame_key,
)
from acquisition.ids import validate_acquisition_id
from acquisition.protocol import DEFAULT_RESULT_ENDPOINT, AcquisitionSummary, FrameResult
from acquisition.stage import ImageOrientation

__all__ = [
    "Acquire",
    "AcquireNewCells",
    "Action",
    "Callback",
    "FeedbackLimits",
    "FeedbackLoop",
    "FrameInput",
    "FrameTiming",
    "ImageOrientation",
    "IntervalWhenCount",
    "RuleInput",
    "SetInterval",
    "Stop",
    "StopWhenConfluent",
]

log = logging.getLogger(__name__)


@dataclass
class FrameTiming:
    """When one frame's result went through the loop (``time.monotonic()`` unless named ``_wall``)."""

    key: FrameKey
    ready_at: float | None  # frameReady, from the actuator
    ready_wall: float | None  # the same, time.time()
    published_wall: float | None  # the service published the result (its time.time())
    received_at: float  # the loop had the parsed result
    received_wall: float
    first_enqueued_at: float | None = None  # the first action of this frame was handed to the actuator
    done_at: float | None = None  # every rule ran and every action was enqueued or dropped
    service_latency: dict[str, float] = field(default_factory=dict)  # the result's per-stage seconds


@dataclass
class _Rule:
    fn: Callable[[Any], RuleOutput]
    name: str
    on: tuple[type, ...]
    errors_in_a_row: int = 0
    errors: int = 0
    disabled: bool = False


class FeedbackLoop:
    """Run rules on one acquisition's results and feed their actions to an actuator.

    Parameters
    ----------
    actuator : Actuator
        Where actions go and where frames' stage positions come from.
    acquisition : str
        The acquisition to follow (the id the microscope sends frames with).
    rules : iterable of callables, optional
        Frame rules (``rule(frame: FrameInput) -> None | action | iterable of actions``); more with
        :meth:`add_rule`.
    results : str
        The service's result endpoint (``tcp://127.0.0.1:5556`` by default).
    output : path, optional
        The service's output directory: the action table goes to ``{output}/{acquisition}.ome.zarr``. None
        keeps it in memory (:attr:`table`) when the service's disk is not visible from here.
    limits : FeedbackLimits
    orientation : ImageOrientation
        How the camera image lies on the stage.
    pixel_size_um : float, optional
        Overrides the pixel size the microscope reports with each frame.
    subscriber : ResultSubscriber, optional
        Use this subscriber (for tests or custom sockets) instead of creating one on ``results``.

    Use as a context manager, or :meth:`start` before the acquisition starts (the subscription must be in
    place before the first result) and :meth:`close` after it ended.
    """

    def __init__(
        self,
        actuator: Actuator,
        *,
        acquisition: str,
        rules: Iterable[Callable[[FrameInput], RuleOutput]] = (),
        results: str = DEFAULT_RESULT_ENDPOINT,
        output: str | os.PathLike[str] | None = None,
        limits: FeedbackLimits | None = None,
        orientation: ImageOrientation | None = None,
        pixel_size_um: float | None = None,
        subscriber: ResultSubscriber | None = None,
    ) -> None:
        self.actuator = actuator
        self.acquisition = validate_acquisition_id(acquisition)
        self.results_endpoint = results
        self.limits = limits or FeedbackLimits()
        self.orientation = orientation or ImageOrientation()
        self.pixel_size_um = pixel_size_um
        self.table = ActionTable(self.acquisition, output)
        self.timings: list[FrameTiming] = []
        self.summary: AcquisitionSummary | None = None
        self.frames_seen = 0
        self.stopped_reason: str | None = None
        self._rules: list[_Rule] = []
        for rule in rules:
            self.add_rule(rule)
        self._subscriber = subscriber
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._ended = threading.Event()
        self._lock = threading.Lock()
        # Rebuilt from the stored table after a restart: events already added count against the cap.
        self._added_events = sum(
            int(r["n_events"] or 0)
            for r in self.table.rows()
            if r["kind"] == Acquire.kind and r["status"] in ("enqueued", "ran")
        )
        self._tokens = float(self.limits.burst)
        self._tokens_at = time.monotonic()

    # -- rules -------------------------------------------------------------------------------------

    def add_rule(
        self,
        rule: Callable[[Any], RuleOutput],
        *,
        on: type[RuleInput] | tuple[type[RuleInput], ...] = FrameInput,
        name: str | None = None,
    ) -> None:
        """Add a rule called with every input of type ``on`` (default :class:`FrameInput`), in order of
        addition. ``name`` (default: the function's or class's name) identifies it in the action table."""
        if not callable(rule):
            raise InvalidActionError(f"a rule must be callable, got {type(rule).__name__}")
        types = on if isinstance(on, tuple) else (on,)
        label = name or getattr(rule, "name", None) or getattr(rule, "__name__", None) or type(rule).__name__
        self._rules.append(_Rule(fn=rule, name=str(label), on=types))

    @property
    def rule_errors(self) -> dict[str, int]:
        """Exceptions raised per rule name."""
        return {r.name: r.errors for r in self._rules}

    @property
    def disabled_rules(self) -> list[str]:
        """Names of the rules disabled after too many errors in a row."""
        return [r.name for r in self._rules if r.disabled]

    @property
    def added_events(self) -> int:
        """Events added to this acquisition so far (the quantity ``max_added_events`` caps)."""
        return self._added_events

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, ready_timeout: float = 10.0) -> FeedbackLoop:
        """Subscribe (waiting until the subscription is active) and start the loop's thread."""
        if self._thread is not None:
            raise RuntimeError("FeedbackLoop.start() was already called")
        if self._subscriber is None:
            self._subscriber = ResultSubscriber(
                endpoint=self.results_endpoint, acquisitions=[self.acquisition]
            )
        self._subscriber.wait_ready(ready_timeout)
        self.table.start()
        self._thread = threading.Thread(target=self._run, name=f"feedback-{self.acquisition}", daemon=True)
        self._thread.start()
        return self

    def wait_summary(self, timeout: float | None = None) -> AcquisitionSummary | None:
        """Block until the acquisition's summary arrived (every frame was processed); None on timeout."""
        self._ended.wait(timeout)
        return self.summary

    def close(self, timeout: float = 10.0) -> bool:
        """Stop the thread, close the subscription and write the action table (see ``ActionTable.close``)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._subscriber is not None:
            self._subscriber.close()
        return self.table.close(timeout)

    def __enter__(self) -> FeedbackLoop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop ----------------------------------------------------------------------------------

    def _run(self) -> None:
        sub = self._subscriber
        if sub is None:  # start() sets it before starting this thread
            return
        while not self._stopping.is_set():
            try:
                message = sub.recv(timeout=0.1)
            except TimeoutError:
                continue
            except Exception:  # a malformed message must not end the loop
                log.exception("feedback loop of %s: unreadable result message", self.acquisition)
                continue
            payload = message.payload
            if isinstance(payload, AcquisitionSummary):
                self.summary = payload
                self._ended.set()
                continue
            if not isinstance(payload, FrameResult):  # tracks: this loop acts on results
                continue
            try:
                self.handle(payload)
            except Exception:  # a bug here must not silence the loop; rule errors are handled inside
                log.exception("feedback loop of %s: internal error on %s", self.acquisition, payload.index)

    def handle(self, result: FrameResult, received_at: float | None = None) -> FrameTiming | None:
        """Process one result: run the rules, gate and enqueue their actions. Called by the loop's thread
        for each result received (public so that tests and replays can feed results directly)."""
        received = time.monotonic() if received_at is None else received_at
        received_wall = time.time()
        if result.index is None or result.status != "ok":
            if result.index is not None:
                self.actuator.processed(frame_key(result.index))
            return None
        key = frame_key(result.index)
        info = self.actuator.frame_info(key)
        self.frames_seen += 1
        timing = FrameTiming(
            key=key,
            ready_at=info.ready_at if info else None,
            ready_wall=info.ready_wall if info else None,
            published_wall=result.timestamp,
            received_at=received,
            received_wall=received_wall,
            service_latency=dict(result.latency),
        )
        if info is not None:
            age = received - info.ready_at
        elif result.timestamp is not None:  # the frame is unknown here: age from the service's receipt
            age = received_wall - (result.timestamp - result.latency.get("end_to_end", 0.0))
        else:
            age = 0.0
        frame = FrameInput(
            acquisition=self.acquisition,
            received_at=received,
            result=result,
            cells=result.cell_table(),
            frame=info,
            orientation=self.orientation,
            pixel_size_um=self.pixel_size_um if self.pixel_size_um is not None else _pixel_size(info),
            age_s=max(0.0, age),
        )
        self.dispatch(frame, timing)
        self.timings.append(timing)
        self.actuator.processed(key)
        return timing

    def dispatch(self, rule_input: RuleInput, timing: FrameTiming | None = None) -> None:
        """Call every enabled rule that takes ``rule_input``'s type, in order, and gate and enqueue what
        they return. :meth:`handle` calls it for each frame; future inputs (track events) come in here."""
        for rule in self._rules:
            if rule.disabled or not isinstance(rule_input, rule.on):
                continue
            for action in self._call(rule, rule_input):
                if (
                    self._gate(rule, rule_input, action)
                    and timing is not None
                    and timing.first_enqueued_at is None
                ):
                    timing.first_enqueued_at = time.monotonic()
        if timing is not None:
            timing.done_at = time.monotonic()

    def _call(self, rule: _Rule, rule_input: RuleInput) -> list[Action]:
        try:
            out = rule.fn(rule_input)
            if out is None:
                actions: list[Action] = []
            elif isinstance(out, ACTION_TYPES):
                actions = [out]  # type: ignore[list-item]  # narrowed by the isinstance above
            elif isinstance(out, Iterable) and not isinstance(out, (str, bytes)):
                actions = list(out)
            else:
                raise InvalidActionError(f"returned {type(out).__name__}, not None, an action or actions")
            for action in actions:
                if not isinstance(action, ACTION_TYPES):
                    raise InvalidActionError(
                        f"returned a {type(action).__name__} among its actions; actions are Acquire, "
                        "SetInterval, Stop or Callback"
                    )
        except Exception as exc:
            rule.errors += 1
            rule.errors_in_a_row += 1
            disable = rule.errors_in_a_row >= self.limits.max_rule_errors
            rule.disabled = rule.disabled or disable
            log.warning(
                "rule %s raised on %s of %s: %s%s",
                rule.name,
                type(rule_input).__name__ if rule_input.index is None else frame_key(rule_input.index),
                self.acquisition,
                exc,
                " (disabled)" if disable else "",
                exc_info=True,
            )
            detail = f"{type(exc).__name__}: {exc}" + (" (rule disabled)" if disable else "")
            self.table.add(rule=rule.name, status="rule_error", detail=detail, **frame_fields(rule_input))
            return []
        rule.errors_in_a_row = 0
        return actions

    # -- safety ------------------------------------------------------------------------------------

    def _take_token(self) -> bool:
        now = time.monotonic()
        self._tokens = min(
            float(self.limits.burst), self._tokens + (now - self._tokens_at) * self.limits.max_actions_per_s
        )
        self._tokens_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def _drop_reason(self, rule_input: RuleInput, action: Action) -> str | None:
        limits = self.limits
        if self.stopped_reason is not None:
            return "stopped"
        if rule_input.age_s > limits.max_result_age_s:
            return "stale"
        if isinstance(action, Acquire):
            if limits.stage_limits_um is not None:
                (x0, x1), (y0, y1) = limits.stage_limits_um
                for event in action.events:
                    x, y = event.x_pos, event.y_pos
                    if (x is not None and not x0 <= x <= x1) or (y is not None and not y0 <= y <= y1):
                        return "outside_stage_limits"
            with self._lock:
                added = self._added_events
            if added + len(action.events) > limits.max_added_events:
                return "max_added_events"
        if isinstance(action, Stop):
            return None
        return None if self._take_token() else "rate_limit"

    def _gate(self, rule: _Rule, rule_input: RuleInput, action: Action) -> bool:
        reason = self._drop_reason(rule_input, action)
        fields = {**frame_fields(rule_input), **action_fields(rule_input, action)}
        where = "-" if rule_input.index is None else frame_key(rule_input.index)
        if reason is not None:
            self.table.add(rule=rule.name, status="dropped", detail=reason, decided_at=time.time(), **fields)
            log.info("dropped %s from rule %s (%s) at frame %s", action.kind, rule.name, reason, where)
            return False
        if isinstance(action, Acquire):
            with self._lock:
                self._added_events += len(action.events)
        if isinstance(action, Stop):
            self.stopped_reason = action.reason or "stop"
        frame = getattr(rule_input, "frame", None)
        row = self.table.add(
            rule=rule.name,
            status="enqueued",
            decided_at=time.time(),
            latency_s=(time.monotonic() - frame.ready_at) if isinstance(frame, FrameInfo) else None,
            **fields,
        )
        log.info(
            "action %d: %s from rule %s for frame %s cell %s (%s)",
            row,
            action.kind,
            rule.name,
            where,
            fields.get("cell"),
            getattr(action, "reason", ""),
        )
        self.actuator.submit(Ticket(id=row, action=action, report=self._reporter(row, action)))
        return True

    def _reporter(self, row: int, action: Action) -> Callable[[Outcome], None]:
        def report(outcome: Outcome) -> None:
            if isinstance(action, Acquire) and outcome.status in ("skipped", "failed"):
                with self._lock:  # events that never ran were not added to the acquisition
                    self._added_events -= len(action.events)
            x, y, z = outcome.stage_xyz or (None, None, None)
            self.table.update(
                row,
                status=outcome.status,
                detail=outcome.detail or None,
                ran_at=outcome.wall,
                ran_x_um=x,
                ran_y_um=y,
                ran_z_um=z,
            )

        return report


def _pixel_size(info: FrameInfo | None) -> float | None:
    return info.pixel_size_um if info is not None else None
