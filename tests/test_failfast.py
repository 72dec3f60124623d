"""Mistakes cost one line and the right exit code, found before Ray starts (2: usage, 1: the rest).

Most cases call the CLI's ``main`` in this process: none of them may start Ray (a check fails first).
One case runs ``serve`` with a taken port as a real process, within a generous bound; one starts Ray to
see a replica's own exception reported when a deployment fails to start.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from serving.cli import main
from serving.runner import free_port

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    name: str
    argv: list[str]
    code: int
    message: str


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "x.npy", np.zeros((32, 32), np.uint16))
    (tmp_path / "adir").mkdir()
    (tmp_path / "bad.yaml").write_text("model: [1, 2\n")
    (tmp_path / "typo.yaml").write_text("model:\n  colour: red\n")
    (tmp_path / "a_file").write_text("not a directory\n")
    return tmp_path


CASES = [
    Case("serve_bad_endpoint", ["serve", "--ingest", "notaurl"], 2, "'notaurl' is not a ZeroMQ endpoint"),
    Case("serve_bad_yaml", ["serve", "--config", "bad.yaml"], 2, "bad.yaml is not valid YAML (line 2"),
    Case("serve_unknown_setting", ["serve", "--config", "typo.yaml"], 2, "model.colour: Extra inputs"),
    Case("serve_missing_config", ["serve", "--config", "nope.yaml"], 1, "nope.yaml does not exist"),
    Case("serve_http_beyond_loopback", ["serve", "--http-host", "0.0.0.0"], 2, "pass --expose"),
    Case("serve_expose_without_curve", ["serve", "--expose"], 2, "configure CURVE"),
    Case(
        "serve_same_port_twice",
        ["serve", "--ingest", "tcp://127.0.0.1:5599", "--results", "tcp://127.0.0.1:5599"],
        2,
        "both ask for port 5599",
    ),
    Case("serve_missing_weights", ["serve", "--weights", "nope.pt"], 1, "nope.pt"),
    Case("serve_no_gpu", ["serve", "--random-weights", "--device", "cuda:7"], 2, "--device cuda:7"),
    Case("serve_curve_half", ["serve", "--curve-clients", "adir"], 2, "go together"),
    Case(
        "serve_missing_server_key",
        ["serve", "--random-weights", "--curve-secret-key", "k.key_secret", "--curve-clients", "adir"],
        1,
        "k.key_secret does not exist",
    ),
    Case("serve_missing_token", ["serve", "--random-weights", "--http-token-file", "nope"], 1, "nope"),
    Case(
        "serve_unwritable_output",
        ["serve", "--random-weights", "--output", "a_file/out"],
        1,
        "cannot write to the output directory",
    ),
    Case("demo_no_frames", ["demo", "--frames", "0"], 2, "--frames must be at least 1, got 0"),
    Case("demo_negative_frames", ["demo", "--frames", "-2"], 2, "got -2"),
    Case("demo_missing_source", ["demo", "--source", "missing.tif"], 1, "missing.tif does not exist"),
    Case("segment_png_output", ["segment", "x.npy", "-o", "out.png"], 2, ".tif, .tiff or .npy"),
    Case("segment_unwritable_output", ["segment", "x.npy", "-o", "a_file/l.tif"], 1, "cannot write"),
    Case("segment_empty_directory", ["segment", "adir"], 1, "adir holds no image"),
    Case("segment_no_gpu", ["segment", "x.npy", "--device", "cuda:7"], 2, "--device cuda:7"),
    Case("segment_bad_device", ["segment", "x.npy", "--device", "banana"], 2, "not a torch device"),
    Case("simulate_bad_frames", ["simulate", "--frames", "0"], 2, "--frames and --positions"),
    Case("keys_exist_already", ["keys", "x", "--dir", "."], 1, "exists"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_mistakes_fail_with_one_line_and_the_right_code(
    case: Case, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if case.name == "keys_exist_already":
        (workdir / "x.key").write_text("")
    assert main(case.argv) == case.code
    err = capsys.readouterr().err
    assert case.message in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "ray" not in sys.modules or not _ray_started(), "a check must fail before Ray starts"


def _ray_started() -> bool:
    import ray

    return bool(ray.is_initialized())


@pytest.fixture
def taken_port() -> Iterator[int]:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        yield holder.getsockname()[1]
    finally:
        holder.close()


def test_serve_with_a_taken_port_fails_fast_and_names_it(taken_port: int, tmp_path: Path) -> None:
    began = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "serving.cli", "serve", "--random-weights", "--model", "tiny",
         "--metrics-port", str(taken_port), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"port {taken_port}" in result.stderr and "already in use" in result.stderr, result.stderr
    assert "starting cellsam-stream" not in result.stdout  # refused before Ray
    assert time.monotonic() - began < 30  # generous: it takes about a second


def test_simulate_fails_when_nothing_receives(taken_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    # The port is bound but nobody accepts on it, as with `--to tcp://127.0.0.1:1`.
    argv = ["simulate", "--to", f"tcp://127.0.0.1:{taken_port}", "--frames", "2", "--timeout", "1"]
    assert main([*argv, "--shape", "32", "32", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "nothing accepted a connection" in err and "sent" not in err


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_deployment_that_fails_to_start_reports_the_replica_error(tmp_path: Path) -> None:
    weights = tmp_path / "corrupt.pt"
    weights.write_bytes(b"this is not a checkpoint")  # exists, so only the replica finds out
    result = subprocess.run(
        [sys.executable, "-m", "serving.cli", "serve", "--weights", str(weights), "--model", "tiny",
         "--ingest", "tcp://127.0.0.1:*", "--results", "tcp://127.0.0.1:*", "--metrics-port", "0",
         "--http-port", str(free_port()), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, timeout=280, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: the ") and "deployment failed to start: " in line, line
    assert "Error" in line.split("failed to start: ", 1)[1] and "Traceback" not in result.stderr
