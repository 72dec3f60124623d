"""The demo's code path, end to end with small settings (embedded Ray, simulator, OME-Zarr, montage)."""

from __future__ import annotations

import io

import imageio.v3 as iio
import pytest
import zarr

from cellsam_core.checkpoint import save_model
from serving.demo import DemoOptions, choose_model, format_report, run_demo
from tests.conftest import make_smoke_model


@pytest.fixture
def no_official_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CELLSAM_WEIGHTS", raising=False)


def test_model_choice_says_what_runs(tmp_path, no_official_weights):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    settings, line = choose_model(DemoOptions(weights=weights))
    assert settings["weights"] == str(weights) and str(weights) in line
    settings, line = choose_model(DemoOptions(random_weights=True))
    assert settings["random_weights"] and "RANDOM" in line
    settings, line = choose_model(DemoOptions())
    if "weights" in settings:  # a bundled model ships with this installation
        assert "bundled" in line
    else:
        assert settings["random_weights"] and "RANDOM" in line


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_demo_streams_every_frame_into_the_store(tmp_path):
    # HOME stays as it is: Ray keeps its session token under ~/.ray, shared by later tests' clusters.
    weights = tmp_path / "smoke.pt"
    save_model(make_smoke_model(), weights)
    out = io.StringIO()
    options = DemoOptions(
        frames=3, positions=2, shape=(96, 96), output=tmp_path / "demo", weights=weights, model="tiny"
    )
    report = run_demo(options, out=out)
    assert report.frames_sent == 6 and report.complete, out.getvalue()
    assert report.summary is not None and report.summary.frames_ok == 6
    root = zarr.open_group(report.store, mode="r")
    for p in range(2):
        assert (root[f"{p}/cellsam/done"][:, 0] & 1).all()  # bit 1: labels and cell table written
    montage = iio.imread(report.montage)
    assert montage.ndim == 3 and montage.shape[2] == 3 and montage.shape[1] > 2 * 96
    text = format_report(report)
    assert str(report.store) in text and "end_to_end" in text and "metrics were served" in text
    assert "sent 6/6" in out.getvalue()
