"""The pymmcore-plus actuator with pymmcore-plus's real MDA runner (``MDARunner.run(iterable)``) on the
virtual microscope (pure-Python camera imaging a synthetic slide, pure-Python XY stage), and a stand-in
service that publishes ground-truth results over ZeroMQ; and the pycromanager actuator against its
documented event API."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from acquisition.actuators import FEEDBACK_TAG, PycromanagerActuator, PymmcorePlusActuator, pycromanager_event
from acquisition.feedback import (
    AcquireNewCells,
    Callback,
    FeedbackLimits,
    FeedbackLoop,
    FrameInput,
    ImageOrientation,
    IntervalWhenCount,
    SetInterval,
    Stop,
)
from acquisition.feedback_types import Outcome, Ticket
from acquisition.publisher import ResultPublisher
from acquisition.virtual_microscope import VirtualSlide, virtual_core
from tests.feedback_util import GroundTruthService, visible_centre

pytestmark = pytest.mark.timeout(120)
useq = pytest.importorskip("useq")
pytest.importorskip("pymmcore_plus.experimental.unicore")

ACQ = "act"
SENSOR = (96, 128)


@pytest.fixture(scope="module")
def slide() -> VirtualSlide:
    return VirtualSlide.synthetic((384, 384), n_cells=40, seed=11, pixel_size_um=0.5, origin_um=(-50.0, 20.0))


@pytest.fixture
def publisher():
    with ResultPublisher(endpoint="tcp://127.0.0.1:*") as pub:
        yield pub


class Rig:
    """Virtual microscope + stand-in service + actuator + feedback loop, wired as a user would."""

    def __init__(
        self,
        slide: VirtualSlide,
        publisher: ResultPublisher,
        plan: Any,
        rules: list[Any],
        *,
        mount: tuple[tuple[float, float], tuple[float, float]] = ((1.0, 0.0), (0.0, 1.0)),
        orientation: ImageOrientation | None = None,
        delay_s: float = 0.05,
        linger_s: float = 5.0,
        limits: FeedbackLimits | None = None,
    ) -> None:
        self.core = virtual_core(slide, sensor_shape=SENSOR, col_dir=mount[0], row_dir=mount[1])
        self.service = GroundTruthService(
            slide, publisher, ACQ, sensor_shape=SENSOR, col_dir=mount[0], row_dir=mount[1], delay_s=delay_s
        )
        self.actuator = PymmcorePlusActuator(
            self.core.mda, plan, forwarder=self.service, linger_s=linger_s
        ).connect()
        self.loop = FeedbackLoop(
            self.actuator, acquisition=ACQ, rules=rules, results=publisher.endpoint,
            orientation=orientation, limits=limits or FeedbackLimits(burst=100),
        )  # fmt: skip
        self.frames: list[tuple[Any, float, float, float]] = []  # (event, x, y, monotonic) of every frame
        self.core.mda.events.frameReady.connect(self._frame)

    def _frame(self, img: np.ndarray, event: Any, meta: dict[str, Any]) -> None:
        self.frames.append((event, meta["position"]["x"], meta["position"]["y"], time.monotonic()))

    def run(self) -> float:
        with self.loop:
            began = time.monotonic()
            self.core.mda.run(self.actuator)
            took = time.monotonic() - began
            self.loop.wait_summary(10)
        return took

    def added(self) -> list[tuple[Any, float, float, float]]:
        return [f for f in self.frames if FEEDBACK_TAG in f[0].metadata]

    def planned(self) -> list[tuple[Any, float, float, float]]:
        return [f for f in self.frames if FEEDBACK_TAG not in f[0].metadata]


MOUNTS = {
    "straight": (((1.0, 0.0), (0.0, 1.0)), ImageOrientation()),
    "mirrored x": (((-1.0, 0.0), (0.0, 1.0)), ImageOrientation(flip_x=True)),
    "turned": (((0.0, 1.0), (-1.0, 0.0)), ImageOrientation(transpose=True, flip_x=True)),
}


@pytest.mark.parametrize("mount", list(MOUNTS), ids=list(MOUNTS))
def test_added_events_run_next_at_each_new_cells_stage_position(slide, publisher, mount) -> None:
    camera_mount, orientation = MOUNTS[mount]
    plan = useq.MDASequence(
        time_plan={"interval": 0.4, "loops": 3}, stage_positions=[(0.0, 60.0), (70.0, 110.0)]
    )
    rule = AcquireNewCells(first_frame=True, max_per_frame=2, exposure_ms=25)
    rig = Rig(slide, publisher, plan, [rule], mount=camera_mount, orientation=orientation)
    rig.run()
    planned, added = rig.planned(), rig.added()
    assert [dict(f[0].index) for f in planned] == [{"t": t, "p": p} for t in range(3) for p in range(2)]
    assert len(rig.service.frames) == 6 and rig.service.started == rig.service.finished == 1
    # 2 cells per position in the first frames, then nothing new (the slide does not change).
    rows = {r["id"]: r for r in rig.loop.table.rows()}  # results (hence ids) come in any order
    assert sorted((r["t"], r["p"], r["kind"], r["status"]) for r in rows.values()) == [
        (0, p, "acquire", "ran") for p in (0, 0, 1, 1)
    ]
    assert len(added) == 4 and rig.actuator.added_run == 4
    assert sorted(f[0].metadata[FEEDBACK_TAG] for f in added) == sorted(rows)
    for event, x, y, _ in added:
        row = rows[event.metadata[FEEDBACK_TAG]]
        assert event.exposure == 25
        # It ran where the table says it was sent, and that is the cell: the ground truth under the target
        # is a cell, and the target is the centre of that cell's part in the source frame, worked out here
        # from the camera's mounting alone (not with acquisition.stage).
        assert (x, y) == pytest.approx((row["target_x_um"], row["target_y_um"]))
        assert (row["ran_x_um"], row["ran_y_um"]) == pytest.approx((x, y))
        label = slide.label_at(x, y)
        assert label > 0, f"{mount}: added event {row['id']} points at background"
        source = plan.stage_positions[row["p"]]
        true_x, true_y = visible_centre(slide, label, (source.x, source.y), camera_mount, SENSOR)
        assert np.hypot(true_x - x, true_y - y) < 0.5 * slide.pixel_size_um
    # Added events run as soon as the current event is done: before the next planned time point.
    first_t1 = next(i for i, f in enumerate(rig.frames) if dict(f[0].index).get("t") == 1)
    assert all(rig.frames.index(f) < first_t1 for f in added)


def test_a_wrong_orientation_would_point_at_the_wrong_place(slide, publisher) -> None:
    """The same run with the camera mirrored but the loop told it is straight misses the cells: the test
    above would catch a sign error in the mapping."""
    plan = useq.MDASequence(stage_positions=[(0.0, 60.0)])
    rig = Rig(slide, publisher, plan, [AcquireNewCells(first_frame=True, max_per_frame=5)],
              mount=((-1.0, 0.0), (0.0, 1.0)), orientation=ImageOrientation())  # fmt: skip
    rig.run()
    rows = rig.loop.table.rows()
    assert rows and sum(slide.label_at(r["ran_x_um"], r["ran_y_um"]) > 0 for r in rows) < len(rows)


def test_set_interval_retimes_the_remaining_time_points(slide, publisher) -> None:
    plan = useq.MDASequence(time_plan={"interval": 3.0, "loops": 4}, stage_positions=[(0.0, 60.0)])
    rig = Rig(slide, publisher, plan, [IntervalWhenCount(threshold=1, interval_s=0.2)], delay_s=0.01)
    took = rig.run()
    (row,) = rig.loop.table.rows()
    assert (row["kind"], row["status"], row["interval_s"]) == ("set_interval", "ran", 0.2)
    starts = [f[3] for f in rig.planned()]
    assert len(starts) == 4 and took < 4.5  # planned: 9 s
    gaps = np.diff(starts)
    assert all(0.15 < g < 1.5 for g in gaps[1:]), gaps  # t1 may start at once if the result came late
    assert rig.actuator.interval_s == 0.2


def test_planned_timing_is_kept_without_feedback(slide, publisher) -> None:
    plan = useq.MDASequence(time_plan={"interval": 0.3, "loops": 3}, stage_positions=[(0.0, 60.0)])
    rig = Rig(slide, publisher, plan, [], linger_s=0.0)
    rig.run()
    gaps = np.diff([f[3] for f in rig.planned()])
    assert all(0.28 < g < 1.5 for g in gaps), gaps


def test_stop_ends_the_run_after_the_current_event(slide, publisher) -> None:
    plan = useq.MDASequence(time_plan={"interval": 0.3, "loops": 20}, stage_positions=[(0.0, 60.0)])

    def stop_then_acquire(frame: FrameInput) -> list[Any]:
        return [Stop(f"enough at t={frame.index.t}"), frame.acquire_cell(0)] if frame.index.t == 0 else []

    rig = Rig(slide, publisher, plan, [stop_then_acquire])
    took = rig.run()
    assert took < 3.0 and len(rig.planned()) <= 3 and rig.added() == []
    rows = rig.loop.table.rows()
    assert [(r["kind"], r["status"], r["detail"]) for r in rows] == [
        ("stop", "ran", None),
        ("acquire", "dropped", "stopped"),  # after a stop the loop enqueues nothing
    ]
    assert rig.actuator.stop_reason == "enough at t=0" and rig.service.finished == 1


def test_a_stop_skips_the_events_still_queued(slide) -> None:
    core = virtual_core(slide, sensor_shape=SENSOR)
    plan = useq.MDASequence(time_plan={"interval": 0.1, "loops": 5}, stage_positions=[(0.0, 60.0)])
    actuator = PymmcorePlusActuator(core.mda, plan).connect()
    outcomes: dict[int, Outcome] = {}
    event = useq.MDAEvent(x_pos=1.0, y_pos=2.0)
    from acquisition.feedback import Acquire

    for i, action in enumerate([Acquire(event, event), Callback(fn=lambda: None, name="c"), Stop("now")]):
        actuator.submit(Ticket(id=i, action=action, report=lambda o, i=i: outcomes.__setitem__(i, o)))
    actuator.run()  # the stop is queued before the first event: nothing runs
    assert core.virtual_camera.snaps == []
    assert [outcomes[i].status for i in range(3)] == ["skipped", "skipped", "ran"]
    assert outcomes[0].detail == "stopped before it ran"


def test_callbacks_run_on_the_acquisition_thread_between_events(slide, publisher) -> None:
    plan = useq.MDASequence(time_plan={"interval": 0.3, "loops": 2}, stage_positions=[(0.0, 60.0)])
    seen: list[tuple[str, Any]] = []

    def stimulate(frame: FrameInput) -> Callback | None:
        def fn() -> None:
            seen.append((threading.current_thread().name, rig.core.getXYPosition()))

        def broken() -> None:
            raise RuntimeError("laser off")

        if frame.index.t == 0:
            return [Callback(fn=fn, name="stimulate", cell=1), Callback(fn=broken, name="broken")]  # type: ignore[return-value]
        return None

    rig = Rig(slide, publisher, plan, [stimulate])
    runner_thread: list[str] = []
    rig.core.mda.events.eventStarted.connect(lambda e: runner_thread.append(threading.current_thread().name))
    rig.run()
    assert [s[0] for s in seen] == [runner_thread[0]]
    rows = rig.loop.table.rows()
    assert [(r["status"], r["detail"]) for r in rows] == [
        ("ran", None),
        ("failed", "RuntimeError: laser off"),
    ]
    assert rows[0]["reason"] == "stimulate" and rows[0]["cell"] == 1


def test_an_added_event_for_a_missing_channel_preset_is_refused_not_run(slide, publisher) -> None:
    plan = useq.MDASequence(stage_positions=[(0.0, 60.0)])
    rule = AcquireNewCells(first_frame=True, max_per_frame=1, channel="NoSuchPreset")
    rig = Rig(slide, publisher, plan, [rule])
    rig.run()
    (row,) = rig.loop.table.rows()
    assert row["status"] == "failed" and "channel preset 'NoSuchPreset'" in row["detail"]
    assert rig.added() == [] and rig.loop.added_events == 0


def test_the_last_frames_feedback_runs_before_the_acquisition_ends(slide, publisher) -> None:
    plan = useq.MDASequence(stage_positions=[(0.0, 60.0)])  # one frame; its result comes 0.6 s later
    rig = Rig(slide, publisher, plan, [AcquireNewCells(first_frame=True, max_per_frame=1)], delay_s=0.6)
    rig.run()
    assert len(rig.added()) == 1 and rig.loop.table.rows()[0]["status"] == "ran"


def test_cancel_is_honoured_while_waiting_for_the_next_time_point(slide, publisher) -> None:
    plan = useq.MDASequence(time_plan={"interval": 30, "loops": 3}, stage_positions=[(0.0, 60.0)])
    rig = Rig(slide, publisher, plan, [])
    rig.core.mda.events.frameReady.connect(lambda *a: threading.Timer(0.2, rig.core.mda.cancel).start())
    assert rig.run() < 5 and len(rig.planned()) == 1


def test_a_list_of_events_is_a_plan_too_and_late_submissions_are_skipped(slide, publisher) -> None:
    events = [useq.MDAEvent(index={"t": t}, x_pos=0.0, y_pos=60.0, min_start_time=0.1 * t) for t in range(2)]
    rig = Rig(slide, publisher, events, [], linger_s=0.0)
    rig.run()
    assert len(rig.planned()) == 2
    outcomes: list[Outcome] = []
    rig.actuator.submit(Ticket(id=1, action=SetInterval(1.0), report=outcomes.append))
    assert outcomes[0].status == "skipped"


def test_a_forwarder_connected_to_the_runner_itself_is_refused(slide) -> None:
    from acquisition.adapters import PymmcorePlusForwarder
    from acquisition.client import FrameSender
    from acquisition.feedback_errors import FeedbackError

    core = virtual_core(slide, sensor_shape=SENSOR)
    with FrameSender(endpoint="tcp://127.0.0.1:9", linger=0) as sender:
        forwarder = PymmcorePlusForwarder(sender, acquisition=ACQ).connect(core.mda)
        with pytest.raises(FeedbackError, match="disconnect"):
            PymmcorePlusActuator(core.mda, [], forwarder=forwarder).connect()
        forwarder.disconnect()
        PymmcorePlusActuator(core.mda, [], forwarder=forwarder).connect().disconnect()


# -- pycromanager -----------------------------------------------------------------------------------------


def test_pycromanager_events_follow_its_event_dict_format() -> None:
    event = useq.MDAEvent(
        x_pos=1.5, y_pos=-2.0, z_pos=3.0, exposure=20, channel={"config": "GFP", "group": "Ch"}
    )
    assert pycromanager_event(event, 7, 2) == {
        "axes": {FEEDBACK_TAG: 7, "cellsam_event": 2},
        "x": 1.5, "y": -2.0, "z": 3.0, "exposure": 20.0, "config_group": ["Ch", "GFP"],
    }  # fmt: skip
    assert pycromanager_event(useq.MDAEvent(), 1) == {"axes": {FEEDBACK_TAG: 1, "cellsam_event": 0}}


class FakeAcquisition:
    """The part of ``pycromanager.Acquisition`` the actuator uses: ``acquire(events)`` and ``abort()``."""

    def __init__(self) -> None:
        self.submitted: list[list[dict[str, Any]]] = []
        self.aborted = False

    def acquire(self, events: list[dict[str, Any]]) -> None:
        self.submitted.append(events)

    def abort(self) -> None:
        self.aborted = True


def test_pycromanager_actuator_records_frames_submits_and_reports() -> None:
    forwarded: list[dict[str, Any]] = []
    actuator = PycromanagerActuator(forwarder=lambda image, meta: (forwarded.append(meta), (image, meta))[1])
    acq = FakeAcquisition()
    actuator.bind(acq)
    image = np.zeros((4, 6), np.uint16)
    meta = {"Axes": {"time": 2, "position": 1}, "XPositionUm": "10.5", "YPositionUm": 3, "PixelSizeUm": 0.65}
    assert actuator.image_process_fn(image, meta)[0] is image
    info = actuator.frame_info((2, 1, 0))
    assert info is not None and (info.stage_x_um, info.stage_y_um, info.stage_z_um) == (10.5, 3.0, None)
    assert info.pixel_size_um == 0.65 and info.frame_shape == (4, 6) and forwarded == [meta]

    outcomes: dict[int, Outcome] = {}
    stack = (useq.MDAEvent(x_pos=1.0, y_pos=2.0, z_pos=0.0), useq.MDAEvent(x_pos=1.0, y_pos=2.0, z_pos=1.0))
    from acquisition.feedback import Acquire

    actuator.submit(Ticket(id=4, action=Acquire(*stack), report=lambda o: outcomes.__setitem__(4, o)))
    assert [e["z"] for e in acq.submitted[0]] == [0.0, 1.0] and 4 not in outcomes
    for n in range(2):  # its two images arrive: it ran, where the stage was, and they are not forwarded
        added = {"Axes": {FEEDBACK_TAG: 4, "cellsam_event": n}, "XPositionUm": 1.0, "YPositionUm": 2.0}
        actuator.image_process_fn(image, added)
    assert outcomes[4].status == "ran" and outcomes[4].stage_xyz == (1.0, 2.0, None) and len(forwarded) == 1
    actuator.submit(Ticket(id=5, action=SetInterval(2.0), report=lambda o: outcomes.__setitem__(5, o)))
    assert outcomes[5].status == "failed"
    actuator.submit(Ticket(id=6, action=Stop("done"), report=lambda o: outcomes.__setitem__(6, o)))
    assert outcomes[6].status == "ran" and acq.aborted
    unbound = PycromanagerActuator()
    unbound.submit(Ticket(id=7, action=Stop("x"), report=lambda o: outcomes.__setitem__(7, o)))
    assert outcomes[7].status == "failed" and "bind" in outcomes[7].detail
