"""Pixel → stage mapping (``acquisition.stage``): hand-computed cases per orientation, the inverse, errors,
and the rule-side helpers that use it (``FrameInput.cell_stage_xy`` / ``acquire_cell``)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest

from acquisition.feedback_errors import StageMappingError
from acquisition.feedback_types import FrameInfo, FrameInput
from acquisition.protocol import FrameResult, Index
from acquisition.stage import ImageOrientation, StageXY, pixel_to_stage, stage_to_pixel
from cellsam_core.cells import CellTable

SHAPE = (11, 21)  # centre pixel (y, x) = (5, 10)
STAGE = (100.0, 200.0)
PIXEL = 0.5


@dataclass(frozen=True)
class Case:
    name: str
    orientation: ImageOrientation
    yx: tuple[float, float]
    expected: tuple[float, float]  # stage (x, y)


CASES = [
    Case("centre is the stage position", ImageOrientation(), (5, 10), (100.0, 200.0)),
    Case("10 columns right is +x", ImageOrientation(), (5, 20), (105.0, 200.0)),
    Case("4 rows down is +y", ImageOrientation(), (9, 10), (100.0, 202.0)),
    Case("up-left quadrant", ImageOrientation(), (1, 2), (96.0, 198.0)),
    Case("flip_x: columns run to -x", ImageOrientation(flip_x=True), (5, 20), (95.0, 200.0)),
    Case("flip_x leaves rows", ImageOrientation(flip_x=True), (9, 10), (100.0, 202.0)),
    Case("flip_y: rows run to -y", ImageOrientation(flip_y=True), (9, 10), (100.0, 198.0)),
    Case("transpose: columns run along y", ImageOrientation(transpose=True), (5, 20), (100.0, 205.0)),
    Case("transpose: rows run along x", ImageOrientation(transpose=True), (9, 10), (102.0, 200.0)),
    Case("transpose then flip_x", ImageOrientation(transpose=True, flip_x=True), (9, 10), (98.0, 200.0)),
    Case("transpose then flip_y", ImageOrientation(transpose=True, flip_y=True), (5, 20), (100.0, 195.0)),
    # Micro-Manager affine (a, b, tx, c, d, ty): x = a·col + b·row, y = c·col + d·row; tx/ty ignored.
    Case("affine, rotated 90°", ImageOrientation(affine=(0, 0.5, 7, -0.5, 0, 9)), (9, 10), (102.0, 200.0)),
    Case(
        "affine, rotated 90°, columns",
        ImageOrientation(affine=(0, 0.5, 7, -0.5, 0, 9)),
        (5, 20),
        (100.0, 195.0),
    ),
    Case(
        "affine scale wins over pixel size",
        ImageOrientation(affine=(2, 0, 0, 0, 2, 0)),
        (5, 11),
        (102.0, 200.0),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_pixel_to_stage(case: Case) -> None:
    got = pixel_to_stage(
        case.yx, frame_shape=SHAPE, stage_xy=STAGE, pixel_size_um=PIXEL, orientation=case.orientation
    )
    assert isinstance(got, StageXY)
    assert (got.x, got.y) == pytest.approx(case.expected)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_stage_to_pixel_inverts(case: Case) -> None:
    back = stage_to_pixel(
        StageXY(*case.expected),
        frame_shape=SHAPE,
        stage_xy=STAGE,
        pixel_size_um=PIXEL,
        orientation=case.orientation,
    )
    assert tuple(back) == pytest.approx(case.yx)


def test_even_sized_frames_are_centred_between_pixels() -> None:
    got = pixel_to_stage((4.5, 9.5), frame_shape=(10, 20), stage_xy=(0, 0), pixel_size_um=1.0)
    assert (got.x, got.y) == pytest.approx((0.0, 0.0))


@pytest.mark.parametrize(
    "orientation",
    [
        ImageOrientation(transpose=t, flip_x=fx, flip_y=fy)
        for t, fx, fy in itertools.product((False, True), repeat=3)
    ],
    ids=lambda o: f"t{int(o.transpose)}x{int(o.flip_x)}y{int(o.flip_y)}",
)
def test_many_points_round_trip_in_all_eight_orientations(orientation: ImageOrientation) -> None:
    rng = np.random.default_rng(0)
    yx = rng.uniform(-50, 300, size=(64, 2))
    xy = pixel_to_stage(
        yx, frame_shape=(256, 200), stage_xy=(-1234.5, 987.0), pixel_size_um=0.65, orientation=orientation
    )
    assert xy.x.shape == xy.y.shape == (64,)
    back = stage_to_pixel(
        xy, frame_shape=(256, 200), stage_xy=(-1234.5, 987.0), pixel_size_um=0.65, orientation=orientation
    )
    np.testing.assert_allclose(back, yx, atol=1e-9)
    # Distances are kept (every orientation is a rotation or reflection times the pixel size).
    np.testing.assert_allclose(np.hypot(xy.x - xy.x[0], xy.y - xy.y[0]), 0.65 * np.hypot(*(yx - yx[0]).T))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pixel_size_um": None}, "pixel size"),
        ({"pixel_size_um": 0.0}, "pixel size"),
        ({"stage_xy": (None, 3.0)}, "stage position"),
        ({"stage_xy": (float("nan"), 3.0)}, "stage position"),
        ({"frame_shape": (0, 10)}, "frame shape"),
        ({"yx": [[1, 2, 3]]}, r"\(y, x\)"),
    ],
)
def test_unmappable_inputs_raise_with_a_reason(kwargs: dict, match: str) -> None:
    args = {"yx": (1.0, 2.0), "frame_shape": SHAPE, "stage_xy": STAGE, "pixel_size_um": PIXEL, **kwargs}
    yx = args.pop("yx")
    with pytest.raises(StageMappingError, match=match):
        pixel_to_stage(yx, **args)


def test_singular_affine_is_refused() -> None:
    with pytest.raises(ValueError, match="invertible"):
        ImageOrientation(affine=(1, 2, 0, 2, 4, 0))
    with pytest.raises(ValueError):
        ImageOrientation(flip_x=True, rotate=90)  # type: ignore[call-arg]  # unknown settings are refused


# -- the rule-side helpers --------------------------------------------------------------------------------


def _frame_input(*, z: float | None = 5.0, orientation: ImageOrientation | None = None) -> FrameInput:
    labels = np.zeros((11, 21), np.uint32)
    labels[8:11, 18:21] = 1  # centroid (9, 19)
    labels[0:3, 0:3] = 2  # centroid (1, 1)
    cells = CellTable.from_labels(labels)
    result = FrameResult(
        acquisition="a", index=Index(t=3, p=1), n_cells=2, cells=FrameResult.cell_columns(cells)
    )
    info = FrameInfo(
        key=(3, 1, 0), event=None, stage_x_um=100.0, stage_y_um=200.0, stage_z_um=z, pixel_size_um=0.5,
        frame_shape=(11, 21), ready_at=0.0, ready_wall=0.0,
    )  # fmt: skip
    return FrameInput(
        acquisition="a", received_at=0.0, result=result, cells=result.cell_table(), frame=info,
        orientation=orientation or ImageOrientation(), pixel_size_um=0.5,
    )  # fmt: skip


def test_frame_input_maps_each_cell_and_builds_events_on_it() -> None:
    pytest.importorskip("useq")
    frame = _frame_input()
    assert frame.cell_stage_xy(0) == pytest.approx((104.5, 202.0))  # (9, 19): 9 columns right, 4 rows down
    xy = frame.stage_xy()
    assert xy.x == pytest.approx([104.5, 95.5]) and xy.y == pytest.approx([202.0, 198.0])
    action = frame.acquire_cell(0, channel="GFP", exposure_ms=50, reason="why")
    (event,) = action.events
    assert (event.x_pos, event.y_pos, event.z_pos) == pytest.approx((104.5, 202.0, 5.0))
    assert event.channel.config == "GFP" and event.exposure == 50
    assert action.cell == 1 and action.reason == "why"
    stack = frame.acquire_cell(1, z_offsets_um=(-1, 0, 1))
    assert [e.z_pos for e in stack.events] == [4.0, 5.0, 6.0]
    assert {(e.x_pos, e.y_pos) for e in stack.events} == {(95.5, 198.0)} and stack.cell == 2
    flipped = _frame_input(orientation=ImageOrientation(flip_x=True)).acquire_cell(0)
    assert (flipped.event.x_pos, flipped.event.y_pos) == pytest.approx((95.5, 202.0))


def test_frame_input_without_what_the_microscope_recorded_cannot_map() -> None:
    pytest.importorskip("useq")
    frame = _frame_input()
    unknown = FrameInput(acquisition="a", received_at=0.0, result=frame.result, cells=frame.cells, frame=None)
    with pytest.raises(StageMappingError, match="did not record"):
        unknown.acquire_cell(0)
    with pytest.raises(StageMappingError, match="z position"):
        _frame_input(z=None).acquire_cell(0, z_offsets_um=(0, 1))
    assert _frame_input(z=None).acquire_cell(0).event.z_pos is None  # no z-stack: z stays unset
