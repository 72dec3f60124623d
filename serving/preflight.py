"""Checks that run before Ray starts, so that a mistake costs a second and one clear line, not a minute
and a traceback: configuration, endpoints, free ports, files, the weights, the device.

Each check raises :class:`PreflightError` (or its :class:`UsageError` subclass) with a message that says
what is wrong and what to do; the CLI prints it as ``error: ...`` and exits 2 for usage errors, 1 for the
rest.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from serving.addresses import ALL_INTERFACES, LOOPBACK, is_loopback_host, parse_endpoint
from serving.config import ServiceConfig

__all__ = [
    "PreflightError",
    "UsageError",
    "check_demo",
    "check_device",
    "check_image_output",
    "check_input_file",
    "check_service",
    "describe_validation_error",
    "load_service_config",
    "service_http_host",
]

_LABEL_SUFFIXES = (".tif", ".tiff", ".npy")


class PreflightError(RuntimeError):
    """Something the service needs is not there (a port is taken, a file is missing): exit code 1."""

    exit_code = 1


class UsageError(PreflightError):
    """The command line or the configuration asks for something impossible: exit code 2."""

    exit_code = 2


def describe_validation_error(exc: Exception) -> str:
    """One line from a pydantic ``ValidationError`` (``field: message; ...``), else ``str(exc)``."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for error in errors():
        where = ".".join(str(p) for p in error.get("loc", ()))
        message = str(error.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def load_service_config(path: Path | None, overrides: dict[str, Any]) -> ServiceConfig:
    """The service configuration from an optional YAML file plus dotted-key overrides.

    Raises :class:`PreflightError` for a file that cannot be read, :class:`UsageError` for one that is
    not valid YAML or not a valid configuration.
    """
    import yaml
    from pydantic import ValidationError

    try:
        config = ServiceConfig.from_file(path) if path is not None else ServiceConfig()
        return config.with_overrides(overrides)
    except FileNotFoundError:
        raise PreflightError(f"configuration file {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"--config {path} is a directory; give a YAML file") from None
    except OSError as exc:
        raise PreflightError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or exc
        raise UsageError(f"{path} is not valid YAML{where}: {problem}") from None
    except ValidationError as exc:
        source = f"{path}: " if path is not None else ""
        raise UsageError(f"invalid configuration: {source}{describe_validation_error(exc)}") from None
    except (KeyError, ValueError) as exc:
        raise UsageError(f"invalid configuration: {exc}") from None


def service_http_host(config: ServiceConfig, http_host: str | None) -> str:
    """The HTTP routes' address: as given, else loopback (all interfaces once ``security.expose``)."""
    if http_host is not None:
        return http_host
    return ALL_INTERFACES if config.security.expose else LOOPBACK


def check_service(
    config: ServiceConfig,
    *,
    http_host: str,
    http_port: int,
    joining_cluster: bool = False,
) -> None:
    """Everything about ``serve`` that can be known before Ray starts.

    With ``joining_cluster`` (``--address``), the Ingress runs on the cluster's head, not necessarily
    here: its ports, files and device are not checked on this machine.
    """
    security = config.security
    if not is_loopback_host(http_host):
        if not security.expose:
            raise UsageError(
                f"--http-host {http_host} opens the HTTP routes beyond loopback, and security.expose is "
                "off: pass --expose (docs/deploy.md, Securing the endpoints)"
            )
        if not security.http_token and not security.allow_unauthenticated:
            raise UsageError(
                f"HTTP on {http_host}:{http_port} would run models for anyone who can reach it: give a "
                "token (--http-token-file, security.http_token_file/http_token_env) or, on a trusted "
                "network only, set security.allow_unauthenticated"
            )
    if joining_cluster:
        return
    _check_ports(
        [
            ("frames (--ingest)", config.ingest.endpoint),
            ("results (--results)", config.results.endpoint),
            ("metrics (--metrics-port)", _tcp(config.metrics.host, config.metrics.port)),
            ("HTTP (--http-port)", _tcp(http_host, http_port)),
        ]
    )
    _check_security_files(config)
    if not config.model.random_weights:
        _check_weights(config.model.weights)
    check_device(config.model.device)
    _check_writable_dir(Path(config.output.directory), "output directory (--output)")


def _tcp(host: str, port: int) -> str:
    return f"tcp://{f'[{host}]' if ':' in host else host}:{port if port else '*'}"


def _check_ports(named: Sequence[tuple[str, str]]) -> None:
    seen: dict[tuple[str, int], str] = {}
    for what, text in named:
        endpoint = parse_endpoint(text)
        if endpoint.host is None or endpoint.port is None:
            continue  # ipc/inproc, or a wildcard port: nothing to collide with
        key = (endpoint.host, endpoint.port)
        if key in seen:
            raise UsageError(
                f"{what} and {seen[key]} both ask for port {endpoint.port}; give them different ports"
            )
        seen[key] = what
        _bind_test(what, endpoint.host, endpoint.port)


def _bind_test(what: str, host: str, port: int) -> None:
    """Bind and release ``host:port`` the way a server would (``SO_REUSEADDR``, as ZeroMQ and uvicorn do)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return  # an interface name (tcp://eth0:5555) or a name only ZeroMQ resolves: leave it to ZeroMQ
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PreflightError(
                    f"port {port} ({what}, {host}) is already in use: stop what holds it (`ss -ltnp "
                    f"'sport = :{port}'` shows it) or choose another port"
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise UsageError(f"{host} ({what}) is not an address of this machine") from None
            if exc.errno == errno.EACCES:
                raise PreflightError(
                    f"port {port} ({what}) needs privileges to bind; choose a port above 1023"
                ) from None
            raise PreflightError(f"cannot bind {host}:{port} ({what}): {exc.strerror or exc}") from None


def _check_security_files(config: ServiceConfig) -> None:
    from acquisition.security import CurveKeyError, load_key_pair
    from serving.security import TokenError, read_http_token

    security = config.security
    try:
        if security.curve_secret_key is not None and security.curve_clients is not None:
            load_key_pair(security.curve_secret_key)
            clients = Path(security.curve_clients)
            if not clients.exists():
                raise CurveKeyError(f"the CURVE client allowlist {clients} does not exist")
            if clients.is_dir() and not any(clients.glob("*.key")):
                raise CurveKeyError(f"no client public keys (*.key) in {clients}: no client could connect")
        read_http_token(security)
    except (CurveKeyError, TokenError) as exc:
        raise PreflightError(str(exc)) from None


def _check_weights(weights: str | None) -> None:
    from cellsam_core.errors import WeightsNotFoundError
    from cellsam_core.select import resolve_model_weights

    try:
        path, _ = resolve_model_weights(weights)
    except WeightsNotFoundError as exc:
        raise PreflightError(str(exc)) from None
    check_input_file(Path(path), "weights file")


def check_device(device: str) -> None:
    """The torch device exists here: ``cpu``, ``cuda``/``cuda:N`` with that GPU, ``mps`` on Apple."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, mps)") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {device}: no CUDA GPU is available here (torch sees none); use cpu")
        if parsed.index is not None and parsed.index >= count:
            raise UsageError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0-{count - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: Apple MPS is not available here; use cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device}: only cpu, cuda and mps are supported")


def check_input_file(path: Path, what: str) -> None:
    """``path`` is a readable file."""
    if path.is_dir():
        raise PreflightError(f"{what} {path} is a directory, not a file")
    if not path.exists():
        raise PreflightError(f"{what} {path} does not exist")
    if not os.access(path, os.R_OK):
        raise PreflightError(f"{what} {path} is not readable (permissions)")


#: Image files `segment` reads (a directory given to it contributes these, label outputs excluded).
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".npy")


def segment_jobs(images: Sequence[Path], output: Path | None) -> list[tuple[Path, Path]]:
    """``(input, output)`` pairs of a ``segment`` run: files as given, directories expanded.

    One input file: ``output`` is the label image (default ``{stem}_labels.tif`` next to it). Several
    inputs or a directory: ``output`` is a directory (created; default: next to each input), holding
    ``{stem}_labels.tif`` per input. Files named ``*_labels.*`` in a directory are outputs of an
    earlier run and are skipped.
    """
    files: list[Path] = []
    expanded = False
    for path in images:
        if path.is_dir():
            expanded = True
            found = sorted(
                f
                for f in path.iterdir()
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.stem.endswith("_labels")
            )
            if not found:
                raise PreflightError(f"{path} holds no image ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        else:
            check_input_file(path, "image")
            files.append(path)
    stems = [f.stem for f in files]
    if len(files) == 1 and not expanded:
        out = output or files[0].with_name(files[0].stem + "_labels.tif")
        check_image_output(out)
        return [(files[0], out)]
    if output is not None:
        if output.suffix.lower() in _LABEL_SUFFIXES:
            raise UsageError(f"-o {output}: with several inputs -o names a directory, not a file")
        duplicates = sorted({s for s in stems if stems.count(s) > 1})
        if duplicates:
            raise UsageError(f"inputs {', '.join(duplicates)} would write the same label file in -o {output}")
        _check_writable_dir(output, "directory of -o")
    jobs = []
    for f in files:
        out = (output or f.parent) / f"{f.stem}_labels.tif"
        jobs.append((f, out))
    for directory in {out.parent for _, out in jobs}:
        _check_writable_dir(directory, "output directory")
    return jobs


def _check_writable_dir(directory: Path, what: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".cellsam-write-test-"):
            pass
    except OSError as exc:
        raise PreflightError(f"cannot write to the {what} {directory}: {exc.strerror or exc}") from None


def check_image_output(path: Path) -> None:
    """A label image can be written to ``path``: a supported suffix, and a writable directory."""
    if path.suffix.lower() not in _LABEL_SUFFIXES:
        raise UsageError(f"-o {path}: label images are written as .tif, .tiff or .npy")
    if path.is_dir():
        raise UsageError(f"-o {path} is a directory; give a file name")
    _check_writable_dir(path.parent if str(path.parent) else Path("."), "directory of -o")


def check_demo(*, frames: int, positions: int, fps: float | None, size: int, source: Path | None) -> None:
    """The demo's options make sense, and its source file can be opened, before the service starts."""
    problems: Iterable[tuple[bool, str]] = (
        (frames < 1, f"--frames must be at least 1, got {frames}"),
        (positions < 1, f"--positions must be at least 1, got {positions}"),
        (fps is not None and fps <= 0, f"--fps must be above 0, got {fps}"),
        (size < 16, f"--size must be at least 16 pixels, got {size}"),
    )
    for bad, message in problems:
        if bad:
            raise UsageError(message)
    if source is not None:
        from acquisition.errors import SourceError
        from acquisition.simulator import ArraySource

        if source.suffix.lower() != ".zarr":  # a Zarr store is a directory
            check_input_file(source, "--source")
        try:
            ArraySource.from_path(source, positions=positions, frames=frames)
        except SourceError as exc:
            raise PreflightError(f"--source: {exc}") from None
        except (OSError, ValueError) as exc:
            raise PreflightError(f"--source {source} cannot be read: {exc}") from None
