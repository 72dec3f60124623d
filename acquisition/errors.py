"""Errors raised by :mod:`acquisition`.

Every error derives from :class:`AcquisitionError` and from the builtin it refines, so callers can catch
either (``except AcquisitionError`` or ``except ValueError``). Messages say what was wrong and what to do.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AcquisitionError",
    "InvalidAcquisitionIdError",
    "ListenerClosedError",
    "NotConnectedError",
    "ProtocolError",
    "SendTimeoutError",
    "SourceError",
    "TrackFileError",
]


class AcquisitionError(Exception):
    """Base class of every error raised by ``acquisition``."""


class ProtocolError(AcquisitionError, ValueError):
    """A message does not follow the wire protocol (``docs/protocol.md``).

    Attributes
    ----------
    reason : str
        Stable reason code (``bad_json``, ``bad_dtype``, ...; see :class:`acquisition.protocol.Reason`),
        used as the metric label and in rejection results.
    detail : str
        Human-readable explanation.
    acquisition : str or None
        The message's acquisition id when it was valid, so a rejection can be published to it.
    index : dict or None
        The message's ``index`` when it was valid.
    """

    def __init__(
        self,
        reason: str,
        detail: str,
        *,
        acquisition: str | None = None,
        index: dict[str, Any] | None = None,
    ) -> None:
        self.reason = str(reason)
        self.detail = detail
        self.acquisition = acquisition
        self.index = index
        super().__init__(f"{self.reason}: {detail}")


class InvalidAcquisitionIdError(ProtocolError):
    """An acquisition id breaks the id rule (:mod:`acquisition.ids`); reason ``bad_acquisition_id``.

    The one error for a bad id, wherever it is checked: on the wire (the message is rejected with this
    reason), in a client before sending, in a label sink before touching the output folder.
    """

    def __init__(self, detail: str) -> None:
        super().__init__("bad_acquisition_id", detail)


class SendTimeoutError(AcquisitionError, TimeoutError):
    """A frame could not be queued for sending within the sender's timeout.

    The receiver is behind (or gone) and ZeroMQ's high-water mark is full. Retry, skip the frame, or
    raise the timeout; the frame was not sent.
    """


class NotConnectedError(AcquisitionError, TimeoutError):
    """No receiver completed a connection within the time allowed (nothing listening, unreachable, or
    the receiver refused this client's CURVE keys: ``refused`` is then True)."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        self.refused = refused
        super().__init__(message)


class ListenerClosedError(AcquisitionError, RuntimeError):
    """The listener was stopped and every frame it had accepted has been consumed."""


class SourceError(AcquisitionError, ValueError):
    """A simulator source (file or synthetic settings) cannot be played: the message says why."""


class TrackFileError(AcquisitionError, ValueError):
    """Tracks or a lineage cannot be written or read in a track file format (CTC, GEFF): the message
    says why."""
