"""The ``cellsam-stream`` command line, through its real entry point."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellsam_core.checkpoint import save_model
from cellsam_core.inference import segment
from cellsam_core.io import read_image
from serving.cli import main
from serving.runner import free_port
from tests.conftest import make_smoke_model


@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CELLSAM_WEIGHTS", raising=False)


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("segment", "sample", "serve", "simulate", "track", "weights"):
        assert command in out


def test_sample_takes_a_cell_radius_range(tmp_path):
    from skimage.measure import regionprops

    truth = tmp_path / "truth.tif"
    args = ["sample", str(tmp_path / "s.tif"), "--size", "256", "--cells", "6", "--labels", str(truth)]
    assert main([*args, "--modality", "whole_cell", "--cell-radius", "30", "36"]) == 0
    radii = [np.sqrt(p.area / np.pi) for p in regionprops(tifffile.imread(truth))]
    assert len(radii) >= 4 and 24 < np.median(radii) <= 37  # default at 256²: radius 6.4-11.5


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["segment"])
    assert exc.value.code == 2


def test_sample_then_segment_with_weights_file(tmp_path, capsys):
    image_path = tmp_path / "sample.tif"
    truth = tmp_path / "truth.tif"
    assert main(["sample", str(image_path), "--size", "128", "--cells", "12", "--labels", str(truth)]) == 0
    image = tifffile.imread(image_path)
    assert image.shape == (128, 128) and int(tifffile.imread(truth).max()) == 12
    model = make_smoke_model()
    weights = tmp_path / "w.pt"
    save_model(model, weights)
    out = tmp_path / "labels.npy"
    assert (
        main(["segment", str(image_path), "-o", str(out), "--weights", str(weights), "--model", "tiny"]) == 0
    )
    np.testing.assert_array_equal(np.load(out), segment(image, model).labels)
    printed = capsys.readouterr().out
    assert "cells in" in printed and "timing" in printed and str(weights) in printed


def test_segment_without_weights_runs_the_bundled_model_and_says_so(tmp_path, capsys, no_weights):
    from cellsam_core.checkpoint import load_bundled_model
    from cellsam_core.synthetic import synthetic_frame

    image = synthetic_frame((128, 128), seed=7, n_cells=15)[0]
    image_path = tmp_path / "x.npy"
    np.save(image_path, image)
    assert main(["segment", str(image_path)]) == 0
    out = capsys.readouterr().out
    assert "bundled default" in out and "weights fetch" in out
    labels = read_image(tmp_path / "x_labels.tif")
    np.testing.assert_array_equal(labels, segment(image, load_bundled_model()).labels)
    assert labels.max() > 5  # a trained model: real cells, not the random model's empty labels


@pytest.mark.parametrize("where", ["flag", "env"])
def test_a_missing_weights_file_is_an_error_not_a_fallback(tmp_path, capsys, no_weights, monkeypatch, where):
    image_path = tmp_path / "x.npy"
    np.save(image_path, np.zeros((32, 32), np.uint16))
    missing = tmp_path / "typo.pt"
    argv = ["segment", str(image_path)]
    if where == "flag":
        argv += ["--weights", str(missing)]
    else:
        monkeypatch.setenv("CELLSAM_WEIGHTS", str(missing))
    assert main(argv) == 1
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "x_labels.tif").exists()


def test_segment_random_weights_only_when_asked(tmp_path, capsys, no_weights):
    image_path = tmp_path / "x.png"
    import imageio.v3 as iio

    iio.imwrite(image_path, (np.random.default_rng(0).random((64, 48)) * 255).astype(np.uint8))
    assert main(["segment", str(image_path), "--random-weights"]) == 0
    assert "RANDOM weights" in capsys.readouterr().out
    labels = read_image(tmp_path / "x_labels.tif")
    assert labels.shape == (64, 48) and labels.dtype == np.uint32


def test_segment_unreadable_image_exits_1(tmp_path, capsys):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff at all")
    assert main(["segment", str(bad), "--random-weights"]) == 1
    assert "unrecognised image format" in capsys.readouterr().err


def test_segment_several_files_and_a_directory_with_one_model_load(tmp_path, capsys, no_weights):
    from cellsam_core.checkpoint import load_bundled_model
    from cellsam_core.synthetic import synthetic_frame

    folder = tmp_path / "plate"
    folder.mkdir()
    images = {name: synthetic_frame((96, 96), seed=i, n_cells=8)[0] for i, name in enumerate("abc")}
    for name, image in images.items():
        tifffile.imwrite(folder / f"{name}.tif", image)
    (folder / "broken.tif").write_bytes(b"not a tiff")
    (folder / "old_labels.tif").write_bytes(b"an earlier run's output: skipped")
    extra = tmp_path / "single.npy"
    np.save(extra, images["a"])
    out = tmp_path / "labels"

    assert main(["segment", str(folder), str(extra), "-o", str(out)]) == 1  # one input failed
    captured = capsys.readouterr()
    assert "broken.tif" in captured.err and "4 of 5 images segmented, 1 failed" in captured.out
    assert captured.out.count("model load") == 4 and captured.out.count("bundled default") == 1
    model = load_bundled_model()
    for name, image in images.items():
        np.testing.assert_array_equal(read_image(out / f"{name}_labels.tif"), segment(image, model).labels)
    np.testing.assert_array_equal(read_image(out / "single_labels.tif"), read_image(out / "a_labels.tif"))
    assert sorted(p.name for p in out.iterdir()) == [
        "a_labels.tif",
        "b_labels.tif",
        "c_labels.tif",
        "single_labels.tif",
    ]

    # Without -o the labels go next to each input; a directory's own outputs are not inputs next time.
    assert main(["segment", str(folder / "a.tif"), str(folder / "b.tif")]) == 0
    assert (folder / "a_labels.tif").exists() and (folder / "b_labels.tif").exists()
    # Several inputs cannot share one label file: a usage error, before the model loads.
    assert main(["segment", str(folder / "a.tif"), str(extra), "-o", str(tmp_path / "x.tif")]) == 2
    assert "-o" in capsys.readouterr().err


def test_segment_reports_mask_progress_in_boxes():
    from cellsam_core.checkpoint import load_bundled_model
    from cellsam_core.synthetic import synthetic_frame

    model = load_bundled_model()
    image = np.tile(synthetic_frame((256, 256), seed=4, n_cells=20)[0], (3, 3))  # tiled: many boxes
    calls: list[tuple[int, int]] = []
    result = segment(image, model, progress=lambda done, total: calls.append((done, total)))
    assert result.n_cells > 20 and len(calls) > 1
    done = [d for d, _ in calls]
    assert done == sorted(done) and len({t for _, t in calls}) == 1 and calls[-1][0] == calls[-1][1]
    np.testing.assert_array_equal(result.labels, segment(image, model).labels)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_serve_command_starts_reports_and_stops_on_sigterm(tmp_path):
    http_port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "serving.cli", "serve", "--random-weights", "--model", "tiny",
            "--ingest", "tcp://127.0.0.1:*", "--results", "tcp://127.0.0.1:*",
            "--http-port", str(http_port), "--metrics-port", "0", "--output", str(tmp_path / "out"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Ctrl-C"):  # printed once the service is up and signals are handled
                break
        assert any(line.startswith("Ctrl-C") for line in lines), "".join(lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=60) as r:
            assert json.loads(r.read())["status"] == "ok"
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
        output = "".join(lines) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "frames in (ZeroMQ PULL): tcp://127.0.0.1:" in output
    assert "stopped" in output
