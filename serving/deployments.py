"""The model deployments: :class:`Encoder` (both ViT passes, dynamically batched) and :class:`Decoder`.

The ingress chains them without touching the embedding: it passes the encoder's ``DeploymentResponse``
straight into the decoder call, so the embedding goes from the encoder replica to the decoder replica
through Ray's object store and never through the ingress.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from cellsam_core.inference import ImageEmbedding, Segmentation
from serving.config import DecoderSettings, EncoderSettings, ModelSettings
from serving.ray_network import keep_replica_servers_on_loopback
from serving.segmenter import DecodedFrame

__all__ = ["Decoder", "EncodedFrame", "Encoder", "load_model_for"]

# Every replica of the app imports this module before its deployment is constructed (the Ingress through
# serving.app): the moment to keep Serve's per-replica gRPC server on loopback on a local-only node.
keep_replica_servers_on_loopback()


@dataclass(frozen=True)
class EncodedFrame:
    """What the encoder hands the decoder: the embedding (CPU tensors), its batch and encoder time."""

    embedding: ImageEmbedding
    encode_seconds: float
    batch_size: int


def load_model_for(settings: ModelSettings) -> tuple[Any, Any]:
    """Load the model a deployment runs (shared by encoder and decoder, so both use the same weights)."""
    from cellsam_core.select import select_model

    return select_model(
        weights=settings.weights,
        model=settings.name,
        random_weights=settings.random_weights,
        device=settings.device,
        dtype=settings.dtype,
    )


def _replica_threads() -> None:
    # Ray sets OMP_NUM_THREADS to the replica's CPU share; torch's intra-op pool follows it so that
    # replicas sharing a node do not oversubscribe its cores. Few malloc arenas keep the resident memory
    # of a replica flat under sustained load (acquisition.allocator.limit_malloc_arenas).
    import torch

    from acquisition.allocator import limit_malloc_arenas

    limit_malloc_arenas(2)

    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit() and int(n) > 0:
        torch.set_num_threads(int(n))


@serve.deployment(name="Encoder", max_ongoing_requests=16)
class Encoder:
    """Both image encoders of CellSAM; frames arriving together are encoded in one batch.

    ``user_config`` (live-tunable): ``{"max_batch_size": int, "batch_wait_timeout_s": float}``.
    """

    def __init__(self, model: dict[str, Any], encoder: dict[str, Any] | None = None) -> None:
        _replica_threads()
        self.settings = ModelSettings.model_validate(model)
        self.model, self.info = load_model_for(self.settings)
        self.reconfigure(EncoderSettings.model_validate(encoder or {}).model_dump())

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        current = getattr(self, "batch_settings", EncoderSettings())
        # Validate the merged settings: a bad live update raises here and leaves the old settings.
        self.batch_settings = EncoderSettings.model_validate({**current.model_dump(), **user_config})
        self._encode_batch.set_max_batch_size(self.batch_settings.max_batch_size)  # type: ignore[attr-defined]
        self._encode_batch.set_batch_wait_timeout_s(  # type: ignore[attr-defined]
            self.batch_settings.batch_wait_timeout_s
        )

    def _run(self, images: list[np.ndarray]) -> list[ImageEmbedding]:
        from cellsam_core.inference import EncodeOptions, encode_batch

        options = EncodeOptions(acceleration=self.settings.acceleration.to_core())
        return [e.to("cpu") for e in encode_batch(images, self.model, options)]

    async def _encode_all(self, images: list[np.ndarray]) -> list[ImageEmbedding | Exception]:
        try:
            return list(await asyncio.to_thread(self._run, images))
        except Exception as exc:
            if len(images) == 1:
                return [exc]
        # One bad frame must not fail its batch-mates: encode them one by one.
        results: list[ImageEmbedding | Exception] = []
        for image in images:
            try:
                results.extend(await asyncio.to_thread(self._run, [image]))
            except Exception as exc:
                results.append(exc)
        return results

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _encode_batch(self, images: list[np.ndarray]) -> list[EncodedFrame | Exception]:
        t0 = time.perf_counter()
        results = await self._encode_all(images)
        seconds = time.perf_counter() - t0
        return [r if isinstance(r, Exception) else EncodedFrame(r, seconds, len(images)) for r in results]

    async def __call__(self, image: np.ndarray) -> EncodedFrame:
        result = await self._encode_batch(image)
        if isinstance(result, Exception):
            raise result
        return result


@serve.deployment(name="Decoder", max_ongoing_requests=8)
class Decoder:
    """CellFinder head, batched SAM prompt/mask decoding and label assembly."""

    def __init__(self, model: dict[str, Any], decoder: dict[str, Any] | None = None) -> None:
        _replica_threads()
        self.settings = ModelSettings.model_validate(model)
        self.model, self.info = load_model_for(self.settings)
        self.decoder_settings = DecoderSettings.model_validate(decoder or {})

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        # Validate the merged settings: a bad live update raises here and leaves the old settings.
        merged = {**self.decoder_settings.model_dump(), **user_config}
        self.decoder_settings = DecoderSettings.model_validate(merged)

    def _run(self, encoded: EncodedFrame) -> Segmentation:
        from cellsam_core.inference import decode

        options = self.decoder_settings.decode_options(self.settings.acceleration)
        return decode(encoded.embedding, self.model, options)

    async def __call__(self, encoded: EncodedFrame) -> DecodedFrame:
        t0 = time.perf_counter()
        segmentation = await asyncio.to_thread(self._run, encoded)
        return DecodedFrame(
            segmentation=segmentation,
            encode_seconds=encoded.encode_seconds,
            decode_seconds=time.perf_counter() - t0,
            batch_size=encoded.batch_size,
            embedding_bytes=encoded.embedding.nbytes,
        )
