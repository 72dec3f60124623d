"""The demo's code path, end to end with small settings (embedded Ray, simulator, OME-Zarr, montage)."""

from __future__ import annotations

import io
from typing import Any

import imageio.v3 as iio
import pytest
import zarr

from acquisition.frames import FrameId
from acquisition.spec import AcquisitionSpec
from acquisition.zarr_sink import ZarrLabelSink
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
    # Two channels (nuclei, membrane), one frame each: 3 t x 2 p x 2 c frames, 6 frame sets.
    assert report.frames_sent == 12 and report.complete, out.getvalue()
    assert report.summary is not None and report.summary.frames_ok == 12
    assert len([r for r in report.results if r.status == "ok"]) == 6
    sink = ZarrLabelSink(report.store.parent)
    attrs: Any = zarr.open_group(report.store, mode="r").attrs
    spec = AcquisitionSpec.model_validate(attrs["cellsam"]["spec"])
    sink.open_acquisition(spec)
    assert spec.sizes.c == 2 and spec.channel_names == ("H2B", "membrane") and spec.pixel_size_um == 0.65
    assert len(sink.progress(spec.acquisition).done) == 6
    image = sink.read_image(FrameId(spec.acquisition, 1, 2, 0))
    assert image is not None and image.shape == (2, 96, 96) and image[0].any() and image[1].any()
    cells = sink.read_cells(FrameId(spec.acquisition, 1, 2, 0))
    assert {"intensity_mean_H2B", "intensity_mean_membrane"} <= set(cells.measurements)
    montage = iio.imread(report.montage)
    # One row per (position, time point): 2 positions x 3 time points, raw | labels side by side.
    assert montage.ndim == 3 and montage.shape[2] == 3 and montage.shape[1] > 2 * 96
    assert montage.shape[0] >= 6 * 96
    text = format_report(report)
    assert str(report.store) in text and "end_to_end" in text and "metrics were served" in text
    assert "sent 12/12" in out.getvalue()
