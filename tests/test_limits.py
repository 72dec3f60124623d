"""Caps and hygiene: open acquisitions, idle acquisitions and the service's ceilings, from intake to store.

The source-level contract (both sources) is in ``tests/test_source_conformance.py``; here the rules of
:class:`~acquisition.source.Intake` are checked with explicit clocks, and their effect on the pipeline
(stores closed, rejections published, the active-acquisitions gauge) with the real Zarr store.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from acquisition.limits import Limits
from acquisition.protocol import EndMessage, StartMessage
from acquisition.results import MemoryResultSink
from acquisition.source import Ended, Intake, MemoryFrameSource, Rejected, SourceStats
from acquisition.wire import encode_control, encode_frame, frame_header
from acquisition.zarr_sink import ZarrLabelSink
from serving.config import IngestSettings, ServiceConfig
from serving.pipeline import StreamPipeline
from tests.acq_util import run, until
from tests.test_pipeline import FakeSegmenter

pytestmark = pytest.mark.timeout(120)


def frame(acq: str, t: int = 0, **index: int) -> list[Any]:
    data = np.zeros((8, 8), np.uint16)
    data[:4, :4] = 9
    return encode_frame(frame_header(data.shape, data.dtype, acquisition=acq, index={"t": t, **index}), data)


def start(acq: str, **fields: Any) -> list[Any]:
    return encode_control(StartMessage(acquisition=acq, **fields))


def end(acq: str) -> list[Any]:
    return encode_control(EndMessage(acquisition=acq))


def intake(**limits: Any) -> Intake:
    return Intake(max_frame_bytes=1 << 20, stats=SourceStats(), limits=Limits(**limits))


def test_idleness_counts_from_the_last_message_and_a_declared_interval_extends_it() -> None:
    source = intake(idle_timeout_s=10)
    source.take(start("slow", time_interval_s=60.0), 0.0)  # may be quiet for two intervals
    source.take(frame("fast", 0), 0.0)
    source.take(frame("fast", 1), 8.0)
    source.take(frame("ended", 0), 0.0)
    source.take(end("ended"), 1.0)
    assert source.expire(17.9) == []
    (fast,) = source.expire(18.0)
    assert isinstance(fast, Ended) and fast.idle and fast.acquisition == "fast"
    assert fast.message == EndMessage(acquisition="fast")
    assert source.expire(119.9) == []
    assert [e.acquisition for e in source.expire(120.0)] == ["slow"]
    assert source.expire(10_000.0) == []  # each is closed once; the ended one never was open
    assert (source.stats.idle_closed, source.stats.open_acquisitions) == (2, 0)
    # A frame re-opens an idle acquisition with its declaration and layout.
    again = source.take(frame("slow", 3), 200.0)
    assert not isinstance(again, Rejected)
    assert source.is_open("slow") and source.declaration("slow") is not None


def test_without_a_timeout_nothing_is_ever_idle() -> None:
    source = intake(idle_timeout_s=None)
    source.take(frame("a"), 0.0)
    assert source.expire(1e12) == [] and source.is_open("a")


def test_the_cap_counts_open_acquisitions_and_idleness_frees_a_slot() -> None:
    source = intake(max_open_acquisitions=2, idle_timeout_s=5)
    assert type(source.take(frame("a"), 0.0)).__name__ == "Frame"
    assert type(source.take(start("b"), 1.0)).__name__ == "Started"
    refused = source.take(start("c"), 2.0)
    assert isinstance(refused, Rejected) and refused.reason == "too_many_acquisitions"
    assert refused.acquisition == "c" and refused.index is None
    assert source.declaration("c") is None  # a refused start leaves nothing behind
    assert [e.acquisition for e in source.expire(5.5)] == ["a"]
    assert type(source.take(frame("c"), 6.0)).__name__ == "Frame"
    refused = source.take(frame("a", 1), 6.5)  # idle-closed: re-opening it needs a slot too
    assert isinstance(refused, Rejected) and refused.reason == "too_many_acquisitions"
    assert source.stats.rejected == {"too_many_acquisitions": 2}


def test_open_acquisitions_are_never_forgotten() -> None:
    source = Intake(
        max_frame_bytes=1 << 20,
        stats=SourceStats(),
        limits=Limits(max_open_acquisitions=2),
        max_acquisitions=3,
    )
    source.take(start("open", sizes={"t": 5}), 0.0)
    for i in range(10):  # many ended acquisitions pass through the remembered ones
        source.take(frame(f"x{i}"), 1.0)
        source.take(end(f"x{i}"), 1.0)
    assert source.declaration("open") is not None
    with pytest.raises(ValueError, match="max_acquisitions"):
        Intake(
            max_frame_bytes=1, stats=SourceStats(), limits=Limits(max_open_acquisitions=5), max_acquisitions=4
        )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_positions", 0),
        ("max_frame_pixels", -1),
        ("max_open_acquisitions", True),
        ("idle_timeout_s", 0.0),
    ],
)
def test_limits_refuse_nonsense(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        Limits(**{field: value})


def test_ingest_settings_give_the_listener_its_limits() -> None:
    settings = IngestSettings(
        max_positions=3, max_frame_pixels=100, max_open_acquisitions=2, idle_timeout_s=None
    )
    limits = settings.limits()
    assert (limits.max_positions, limits.max_frame_pixels, limits.max_open_acquisitions) == (3, 100, 2)
    assert limits.idle_timeout_s is None
    assert IngestSettings().limits().idle_timeout_s == 1800.0


# -- through the pipeline, with the Zarr store -------------------------------------------------------------


def _pipeline(tmp_path: Path, limits: Limits) -> tuple[StreamPipeline, MemoryFrameSource, ZarrLabelSink]:
    config = ServiceConfig.model_validate(
        {"ingest": {"max_concurrent": 2, "max_queued": 4}, "output": {"directory": str(tmp_path)}}
    )
    source = MemoryFrameSource(max_queued=4, limits=limits)
    labels = ZarrLabelSink(tmp_path)
    pipeline = StreamPipeline(
        source=source,
        segmenter=FakeSegmenter(),
        labels=labels,
        results=MemoryResultSink(),
        config=config,
        model_name="fake",
    )
    return pipeline, source, labels


def test_an_idle_acquisition_is_closed_like_after_end(tmp_path: Path) -> None:
    pipeline, source, labels = _pipeline(tmp_path, Limits(idle_timeout_s=0.05))
    results = pipeline.results
    assert isinstance(results, MemoryResultSink)

    async def main() -> None:
        await pipeline.start()
        await source.push(start("quiet", sizes={"t": 4}))
        await source.push(frame("quiet", 0))
        await until(lambda: any(s.acquisition == "quiet" for s in results.summaries), timeout=60)
        await pipeline.stop()

    run(main(), timeout=90)
    (summary,) = results.summaries
    assert (summary.frames_received, summary.frames_ok, summary.frames_declared) == (1, 1, None)
    assert labels.progress("quiet").closed and pipeline.ledger["quiet"].closed
    assert source.stats.idle_closed == 1
    assert pipeline.metrics.acquisitions_active._value.get() == 0


def test_a_frame_after_an_idle_close_reopens_the_store(tmp_path: Path) -> None:
    pipeline, source, labels = _pipeline(tmp_path, Limits(idle_timeout_s=0.05))
    results = pipeline.results
    assert isinstance(results, MemoryResultSink)

    async def main() -> None:
        await pipeline.start()
        await source.push(start("again", sizes={"t": 4}))
        await source.push(frame("again", 0))
        await until(lambda: len(results.summaries) == 1, timeout=60)
        await source.push(frame("again", 1))  # re-opens it; it goes idle again afterwards
        await until(lambda: len(results.summaries) == 2, timeout=60)
        await pipeline.stop()

    run(main(), timeout=90)
    assert [(r.index.t, r.status) for r in results.results if r.index is not None] == [(0, "ok"), (1, "ok")]
    assert [(s.frames_received, s.frames_ok) for s in results.summaries] == [(1, 1), (1, 1)]
    assert labels.progress("again").closed
    assert [f.t for f in labels.progress("again").done] == [0, 1]


def test_acquisitions_beyond_the_cap_are_refused_published_and_not_counted_active(tmp_path: Path) -> None:
    pipeline, source, _ = _pipeline(tmp_path, Limits(max_open_acquisitions=2))
    results = pipeline.results
    assert isinstance(results, MemoryResultSink)

    async def main() -> None:
        await pipeline.start()
        for i in range(6):  # six new ids, one small frame each
            await source.push(frame(f"many-{i}"))
        await until(lambda: len(results.results) == 6, timeout=60)
        await asyncio.sleep(0)
        active = pipeline.metrics.acquisitions_active._value.get()
        await pipeline.stop()
        assert active == 2

    run(main(), timeout=90)
    by_status = {r.acquisition: (r.status, r.reason) for r in results.results}
    assert by_status == {
        "many-0": ("ok", None),
        "many-1": ("ok", None),
        **{f"many-{i}": ("rejected", "too_many_acquisitions") for i in range(2, 6)},
    }
    assert sorted(p.name for p in tmp_path.glob("*.ome.zarr")) == ["many-0.ome.zarr", "many-1.ome.zarr"]
    assert pipeline.metrics.rejected.labels(reason="too_many_acquisitions")._value.get() == 4
