"""CPU thread settings: passive OpenMP waiting when cellsam_core loads first, one thread while decoding."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import cellsam_core as cs
from cellsam_core.synthetic import synthetic_frame
from cellsam_core.threads import intra_op_threads

_PROBE = "import os, sys; {before}import cellsam_core; print(os.environ.get('OMP_WAIT_POLICY'))"


@pytest.mark.parametrize(
    ("before", "env", "expected"),
    [
        ("", {}, "PASSIVE"),  # nobody chose, torch not loaded yet: idle workers sleep
        ("", {"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),  # the user's choice wins
        ("", {"GOMP_SPINCOUNT": "1000"}, None),  # so does any other wait setting
        ("import torch; ", {}, None),  # too late: OpenMP has read its settings
    ],
    ids=["first", "user-policy", "user-spincount", "torch-first"],
)
def test_passive_wait_only_when_it_can_take_effect_and_nobody_chose(
    before: str, env: dict[str, str], expected: str | None
) -> None:
    chosen = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
    clean = {k: v for k, v in os.environ.items() if k not in chosen}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(before=before)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == str(expected)


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


def test_decoding_runs_on_one_thread_and_gives_the_same_labels() -> None:
    model = cs.load_bundled_model()
    image = synthetic_frame((128, 128), seed=2, n_cells=6)[0]
    embedding = cs.encode(image, model)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threaded = cs.decode(embedding, model)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        single = cs.decode(embedding, model)
    finally:
        torch.set_num_threads(previous)
    assert threaded.n_cells > 0
    np.testing.assert_array_equal(threaded.labels, single.labels)
