"""Errors raised by label sinks (`acquisition.sink`, `acquisition.zarr_sink`, `acquisition.memory_sink`).

Every class inherits `SinkError` (itself an `acquisition.errors.AcquisitionError`) and the builtin that
matches the failure, so callers can catch the package error or the builtin (`except ValueError` works).
"""

from __future__ import annotations

from acquisition.errors import AcquisitionError

__all__ = [
    "AcquisitionClosedError",
    "AcquisitionNotOpenError",
    "FrameNotWrittenError",
    "IncompatibleStoreError",
    "InvalidFrameError",
    "InvalidIdentifierError",
    "SinkError",
    "StoreNotFoundError",
]


class SinkError(AcquisitionError):
    """Base class of every error raised by a label sink."""


class InvalidIdentifierError(SinkError, ValueError):
    """An acquisition id or frame index is not acceptable (bad characters, path escape, out of range)."""


class InvalidFrameError(SinkError, ValueError):
    """A frame's labels, image or cell table do not match the acquisition (shape, dtype, lengths)."""


class AcquisitionNotOpenError(SinkError, LookupError):
    """A frame was written to (or read from) an acquisition this sink has not opened."""


class AcquisitionClosedError(SinkError, RuntimeError):
    """A frame was written to an acquisition after `close_acquisition`; reopen it to add frames."""


class IncompatibleStoreError(SinkError, FileExistsError):
    """The output path already holds something that is not a compatible store for this acquisition."""


class StoreNotFoundError(SinkError, FileNotFoundError):
    """No store of the acquisition exists where one was expected (to attach to or to re-track)."""


class FrameNotWrittenError(SinkError, KeyError):
    """A frame that is not marked done was read back."""

    def __str__(self) -> str:
        # KeyError quotes its argument; keep the message readable.
        return str(self.args[0]) if self.args else ""
