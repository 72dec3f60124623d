"""The segmenter seam: one frame's pixels in, its segmentation and model-stage timings out.

:class:`Segmenter` is the protocol the pipeline consumes; :class:`LocalSegmenter` (this process, a
worker thread) and :class:`serving.app.ServeSegmenter` (the Ray Serve encoder and decoder
deployments) implement it and share one conformance suite (``tests/test_segmenter_conformance.py`` and
``tests/test_serving.py``). Both decode with the same :class:`~serving.config.DecoderSettings`, so a
frame gets the same labels either way.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from serving.config import AccelerationSettings, DecoderSettings

if TYPE_CHECKING:
    from cellsam_core.inference import Segmentation
    from cellsam_core.modeling.cellsam import CellSAM

__all__ = ["DecodedFrame", "LocalSegmenter", "RetryableError", "Segmenter"]


class RetryableError(RuntimeError):
    """A segmenter failure worth retrying (the replica died or was unreachable), not the frame's fault.

    ``deployment`` names the part that failed (``encoder``, ``decoder``; ``model`` when unknown): the
    label of ``cellsam_retries_total`` and ``cellsam_replica_failures_total``.
    """

    def __init__(self, message: str, *, deployment: str = "model") -> None:
        super().__init__(message)
        self.deployment = deployment


@dataclass(frozen=True)
class DecodedFrame:
    """A segmented frame and the timings of both model stages.

    Attributes
    ----------
    segmentation : Segmentation
        Labels and the cell table (:class:`cellsam_core.CellTable`).
    encode_seconds, decode_seconds : float
        Time in the encoder (the whole batch the frame was encoded in) and in the decoder.
    batch_size : int
        Frames encoded together with this one (1 = alone).
    embedding_bytes : int
        Size of the image embedding that went from encoder to decoder.
    """

    segmentation: Segmentation
    encode_seconds: float
    decode_seconds: float
    batch_size: int
    embedding_bytes: int


@runtime_checkable
class Segmenter(Protocol):
    """Segments one frame.

    Contract (conformance suites for every implementation):

    - :meth:`segment` returns the :class:`DecodedFrame` of ``image`` (``(H, W)`` or ``(H, W, C)``,
      ``C ≤ 3``): labels equal to ``cellsam_core.segment(image, model)`` with the configured decoder
      settings, and the cell table built from them.
    - A failure of the infrastructure (a replica died or is unreachable) raises an exception for which
      :meth:`is_retryable` is True; anything else (e.g. an image the model cannot take) is the frame's
      own failure and is not retryable.
    - Safe to call concurrently from one event loop.
    """

    async def segment(self, image: np.ndarray) -> DecodedFrame:
        """Segment one frame."""
        ...

    def is_retryable(self, exc: BaseException) -> bool:
        """Whether ``exc`` (raised by :meth:`segment`) is the infrastructure's failure, worth a retry."""
        ...


class LocalSegmenter:
    """Runs :func:`cellsam_core.encode` / :func:`cellsam_core.decode` in this process, in a worker thread.

    Parameters
    ----------
    model : CellSAM
    decoder : DecoderSettings, optional
        The same settings the Ray ``Decoder`` deployment takes (thresholds, box batching, window).
    acceleration : AccelerationSettings, optional
        Fast paths, as ``model.acceleration`` gives them to both deployments.
    """

    def __init__(
        self,
        *,
        model: CellSAM,
        decoder: DecoderSettings | None = None,
        acceleration: AccelerationSettings | None = None,
    ) -> None:
        self.model = model
        self.decoder = decoder or DecoderSettings()
        self.acceleration = acceleration or AccelerationSettings()
        self._lock = asyncio.Lock()

    def _run(self, image: np.ndarray) -> DecodedFrame:
        from cellsam_core import EncodeOptions, decode, encode

        t0 = time.perf_counter()
        embedding = encode(image, self.model, EncodeOptions(acceleration=self.acceleration.to_core()))
        t1 = time.perf_counter()
        seg = decode(embedding, self.model, self.decoder.decode_options(self.acceleration))
        return DecodedFrame(seg, t1 - t0, time.perf_counter() - t1, 1, embedding.nbytes)

    async def segment(self, image: np.ndarray) -> DecodedFrame:
        async with self._lock:  # one model, one frame at a time
            return await asyncio.to_thread(self._run, image)

    def is_retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, RetryableError)
