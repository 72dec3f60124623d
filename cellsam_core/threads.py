"""CPU threads: as many intra-op threads as the other processes leave free, chosen per call.

Why. PyTorch's CPU kernels run on an OpenMP pool (``libgomp`` in the Linux wheels) whose idle workers
*spin* for a while after every parallel region (``OMP_WAIT_POLICY`` unset). CellSAM's decoding is thousands
of small tensor calls with Python and NumPy work in between. On a machine with free cores that spinning is
what makes a second thread pay (a sleeping worker takes longer to wake than the call lasts). On a machine
where anything else runs (acquisition software on a microscope PC, a shared cluster node) the spinning
workers, the main thread and the neighbour take turns on the cores: measured on 2 cores with another
process busy, ``cellsam-stream segment`` of a 512² frame took 12.7 s with the default pool and 0.8 s with
one thread (``benchmarks/bench_threads.py``). Making the workers sleep (``OMP_WAIT_POLICY=PASSIVE``)
cures the busy case but costs 1.3-1.4x on an idle one.

So the number of threads follows the machine instead:

* :class:`CpuGauge` measures how many cores other processes used since its previous reading (system CPU
  time minus this process's own, from psutil); :data:`gauge` is the process-wide one, first read when
  :mod:`cellsam_core` is imported.
* :func:`spare_threads` turns that into a thread count: all of torch's when the cores are free, fewer
  (down to one) when other processes use them, one before anything was measured.
* :func:`intra_op_threads` runs a block with at most that many threads, restoring the caller's count
  after. :func:`cellsam_core.inference.encode_batch` and :func:`~cellsam_core.inference.decode_batch` run
  on a CPU inside it, so each frame adapts to what ran during the previous one. With one thread there
  are no parallel regions, hence no workers to spin.

An explicit ``OMP_NUM_THREADS`` or ``torch.set_num_threads`` is the upper limit; ``OMP_WAIT_POLICY`` and
``GOMP_SPINCOUNT`` keep their usual meaning.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator

import psutil

__all__ = ["CpuGauge", "gauge", "intra_op_threads", "spare_threads"]

_lock = threading.Lock()
_inside = 0  # blocks of intra_op_threads running now, in any thread
_restore: int | None = None  # the count to restore when the last of them ends


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


def _system_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (everything but idle and I/O wait; Linux counts guest
    time inside user time as well, so it is not added twice)."""
    t = psutil.cpu_times()
    not_busy = ("idle", "iowait", "guest", "guest_nice")
    return float(sum(t)) - sum(float(getattr(t, name, 0.0)) for name in not_busy)


def _own_seconds() -> float:
    """CPU seconds this process (all its threads) has used."""
    t = psutil.Process().cpu_times()
    return float(t.user) + float(t.system)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class CpuGauge:
    """Cores that other processes kept busy, averaged since the previous reading.

    Each :meth:`read` closes a window that started at the previous one (windows shorter than
    ``min_window`` seconds are too noisy: the last estimate is returned and the window keeps growing).
    The first reading has no window and returns None.

    Parameters
    ----------
    min_window : float
        Shortest window, in seconds, that gives a new estimate.
    clock, system_busy, own : callable, optional
        Monotonic seconds; CPU seconds of all cores busy; CPU seconds of this process. Injectable for
        tests; the defaults read the operating system through psutil.
    """

    def __init__(
        self,
        *,
        min_window: float = 0.02,
        clock: Callable[[], float] = time.monotonic,
        system_busy: Callable[[], float] = _system_busy_seconds,
        own: Callable[[], float] = _own_seconds,
    ) -> None:
        self._min_window = min_window
        self._clock = clock
        self._system_busy = system_busy
        self._own = own
        self._lock = threading.Lock()
        self._start: tuple[float, float, float] | None = None
        self._estimate: float | None = None

    def read(self) -> float | None:
        """Cores other processes used since the previous reading (None before there is a window)."""
        with self._lock:
            now = (self._clock(), self._system_busy(), self._own())
            if self._start is None:
                self._start = now
                return self._estimate
            wall = now[0] - self._start[0]
            if wall < self._min_window:
                return self._estimate
            others = ((now[1] - self._start[1]) - (now[2] - self._start[2])) / wall
            self._start = now
            self._estimate = max(0.0, others)
            return self._estimate


#: The gauge :func:`spare_threads` reads by default (one per process).
gauge = CpuGauge()


def spare_threads(limit: int | None = None, *, cpu: CpuGauge | None = None, cores: int | None = None) -> int:
    """Intra-op threads for a block of small tensor calls: as many as the other processes leave free.

    ``min(limit, round(cores - others))``, at least 1, where ``others`` is what the gauge measured since its
    previous reading (this call reads it); 1 while nothing has been measured yet (the safe choice).

    Parameters
    ----------
    limit : int, optional
        Most threads to use (default: torch's current count).
    cpu : CpuGauge, optional
        Default: the process-wide :data:`gauge`.
    cores : int, optional
        Cores this process may run on (default: its CPU affinity).
    """
    if limit is None:
        import torch

        limit = torch.get_num_threads()
    if limit <= 1:
        return 1
    others = (cpu or gauge).read()
    if others is None:
        return 1
    free = (cores or _usable_cores()) - others
    return max(1, min(limit, round(free)))
