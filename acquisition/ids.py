"""Acquisition ids: the one rule for what an id may be, used by the wire protocol, clients and sinks.

An id names a directory in the output folder (``{id}.ome.zarr``) and a ZeroMQ topic, so it must be one
safe path component: 1–128 characters from ``[A-Za-z0-9._-]``, not starting with a dot (never ``..``,
never hidden, never a path outside the output folder).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field

from acquisition.errors import InvalidAcquisitionIdError

__all__ = ["ACQUISITION_ID_PATTERN", "AcquisitionId", "is_acquisition_id", "validate_acquisition_id"]

ACQUISITION_ID_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"
_ID_RE = re.compile(ACQUISITION_ID_PATTERN)

#: The id as a pydantic field type (messages and specs validate with the same pattern).
AcquisitionId = Annotated[
    str, Field(pattern=ACQUISITION_ID_PATTERN, description="Acquisition id: 1-128 of [A-Za-z0-9._-].")
]


def is_acquisition_id(value: object) -> bool:
    """True when ``value`` is a string that is a valid acquisition id."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def validate_acquisition_id(value: object) -> str:
    """Return ``value`` if it is a valid acquisition id, else raise :class:`InvalidAcquisitionIdError`."""
    if not is_acquisition_id(value):
        raise InvalidAcquisitionIdError(
            f"acquisition id {str(value)[:140]!r} must be 1-128 characters from [A-Za-z0-9._-], "
            "not starting with '.'"
        )
    return value  # type: ignore[return-value]  # is_acquisition_id checked the type
