"""`LocalSegmenter` against the `Segmenter` contract (the Ray Serve one runs it in tests/test_serving.py)."""

from __future__ import annotations

from typing import Any

import pytest

from serving.config import DecoderSettings
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
