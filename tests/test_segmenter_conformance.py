"""`LocalSegmenter` against the `Segmenter` contract (the Ray Serve one runs it in tests/test_serving.py)."""

from __future__ import annotations

from typing import Any

import pytest

from cellsam_core.acceleration import Acceleration
from serving.config import AccelerationSettings, DecoderSettings
from serving.segmenter import LocalSegmenter
from tests.segmenter_conformance import SegmenterConformance

pytestmark = pytest.mark.timeout(300)


class TestLocalSegmenter(SegmenterConformance):
    @pytest.fixture
    def model(self, smoke_model: Any) -> Any:
        return smoke_model

    @pytest.fixture
    def segmenter(self, smoke_model: Any) -> LocalSegmenter:
        return LocalSegmenter(model=smoke_model)


class TestLocalSegmenterWithDecoderSettings(SegmenterConformance):
    """The decoder settings reach `decode` exactly as the Ray Decoder deployment applies them."""

    decoder = DecoderSettings(bbox_threshold=0.6, box_batch_size=3, window=4)

    @pytest.fixture
    def model(self, smoke_model: Any) -> Any:
        return smoke_model

    @pytest.fixture
    def segmenter(self, smoke_model: Any) -> LocalSegmenter:
        return LocalSegmenter(model=smoke_model, decoder=self.decoder)


class TestLocalSegmenterWithAcceleration(SegmenterConformance):
    """Fast paths chosen in the service settings reach both halves of the model."""

    acceleration = AccelerationSettings(precision="float32", attention="sdpa")

    @pytest.fixture
    def model(self, smoke_model: Any) -> Any:
        return smoke_model

    @pytest.fixture
    def segmenter(self, smoke_model: Any) -> LocalSegmenter:
        return LocalSegmenter(model=smoke_model, acceleration=self.acceleration)


def test_the_service_acceleration_settings_are_the_model_cores() -> None:
    """Same fields, choices and defaults as cellsam_core's Acceleration (the config stays torch-free)."""
    ours, core = AccelerationSettings.model_fields, Acceleration.model_fields
    assert list(ours) == list(core)
    for name in ours:
        assert ours[name].annotation == core[name].annotation, name
        assert ours[name].default == core[name].default, name
    setting = AccelerationSettings(precision="bfloat16", attention="sdpa", compile="default")
    assert setting.to_core() == Acceleration(precision="bfloat16", attention="sdpa", compile="default")
    assert AccelerationSettings().to_core() == Acceleration()
