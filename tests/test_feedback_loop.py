"""The feedback loop (``acquisition.feedback``): rules in, gated actions out, every decision recorded.

Results come from a real ``ResultPublisher`` over ZeroMQ where the thread path matters, else straight into
``FeedbackLoop.handle``; the actuator is the recording one, with frames recorded as pymmcore-plus would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from acquisition.actuators import RecordingActuator
from acquisition.feedback import (
    Acquire,
    AcquireNewCells,
    Callback,
    FeedbackLimits,
    FeedbackLoop,
    FrameInput,
    IntervalWhenCount,
    RuleInput,
    SetInterval,
    Stop,
    StopWhenConfluent,
)
from acquisition.feedback_errors import InvalidActionError
from acquisition.feedback_types import FrameInfo, Outcome
from acquisition.protocol import AcquisitionSummary, FrameResult, Index
from acquisition.publisher import ResultPublisher
from cellsam_core.cells import CellTable

pytestmark = pytest.mark.timeout(60)
useq = pytest.importorskip("useq")

ACQ = "fb"
SHAPE = (64, 64)


def _labels(*boxes: tuple[int, int, int, int]) -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint32)
    for i, (y0, x0, y1, x1) in enumerate(boxes, start=1):
        labels[y0:y1, x0:x1] = i
    return labels


def _result(t: int = 0, p: int = 0, labels: np.ndarray | None = None, status: str = "ok") -> FrameResult:
    cells = CellTable.from_labels(_labels((10, 10, 20, 20), (40, 30, 50, 44)) if labels is None else labels)
    return FrameResult(
        acquisition=ACQ, index=Index(t=t, p=p), status=status, n_cells=len(cells),  # type: ignore[arg-type]
        cells=FrameResult.cell_columns(cells), timestamp=time.time(),
        latency={"queue": 0.001, "encode": 0.05, "dispatch": 0.002, "decode": 0.01, "end_to_end": 0.07},
    )  # fmt: skip


def _info(t: int = 0, p: int = 0, *, age: float = 0.0, x: float = 1000.0, y: float = 500.0) -> FrameInfo:
    return FrameInfo(
        key=(t, p, 0), event=useq.MDAEvent(index={"t": t, "p": p}, x_pos=x, y_pos=y), stage_x_um=x,
        stage_y_um=y, stage_z_um=10.0, pixel_size_um=0.5, frame_shape=SHAPE, ready_at=time.monotonic() - age,
        ready_wall=time.time() - age,
    )  # fmt: skip


def _loop(actuator: RecordingActuator, rules: list[Any] = (), **kwargs: Any) -> FeedbackLoop:  # type: ignore[assignment]
    return FeedbackLoop(actuator, acquisition=ACQ, rules=rules, **kwargs)


def _feed(loop: FeedbackLoop, actuator: RecordingActuator, t: int = 0, p: int = 0, **kwargs: Any) -> None:
    actuator.record(_info(t, p, age=kwargs.pop("age", 0.0)))
    loop.handle(_result(t, p, **kwargs))


def acquire_first_cell(frame: FrameInput) -> Acquire | None:
    return (
        frame.acquire_cell(0, channel="GFP", exposure_ms=30, reason="first cell") if frame.n_cells else None
    )


# -- the happy path ---------------------------------------------------------------------------------------


def test_results_over_zeromq_become_actions_with_their_provenance(tmp_path) -> None:
    actuator = RecordingActuator(outcome=None)
    with ResultPublisher(endpoint="tcp://127.0.0.1:*") as publisher:
        loop = _loop(actuator, [acquire_first_cell], results=publisher.endpoint)
        with loop:
            for t in range(3):
                actuator.record(_info(t))
                publisher.publish_result(_result(t))
            publisher.publish_summary(AcquisitionSummary(acquisition=ACQ, frames_ok=3))
            assert loop.wait_summary(10) is not None
    assert [a.kind for a in actuator.actions] == ["acquire"] * 3
    assert actuator.processed_keys == [(0, 0, 0), (1, 0, 0), (2, 0, 0)]
    rows = loop.table.rows()
    assert [(r["id"], r["t"], r["status"], r["rule"]) for r in rows] == [
        (1, 0, "enqueued", "acquire_first_cell"),
        (2, 1, "enqueued", "acquire_first_cell"),
        (3, 2, "enqueued", "acquire_first_cell"),
    ]
    row = rows[0]
    # Cell 1 spans rows 10..19, columns 10..19: centroid (14.5, 14.5); the frame centre is (31.5, 31.5), so
    # the cell is 17 pixels up and left of it, 8.5 µm at 0.5 µm per pixel.
    assert (row["cell"], row["cell_y"], row["cell_x"]) == (1, 14.5, 14.5)
    assert (row["target_x_um"], row["target_y_um"], row["target_z_um"]) == pytest.approx((991.5, 491.5, 10.0))
    assert (row["channel"], row["exposure_ms"], row["n_events"], row["reason"]) == (
        "GFP",
        30.0,
        1,
        "first cell",
    )
    assert row["latency_s"] >= 0 and row["decided_at"] >= row["frame_ready_at"]
    timing = loop.timings[0]
    assert timing.ready_at is not None and timing.first_enqueued_at is not None and timing.done_at is not None
    assert timing.ready_at <= timing.received_at <= timing.first_enqueued_at <= timing.done_at
    assert timing.service_latency["end_to_end"] == 0.07


def test_outcomes_reported_by_the_actuator_update_the_row() -> None:
    actuator = RecordingActuator(outcome=None)
    loop = _loop(actuator, [acquire_first_cell])
    _feed(loop, actuator)
    (ticket,) = actuator.tickets
    ticket.report(Outcome("ran", stage_xyz=(991.4, 491.6, 10.0), wall=123.0))
    row = loop.table.rows()[0]
    assert (row["status"], row["ran_at"], row["ran_x_um"], row["ran_y_um"]) == ("ran", 123.0, 991.4, 491.6)


def test_failed_results_run_no_rule_but_count_as_processed() -> None:
    actuator = RecordingActuator()
    calls: list[Any] = []
    loop = _loop(actuator, [calls.append])
    loop.handle(_result(0, status="failed"))
    assert calls == [] and actuator.processed_keys == [(0, 0, 0)] and loop.table.rows() == []


# -- rules that misbehave ----------------------------------------------------------------------------------


def test_a_raising_rule_is_contained_recorded_and_disabled_after_errors_in_a_row() -> None:
    actuator = RecordingActuator()
    calls = {"n": 0}

    def flaky(frame: FrameInput) -> Stop | None:
        calls["n"] += 1
        raise ZeroDivisionError("boom")

    loop = _loop(actuator, [flaky, acquire_first_cell], limits=FeedbackLimits(max_rule_errors=3, burst=100))
    for t in range(5):
        _feed(loop, actuator, t)
    assert calls["n"] == 3 and loop.disabled_rules == ["flaky"] and loop.rule_errors["flaky"] == 3
    errors = [r for r in loop.table.rows() if r["status"] == "rule_error"]
    assert [r["t"] for r in errors] == [0, 1, 2] and errors[0]["detail"] == "ZeroDivisionError: boom"
    assert errors[-1]["detail"].endswith("(rule disabled)") and errors[0]["kind"] is None
    assert len(actuator.tickets) == 5  # the other rule kept going


@dataclass(frozen=True)
class BadReturn:
    name: str
    value: Any


@pytest.mark.parametrize(
    "case",
    [
        BadReturn("a number", 3),
        BadReturn("a string", "stop"),
        BadReturn("a list with a non-action", [SetInterval(1.0), "x"]),
        BadReturn("a dict", {"kind": "stop"}),
    ],
    ids=lambda c: c.name,
)
def test_what_is_not_an_action_is_a_rule_error(case: BadReturn) -> None:
    actuator = RecordingActuator()
    loop = _loop(actuator, [lambda frame: case.value])
    _feed(loop, actuator)
    assert actuator.tickets == []  # nothing of a bad answer is enqueued, not even its valid actions
    (row,) = loop.table.rows()
    assert row["status"] == "rule_error" and "InvalidActionError" in row["detail"]


def test_actions_validate_their_values() -> None:
    with pytest.raises(InvalidActionError):
        SetInterval(-1)
    with pytest.raises(InvalidActionError):
        Acquire()
    with pytest.raises(InvalidActionError):
        Acquire({"x_pos": 1})  # type: ignore[arg-type]
    with pytest.raises(InvalidActionError):
        Callback(fn=3, name="x")  # type: ignore[arg-type]


# -- safety ------------------------------------------------------------------------------------------------


def test_a_stale_result_triggers_no_action() -> None:
    actuator = RecordingActuator()
    loop = _loop(
        actuator, [acquire_first_cell, lambda f: Stop("late")], limits=FeedbackLimits(max_result_age_s=2)
    )
    _feed(loop, actuator, 0, age=5.0)
    assert actuator.tickets == [] and loop.stopped_reason is None
    rows = loop.table.rows()
    assert [(r["kind"], r["status"], r["detail"]) for r in rows] == [
        ("acquire", "dropped", "stale"),
        ("stop", "dropped", "stale"),
    ]
    assert rows[0]["result_age_s"] == pytest.approx(5.0, abs=0.5)
    _feed(loop, actuator, 1, age=0.1)  # a fresh result acts
    assert [a.kind for a in actuator.actions] == ["acquire", "stop"]


def test_results_of_frames_the_microscope_did_not_record_age_from_the_service_receipt() -> None:
    actuator = RecordingActuator(outcome=None)
    loop = _loop(actuator, [lambda f: SetInterval(3.0)], limits=FeedbackLimits(max_result_age_s=2))
    old = _result(0).model_copy(update={"timestamp": time.time() - 10})
    loop.handle(old)
    assert loop.table.rows()[0]["detail"] == "stale"
    loop.handle(_result(1))
    assert loop.table.rows()[1]["status"] == "enqueued"


def test_rate_limit_with_burst_never_limits_stop() -> None:
    actuator = RecordingActuator(outcome=None)

    def many(frame: FrameInput) -> list[Any]:
        return [Callback(fn=lambda: None, name=f"c{i}") for i in range(5)] + [Stop("enough")]

    loop = _loop(actuator, [many], limits=FeedbackLimits(burst=3, max_actions_per_s=0.001))
    _feed(loop, actuator)
    statuses = [(r["kind"], r["status"], r["detail"]) for r in loop.table.rows()]
    assert statuses[:3] == [("callback", "enqueued", None)] * 3
    assert statuses[3:5] == [("callback", "dropped", "rate_limit")] * 2
    assert statuses[5] == ("stop", "enqueued", None)
    assert loop.stopped_reason == "enough"
    _feed(loop, actuator, 1)  # after a stop, nothing else is enqueued
    assert {r["detail"] for r in loop.table.rows()[6:]} == {"stopped"}


def test_the_added_event_cap_is_per_acquisition_atomic_and_survives_a_restart(tmp_path) -> None:
    from acquisition.spec import AcquisitionSpec
    from acquisition.zarr_sink import ZarrLabelSink

    ZarrLabelSink(tmp_path).open_acquisition(AcquisitionSpec(acquisition=ACQ, frame_shape=SHAPE))

    def stack(frame: FrameInput) -> Acquire:
        return frame.acquire_cell(0, z_offsets_um=(-1, 0, 1))

    limits = FeedbackLimits(max_added_events=4, burst=100)
    actuator = RecordingActuator(outcome=None)
    loop = _loop(actuator, [stack], limits=limits, output=str(tmp_path))
    _feed(loop, actuator, 0)
    _feed(loop, actuator, 1)  # 3 + 3 > 4: the whole stack is dropped, not 1 of its 3 events added
    assert loop.added_events == 3
    assert [(r["status"], r["detail"], r["n_events"]) for r in loop.table.rows()] == [
        ("enqueued", None, 3),
        ("dropped", "max_added_events", 3),
    ]
    assert loop.close()
    restarted = _loop(RecordingActuator(), [stack], limits=limits, output=str(tmp_path))
    assert restarted.table.next_id == 3 and restarted.added_events == 3  # rebuilt from the store
    # Events that were skipped (the run ended first) give their room back.
    actuator.tickets[0].report(Outcome("skipped", detail="ended"))
    assert loop.added_events == 0


def test_the_cap_counts_stored_events_that_ran(tmp_path) -> None:
    from acquisition.spec import AcquisitionSpec
    from acquisition.zarr_sink import ZarrLabelSink

    ZarrLabelSink(tmp_path).open_acquisition(AcquisitionSpec(acquisition=ACQ, frame_shape=SHAPE))
    actuator = RecordingActuator(outcome="ran")
    loop = _loop(
        actuator, [acquire_first_cell], limits=FeedbackLimits(max_added_events=2), output=str(tmp_path)
    )
    _feed(loop, actuator, 0)
    assert loop.close()
    again = _loop(
        RecordingActuator(outcome="ran"),
        [acquire_first_cell],
        limits=FeedbackLimits(max_added_events=2),
        output=str(tmp_path),
    )
    assert again.added_events == 1
    _feed(again, again.actuator, 1)  # type: ignore[arg-type]
    _feed(again, again.actuator, 2)  # type: ignore[arg-type]
    assert [r["status"] for r in again.table.rows()] == ["ran", "ran", "dropped"]


def test_targets_outside_the_stage_limits_are_dropped() -> None:
    actuator = RecordingActuator()
    limits = FeedbackLimits(stage_limits_um=((0.0, 995.0), (0.0, 1000.0)))
    loop = _loop(actuator, [lambda f: [f.acquire_cell(0), f.acquire_cell(1)]], limits=limits)
    _feed(loop, actuator)  # cell 0 maps to x = 991.5 (inside), cell 1 to x = 1002.5 (outside)
    assert [(r["cell"], r["status"], r["detail"]) for r in loop.table.rows()] == [
        (1, "skipped", "dry run"),
        (2, "dropped", "outside_stage_limits"),
    ]


def test_limits_are_validated_and_load_from_yaml(tmp_path) -> None:
    path = tmp_path / "limits.yaml"
    path.write_text("max_added_events: 7\nstage_limits_um: [[0, 10], [-5, 5]]\n")
    limits = FeedbackLimits.from_file(str(path))
    assert limits.max_added_events == 7 and limits.stage_limits_um == ((0, 10), (-5, 5))
    with pytest.raises(ValueError):
        FeedbackLimits(max_actions_per_s=0)
    with pytest.raises(ValueError):
        FeedbackLimits(max_added=3)  # type: ignore[call-arg]


# -- rule inputs -------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TrackInput(RuleInput):
    """Stands in for the track events tracking will publish."""

    event: str


def test_rules_only_see_the_input_types_they_take() -> None:
    actuator = RecordingActuator()
    frames: list[Any] = []
    tracks: list[Any] = []
    loop = _loop(actuator, [frames.append])
    loop.add_rule(lambda e: (tracks.append(e), SetInterval(9.0))[1], on=TrackInput, name="on_division")
    _feed(loop, actuator)
    loop.dispatch(TrackInput(acquisition=ACQ, received_at=time.monotonic(), event="division"))
    assert [type(f) for f in frames] == [FrameInput] and [t.event for t in tracks] == ["division"]
    (row,) = loop.table.rows()
    assert (row["rule"], row["kind"], row["interval_s"], row["t"]) == (
        "on_division",
        "set_interval",
        9.0,
        None,
    )


# -- built-in rules ----------------------------------------------------------------------------------------


def test_acquire_new_cells_takes_cells_with_no_neighbour_in_the_previous_frame() -> None:
    actuator = RecordingActuator()
    rule = AcquireNewCells(channel="GFP", exposure_ms=40, max_distance_px=5, max_per_frame=2)
    loop = _loop(actuator, [rule], limits=FeedbackLimits(burst=100))
    _feed(loop, actuator, 0)  # first frame: nothing is new unless first_frame=True
    moved = _labels((11, 12, 21, 22), (40, 30, 50, 44), (2, 50, 12, 60))  # 1 moved 2 px, 2 stayed, 3 is new
    _feed(loop, actuator, 1, labels=moved)
    (action,) = actuator.actions
    assert action.cell == 3 and action.event.channel.config == "GFP" and "new cell 3" in action.reason
    _feed(loop, actuator, 2, labels=moved)  # nothing new
    _feed(loop, actuator, 1, labels=_labels((30, 30, 34, 34)))  # an older frame arriving late: ignored
    assert len(actuator.actions) == 1
    crowd = _labels(*[(y, x, y + 4, x + 4) for y in (0, 20, 40) for x in (0, 20, 40)])
    _feed(loop, actuator, 0, p=1)
    _feed(loop, actuator, 1, p=1, labels=crowd)  # positions are independent; at most 2 per frame
    assert len(actuator.actions) == 3
    first = AcquireNewCells(first_frame=True, max_per_frame=10)
    loop2 = _loop(RecordingActuator(), [first])
    _feed(loop2, loop2.actuator)  # type: ignore[arg-type]
    assert sorted(a.cell for a in loop2.actuator.actions) == [1, 2]  # type: ignore[attr-defined]


def test_interval_when_count_fires_once_when_the_count_is_reached() -> None:
    actuator = RecordingActuator()
    loop = _loop(actuator, [IntervalWhenCount(threshold=3, interval_s=60)])
    _feed(loop, actuator, 0)  # 2 cells
    three = _labels((0, 0, 5, 5), (10, 10, 15, 15), (20, 20, 25, 25))
    _feed(loop, actuator, 1, labels=three)
    _feed(loop, actuator, 2, labels=three)
    (action,) = actuator.actions
    assert isinstance(action, SetInterval) and action.seconds == 60 and "3 cells ≥ 3 at t=1" in action.reason
    falling = IntervalWhenCount(threshold=2, interval_s=5, falling=True)
    assert falling(
        FrameInput(acquisition=ACQ, received_at=0, result=_result(), cells=_result().cell_table(), frame=None)
    )


def test_stop_when_confluent_needs_consecutive_covered_frames() -> None:
    actuator = RecordingActuator()
    loop = _loop(actuator, [StopWhenConfluent(fraction=0.5, frames=2)])
    full = _labels((0, 0, 64, 40))  # 62.5 % covered
    _feed(loop, actuator, 0, labels=full)
    _feed(loop, actuator, 1)
    _feed(loop, actuator, 2, labels=full)
    assert actuator.actions == []
    _feed(loop, actuator, 3, labels=full)
    (action,) = actuator.actions
    assert isinstance(action, Stop) and "confluence 0.62" in action.reason
