"""The `Segmenter` contract as a reusable test class (not collected itself; subclasses are).

Each implementation's test module subclasses `SegmenterConformance` and provides the `segmenter` and
`model` fixtures (the segmenter under test and the model it runs, for the in-process reference).
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from cellsam_core.errors import ImageFormatError
from cellsam_core.inference import EncodeOptions, decode, encode
from cellsam_core.synthetic import synthetic_frame
from serving.config import AccelerationSettings, DecoderSettings
from serving.segmenter import DecodedFrame, RetryableError, Segmenter


class SegmenterConformance:
    """Behaviour every `Segmenter` must show; see the `Segmenter` docstring for the contract."""

    #: Decoder settings and fast paths the implementation under test was built with.
    decoder = DecoderSettings()
    acceleration = AccelerationSettings()

    def expected(self, image: np.ndarray, model: Any) -> Any:
        """What ``cellsam_core`` gives in this process with the same settings."""
        encoded = encode(image, model, EncodeOptions(acceleration=self.acceleration.to_core()))
        return decode(encoded, model, self.decoder.decode_options(self.acceleration))

    def run(self, coro: Any) -> Any:
        return asyncio.run(asyncio.wait_for(coro, 300))

    def test_is_a_segmenter(self, segmenter: Segmenter) -> None:
        assert isinstance(segmenter, Segmenter)

    def test_labels_and_cells_equal_the_in_process_model(self, segmenter: Segmenter, model: Any) -> None:
        image = synthetic_frame((96, 112), seed=3, n_cells=12)[0]
        got: DecodedFrame = self.run(segmenter.segment(image))
        expected = self.expected(image, model)
        assert expected.n_cells > 0
        np.testing.assert_array_equal(got.segmentation.labels, expected.labels)
        assert got.segmentation.cells.equals(expected.cells)
        assert got.encode_seconds >= 0 and got.decode_seconds >= 0
        assert got.batch_size >= 1 and got.embedding_bytes > 0

    def test_concurrent_frames_each_get_their_own_labels(self, segmenter: Segmenter, model: Any) -> None:
        images = [synthetic_frame((64, 80), seed=20 + i, n_cells=6)[0] for i in range(3)]

        async def all_of_them() -> list[DecodedFrame]:
            return list(await asyncio.gather(*(segmenter.segment(im) for im in images)))

        for image, got in zip(images, self.run(all_of_them()), strict=True):
            expected = self.expected(image, model)
            np.testing.assert_array_equal(got.segmentation.labels, expected.labels)

    def test_an_image_the_model_cannot_take_is_the_frames_own_failure(self, segmenter: Segmenter) -> None:
        bad = np.zeros((16, 16, 5), np.uint16)  # five channels: no model input for that
        with pytest.raises(ImageFormatError) as info:
            self.run(segmenter.segment(bad))
        assert not segmenter.is_retryable(info.value)

    def test_infrastructure_failures_are_retryable(self, segmenter: Segmenter) -> None:
        assert segmenter.is_retryable(self.retryable_example())
        assert not segmenter.is_retryable(ValueError("a frame's own problem"))

    def retryable_example(self) -> BaseException:
        """An exception this implementation raises when its infrastructure fails."""
        return RetryableError("replica died")
