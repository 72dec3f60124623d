"""Keep frame-sized buffers in the process heap (glibc ``malloc`` tuning for an ingest process).

ZeroMQ allocates every received message with ``malloc`` on its I/O thread. With glibc's defaults, a
multi-MiB buffer freed by the consumer is soon handed back to the kernel (``munmap``, or ``madvise`` when
the heap shrinks), and the next message's buffer is faulted in again page by page: for 8 MiB frames that
is hundreds to thousands of page faults per frame, about a sixth of the receiving process's CPU time.
:func:`retain_frame_buffers` raises two ``mallopt`` thresholds so buffers up to the frame size come from
the heap and freed ones stay there for the next frame:

- ``M_MMAP_THRESHOLD``: allocations of at least this size get their own ``mmap``; raised to the frame
  size, at most glibc's ceiling of 32 MiB (larger frames are mapped per message whatever we do);
- ``M_TRIM_THRESHOLD``: free memory at the top of a heap beyond this is returned to the kernel; raised to
  what the caller may free at once (its queue depth × the buffer size).

Both settings are process-wide and only ever raised, so several listeners in one process agree. Memory the
process once used for frames stays mapped for the next ones (bounded by the peak working set); memory is
no longer returned between frames. On other C libraries (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import threading
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "MAX_MMAP_THRESHOLD",
    "AllocatorTuning",
    "applied_tuning",
    "limit_malloc_arenas",
    "retain_frame_buffers",
]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MAX_MMAP_THRESHOLD = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)
"""glibc's largest ``M_MMAP_THRESHOLD`` (``DEFAULT_MMAP_THRESHOLD_MAX``): 32 MiB on 64-bit systems."""
_PAGE = 4096


@dataclass(frozen=True, slots=True)
class AllocatorTuning:
    """The thresholds in force after :func:`retain_frame_buffers`, in bytes."""

    mmap_threshold: int
    trim_threshold: int


_lock = threading.Lock()
_applied: AllocatorTuning | None = None


def _mallopt() -> Callable[[int, int], int] | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - glibc always has it
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def retain_frame_buffers(buffer_bytes: int, *, buffers: int) -> AllocatorTuning | None:
    """Let ``buffers`` freed buffers of up to ``buffer_bytes`` stay in the heap for reuse.

    Parameters
    ----------
    buffer_bytes : int
        Largest buffer to keep in the heap (clipped to :data:`MAX_MMAP_THRESHOLD`).
    buffers : int
        How many such buffers may be freed at once (e.g. queue depth + ZeroMQ high-water mark).

    Returns
    -------
    AllocatorTuning or None
        The thresholds now in force (the largest asked for so far in this process), or ``None`` where the
        C library is not glibc and nothing was changed.
    """
    global _applied
    if buffer_bytes < 1 or buffers < 1:
        raise ValueError(f"buffer_bytes and buffers must be ≥ 1, got {buffer_bytes} and {buffers}")
    mallopt = _mallopt()
    if mallopt is None:
        return None
    # A chunk of n bytes needs n + 16 with its header; round up to pages and keep one page of slack.
    mmap_threshold = min(MAX_MMAP_THRESHOLD, (buffer_bytes + 2 * _PAGE - 1) // _PAGE * _PAGE)
    trim_threshold = min(buffers * mmap_threshold, (1 << 31) - 1)  # mallopt takes a C int
    with _lock:
        if _applied is not None:
            mmap_threshold = max(mmap_threshold, _applied.mmap_threshold)
            trim_threshold = max(trim_threshold, _applied.trim_threshold)
            if _applied == AllocatorTuning(mmap_threshold, trim_threshold):
                return _applied
        ok = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
        ok = mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1 and ok
        if not ok:  # pragma: no cover - both values are within glibc's limits
            log.warning("mallopt refused mmap/trim thresholds %d/%d", mmap_threshold, trim_threshold)
            return _applied
        _applied = AllocatorTuning(mmap_threshold, trim_threshold)
        log.debug(
            "malloc keeps buffers up to %d bytes in the heap (trims above %d)", mmap_threshold, trim_threshold
        )
        return _applied


def applied_tuning() -> AllocatorTuning | None:
    """The thresholds :func:`retain_frame_buffers` set in this process, or ``None`` if it never did."""
    return _applied


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Let glibc create at most ``arenas`` malloc arenas in this process (``M_ARENA_MAX``).

    A model replica allocates multi-MiB embeddings and masks on whichever worker thread runs the request;
    by default glibc gives threads up to 8 arenas per core, and each arena's heap fragments on its own,
    so the process's resident memory creeps up under sustained load (2.6 MiB/min in the Decoder at
    ~9 frames/s of 512², against 0.9 MiB/min at a higher rate with two arenas; BENCHMARKS.md). Call it
    before the worker threads start; an explicit ``MALLOC_ARENA_MAX`` in the environment wins. Returns
    True when the limit was set.
    """
    import os

    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(_M_ARENA_MAX, int(arenas)))
