"""What the running service exposes, through its real entry point (``cellsam-stream serve``).

One service for the module, with CURVE and an HTTP token configured but not ``--expose``:

* the socket census: every listening socket of the whole process tree (the CLI, Ray's GCS, raylet,
  agents, the Serve controller, proxy and replicas) is on loopback;
* authenticated endpoints: clients off the allowlist cannot push frames or read results, HTTP without the
  token gets 401, every refusal is counted in ``cellsam_auth_failures_total{endpoint}``; an allowed
  client streams frames and gets its results;
* ``serve --address`` against it refuses, before changing anything, another HTTP port or a second copy;
* Ray's chatter stays out of the terminal, at start and at a clean stop.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from acquisition.client import FrameSender, ResultSubscriber
from acquisition.errors import NotConnectedError
from acquisition.security import ClientKeys, create_key_pair
from cellsam_core.synthetic import synthetic_frame
from serving.addresses import is_loopback_host
from serving.runner import free_port
from tests.serve_util import collect_results

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token-for-tests"

#: Lines of Ray's that must not reach the user's terminal without --verbose.
RAY_CHATTER = (
    "Token authentication is enabled",
    "New http_options",
    "graceful_shutdown",
    "Started a local Ray instance",
    "Started Serve in namespace",
)


@dataclass
class Service:
    proc: subprocess.Popen[str]
    http: str
    ingest: str
    results: str
    metrics_url: str
    good: ClientKeys
    stranger: ClientKeys
    lines: list[str] = field(default_factory=list)

    def http_get(self, path: str, token: str | None = TOKEN) -> int:
        request = urllib.request.Request(self.http + path)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)

    def auth_failures(self) -> dict[str, float]:
        with urllib.request.urlopen(self.metrics_url, timeout=30) as r:
            text = r.read().decode()
        return {
            sample.labels["endpoint"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "cellsam_auth_failures_total"
        }


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "serving.cli", *args]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("exposure")
    _, server_secret = create_key_pair(root / "server", "server")
    server_public = root / "server" / "server.key"
    good_public, good_secret = create_key_pair(root / "clients", "microscope1")
    allowed = root / "allowed"  # what the service admits: public keys only
    allowed.mkdir()
    (allowed / good_public.name).write_bytes(good_public.read_bytes())
    _, stranger_secret = create_key_pair(root / "strangers", "stranger")
    (root / "token").write_text(TOKEN + "\n")
    http_port = free_port()
    proc = subprocess.Popen(
        _cli(
            "serve", "--random-weights", "--model", "tiny",
            "--ingest", "tcp://127.0.0.1:*", "--results", "tcp://127.0.0.1:*",
            "--http-port", str(http_port), "--metrics-port", "0", "--output", str(root / "out"),
            "--curve-secret-key", str(server_secret), "--curve-clients", str(allowed),
            "--http-token-file", str(root / "token"),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=ROOT,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        output = "".join(lines)
        assert "Ctrl-C" in output, output

        def find(pattern: str) -> str:
            match = re.search(pattern, output)
            assert match, f"{pattern!r} not in {output}"
            return match.group(1)

        yield Service(
            proc=proc,
            http=f"http://127.0.0.1:{http_port}",
            ingest=find(r"frames in \(ZeroMQ PULL\): (\S+)"),
            results=find(r"results out \(ZeroMQ PUB\): (\S+)"),
            metrics_url=find(r"metrics: (\S+)"),
            good=ClientKeys.from_files(good_secret, server_public),
            stranger=ClientKeys.from_files(stranger_secret, server_public),
            lines=lines,
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()


def _process_tree(root_pid: int) -> list[psutil.Process]:
    root = psutil.Process(root_pid)
    return [root, *root.children(recursive=True)]


def test_without_expose_every_socket_of_the_process_tree_is_on_loopback(service: Service) -> None:
    listening = []
    for proc in _process_tree(service.proc.pid):
        try:
            name = proc.name()
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN or (conn.type == 2 and not conn.raddr):  # TCP / UDP
                    listening.append((name, conn.laddr.ip, conn.laddr.port))
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # a short-lived helper that just exited
    names = {name for name, _, _ in listening}
    assert "gcs_server" in names and "raylet" in names, listening  # the census sees Ray's processes
    exposed = [entry for entry in listening if not is_loopback_host(entry[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_unauthorised_clients_cannot_push_frames_or_read_results_and_are_counted(service: Service) -> None:
    before = service.auth_failures()
    with FrameSender(endpoint=service.ingest, curve=service.stranger, linger=0) as stranger:
        with pytest.raises(NotConnectedError) as exc:
            stranger.wait_connected(timeout=10)
        assert exc.value.refused
    with FrameSender(endpoint=service.ingest, linger=0) as plain, pytest.raises(NotConnectedError):
        plain.wait_connected(timeout=10)
    with (
        ResultSubscriber(endpoint=service.results, curve=service.stranger) as snoop,
        pytest.raises(TimeoutError),
    ):
        snoop.wait_ready(timeout=3)
    assert service.http_get("/acquisitions", token=None) == 401
    assert service.http_get("/acquisitions", token="wrong") == 401

    # Counted by the Ingress's monitor thread, a moment later. Each refused handshake is one count, but
    # how many handshakes a refused client attempts before it gives up is ZeroMQ's business (the two
    # ingest clients above made one or many each in different runs), so only "some" is asserted there.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        after = service.auth_failures()
        grown = {e: after.get(e, 0) - before.get(e, 0) for e in ("ingest", "results", "http")}
        if grown["ingest"] >= 1 and grown["results"] >= 1 and grown["http"] >= 2:
            break
        time.sleep(0.2)
    assert grown["ingest"] >= 1 and grown["results"] >= 1 and grown["http"] == 2, grown


def test_an_allowed_client_streams_frames_and_gets_results(service: Service) -> None:
    frames = [synthetic_frame((64, 64), seed=i, n_cells=5)[0] for i in range(2)]
    with ResultSubscriber(endpoint=service.results, acquisitions=["secure"], curve=service.good) as sub:
        sub.wait_ready(30)
        with FrameSender(endpoint=service.ingest, acquisition="secure", curve=service.good) as tx:
            tx.wait_connected(30)
            tx.start(sizes={"t": len(frames)})
            for t, frame in enumerate(frames):
                tx.send(frame, t=t)
        results, summary = collect_results(sub, "secure")
    assert summary.frames_ok == len(frames)
    assert sorted(r.payload.index.t for r in results) == [0, 1]
    assert service.http_get("/healthz") == 200


def _gcs_address(service: Service) -> str:
    for proc in _process_tree(service.proc.pid):
        if proc.name() == "gcs_server":
            ports = [c.laddr.port for c in proc.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
            return f"127.0.0.1:{min(ports)}"
    raise AssertionError("no gcs_server in the service's process tree")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--http-port", "1"], "Serve already runs on this cluster with HTTP on port"),
        ([], "already runs on this cluster"),
    ],
    ids=["other_http_port", "app_exists"],
)
def test_serve_address_checks_the_running_serve_before_touching_it(
    service: Service, extra: list[str], expected: str
) -> None:
    address = _gcs_address(service)
    result = subprocess.run(
        _cli("serve", "--random-weights", "--model", "tiny", "--address", address, *extra),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
        # A driver joining by address authenticates only when told to (the token is in ~/.ray/auth_token,
        # written by the service's embedded Ray): what docs/deploy.md tells users to do.
        env={**os.environ, "RAY_AUTH_MODE": "token"},
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert service.http_get("/endpoints") == 200  # the running app was left alone


def test_ray_chatter_stays_out_of_the_terminal_at_start_and_stop(service: Service) -> None:
    service.proc.send_signal(signal.SIGTERM)
    rest, _ = service.proc.communicate(timeout=180)
    output = "".join(service.lines) + rest
    assert service.proc.returncode == 0, output
    assert "stopped" in output
    for chatter in RAY_CHATTER:
        assert chatter not in output, output
