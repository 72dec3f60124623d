"""The z policy in the pipeline: every z plane, the max projection or a chosen plane of each (t, p).

The pipeline runs over in-memory seams (`tests.test_pipeline.Rig`); a real pymmcore-plus MDA through the
ZeroMQ listener into a Zarr store is in `tests/test_acquisitions.py`, the store's readers in
`tests/test_store_readers.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest
from pydantic import ValidationError

from acquisition.frames import FrameId
from acquisition.protocol import (
    Channels,
    EndMessage,
    FrameResult,
    Index,
    ResultIndex,
    StartMessage,
    dump_json,
)
from acquisition.spec import AcquisitionSpec, Sizes
from acquisition.wire import encode_control
from cellsam_core.stacks import ZPolicy
from cellsam_core.synthetic import synthetic_frame
from serving.assembly import model_input
from serving.config import ServiceConfig
from tests.acq_util import until, untracked
from tests.test_pipeline import FakeSegmenter, RecordingSegmenter, Rig, _config, _frame_parts, run

pytestmark = pytest.mark.timeout(120)

SHAPE = (48, 64)
T, P, Z, C = 2, 2, 3, 2
ROLES = Channels(names=("H2B", "membrane"), roles=("nuclear", "whole_cell"))
DECLARATION: dict[str, Any] = {
    "sizes": {"t": T, "p": P, "z": Z, "c": C},
    "channels": ROLES.model_dump(),
    "z_step_um": 2.0,
}


def plane(t: int, p: int, z: int, c: int) -> np.ndarray:
    """uint16 (H, W): cells of channel ``c`` at (t, p, z); planes differ, so a projection is none of them."""
    modality = "nuclear" if c == 0 else "whole_cell"
    return synthetic_frame(SHAPE, seed=1000 * t + 100 * p + 10 * z + c, n_cells=5, modality=modality)[0]


def stack(t: int, p: int) -> np.ndarray:
    """(Z, H, W, C): every plane and channel of (t, p)."""
    return np.stack([np.stack([plane(t, p, z, c) for c in range(C)], axis=-1) for z in range(Z)])


def config(z: dict[str, Any], **assembly: Any) -> ServiceConfig:
    data = _config().model_dump() | {"z": z}
    if assembly:
        data["assembly"] = data["assembly"] | assembly
    return ServiceConfig.model_validate(data)


async def send_plane(rig: Rig, acquisition: str, t: int, p: int, z: int, *, buffers: bool) -> None:
    """(t, p, z) as one (H, W, C) buffer, or as one frame per channel (last channel first)."""
    if buffers:
        await rig.source.push(_frame_parts(acquisition, stack(t, p)[z], t=t, p=p, z=z))
        return
    for c in reversed(range(C)):
        await rig.source.push(_frame_parts(acquisition, plane(t, p, z, c), t=t, p=p, z=z, c=c))


class ProjectionCase(NamedTuple):
    name: str
    z: dict[str, Any]
    project: Callable[[np.ndarray], np.ndarray]  # (Z, H, W, C) -> (H, W, C): what the model must get
    buffers: bool  # planes sent as (H, W, C) buffers rather than one frame per channel


PROJECTIONS = [
    ProjectionCase(
        "max projection, per-channel frames", {"policy": "max_projection"}, lambda s: s.max(0), False
    ),
    ProjectionCase("chosen plane, (H, W, C) buffers", {"policy": "plane", "plane": 1}, lambda s: s[1], True),
]


@pytest.mark.parametrize("case", PROJECTIONS, ids=[c.name for c in PROJECTIONS])
def test_a_projection_is_segmented_once_per_stack_and_every_plane_is_stored(case: ProjectionCase) -> None:
    segmenter = RecordingSegmenter()
    rig = Rig(segmenter, config=config(case.z))

    async def scenario() -> Any:
        await rig.pipeline.start()
        await rig.source.push(encode_control(StartMessage(acquisition="zs", **DECLARATION)))
        for t in range(T):
            for z in reversed(range(Z)):  # planes in any order, stacks of both positions interleaved
                for p in range(P):
                    await send_plane(rig, "zs", t, p, z, buffers=case.buffers)
        await rig.source.push(encode_control(EndMessage(acquisition="zs")))
        summary = await rig.summary("zs")
        await rig.pipeline.stop()
        return summary

    summary = run(scenario())
    frames = T * P * Z * (1 if case.buffers else C)
    assert (summary.frames_received, summary.frames_ok, summary.frames_failed) == (frames, frames, 0)
    assert len(segmenter.inputs) == T * P  # once per (t, p), not per plane
    results = rig.results.for_acquisition("zs")
    # One result per (t, p); its index names the whole stack (z and c null), and it is valid on the wire.
    assert sorted((r.index.t, r.index.p) for r in results if r.index) == [
        (t, p) for t in range(T) for p in range(P)
    ]
    for result in results:
        assert result.status == "ok" and isinstance(result.index, ResultIndex)
        back = FrameResult.model_validate_json(dump_json(result))
        assert back.index == result.index and back.index is not None and back.index.z is None
    assert rig.labels.progress("zs").done == tuple(FrameId("zs", p, t, 0) for p in range(P) for t in range(T))
    for t in range(T):
        for p in range(P):
            projection = case.project(stack(t, p))
            model_in = model_input(projection, ROLES)
            assert any(np.array_equal(model_in, given) for given in segmenter.inputs)
            frame_id = FrameId("zs", p, t, 0)
            labels = rig.labels.read_labels(frame_id)
            np.testing.assert_array_equal(labels, FakeSegmenter.cells_of(model_in.max(axis=-1)).labels)
            # Every plane and channel stored raw, byte for byte: (C, Z, H, W).
            np.testing.assert_array_equal(rig.labels.read_image(frame_id), np.moveaxis(stack(t, p), -1, 0))
            # The cell table measures the image that was segmented.
            cells = rig.labels.read_cells(frame_id)
            assert len(cells) > 0
            for name, c in (("H2B", 0), ("membrane", 1)):
                for row, label in enumerate(cells.label):
                    expected = projection[..., c][labels == label].mean()
                    assert cells.measurements[f"intensity_mean_{name}"][row] == pytest.approx(expected)
            published = next(r for r in results if r.index and (r.index.t, r.index.p) == (t, p))
            assert published.cell_table().equals(untracked(cells))


def test_a_stack_missing_a_plane_fails_after_the_assembly_timeout_with_its_reason() -> None:
    rig = Rig(RecordingSegmenter(), config=config({"policy": "max_projection"}, timeout_s=0.2))

    def failed() -> list[FrameResult]:
        return [r for r in rig.results.for_acquisition("gap") if r.status == "failed"]

    async def scenario() -> Any:
        await rig.pipeline.start()
        await rig.source.push(encode_control(StartMessage(acquisition="gap", **DECLARATION)))
        for z in (0, 1):  # (t=0, p=0): plane 2 never comes
            await send_plane(rig, "gap", 0, 0, z, buffers=False)
        await until(lambda: len(failed()) == 2 * C, timeout=60)
        for z in range(Z):  # (t=0, p=1): every plane, but plane 1 without its membrane channel
            for c in range(C if z != 1 else 1):
                await rig.source.push(_frame_parts("gap", plane(0, 1, z, c), t=0, p=1, z=z, c=c))
        for z in range(Z):  # (t=1, p=0): complete
            await send_plane(rig, "gap", 1, 0, z, buffers=False)
        await until(lambda: len(failed()) == 2 * C + Z * C - 1, timeout=60)
        await rig.source.push(encode_control(EndMessage(acquisition="gap")))
        summary = await rig.summary("gap")
        await rig.pipeline.stop()
        return summary

    summary = run(scenario())
    failures = failed()
    # Every frame of an incomplete stack fails with its own index, once.
    stack_gap = [r for r in failures if r.reason == "incomplete_stack"]
    assert sorted((r.index.p, r.index.z, r.index.c) for r in stack_gap if isinstance(r.index, Index)) == [
        (0, z, c) for z in (0, 1) for c in range(C)
    ]
    assert all("z planes [2]" in (r.detail or "") and "0.2 s" in (r.detail or "") for r in stack_gap)
    channel_gap = [r for r in failures if r.reason == "incomplete_channels"]
    assert len(channel_gap) == Z * C - 1 and all(r.index and r.index.p == 1 for r in channel_gap)
    assert all("channels [1] of z plane 1" in (r.detail or "") for r in channel_gap)
    assert (summary.frames_received, summary.frames_ok, summary.frames_failed) == (
        3 * Z * C - 3,
        Z * C,
        2 * Z * C - 3,
    )
    assert rig.labels.progress("gap").done == (FrameId("gap", 0, 1, 0),)
    assert rig.pipeline.assembler.pending == 0


def test_a_chosen_plane_outside_the_stack_fails_every_frame_with_a_clear_reason() -> None:
    rig = Rig(RecordingSegmenter(), config=config({"policy": "plane", "plane": 5}))

    async def scenario() -> Any:
        await rig.pipeline.start()
        await rig.source.push(encode_control(StartMessage(acquisition="far", **DECLARATION)))
        for z in range(Z):
            await send_plane(rig, "far", 0, 0, z, buffers=True)
        await rig.source.push(encode_control(EndMessage(acquisition="far")))
        summary = await rig.summary("far")
        await rig.pipeline.stop()
        return summary

    summary = run(scenario())
    assert (summary.frames_received, summary.frames_failed) == (Z, Z)
    results = rig.results.for_acquisition("far")
    assert [(r.index.z if r.index else None, r.reason) for r in results] == [
        (z, "z_policy_conflict") for z in range(Z)
    ]
    assert "z.plane 5" in (results[0].detail or "") and "3 z planes" in (results[0].detail or "")


def test_an_acquisition_of_one_plane_is_segmented_as_it_is_under_a_projection_policy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No z size declared: the first frame fixes one plane; that plane is its own projection."""
    segmenter = RecordingSegmenter()
    rig = Rig(segmenter, config=config({"policy": "max_projection"}))
    image = stack(0, 0)[0]

    async def scenario() -> Any:
        await rig.pipeline.start()
        await rig.source.push(encode_control(StartMessage(acquisition="flat", sizes={"c": C})))
        await rig.source.push(_frame_parts("flat", image, t=0))
        await rig.source.push(_frame_parts("flat", image, t=0, z=1))  # beyond the one plane: rejected
        await rig.source.push(encode_control(EndMessage(acquisition="flat")))
        summary = await rig.summary("flat")
        await rig.pipeline.stop()
        return summary

    with caplog.at_level(logging.INFO, logger="serving.pipeline"):
        summary = run(scenario())
    assert (summary.frames_ok, summary.frames_rejected) == (1, 1)
    ok, rejected = sorted(rig.results.for_acquisition("flat"), key=lambda r: r.status)
    assert ok.status == "ok" and ok.index == Index(t=0, p=0, z=0)
    assert rejected.reason == "out_of_range"
    np.testing.assert_array_equal(rig.labels.read_image(FrameId("flat", 0, 0, 0)), np.moveaxis(image, -1, 0))
    assert any("1 z plane(s)" in m and "declare sizes.z" in m for m in caplog.messages)


# -- the policy value ------------------------------------------------------------------------------


class ParseCase(NamedTuple):
    text: str
    expected: ZPolicy | None  # None: refused


PARSE_CASES = [
    ParseCase("planes", ZPolicy()),
    ParseCase("max", ZPolicy(policy="max_projection")),
    ParseCase("MAX_PROJECTION", ZPolicy(policy="max_projection")),
    ParseCase("plane:0", ZPolicy(policy="plane", plane=0)),
    ParseCase(" plane:12 ", ZPolicy(policy="plane", plane=12)),
    ParseCase("plane", None),
    ParseCase("plane:-1", None),
    ParseCase("plane:x", None),
    ParseCase("max:2", None),
    ParseCase("mean", None),
]


@pytest.mark.parametrize("case", PARSE_CASES, ids=[c.text for c in PARSE_CASES])
def test_short_forms(case: ParseCase) -> None:
    if case.expected is None:
        with pytest.raises(ValueError, match="planes, max or plane:N"):
            ZPolicy.parse(case.text)
    else:
        assert ZPolicy.parse(case.text) == case.expected
        assert ZPolicy.parse(case.expected.describe()) == case.expected


@pytest.mark.parametrize(
    "bad", [{"policy": "plane"}, {"policy": "max_projection", "plane": 1}, {"policy": "mean"}, {"plane": -1}]
)
def test_inconsistent_policies_are_refused_in_the_config(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ServiceConfig.model_validate({"z": bad})


def test_a_spec_refuses_a_chosen_plane_outside_its_stack() -> None:
    with pytest.raises(ValidationError, match="plane 3 is outside the 3 z plane"):
        AcquisitionSpec(
            acquisition="x", sizes=Sizes(z=3), frame_shape=SHAPE, z_policy=ZPolicy(policy="plane", plane=3)
        )
    spec = AcquisitionSpec(
        acquisition="x", sizes=Sizes(z=3), frame_shape=SHAPE, z_policy=ZPolicy.parse("max")
    )
    assert spec.label_z == 1 and spec.model_copy(update={"z_policy": ZPolicy()}).label_z == 3


def test_the_store_spec_of_an_older_store_reads_as_every_plane() -> None:
    """Stores written before the z policy existed have no ``z_policy`` in their spec: every plane."""
    spec = AcquisitionSpec(acquisition="old", sizes=Sizes(z=2), frame_shape=SHAPE)
    stored = spec.model_dump(mode="json")
    del stored["z_policy"]
    assert AcquisitionSpec.model_validate(stored) == spec


def test_a_result_index_is_a_frame_index_or_a_whole_stack() -> None:
    frame = FrameResult.model_validate_json(b'{"acquisition": "a", "index": {"t": 1, "p": 2, "z": 0}}')
    whole = FrameResult.model_validate_json(b'{"acquisition": "a", "index": {"t": 1, "p": 2, "z": null}}')
    assert type(frame.index) is Index and type(whole.index) is ResultIndex
    with pytest.raises(ValidationError):  # a stack's index names no channel
        FrameResult.model_validate_json(b'{"acquisition": "a", "index": {"t": 1, "z": null, "c": 0}}')


def test_feedback_matches_a_stack_result_to_its_first_plane() -> None:
    from acquisition.feedback_types import frame_key

    assert frame_key(ResultIndex(t=2, p=1)) == (2, 1, 0)
    assert frame_key(Index(t=2, p=1, z=3)) == (2, 1, 3)
