"""CPU threads: sleeping OpenMP workers, and one intra-op thread for the steps made of small tensor calls.

Why. PyTorch's CPU kernels run on an OpenMP pool (``libgomp`` in the Linux wheels) whose idle workers
*spin* after every parallel region (``OMP_WAIT_POLICY`` unset means a busy wait of ~300,000 iterations
before sleeping). CellSAM's decoding is thousands of small tensor calls with Python and NumPy work in
between: after each call the worker spins on one core while the main thread needs it, and on a machine
where anything else runs (acquisition software on a microscope PC, a shared cluster node) the spinning
workers and the neighbour take turns with the main thread. Measured on 2 cores with another process busy:
``cellsam-stream segment`` of a 512² frame took 12.7 s with the default pool and 0.8 s with
``OMP_WAIT_POLICY=PASSIVE`` or with one thread (``benchmarks/bench_threads.py``).

What this module does:

* :func:`prefer_passive_wait` (called when :mod:`cellsam_core` is imported) sets
  ``OMP_WAIT_POLICY=PASSIVE`` if torch has not loaded OpenMP yet and nobody chose a wait policy: idle
  workers then sleep at once. The runtime reads it only when it loads, so it does nothing when torch was
  imported first (a notebook that imports torch before cellsam_core); an explicit ``OMP_WAIT_POLICY``,
  ``GOMP_SPINCOUNT`` or ``KMP_BLOCKTIME`` always wins.
* :func:`intra_op_threads` runs a block with at most a given number of intra-op threads (the decoding
  steps use one: their calls are too small to split, so this is as fast on an idle machine and immune to
  spinning whatever the wait policy), restoring the caller's count after.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

__all__ = ["intra_op_threads", "prefer_passive_wait"]

#: Environment variables by which a user (or a launcher) already chose how OpenMP workers wait.
_WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")

_lock = threading.Lock()
_inside = 0  # blocks of intra_op_threads running now, in any thread
_restore: int | None = None  # the count to restore when the last of them ends


def prefer_passive_wait() -> bool:
    """Make idle OpenMP workers sleep instead of spinning, if it is still possible and nobody chose.

    Returns True when ``OMP_WAIT_POLICY=PASSIVE`` was set by this call.
    """
    if "torch" in sys.modules or any(name in os.environ for name in _WAIT_SETTINGS):
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run the block with at most ``n`` torch intra-op threads; the caller's count is restored after.

    Blocks may run concurrently in several threads (the decoder replica decodes in worker threads): the
    first to enter lowers the count and the last to leave restores it.
    """
    import torch

    global _inside, _restore
    with _lock:
        if _inside == 0:
            current = torch.get_num_threads()
            _restore = current if current > n else None
            if _restore is not None:
                torch.set_num_threads(n)
        _inside += 1
    try:
        yield
    finally:
        with _lock:
            _inside -= 1
            if _inside == 0 and _restore is not None:
                torch.set_num_threads(_restore)
                _restore = None
