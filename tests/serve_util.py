"""Helpers shared by the tests that run the service end to end."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

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


ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ServeProcess:
    """``cellsam-stream serve`` in a child process, its endpoints read from what it prints."""

    proc: subprocess.Popen[str]
    ingest: str
    results: str
    lines: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, *args: str, timeout: float = 300) -> ServeProcess:
        """Start ``cellsam-stream serve ARGS`` (ZeroMQ on free loopback ports) and wait until it serves."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "serve", "--ingest", "tcp://127.0.0.1:*",
             "--results", "tcp://127.0.0.1:*", "--metrics-port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=ROOT,
            start_new_session=True,  # its own process group: the whole service can be killed at once
        )  # fmt: skip
        lines: list[str] = []
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        output = "".join(lines)
        if "Ctrl-C" not in output:
            proc.kill()
            raise RuntimeError(f"the service did not start:\n{output}")
        ingest = re.search(r"frames in \(ZeroMQ PULL\): (\S+)", output)
        results = re.search(r"results out \(ZeroMQ PUB\): (\S+)", output)
        assert ingest and results, output
        return cls(proc, ingest.group(1), results.group(1), lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 300) -> tuple[int, str]:
        """Send ``sig`` to the CLI process and wait: ``(exit code, everything it printed)``."""
        self.proc.send_signal(sig)
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, "".join(self.lines) + out

    def kill_all(self) -> None:
        """SIGKILL the CLI and every process it started (Ray's GCS, raylet, workers, replicas)."""
        tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(tree, timeout=30)
        self.proc.communicate(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill_all()
