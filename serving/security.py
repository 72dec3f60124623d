"""The service's side of authentication: the HTTP bearer token and CURVE on the ZeroMQ sockets.

The Ingress calls :func:`secure_ingress` once; refusals of every kind feed one counter,
``cellsam_auth_failures_total{endpoint=ingest|results|http}``.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable
from pathlib import Path

from fastapi import HTTPException, Request

from acquisition.security import CurveServer
from serving.config import SecuritySettings
from serving.metrics import ServiceMetrics

__all__ = ["BearerTokenGuard", "http_guard", "read_http_token", "require_http_token", "secure_ingress"]

log = logging.getLogger(__name__)


class TokenError(ValueError):
    """The configured HTTP token cannot be read (missing file or variable, empty)."""


def read_http_token(security: SecuritySettings) -> str | None:
    """The HTTP bearer token from ``http_token_file`` or ``http_token_env``; ``None`` when neither is set.

    Raises :class:`TokenError` when one is set but holds no token.
    """
    if security.http_token_file is not None:
        path = Path(security.http_token_file)
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise TokenError(f"cannot read the HTTP token file {path}: {exc.strerror or exc}") from None
        if not token:
            raise TokenError(f"the HTTP token file {path} is empty")
        return token
    if security.http_token_env is not None:
        token = os.environ.get(security.http_token_env, "").strip()
        if not token:
            raise TokenError(
                f"the environment variable {security.http_token_env} (the HTTP token) is not set"
            )
        return token
    return None


class BearerTokenGuard:
    """A FastAPI dependency: every request must carry ``Authorization: Bearer <token>`` once configured.

    Unconfigured (no token), it lets everything through. Wrong or missing tokens get 401 and are counted
    through ``on_failure``. Tokens are compared in constant time.
    """

    def __init__(self) -> None:
        self._token: bytes | None = None
        self._on_failure: Callable[[], None] | None = None

    def configure(self, token: str | None, on_failure: Callable[[], None] | None = None) -> None:
        self._token = token.encode() if token else None
        self._on_failure = on_failure

    async def __call__(self, request: Request) -> None:
        if self._token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token):
            return
        if self._on_failure is not None:
            self._on_failure()
        raise HTTPException(
            status_code=401,
            detail="missing or wrong bearer token (send Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )


#: The guard of the service's HTTP routes (one Ingress replica per process).
http_guard = BearerTokenGuard()


async def require_http_token(request: Request) -> None:
    """The FastAPI dependency of every route: asks :data:`http_guard`.

    A module-level function on purpose: Serve copies the FastAPI app (by pickling) into the replica, and
    a function is pickled by reference, so the copy still reaches the guard the Ingress configures.
    """
    await http_guard(request)


def secure_ingress(security: SecuritySettings, metrics: ServiceMetrics) -> CurveServer | None:
    """Arm the HTTP guard and, with CURVE configured, start the CURVE server for the ZeroMQ sockets."""
    failures = metrics.auth_failures
    http_guard.configure(read_http_token(security), on_failure=failures.labels(endpoint="http").inc)
    if not security.curve:
        return None
    curve = CurveServer(
        secret_key_file=security.curve_secret_key or "",
        allowed_clients=security.curve_clients or "",
        on_refused=lambda endpoint: failures.labels(endpoint=endpoint).inc(),
    )
    curve.start()
    log.info("CURVE on the ZeroMQ sockets; clients allowed from %s", security.curve_clients)
    return curve
