"""Errors raised by the feedback side (:mod:`acquisition.feedback`, :mod:`acquisition.actuators`,
:mod:`acquisition.stage`, :mod:`acquisition.action_table`).

Every class inherits :class:`FeedbackError` (itself an :class:`acquisition.errors.AcquisitionError`) and the
builtin that matches the failure, so ``except ValueError`` works too.
"""

from __future__ import annotations

from acquisition.errors import AcquisitionError

__all__ = ["ActionTableError", "FeedbackError", "InvalidActionError", "StageMappingError"]


class FeedbackError(AcquisitionError):
    """Base class of every error raised by the feedback loop, its actuators and its helpers."""


class InvalidActionError(FeedbackError, ValueError):
    """An action (or what a rule returned) is not acceptable: the message says what and how to fix it."""


class StageMappingError(FeedbackError, ValueError):
    """A pixel position cannot be mapped to the stage: pixel size, frame shape or stage position unknown,
    or an orientation that is not invertible."""


class ActionTableError(FeedbackError, OSError):
    """The action table in the acquisition's store cannot be read or written."""
