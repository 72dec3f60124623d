"""Errors raised by :mod:`cellsam_core`.

Every error derives from :class:`CellSAMError` and from the builtin it refines, so callers can catch
either (``except CellSAMError`` or ``except ValueError``). Messages say what was wrong and what to do.
"""

from __future__ import annotations

__all__ = [
    "CellSAMError",
    "CellTableError",
    "CheckpointError",
    "DownloadError",
    "ImageFormatError",
    "ImageTooLargeError",
    "StaleFrameError",
    "TrackingError",
    "UnknownModelError",
    "WeightsNotFoundError",
]


class CellSAMError(Exception):
    """Base class of every error raised by ``cellsam_core``."""


class ImageFormatError(CellSAMError, ValueError):
    """An input image has a shape, dtype or values the model cannot take (e.g. 4+ channels, NaN)."""


class ImageTooLargeError(ImageFormatError):
    """An input image has more pixels than the caller allows (found in its header, before decoding).

    Attributes
    ----------
    pixels, limit : int
        Pixels of one plane (``H * W``) of the image, and the most allowed.
    """

    def __init__(self, message: str, *, pixels: int, limit: int) -> None:
        self.pixels = pixels
        self.limit = limit
        super().__init__(message)


class CellTableError(CellSAMError, ValueError):
    """Columns of a cell table that do not fit together (lengths, shapes, label ids, missing columns)."""


class UnknownModelError(CellSAMError, KeyError):
    """A model name is not in the registry of builders."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(f"unknown model {name!r}; known models: {', '.join(sorted(known))}")

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class CheckpointError(CellSAMError, ValueError):
    """A checkpoint file does not match the model: lists the offending keys.

    Attributes
    ----------
    missing, unexpected : list of str
        Keys the model needs but the file lacks, and keys the file has but the model does not.
    mismatched : list of (key, file_shape, model_shape)
        Keys present in both with different shapes.
    """

    def __init__(
        self,
        message: str,
        *,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] | None = None,
    ) -> None:
        self.missing = list(missing or [])
        self.unexpected = list(unexpected or [])
        self.mismatched = list(mismatched or [])
        super().__init__(message)


class WeightsNotFoundError(CellSAMError, FileNotFoundError):
    """No weights file was found where weights are looked for; the message says how to get them."""


class DownloadError(CellSAMError, RuntimeError):
    """Downloading or verifying a weights archive failed (HTTP error, checksum mismatch, bad archive)."""


class TrackingError(CellSAMError, ValueError):
    """Input the tracker cannot link: a label image or cell table that does not fit, a time index before
    the first frame, or a saved tracker state that does not validate."""


class StaleFrameError(TrackingError):
    """A frame was offered for a time index the tracker has already passed (linked and no longer held, or
    declared missing with :meth:`~cellsam_core.tracking.OnlineTracker.skip`).

    Attributes
    ----------
    t : int
        The time index offered.
    """

    def __init__(self, t: int, message: str) -> None:
        self.t = t
        super().__init__(message)
