"""``ResultPublisher``: the ZeroMQ :class:`~acquisition.results.ResultSink` (an XPUB socket).

An XPUB socket bound by a background thread that owns it (ZeroMQ sockets are not thread-safe), so
``publish_*`` may be called from any thread or event loop and never blocks: PUB drops messages for a
subscriber that is behind rather than slowing the pipeline. Topics and payloads: ``docs/protocol.md`` §3.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from acquisition.outcome import FrameOutcome
from acquisition.protocol import (
    DEFAULT_RESULT_ENDPOINT,
    AcquisitionSummary,
    FrameResult,
    Hello,
    LabelsInfo,
    TrackResult,
    dump_json,
)
from acquisition.results import check_labels
from acquisition.sockets import bind_socket

__all__ = ["ResultPublisher"]

log = logging.getLogger(__name__)

_Item = tuple[FrameResult | AcquisitionSummary | TrackResult, bytes, np.ndarray | None]


class ResultPublisher:
    """Bind an XPUB socket and publish results (thread-safe, non-blocking).

    Parameters
    ----------
    endpoint : str
        Endpoint to bind. Default ``tcp://127.0.0.1:5556`` (loopback). ``tcp://127.0.0.1:*`` binds a
        free port; read :attr:`endpoint` after :meth:`start`.
    heartbeat_interval : float
        Seconds between ``hello`` messages on topic ``h`` (subscribers use them to know they are
        connected; see ``ResultSubscriber.wait_ready``).
    sndhwm : int
        Per-subscriber queue (messages) before ZeroMQ drops messages for that subscriber.
    socket_options : callable, optional
        Called with the socket before ``bind`` (e.g. CURVE server keys).
    """

    def __init__(
        self,
        *,
        endpoint: str = DEFAULT_RESULT_ENDPOINT,
        heartbeat_interval: float = 0.5,
        sndhwm: int = 1000,
        socket_options: Callable[[zmq.Socket[Any]], None] | None = None,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        if heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be > 0 seconds, got {heartbeat_interval}")
        self._bind_endpoint = endpoint
        self._endpoint: str | None = None
        self.heartbeat_interval = heartbeat_interval
        self._sndhwm = sndhwm
        self._socket_options = socket_options
        self._context = context
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._label_prefixes: set[str] = set()
        self._thread: threading.Thread | None = None
        self._socket: zmq.Socket[Any] | None = None
        self._owned_context: zmq.Context[Any] | None = None
        self.published = 0

    @property
    def endpoint(self) -> str:
        """The bound endpoint (wildcard ports resolved); the configured one before :meth:`start`."""
        return self._endpoint or self._bind_endpoint

    def start(self) -> None:
        """Bind the socket and start the publishing thread. Raises ``zmq.ZMQError`` if taken."""
        if self._thread is not None:
            raise RuntimeError("ResultPublisher.start() was already called")
        # Our own context unless given one: close() terminates it, so label buffers sent without a
        # copy are released only after ZeroMQ is done with them.
        ctx = self._context or zmq.Context()
        self._owned_context = None if self._context is not None else ctx
        sock = ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.SNDHWM, self._sndhwm)
        sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # see every subscribe, so each new subscriber gets a hello
        self._endpoint = bind_socket(sock, self._bind_endpoint, self._socket_options)
        self._socket = sock
        self._thread = threading.Thread(target=self._run, name="ResultPublisher", daemon=True)
        self._thread.start()
        log.info("result publisher bound to %s", self._endpoint)

    def close(self, timeout: float = 5.0) -> None:
        """Publish what is queued, stop the thread and close the socket."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None
        if self._owned_context is not None and self._socket is not None and self._socket.closed:
            self._owned_context.term()

    def __enter__(self) -> ResultPublisher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- publishing (any thread) -----------------------------------------------------------------

    def wants_labels(self, acquisition: str) -> bool:
        """True while some subscriber holds a subscription matching ``l/<acquisition>``."""
        topic = "l/" + acquisition
        return any(topic.startswith(prefix) for prefix in tuple(self._label_prefixes))

    def publish(self, outcome: FrameOutcome) -> None:
        """Publish one frame's outcome; an ``ok`` outcome's labels go to subscribers that asked for them.

        The label image is sent as little-endian ``uint32`` without a copy when it already is one; it
        must not be modified afterwards.
        """
        self.publish_result(outcome.result(), labels=outcome.labels)

    def publish_result(self, result: FrameResult, labels: np.ndarray | None = None) -> None:
        """Publish a ready-made :class:`FrameResult` (with its (H, W) integer label image, if any)."""
        if result.timestamp is None:
            result = result.model_copy(update={"timestamp": time.time()})
        check_labels(labels)
        # Whether anyone wants the labels is decided in the publishing thread, after it has read the
        # latest subscriptions; until then the array is only referenced, never copied.
        self._queue.put((result, dump_json(result), labels))

    def publish_summary(self, summary: AcquisitionSummary) -> None:
        """Publish an end-of-acquisition summary."""
        self._queue.put((summary, dump_json(summary), None))

    def publish_tracks(self, tracks: TrackResult) -> None:
        """Publish a frame's tracks on ``t/<acquisition>``."""
        if tracks.timestamp is None:
            tracks = tracks.model_copy(update={"timestamp": time.time()})
        self._queue.put((tracks, dump_json(tracks), None))

    # -- the thread that owns the socket ---------------------------------------------------------

    def _run(self) -> None:
        sock = self._socket
        if sock is None:  # pragma: no cover - start() sets it
            return
        next_hello = time.monotonic()
        try:
            while True:
                wait = max(0.0, next_hello - time.monotonic())
                try:
                    item: _Item | bool | None = self._queue.get(timeout=wait)
                except queue.Empty:
                    item = False
                if self._read_subscriptions(sock):
                    next_hello = 0.0  # greet a new subscriber now
                if item is None:
                    break
                if item is not False:
                    self._send(sock, item)  # type: ignore[arg-type]
                if time.monotonic() >= next_hello:
                    sock.send_multipart([b"h", dump_json(Hello(time=time.time()))])
                    next_hello = time.monotonic() + self.heartbeat_interval
            # Flush what was queued before close().
            while True:
                try:
                    rest = self._queue.get_nowait()
                except queue.Empty:
                    break
                if rest is not None:
                    self._send(sock, rest)
        except Exception:
            log.exception("result publisher thread failed")
        finally:
            sock.close(linger=1000)

    def _read_subscriptions(self, sock: zmq.Socket[Any]) -> bool:
        """Apply pending (un)subscriptions; True if someone subscribed to heartbeats."""
        greeted = False
        while True:
            try:
                msg = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return greeted
            if not msg:
                continue
            subscribe, topic = msg[0] == 1, msg[1:].decode("ascii", errors="replace")
            if topic == "h" and subscribe:
                greeted = True
            if topic.startswith("l/") or "l/".startswith(topic):
                if subscribe:
                    self._label_prefixes.add(topic)
                else:
                    self._label_prefixes.discard(topic)

    def _send(self, sock: zmq.Socket[Any], item: _Item) -> None:
        model, plain, labels = item
        topic = model.acquisition.encode()
        if isinstance(model, TrackResult):
            sock.send_multipart([b"t/" + topic, plain])
            self.published += 1
            return
        sock.send_multipart([b"r/" + topic, plain])
        if self.wants_labels(model.acquisition):
            if labels is not None and isinstance(model, FrameResult):
                buffer = np.ascontiguousarray(labels, dtype=np.dtype("<u4"))
                info = LabelsInfo(shape=tuple(buffer.shape), dtype="uint32")
                header = dump_json(model.model_copy(update={"labels": info}))
                parts: list[Any] = [b"l/" + topic, header, buffer]
                sock.send_multipart(parts, copy=False)
            else:
                sock.send_multipart([b"l/" + topic, plain])
        self.published += 1
