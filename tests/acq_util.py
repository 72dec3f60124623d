"""Helpers shared by the acquisition socket tests (not a test module)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

ANY_PORT = "tcp://127.0.0.1:*"


def run(coro: Awaitable[Any], timeout: float = 30.0) -> Any:
    """Run a test coroutine with a deadline, so a hang fails instead of blocking."""

    async def main() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(main())


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait (polling) until ``condition()`` is true; ``TimeoutError`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.005)


@contextmanager
def dead_endpoint() -> Iterator[str]:
    """A loopback TCP endpoint nobody accepts on: the port is held (bound, not listening), so no other
    test or process can take it while a sender keeps trying to connect to it."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    try:
        yield f"tcp://127.0.0.1:{holder.getsockname()[1]}"
    finally:
        holder.close()
