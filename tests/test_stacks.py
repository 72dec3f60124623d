"""Stacks: every plane of a z-stack / time-lapse / channel-first file segmented, labels keep the axes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import tifffile

from cellsam_core.checkpoint import load_bundled_model
from cellsam_core.errors import ImageFormatError
from cellsam_core.inference import segment
from cellsam_core.stacks import ZPolicy, label_axes, planes, segment_stack
from cellsam_core.synthetic import synthetic_frame

pytestmark = pytest.mark.timeout(300)


def _frames(n: int, shape: tuple[int, int] = (64, 80)) -> list[np.ndarray]:
    return [synthetic_frame(shape, seed=i, n_cells=6)[0] for i in range(n)]


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return load_bundled_model()


def test_a_z_stack_is_segmented_plane_by_plane(model) -> None:  # type: ignore[no-untyped-def]
    stack = np.stack(_frames(3))  # ZYX
    labels = segment_stack(stack, model, "ZYX")
    assert labels.shape == stack.shape and labels.dtype == np.uint32
    for z in range(3):
        np.testing.assert_array_equal(labels[z], segment(stack[z], model).labels)
    assert labels.max() > 0


def test_axes_are_kept_in_their_order_and_channels_go_together(model) -> None:  # type: ignore[no-untyped-def]
    nuclei = np.stack(_frames(2))  # ZYX
    membrane = np.stack(_frames(2, (64, 80))[::-1])
    image = np.stack([nuclei, membrane])  # CZYX
    xzyc = np.transpose(image, (3, 1, 2, 0))  # X, Z, Y, C
    labels = segment_stack(xzyc, model, "XZYC")
    assert label_axes("XZYC") == "XZY" and labels.shape == (80, 2, 64)
    for z in range(2):
        expected = segment(np.stack([nuclei[z], membrane[z]], axis=-1), model).labels
        np.testing.assert_array_equal(labels[:, z, :], expected.T)
    assert [index for index, _ in planes(xzyc, "XZYC")] == [(0,), (1,)]


@dataclass(frozen=True)
class BadAxes:
    name: str
    shape: tuple[int, ...]
    axes: str
    match: str


BAD_AXES = [
    BadAxes("too few letters", (2, 8, 8), "YX", "name 2 axes"),
    BadAxes("unknown letter", (2, 8, 8), "QYX", "at most once"),
    BadAxes("repeated letter", (2, 8, 8), "YYX", "at most once"),
    BadAxes("no X", (2, 8, 8), "ZYT", "Y and X"),
    BadAxes("too many channels", (5, 8, 8), "CYX", "at most 3"),
]


@pytest.mark.parametrize("case", BAD_AXES, ids=lambda c: c.name)
def test_bad_axes_say_what_is_wrong(case: BadAxes, model) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ImageFormatError, match=case.match):
        segment_stack(np.zeros(case.shape, np.uint16), model, case.axes)


def test_cli_segments_a_z_stack_with_axes_and_refuses_one_without(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    stack = np.stack(_frames(4))
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    cli = [sys.executable, "-m", "serving.cli", "segment", str(path)]
    refused = subprocess.run([*cli, "-o", str(tmp_path / "no.tif")], capture_output=True, text=True)
    assert refused.returncode != 0 and "--axes" in refused.stderr and "Traceback" not in refused.stderr
    out = tmp_path / "labels.tif"
    done = subprocess.run([*cli, "-o", str(out), "--axes", "ZYX"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    labels = tifffile.imread(out)
    assert labels.shape == stack.shape
    np.testing.assert_array_equal(labels[2], segment(stack[2], model).labels)


# -- z policies --------------------------------------------------------------------------------------


class Projection(NamedTuple):
    name: str
    policy: ZPolicy
    project: Callable[[np.ndarray], np.ndarray]  # (Z, ...) -> what one (T, P) is segmented as


PROJECTIONS = [
    Projection("max", ZPolicy(policy="max_projection"), lambda z_stack: z_stack.max(axis=0)),
    Projection("plane 2", ZPolicy(policy="plane", plane=2), lambda z_stack: z_stack[2]),
]


@pytest.mark.parametrize("case", PROJECTIONS, ids=[c.name for c in PROJECTIONS])
def test_a_projection_is_segmented_once_per_time_point_and_keeps_z(case: Projection, model) -> None:  # type: ignore[no-untyped-def]
    nuclei = np.stack([np.stack(_frames(3)), np.stack(_frames(3)[::-1])])  # T, Z, Y, X
    membrane = nuclei[:, ::-1] // 2
    image = np.stack([nuclei, membrane], axis=2)  # T, Z, C, Y, X
    done: list[tuple[int, ...]] = []
    labels = segment_stack(image, model, "TZCYX", z_policy=case.policy, on_plane=done.append)
    assert labels.shape == (2, 1, 64, 80) and done == [(0, 0), (1, 0)]
    for t in range(2):
        two_channels = np.stack([case.project(nuclei[t]), case.project(membrane[t])], axis=-1)
        np.testing.assert_array_equal(labels[t, 0], segment(two_channels, model).labels)
    assert labels.max() > 0


def test_a_projection_needs_a_z_axis_holding_the_chosen_plane(model) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ImageFormatError, match="have none"):
        segment_stack(np.zeros((2, 8, 8), np.uint16), model, "TYX", z_policy=ZPolicy.parse("max"))
    with pytest.raises(ImageFormatError, match="z plane 3 was chosen but the stack has 2"):
        segment_stack(np.zeros((2, 8, 8), np.uint16), model, "ZYX", z_policy=ZPolicy.parse("plane:3"))


def test_cli_segments_the_max_projection_of_a_z_stack(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    stack = np.stack(_frames(3))
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    cli = [sys.executable, "-m", "serving.cli", "segment", str(path), "--axes", "ZYX"]
    out = tmp_path / "labels.tif"
    done = subprocess.run([*cli, "-o", str(out), "--z-policy", "max"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    labels = tifffile.imread(out)
    assert labels.shape == (1, 64, 80)  # Z kept, with size 1
    np.testing.assert_array_equal(labels[0], segment(stack.max(axis=0), model).labels)
    bad = subprocess.run([*cli, "-o", str(out), "--z-policy", "mean"], capture_output=True, text=True)
    assert bad.returncode == 2 and "planes, max or plane:N" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_z_policy_needs_axes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from serving.cli import main

    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.stack(_frames(3)), photometric="minisblack")
    assert main(["segment", str(path), "-o", str(tmp_path / "l.tif"), "--z-policy", "max"]) == 1
    assert "--z-policy applies to a stack" in capsys.readouterr().err
