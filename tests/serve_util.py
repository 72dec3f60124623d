"""Helpers shared by the tests that run the service end to end."""

from __future__ import annotations

import time

from acquisition.client import ResultSubscriber
from acquisition.protocol import AcquisitionSummary


def collect_results(
    sub: ResultSubscriber, acquisition: str, timeout: float = 240
) -> tuple[list, AcquisitionSummary]:
    """Per-frame result messages of ``acquisition`` until its summary arrives: ``(messages, summary)``."""
    results = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = sub.recv(timeout=deadline - time.monotonic())
        if msg.acquisition != acquisition:
            continue
        if isinstance(msg.payload, AcquisitionSummary):
            return results, msg.payload
        results.append(msg)
    raise TimeoutError(f"no summary for {acquisition} within {timeout} s")
