"""Advisory file locks that exclude both processes and the threads of one process."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

__all__ = ["flock"]

_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


@contextmanager
def flock(path: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold an advisory `flock` on ``path``, one file descriptor per call.

    Local `flock` locks belong to the descriptor, so threads exclude each other too; exclusive holders
    also take a process-wide thread lock, because on NFS `flock` is emulated with POSIX locks, which
    do not exclude threads of one process.
    """
    thread_lock: Any = nullcontext()
    if exclusive:
        with _THREAD_LOCKS_GUARD:
            thread_lock = _THREAD_LOCKS.setdefault(str(path), threading.Lock())
    with thread_lock:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock
