"""One conformance suite for every `LabelSink`: subclass `SinkConformance` and implement `make_sink`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

from acquisition.errors import InvalidAcquisitionIdError
from acquisition.frames import FrameId
from acquisition.memory_sink import MemoryLabelSink
from acquisition.sink import FailedFrame, LabelSink
from acquisition.sink_errors import (
    AcquisitionClosedError,
    AcquisitionNotOpenError,
    FrameNotWrittenError,
    IncompatibleStoreError,
    InvalidFrameError,
    InvalidIdentifierError,
    SinkError,
)
from acquisition.spec import AcquisitionSpec, Sizes, StorageOptions, StoredAcquisition
from acquisition.zarr_sink import ZarrLabelSink
from cellsam_core.cells import CellTable
from cellsam_core.lineage import LineageBuilder, lineage_graph
from cellsam_core.stacks import ZPolicy
from cellsam_core.tracking import PARENT_COLUMN, TRACK_COLUMN, OnlineTracker, TrackedFrame, TrackerConfig
from tests.sink_frames import SHAPE, frame_cells, frame_image, frame_labels


def make_spec(acquisition: str = "acq-1", *, t: int | None = None, **kwargs: Any) -> AcquisitionSpec:
    defaults: dict[str, Any] = {
        "sizes": Sizes(t=t, p=2, z=2, c=2),
        "frame_shape": SHAPE,
        "storage": StorageOptions(t_growth=8),
    }
    return AcquisitionSpec(acquisition=acquisition, **(defaults | kwargs))


class BadInput(NamedTuple):
    name: str
    frame: tuple[int, int, int]
    labels: Any
    image: Any
    cells: Any
    error: type[Exception]


_GOOD = frame_labels(0, 0, 0)
BAD_INPUTS = [
    BadInput("labels wrong shape", (0, 0, 0), np.zeros((32, 64), np.uint32), None, None, InvalidFrameError),
    BadInput(
        "labels transposed", (0, 0, 0), np.zeros((64, 32), np.uint32)[:, :], None, None, InvalidFrameError
    ),
    BadInput("labels int32", (0, 0, 0), _GOOD.astype(np.int32), None, None, InvalidFrameError),
    BadInput("labels float", (0, 0, 0), _GOOD.astype(np.float32), None, None, InvalidFrameError),
    BadInput("labels 3-D", (0, 0, 0), _GOOD[None], None, None, InvalidFrameError),
    BadInput("labels a list", (0, 0, 0), _GOOD.tolist(), None, None, InvalidFrameError),
    BadInput(
        "image wrong shape", (0, 0, 0), _GOOD, np.zeros((1, *SHAPE), np.uint16), None, InvalidFrameError
    ),
    BadInput(
        "image wrong dtype", (0, 0, 0), _GOOD, np.zeros((2, *SHAPE), np.float32), None, InvalidFrameError
    ),
    BadInput("cells not a table", (0, 0, 0), _GOOD, None, {"label": [1]}, InvalidFrameError),
    BadInput(
        "cells at another pixel size",
        (0, 0, 0),
        _GOOD,
        None,
        frame_cells(0, 0, 0, pixel_size_um=0.3),
        InvalidFrameError,
    ),
    BadInput("p out of range", (2, 0, 0), _GOOD, None, None, InvalidIdentifierError),
    BadInput("z out of range", (0, 0, 2), _GOOD, None, None, InvalidIdentifierError),
    BadInput("negative t", (0, -1, 0), _GOOD, None, None, InvalidIdentifierError),
]


class BadTracks(NamedTuple):
    name: str
    frame: tuple[int, int, int]
    track_labels: Any
    cells: Any
    state: Any
    error: type[Exception]


def _tracked_cells(p: int, t: int, z: int) -> CellTable:
    n = len(frame_cells(p, t, z))
    return frame_cells(p, t, z).with_measurements(
        {TRACK_COLUMN: np.arange(n) + 1, PARENT_COLUMN: np.zeros(n)}
    )


_TRACKS = frame_labels(0, 1, 0)
_STATE = OnlineTracker().state().model_dump(mode="json")
BAD_TRACKS = [
    BadTracks("wrong shape", (0, 1, 0), _TRACKS[:32], _tracked_cells(0, 1, 0), _STATE, InvalidFrameError),
    BadTracks(
        "int32", (0, 1, 0), _TRACKS.astype(np.int32), _tracked_cells(0, 1, 0), _STATE, InvalidFrameError
    ),
    BadTracks("a list", (0, 1, 0), _TRACKS.tolist(), _tracked_cells(0, 1, 0), _STATE, InvalidFrameError),
    BadTracks("no track columns", (0, 1, 0), _TRACKS, frame_cells(0, 1, 0), _STATE, InvalidFrameError),
    BadTracks(
        "cells of another frame", (0, 1, 0), _TRACKS, _tracked_cells(1, 2, 1), _STATE, InvalidFrameError
    ),
    BadTracks("cells not a table", (0, 1, 0), _TRACKS, {"label": [1]}, _STATE, InvalidFrameError),
    BadTracks(
        "state not JSON", (0, 1, 0), _TRACKS, _tracked_cells(0, 1, 0), {"x": object()}, InvalidFrameError
    ),
    BadTracks(
        "state with NaN", (0, 1, 0), _TRACKS, _tracked_cells(0, 1, 0), {"x": np.nan}, InvalidFrameError
    ),
    BadTracks("state a list", (0, 1, 0), _TRACKS, _tracked_cells(0, 1, 0), [1, 2], InvalidFrameError),
    BadTracks("p out of range", (2, 1, 0), _TRACKS, _tracked_cells(0, 1, 0), _STATE, InvalidIdentifierError),
    BadTracks("frame not written", (0, 2, 0), _TRACKS, _tracked_cells(0, 1, 0), _STATE, FrameNotWrittenError),
]


class SinkConformance:
    """Behaviour every `LabelSink` must show; see the `LabelSink` docstring for the contract."""

    #: Whether a second sink made by `make_sink` on the same ``tmp_path`` sees what the first stored.
    persistent = False

    def make_sink(self, tmp_path: Path) -> LabelSink:
        """The sink under test; every implementation's test class overrides this."""
        raise NotImplementedError

    def readers(self, sink: LabelSink, tmp_path: Path) -> list[LabelSink]:
        """``sink``, and for a persistent sink a second instance reopening the same storage."""
        return [sink, self.make_sink(tmp_path)] if self.persistent else [sink]

    @pytest.fixture
    def sink(self, tmp_path: Path) -> LabelSink:
        return self.make_sink(tmp_path)

    @pytest.fixture
    def spec(self, sink: LabelSink) -> AcquisitionSpec:
        spec = make_spec()
        sink.open_acquisition(spec)
        return spec

    def write(self, sink: LabelSink, spec: AcquisitionSpec, p: int, t: int, z: int) -> None:
        sink.write(
            FrameId(spec.acquisition, p, t, z),
            frame_labels(p, t, z),
            frame_image(p, t, z, spec.sizes.c),
            frame_cells(p, t, z),
        )

    def assert_frame(self, sink: LabelSink, spec: AcquisitionSpec, p: int, t: int, z: int) -> None:
        frame = FrameId(spec.acquisition, p, t, z)
        assert sink.is_done(frame)
        labels = sink.read_labels(frame)
        assert labels.dtype == np.uint32
        np.testing.assert_array_equal(labels, frame_labels(p, t, z))
        np.testing.assert_array_equal(sink.read_image(frame), frame_image(p, t, z, spec.sizes.c))
        assert sink.read_cells(frame).equals(frame_cells(p, t, z))

    def test_satisfies_protocol(self, sink: LabelSink) -> None:
        assert isinstance(sink, LabelSink)

    def test_write_and_read_back(self, sink: LabelSink, spec: AcquisitionSpec) -> None:
        frames = [(0, 0, 0), (1, 0, 1), (0, 3, 1)]
        for frame in frames:
            self.write(sink, spec, *frame)
        for frame in frames:
            self.assert_frame(sink, spec, *frame)
        progress = sink.progress(spec.acquisition)
        assert progress.done == tuple(FrameId(spec.acquisition, *f) for f in sorted(frames))
        assert progress.t_size == 4
        assert not progress.closed

    def test_cells_measured_when_omitted(self, sink: LabelSink, spec: AcquisitionSpec) -> None:
        frame = FrameId(spec.acquisition, 0, 1, 0)
        sink.write(frame, frame_labels(0, 1, 0))
        table = sink.read_cells(frame)
        assert table.equals(CellTable.from_labels(frame_labels(0, 1, 0)))
        assert len(table) > 0 and np.isnan(table.score).all()
        assert sink.read_image(frame) is None  # written without an image

    def test_cell_table_with_pixel_size_and_prompt_boxes_round_trips(
        self, sink: LabelSink, tmp_path: Path
    ) -> None:
        spec = make_spec("physical", pixel_size_um=0.325)
        sink.open_acquisition(spec)
        table = frame_cells(0, 2, 1, pixel_size_um=0.325)
        # Rows with a prompt box and one without (NaN), known scores, physical areas.
        assert np.isfinite(table.prompt_box[0]).all() and np.isnan(table.prompt_box[-1]).all()
        assert np.isfinite(table.score).all() and np.isfinite(table.area_um2).all()
        frame = FrameId("physical", 0, 2, 1)
        sink.write(frame, frame_labels(0, 2, 1), None, table)
        for reader in self.readers(sink, tmp_path):
            reader.open_acquisition(spec)
            back = reader.read_cells(frame)
            assert back.equals(table)
            assert back.pixel_size_um == 0.325
            np.testing.assert_array_equal(back.prompt_box, table.prompt_box)
            np.testing.assert_array_equal(back.area_um2, table.area_um2)

    def test_table_without_pixel_size_takes_the_acquisitions(self, sink: LabelSink, tmp_path: Path) -> None:
        spec = make_spec("physical", pixel_size_um=0.5)
        sink.open_acquisition(spec)
        frame = FrameId("physical", 1, 0, 0)
        sink.write(frame, frame_labels(1, 0, 0), None, frame_cells(1, 0, 0))
        for reader in self.readers(sink, tmp_path):
            reader.open_acquisition(spec)
            back = reader.read_cells(frame)
            assert back.pixel_size_um == 0.5
            assert back.equals(frame_cells(1, 0, 0, pixel_size_um=0.5))

    def test_narrow_label_dtypes_accepted(self, sink: LabelSink, spec: AcquisitionSpec) -> None:
        frame = FrameId(spec.acquisition, 0, 0, 0)
        sink.write(frame, frame_labels(0, 0, 0).astype(np.uint16))
        np.testing.assert_array_equal(sink.read_labels(frame), frame_labels(0, 0, 0))

    def test_rewrite_is_idempotent(self, sink: LabelSink, spec: AcquisitionSpec) -> None:
        for _ in range(2):
            self.write(sink, spec, 1, 2, 0)
        self.assert_frame(sink, spec, 1, 2, 0)
        # A retry with other content replaces the frame: one result, never a mix.
        frame = FrameId(spec.acquisition, 1, 2, 0)
        sink.write(frame, frame_labels(0, 0, 1), None, frame_cells(0, 0, 1))
        np.testing.assert_array_equal(sink.read_labels(frame), frame_labels(0, 0, 1))
        assert sink.read_cells(frame).equals(frame_cells(0, 0, 1))
        assert sink.read_image(frame) is None
        assert sink.progress(spec.acquisition).done == (frame,)

    def test_zero_cell_frame_differs_from_missing_frame(self, sink: LabelSink, spec: AcquisitionSpec) -> None:
        empty = FrameId(spec.acquisition, 0, 4, 0)  # t % 5 == 4: no cells
        assert not frame_labels(0, 4, 0).any()
        self.write(sink, spec, 0, 4, 0)
        assert sink.is_done(empty)
        assert not sink.read_labels(empty).any()
        assert len(sink.read_cells(empty)) == 0

        missing = FrameId(spec.acquisition, 0, 4, 1)
        assert not sink.is_done(missing)
        for read in (sink.read_labels, sink.read_image, sink.read_cells):
            with pytest.raises(FrameNotWrittenError):
                read(missing)
        assert sink.progress(spec.acquisition).done == (empty,)

    def test_unbounded_t_grows(self, sink: LabelSink, spec: AcquisitionSpec) -> None:
        frames = [(0, 0, 0), (1, 9, 1), (0, 70, 0), (1, 200, 0), (0, 17, 1)]
        for frame in frames:
            self.write(sink, spec, *frame)
        for frame in frames:
            self.assert_frame(sink, spec, *frame)
        assert not sink.is_done(FrameId(spec.acquisition, 0, 1000, 0))
        assert sink.progress(spec.acquisition).t_size == 201

    def test_bounded_t_refuses_later_frames(self, sink: LabelSink) -> None:
        spec = make_spec("bounded", t=3)
        sink.open_acquisition(spec)
        self.write(sink, spec, 0, 2, 0)
        with pytest.raises(InvalidIdentifierError, match="t=3"):
            self.write(sink, spec, 0, 3, 0)

    @pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.name for c in BAD_INPUTS])
    def test_bad_input_refused(self, sink: LabelSink, spec: AcquisitionSpec, case: BadInput) -> None:
        frame = FrameId(spec.acquisition, *case.frame)
        with pytest.raises(case.error) as info:
            sink.write(frame, case.labels, case.image, case.cells)
        assert isinstance(info.value, SinkError)
        assert isinstance(info.value, ValueError)
        assert sink.progress(spec.acquisition).done == ()

    def test_image_with_one_channel_may_be_2d(self, sink: LabelSink) -> None:
        spec = make_spec("mono", sizes=Sizes(p=1, z=1, c=1))
        sink.open_acquisition(spec)
        frame = FrameId("mono", 0, 0, 0)
        sink.write(frame, frame_labels(0, 0, 0), frame_image(0, 0, 0, 1)[0])
        np.testing.assert_array_equal(sink.read_image(frame), frame_image(0, 0, 0, 1))

    def test_image_dropped_when_spec_says_so(self, sink: LabelSink) -> None:
        spec = make_spec("labels-only", write_image=False)
        sink.open_acquisition(spec)
        frame = FrameId("labels-only", 0, 0, 0)
        sink.write(frame, frame_labels(0, 0, 0), frame_image(0, 0, 0, 2))
        assert sink.read_image(frame) is None
        np.testing.assert_array_equal(sink.read_labels(frame), frame_labels(0, 0, 0))

    @pytest.mark.parametrize(
        "z_policy", [ZPolicy(policy="max_projection"), ZPolicy(policy="plane", plane=1)], ids=ZPolicy.describe
    )
    def test_projection_frame_is_a_whole_stack_with_one_label_plane(
        self, sink: LabelSink, tmp_path: Path, z_policy: ZPolicy
    ) -> None:
        spec = make_spec("projected", z_policy=z_policy)  # 2 z planes, 2 channels
        sink.open_acquisition(spec)
        stack = np.stack([frame_image(1, 3, z, 2) for z in range(2)], axis=1)  # (C, Z, H, W)
        frame = FrameId("projected", 1, 3, 0)
        sink.write(frame, frame_labels(1, 3, 0), stack, frame_cells(1, 3, 0))
        for reader in self.readers(sink, tmp_path):
            reader.open_acquisition(spec)
            assert reader.is_done(frame)
            np.testing.assert_array_equal(reader.read_image(frame), stack)
            np.testing.assert_array_equal(reader.read_labels(frame), frame_labels(1, 3, 0))
            assert reader.read_cells(frame).equals(frame_cells(1, 3, 0))
            assert reader.progress("projected").done == (frame,)
        # One label plane per (t, p): z = 1 names no stored frame, and one plane is not the whole stack.
        with pytest.raises(InvalidIdentifierError, match="projection z policy"):
            sink.write(FrameId("projected", 1, 3, 1), frame_labels(1, 3, 1), stack)
        with pytest.raises(InvalidFrameError, match=r"\(C, Z, H, W\)"):
            sink.write(FrameId("projected", 0, 0, 0), frame_labels(0, 0, 0), stack[:, 0])
        assert not sink.is_done(FrameId("projected", 0, 0, 0))
        with pytest.raises(IncompatibleStoreError):  # the policy is part of the spec
            sink.open_acquisition(make_spec("projected"))

    @pytest.mark.parametrize("acquisition", ["../escape", "a/b", ".hidden", "..", "", "x" * 129, "a\\b"])
    def test_escaping_ids_refused(self, sink: LabelSink, tmp_path: Path, acquisition: str) -> None:
        with pytest.raises(ValueError):
            make_spec(acquisition)  # the spec refuses it at the boundary...
        # ...and the sink refuses it too, even from a spec built without validation.
        unchecked = AcquisitionSpec.model_construct(**make_spec().model_dump() | {"acquisition": acquisition})
        with pytest.raises(InvalidAcquisitionIdError) as info:
            sink.open_acquisition(unchecked)
        assert info.value.reason == "bad_acquisition_id"
        for call in (
            lambda: sink.write(FrameId(acquisition, 0, 0, 0), frame_labels(0, 0, 0)),
            lambda: sink.progress(acquisition),
            lambda: sink.is_done(FrameId(acquisition, 0, 0, 0)),
            lambda: sink.close_acquisition(acquisition),
        ):
            with pytest.raises(InvalidAcquisitionIdError):
                call()
        # Nothing was created outside the sink's output directory.
        assert {path.name for path in tmp_path.iterdir()} <= {"out"}

    def test_write_before_open_refused(self, sink: LabelSink) -> None:
        with pytest.raises(AcquisitionNotOpenError):
            sink.write(FrameId("never-opened", 0, 0, 0), frame_labels(0, 0, 0))
        with pytest.raises(AcquisitionNotOpenError):
            sink.progress("never-opened")

    def test_reopen_keeps_frames_and_checks_spec(self, sink: LabelSink, spec: AcquisitionSpec) -> None:
        self.write(sink, spec, 0, 1, 0)
        sink.open_acquisition(spec)
        self.assert_frame(sink, spec, 0, 1, 0)
        with pytest.raises(IncompatibleStoreError):
            sink.open_acquisition(make_spec(frame_shape=(32, 32)))
        with pytest.raises(IncompatibleStoreError, match=r"sizes\.c: 2 -> 3"):
            sink.open_acquisition(make_spec(sizes=Sizes(p=2, z=2, c=3)))
        self.assert_frame(sink, spec, 0, 1, 0)

    def test_stored_spec_is_found_without_opening(
        self, sink: LabelSink, spec: AcquisitionSpec, tmp_path: Path
    ) -> None:
        assert sink.stored("never-opened") is None
        for reader in self.readers(sink, tmp_path):
            assert reader.stored(spec.acquisition) == StoredAcquisition(spec, closed=False)
        sink.close_acquisition(spec.acquisition, {"frames": 0})
        for reader in self.readers(sink, tmp_path):
            assert reader.stored(spec.acquisition) == StoredAcquisition(spec, closed=True)

    def test_failures_are_recorded_until_the_frame_is_written(
        self, sink: LabelSink, spec: AcquisitionSpec, tmp_path: Path
    ) -> None:
        a, b = FrameId(spec.acquisition, 1, 4, 0), FrameId(spec.acquisition, 0, 2, 1)
        sink.record_failure(a, "model_error", "first")
        sink.record_failure(a, "shutdown", "the service stopped")
        sink.record_failure(b, "write_error")
        with pytest.raises(InvalidIdentifierError):
            sink.record_failure(FrameId(spec.acquisition, 5, 0, 0), "shutdown")
        for reader in self.readers(sink, tmp_path):
            reader.open_acquisition(spec)
            assert reader.progress(spec.acquisition).failed == (
                FailedFrame(b, "write_error", ""),
                FailedFrame(a, "shutdown", "the service stopped"),
            )
        self.write(sink, spec, 1, 4, 0)  # redone: no longer failed
        for reader in self.readers(sink, tmp_path):
            reader.open_acquisition(spec)
            assert [f.frame for f in reader.progress(spec.acquisition).failed] == [b]

    def test_more_time_points_extend_a_stored_acquisition(self, sink: LabelSink, tmp_path: Path) -> None:
        bounded = make_spec(sizes=Sizes(t=3, p=2, z=2, c=3), declaration={"type": "start", "sizes": {"t": 3}})
        sink.open_acquisition(bounded)
        self.write(sink, bounded, 1, 2, 1)
        with pytest.raises(InvalidIdentifierError):
            self.write(sink, bounded, 1, 3, 1)
        with pytest.raises(IncompatibleStoreError, match=r"sizes\.t: 3 -> 2"):
            sink.open_acquisition(bounded.model_copy(update={"sizes": Sizes(t=2, p=2, z=2, c=3)}))
        longer = bounded.model_copy(
            update={"sizes": Sizes(t=6, p=2, z=2, c=3), "declaration": {"type": "start", "sizes": {"t": 6}}}
        )
        reader = self.readers(sink, tmp_path)[-1]
        reader.open_acquisition(longer)
        self.write(reader, longer, 1, 5, 1)
        for r in self.readers(sink, tmp_path):
            assert r.stored(bounded.acquisition) == StoredAcquisition(longer, closed=False)
        r = self.readers(sink, tmp_path)[-1]
        r.open_acquisition(longer)
        self.assert_frame(r, longer, 1, 2, 1)
        self.assert_frame(r, longer, 1, 5, 1)
        open_ended = longer.model_copy(update={"sizes": Sizes(t=None, p=2, z=2, c=3)})
        r.open_acquisition(open_ended)
        self.write(r, open_ended, 0, 40, 0)
        self.assert_frame(r, open_ended, 0, 40, 0)

    def test_close_records_summary_and_refuses_writes(self, sink: LabelSink, spec: AcquisitionSpec) -> None:
        for t in range(3):
            self.write(sink, spec, 0, t, 0)
        sink.close_acquisition(spec.acquisition, {"frames": 3, "note": "ok"})
        progress = sink.progress(spec.acquisition)
        assert progress.closed and progress.summary == {"frames": 3, "note": "ok"}
        assert progress.t_size == 3
        with pytest.raises(AcquisitionClosedError):
            self.write(sink, spec, 0, 3, 0)
        for t in range(3):
            self.assert_frame(sink, spec, 0, t, 0)
        # Reopening resumes the acquisition.
        sink.open_acquisition(spec)
        assert not sink.progress(spec.acquisition).closed
        self.write(sink, spec, 0, 30, 0)
        self.assert_frame(sink, spec, 0, 30, 0)

    # -- tracking ----------------------------------------------------------------------------------

    def track(
        self, sink: LabelSink, spec: AcquisitionSpec, p: int, z: int, ts: range, tracker: OnlineTracker
    ) -> list[TrackedFrame]:
        """Write frames ``ts`` of (p, z), link them as stored, and store their tracking."""
        frames = []
        for t in ts:
            self.write(sink, spec, p, t, z)
            frame_id = FrameId(spec.acquisition, p, t, z)
            frame = tracker.link(t, sink.read_labels(frame_id), sink.read_cells(frame_id))
            sink.write_tracks(
                frame_id, frame.track_labels, frame.cells, tracker.state().model_dump(mode="json")
            )
            frames.append(frame)
        return frames

    def assert_tracked(
        self, sink: LabelSink, spec: AcquisitionSpec, p: int, z: int, frame: TrackedFrame
    ) -> None:
        frame_id = FrameId(spec.acquisition, p, frame.t, z)
        assert sink.is_done(frame_id) and sink.is_tracked(frame_id)
        tracks = sink.read_tracks(frame_id)
        assert tracks.dtype == np.uint32
        np.testing.assert_array_equal(tracks, frame.track_labels)
        cells = sink.read_cells(frame_id)
        assert cells.equals(frame.cells)
        assert cells.column_names[-2:] == (TRACK_COLUMN, PARENT_COLUMN)
        np.testing.assert_array_equal(sink.read_labels(frame_id), frame_labels(p, frame.t, z))  # untouched

    def test_tracking_round_trips(self, sink: LabelSink, spec: AcquisitionSpec, tmp_path: Path) -> None:
        config = TrackerConfig(max_distance=40)
        tracker = OnlineTracker(config)
        frames = self.track(sink, spec, 1, 1, range(4), tracker)
        assert any(frame.track_ids.size for frame in frames)
        self.write(sink, spec, 0, 0, 0)  # done, never tracked
        untracked = FrameId(spec.acquisition, 0, 0, 0)
        for reader in self.readers(sink, tmp_path):
            reader.open_acquisition(spec)
            for frame in frames:
                self.assert_tracked(reader, spec, 1, 1, frame)
            assert not reader.is_tracked(untracked) and reader.is_done(untracked)
            with pytest.raises(FrameNotWrittenError):
                reader.read_tracks(untracked)
            assert not reader.read_cells(untracked).measurements  # its own table, no track columns
            assert not reader.is_tracked(FrameId(spec.acquisition, 1, 9, 1))  # never written
            progress = reader.progress(spec.acquisition)
            assert progress.tracked == tuple(FrameId(spec.acquisition, 1, t, 1) for t in range(4))
            assert len(progress.done) == 5
            state = reader.tracker_state(spec.acquisition, 1, 1)
            assert state == tracker.state().model_dump(mode="json")
            assert reader.tracker_state(spec.acquisition, 0, 0) is None
            assert reader.tracker_state(spec.acquisition, 1, 0) is None
            assert state is not None
            resumed = OnlineTracker.resume(config, state)
            assert resumed.next_t == 4 and resumed.next_track_id == tracker.next_track_id

    def test_write_tracks_is_idempotent_and_a_rewrite_untracks(
        self, sink: LabelSink, spec: AcquisitionSpec, tmp_path: Path
    ) -> None:
        tracker = OnlineTracker(TrackerConfig(max_distance=40))
        (first, second) = self.track(sink, spec, 0, 1, range(2), tracker)
        frame_id = FrameId(spec.acquisition, 0, 1, 1)
        state = tracker.state().model_dump(mode="json")
        sink.write_tracks(frame_id, second.track_labels, second.cells, state)  # again: one result
        self.assert_tracked(sink, spec, 0, 1, second)
        assert sink.progress(spec.acquisition).tracked == (FrameId(spec.acquisition, 0, 0, 1), frame_id)

        self.write(sink, spec, 0, 1, 1)  # the frame again (a retry): its tracking is gone
        for reader in self.readers(sink, tmp_path):
            reader.open_acquisition(spec)
            assert reader.is_done(frame_id) and not reader.is_tracked(frame_id)
            with pytest.raises(FrameNotWrittenError):
                reader.read_tracks(frame_id)
            assert reader.read_cells(frame_id).equals(frame_cells(0, 1, 1))
            assert reader.progress(spec.acquisition).tracked == (FrameId(spec.acquisition, 0, 0, 1),)
            self.assert_tracked(reader, spec, 0, 1, first)
        sink.write_tracks(frame_id, second.track_labels, second.cells, state)
        self.assert_tracked(sink, spec, 0, 1, second)

    @pytest.mark.parametrize("case", BAD_TRACKS, ids=[c.name for c in BAD_TRACKS])
    def test_bad_tracks_refused(self, sink: LabelSink, spec: AcquisitionSpec, case: BadTracks) -> None:
        self.write(sink, spec, 0, 1, 0)
        self.write(sink, spec, 1, 1, 0)
        good = FrameId(spec.acquisition, 0, 1, 0)
        sink.write_tracks(good, _TRACKS, _tracked_cells(0, 1, 0), {"t": 1})
        with pytest.raises(case.error) as info:
            sink.write_tracks(
                FrameId(spec.acquisition, *case.frame), case.track_labels, case.cells, case.state
            )
        assert isinstance(info.value, SinkError)
        # Nothing changed: the good frame keeps its tracking and state, the other stays untracked.
        assert sink.progress(spec.acquisition).tracked == (good,)
        np.testing.assert_array_equal(sink.read_tracks(good), _TRACKS)
        assert sink.read_cells(good).equals(_tracked_cells(0, 1, 0))
        assert sink.tracker_state(spec.acquisition, 0, 0) == {"t": 1}
        assert sink.tracker_state(spec.acquisition, 1, 0) is None

    @pytest.mark.parametrize("where", [(2, 0), (0, 2), (-1, 0)])
    def test_plane_out_of_range_refused(
        self, sink: LabelSink, spec: AcquisitionSpec, where: tuple[int, int]
    ) -> None:
        p, z = where
        for call in (
            lambda: sink.tracker_state(spec.acquisition, p, z),
            lambda: sink.read_lineage(spec.acquisition, p, z),
            lambda: sink.write_lineage(spec.acquisition, p, z, lineage_graph([])),
        ):
            with pytest.raises(InvalidIdentifierError):
                call()

    def test_tracker_state_of_the_latest_frame_wins(self, sink: LabelSink, spec: AcquisitionSpec) -> None:
        for t in range(4):
            self.write(sink, spec, 1, t, 0)
        put = lambda t, state: sink.write_tracks(  # noqa: E731
            FrameId(spec.acquisition, 1, t, 0), frame_labels(1, t, 0), _tracked_cells(1, t, 0), state
        )
        put(2, {"linked": 2})
        put(3, {"linked": 3})
        put(1, {"linked": "retried 1"})  # an earlier frame again: the state stays the latest frame's
        assert sink.tracker_state(spec.acquisition, 1, 0) == {"linked": 3}
        put(3, {"linked": "retried 3"})  # the same frame again replaces it
        assert sink.tracker_state(spec.acquisition, 1, 0) == {"linked": "retried 3"}
        assert sink.tracker_state(spec.acquisition, 1, 1) is None
        assert len(sink.progress(spec.acquisition).tracked) == 3

    def test_tracking_after_close(self, sink: LabelSink, spec: AcquisitionSpec) -> None:
        self.write(sink, spec, 0, 3, 1)
        sink.close_acquisition(spec.acquisition)
        frame_id = FrameId(spec.acquisition, 0, 3, 1)
        sink.write_tracks(frame_id, frame_labels(0, 3, 1), _tracked_cells(0, 3, 1), {"t": 3})
        sink.write_lineage(spec.acquisition, 0, 1, lineage_graph([]))
        assert sink.is_tracked(frame_id) and sink.progress(spec.acquisition).closed
        with pytest.raises(AcquisitionClosedError):
            self.write(sink, spec, 0, 4, 1)

    def test_lineage_round_trips(self, sink: LabelSink, tmp_path: Path) -> None:
        spec = make_spec("lineage", pixel_size_um=0.325, time_interval_s=30.0)
        sink.open_acquisition(spec)
        assert sink.read_lineage("lineage", 1, 0) is None
        tracker = OnlineTracker(TrackerConfig(max_distance=40))
        frames = self.track(sink, spec, 1, 0, range(6), tracker)  # t = 4 has no cells
        graph = lineage_graph(frames)
        assert graph.number_of_nodes() > 0 and graph.number_of_edges() > 0
        sink.write_lineage("lineage", 1, 0, graph)
        for reader in self.readers(sink, tmp_path):
            reader.open_acquisition(spec)
            back = reader.read_lineage("lineage", 1, 0)
            assert back is not None
            assert_same_lineage(back, graph)
            assert (
                reader.read_lineage("lineage", 0, 0) is None and reader.read_lineage("lineage", 1, 1) is None
            )
            LineageBuilder(back)  # a restart extends what it reads
        shorter = lineage_graph(frames[:2])
        sink.write_lineage("lineage", 1, 0, shorter)  # replaced, not merged
        for reader in self.readers(sink, tmp_path):
            reader.open_acquisition(spec)
            back = reader.read_lineage("lineage", 1, 0)
            assert back is not None
            assert_same_lineage(back, shorter)
        sink.write_lineage("lineage", 0, 1, lineage_graph([]))
        empty = sink.read_lineage("lineage", 0, 1)
        assert empty is not None and empty.number_of_nodes() == 0

    @pytest.mark.parametrize("bad", ["a graph", "a node without attributes"])
    def test_bad_lineage_refused(self, sink: LabelSink, spec: AcquisitionSpec, bad: str) -> None:
        import networkx as nx

        graph: Any = "not a graph"
        if bad == "a node without attributes":
            graph = nx.DiGraph()
            graph.add_node(1, t=0)
        with pytest.raises(InvalidFrameError):
            sink.write_lineage(spec.acquisition, 0, 0, graph)
        assert sink.read_lineage(spec.acquisition, 0, 0) is None

    def test_tracking_from_threads(self, sink: LabelSink, spec: AcquisitionSpec) -> None:
        planes = [(p, z) for p in range(2) for z in range(2)]
        trackers = {plane: OnlineTracker(TrackerConfig(max_distance=40)) for plane in planes}
        with ThreadPoolExecutor(4) as pool:
            results = dict(
                zip(
                    planes,
                    pool.map(lambda pz: self.track(sink, spec, *pz, range(5), trackers[pz]), planes),
                    strict=True,
                )
            )
        for (p, z), frames in results.items():
            for frame in frames:
                self.assert_tracked(sink, spec, p, z, frame)
            assert sink.tracker_state(spec.acquisition, p, z) == trackers[p, z].state().model_dump(
                mode="json"
            )
        assert len(sink.progress(spec.acquisition).tracked) == 20

    def test_concurrent_writes_from_threads(self, sink: LabelSink, spec: AcquisitionSpec) -> None:
        frames = [(p, t, z) for p in range(2) for t in range(12) for z in range(2)]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda f: self.write(sink, spec, *f), frames))
        for frame in frames:
            self.assert_frame(sink, spec, *frame)
        assert len(sink.progress(spec.acquisition).done) == len(frames)


def assert_same_lineage(back: Any, graph: Any) -> None:
    """Same nodes, edges and attributes (floats up to the rounding of a unit conversion)."""
    assert set(back.nodes) == set(graph.nodes) and set(back.edges) == set(graph.edges)
    for node, data in graph.nodes(data=True):
        got = back.nodes[node]
        assert set(got) == set(data)
        for key, value in data.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-12), key
            else:
                assert got[key] == value and isinstance(got[key], int), key


class TestMemorySink(SinkConformance):
    def make_sink(self, tmp_path: Path) -> LabelSink:
        return MemoryLabelSink()


class TestZarrSink(SinkConformance):
    persistent = True

    def make_sink(self, tmp_path: Path) -> LabelSink:
        return ZarrLabelSink(tmp_path / "out")


class TestZarrSinkSharded(SinkConformance):
    """The same contract with sharding, y/x chunking and downsampled levels switched on."""

    persistent = True

    def make_sink(self, tmp_path: Path) -> LabelSink:
        return ZarrLabelSink(tmp_path / "out")

    @pytest.fixture
    def spec(self, sink: LabelSink) -> AcquisitionSpec:
        spec = make_spec(storage=StorageOptions(t_growth=8, shard_t=4, chunk_yx=(32, 32), levels=2))
        sink.open_acquisition(spec)
        return spec
