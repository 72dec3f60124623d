"""acquisition.allocator: glibc malloc thresholds that keep frame buffers in the heap.

The settings are process-wide, so each check runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from acquisition import allocator

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)

# A thread (like ZeroMQ's I/O thread, which allocates received messages) allocates four 8 MiB buffers,
# touches them, frees them, and repeats; it reports its own page faults per round.
CHURN = """
import json, resource, sys, threading
import numpy as np
from acquisition import allocator
{setup}
faults = []
def churn():
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        buffers = [np.ones(4 << 20, np.uint16) for _ in range(4)]
        del buffers
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=churn)
thread.start()
thread.join()
print(json.dumps(faults))
"""


def _run(code: str) -> Any:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_freed_frame_buffers_are_reused_without_page_faults() -> None:
    default = _run(CHURN.format(setup=""))
    tuned = _run(CHURN.format(setup="allocator.retain_frame_buffers(8 << 20, buffers=8)"))
    # glibc's defaults hand most of the freed memory back and fault it in again every round (a round
    # touches 8192 pages); with the thresholds raised, rounds after the first reuse the heap.
    assert min(default[1:]) > 500, default
    assert max(tuned[1:]) < 50, tuned


@glibc
def test_thresholds_only_grow_and_are_clipped_to_glibcs_ceiling() -> None:
    result = _run(
        """
        import json
        from acquisition.allocator import retain_frame_buffers
        a = retain_frame_buffers(8 << 20, buffers=4)
        b = retain_frame_buffers(1 << 20, buffers=2)   # smaller: nothing is lowered
        c = retain_frame_buffers(1 << 30, buffers=3)   # above the ceiling: clipped
        print(json.dumps([[t.mmap_threshold, t.trim_threshold] for t in (a, b, c)]))
        """
    )
    page, ceiling = 4096, allocator.MAX_MMAP_THRESHOLD
    first = (8 << 20) + page
    assert result[0] == [first, 4 * first]
    assert result[1] == result[0]
    assert result[2] == [ceiling, 3 * ceiling]


@glibc
def test_the_listener_tunes_the_allocator_unless_told_not_to() -> None:
    code = """
        import asyncio, json
        from acquisition import allocator
        from acquisition.listener import FrameListener
        async def main(retain):
            async with FrameListener(endpoint="tcp://127.0.0.1:*", max_queued=4, rcvhwm=2,
                                     max_frame_bytes=16 << 20, retain_buffers=retain):
                t = allocator.applied_tuning()
                return None if t is None else [t.mmap_threshold, t.trim_threshold]
        print(json.dumps(asyncio.run(main({retain}))))
        """
    assert _run(code.format(retain=False)) is None
    threshold = (16 << 20) + 4096
    assert _run(code.format(retain=True)) == [threshold, (4 + 2 + 4) * threshold]


def test_does_nothing_on_other_c_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.retain_frame_buffers(8 << 20, buffers=4) is None


def test_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="≥ 1"):
        allocator.retain_frame_buffers(0, buffers=4)
    with pytest.raises(ValueError, match="≥ 1"):
        allocator.retain_frame_buffers(1 << 20, buffers=0)


@glibc
def test_the_service_settings_reach_the_listener() -> None:
    # The ingress builds its frame source with serving.components.frame_listener(config).
    code = """
        import asyncio, json
        from acquisition import allocator
        from serving.components import frame_listener
        from serving.config import ServiceConfig
        async def main(retain):
            config = ServiceConfig.model_validate({{
                "ingest": {{"endpoint": "tcp://127.0.0.1:*", "max_queued": 4, "rcvhwm": 2,
                            "max_frame_bytes": 8 << 20, "retain_buffers": retain}},
            }})
            async with frame_listener(config) as listener:
                assert (listener.max_queued, listener.max_frame_bytes) == (4, 8 << 20)
                t = allocator.applied_tuning()
                return None if t is None else t.mmap_threshold
        print(json.dumps(asyncio.run(main({retain}))))
        """
    assert _run(code.format(retain=False)) is None
    assert _run(code.format(retain=True)) == (8 << 20) + 4096


@glibc
@pytest.mark.parametrize(("env", "applied"), [({}, "True"), ({"MALLOC_ARENA_MAX": "4"}, "False")])
def test_malloc_arenas_are_limited_unless_the_environment_chose(env: dict[str, str], applied: str) -> None:
    probe = "from acquisition.allocator import limit_malloc_arenas; print(limit_malloc_arenas(2))"
    clean = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run(
        [sys.executable, "-c", probe], env={**clean, **env}, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == applied
