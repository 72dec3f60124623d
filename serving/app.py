"""The Serve application: ``Ingress`` (ZeroMQ + HTTP + metrics) bound to ``Encoder`` and ``Decoder``.

``build_app(args)`` is the application builder named in ``deploy/serve_config.yaml``
(``import_path: serving.app:build_app``); ``args`` is a :class:`~serving.config.ServiceConfig` dict.
"""

import asyncio
import logging
import time
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.config import ModelSettings, ServiceConfig
from serving.deployments import Decoder, Encoder
from serving.metrics import ServiceMetrics
from serving.security import require_http_token, secure_ingress
from serving.segmenter import DecodedFrame, RetryableError

__all__ = ["Ingress", "ServeSegmenter", "build_app"]

log = logging.getLogger(__name__)

http_app = FastAPI(
    title="cellsam-stream",
    description="Live CellSAM segmentation service.",
    dependencies=[Depends(require_http_token)],  # a bearer token on every route once one is configured
)


def _is_replica_failure(exc: BaseException) -> bool:
    """True when ``exc`` (possibly wrapped by Ray) means a replica died or could not be reached."""
    from ray import exceptions as rex

    retryable: tuple[type[BaseException], ...] = (rex.RayActorError, rex.ActorUnavailableError)
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        if isinstance(current, retryable):
            return True
        cause = getattr(current, "cause", None)
        current = cause if isinstance(cause, BaseException) else current.__cause__
        seen += 1
    return False


def _failed_deployment(exc: BaseException) -> str:
    """Which deployment's replica a replica failure came from (``model`` when Ray does not say).

    Ray names the dead actor's class in the error (``ServeReplica:<app>:Encoder``)."""
    text = " ".join(str(e) for e in _chain(exc))
    for name in ("Encoder", "Decoder"):
        if f":{name}" in text:
            return name.lower()
    return "model"


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(out) < 8:
        out.append(current)
        cause = getattr(current, "cause", None)
        current = cause if isinstance(cause, BaseException) else current.__cause__
    return out


def _root_cause(exc: BaseException) -> BaseException:
    """The user exception inside Ray's ``RayTaskError`` wrappers (``exc`` itself if none)."""
    from ray.exceptions import RayTaskError

    current = exc
    for _ in range(8):
        cause = getattr(current, "cause", None)
        if not isinstance(current, RayTaskError) or not isinstance(cause, BaseException):
            break
        current = cause
    return current


def _describe_weights(model: ModelSettings) -> tuple[str, str, str]:
    """(name, source, sha256 prefix) of the weights the replicas load, for ``cellsam_model_info``."""
    if model.random_weights:
        return model.name or "tiny", "random", "random"
    from cellsam_core.select import file_sha256, resolve_model_weights

    path, bundled = resolve_model_weights(model.weights)
    name = model.name or ("cellsam_nano" if bundled else "auto")
    return name, str(path), file_sha256(path)[:16]


class ServeSegmenter:
    """The :class:`~serving.segmenter.Segmenter` of the service: encoder → decoder through deployment
    handles; the embedding never passes through the caller."""

    def __init__(self, *, encoder: DeploymentHandle, decoder: DeploymentHandle) -> None:
        self.encoder = encoder
        self.decoder = decoder

    async def segment(self, image: np.ndarray) -> DecodedFrame:
        encoded = self.encoder.remote(image)
        try:
            result: DecodedFrame = await self.decoder.remote(encoded)
        except Exception as exc:
            if _is_replica_failure(exc):
                raise RetryableError(str(exc), deployment=_failed_deployment(exc)) from exc
            # Surface the replica's own exception (e.g. ImageFormatError), not Ray's wrapper of it.
            cause = _root_cause(exc)
            if cause is exc:
                raise
            raise cause from None
        return result

    def is_retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, RetryableError) or _is_replica_failure(exc)


@serve.deployment(name="Ingress", num_replicas=1, max_ongoing_requests=64)
@serve.ingress(http_app)
class Ingress:
    """Owns the ZeroMQ listener and result publisher, the label sink and the metrics endpoint.

    HTTP routes: ``POST /segment`` (TIFF/PNG/NPY body → label TIFF, or NPY with ``?format=npy``),
    ``GET /healthz`` (a real tiny inference through both deployments), ``GET /acquisitions``,
    ``GET /metrics``.
    """

    async def __init__(  # type: ignore[misc]  # Serve awaits async constructors
        self, encoder: DeploymentHandle, decoder: DeploymentHandle, config: dict[str, Any]
    ):
        from serving import components
        from serving.pipeline import StreamPipeline

        self.config = ServiceConfig.model_validate(config)
        self.segmenter = ServeSegmenter(encoder=encoder, decoder=decoder)
        self.metrics = ServiceMetrics()
        model = self.config.model
        name, source, sha256 = await asyncio.to_thread(_describe_weights, model)
        self.metrics.set_model(
            name=name, sha256=sha256, source=source, device=model.device, dtype=model.dtype
        )
        self.metrics_port = self.metrics.serve(self.config.metrics.port, self.config.metrics.host)
        self.curve = secure_ingress(self.config.security, self.metrics)
        labels = components.label_store(self.config)
        self.pipeline = StreamPipeline(
            source=components.frame_listener(self.config, curve=self.curve, stored=labels.stored),
            segmenter=self.segmenter,
            labels=labels,
            results=components.result_publisher(self.config, curve=self.curve),
            config=self.config,
            metrics=self.metrics,
            model_name=name,
        )
        await self.pipeline.start()
        log.info("ingress ready: %s, metrics on port %d", self.pipeline.endpoints, self.metrics_port)

    async def drain(self, deadline_s: float | None = None) -> dict[str, Any]:
        """Stop taking frames and finish the accepted ones (see :meth:`StreamPipeline.stop`).

        ``cellsam-stream serve`` calls it on SIGINT/SIGTERM before the model deployments are removed, so
        frames in flight still have replicas to run on. Returns the drain report as a dict.
        """
        timeout = self.config.shutdown.drain_timeout_s if deadline_s is None else deadline_s
        report = await self.pipeline.stop(deadline_s=timeout)
        return report.as_dict()

    async def __del__(self) -> None:
        # Serve calls this on shutdown: drain (a no-op after `drain`), close sockets.
        pipeline = getattr(self, "pipeline", None)
        if pipeline is not None:
            await pipeline.stop(deadline_s=self.config.shutdown.drain_timeout_s)
        curve = getattr(self, "curve", None)
        if curve is not None:
            curve.close()
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.close()

    @http_app.get("/endpoints")
    def endpoints(self) -> dict[str, Any]:
        """Where the service listens (ZeroMQ ingest/results, metrics port)."""
        return {**self.pipeline.endpoints, "metrics_port": self.metrics_port}

    @http_app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Segment a small synthetic frame through encoder and decoder."""
        from cellsam_core.synthetic import synthetic_frame

        image, _ = synthetic_frame((64, 64), seed=0, modality="nuclear", n_cells=3)
        t0 = time.perf_counter()
        try:
            decoded = await asyncio.wait_for(self.segmenter.segment(image), timeout=120)
        except Exception as exc:
            raise HTTPException(status_code=503, detail=f"inference failed: {exc}") from exc
        return {
            "status": "ok",
            "seconds": round(time.perf_counter() - t0, 4),
            "cells": decoded.segmentation.n_cells,
            "model": self.config.model.name,
        }

    @http_app.get("/acquisitions")
    async def acquisitions(self) -> dict[str, Any]:
        """Status and progress of each acquisition seen since the service started: this run's counts,
        and ``frames_stored`` from its store's done map (the whole acquisition, across restarts)."""
        return {
            "acquisitions": await self.pipeline.acquisitions(),
            "listener": self.pipeline.source.stats.as_dict(),
        }

    @http_app.get("/metrics")
    def metrics_text(self) -> Response:
        """The Prometheus exposition (also served on the metrics port)."""
        return Response(self.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @http_app.post("/segment")
    async def segment(self, request: Request, format: str = "tiff") -> Response:
        """Segment one image: same answer as ``cellsam-stream segment``.

        The body is refused before it is decoded when it is larger than ``ingest.max_frame_bytes`` or its
        header declares more than ``ingest.max_frame_pixels`` pixels per plane (413), and when its format
        or dtype is not one the ZeroMQ path takes either (415).
        """
        from cellsam_core.errors import ImageFormatError, ImageTooLargeError
        from cellsam_core.io import decode_image_bytes, encode_labels_bytes

        if format not in ("tiff", "npy"):
            raise HTTPException(status_code=400, detail="format must be 'tiff' or 'npy'")
        ingest = self.config.ingest
        limit = ingest.max_frame_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise HTTPException(status_code=413, detail=_too_large_body(int(declared), limit))
        body = await request.body()
        if len(body) > limit:
            raise HTTPException(status_code=413, detail=_too_large_body(len(body), limit))
        try:
            image = decode_image_bytes(body, name="request body", max_pixels=ingest.max_frame_pixels)
        except ImageTooLargeError as exc:
            raise HTTPException(status_code=413, detail=f"{exc} (ingest.max_frame_pixels)") from exc
        except ImageFormatError as exc:
            raise HTTPException(status_code=415, detail=str(exc)) from exc
        try:
            decoded = await self.segmenter.segment(image)
        except ValueError as exc:  # ImageFormatError and friends, raised inside the replicas
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        labels = decoded.segmentation.labels
        media = "image/tiff" if format == "tiff" else "application/octet-stream"
        return Response(
            encode_labels_bytes(labels, format),
            media_type=media,
            headers={"X-Cell-Count": str(decoded.segmentation.n_cells)},
        )


def _too_large_body(size: int, limit: int) -> str:
    return f"request body of {size} bytes exceeds the limit of {limit} bytes (ingest.max_frame_bytes)"


def build_app(args: dict[str, Any]) -> serve.Application:
    """Bind the three deployments; loads nothing (weights are loaded inside the replicas)."""
    config = ServiceConfig.model_validate(args)
    model = config.model.model_dump()
    encoder = Encoder.options(  # type: ignore[attr-defined]
        num_replicas=config.encoder.replicas,
        ray_actor_options={"num_gpus": config.encoder.num_gpus, "resources": config.encoder.resources},
        user_config={
            "max_batch_size": config.encoder.max_batch_size,
            "batch_wait_timeout_s": config.encoder.batch_wait_timeout_s,
        },
    ).bind(model, config.encoder.model_dump())
    decoder = Decoder.options(  # type: ignore[attr-defined]
        num_replicas=config.decoder.replicas,
        ray_actor_options={"num_gpus": config.decoder.num_gpus, "resources": config.decoder.resources},
    ).bind(model, config.decoder.model_dump())
    return Ingress.bind(encoder, decoder, config.model_dump())  # type: ignore[attr-defined]
