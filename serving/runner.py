"""Running the service from a process: embedded local Ray or an existing cluster, clean shutdown.

An embedded Ray binds loopback unless ``security.expose`` is set (:mod:`serving.ray_network`). Ray's own
log lines stay in its log files (``/tmp/ray/session_latest/logs``) unless ``verbose``. A deployment that
fails to start is reported with its replica's exception as soon as Serve sees it, not after Serve's
retries.
"""

import contextlib
import json
import logging
import os
import re
import signal
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from serving.addresses import LOOPBACK, is_loopback_host
from serving.config import ServiceConfig

__all__ = ["RunningService", "StartError", "free_port", "start_service", "wait_for_signal"]

log = logging.getLogger(__name__)

APP_NAME = "cellsam"
DEFAULT_HTTP_PORT = 8000

#: Loggers of Ray that talk at start and stop (token mode, "Started a local Ray instance", Serve's
#: "Connecting to existing Serve app", "Application ready", ...).
_RAY_LOGGERS = ("ray", "ray.serve")


class StartError(RuntimeError):
    """The service did not start; the message says why (for a failed deployment: its replica's error)."""


@dataclass
class RunningService:
    """A started service: where it listens, and how to stop it."""

    http_url: str
    ingest: str
    results: str
    metrics_url: str
    started_ray: bool
    http_token: str | None = None

    def get_json(self, path: str, timeout: float = 30) -> Any:
        return _get_json(self.http_url + path, self.http_token, timeout)

    def drain(self, deadline_s: float | None = None) -> dict[str, Any]:
        """Ask the Ingress to stop taking frames and finish the accepted ones while every deployment is
        still up; returns its report (``unfinished``: frames that failed as ``shutdown``)."""
        from ray import serve

        handle = serve.get_app_handle(APP_NAME)
        wait = None if deadline_s is None else deadline_s + 60
        report: dict[str, Any] = handle.drain.remote(deadline_s).result(timeout_s=wait)
        return report

    def stop(self, deadline_s: float | None = None) -> dict[str, Any] | None:
        """Drain the Ingress, then delete the app, then Ray if it is ours; returns the drain report
        (None when the drain itself failed, e.g. the Ingress was already gone).

        Draining first keeps the order: the model deployments are removed only after the frames in
        flight are finished. An embedded Ray goes down with its Serve controller; ``serve.shutdown()``
        first would only add a "graceful_shutdown failed ... killed by ray.kill" line from Ray.
        """
        import ray
        from ray import serve

        report = None
        try:
            report = self.drain(deadline_s)
        except Exception as exc:
            log.warning("draining the Ingress failed (%s: %s); deleting the app", type(exc).__name__, exc)
        try:
            serve.delete(APP_NAME)
        finally:
            if self.started_ray:
                ray.shutdown()
                _forget_serve_client()
        return report

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
    http_host: str | None = None,
    http_port: int | None = None,
    num_cpus: int | None = None,
    replace: bool = False,
    verbose: bool = False,
    start_timeout: float = 600,
) -> RunningService:
    """Start (or connect to) Ray, start Serve's HTTP proxy and deploy the app; returns once it is ready.

    Parameters
    ----------
    address : str, optional
        A Ray cluster to connect to (``ray://host:10001`` or ``auto``); default ``$RAY_ADDRESS``, else an
        embedded local Ray is started (and stopped by :meth:`RunningService.stop`), on loopback unless
        ``config.security.expose``.
    http_host, http_port : optional
        Serve's HTTP proxy. Defaults: loopback (all interfaces with ``expose``) and 8000; on a cluster
        where Serve already runs, its own.
    replace : bool
        On a cluster, replace an application of the same name that is already there (otherwise that is
        an error, raised before anything is changed).
    verbose : bool
        Let Ray's own log lines through to this terminal.

    Raises
    ------
    StartError
        Serve on the cluster does not match, the app exists, or a deployment failed to start (with the
        replica's exception text).
    """
    from serving.ray_network import local_only_ray
    from serving.security import read_http_token

    address = address or os.environ.get("RAY_ADDRESS")
    # A loopback address names a local-only Ray on this machine (another `cellsam-stream serve`), which
    # this driver must join as one.
    local_only = (not address and not config.security.expose) or _is_loopback_address(address)
    _quiet_ray(verbose)
    quiet = logging.DEBUG if verbose else logging.ERROR
    started_ray = False
    with local_only_ray() if local_only else contextlib.nullcontext():
        import ray  # inside: Ray reads the local-only switch when it is first imported

        if not ray.is_initialized():
            if address:
                _join_cluster(address, verbose=verbose, logging_level=quiet)
            else:
                # An embedded Ray needs a CPU slot for each of the three deployments, even on 2 cores.
                cpus = num_cpus or max(4, os.cpu_count() or 1)
                ray.init(
                    num_cpus=cpus,
                    include_dashboard=False,
                    log_to_driver=verbose,
                    logging_level=quiet,
                    _node_ip_address=LOOPBACK if local_only else None,
                )
                started_ray = True
    from ray import serve

    from serving.app import build_app

    _quiet_ray(verbose)  # Serve sets up its logger on import
    if http_host is None:
        http_host = "0.0.0.0" if config.security.expose else LOOPBACK
    try:
        if address:
            http_host, http_port = _check_running_serve(http_host, http_port, replace=replace)
        http_port = DEFAULT_HTTP_PORT if http_port is None else http_port
        serve.start(http_options={"host": http_host, "port": http_port})
        _deploy(build_app(config.model_dump()), timeout=start_timeout)
    except BaseException:
        if started_ray:
            ray.shutdown()
            _forget_serve_client()
        raise
    http_url = f"http://{LOOPBACK if not is_loopback_host(http_host) else http_host}:{http_port}"
    token = read_http_token(config.security)
    endpoints = _get_endpoints(http_url, token)
    metrics_host = config.metrics.host if is_loopback_host(config.metrics.host) else LOOPBACK
    return RunningService(
        http_url=http_url,
        ingest=endpoints["ingest"],
        results=endpoints["results"],
        metrics_url=f"http://{metrics_host}:{endpoints['metrics_port']}/metrics",
        started_ray=started_ray,
        http_token=token,
    )


def _join_cluster(address: str, *, verbose: bool, logging_level: int) -> None:
    import ray
    from ray.exceptions import AuthenticationError

    try:
        ray.init(address=address, log_to_driver=verbose, logging_level=logging_level)
    except (ConnectionError, AuthenticationError, TimeoutError) as exc:
        auth = (
            ""
            if os.environ.get("RAY_AUTH_MODE") == "token"
            else (
                "; if the cluster uses token authentication (Ray's default since 2.59), set "
                "RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
                "~/.ray/auth_token; docs/deploy.md)"
            )
        )
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StartError(f"cannot join the Ray cluster at {address}: {first}{auth}") from None


def _is_loopback_address(address: str | None) -> bool:
    if not address or address == "auto":
        return False
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    return is_loopback_host(host)


def _quiet_ray(verbose: bool) -> None:
    """Ray's and Serve's log lines go to Ray's log files only, unless ``verbose``."""
    if verbose:
        return
    for name in _RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _forget_serve_client() -> None:
    """After the embedded Ray is gone, drop Serve's cached client of it (a later start makes a new one)."""
    from ray.serve.context import _set_global_client

    _set_global_client(None)


def _check_running_serve(http_host: str, http_port: int | None, *, replace: bool) -> tuple[str, int | None]:
    """On a cluster: Serve's HTTP options and the app this would replace, checked before any change.

    Returns the HTTP host and port to use (the running Serve's, when it runs).
    """
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return http_host, http_port
    details = ServeInstanceDetails(**client.get_serve_details())
    options = details.http_options
    if options is not None:
        if http_port is not None and options.port != http_port:
            raise StartError(
                f"Serve already runs on this cluster with HTTP on port {options.port}, not {http_port}: "
                f"drop --http-port (or pass --http-port {options.port}); Serve's HTTP options change only "
                "when Serve is restarted (`serve shutdown`)"
            )
        http_host, http_port = options.host or http_host, options.port
    app = details.applications.get(APP_NAME)
    if app is not None and not replace:
        raise StartError(
            f"an application {APP_NAME!r} already runs on this cluster ({app.status.value}, since "
            f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(app.last_deployed_time_s))}): pass --replace "
            "to redeploy it, or remove it first with `serve delete cellsam`"
        )
    for name, other in details.applications.items():
        if name != APP_NAME and other.route_prefix == "/":
            raise StartError(
                f"the application {name!r} already serves the route prefix '/' on this cluster; cellsam "
                "needs it: remove that application first"
            )
    return http_host, http_port


def _deploy(app: Any, *, timeout: float) -> None:
    """Deploy and wait until running; on the first replica failure, raise with the replica's error."""
    from ray import serve
    from ray.serve.api import _run

    # Not blocking: Serve would otherwise retry a failing constructor for a minute before saying
    # "Failed to update the deployments" without the cause.
    _run(app, name=APP_NAME, route_prefix="/", _blocking=False)
    deadline = time.monotonic() + timeout
    while True:
        status = serve.status().applications.get(APP_NAME)
        if status is not None and status.status.value == "RUNNING":
            return
        failure = _deployment_failure(status)
        if failure is not None:
            try:
                serve.delete(APP_NAME, _blocking=False)
            except Exception:  # best effort: the cause below is what matters
                log.debug("could not delete the failed app", exc_info=True)
            raise StartError(failure)
        if time.monotonic() > deadline:
            raise StartError(f"the service did not become ready within {timeout:g} s (see `serve status`)")
        time.sleep(0.25)


def _deployment_failure(status: Any) -> str | None:
    """``"DEPLOYMENT: the replica's exception"`` when a deployment failed to start, else ``None``."""
    if status is None:
        return None
    for name, deployment in status.deployments.items():
        message = deployment.message or ""
        if "failed to start" in message or deployment.status.value == "DEPLOY_FAILED":
            return f"the {name} deployment failed to start: {_exception_line(message)}"
    if status.status.value == "DEPLOY_FAILED":
        return f"the application failed to deploy: {_exception_line(status.message or '')}"
    return None


def _exception_line(message: str) -> str:
    """The last ``SomeError: text`` line of a traceback inside Serve's status message."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", line):
            name, _, text = line.partition(": ")
            return f"{name.rsplit('.', 1)[-1]}: {text}" if text else name
    return lines[-1] if lines else "no detail (see `serve status` and the replica logs)"


def _get_json(url: str, token: str | None, timeout: float) -> Any:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read())


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for local services that need a fixed port up front)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _get_endpoints(http_url: str, token: str | None, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return dict(_get_json(http_url + "/endpoints", token, 10))
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
