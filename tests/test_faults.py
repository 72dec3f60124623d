"""Nothing lost across shutdowns and restarts, through ``cellsam-stream serve`` and an independent client.

* SIGTERM with a backlog: every accepted frame ends stored (``ok``) or ``failed: shutdown``, recorded in the
  store; the exit code says whether any was left (3) or not (0);
* a restart on the same output resumes the acquisition without a new ``start``: the frames that were not
  stored are sent again, and the acquisition completes with the whole of it in the summary;
* SIGKILL of the whole service (every process) mid-acquisition: the store stays readable, its done map
  consistent with its labels, and a restart completes the acquisition;
* tracking survives both: the movie's track ids after the restarts equal one uninterrupted offline run of
  the same linker over the stored labels (no renumbering).

Replica kills (Encoder and Decoder SIGKILLed mid-stream) are in ``tests/test_serving.py``.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from acquisition.client import FrameSender, ResultSubscriber
from acquisition.frames import FrameId
from acquisition.protocol import AcquisitionSummary, FrameResult
from acquisition.sim_tracks import TrackedMovie
from acquisition.zarr_sink import ZarrLabelSink
from cellsam_core.tracking import track_sequence
from tests.serve_util import ServeProcess, collect_results

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

SHAPE = (96, 96)
N_FRAMES = 40


def _frames(n: int) -> list[np.ndarray]:
    """A live-cell movie (cells move, grow, divide): what the service tracks."""
    movie = TrackedMovie(SHAPE, n, seed=2, n_cells=8)
    return [movie[t][0] for t in range(n)]


def _serve(output: Path, tmp: Path, *extra: str) -> ServeProcess:
    config = tmp / "config.yaml"
    # Room for the whole backlog in the service: what the client sends is accepted, not left in ZeroMQ.
    config.write_text("ingest:\n  max_queued: 64\n  max_concurrent: 2\n")
    # The bundled model: real cells to track (fast enough at this size on a CPU).
    return ServeProcess.start("--output", str(output), "--config", str(config), *extra)


def _assert_tracked_as_one_run(labels: ZarrLabelSink, acquisition: str) -> None:
    """Every frame is tracked, and the track ids equal one uninterrupted offline run of the same linker
    over the stored labels: nothing renumbered across the restarts."""
    frames = [FrameId(acquisition, 0, t, 0) for t in range(N_FRAMES)]
    assert all(labels.is_tracked(f) for f in frames)
    offline = track_sequence([labels.read_labels(f) for f in frames])
    for f, expected in zip(frames, offline, strict=True):
        np.testing.assert_array_equal(labels.read_tracks(f), expected.track_labels, err_msg=f"t={f.t}")


@pytest.fixture
def services() -> Iterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    yield started
    for service in started:
        service.close()


def _final_statuses(messages: list) -> dict[int, tuple[str, str | None]]:
    out: dict[int, tuple[str, str | None]] = {}
    for msg in messages:
        if isinstance(msg.payload, FrameResult) and msg.payload.index is not None:
            out[msg.payload.index.t] = (msg.payload.status, msg.payload.reason)
    return out


def _results_until(sub: ResultSubscriber, acquisition: str, enough: int, timeout: float = 300) -> list:
    """Results of ``acquisition`` until ``enough`` of them are ``ok``."""
    got: list = []
    deadline = time.monotonic() + timeout
    while sum(r.payload.status == "ok" for r in got) < enough:
        msg = sub.recv(timeout=deadline - time.monotonic())
        if msg.acquisition == acquisition and isinstance(msg.payload, FrameResult):
            got.append(msg)
    return got


def _drain_results(sub: ResultSubscriber, acquisition: str, quiet_s: float = 3.0) -> list:
    """Every result of ``acquisition`` still arriving, until none came for ``quiet_s``."""
    got: list = []
    while True:
        try:
            msg = sub.recv(timeout=quiet_s)
        except TimeoutError:
            return got
        if msg.acquisition == acquisition and isinstance(msg.payload, FrameResult):
            got.append(msg)


def _send(
    service: ServeProcess, acquisition: str, frames: dict[int, np.ndarray], *, start: bool, end: bool
) -> None:
    sender = FrameSender(endpoint=service.ingest, acquisition=acquisition, linger=30)
    try:  # not as a context manager, which would end the acquisition on exit
        sender.wait_connected(30)
        if start:
            sender.start(sizes={"t": N_FRAMES}, pixel_size_um=0.5)
        for t, image in frames.items():
            sender.send(image, t=t)
        if end:
            sender.end(frames=N_FRAMES)
    finally:
        sender.close()


def test_sigterm_with_a_backlog_loses_nothing_and_a_restart_resumes(
    tmp_path: Path, services: list[ServeProcess]
) -> None:
    output = tmp_path / "out"
    frames = _frames(N_FRAMES)
    first = _serve(output, tmp_path, "--drain-timeout", "2")
    services.append(first)
    with ResultSubscriber(endpoint=first.results, acquisitions=["bk"]) as sub:
        sub.wait_ready(30)
        _send(first, "bk", dict(enumerate(frames)), start=True, end=False)  # flat out, no end
        seen = _results_until(sub, "bk", enough=3)
        code, printed = first.stop(signal.SIGTERM)
        seen += _drain_results(sub, "bk")
    statuses = _final_statuses(seen)
    ok = {t for t, (status, _) in statuses.items() if status == "ok"}
    shutdown = {t for t, s in statuses.items() if s == ("failed", "shutdown")}
    assert ok | shutdown == set(statuses), statuses  # nothing failed for any other reason
    assert len(seen) == len(statuses)  # one final result per frame
    # Every frame the service accepted ended: the ones not stored are exactly the `shutdown` ones.
    assert ok | shutdown == set(range(N_FRAMES)), (sorted(ok), sorted(shutdown), printed)
    assert code == (3 if shutdown else 0), printed
    assert ("not finished" in printed) == bool(shutdown), printed

    labels = ZarrLabelSink(output)
    stored = labels.stored("bk")
    assert stored is not None and not stored.closed
    labels.open_acquisition(stored.spec)
    state = labels.progress("bk")
    assert {f.t for f in state.done} == ok
    assert {f.frame.t for f in state.failed} == shutdown
    assert {f.reason for f in state.failed} <= {"shutdown"}

    # Restart: the client sends what was not stored (no `start`: the store has the declaration), and ends.
    second = _serve(output, tmp_path)
    services.append(second)
    with ResultSubscriber(endpoint=second.results, acquisitions=["bk"]) as sub:
        sub.wait_ready(30)
        _send(second, "bk", {t: frames[t] for t in sorted(set(range(N_FRAMES)) - ok)}, start=False, end=True)
        redone, summary = collect_results(sub, "bk")
    assert isinstance(summary, AcquisitionSummary)
    assert {t for t, (s, _) in _final_statuses(redone).items() if s == "ok"} == set(range(N_FRAMES)) - ok
    assert summary.frames_stored == N_FRAMES and summary.frames_failed == 0
    code, printed = second.stop(signal.SIGTERM)
    assert code == 0, printed
    labels = ZarrLabelSink(output)
    stored = labels.stored("bk")
    assert stored is not None and stored.closed and stored.spec.pixel_size_um == 0.5
    labels.open_acquisition(stored.spec)
    state = labels.progress("bk")
    assert len(state.done) == N_FRAMES and state.failed == ()
    _assert_tracked_as_one_run(labels, "bk")


def test_sigkill_of_the_whole_service_then_a_restart_completes_the_acquisition(
    tmp_path: Path, services: list[ServeProcess]
) -> None:
    output = tmp_path / "out"
    frames = _frames(N_FRAMES)
    first = _serve(output, tmp_path)
    services.append(first)
    with ResultSubscriber(endpoint=first.results, acquisitions=["kl"]) as sub:
        sub.wait_ready(30)
        _send(first, "kl", dict(enumerate(frames)), start=True, end=False)
        _results_until(sub, "kl", enough=3)
        first.kill_all()  # no drain, no clean close: writes may be cut anywhere

    labels = ZarrLabelSink(output)
    stored = labels.stored("kl")
    assert stored is not None and not stored.closed
    labels.open_acquisition(stored.spec)
    done = {f.t for f in labels.progress("kl").done}
    # Results go out before their labels are written (feedback first): some of the three frames with an
    # `ok` result may not have reached the store when the service was killed.
    assert 1 <= len(done) < N_FRAMES
    for t in done:  # the done map promises complete frames
        assert labels.read_labels(FrameId("kl", 0, t, 0)).shape == SHAPE
        np.testing.assert_array_equal(labels.read_image(FrameId("kl", 0, t, 0))[0], frames[t])

    second = _serve(output, tmp_path)
    services.append(second)
    with ResultSubscriber(endpoint=second.results, acquisitions=["kl"]) as sub:
        sub.wait_ready(30)
        _send(second, "kl", {t: frames[t] for t in range(N_FRAMES) if t not in done}, start=False, end=True)
        _, summary = collect_results(sub, "kl")
    assert summary.frames_stored == N_FRAMES
    assert summary.frames_received == N_FRAMES - len(done) and summary.frames_failed == 0
    code, printed = second.stop(signal.SIGTERM)
    assert code == 0, printed
    labels = ZarrLabelSink(output)
    stored = labels.stored("kl")
    assert stored is not None
    labels.open_acquisition(stored.spec)
    _assert_tracked_as_one_run(labels, "kl")
