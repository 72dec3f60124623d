"""CPU threads: what other processes leave free, measured by a gauge and used per encode and decode."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

import cellsam_core as cs
from cellsam_core import threads as cs_threads
from cellsam_core.synthetic import synthetic_frame
from cellsam_core.threads import CpuGauge, intra_op_threads, spare_threads


def test_intra_op_threads_lowers_and_restores_across_concurrent_blocks() -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inside = threading.Barrier(2)
        leave = threading.Event()
        seen: list[int] = []

        def block() -> None:
            with intra_op_threads(1):
                inside.wait(10)
                seen.append(torch.get_num_threads())
                leave.wait(10)

        workers = [threading.Thread(target=block) for _ in range(2)]
        for w in workers:
            w.start()
        leave.set()
        for w in workers:
            w.join(10)
        assert seen == [1, 1]
        assert torch.get_num_threads() == 2  # restored once the last block ended
        with intra_op_threads(4):  # never raises the count
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


class _Clock:
    """Fake readings for a CpuGauge: wall seconds, busy CPU seconds of all cores, this process's own."""

    def __init__(self) -> None:
        self.wall = self.busy = self.own = 0.0

    def gauge(self, min_window: float = 0.02) -> CpuGauge:
        return CpuGauge(
            min_window=min_window,
            clock=lambda: self.wall,
            system_busy=lambda: self.busy,
            own=lambda: self.own,
        )

    def advance(self, wall: float, busy: float, own: float) -> None:
        self.wall += wall
        self.busy += busy
        self.own += own


def test_gauge_counts_what_other_processes_used_since_the_previous_reading() -> None:
    c = _Clock()
    gauge = c.gauge(min_window=0.05)
    assert gauge.read() is None  # no window yet
    c.advance(wall=1.0, busy=1.6, own=1.0)  # this process used a core, others 0.6 of one
    assert gauge.read() == pytest.approx(0.6)
    c.advance(wall=0.01, busy=0.0, own=0.0)  # too short a window: the last estimate, window kept open
    assert gauge.read() == pytest.approx(0.6)
    c.advance(wall=0.99, busy=2.0, own=1.99)  # the open window now spans 1 s with others at ~0
    assert gauge.read() == pytest.approx(0.01)
    c.advance(wall=1.0, busy=0.9, own=1.0)  # accounting jitter never gives a negative count
    assert gauge.read() == 0.0


@pytest.mark.parametrize(
    ("others", "limit", "cores", "expected"),
    [
        (None, 2, 2, 1),  # nothing measured yet: one thread, the safe choice
        (0.1, 2, 2, 2),  # idle machine: every thread torch has
        (1.0, 2, 2, 1),  # a neighbour busy on one of two cores
        (0.6, 2, 2, 1),
        (0.4, 2, 2, 2),
        (2.5, 8, 8, 6),  # round(8 - 2.5) = 6 (rounds half to even)
        (0.0, 4, 8, 4),  # never more than the limit
        (9.0, 4, 8, 1),  # never fewer than one
    ],
)
def test_spare_threads_are_what_the_other_processes_leave_free(
    others: float | None, limit: int, cores: int, expected: int
) -> None:
    c = _Clock()
    gauge = c.gauge()
    if others is not None:
        gauge.read()
        c.advance(wall=1.0, busy=others + 1.0, own=1.0)
    assert spare_threads(limit, cpu=gauge, cores=cores) == expected


def test_spare_threads_with_a_limit_of_one_does_not_read_the_gauge() -> None:
    gauge = CpuGauge(system_busy=lambda: pytest.fail("read"), own=lambda: pytest.fail("read"))
    assert spare_threads(1, cpu=gauge) == 1


def test_gauge_sees_a_busy_neighbour_process() -> None:
    gauge = CpuGauge()
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # past the interpreter's start
        gauge.read()
        time.sleep(0.6)
        others = gauge.read()
    finally:
        neighbour.kill()
        neighbour.wait()
    # The neighbour spins on a whole core for the whole window; anything else running only adds to it.
    assert others is not None and others >= 0.5


@pytest.mark.parametrize(("others", "threads"), [(0.0, 2), (1.0, 1)], ids=["idle", "busy-neighbour"])
def test_decoding_uses_the_spare_threads_and_gives_the_same_labels(
    monkeypatch: pytest.MonkeyPatch, others: float, threads: int
) -> None:
    model = cs.load_bundled_model()
    image = synthetic_frame((128, 128), seed=2, n_cells=6)[0]
    embedding = cs.encode(image, model)
    c = _Clock()
    gauge = c.gauge()
    gauge.read()
    c.advance(wall=1.0, busy=others + 1.0, own=1.0)
    monkeypatch.setattr(cs_threads, "gauge", gauge)
    monkeypatch.setattr(cs_threads, "_usable_cores", lambda: 2)
    used: list[int] = []
    real = cs_threads.intra_op_threads

    @contextlib.contextmanager
    def recording(n: int) -> Iterator[None]:
        with real(n):
            used.append(torch.get_num_threads())
            yield

    monkeypatch.setattr(cs_threads, "intra_op_threads", recording)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        decoded = cs.decode(embedding, model)
        assert torch.get_num_threads() == 2  # restored
        torch.set_num_threads(1)
        single = cs.decode(embedding, model)
    finally:
        torch.set_num_threads(previous)
    assert used[0] == threads
    assert decoded.n_cells > 0
    np.testing.assert_array_equal(decoded.labels, single.labels)
