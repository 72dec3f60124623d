"""End to end, for real: pymmcore-plus's MDA runner on the virtual microscope streams to the Serve app (the
bundled cellsam-nano model), a feedback rule adds ``MDAEvent``s for the cells the service found, and they
run in the same MDA at those cells' stage positions; the action table in the store says so.

Why the virtual microscope: pymmcore-plus's demo camera is Micro-Manager's C++ ``DemoCamera``, which needs
a Micro-Manager installation (not on these machines), and its test pattern has no cells anyway. The virtual
microscope is pymmcore-plus's real engine with a pure-Python camera that images a synthetic slide at the
stage position (``acquisition.virtual_microscope``), so a wrong stage mapping images the wrong place.
One service for the module (Ray takes 30-60 s to start here).
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from acquisition.action_table import read_actions
from acquisition.actuators import PymmcorePlusActuator
from acquisition.adapters import PymmcorePlusForwarder
from acquisition.client import FrameSender
from acquisition.feedback import AcquireNewCells, FeedbackLimits, FeedbackLoop, ImageOrientation
from acquisition.virtual_microscope import VirtualSlide, virtual_core
from tests.feedback_util import visible_centre

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
useq = pytest.importorskip("useq")
pytest.importorskip("pymmcore_plus.experimental.unicore")

ACQ = "feedback-e2e"
SENSOR = (256, 256)
MOUNT = ((-1.0, 0.0), (0.0, 1.0))  # camera mirrored in x: image columns run to -x, rows to +y


def _true_cells_under_model_cell(
    slide: VirtualSlide, stage: tuple[float, float], centroid_yx: tuple[float, float]
) -> list[int]:
    """Ground-truth labels making up the model's cell with this centroid in the camera image at ``stage``
    (each covering at least a fifth of it): the service's own segmentation, redone here on the same view."""
    from cellsam_core import load_bundled_model, segment

    view = slide.view(
        *stage, sensor_shape=SENSOR, pixel_size_um=slide.pixel_size_um, col_dir=MOUNT[0], row_dir=MOUNT[1]
    )
    seg = segment(view, load_bundled_model())
    cols = seg.cells.columns()
    nearest = int(
        np.argmin(np.hypot(cols["centroid_y"] - centroid_yx[0], cols["centroid_x"] - centroid_yx[1]))
    )
    rr, cc = np.nonzero(seg.labels == cols["label"][nearest])
    x = stage[0] - (cc - (SENSOR[1] - 1) / 2) * slide.pixel_size_um  # mirrored in x
    y = stage[1] + (rr - (SENSOR[0] - 1) / 2) * slide.pixel_size_um
    truth, counts = np.unique([slide.label_at(a, b) for a, b in zip(x, y, strict=True)], return_counts=True)
    return [int(t) for t, n in zip(truth, counts, strict=True) if t > 0 and n >= 0.2 * rr.size]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from cellsam_core.checkpoint import BUNDLED_WEIGHTS
    from serving.config import ServiceConfig
    from serving.runner import free_port, start_service

    output = tmp_path_factory.mktemp("feedback-e2e") / "out"
    config = ServiceConfig.model_validate(
        {
            "model": {"weights": str(BUNDLED_WEIGHTS)},
            "ingest": {"endpoint": "tcp://127.0.0.1:*", "max_concurrent": 2},
            "results": {"endpoint": "tcp://127.0.0.1:*"},
            "output": {"directory": str(output)},
            "metrics": {"port": 0},
        }
    )
    running = start_service(config, http_port=free_port())
    running.output = output  # type: ignore[attr-defined]
    yield running
    running.stop()


def test_rule_adds_events_for_detected_cells_and_they_run_at_those_cells(service) -> None:
    slide = VirtualSlide.synthetic((640, 640), n_cells=90, seed=5, pixel_size_um=0.5)
    # The camera is mounted mirrored in x (image columns run to -x), as on many inverted stands.
    core = virtual_core(slide, sensor_shape=SENSOR, col_dir=MOUNT[0], row_dir=MOUNT[1])
    plan = useq.MDASequence(
        time_plan={"interval": 1.0, "loops": 2}, stage_positions=[(80.0, 80.0), (230.0, 200.0)]
    )
    rule = AcquireNewCells(first_frame=True, max_per_frame=2, exposure_ms=20)
    with FrameSender(endpoint=service.ingest, timeout=60) as sender:
        forwarder = PymmcorePlusForwarder(sender, acquisition=ACQ, core=core)
        actuator = PymmcorePlusActuator(core.mda, plan, forwarder=forwarder, linger_s=300).connect()
        loop = FeedbackLoop(
            actuator, acquisition=ACQ, rules=[rule], results=service.results, output=str(service.output),
            orientation=ImageOrientation(flip_x=True),
            # This 2-core CPU segments a frame in seconds while Ray shares it: allow old results.
            limits=FeedbackLimits(max_added_events=8, max_result_age_s=300),
        )  # fmt: skip
        with loop:
            core.mda.run(actuator)
            summary = loop.wait_summary(300)
    assert summary is not None and summary.frames_ok == 4 and summary.frames_received == 4
    assert forwarder.frames_forwarded == 4  # the added events' frames stayed on the microscope side

    snaps = core.virtual_camera.snaps  # stage position of every image the camera took
    rows = loop.table.rows()
    # Static sample: the cells of each position's first frame are new, nothing after that.
    assert sorted((r["t"], r["p"]) for r in rows) == [(0, 0), (0, 0), (0, 1), (0, 1)]
    assert {(r["kind"], r["status"], r["n_events"], r["exposure_ms"]) for r in rows} == {
        ("acquire", "ran", 1, 20.0)
    }
    assert len(snaps) == 4 + 4 and actuator.added_run == 4
    for row in rows:
        target = (row["target_x_um"], row["target_y_um"])
        assert (row["ran_x_um"], row["ran_y_um"]) == pytest.approx(target)
        assert any(s == pytest.approx(target) for s in snaps)  # an image was taken there
        # The target is the published centroid mapped through the mirrored camera, worked out here by hand:
        # x runs against the image columns, y with the rows, the stage position at the image centre.
        sx, sy = plan.stage_positions[row["p"]].x, plan.stage_positions[row["p"]].y
        expected = (sx - (row["cell_x"] - 127.5) * 0.5, sy + (row["cell_y"] - 127.5) * 0.5)
        assert target == pytest.approx(expected)
        # ... and it is a cell on the slide: ground truth under the target, within 3 pixels of the centre of
        # the part of the true cell(s) that the model's cell covers, as the camera saw them (the outline
        # differs a little from the ground truth; a "largest first" rule prefers any touching pair the model
        # took for one cell, whose centre then lies between the two).
        assert slide.label_at(*target) > 0, f"action {row['id']} points at background"
        covered = _true_cells_under_model_cell(slide, (sx, sy), (row["cell_y"], row["cell_x"]))
        cx, cy = visible_centre(slide, covered, (sx, sy), MOUNT, SENSOR)
        assert np.hypot(cx - target[0], cy - target[1]) < 3 * slide.pixel_size_um, (cx, cy, target, covered)
        assert row["latency_s"] > 0 and row["frame_ready_at"] <= row["decided_at"] <= row["ran_at"]

    # The action table in the store is the loop's table (the labels are there too: the summary comes only
    # once every frame is written).
    store = service.output / f"{ACQ}.ome.zarr"
    assert read_actions(store) == loop.table.columns()
    assert zarr.open_group(store, mode="r")["cellsam/actions"].attrs["cellsam"]["rows"] == 4
