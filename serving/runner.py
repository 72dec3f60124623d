"""Running the service from a process: embedded local Ray or an existing cluster, clean shutdown."""

import json
import logging
import os
import signal
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from serving.config import ServiceConfig

__all__ = ["RunningService", "free_port", "start_service", "wait_for_signal"]

log = logging.getLogger(__name__)

APP_NAME = "cellsam"


@dataclass
class RunningService:
    """A started service: where it listens, and how to stop it."""

    http_url: str
    ingest: str
    results: str
    metrics_url: str
    started_ray: bool

    def get_json(self, path: str, timeout: float = 30) -> Any:
        with urllib.request.urlopen(self.http_url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        """Delete the app (the ingress finishes frames in flight first), then Serve and Ray if ours."""
        import ray
        from ray import serve

        try:
            serve.delete(APP_NAME)
        finally:
            if self.started_ray:
                serve.shutdown()
                ray.shutdown()

    def describe(self) -> str:
        return "\n".join(
            [
                f"  frames in (ZeroMQ PULL): {self.ingest}",
                f"  results out (ZeroMQ PUB): {self.results}",
                f"  HTTP: {self.http_url}  (POST /segment, GET /healthz, GET /acquisitions)",
                f"  metrics: {self.metrics_url}",
            ]
        )


def start_service(
    config: ServiceConfig,
    *,
    address: str | None = None,
    http_host: str = "127.0.0.1",
    http_port: int = 8000,
    num_cpus: int | None = None,
) -> RunningService:
    """Start (or connect to) Ray, start Serve's HTTP proxy and deploy the app; returns once it is ready.

    Parameters
    ----------
    address : str, optional
        A Ray cluster to connect to (``ray://host:10001`` or ``auto``); default ``$RAY_ADDRESS``, else an
        embedded local Ray is started (and stopped by :meth:`RunningService.stop`).
    """
    import ray
    from ray import serve

    from serving.app import build_app

    address = address or os.environ.get("RAY_ADDRESS")
    started_ray = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # An embedded Ray needs a CPU slot for each of the three deployments, even on 2 cores.
            cpus = num_cpus or max(4, os.cpu_count() or 1)
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            started_ray = True
    serve.start(http_options={"host": http_host, "port": http_port})
    serve.run(build_app(config.model_dump()), name=APP_NAME, route_prefix="/")
    http_url = f"http://{'127.0.0.1' if http_host in ('0.0.0.0', '::') else http_host}:{http_port}"
    endpoints = _get_endpoints(http_url)
    metrics_host = config.metrics.host if config.metrics.host not in ("0.0.0.0", "::") else "127.0.0.1"
    return RunningService(
        http_url=http_url,
        ingest=endpoints["ingest"],
        results=endpoints["results"],
        metrics_url=f"http://{metrics_host}:{endpoints['metrics_port']}/metrics",
        started_ray=started_ray,
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for local services that need a fixed port up front)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _get_endpoints(http_url: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(http_url + "/endpoints", timeout=10) as r:
                return dict(json.loads(r.read()))
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class _SignalWaiter:
    def __init__(self) -> None:
        self._event = threading.Event()
        self._received: list[int] = []
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: object) -> None:
        self._received.append(signum)
        self._event.set()

    def __enter__(self) -> "_SignalWaiter":
        # Installed after Ray started: Ray's own handlers would otherwise abort the process.
        self._previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def wait(self) -> int:
        while not self._event.wait(0.5):
            pass
        return self._received[0]

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


def wait_for_signal() -> _SignalWaiter:
    """Context manager catching SIGINT/SIGTERM; ``.wait()`` blocks until one arrives and returns it."""
    return _SignalWaiter()
